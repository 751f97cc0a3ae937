"""FDA math (distmerge.ops.fda) on hand-checkable cases: no I/O, no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distmerge.ops import fda


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def linear_unit(d_in: int, d_out: int, dtype=torch.float64) -> torch.nn.Module:
    return torch.nn.Linear(d_in, d_out, bias=False).to(dtype)


def mlp_unit(hidden: int = 6, inner: int = 10, dtype=torch.float64):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inner, num_attention_heads=2,
                                num_key_value_heads=2)).to(dtype)


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def perturbed(params: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p + scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


# --- similarity, loss, seeds ----------------------------------------------------------------------


def test_similarity_by_hand():
    out = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    # cos: (1/sqrt 2 + (-1)) / 2
    assert fda.similarity(out, target, "cos").item() == pytest.approx((2 ** -0.5 - 1) / 2)
    # mse/l1 are negated means: a larger distance is a lower similarity
    assert fda.similarity(out, target, "mse").item() == pytest.approx(-(0 + 1 + 0 + 25) / 4)
    assert fda.similarity(out, target, "l1").item() == pytest.approx(-(0 + 1 + 0 + 5) / 4)
    # anchors with tokens are flattened per anchor: [n, t, d] -> [n, t*d]
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert fda.similarity(a, b, "cos").item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        fda.similarity(out, target, "kl")


def test_adaptation_losses_are_sums():
    out = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    assert fda.adaptation_loss(out, target, "cos").item() == pytest.approx(-(2 ** -0.5 - 1))
    assert fda.adaptation_loss(out, target, "mse").item() == pytest.approx(26.0)
    assert fda.adaptation_loss(out, target, "l1").item() == pytest.approx(6.0)


def test_alignment_loss_is_a_sum_of_one_minus_cosines():
    tau = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0, 0.0]]), "c": torch.tensor([0.0, 1.0])}
    grads = {"a": 5 * tau["a"], "b": -tau["b"], "c": torch.tensor([1.0, 0.0])}
    assert fda.alignment_loss(grads, tau).item() == pytest.approx(0.0 + 2.0 + 1.0)


def test_derive_seed_is_stable_and_distinct():
    assert fda.derive_seed(0, "anchors", 3, "math") == fda.derive_seed(0, "anchors", 3, "math")
    seeds = {fda.derive_seed(0, "anchors", layer, task) for layer in range(4) for task in ("math", "code")}
    assert len(seeds) == 8
    assert all(0 <= s < 2 ** 63 for s in seeds)


# --- the anchor gradient --------------------------------------------------------------------------


def test_sign_convention_follows_the_code():
    """With S = -MSE and orthonormal anchors, dS/dW at W0 is exactly +c·τ: the code's sign (the gradient of
    the similarity) points along the task vector; the paper's literal ∇Dist would point against it."""
    torch.manual_seed(0)
    unit = linear_unit(4, 3)
    base = params_of(unit)
    expert = perturbed(base, 0.1, 1)
    anchors = torch.eye(4, dtype=torch.float64)
    cos = fda.gradient_cosines(fda.unit_forward(unit), base, expert, anchors, kind="mse")
    assert cos["weight"] == pytest.approx(1.0, abs=1e-12)
    leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    grads = fda.anchor_gradients(fda.unit_forward(unit), leaves, expert, anchors, kind="mse")
    tau = expert["weight"] - base["weight"]
    # S = -mean over 4x3 entries of ((W0 - Wt) I)^2  ->  dS/dW0 = -2/12 (W0 - Wt) = tau / 6
    assert torch.allclose(grads["weight"], tau / 6, atol=1e-12)


def test_anchor_gradient_matches_finite_differences():
    torch.manual_seed(1)
    unit = mlp_unit()
    base = params_of(unit)
    expert = perturbed(base, 0.05, 2)
    x = torch.randn(5, 6, dtype=torch.float64)
    forward = fda.unit_forward(unit)
    leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    grads = fda.anchor_gradients(forward, leaves, expert, x, kind="cos", create_graph=False)
    eps = 1e-6
    for name in ("gate_proj.weight", "down_proj.weight"):
        for index in [(0, 0), (2, 3), (5, 1)]:
            plus = {**base, name: base[name].clone()}
            minus = {**base, name: base[name].clone()}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric = (fda.similarity(forward(plus, x), forward(expert, x)) -
                       fda.similarity(forward(minus, x), forward(expert, x))) / (2 * eps)
            assert grads[name][index].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)


