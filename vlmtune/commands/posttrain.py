"""After training: predict, eval, export. Heavy imports stay inside the functions."""

from __future__ import annotations

import enum
from pathlib import Path

import typer
from rich.console import Console

from vlmtune.choices import Dtype, words

console = Console(highlight=False)
status = Console(stderr=True, highlight=False)  # progress notes; stdout keeps only the results

RUN_ARG = typer.Argument(..., help="A run folder that `vlmtune train` created.", show_default=False)


# The recipe's dtypes (vlmtune.choices), as the enum typer needs for a choice option.
ExportDtype = enum.Enum("ExportDtype", {name: name for name in words(Dtype)}, type=str)


def predict(
    run_dir: Path = RUN_ARG,
    image: list[Path] = typer.Option(
        None, "--image", "-i", help="An image to show the model (repeatable, in order).", show_default=False
    ),
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The question or instruction.", show_default=False
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    base_only: bool = typer.Option(
        False, "--base-only", help="Answer with the base model, without the adapter."
    ),
    force: bool = typer.Option(
        False, "--force", help="Use weights that look collapsed (values no trained model holds) anyway."
    ),
) -> None:
    """Answer one prompt (greedy) with the base as trained plus the run's adapter.

    The base is loaded exactly as trained (same quantization, from resolved.yaml). Only the answer
    goes to stdout.

    Examples:

        vlmtune predict runs/demo-20261123-101500 --image data/demo/images/000.png --prompt "What color is the shape?"

        vlmtune predict runs/demo-20261123-101500 -i a.png -i b.png -p "Which one is first?" --base-only
    """
    from vlmtune.after.generate import generate_answer, open_images, user_turn
    from vlmtune.after.trained import load_for_inference, open_trained_run

    trained = open_trained_run(run_dir, force=force)
    images = open_images(image or [])  # before the model loads: a bad path fails in a second
    _quiet_libraries()
    status.print(f"loading {'the base of ' if base_only else ''}[bold]{run_dir}[/] ...")
    inference = load_for_inference(trained, base_only=base_only)
    messages = user_turn(prompt, len(images))
    print(generate_answer(inference.model, inference.processor, messages, images, max_new_tokens))


def evaluate(
    run_dir: Path = RUN_ARG,
    data: Path = typer.Option(
        None,
        "--data",
        help="Eval samples (.jsonl/.json); default: the recipe's data.eval.",
        show_default=False,
    ),
    max_samples: int = typer.Option(None, "--max-samples", min=1, help="Score only the first N samples."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
) -> None:
    """Generate answers on an eval set, before (base) vs after (adapter): exact match and contains-answer.

    The reference is each sample's last assistant turn; the prompt is the conversation before it.
    On a preference set (chosen/rejected pairs) the reference is the chosen answer, and preference
    accuracy (the chosen answer the likelier one) is reported beside. Writes
    RUN_DIR/4-eval/eval_report.json.

    Examples:

        vlmtune eval runs/demo-20261123-101500

        vlmtune eval runs/demo-20261123-101500 --data data/held_out.jsonl --max-samples 50
    """
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import open_trained_run
    from vlmtune.errors import DataError

    trained = open_trained_run(run_dir)
    section = trained.recipe.data
    if data is None and not section.eval:
        raise DataError(
            f"run {run_dir} has no eval split (its recipe's data.eval is empty)",
            hint="pass one: vlmtune eval RUN_DIR --data eval.jsonl",
        )
    source = str(data) if data is not None else section.eval
    # A file given on the command line keeps the run's layout settings; its images are relative to it.
    settings = section.model_copy(update={"image_root": None}) if data is not None else section
    items, read = ev.load_items(source, settings, max_samples)
    _quiet_libraries()
    status.print(f"loading [bold]{run_dir}[/] ...")
    found = _with_progress(2 * len(items), lambda tick: ev.run_answers(trained, items, max_new_tokens, tick))
    content = ev.report(items, found, max_new_tokens=max_new_tokens, data=read)
    path = ev.write_report(trained.run, content)
    ev.render(content, console)
    console.print(f"report: [bold]{path}[/]")


def export(
    run_dir: Path = RUN_ARG,
    out: Path = typer.Option(
        ..., "--out", "-o", help="New folder to write (must not exist).", show_default=False
    ),
    merge: bool = typer.Option(False, "--merge", help="Merge the LoRA into a 16-bit copy of the base."),
    dtype: ExportDtype = typer.Option(ExportDtype.bfloat16, "--dtype", help="dtype of the merged model."),
    force: bool = typer.Option(
        False, "--force", help="Export weights that look collapsed (values no trained model holds) anyway."
    ),
) -> None:
    """Export a run: a peft adapter folder, or (--merge) a standalone merged model, each with a model card.

    The adapter loads with `PeftModel.from_pretrained`; the merged folder with plain
    `AutoModelForImageTextToText` + `AutoProcessor`. The merge reloads the base UNQUANTIZED (never
    merging into 4-bit weights) and checks the saved weights really hold the LoRA update.

    Examples:

        vlmtune export runs/demo-20261123-101500 --out exports/demo-adapter

        vlmtune export runs/demo-20261123-101500 --out exports/demo-merged --merge --dtype bfloat16
    """
    from vlmtune.after.export import check_new_folder, export_run
    from vlmtune.after.trained import open_trained_run

    trained = open_trained_run(run_dir, force=force)
    check_new_folder(out)
    _quiet_libraries()
    if trained.is_full and merge:
        status.print("a full fine-tune is already a standalone model: copying it, no merge needed")
    status.print(f"exporting [bold]{run_dir}[/] ...")
    result = export_run(trained, out, merge=merge, dtype=dtype.value)
    for check in result.checks:
        detail = f" {check['module']}" if "module" in check else ""
        console.print(f"[green]✓[/] {check['check']}{detail}")
    console.print(f"[bold green]exported[/] {result.kind} to [bold]{result.out}[/] (model card: README.md)")


def _with_progress(total: int, work):
    """Run ``work(tick)`` under a progress bar that ``tick()`` advances."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=status, transient=True) as progress:
        task = progress.add_task("generating (adapter, then base)", total=total)
        return work(lambda: progress.advance(task))


def _quiet_libraries() -> None:
    from vlmtune.commands.core import _quiet_libraries as quiet

    quiet()
