"""run(recipe): the three stages in order (and eval, when asked). Each stage gets only its own sections.

Each stage's artifacts are written before the next starts, and summary.json records every
stage's status, so a crash late in training still leaves a readable run folder.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmtune import checkpoint, distributed, evaluate, observe, rundir, text_only, trained
from vlmtune.observe.trackers import require_installed
from vlmtune.recipe import Recipe
from vlmtune.rundir import RunDir, environment_report
from vlmtune.stages import dpo, grpo, load, lora, sft

OBJECTIVES = {"sft": sft, "dpo": dpo, "grpo": grpo}  # recipe train.objective -> the module that trains it

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(
    recipe: Recipe,
    recipe_text: str,
    run_name: str,
    run_dir: Path | None = None,
    callbacks=None,
    warn: Warn = _stderr,
) -> RunDir:
    """A new run folder, trained to the end. Under torchrun rank 0 names and creates it, the others learn it."""
    require_installed(recipe.output.report_to)  # before the run folder exists
    distributed.check_objective(recipe.train.objective, recipe.train.distributed, distributed.ranks())
    device = checkpoint.choose_device(recipe.train.device)
    with distributed.session(device, recipe.train.distributed) as here:
        path = distributed.from_writer(lambda: _create(recipe, recipe_text, run_name, run_dir).path)
        run = RunDir(path, writer=here.writer)
        return _stages(recipe, run, device, here, resume=False, callbacks=callbacks, warn=warn)


def _create(recipe: Recipe, recipe_text: str, run_name: str, run_dir: Path | None) -> RunDir:
    run = RunDir.create(Path(recipe.output.dir), recipe.output.name or run_name, exact=run_dir)
    run.write_text(rundir.RECIPE, recipe_text)
    run.write_text(rundir.RESOLVED, recipe.to_yaml())
    run.init_summary(recipe.output.name or run_name)
    return run


def resume(run_path: Path, callbacks=None, warn: Warn = _stderr) -> RunDir:
    """Continue a run folder from its last checkpoint, with the recipe (and rank count) it was started with."""
    from vlmtune.recipe import load_recipe

    run = RunDir.open(run_path)
    recipe = load_recipe(run / rundir.RESOLVED)
    require_installed(recipe.output.report_to)
    distributed.check_resume(run.summary().get("distributed"), distributed.ranks(), run.path)
    distributed.check_objective(recipe.train.objective, recipe.train.distributed, distributed.ranks())
    device = checkpoint.choose_device(recipe.train.device)
    with distributed.session(device, recipe.train.distributed) as here:
        run = RunDir.open(run_path, writer=here.writer)
        resume_training = bool(run.checkpoints())
        return _stages(recipe, run, device, here, resume=resume_training, callbacks=callbacks, warn=warn)


def _stages(
    recipe: Recipe, run: RunDir, device: str, here: distributed.Ranks, resume: bool, callbacks, warn: Warn
) -> RunDir:
    started = time.time()
    train = recipe.train
    run.write_json(rundir.ENV, environment_report(device))
    launch = distributed.summary_figures(train.distributed, here, train.batch_size, train.grad_accum)
    run.record(distributed=launch)
    strategy = distributed.strategy_of(train.distributed, here)

    objective = OBJECTIVES[recipe.train.objective]
    with stage(run, "load") as figures:
        start = trained.start_from(recipe.model, recipe.lora)  # model.adapter: checked before any load
        if hasattr(objective, "before_load"):  # e.g. grpo's reward functions: refused before any weight loads
            objective.before_load(recipe.objective_options())
        if run.writer:  # only rank 0 writes the estimate and warns
            figures.update(estimate_memory(run, recipe, device, warn, gpus=here.world_size))
        figures.update(observe.before_load())
        loaded = load.load(
            start.model, recipe.quantization, recipe.data.max_image_pixels, distributed.local_device(device, here),
            shardable=strategy == "fsdp",
        )  # fmt: skip
        if run.writer:
            load.write_artifacts(run, loaded)

    with stage(run, "lora"):
        lora_plan = lora.plan(loaded.model, loaded.family, recipe.lora)
        model = lora.apply(
            loaded.model, recipe.lora, lora_plan, seed=recipe.train.seed, adapter=start.adapter
        )
        if run.writer:
            lora.write_artifacts(run, model, loaded.family, lora_plan)
    text_only.guard_text_only_batches(model, loaded.family, loaded.processor, train.distributed)

    with stage(run, "train") as figures:
        result = objective.train(
            model, loaded.processor, loaded.family, recipe.data, recipe.train, recipe.objective_options(),
            run=run, device=device, dtype=recipe.model.dtype, resume=resume, callbacks=callbacks,
            report_to=recipe.output.report_to,
        )  # fmt: skip
        figures.update(first_loss=result.first_loss, last_loss=result.last_loss, steps=result.steps)
        figures.update(result.figures)
        if run.writer:
            figures.update(observe.after_training(run, warn))  # measured memory; writes the curves picture

    if recipe.train.eval_generate and run.writer:  # optional: only then does summary.json list an eval stage
        with stage(run, "eval") as figures:
            figures.update(evaluate.after_training(model, loaded.processor, recipe.model, recipe.data, run))

    run.set_status("done", seconds=round(time.time() - started, 1), output=result.output)
    return run


@contextlib.contextmanager
def stage(run: RunDir, name: str) -> Iterator[dict]:
    """Mark a stage running, then done / failed / interrupted; figures added by the body are kept."""
    figures: dict[str, Any] = {}
    run.set_stage(name, "running")
    try:
        yield figures
    except KeyboardInterrupt:
        run.set_stage(name, "interrupted", **figures)
        run.set_status("interrupted")
        raise
    except BaseException as exc:
        run.set_stage(
            name, "failed", error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        )
        run.set_status("failed")
        raise
    run.set_stage(name, "done", **figures)


def estimate_memory(run: RunDir, recipe: Recipe, device: str, warn: Warn, gpus: int = 1) -> dict:
    """Write 1-load/memory_estimate.json; warn when the peak exceeds what the device has free.

    Spread over ``gpus`` ranks, the peak is one GPU's under the recipe's strategy (DDP or FSDP).
    An estimate must never stop a run that would work, so a failure is a warning, not an error.
    """
    from vlmtune.memory import estimate_recipe
    from vlmtune.units import human_bytes

    try:
        estimate = estimate_recipe(recipe, gpus=gpus)
    except Exception as exc:  # an unusual config the estimator cannot read
        warn(f"no memory estimate ({str(exc).splitlines()[0]}); training goes on")
        return {}
    figures = estimate.to_json()
    peak, terms = figures["peak_bytes"], figures["terms"]
    if gpus > 1:  # what one GPU holds under the run's strategy
        strategy = figures["strategy"] = recipe.train.distributed.strategy
        peak, terms = figures["per_gpu"][strategy]["peak_bytes"], figures["per_gpu"][strategy]["terms"]
    run.write_json(rundir.MEMORY_ESTIMATE, figures)
    # The estimate is for a GPU; training on CPU has no CUDA context to hold.
    needed = peak - (terms["overhead"] if device == "cpu" else 0)
    free = checkpoint.free_memory(device)
    if free is not None and needed > free:
        warn(
            f"the estimated peak of {human_bytes(needed)} exceeds the {human_bytes(free)} free "
            f"on {device}; lower train.batch_size or train.max_length, or see `vlmtune estimate-memory`"
        )
    return {"estimated_peak_bytes": needed, "free_bytes": free}