def test_second_order_gradient_in_the_anchors_matches_finite_differences():
    """The construction loss is differentiated through the anchor gradient (create_graph): dL/dX is right."""
    torch.manual_seed(2)
    unit = mlp_unit()
    base = params_of(unit)
    expert = perturbed(base, 0.05, 3)
    tau = {n: expert[n] - base[n] for n in base}
    forward = fda.unit_forward(unit)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def loss_at(anchors):
        leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
        return fda.alignment_loss(fda.anchor_gradients(forward, leaves, expert, anchors), tau)

    (analytic,) = torch.autograd.grad(loss_at(x), [x])
    eps = 1e-6
    for index in [(0, 0), (1, 4), (3, 2)]:
        plus, minus = x.detach().clone(), x.detach().clone()
        plus[index] += eps
        minus[index] -= eps
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        assert analytic[index].item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-8)


# --- construction ---------------------------------------------------------------------------------


def test_construction_reduces_the_loss_and_keeps_the_best_anchors():
    torch.manual_seed(3)
    unit = mlp_unit(8, 12, torch.float32)
    base = params_of(unit)
    expert = perturbed(base, 0.02, 4)
    forward = fda.unit_forward(unit)
    init = fda.gauss_anchors(16, (8,), 0.01, torch.Generator().manual_seed(5))
    result = fda.construct_anchors(forward, base, expert, init, steps=40, lr=1e-2)
    assert len(result.losses) == 40
    assert result.initial_loss == result.losses[0]
    assert result.best_loss == min(result.losses) < result.initial_loss
    assert result.best_step == result.losses.index(result.best_loss)
    tau = {n: expert[n] - base[n] for n in base}
    leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
    recomputed = fda.alignment_loss(fda.anchor_gradients(forward, leaves, expert, result.anchors), tau).item()
    assert recomputed == pytest.approx(result.best_loss, rel=1e-5)
    cos_before = fda.gradient_cosines(forward, base, expert, init)
    cos_after = fda.gradient_cosines(forward, base, expert, result.anchors)
    assert sum(cos_after.values()) > sum(cos_before.values()) + 0.3


def test_best_anchors_are_the_ones_evaluated_before_the_step():
    """§8.7.10: with one step the only evaluated X is the initial one, so it is kept although X moved."""
    torch.manual_seed(4)
    unit = mlp_unit(8, 12, torch.float32)
    base = params_of(unit)
    expert = perturbed(base, 0.02, 6)
    init = fda.gauss_anchors(8, (8,), 0.01, torch.Generator().manual_seed(7))
    result = fda.construct_anchors(fda.unit_forward(unit), base, expert, init, steps=1)
    assert torch.equal(result.anchors, init)
    assert result.best_step == 0
    # AdamW's decoupled weight decay (0.01) acts on X too: the first step moves X by lr*sign(grad) + lr*wd*X.
    zero = fda.construct_anchors(fda.unit_forward(unit), base, expert, init, steps=0)
    assert torch.equal(zero.anchors, init) and zero.losses == []
    assert zero.best_loss == pytest.approx(result.initial_loss, rel=1e-6)


def test_construction_is_deterministic():
    torch.manual_seed(5)
    unit = mlp_unit(8, 12, torch.float32)
    base = params_of(unit)
    expert = perturbed(base, 0.02, 8)
    runs = [fda.construct_anchors(fda.unit_forward(unit), base, expert,
                                  fda.gauss_anchors(8, (8,), 0.01, torch.Generator().manual_seed(9)), steps=5)
            for _ in range(2)]
    assert torch.equal(runs[0].anchors, runs[1].anchors) and runs[0].losses == runs[1].losses


