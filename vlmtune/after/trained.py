"""A finished run: its recipe, its final weights, and its model loaded for inference.

The base is loaded exactly as it was trained (same quantization and dtype, from resolved.yaml) and
the run's adapter is attached on top; a full fine-tune loads its saved model instead. Every
post-training command (predict, eval, export) starts from ``open_trained_run``, and so does a new
run that trains on from an earlier one (``model.adapter``, see ``start_from``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.errors import RunDirError
from vlmtune.recipe import LoraSection, ModelSection, Recipe
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir


@dataclass(frozen=True)
class TrainedRun:
    run: RunDir
    recipe: Recipe
    weights: Path  # 3-train/adapter (3-train/model for a full fine-tune), or the checkpoint chosen
    which: str = "the final weights"  # what ``weights`` is, in words
    final: Path | None = None  # the final weights folder (it holds the processor as trained)

    @property
    def is_full(self) -> bool:
        return self.recipe.lora.method == "full"


@dataclass
class Inference:
    model: Any  # a PeftModel when an adapter is attached
    processor: Any
    family: Any
    has_adapter: bool


def open_trained_run(
    path: str | Path, checkpoint: str | None = None, force: bool = False, option: str = "pass --checkpoint"
) -> TrainedRun:
    """A run folder whose training finished, with its resolved recipe and the weights to use: the best
    checkpoint when the run kept one (train.best_metric), else the final weights. ``checkpoint`` picks
    another: ``last`` (the final weights), ``best``, or a checkpoint by step (``40`` or ``checkpoint-40``).
    Weights no trained model holds (a collapsed run's) are refused unless ``force``, NaN/inf always.
    ``option`` says how the caller's user picks a checkpoint, in the hints."""
    from vlmtune.recipe import load_recipe

    path = Path(path)
    if not path.is_dir():
        raise RunDirError(
            f"run folder {path} does not exist",
            hint="pass a folder that `vlmtune train` created, e.g. runs/demo-20260101-120000",
        )
    run = RunDir.open(path)
    summary = run.summary()
    if not training_finished(summary):
        stages = ", ".join(
            f"{name} {entry.get('status')}" for name, entry in summary.get("stages", {}).items()
        )
        raise RunDirError(
            f"run {path} did not finish training (status {summary.get('status')!r}; {stages}), "
            "so it has no final weights",
            hint=f"continue it with `vlmtune train --resume {path}`, or pick a finished run",
        )
    recipe = load_recipe(run / rundir.RESOLVED)
    weights = run / (rundir.FULL_MODEL if recipe.lora.method == "full" else rundir.ADAPTER)
    if not weights.is_dir():
        raise RunDirError(
            f"run {path} says it finished but {weights} is missing",
            hint="the run folder was changed after training; train again or restore the folder",
        )
    refuse_pickles(weights)
    from vlmtune.training.finite import refuse_nonfinite

    refuse_nonfinite(weights, force)  # a run that diverged or collapsed before vlmtune stopped such runs
    chosen, which = chosen_weights(run, summary, checkpoint, option)
    if chosen is None:
        return TrainedRun(run, recipe, weights, final=weights)
    refuse_nonfinite(chosen, force)
    return TrainedRun(run, recipe, chosen, which, final=weights)


def chosen_weights(
    run: RunDir, summary: dict, checkpoint: str | None, option: str = "pass --checkpoint"
) -> tuple[Path | None, str]:
    """The checkpoint folder to use instead of the final weights (None: the final weights), in words."""
    from vlmtune.runs import trainer_checkpoints

    best = summary.get("stages", {}).get("train", {}).get("best_checkpoint")
    if checkpoint in ("last", "final") or (checkpoint is None and not best):
        return None, "the final weights"
    if checkpoint in (None, "best"):
        if not best:
            raise RunDirError(
                f"run {run.path} kept no best checkpoint (its recipe sets no train.best_metric, or nothing was "
                "measured at a saved step)",
                hint=f"{option} last, or a checkpoint step; train with train.best_metric to keep the best",
            )
        folder = run / best["path"]
        which = f"the best checkpoint {folder.name} ({best['metric']} {best['value']:.4g})"
    else:
        step = checkpoint.removeprefix(rundir.CHECKPOINT_PREFIX)
        folder = run / rundir.CHECKPOINTS / f"{rundir.CHECKPOINT_PREFIX}{step}"
        which = f"checkpoint {folder.name}"
        if not step.isdigit() or not folder.is_dir():
            kept = [c.path.name for c in trainer_checkpoints.all_checkpoints(run / rundir.CHECKPOINTS)]
            raise RunDirError(
                f"run {run.path} has no checkpoint {checkpoint!r}",
                hint=f"pass last, best or one of the checkpoints kept: {', '.join(kept) or 'none'}",
            )
    problem = trainer_checkpoints.problem(folder)
    if problem is not None:
        raise RunDirError(
            f"{which} of run {run.path} cannot be used: {problem[0]}",
            hint=f"{option} last for the final weights, or another checkpoint",
        )
    return folder, which


PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.save / pickle files: loading runs code


def refuse_pickles(weights: Path) -> None:
    """Weights are read from safetensors only: a folder holding pickled weights (adapter_model.bin, a
    full model's pytorch_model.bin) is refused before anything could unpickle them (peft and
    transformers fall back to such files), since unpickling a file runs whatever code it names."""
    pickles = sorted(p.name for p in weights.iterdir() if p.is_file() and p.suffix in PICKLES)
    if pickles:
        raise RunDirError(
            f"{weights} holds pickled weights ({', '.join(pickles)}); vlmtune reads weights from safetensors "
            "files only (unpickling a file runs any code it carries)",
            hint="convert a file you trust yourself (safetensors.torch.save_file) and remove the pickle, or "
            "train the run again",
        )


# The lora keys that shape an adapter: a run training on an earlier run's adapter must state them as
# that run did, so its resolved.yaml and 2-lora/lora_plan.json describe the adapter really trained.
ADAPTER_SHAPE = (
    "method", "init", "finetune_vision_layers", "finetune_language_layers", "finetune_attention_modules",
    "finetune_mlp_modules", "train_projector", "r", "alpha", "use_rslora", "bias", "target_modules",
)  # fmt: skip


@dataclass(frozen=True)
class StartFrom:
    """Where a run's weights start: what the load stage loads, and the adapter the lora stage attaches."""

    model: ModelSection  # the base, or an earlier full fine-tune's saved model (or checkpoint)
    adapter: Path | None = None  # an earlier run's adapter (or checkpoint), trained on instead of a fresh one
    which: str | None = None  # the earlier run's weights, in words (None: from the base)
    weights: Path | None = None  # their folder, whether an adapter or a full model

    def figures(self) -> dict:
        """What the load stage records in summary.json about where the weights start."""
        if self.weights is None:
            return {}
        return {"start_from": {"weights": str(self.weights), "which": self.which}}


def start_from(model: ModelSection, lora: LoraSection) -> StartFrom:
    """The weights a run starts from: the base, or the run ``model.adapter`` names, checked first.

    The weights are those predict, eval and export take from that run (its best checkpoint when it kept
    one, else its final weights) unless ``model.adapter_checkpoint`` picks others. That run must have
    finished training, on the same base model, with the same lora shape; each refusal says which and how
    to fix it, before any weight is loaded.
    """
    if model.adapter is None:
        return StartFrom(model)
    try:
        earlier = open_trained_run(
            model.adapter, model.adapter_checkpoint, option="set model.adapter_checkpoint:"
        )
    except RunDirError as exc:
        raise RunDirError(f"model.adapter: {exc.message}", hint=exc.hint) from None
    base = earlier.recipe.model
    if (base.name, base.revision) != (model.name, model.revision):
        raise RunDirError(
            f"model.adapter: run {model.adapter} trained {base.name}"
            f"{f' (revision {base.revision})' if base.revision else ''}, not {model.name}; its weights fit only "
            "the base model they were trained on",
            hint=f"set model.name: {base.name}, or pick a run of {model.name}",
        )
    differing = [key for key in ADAPTER_SHAPE if getattr(lora, key) != getattr(earlier.recipe.lora, key)]
    if differing:
        listed = ", ".join(
            f"lora.{k} is {json.dumps(getattr(lora, k))} here but {json.dumps(getattr(earlier.recipe.lora, k))} there"
            for k in differing
        )
        raise RunDirError(
            f"model.adapter: this recipe's lora section does not describe the weights of run {model.adapter} "
            f"({listed})",
            hint=f"copy the lora section of {earlier.run / rundir.RESOLVED}: an adapter trains on with the shape "
            "it was made with",
        )
    which = f"{earlier.which} of run {model.adapter}"
    if earlier.is_full:
        full = model.model_copy(update={"name": str(earlier.weights), "revision": None})
        return StartFrom(full, which=which, weights=earlier.weights)
    return StartFrom(model, earlier.weights, which=which, weights=earlier.weights)


def training_finished(summary: dict) -> bool:
    """Done, or the train stage done (its final weights saved) and only the optional eval left or failed."""
    if summary.get("status") == "done":
        return True
    return summary.get("stages", {}).get("train", {}).get("status") == "done"


def load_for_inference(trained: TrainedRun, base_only: bool = False, device: str | None = None) -> Inference:
    """The base as trained plus the run's adapter (or the full fine-tune), in eval mode."""
    from vlmtune.model.checkpoint import choose_device
    from vlmtune.stages import load

    recipe = trained.recipe
    device = device or choose_device(recipe.train.device)
    model_section = recipe.model
    if trained.is_full and not base_only:
        model_section = model_section.model_copy(update={"name": str(trained.weights)})
    loaded = load.load(model_section, recipe.quantization, recipe.data.max_image_pixels, device)
    model = loaded.model
    with_adapter = not (base_only or trained.is_full)
    if with_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained.weights))
    model.eval()
    return Inference(model, loaded.processor, loaded.family, with_adapter)


