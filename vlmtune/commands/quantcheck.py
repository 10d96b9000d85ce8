"""quant-check: is 4-bit safe for this model on my data? Options and rendering only; the logic is
vlmtune/after/quantcheck.py (which loads torch only inside its functions)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from vlmtune.after.quantcheck import DEFAULT_SAMPLES, MAX_KL, MIN_TOP1

console = Console(highlight=False)
status = Console(stderr=True, highlight=False)  # progress notes; stdout keeps only the result


def quant_check(
    recipe: Path = typer.Argument(..., help="A recipe .yaml file: its model, quantization and data.train."),
    overrides: list[str] = typer.Option(
        None,
        "--set",
        "-s",
        help="Override a recipe key: --set quantization.bits=8 (repeatable).",
        show_default=False,
    ),
    samples: int = typer.Option(
        DEFAULT_SAMPLES, "--samples", "-n", min=1, help="Samples of data.train to score."
    ),
    max_kl: float = typer.Option(
        MAX_KL, "--max-kl", min=0.0, help="Advise QLoRA up to this mean KL per answer token (nats)."
    ),
    min_top1: float = typer.Option(
        MIN_TOP1, "--min-top1", min=0.0, max=1.0, help="... and from this top-1 agreement on."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object for scripts instead of a table."
    ),
) -> None:
    """Before training: the model in 16-bit, then in the recipe's 4-bit, on your own samples.

    One loading after the other (never both in memory). Per sample: the KL divergence of the
    next-token distributions on the answer tokens, the top-1 agreement, the change in the answers'
    log-likelihood; then a verdict: QLoRA advisable or not (docs/quant-check.md).

    Examples:

        vlmtune quant-check recipes/qwen3_5/27b_qlora.yaml

        vlmtune quant-check recipes/demo.yaml --samples 4 --json
    """
    from vlmtune.after.quantcheck import quant_check as check
    from vlmtune.after.quantcheck import render
    from vlmtune.commands.core import _quiet_libraries
    from vlmtune.recipe import load_recipe

    _quiet_libraries()
    parsed = load_recipe(recipe, overrides or [])
    status.print(f"scoring [bold]{parsed.model.name}[/] in 16-bit, then quantized ...")
    result = check(parsed, samples=samples, max_kl=max_kl, min_top1=min_top1)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render(result, console)
