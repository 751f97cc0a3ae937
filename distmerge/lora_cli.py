"""``distmerge lora sum|extract``: a merge written as a LoRA adapter (registered by ``distmerge.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distmerge.cli_support import add_group, address_option, force_option, one_line_errors, out_option, workers_option


def sum_cmd(
    config: Path = typer.Argument(..., help="a merge config whose experts are all LoRA adapters on base_model "
                                            "(method task_arithmetic or weight_average)"),
    out: Path = out_option("output adapter folder"),
    force: bool = force_option(),
) -> None:
    """The merge of LoRA experts as one LoRA adapter with concatenated factors: exact, rank = the sum of theirs."""
    from distmerge.lora_sum import lora_sum

    with one_line_errors():
        result = lora_sum(config, out, force=force)
    typer.echo(result.summary())


def extract_cmd(
    merged: str = typer.Argument(..., help="merged model folder (any method)"),
    base: str = typer.Option(..., "--base", help="the base model the adapter applies to"),
    rank: int = typer.Option(..., "--rank", "-r", help="rank of every extracted module (at most min(shape))"),
    out: Path = out_option("output adapter folder"),
    svd: str = typer.Option("auto", "--svd", help="exact (torch.linalg.svd) | randomized (torch.svd_lowrank) | "
                                                  "auto: exact when the smaller side is <= 1024"),
    oversample: int = typer.Option(10, "--oversample", help="randomized SVD: extra sketch columns"),
    niter: int = typer.Option(4, "--niter", help="randomized SVD: power iterations"),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale",
                                          help="sqrt(S) into both factors (else S into B)"),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora",
                                    help="embeddings as LoRA factors instead of full tensors"),
    skip_full: bool = typer.Option(False, "--skip-full", help="drop changed tensors that are not decomposed "
                                   "(embeddings, heads, norms, biases) instead of keeping them whole"),
    min_full_change: float = typer.Option(0.0, "--min-full-change", help="keep such a tensor whole only if "
                                          "||merged - base|| / ||base|| exceeds this"),
    dtype: str = typer.Option("float32", "--dtype", help="factors' dtype: float32 | bfloat16 | float16 (half the "
                                                       "size; the reported errors include the rounding)"),
    workers: Optional[int] = workers_option("Ray tasks at once (default: CPUs)"),
    address: Optional[str] = address_option(),
    force: bool = force_option(),
) -> None:
    """Any merged model as a rank-R LoRA adapter on BASE, by truncated SVD of each linear delta.

    One Ray task per layer group; the relative error of every tensor goes to OUT/lora_extract.json.
    """
    from distmerge.lora_extract import ExtractOptions, extract

    options = ExtractOptions(rank=rank, svd=svd, oversample=oversample, niter=niter,
                             distribute_scale=distribute_scale, embed_lora=embed_lora, skip_full=skip_full,
                             min_full_change=min_full_change, dtype=dtype)
    with one_line_errors():
        result = extract(merged, base, out, options, workers=workers, address=address, force=force)
    typer.echo(result.summary())


def register(app: typer.Typer) -> None:
    add_group(app, "lora", "Write a merge as a PEFT LoRA adapter: `sum` for task arithmetic / weight average of "
              "LoRA experts (exact), `extract` for any merged model (truncated SVD to a rank).",
              {"sum": sum_cmd, "extract": extract_cmd})