# --- initialization -------------------------------------------------------------------------------


def test_gauss_init_shape_and_scale():
    g = torch.Generator().manual_seed(0)
    x = fda.gauss_anchors(4096, (16,), 0.01, g)
    assert x.shape == (4096, 16)
    assert x.std().item() == pytest.approx(0.01, rel=0.05)
    assert fda.gauss_anchors(3, (5, 16), 1.0, g).shape == (3, 5, 16)


def test_weight_rows_take_matrices_whose_input_is_the_hidden_size():
    unit = mlp_unit(6, 10, torch.float32)  # gate/up: [10, 6]; down: [6, 10] (input 10: excluded)
    params = params_of(unit)
    rows = fda.weight_rows(params, 6)
    assert rows.shape == (20, 6)
    assert torch.equal(rows[:10], params["gate_proj.weight"]) and torch.equal(rows[10:], params["up_proj.weight"])
    with pytest.raises(ValueError):
        fda.weight_rows({"w": torch.zeros(3, 4)}, 6)


def test_weight_init_draws_distinct_rows_without_padding():
    rows = torch.arange(40.0).reshape(20, 2)
    x = fda.weight_anchors(rows, 8, None, torch.Generator().manual_seed(1))
    assert x.shape == (8, 2)
    picked = {tuple(r.tolist()) for r in x}
    assert len(picked) == 8 and picked <= {tuple(r.tolist()) for r in rows}
    tokens = fda.weight_anchors(rows, 3, 4, torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 4, 2)


def test_weight_init_pads_with_means_of_random_row_pairs():
    rows = torch.tensor([[0.0, 0.0], [2.0, 4.0], [10.0, 20.0]])
    x = fda.weight_anchors(rows, 7, None, torch.Generator().manual_seed(2))
    assert torch.equal(x[:3], rows)  # every row kept, in order, as the NLG reference pads
    pair_means = {tuple(((rows[i] + rows[j]) / 2).tolist()) for i in range(3) for j in range(3)}
    assert all(tuple(r.tolist()) in pair_means for r in x[3:])
    assert fda.weight_anchors(rows, 2, 3, torch.Generator().manual_seed(2)).shape == (2, 3, 2)


# --- adaptation -----------------------------------------------------------------------------------


def _ta(base, experts, lam):
    return {n: base[n] + lam * sum(e[n] - base[n] for e in experts) for n in base}


def test_alpha_one_and_zero_epochs_return_the_initial_merge_exactly():
    """§10: FDA adaptation with α = 1 and zero epochs returns the TA model exactly."""
    torch.manual_seed(6)
    unit = mlp_unit(8, 12, torch.float32)
    base = params_of(unit)
    experts = [perturbed(base, 0.02, 10), perturbed(base, 0.02, 11)]
    ta = _ta(base, experts, 0.5)
    model = fda.ElementwiseMerge(base, [ta], 1.0, start=ta)
    x = torch.randn(6, 8)
    result = fda.adapt_unit(fda.unit_forward(unit), model, x, torch.randn(6, 8), epochs=0, lr=1e-2, batch_size=4,
                            generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(result.params[n], ta[n]) for n in ta)
    assert result.initial_loss == result.final_loss and result.epoch_losses == []
    # Without the exact start, θ0 + 1·(θ_TA − θ0) is the same model up to rounding.
    plain = fda.ElementwiseMerge(base, [ta], 1.0).params()
    assert all(torch.allclose(plain[n], ta[n], atol=1e-6) for n in ta)
    # One α per expert at λ: the TA merge itself.
    per_expert = fda.ElementwiseMerge(base, experts, 0.5).params()
    assert all(torch.allclose(per_expert[n], ta[n], atol=1e-6) for n in ta)


