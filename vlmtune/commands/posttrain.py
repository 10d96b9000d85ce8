"""After training: predict, eval, export. Heavy imports stay inside the functions."""

from __future__ import annotations

import enum
from pathlib import Path

import typer
from rich.console import Console

from vlmtune.choices import Dtype, words

console = Console(highlight=False)
status = Console(stderr=True, highlight=False)  # progress notes; stdout keeps only the results

RUN_ARG = typer.Argument(
    ...,
    help="A run folder that `vlmtune train` created, or a merged folder of `vlmtune export`.",
    show_default=False,
)
CHECKPOINT_OPT = typer.Option(
    None,
    "--checkpoint",
    help="Which weights: last (the final ones), best, or a checkpoint step (40 or checkpoint-40); default: the "
    "best checkpoint when the run kept one (train.best_metric), else the final weights.",
    show_default=False,
)


# The recipe's dtypes (vlmtune.choices), as the enum typer needs for a choice option.
ExportDtype = enum.Enum("ExportDtype", {name: name for name in words(Dtype)}, type=str)
# What `export --format` writes (after/export.py, after/export_gguf.py, after/export_vllm.py).
ExportFormat = enum.Enum("ExportFormat", {name: name for name in ("hf", "gguf", "vllm")}, type=str)
# GGUF quantizations of the language model (after/export_gguf.QUANTS; the mmproj stays f16).
GgufQuant = enum.Enum("GgufQuant", {name: name for name in ("f16", "q8_0", "q4_k_m")}, type=str)