# --- an export folder (`vlmtune export`), for predict and eval -----------------------------------


def is_export(path: str | Path) -> bool:
    """A folder `vlmtune export` wrote (it holds vlmtune_export.json)."""
    return (Path(path) / rundir.EXPORT_REPORT).is_file()


def load_export(path: str | Path, device: str = "cpu", dtype: str | None = None) -> Inference:
    """A merged or full export loaded as a standalone model, with the processor saved beside it.

    An adapter export needs its base: predict and eval take the run folder it came from instead.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.model.families import detect_family
    from vlmtune.model.processing import load_processor
    from vlmtune.model.vision_input import cast_pixel_values_at_the_tower

    path = Path(path)
    report = path / rundir.EXPORT_REPORT  # absent while the export itself is scored, before it is written
    facts = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    if facts.get("export") == "adapter":
        raise RunDirError(
            f"{path} is an adapter export: it holds the LoRA weights only, not a model",
            hint="pass the run folder it was exported from, or export a standalone model with --merge",
        )
    if facts.get("export") in ("gguf", "vllm"):  # after/export_gguf.py, after/export_vllm.py
        raise RunDirError(
            f"{path} is a {facts['export']} export for serving, not a transformers model",
            hint="serve it as its README.md says, or pass the run folder it was exported from",
        )
    family = detect_family(AutoConfig.from_pretrained(str(path)))
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=getattr(torch, dtype or facts.get("dtype") or "bfloat16")
    ).to(device)
    cast_pixel_values_at_the_tower(model, family)  # as the load stage does (Llama 4's tower)
    model.eval()
    return Inference(model, load_processor(path, family), family, has_adapter=False)
