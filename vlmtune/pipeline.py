"""run(recipe): the three stages in order (and eval, when asked). Each stage gets only its own sections.

Each stage's artifacts are written before the next starts, and summary.json records every
stage's status, so a crash late in training still leaves a readable run folder. One process at a
time trains a run folder (vlmtune.runs.runlock); a stop by signal marks the run `interrupted` with the
step it reached and the command that resumes it (vlmtune.runs.signals, vlmtune.runs.resuming). Under
torchrun every rank runs the stages; rank 0 alone names, locks and writes the run folder
(vlmtune.distributed).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmtune import distributed, observe
from vlmtune.after import evaluate, trained
from vlmtune.distributed import text_only
from vlmtune.errors import RunDirError, VlmtuneError
from vlmtune.model import checkpoint
from vlmtune.model.families import check_objective
from vlmtune.observe.trackers import require_installed
from vlmtune.recipe import Recipe
from vlmtune.runs import fingerprints, resuming, rundir, runlock, signals, trainer_checkpoints
from vlmtune.runs.resuming import Start
from vlmtune.runs.rundir import RunDir, environment_report
from vlmtune.stages import dpo, grpo, kto, load, lora, sft

OBJECTIVES = {
    "sft": sft,
    "dpo": dpo,
    "grpo": grpo,
    "kto": kto,
}  # recipe train.objective -> the module that trains it

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal (Ctrl-C, SIGTERM); summary.json says `interrupted` and how to resume."""

    def __init__(self, run: RunDir, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.run = run
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


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
        path = distributed.from_writer(lambda: _create(recipe, run_name, run_dir).path)
        run = RunDir(path, writer=here.writer)
        with _lock(run), recorded(run):
            redacted = run.write_recipe(recipe_text)
            if redacted and run.writer:
                warn(
                    f"{run.path / rundir.RECIPE}: redacted {len(redacted)} secret(s) from the copy of the recipe "
                    f"({', '.join(sorted(set(redacted)))}); keep tokens in the environment, not in recipes"
                )
            run.write_text(rundir.RESOLVED, recipe.to_yaml())
            run.init_summary(recipe.output.name or run_name)
            prints = fingerprints.data_fingerprints(recipe.data) if run.writer else {}
            run.set_status("running", resolved=resuming.baseline(recipe), data_fingerprints=prints)
            return _stages(recipe, run, device, here, Start(), callbacks=callbacks, warn=warn)


def resume(
    run_path: Path,
    overrides: list[str] | None = None,
    callbacks=None,
    warn: Warn = _stderr,
    say: Callable[[str], None] = _say,
) -> RunDir:
    """Continue a run folder where it stopped, with the recipe (and rank count) it was started with.

    Raises resuming.NothingToResume for a finished run (which is left untouched). Every rank reads
    the plan from the folder before the process group starts, and so before rank 0 writes anything.
    """
    overrides = overrides or []
    here = distributed.ranks()
    run = RunDir.open(run_path, writer=here.writer)
    resuming.refuse_if_finished(run, overrides)
    with _lock(run):
        recipe, start = resuming.plan(run, overrides)
        require_installed(recipe.output.report_to)
        distributed.check_resume(run.summary().get("distributed"), here, run.path)
        distributed.check_objective(recipe.train.objective, recipe.train.distributed, here)
        device = checkpoint.choose_device(recipe.train.device)
        with distributed.session(device, recipe.train.distributed) as here, recorded(run):
            if run.writer:
                for skipped in start.skipped:
                    warn(f"skipped {skipped.path.name}: {skipped.reason}")
                say(resuming.describe(run, start))
            resuming.record(run, recipe, start)
            return _stages(recipe, run, device, here, start, callbacks=callbacks, warn=warn)


def _create(recipe: Recipe, run_name: str, run_dir: Path | None) -> RunDir:
    return RunDir.create(Path(recipe.output.dir), recipe.output.name or run_name, exact=run_dir)


def _lock(run: RunDir) -> contextlib.AbstractContextManager:
    """The run folder's lock, held by the writing rank: one launch at a time trains a folder."""
    return runlock.hold(run.path) if run.writer else contextlib.nullcontext()


def _stages(
    recipe: Recipe, run: RunDir, device: str, here: distributed.Ranks, start: Start, callbacks, warn: Warn
) -> RunDir:
    started = time.time()
    train = recipe.train
    threads = checkpoint.apply_cpu_threads(train.cpu_threads, device, here.world_size)  # before any step
    run.write_json(rundir.ENV, environment_report(device))
    run.record(
        distributed=distributed.summary_figures(train.distributed, here, train.batch_size, train.grad_accum),
        **({"cpu_threads": threads} if threads is not None else {}),
    )
    strategy = distributed.strategy_of(train.distributed, here)

    objective = OBJECTIVES[train.objective]
    if start.train_done:  # killed after the final weights were written: only the eval is left
        if not run.writer:  # the eval runs on rank 0 alone
            return run
        model, processor, output = _trained_model(run, recipe, device)
    else:
        with stage(run, "load") as figures:
            initial = trained.start_from(recipe.model, recipe.lora)  # model.adapter: checked before any load
            if initial.which and run.writer:
                _say(f"starting from {initial.which}")
            figures.update(initial.figures())
            if hasattr(objective, "before_load"):  # grpo's reward functions: refused before any weight loads
                objective.before_load(recipe.objective_options())
            # the record's refusals (Family.refused_objectives): a config read, still before any weight loads
            check_objective(checkpoint.detect(initial.model.name, initial.model.revision)[1], train.objective)
            if run.writer:  # only rank 0 writes the estimate and warns
                figures.update(estimate_memory(run, recipe, device, warn, gpus=here.world_size))
            figures.update(observe.before_load())
            loaded = load.load(
                initial.model, recipe.quantization, recipe.data.max_image_pixels,
                distributed.local_device(device, here), shardable=strategy == "fsdp",
            )  # fmt: skip
            if run.writer:
                load.write_artifacts(run, loaded)

        with stage(run, "lora"):
            lora_plan = lora.plan(loaded.model, loaded.family, recipe.lora)
            model = lora.apply(loaded.model, recipe.lora, lora_plan, seed=train.seed, adapter=initial.adapter)
            if run.writer:
                lora.write_artifacts(
                    run, model, loaded.family, lora_plan, train
                )  # train: its optimizer groups
        text_only.guard_text_only_batches(model, loaded.family, loaded.processor, train.distributed)

        run.keep_logs_until(start.step)  # the steps after the checkpoint are logged again
        with stage(run, "train") as figures:
            from vlmtune.training.callbacks import StepCounter

            result = objective.train(
                model, loaded.processor, loaded.family, recipe.data, train, recipe.objective_options(),
                run=run, device=device, dtype=recipe.model.dtype,
                resume=start.checkpoint.path if start.checkpoint else None,
                callbacks=[StepCounter(figures), *(callbacks or [])], report_to=recipe.output.report_to,
            )  # fmt: skip
            figures.update(first_loss=result.first_loss, last_loss=result.last_loss, steps=result.steps)
            figures.update(result.figures)
            if run.writer and result.figures.get("stopped_early"):
                _say(f"stopped early at step {result.steps}: {result.figures['stopped_early']}")
            if run.writer and result.figures.get("best_checkpoint"):
                best = result.figures["best_checkpoint"]
                _say(
                    f"best checkpoint: {best['path']} ({best['metric']} {best['value']:.4g}); predict, eval and "
                    "export use it (--checkpoint last picks the final weights)"
                )
            if run.writer:
                figures.update(
                    observe.after_training(run, warn)
                )  # measured memory; writes the curves picture
        processor, output = loaded.processor, result.output
        if train.eval_generate and run.writer and result.figures.get("best_checkpoint"):
            del model, loaded  # the eval scores the best checkpoint, as predict and export use it
            model, processor, _ = _trained_model(run, recipe, device)

    if train.eval_generate and run.writer:  # optional: only then does summary.json list an eval stage
        with stage(run, "eval") as figures:
            figures.update(evaluate.after_training(model, processor, recipe.model, recipe.data, run, train))

    run.set_status("done", seconds=round(time.time() - started, 1), output=output)
    return run


def _trained_model(run: RunDir, recipe: Recipe, device: str) -> tuple[Any, Any, str]:
    """The base as trained plus the run's final weights, for an eval left to do."""
    finished = trained.open_trained_run(run.path)
    inference = trained.load_for_inference(finished, device=device)
    return inference.model, inference.processor, str(finished.weights)


@contextlib.contextmanager
def stage(run: RunDir, name: str) -> Iterator[dict]:
    """Mark a stage running, then done / failed / interrupted; figures added by the body are kept."""
    figures: dict[str, Any] = {}
    run.set_stage(name, "running")
    try:
        yield figures
    except KeyboardInterrupt:
        with signals.deferred():
            run.set_stage(name, "interrupted", **figures)
        raise
    except BaseException as exc:
        error = explained(exc, run)
        with signals.deferred():
            run.set_stage(
                name, "failed", **figures, **getattr(error, "figures", {}), error=_first_line(error)
            )
            run.set_status("failed")
        if error is not exc:
            raise error from exc
        raise
    run.set_stage(name, "done", **figures)


@contextlib.contextmanager
def recorded(run: RunDir) -> Iterator[None]:
    """Whatever stops the process between stages too, summary.json never stays `running`."""
    try:
        yield
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if _never_started(run):
            raise
        with signals.deferred():
            mark_interrupted(
                run, signum, getattr(exc, "saved_step", None), getattr(exc, "seconds_to_save", None)
            )
        raise Stopped(run, signum) from exc
    except BaseException as exc:
        error = explained(exc, run)
        if _never_started(run):
            if (
                isinstance(error, RunDirError) and error is not exc
            ):  # a full disk before anything was recorded
                error = RunDirError(
                    f"{error.message}; the new run folder is removed (nothing had been recorded in it)",
                    hint="free some space and run the same command again",
                )
            raise error from exc
        with signals.deferred(), contextlib.suppress(RunDirError):  # a damaged summary.json stays as it is
            if run.summary().get("status") == "running":
                run.set_status("failed", error=_first_line(error))
        if error is not exc:
            raise error from exc
        raise


def _never_started(run: RunDir) -> bool:
    """A new run folder stopped before its summary.json existed (a full disk, a Ctrl-C in its first
    moments): it cannot be resumed or listed, so the writer removes it; True then."""
    if (run / rundir.SUMMARY).is_file():
        return False
    if run.writer:
        shutil.rmtree(run.path, ignore_errors=True)
    return True


def mark_interrupted(
    run: RunDir, signum: int, saved_step: int | None = None, seconds_to_save: float | None = None
) -> None:
    """summary.json: interrupted, by which signal, the last step done and where a resume starts;
    for a SIGTERM/SIGHUP that saved on the way out, the step saved and the seconds it took."""
    summary = run.summary()
    last_step = summary.get("stages", {}).get("train", {}).get("last_step")
    newest = trainer_checkpoints.choose(run / rundir.CHECKPOINTS).chosen
    saved = {"saved_on_signal": {"step": saved_step, "seconds_after_signal": seconds_to_save}}
    run.set_status(
        "interrupted",
        stopped_by=signal.Signals(signum).name,
        last_step=last_step,
        resume_from_step=newest.step if newest else 0,
        resume_command=resume_command(run, distributed.ranks()),
        **(saved if saved_step is not None else {}),
    )


def resume_command(run: RunDir, here: distributed.Ranks) -> str:
    """The command that resumes the run, launched as it was: a run of several ranks needs them again."""
    if not here.distributed:
        return f"vlmtune train --resume {run.path}"
    nodes = f" --nnodes {here.nodes}" if here.nodes > 1 else ""
    return f"torchrun{nodes} --nproc-per-node {here.local_world_size} -m vlmtune train --resume {run.path}"


def explained(exc: BaseException, run: RunDir) -> BaseException:
    """What stopped the run, said as a user error where it is one: a full disk, a rank of the launch gone."""
    return disk_full(exc, run) or distributed.lost_peer(exc, resume_command(run, distributed.ranks())) or exc


LOW_SPACE = 16 << 20  # bytes free under which a failed write is taken for a full disk


def disk_full(exc: BaseException, run: RunDir) -> RunDirError | None:
    """A full disk, said plainly; the half-written checkpoint it left is skipped by a resume.

    Libraries word it their own way (safetensors: "os error 28"; torch.save: "unexpected pos"), so
    besides ENOSPC itself, any failure with almost no space left on the run's disk counts.
    """
    if isinstance(exc, KeyboardInterrupt | VlmtuneError):  # a user error stays what it is
        return None
    full = isinstance(exc, OSError) and exc.errno in rundir.DISK_FULL
    try:
        free = shutil.disk_usage(run.path).free
    except OSError:
        free = None
    if not (full or "No space left on device" in str(exc) or (free is not None and free < LOW_SPACE)):
        return None
    where = f" while writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    left = f" ({free:,} bytes free)" if free is not None else ""
    return RunDirError(
        f"no space left on the device of {run.path}{where}{left}",
        hint="free some space (old run folders and their 3-train/checkpoints are the usual bulk), then "
        "continue with `vlmtune train --resume RUN`",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:500] if text else type(exc).__name__


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
