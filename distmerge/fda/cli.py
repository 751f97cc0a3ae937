"""``distmerge fda construct|adapt``: thin wrappers over the functions ``fda.construct`` / ``fda.adapt``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError

CONFIG_HELP = """fda.yaml, e.g.:

\b
base: meta-llama/Llama-2-13b-hf
experts: {math: WizardLM/WizardMath-13B-V1.0, code: layoric/llama-2-13b-code-alpaca}
initial: {method: task_arithmetic, lambda: 0.5}   # or a merged model folder
modules: mlp          # mlp (Llama/Mistral/Qwen2) | block (whole layers: RoBERTa/BERT/ViT, or decoders); default by architecture
anchors: {count: 8192, init: gauss, sigma: 0.01, steps: 200, lr: 0.01, loss: cos}   # tokens: N for [n, N, d]
adapt: {param: elementwise, sources: initial, alpha_init: 1.0, loss: cos, lr: 0.01, batch_size: 8192, epochs: 50}
resources: {num_cpus: 1, num_gpus: 1, memory: 40GB, retries: 3}   # per job
seed: 0
dtype: float32

\b
Left-out fields take the model family's defaults (Llama: the MLP of each layer, single-token anchors
of the hidden size, TA(0.5) init with elementwise alpha = 1 on its delta; RoBERTa: whole encoder layers,
anchors [64, 5, d], TA(0.3) init with alpha per expert = 0.3, mse loss). `layers: [0, 1]` limits a run
to some layers."""


def register(app: typer.Typer) -> None:
    fda_app = typer.Typer(no_args_is_help=True, help=(
        "FDA (functional dual anchors): construct synthetic anchors per (layer, task), then adapt each layer of "
        "an initial merge to them. Every (layer, task) and every layer is its own Ray job; reruns skip finished "
        "jobs whose config hash matches."))

    @fda_app.command("construct", help="Stage I: anchors per task and layer into OUT "
                     "(OUT/layer_L/task_T.safetensors with the anchors and the expert's outputs on them).\n\n"
                     + CONFIG_HELP)
    def construct_cmd(
        config: Path = typer.Argument(..., help="fda.yaml"),
        out: Path = typer.Option(..., "--out", "-o", help="anchors folder (created; a rerun resumes)"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                              help="jobs in flight at once (default: as resources admit)"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: embedded"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ) -> None:
        from distmerge.fda import construct

        try:
            result = construct(config, out, workers=workers, address=address, progress=not quiet)
        except DistmergeError as exc:
            _fail(exc)
        typer.echo(result.summary())

    @fda_app.command("adapt", help="Stage II: adapt each layer of the initial merge on the anchors and write the "
                     "merged model to OUT (atomically; unadapted tensors come from the initial merge).\n\n"
                     + CONFIG_HELP)
    def adapt_cmd(
        config: Path = typer.Argument(..., help="fda.yaml (the one the anchors were constructed with)"),
        anchors: Path = typer.Option(..., "--anchors", "-a", help="folder written by `distmerge fda construct`"),
        out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="jobs in flight at once"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: embedded"),
        force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
        work: Optional[Path] = typer.Option(None, "--work", help="folder for per-layer results (default: "
                                            ".OUT.fda-work beside OUT; removed when done)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ) -> None:
        from distmerge.fda import adapt

        try:
            result = adapt(config, anchors, out, workers=workers, address=address, force=force,
                           progress=not quiet, work=work)
        except DistmergeError as exc:
            _fail(exc)
        typer.echo(result.summary())

    @fda_app.command("sigma", help="Choose sigma for Gaussian anchors as the paper does (App. C.5): on one layer, "
                     "construct from the same draw scaled by each sigma for a fixed number of steps and keep the "
                     "one whose anchors align best. Writes nothing.\n\n" + CONFIG_HELP)
    def sigma_cmd(
        config: Path = typer.Argument(..., help="fda.yaml"),
        sigmas: str = typer.Option("1e-4,1e-2,1,10", "--sigmas", help="comma-separated candidates"),
        layer: Optional[int] = typer.Option(None, "--layer", min=0, help="layer to try them on (default: middle)"),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="construction steps (default: config's)"),
        workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, help="jobs in flight at once"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: embedded"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    ) -> None:
        from distmerge.fda import choose_sigma

        try:
            candidates = tuple(float(s) for s in sigmas.split(",") if s.strip())
        except ValueError:
            _fail(ValueError(f"--sigmas: expected comma-separated numbers, got {sigmas!r}"))
        try:
            result = choose_sigma(config, sigmas=candidates, layer=layer, steps=steps, workers=workers,
                                  address=address, progress=not quiet)
        except DistmergeError as exc:
            _fail(exc)
        typer.echo(result.table())
        typer.echo(result.summary())

    app.add_typer(fda_app, name="fda")
