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
    resume: Path = typer.Option(
        None,
        "--resume",
        help="Continue this run folder from its newest complete checkpoint (exit 0 and no change when it "
        "is finished). With --set, only train.max_steps, epochs, save/eval/logging steps, save_total_limit, "
        "eval_generate and num_workers may change.",
    ),
) -> None:
    """Train from a recipe: load -> lora -> train (sft, dpo, kto or grpo: train.objective), artifacts in a new run folder.

    SFT learns the answers; DPO learns from chosen/rejected pairs and KTO from single answers labelled
    good or bad (docs/preference.md); GRPO rewards sampled answers (docs/rl.md). On CPU, train.cpu_threads (auto: 1 thread on small machines) sets
    torch's threads.

    Ctrl-C stops the run at once; SIGTERM or SIGHUP (a scheduler's notice, a dropped ssh connection) let the
    step in progress finish and save a checkpoint first. Either way the run is marked interrupted and the
    command that resumes it is printed. Exit codes: 0 done (or --resume of a finished run), 2 refused (bad
    recipe, data, run folder in use), 3 training diverged or collapsed, 129 SIGHUP, 130 Ctrl-C, 143 SIGTERM.
    See docs/reliability.md.

    Examples:

        vlmtune train recipes/demo.yaml

        vlmtune train recipes/qwen2_vl/2b_qlora.yaml --set lora.r=32 --set train.max_steps=100

        vlmtune train --resume runs/demo-20261123-101500

        vlmtune train --resume runs/demo-20261123-101500 --set train.max_steps=200
    """
    from vlmtune.errors import RecipeError

    if (recipe is None) == (resume is None):
        raise RecipeError("give either a RECIPE or --resume RUN_DIR", hint="vlmtune train recipes/demo.yaml")
    if resume is not None and run_dir is not None:
        raise RecipeError(
            "--run-dir names a new run folder; --resume continues an existing one: give one",
            hint=f"vlmtune train --resume {resume} (it continues in that folder)",
        )
    _quiet_other_ranks()
    if recipe is not None:  # refusals that need no model come before the heavy imports
        refuse_missing(_load(recipe, overrides), run_dir)
    from vlmtune.runs import signals

    with signals.stop_on_signals():  # before the heavy imports: a Ctrl-C during them is a clean stop too
        _quiet_libraries()
        run = _train_or_resume(recipe, overrides or [], run_dir, resume)
    if run is not None and run.writer:  # under torchrun, rank 0 alone prints the summary
        _print_summary(run)


def _quiet_other_ranks() -> None:
    """Under torchrun, ranks other than 0 keep torch's C++ warnings to themselves (errors still print):
    the same warning once per rank (DDP's find_unused_parameters note) says nothing rank 0 did not."""
    import os

    if os.environ.get("RANK", "0") != "0":
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # read when torch is first imported


def _train_or_resume(recipe: Path | None, overrides: list[str], run_dir: Path | None, resume: Path | None):
    """The trained run folder; None when --resume found it finished. A stop by signal exits 128 + signal."""
    from vlmtune import distributed, pipeline
    from vlmtune.runs.resuming import NothingToResume
    from vlmtune.training.callbacks import RichProgress

    here = distributed.ranks()
    console.quiet = not here.writer  # under torchrun only rank 0 prints (errors still reach stderr)
    progress = [RichProgress(console)] if here.writer else []
    try:
        if resume is not None:
            return pipeline.resume(resume, overrides, callbacks=progress, warn=_warn, say=_say)
        parsed = _load(recipe, overrides)
        console.print(f"recipe [bold]{recipe}[/] is valid; model [bold]{parsed.model.name}[/]")
        _warn_recipe(parsed)
        train = parsed.train
        console.print(
            distributed.describe(train.distributed, here, train.batch_size, train.grad_accum)
            + _defaults_note(train)
        )
        text = recipe.read_text(encoding="utf-8")
        return pipeline.run(parsed, text, recipe.stem, run_dir, callbacks=progress, warn=_warn)
    except NothingToResume as finished:
        steps = f" ({finished.steps} steps)" if finished.steps is not None else ""
        _say(f"run {finished.run.path} is finished{steps}: nothing to resume, nothing changed")
        return None
    except pipeline.Stopped as stop:
        _close(progress)
        if here.writer:
            _print_stopped(stop.run, stop.signal_name)
        raise typer.Exit(stop.exit_code) from None
    finally:
        _close(progress)


def _defaults_note(train) -> str:
    """Defaults a user of another tool would not guess, said when the recipe leaves them unset."""
    notes = []
    if "grad_accum" not in train.model_fields_set:
        notes.append(f"grad_accum {train.grad_accum} is vlmtune's default (TRL's is 1)")
    if train.max_steps == -1:
        notes.append(f"{train.epochs:g} epoch{'s' * (train.epochs != 1)} (train.epochs)")
    return f" ({'; '.join(notes)})" if notes else ""


def _close(progress: list) -> None:
    for bar in progress:
        bar.close()


def _print_stopped(run, signal_name: str) -> None:
    """Where the run stopped and the command that resumes it (summary.json holds the same)."""
    from rich.text import Text

    summary = run.summary()
    where = f" after step {summary['last_step']}" if summary.get("last_step") is not None else ""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(Text(f"interrupted ({signal_name}){where}; run folder: {run.path}", style="bold"))
    saved = summary.get("saved_on_signal")
    if saved:
        took = saved.get("seconds_after_signal")
        err.print(
            f"saved checkpoint-{saved['step']} at the step boundary after the signal"
            + (f" ({took:.1f} s after it: the grace time this run needs)" if took is not None else ""),
            markup=False,
        )
    err.print(
        f"a resume starts from step {summary.get('resume_from_step', 0)} (the newest complete checkpoint):\n"
        f"  {summary.get('resume_command')}",
        markup=False,
    )


