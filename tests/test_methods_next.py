"""The next methods (issue 17) through the merge executor, without Ray: model_stock, nuslerp, slerp, tsv, iso_c,
iso_cts, regmean. Each against hand values and a flat reference of its formula written out here, the issue's
invariants, and the refusals of bad input (a missing base, too few experts, statistics missing or foreign).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distmerge.errors import ConfigError, InputError
from distmerge.measure import stats
from distmerge.methods import TensorJob, build_method, execute
from distmerge.ops.regmean import gram_of_inputs
from test_ops import output_tensor
from test_ops_next import close, seeded

T = torch.tensor


def job(name: str, numel: int, count: int, weights=None, **per_tensor) -> TensorJob:
    """A TensorJob with ``count`` models e0, e1, ...; fields beyond the weights take their empty values."""
    values = {"name": name, "numel": numel, "model_names": tuple(f"e{i}" for i in range(count)),
              "weights": tuple(weights or [1.0] * count)}
    for field in dataclasses.fields(TensorJob):
        if field.name in values:
            continue
        if field.name == "per_tensor":
            values[field.name] = dict(per_tensor)
        elif field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
            continue
        elif field.name == "per_model":
            values[field.name] = {}
        else:
            values[field.name] = (None,) * count
    return TensorJob(**values)


def run(method, base: dict | None, experts: list[dict], weights=None, **per_tensor) -> dict[str, torch.Tensor]:
    """``method`` (a method object, or name + parameters) over whole tensors held in memory."""
    names = sorted(experts[0])
    tensors = [output_tensor(n, experts[0][n].shape, job(n, experts[0][n].numel(), len(experts), weights,
                                                           **per_tensor)) for n in names]

    def read(tensor, start, stop):
        rows = (lambda v: v) if start is None else (lambda v: v[start:stop])
        return (rows(base[tensor.name]) if base is not None else None), [rows(e[tensor.name]) for e in experts]

    merged, _, _ = execute.merge_in_memory(method, tensors, read)
    return merged


def method(name: str, **parameters):
    return build_method(name, parameters)


# =====================================================================================================
# model_stock
# =====================================================================================================


def model_stock_reference(base, experts):
    """Jang et al.'s rule written out: mean pairwise cosine of the offsets, t = N cos / (1 + (N - 1) cos)."""
    offsets = [(e - base).reshape(-1).double() for e in experts]
    pairs = [(i, j) for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    cos = sum(float(offsets[i] @ offsets[j] / (offsets[i].norm() * offsets[j].norm())) for i, j in pairs) / len(pairs)
    n = len(experts)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * sum(e.double() for e in experts) / n + (1 - t) * base.double()).to(base.dtype)


def test_model_stock_hand_values_and_reference():
    base = {"w": T([[1.0, 1.0]])}
    # Orthogonal offsets: cos 0, t 0 -> the base. Identical offsets: cos 1, t 1 -> the experts' mean.
    close(run(method("model_stock"), base, [{"w": T([[2.0, 1.0]])}, {"w": T([[1.0, 3.0]])}])["w"], [[1.0, 1.0]])
    same = {"w": T([[3.0, -1.0]])}
    close(run(method("model_stock"), base, [same, same])["w"], [[3.0, -1.0]])
    # cos 1/2 between [1, 0] and [1/2, sqrt(3)/2] offsets: t = 2 * 0.5 / 1.5 = 2/3.
    half = {"w": T([[1.5, 1.0 + math.sqrt(3) / 2]])}
    expected = 2 / 3 * (T([[2.0, 1.0]]) + half["w"]) / 2 + 1 / 3 * base["w"]
    close(run(method("model_stock"), base, [{"w": T([[2.0, 1.0]])}, half])["w"], expected, atol=1e-6)
    b = {"a": seeded(1, 6, 5), "n": seeded(2, 5)}
    experts = [{k: v + 0.3 * seeded(10 + i + len(k), *v.shape) for k, v in b.items()} for i in range(3)]
    out = run(method("model_stock"), b, experts)
    for key in b:
        close(out[key], model_stock_reference(b[key], [e[key] for e in experts]), atol=1e-5)