def predict(
    run_dir: Path = RUN_ARG,
    checkpoint: str = CHECKPOINT_OPT,
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
    from vlmtune.after.generate import generate_answer, open_images, printable, user_turn
    from vlmtune.after.trained import is_export, load_export, load_for_inference, open_trained_run

    exported = is_export(run_dir)
    if exported and base_only:
        raise _export_has_no_base(run_dir)
    trained = None if exported else open_trained_run(run_dir, checkpoint, force=force)
    if trained is not None:
        status.print(f"using {trained.which}")
    images = open_images(image or [])  # before the model loads: a bad path fails in a second
    _quiet_libraries()
    status.print(f"loading {'the base of ' if base_only else ''}[bold]{run_dir}[/] ...")
    inference = load_export(run_dir) if exported else load_for_inference(trained, base_only=base_only)
    messages = user_turn(prompt, len(images))
    answer = generate_answer(inference.model, inference.processor, messages, images, max_new_tokens)
    print(printable(answer))  # a random model's control bytes and ESC sequences shown, not obeyed


def evaluate(
    run_dir: Path = RUN_ARG,
    checkpoint: str = CHECKPOINT_OPT,
    data: Path = typer.Option(
        None,
        "--data",
        help="Eval samples (.jsonl/.json); default: the recipe's data.eval.",
        show_default=False,
    ),
    max_samples: int = typer.Option(None, "--max-samples", min=1, help="Score only the first N samples."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    against: str = typer.Option(
        None,
        "--against",
        help="What 'before' is: base (the base model) or start (the run this one trained on from, "
        "model.adapter). Default: start for a run that trained on from another, else base.",
        show_default=False,
    ),
) -> None:
    """Generate answers on an eval set, before (base, or the run it started from) vs after: exact match and contains-answer.

    The reference is each sample's last assistant turn; the prompt is the conversation before it.
    On a preference set (chosen/rejected pairs) the reference is the chosen answer, and preference
    accuracy (the chosen answer the likelier one) is reported beside. Writes
    RUN_DIR/4-eval/eval_report.json.

    Examples:

        vlmtune eval runs/demo-20261123-101500

        vlmtune eval runs/demo-20261123-101500 --data data/held_out.jsonl --max-samples 50
    """
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import is_export, open_trained_run
    from vlmtune.errors import DataError

    if is_export(run_dir):
        _evaluate_export(run_dir, data, max_samples, max_new_tokens)
        return
    trained = open_trained_run(run_dir, checkpoint)
    status.print(f"using {trained.which}")
    if against not in (None, "base", "start"):
        raise DataError(
            f"--against {against!r} is neither base nor start", hint="--against base or --against start"
        )
    if against == "start" and trained.recipe.model.adapter is None:
        raise DataError(
            f"run {run_dir} did not train on from an earlier run (its model.adapter is empty)",
            hint=f"compare it with its base: vlmtune eval {run_dir} --against base",
        )
    against = against or ("start" if trained.recipe.model.adapter else "base")
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
    found = _with_progress(
        2 * len(items), lambda tick: ev.run_answers(trained, items, max_new_tokens, tick, against=against)
    )
    before = "base" if against == "base" else f"run {Path(trained.recipe.model.adapter).name}"
    content = ev.report(
        items, found, trained.recipe.train, max_new_tokens=max_new_tokens, data=read, before=before
    )
    path = ev.write_new_report(trained.run, content, label=Path(source).stem if data is not None else None)
    page = ev.write_html(trained.run, items, content, str(path.relative_to(trained.run.path)))
    ev.render(content, console)
    console.print(
        f"report: [bold]{path}[/] (open [bold]{page}[/] in a browser; earlier reports are kept)",
        soft_wrap=True,
    )


def _evaluate_export(folder: Path, data: Path | None, max_samples: int | None, max_new_tokens: int) -> None:
    """Score an export folder's own model; its base is not in the folder, so there is no before."""
    from vlmtune.after import evaluate as ev
    from vlmtune.after.trained import load_export
    from vlmtune.errors import DataError
    from vlmtune.recipe import DataSection
    from vlmtune.runs import rundir
    from vlmtune.scoring import scores

    if data is None:
        raise DataError(
            f"{folder} is an export folder: give the samples to score it on",
            hint=f"vlmtune eval {folder} --data eval.jsonl (the export's own scores are in its "
            f"{rundir.EXPORT_REPORT})",
        )
    items, _ = ev.load_items(str(data), DataSection(train=str(data), eval=str(data)), max_samples)
    _quiet_libraries()
    status.print(f"loading [bold]{folder}[/] ...")
    inference = load_export(folder)
    found = _with_progress(
        len(items),
        lambda tick: ev.answers(inference.model, inference.processor, items, max_new_tokens, tick),
        "generating",
    )
    figures = scores(found, [item.reference for item in items])
    console.print(
        f"{folder} on {len(items)} samples of {data}: exact match {figures['exact_match']:.1%}, "
        f"contains answer {figures['contains']:.1%}"
    )
    ev.render_answers(items, found, console)
    status.print("(an export folder is not written to: no report file)")


def export(
    run_dir: Path = RUN_ARG,
    checkpoint: str = CHECKPOINT_OPT,
    out: Path = typer.Option(
        ..., "--out", "-o", help="New folder to write (must not exist).", show_default=False
    ),
    merge: bool = typer.Option(False, "--merge", help="Merge the LoRA into a 16-bit copy of the base."),
    dtype: ExportDtype = typer.Option(ExportDtype.bfloat16, "--dtype", help="dtype of the merged model."),
    score: bool = typer.Option(
        True,
        "--score/--no-score",
        help="Score a merged (or full) export on the recipe's data.eval from its saved files, beside the "
        "adapter's answers, into the card and vlmtune_export.json.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Export weights that look collapsed (values no trained model holds) anyway."
    ),
    format: ExportFormat = typer.Option(
        ExportFormat.hf,
        "--format",
        help="hf: a peft adapter, or with --merge a transformers model; gguf: llama.cpp's language GGUF + "
        "mmproj and an Ollama Modelfile; vllm: what vLLM serves for this family, with its `vllm serve` command.",
    ),
    quant: GgufQuant = typer.Option(
        None,
        "--quant",
        help="--format gguf: the language model's quantization (default f16); the mmproj stays f16.",
        show_default=False,
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Compare greedy answers on data.eval: llama.cpp vs transformers (gguf), or the merged model vs "
        "base + adapter (--merge); the agreement rate and each first differing token.",
    ),
    push_to_hub: str = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="Upload the finished export folder to this hub repo (created private if missing).",
        show_default=False,
    ),
) -> None:
    """Export a run: a peft adapter folder, or (--merge) a standalone merged model, each with a model card.

    The adapter loads with `PeftModel.from_pretrained`; the merged folder with plain
    `AutoModelForImageTextToText` + `AutoProcessor` (which needs torchvision for families that declare a
    video processor), and with `vlmtune predict` / `vlmtune eval`. The merge reloads the base
    UNQUANTIZED (never merging into 4-bit weights), checks the saved weights really hold the LoRA
    update, then scores the saved model on data.eval and warns when its answers part from the adapter's.

    Examples:

        vlmtune export runs/demo-20261123-101500 --out exports/demo-adapter

        vlmtune export runs/demo-20261123-101500 --out exports/demo-merged --merge --dtype bfloat16

        vlmtune export runs/demo-20261123-101500 --out exports/demo-gguf --format gguf --quant q8_0 --verify

        vlmtune export runs/demo-20261123-101500 --out exports/demo-vllm --format vllm

    GGUF and vLLM exports are explained in docs/export.md.
    """
    from vlmtune.after.export import check_new_folder
    from vlmtune.after.trained import open_trained_run

    _check_export_options(format.value, quant, verify, merge)
    trained = open_trained_run(run_dir, checkpoint, force=force)
    status.print(f"using {trained.which}")
    check_new_folder(out)
    _quiet_libraries()
    if format.value == "gguf":
        _export_gguf(trained, out, (quant or GgufQuant.f16).value, dtype.value, verify)
    elif format.value == "vllm":
        _export_vllm(trained, out, merge, dtype.value)
    else:
        _export_hf(trained, out, merge, dtype.value, score or verify, verify)
    if push_to_hub:
        from vlmtune.after.export_hub import push_to_hub as push

        status.print(f"pushing [bold]{out}[/] to {push_to_hub} ...")
        console.print(f"pushed to {push(out, push_to_hub)}")


def _check_export_options(format: str, quant, verify: bool, merge: bool) -> None:
    """Options that do not fit together fail before anything loads."""
    from vlmtune.after.export import ExportError

    if quant is not None and format != "gguf":
        raise ExportError("--quant is for --format gguf", hint="add --format gguf, or drop --quant")
    if verify and format == "vllm":
        raise ExportError(
            "--verify cannot run vLLM here (it needs a GPU and the vllm package)",
            hint="verify the same weights as --format gguf --verify, or --merge --verify",
        )
    if verify and format == "hf" and not merge:
        raise ExportError(
            "--verify compares a served model with the trained one; an adapter export is the trained model",
            hint="add --merge (the merged 16-bit model against base + adapter) or --format gguf",
        )


def _export_gguf(trained, out: Path, quant: str, dtype: str, verify: bool) -> None:
    from vlmtune.after.export_gguf import export_gguf

    status.print(f"exporting [bold]{trained.run.path}[/] as GGUF ({quant}) ...")
    report = export_gguf(trained, out, quant, dtype, verify)
    _print_checks(report["checks"])
    if report["verify"]:
        _print_agreement(report["verify"])
    console.print(f"[bold green]exported[/] GGUF to [bold]{out}[/]: {report['gguf']['model']}, "
                  f"{report['gguf']['mmproj']}, Modelfile (model card: README.md)")  # fmt: skip


def _export_vllm(trained, out: Path, merge: bool, dtype: str) -> None:
    from vlmtune.after.export_vllm import export_vllm

    status.print(f"exporting [bold]{trained.run.path}[/] for vLLM ...")
    report = export_vllm(trained, out, merge, dtype)
    _print_checks(report["checks"])
    console.print(f"{report['vllm']['why']}", soft_wrap=True)
    console.print(
        f"[bold green]exported[/] for vLLM to [bold]{out}[/]; serve it from inside the folder with:"
    )
    console.print(report["vllm"]["command"], soft_wrap=True)


def _print_checks(checks: list[dict]) -> None:
    for check in checks:
        detail = f" {check['module']}" if "module" in check else ""
        console.print(f"[green]✓[/] {check['check']}{detail}")


def _print_agreement(result: dict) -> None:
    console.print(
        f"verify ({result['compared']}): the same answer on {result['agreeing']} of {result['n']} eval samples "
        f"({result['agreement']:.1%})"
    )
    for row in result["disagreements"]:
        names = result["compared"].split(" vs ")
        console.print(
            f"  sample {row['index']}: first differing token #{row['first_differing_token']}: "
            f"{row[names[0] + '_token']!r} vs {row[names[1] + '_token']!r}",
            soft_wrap=True,
        )


def _export_hf(trained, out: Path, merge: bool, dtype: str, score: bool, verify: bool) -> None:
    from rich.text import Text

    from vlmtune.after.export import export_run

    if trained.is_full and merge:
        status.print("a full fine-tune is already a standalone model: copying it, no merge needed")
    status.print(f"exporting [bold]{trained.run.path}[/] ...")
    result = export_run(trained, out, merge=merge, dtype=dtype, score=score)
    _print_checks(result.checks)
    if result.scored:
        scored = result.scored
        console.print(
            f"scored from the saved files on {scored['n']} eval samples: exact match {scored['exact_match']:.1%} "
            f"(the adapter as trained: {scored['adapter_exact_match']:.1%}); the adapter's answer on "
            f"{scored['agreeing']} of {scored['n']}"
        )
    for warning in result.warnings:
        console.print(Text("warning: ", style="bold yellow") + Text(warning), soft_wrap=True)
    if verify and result.scored:
        _print_agreement(_record_merge_verification(result.out, result.scored))
    console.print(f"[bold green]exported[/] {result.kind} to [bold]{result.out}[/] (model card: README.md)")


def _record_merge_verification(folder: Path, scored: dict) -> dict:
    """--merge --verify: the comparison of the export's own scores, added to its vlmtune_export.json."""
    import json

    from vlmtune.after.gguf_verify import merged_comparison
    from vlmtune.runs import rundir

    result = merged_comparison(folder, scored)
    path = folder / rundir.EXPORT_REPORT
    report = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(
        json.dumps({**report, "verify": result}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return result


def _export_has_no_base(folder: Path):
    from vlmtune.errors import RunDirError

    return RunDirError(
        f"{folder} is an export folder: it holds the trained model only, no base to answer with",
        hint="pass the run folder it was exported from with --base-only",
    )


def _with_progress(total: int, work, description: str = "generating (adapter, then base)"):
    """Run ``work(tick)`` under a progress bar that ``tick()`` advances."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=status, transient=True) as progress:
        task = progress.add_task(description, total=total)
        return work(lambda: progress.advance(task))


def _quiet_libraries() -> None:
    from vlmtune.commands.core import _quiet_libraries as quiet

    quiet()
