"""A finished run's model for inference, and greedy answers from it.

The base is loaded exactly as it was trained (same quantization and dtype, from resolved.yaml) and
the run's adapter is attached on top; a full fine-tune loads its saved model instead. Every
post-training command (predict, eval, export) starts from ``open_trained_run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune import rundir as files
from vlmtune.errors import DataError, RunDirError
from vlmtune.recipe import Recipe
from vlmtune.rundir import RunDir


@dataclass(frozen=True)
class TrainedRun:
    run: RunDir
    recipe: Recipe
    weights: Path  # 3-train/adapter, or 3-train/model for a full fine-tune

    @property
    def is_full(self) -> bool:
        return self.recipe.lora.method == "full"


@dataclass
class Inference:
    model: Any  # a PeftModel when an adapter is attached
    processor: Any
    family: Any
    has_adapter: bool


def open_trained_run(path: str | Path) -> TrainedRun:
    """A run folder whose training finished, with its resolved recipe and final weights."""
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
    recipe = load_recipe(run / files.RESOLVED)
    weights = run / (files.FULL_MODEL if recipe.lora.method == "full" else files.ADAPTER)
    if not weights.is_dir():
        raise RunDirError(
            f"run {path} says it finished but {weights} is missing",
            hint="the run folder was changed after training; train again or restore the folder",
        )
    return TrainedRun(run, recipe, weights)


def training_finished(summary: dict) -> bool:
    """Done, or failed only in the optional eval stage after the final weights were saved."""
    if summary.get("status") == "done":
        return True
    stages = summary.get("stages", {})
    return (
        stages.get("train", {}).get("status") == "done" and stages.get("eval", {}).get("status") == "failed"
    )


def load_for_inference(trained: TrainedRun, base_only: bool = False, device: str | None = None) -> Inference:
    """The base as trained plus the run's adapter (or the full fine-tune), in eval mode."""
    from vlmtune.stages import load

    recipe = trained.recipe
    device = device or load.choose_device(recipe.train.device)
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


# --- prompts and answers ----------------------------------------------------------------------


def user_turn(prompt: str, n_images: int) -> list[dict]:
    """One user message: the images first, then the question (the layout the demo data uses)."""
    return [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": prompt}],
        }
    ]


def open_images(paths: list[str | Path]) -> list[Any]:
    """Decoded RGB images, or a DataError naming the file that does not open."""
    from vlmtune.data import open_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"image not found: {path}", hint="pass the path of a PNG, JPEG or WebP file")
        try:
            images.append(open_image(str(path)))
        except Exception as exc:  # PIL raises many types for broken files
            raise DataError(
                f"cannot open image {path}: {exc}",
                hint="pass a readable PNG, JPEG or WebP file (`python -m PIL.Image` can tell what it is)",
            ) from None
    return images


def generate_answer(
    model: Any, processor: Any, messages: list[dict], images: list[Any], max_new_tokens: int
) -> str:
    """Greedy continuation of ``messages`` (rendered with the generation prompt), special tokens removed."""
    import torch

    from vlmtune.collator import template_special_tokens

    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The same tokenization as training: no second BOS after a template that writes one.
    kwargs: dict[str, Any] = {
        "text": [prompt],
        "return_tensors": "pt",
        **template_special_tokens(processor.tokenizer, [prompt]),
    }
    if images:
        kwargs["images"] = [images]
    inputs = processor(**kwargs).to(model.device)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