def test_model_stock_filter_wise_is_per_row():
    base = {"w": seeded(3, 4, 6)}
    experts = [{"w": base["w"] + seeded(4 + i, 4, 6)} for i in range(2)]
    out = run(method("model_stock", filter_wise=True), base, experts)["w"]
    for row in range(4):
        close(out[row], model_stock_reference(base["w"][row], [e["w"][row] for e in experts]), atol=1e-5)


def test_model_stock_needs_two_experts():
    with pytest.raises(ConfigError, match="at least 2"):
        run(method("model_stock"), {"w": T([1.0])}, [{"w": T([2.0])}])


# =====================================================================================================
# nuslerp and slerp
# =====================================================================================================


def slerp_reference(t, a, b):
    """Shoemake's slerp of the flattened tensors, lerp when (anti)parallel."""
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape).to(a.dtype)
    omega = math.acos(cos)
    out = math.sin((1 - t) * omega) / math.sin(omega) * a64 + math.sin(t * omega) / math.sin(omega) * b64
    return out.reshape(a.shape).to(a.dtype)


def test_nuslerp_hand_values_weights_and_base():
    e0, e1 = {"w": T([[1.0, 0.0]])}, {"w": T([[0.0, 1.0]])}
    r = math.sqrt(0.5)
    close(run(method("nuslerp"), None, [e0, e1])["w"], [[r, r]])
    # weights 1 : 2 -> t = 2/3: sin(pi/6), sin(pi/3) on the quarter circle.
    close(run(method("nuslerp"), None, [e0, e1], weights=[1.0, 2.0])["w"], [[0.5, math.sqrt(3) / 2]], atol=1e-6)
    base = {"w": T([[1.0, 1.0]])}
    shifted = [{"w": base["w"] + e0["w"]}, {"w": base["w"] + e1["w"]}]
    close(run(method("nuslerp", use_base=True), base, shifted)["w"], [[1 + r, 1 + r]], atol=1e-6)
    parallel = [{"w": T([[1.0, 2.0]])}, {"w": T([[2.0, 4.0]])}]  # collinear: linear interpolation
    close(run(method("nuslerp"), None, parallel)["w"], [[1.5, 3.0]])