def _warn(message: str) -> None:
    from rich.text import Text

    console.print(Text("warning: ", style="bold yellow") + Text(message), soft_wrap=True)


def _say(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)


def _print_summary(run) -> None:
    summary = run.summary()
    trained = summary["stages"]["train"]
    loss = _ends(trained, "loss")
    if trained.get("first_reward") is not None or trained.get("reward_first_mean") is not None:
        loss += f", reward {_ends(trained, 'reward')}"  # grpo: the reward says more than its loss
    if trained.get("mean_window", 1) > 1:
        loss += f" (means of the first and last {trained['mean_window']} steps)"
    console.print(
        f"[bold green]done[/] in {summary.get('seconds', 0):.0f} s: {trained.get('steps', 0)} steps, "
        f"loss {loss}\nrun folder: [bold]{run.path}[/]\noutput:     {summary.get('output')}"
    )
    evaluated = summary["stages"].get("eval")
    if evaluated and evaluated.get("status") == "done":
        console.print(f"eval:       {_scores(evaluated)}")
    observe.print_training_end(run)  # curves in short, measured vs estimated memory, the picture


def _ends(trained: dict, key: str) -> str:
    """The train stage's first -> last of ``key``: the means of the first and last steps when recorded."""
    first, last = trained.get(f"{key}_first_mean"), trained.get(f"{key}_last_mean")
    if first is None or last is None:
        first, last = trained.get(f"first_{key}"), trained.get(f"last_{key}")
    return f"{first:.4f} -> {last:.4f}" if first is not None and last is not None else "not logged"


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


def validate(
    recipe: Path = RECIPE_ARG,
    overrides: list[str] = SET_OPT,
    run_dir: Path = typer.Option(
        None, "--run-dir", help="Also check this --run-dir of `vlmtune train` is free.", show_default=False
    ),
) -> None:
    """Check a recipe without loading a model: every problem at once, with line numbers; data files,
    folders and splits that are not there; then print it with every default filled in."""
    parsed = _load(recipe, overrides)
    refuse_missing(parsed, run_dir)
    console.print(f"[bold green]{recipe} is valid.[/] Resolved recipe:\n")
    console.print(parsed.to_yaml(), markup=False)
    if parsed.train.packing:
        console.print(_packing_note(parsed.model.name, parsed.model.revision), markup=False)
    _warn_recipe(parsed)


def _warn_recipe(parsed) -> None:
    from vlmtune.recipe import recipe_warnings

    for message in recipe_warnings(parsed):
        _warn(message)


def _packing_note(name: str, revision: str | None) -> str:
    """Whether the recipe's model family packs, from its config alone (no weights); or when it will be known."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.model.checkpoint import detect

    try:
        return detect(name, revision)[1].packing_note
    except VlmtuneError:
        return (
            f"train.packing: whether {name} packs is checked when its config can be read (at `vlmtune train`)"
        )


def refuse_missing(parsed, run_dir: Path | None) -> None:
    """Every local thing the recipe names that is not there, and a --run-dir that is: one RecipeError."""
    from vlmtune.data.locate import missing
    from vlmtune.errors import RecipeError

    problems = missing(parsed.data, parsed.model)
    if run_dir is not None and run_dir.exists():
        problems.append(f"--run-dir: {run_dir} already exists; vlmtune never overwrites a run")
    if problems:
        raise RecipeError(
            f"{len(problems)} problem{'s' * (len(problems) > 1)} found before loading anything:",
            problems,
            hint="paths in a recipe are relative to the recipe's folder; give a new --run-dir, or continue "
            "an existing run with `vlmtune train --resume RUN_DIR`",
        )


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
    from vlmtune.model.tiny import build_tiny

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
    show: int = typer.Option(
        0,
        "--show",
        min=0,
        help="Print the first N usable samples of each split through the chat template: where the image "
        "tokens went, which tokens carry loss (inside ⟦ ⟧), and the tokens that carry loss per split (SFT).",
    ),
) -> None:
    """Pre-flight every sample of the recipe's data (no model weights loaded).

    Exits 2 when training would stop on a problem; with data.on_bad_sample: skip or data.too_long: drop
    it lists the samples training would leave out and exits 0.
    """
    _quiet_libraries()
    from vlmtune.data.check import (
        check_recipe_data,
        fail_on_problems,
        render_report,
        sft_collator,
        show_samples,
    )

    parsed = _load(recipe, [*(overrides or []), *(["data.image_check=full"] if full_decode else [])])
    refuse_missing(parsed, None)
    if show and parsed.train.objective != "sft":
        from vlmtune.errors import RecipeError

        raise RecipeError(
            f"--show renders supervised samples; this recipe's objective is {parsed.train.objective}",
            hint="drop --show (the check itself reads pairs and prompts), or run it on an SFT recipe",
        )
    collator = sft_collator(parsed)
    reports = check_recipe_data(parsed, None if as_json else console, collator=collator)
    trained = (
        show_samples(reports, collator, show, console if not as_json else _null_console()) if show else {}
    )
    if as_json:
        out = {name: report.to_json() for name, report in reports.items()}
        for name, tokens in trained.items():
            out[name]["tokens_with_loss"] = tokens
        print(json.dumps(out, indent=2))
    else:
        render_report(reports, parsed.data, console)
    fail_on_problems(
        reports, parsed.data
    )  # a DataError: exit 2 (typer.Exit(1) was swallowed by standalone_mode=False)


def _null_console():
    import io

    return Console(file=io.StringIO())


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