def test_adaptation_moves_outputs_toward_the_experts():
    torch.manual_seed(7)
    unit = mlp_unit(8, 12, torch.float32)
    forward = fda.unit_forward(unit)
    base = params_of(unit)
    experts = [perturbed(base, 0.05, 12), perturbed(base, 0.05, 13)]
    ta = _ta(base, experts, 0.5)
    g = torch.Generator().manual_seed(1)
    anchors = [torch.randn(32, 8, generator=g) for _ in experts]
    with torch.no_grad():
        targets = [forward(e, x) for e, x in zip(experts, anchors)]
    x, y = torch.cat(anchors), torch.cat(targets)
    for param, loss in (("elementwise", "cos"), ("elementwise", "mse"), ("raw", "mse")):
        model = (fda.ElementwiseMerge(base, [ta], 1.0, start=ta) if param == "elementwise"
                 else fda.RawWeights(base))
        result = fda.adapt_unit(forward, model, x, y, epochs=30, lr=1e-2, batch_size=16, kind=loss,
                                generator=torch.Generator().manual_seed(2))
        assert result.final_loss < result.initial_loss, (param, loss)
        assert len(result.epoch_losses) == 30


def test_alpha_only_moves_coordinates_where_the_delta_is_nonzero():
    torch.manual_seed(8)
    unit = linear_unit(4, 3, torch.float32)
    forward = fda.unit_forward(unit)
    base = params_of(unit)
    initial = {"weight": base["weight"].clone()}
    initial["weight"][0] += 0.3  # only row 0 differs from the base
    x = torch.randn(10, 4)
    y = torch.randn(10, 3)
    result = fda.adapt_unit(forward, fda.ElementwiseMerge(base, [initial], 1.0, start=initial), x, y, epochs=5,
                            lr=0.1, batch_size=5, kind="mse", generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.params["weight"][1:], initial["weight"][1:])
    assert not torch.equal(result.params["weight"][0], initial["weight"][0])


def test_adaptation_order_comes_from_the_seeded_generator():
    torch.manual_seed(9)
    unit = mlp_unit(8, 12, torch.float32)
    forward = fda.unit_forward(unit)
    base = params_of(unit)
    ta = perturbed(base, 0.02, 14)
    x, y = torch.randn(24, 8), torch.randn(24, 8)

    def run(seed):
        return fda.adapt_unit(forward, fda.ElementwiseMerge(base, [ta], 1.0, start=ta), x, y, epochs=3, lr=1e-2,
                              batch_size=5, generator=torch.Generator().manual_seed(seed)).params

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_reference_cosine_construction_matches_a_plain_reimplementation():
    """One closure of construct_anchors equals the reference loop body written out with nn.Modules."""
    torch.manual_seed(10)
    pre, fin = mlp_unit(6, 10, torch.float64), mlp_unit(6, 10, torch.float64)
    fin.load_state_dict(perturbed(params_of(pre), 0.05, 15))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    pre_params = list(pre.parameters())
    feature = F.cosine_similarity(pre(x), fin(x), dim=1).mean()
    grads = torch.autograd.grad(feature, pre_params, create_graph=True)
    expected = sum(1 - F.cosine_similarity(g.view(-1), (pf - pp).view(-1), dim=0)
                   for g, pp, pf in zip(grads, pre_params, fin.parameters()))
    result = fda.construct_anchors(fda.unit_forward(pre), params_of(pre), params_of(fin), x.detach(), steps=1)
    assert result.initial_loss == pytest.approx(expected.item(), rel=1e-10)


def test_weight_rows_skip_down_proj_of_a_square_mlp():
    square = {"gate_proj.weight": torch.ones(6, 6), "up_proj.weight": 2 * torch.ones(6, 6),
              "down_proj.weight": 3 * torch.ones(6, 6)}
    rows = fda.weight_rows(square, 6)
    assert rows.shape == (12, 6) and float(rows.max()) == 2.0


def test_content_fingerprint_changes_when_a_model_is_rewritten_in_place(tmp_path):
    from distmerge.fda.schema import content_fingerprint

    model = tmp_path / "expert"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    before = content_fingerprint(str(model))
    assert content_fingerprint(str(model)) == before
    (model / "model.safetensors").write_bytes(b"y" * 11)  # retrained into the same folder
    assert content_fingerprint(str(model)) != before
    assert content_fingerprint("org/hub-model") == "id:org/hub-model"