def test_nuslerp_flattened_and_row_wise_against_reference():
    experts = [{"w": seeded(20 + i, 3, 4)} for i in range(2)]
    a, b = experts[0]["w"], experts[1]["w"]
    close(run(method("nuslerp"), None, experts, weights=[0.3, 0.7])["w"], slerp_reference(0.7, a, b), atol=1e-5)
    rows = run(method("nuslerp", nuslerp_flatten=False), None, experts)["w"]
    for i in range(3):
        close(rows[i], slerp_reference(0.5, a[i], b[i]), atol=1e-5)
    columns = run(method("nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True), None, experts)["w"]
    for j in range(4):
        close(columns[:, j], slerp_reference(0.5, a[:, j], b[:, j]), atol=1e-5)


def test_slerp_endpoints_and_reference():
    experts = [{"w": seeded(25 + i, 4, 3), "b": seeded(27 + i, 3)} for i in range(2)]
    for t, endpoint in ((0.0, 0), (1.0, 1)):
        out = run(method("slerp"), None, experts, t=t)
        for key in ("w", "b"):
            close(out[key], experts[endpoint][key], atol=1e-6)
    out = run(method("slerp"), None, experts, t=0.3)
    for key in ("w", "b"):
        close(out[key], slerp_reference(0.3, experts[0][key], experts[1][key]), atol=1e-5)
    with pytest.raises(ConfigError, match="exactly 2"):
        run(method("slerp"), None, experts[:1], t=0.5)
    with pytest.raises(ConfigError, match="parameters.t"):
        method("slerp", t=[0.0, 1.5])


def test_slerp_t_as_a_layer_gradient(llama_family):
    """t: [0, 1] over 3 layers: layer 0 is the first model, layer 2 the second, layer 1 halfway; tensors
    outside the layers take the gradient's start. The jobs come from the config as the engine resolves them."""
    from distmerge.config import load_config
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.tensors import resolve_tensors

    _, experts = llama_family
    config = load_config({"method": "slerp", "parameters": {"t": [0.0, 1.0]},
                          "models": [{"model": str(p), "name": f"e{i}"} for i, p in enumerate(experts)]})
    sources = [Checkpoint(str(p), f"e{i}") for i, p in enumerate(experts)]
    outputs, _, _ = resolve_tensors(config, None, sources)

    def read(tensor, start, stop):
        return None, [s.read(src.tensor).float() for s, src in zip(sources, tensor.experts)]

    merged, _, _ = execute.merge_in_memory(config.build_method(), outputs, read)
    first, second = ({n: s.read(n).float() for n in merged} for s in sources)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        close(merged[name], first[name], atol=1e-6)
    close(merged["model.layers.2.mlp.up_proj.weight"], second["model.layers.2.mlp.up_proj.weight"], atol=1e-6)
    middle = "model.layers.1.self_attn.q_proj.weight"
    close(merged[middle], slerp_reference(0.5, first[middle], second[middle]), atol=1e-5)


def test_nuslerp_needs_exactly_two_models():
    three = [{"w": T([float(i), 1.0])} for i in range(3)]
    with pytest.raises(ConfigError, match="exactly 2"):
        run(method("nuslerp"), None, three)


# =====================================================================================================
# tsv, iso_c, iso_cts
# =====================================================================================================


def polar(matrix):
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_reference(tvs, k):
    """Gargiulo et al. eq. 5-7: top-k of each task, stacked, decorrelated by Procrustes, rebuilt."""
    parts = [torch.linalg.svd(tv.double(), full_matrices=False) for tv in tvs]
    u = torch.cat([p[0][:, :k] for p in parts], dim=1)
    s = torch.cat([p[1][:k] for p in parts])
    v = torch.cat([p[2][:k, :].T for p in parts], dim=1)
    return polar(u) @ torch.diag(s) @ polar(v).T


def iso_c_reference(tvs):
    u, s, vh = torch.linalg.svd(sum(tv.double() for tv in tvs), full_matrices=False)
    return s.mean() * u @ vh


def svd_family(tasks=3, seed=30):
    base = {"w": seeded(seed, 6, 5), "bias": seeded(seed + 1, 6)}
    experts = [{k: v + seeded(seed + 2 + i + 10 * len(k), *v.shape) for k, v in base.items()} for i in range(tasks)]
    return base, experts


def test_svd_merges_hand_values():
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": T([[3.0, 0.0], [0.0, 0.0]])}, {"w": T([[0.0, 0.0], [0.0, 1.0]])}]
    # TSV, k = 1 each: the tasks' directions are already orthogonal -> the sum diag(3, 1).
    close(run(method("tsv"), base, experts)["w"], [[3.0, 0.0], [0.0, 1.0]], atol=1e-6)
    # Iso-C: the sum diag(3, 1) with its spectrum flattened to the mean 2; alpha scales it.
    close(run(method("iso_c"), base, experts)["w"], [[2.0, 0.0], [0.0, 2.0]], atol=1e-6)
    close(run(method("iso_c", alpha=0.5), base, experts)["w"], [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)


def test_svd_merges_against_references_and_bias_by_mean():
    base, experts = svd_family()
    tvs = [e["w"] - base["w"] for e in experts]
    mean_bias = base["bias"] + 0.7 * sum(e["bias"] - base["bias"] for e in experts) / 3
    out = run(method("tsv", alpha=0.7), base, experts)
    close(out["w"], base["w"] + 0.7 * tsv_reference(tvs, 5 // 3).float(), atol=1e-5)
    close(out["bias"], mean_bias, atol=1e-6)
    out = run(method("iso_c", alpha=0.7), base, experts)
    close(out["w"], base["w"] + 0.7 * iso_c_reference(tvs).float(), atol=1e-5)
    close(out["bias"], mean_bias, atol=1e-6)
    # rank_fraction 1/T is the default's floor(r / T); a smaller fraction keeps fewer components.
    close(run(method("tsv", rank_fraction=1 / 3), base, experts)["w"], run(method("tsv"), base, experts)["w"])
    close(run(method("tsv", rank_fraction=0.2), base, experts)["w"], base["w"] + tsv_reference(tvs, 1).float(),
          atol=1e-5)
    with pytest.raises(ConfigError, match="rank_fraction"):
        run(method("tsv", rank_fraction=0.5), base, experts)


def test_iso_cts_common_and_task_spaces():
    """Marczak et al. Alg. 1 written out: the top k_c directions of the sum, then each task's top directions of
    its part off that subspace; both stacks orthogonalized; spectrum flattened to the mean."""
    base, experts = svd_family(tasks=2, seed=40)
    tvs = [(e["w"] - base["w"]).double() for e in experts]
    r = 5
    common = int(r * 0.6)  # 3; the remaining 2 split as 1 per task
    u, s, vh = torch.linalg.svd(sum(tvs), full_matrices=False)
    lefts, values, rights = [], [], []
    for tv in tvs:
        ut, st, vht = torch.linalg.svd(tv - u[:, :common] @ u[:, :common].T @ tv, full_matrices=False)
        lefts.append(ut[:, :1]), values.append(st[:1]), rights.append(vht[:1].T)
    big_u = polar(torch.cat(lefts + [u[:, :common]], dim=1))
    big_v = polar(torch.cat(rights + [vh[:common].T], dim=1))
    expected = torch.cat(values + [s[:common]]).mean() * big_u @ big_v.T
    out = run(method("iso_cts", common_space_fraction=0.6), base, experts)
    close(out["w"], base["w"] + expected.float(), atol=1e-5)


def test_one_task_full_rank():
    """One task: TSV keeps every component (k = r), so it is task arithmetic; Iso-C flattens the task's own
    spectrum, which is task arithmetic exactly when that spectrum is flat (an orthogonal matrix times c)."""
    base = {"w": seeded(50, 5, 4), "bias": seeded(51, 4)}
    expert = {k: v + seeded(52 + len(k), *v.shape) for k, v in base.items()}
    out = run(method("tsv", alpha=0.5), base, [expert])
    for key in base:
        close(out[key], base[key] + 0.5 * (expert[key] - base[key]), atol=1e-5)
    flat_tv = 3.0 * torch.linalg.qr(seeded(53, 5, 4))[0]
    close(run(method("iso_c"), base, [{"w": base["w"] + flat_tv, "bias": base["bias"]}])["w"], base["w"] + flat_tv,
          atol=1e-5)
    tv = expert["w"] - base["w"]
    close(run(method("iso_c"), base, [expert])["w"], base["w"] + iso_c_reference([tv]).float(), atol=1e-5)


def test_one_and_two_workers_write_identical_files(llama_family, tmp_path, ray_cluster):
    """A whole-tensor method on the engine: the same bytes whatever the placement of its layer groups."""
    from safetensors.torch import load_file

    from conftest import merge_config
    from distmerge.engine.driver import merge

    base, experts = llama_family
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        merge(merge_config(base, experts, "iso_cts", alpha=0.8), out, workers=workers, progress=False)
        outputs.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert sorted(outputs[0]) == sorted(outputs[1])
    for name, value in outputs[0].items():
        assert torch.equal(value, outputs[1][name]), name
    base_tensors = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert not torch.equal(outputs[0]["model.layers.0.mlp.up_proj.weight"], base_tensors["model.layers.0.mlp.up_proj.weight"])


# =====================================================================================================
# regmean
# =====================================================================================================


def write_statistics(root, task: str, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    """A committed statistics folder for one expert, as ``distmerge measure regmean`` writes it."""
    grams, layers = {}, {}
    for module, x in inputs.items():
        gram = gram_of_inputs(x)
        grams[module] = gram.total
        layers[module] = stats.layer_entry(weights[f"{module}.weight"], x.shape[-1], gram.count)
    stats.commit_task(root, task, grams, {"kind": "regmean", "task": task, "layers": layers})


def regmean_family(tmp_path, tasks=2, seed=60):
    experts = [{"lin.weight": seeded(seed + i, 3, 4), "lin.bias": seeded(seed + 5 + i, 3),
                "norm.weight": seeded(seed + 9 + i, 4)} for i in range(tasks)]
    inputs = [seeded(seed + 20 + i, 7 + i, 4) for i in range(tasks)]
    for i, (expert, x) in enumerate(zip(experts, inputs)):
        write_statistics(tmp_path, f"e{i}", expert, {"lin": x})
    return experts, inputs


def test_regmean_against_least_squares_and_mean(tmp_path):
    """alpha 1: W minimizes sum_t ||X_t W^T - X_t W_t^T||^2 / N_t; the bias and the norm are averaged."""
    experts, inputs = regmean_family(tmp_path)
    out = run(method("regmean", statistics=str(tmp_path), alpha=1.0), None, experts)
    rows = torch.cat([x.double() / math.sqrt(x.shape[0]) for x in inputs])
    targets = torch.cat([x.double() @ e["lin.weight"].double().T / math.sqrt(x.shape[0])
                         for x, e in zip(inputs, experts)])
    close(out["lin.weight"], torch.linalg.lstsq(rows, targets).solution.T.float(), atol=1e-5)
    for key in ("lin.bias", "norm.weight"):
        close(out[key], (experts[0][key] + experts[1][key]) / 2)


def test_regmean_shrinks_off_diagonal_and_identical_grams_average(tmp_path):
    experts, inputs = regmean_family(tmp_path)
    grams = [x.double().T @ x.double() / x.shape[0] for x in inputs]
    shrunk = [0.9 * g + 0.1 * torch.diag(torch.diagonal(g)) for g in grams]
    expected = torch.linalg.solve(sum(shrunk), sum(g @ e["lin.weight"].double().T for g, e in zip(shrunk, experts))).T
    close(run(method("regmean", statistics=str(tmp_path)), None, experts)["lin.weight"], expected.float(), atol=1e-5)
    same = tmp_path / "same"
    for i, expert in enumerate(experts):
        write_statistics(same, f"e{i}", expert, {"lin": inputs[0]})
    out = run(method("regmean", statistics=str(same)), None, experts, weights=[1.0, 3.0])
    close(out["lin.weight"], (experts[0]["lin.weight"] + 3 * experts[1]["lin.weight"]) / 4, atol=1e-5)


def test_regmean_refuses_missing_foreign_and_partial_statistics(tmp_path):
    experts, _ = regmean_family(tmp_path / "ok")
    with pytest.raises(ConfigError, match="statistics"):
        method("regmean")
    with pytest.raises(InputError, match=str(tmp_path / "none")):
        run(method("regmean", statistics=str(tmp_path / "none")), None, experts)
    three = experts + [experts[0]]
    with pytest.raises(InputError, match=str(tmp_path / "ok" / "e2" / "manifest.json")):
        run(method("regmean", statistics=str(tmp_path / "ok")), None, three)
    foreign = [experts[0], {**experts[1], "lin.weight": experts[1]["lin.weight"] + 1e-3}]
    with pytest.raises(InputError, match=f"{tmp_path / 'ok' / 'e1'}.*another model"):
        run(method("regmean", statistics=str(tmp_path / "ok")), None, foreign)
    partial = tmp_path / "partial"
    write_statistics(partial, "e0", experts[0], {"lin": torch.ones(2, 4)})
    stats.commit_task(partial, "e1", {}, {"kind": "regmean", "task": "e1", "layers": {}})
    with pytest.raises(InputError, match=f"{partial / 'e1'}.*no Gram for layer 'lin'"):
        run(method("regmean", statistics=str(partial)), None, experts)


def test_regmean_keeps_working_in_a_narrower_merge_dtype(tmp_path):
    """Statistics of float32 weights accept the same weights rounded to bfloat16 (the digest's bound)."""
    experts, _ = regmean_family(tmp_path)
    narrow = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in experts]
    out = run(method("regmean", statistics=str(tmp_path)), None, narrow)
    close(out["lin.weight"], run(method("regmean", statistics=str(tmp_path)), None, experts)["lin.weight"], atol=0.05)
