"""train, validate, schema, tiny, data check. Heavy imports stay inside the functions."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from vlmtune.commands import observe

console = Console(highlight=False)

RECIPE_ARG = typer.Argument(..., help="A recipe .yaml file.", show_default=False)
SET_OPT = typer.Option(
    None, "--set", "-s", help="Override a recipe key: --set lora.r=32 (repeatable).", show_default=False
)


def train(
    recipe: Path = typer.Argument(None, help="A recipe .yaml file.", show_default=False),
    overrides: list[str] = SET_OPT,
    run_dir: Path = typer.Option(None, "--run-dir", help="Write to exactly this folder (must not exist)."),
    resume: Path = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
) -> None:
    """Train from a recipe: load -> lora -> train (sft or grpo), artifacts in a new run folder.

    Examples:

        vlmtune train recipes/demo.yaml

        vlmtune train recipes/qwen2_vl/2b_qlora.yaml --set lora.r=32 --set train.max_steps=100

        vlmtune train --resume runs/demo-20261123-101500
    """
    from vlmtune.errors import RecipeError

    if (recipe is None) == (resume is None):
        raise RecipeError("give either a RECIPE or --resume RUN_DIR", hint="vlmtune train recipes/demo.yaml")
    _quiet_libraries()
    from vlmtune import distributed, pipeline
    from vlmtune.callbacks import RichProgress

    here = distributed.ranks()
    console.quiet = not here.writer  # under torchrun only rank 0 prints (errors still reach stderr)
    progress = [RichProgress(console)] if here.writer else []
    if resume is not None:
        console.print(f"resuming [bold]{resume}[/]")
        run = pipeline.resume(resume, callbacks=progress, warn=_warn)
    else:
        parsed = _load(recipe, overrides)
        console.print(f"recipe [bold]{recipe}[/] is valid; model [bold]{parsed.model.name}[/]")
        train = parsed.train
        console.print(distributed.describe(train.distributed, here, train.batch_size, train.grad_accum))
        text = recipe.read_text(encoding="utf-8")
        run = pipeline.run(parsed, text, recipe.stem, run_dir, callbacks=progress, warn=_warn)
    _print_summary(run)


def _warn(message: str) -> None:
    from rich.text import Text

    console.print(Text("warning: ", style="bold yellow") + Text(message))


def _print_summary(run) -> None:
    summary = run.summary()
    trained = summary["stages"]["train"]
    first, last = trained.get("first_loss"), trained.get("last_loss")
    loss = f"{first:.4f} -> {last:.4f}" if first is not None and last is not None else "not logged"
    if trained.get("first_reward") is not None:  # grpo: the reward says more than its loss
        loss += f", reward {trained['first_reward']:.4f} -> {trained['last_reward']:.4f}"
    console.print(
        f"[bold green]done[/] in {summary.get('seconds', 0):.0f} s: {trained.get('steps', 0)} steps, "
        f"loss {loss}\nrun folder: [bold]{run.path}[/]\noutput:     {summary.get('output')}"
    )
    evaluated = summary["stages"].get("eval")
    if evaluated and evaluated.get("status") == "done":
        console.print(f"eval:       {_scores(evaluated)}")
    observe.print_training_end(run)  # curves in short, measured vs estimated memory, the picture


def _scores(figures: dict) -> str:
    """The eval stage's headline, from the figures summary.json keeps for it."""
    if "exact_match" not in figures:
        return figures.get("skipped", "no scores")
    scores = [
        f"{label} {figures[key]:.3f} (base {figures[f'base_{key}']:.3f})"
        for key, label in (
            ("exact_match", "exact match"),
            ("contains", "contains"),
            ("preference_accuracy", "preference accuracy"),
        )
        if key in figures
    ]
    return f"{', '.join(scores)} on {figures['n']} samples"


def validate(recipe: Path = RECIPE_ARG, overrides: list[str] = SET_OPT) -> None:
    """Check a recipe (every problem at once, with line numbers) and print it with defaults filled in."""
    parsed = _load(recipe, overrides)
    console.print(f"[bold green]{recipe} is valid.[/] Resolved recipe:\n")
    console.print(parsed.to_yaml(), markup=False)


def schema() -> None:
    """Print the JSON schema of recipes (for editor completion and checking)."""
    from vlmtune.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


def tiny(
    family: str = typer.Argument(..., help="Family name, e.g. qwen2_vl.", show_default=False),
    out_dir: Path = typer.Argument(..., help="Folder to write the checkpoint into.", show_default=False),
) -> None:
    """Fabricate a tiny random model + processor of FAMILY in OUT_DIR, offline.

    The folder reloads with AutoModelForImageTextToText; use it to test recipes without a download.
    """
    _quiet_libraries()
    from vlmtune.tiny import build_tiny

    out = build_tiny(family, out_dir)
    console.print(f"tiny [bold]{family}[/] written to [bold]{out}[/]")


def data_check(
    recipe: Path = RECIPE_ARG,
    overrides: list[str] = SET_OPT,
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON (the data_report.json keys)."
    ),
    full_decode: bool = typer.Option(
        False, "--full-decode", help="Decode every pixel of every image (data.image_check: full); slower."
    ),
) -> None:
    """Pre-flight every sample of the recipe's data (no model weights loaded).

    Exits 2 when training would stop on a problem; with data.on_bad_sample: skip or data.too_long: drop
    it lists the samples training would leave out and exits 0.
    """
    _quiet_libraries()
    from vlmtune.datacheck import check_recipe_data, fail_on_problems, render_report

    parsed = _load(recipe, [*(overrides or []), *(["data.image_check=full"] if full_decode else [])])
    reports = check_recipe_data(parsed, None if as_json else console)
    if as_json:
        print(json.dumps({name: report.to_json() for name, report in reports.items()}, indent=2))
    else:
        render_report(reports, parsed.data, console)
    fail_on_problems(
        reports, parsed.data
    )  # a DataError: exit 2 (typer.Exit(1) was swallowed by standalone_mode=False)


def _load(recipe: Path, overrides: list[str] | None):
    from vlmtune.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
