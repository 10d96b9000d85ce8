"""A recipe -> the memory model's inputs: its model's shape, how it trains, and its workload.

Reads only the model's config (never its weights). LoRA targets come from the same pure
selection the lora stage uses (vlmtune.model.lora_targets), image tokens from the family's own
arithmetic (vlmtune.model.image_tokens).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmtune.distributed import FSDP_OBJECTIVES
from vlmtune.errors import ModelError, VlmtuneError
from vlmtune.memory.configs import resolve_config
from vlmtune.memory.estimate import estimate
from vlmtune.memory.parallel import data_parallel, fully_sharded
from vlmtune.memory.records import MemoryEstimate, TrainingMethod, Workload
from vlmtune.memory.shape import ModelShape, describe_model
from vlmtune.model.families import Family
from vlmtune.model.image_tokens import (
    ImageSettings,
    default_image_size,
    first_int,
    image_patches,
    image_settings_from_config,
)
from vlmtune.model.lora_targets import present_projectors, select_expert_parameters, select_targets
from vlmtune.recipe import DataSection, LoraSection, ModelSection, QuantizationSection, Recipe, TrainSection


def image_settings_for(
    path: str | None, family: Family, config: Any, max_image_pixels: int | None
) -> tuple[ImageSettings, str | None]:
    """The family's own settings from the checkpoint's processor where its files are at hand (a
    local folder, a tiny model), with the pixel budget applied as training applies it; otherwise
    read from the config. Returns a note when the processor could not be used."""
    # transformers 5 saves the image processor inside processor_config.json (Gemma 4's tiny model)
    if path and any(
        (Path(path) / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")
    ):
        from vlmtune.model.processing import load_processor

        try:
            processor = load_processor(path, family, max_image_pixels)
            return family.image_settings(processor), None
        except (VlmtuneError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
            note = f"image tokens from the config: the processor did not load ({str(exc).splitlines()[0]})"
            return _from_config(family, config, max_image_pixels), note
    return _from_config(family, config, max_image_pixels), None


def _from_config(family: Family, config: Any, max_image_pixels: int | None) -> ImageSettings:
    """The family's own reading of a config where it has one, else the generic keys."""
    read = family.config_image_settings or image_settings_from_config
    return read(config.to_dict(), max_image_pixels)


def image_tokens(family: Family, width: int, height: int, settings: ImageSettings) -> int:
    try:
        return int(family.tokens_per_image(width, height, settings))
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise ModelError(
            f"cannot count the image tokens of a {width}x{height} image for {family.title}: {exc}",
            hint="give the count directly with --image-tokens N",
        ) from None


def training_method(
    model: ModelSection, quant: QuantizationSection, lora: LoraSection, train: TrainSection,
    shape: ModelShape, family: Family,
) -> TrainingMethod:  # fmt: skip
    """The recipe's choices, with LoRA targets selected exactly as the lora stage selects them."""
    targets: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    if lora.method != "full":  # lora or dora: the same targets
        experts = select_expert_parameters(family, lora, (p.name for p in shape.params))
        targets = select_targets(family, lora, (lin.name for lin in shape.linears), experts)
        if lora.train_projector:
            projector = present_projectors(family, {p.name.rsplit(".", 1)[0] for p in shape.params})
    return TrainingMethod(
        dtype=model.dtype,
        bits=quant.bits,
        double_quant=quant.double_quant,
        keep_16bit=(*family.keep_16bit(), *quant.keep_16bit),
        method="full" if lora.method == "full" else "lora",
        dora=lora.method == "dora",
        init=lora.init,
        targets=targets,
        expert_targets=experts,
        r=lora.r,
        dropout=lora.dropout,
        bias=lora.bias,
        projector=projector,
        optim=train.optim,
        gradient_checkpointing=train.gradient_checkpointing,
        supervised_loss=train.supervised_loss,
        objective=train.objective,
        continues_adapter=model.adapter is not None,
    )


def workload_for(
    config: Any,
    family: Family,
    data: DataSection,
    train: TrainSection,
    *,
    seq_len: int | None = None,
    images_per_sample: int = 1,
    image_size: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
    folder: str | None = None,
) -> tuple[Workload, list[str]]:
    """Batch and tokens: the recipe's worst case (max_length, the pixel budget) unless given.

    ``seq_len`` counts text tokens; without it the text fills ``train.max_length`` minus the
    image tokens. ``folder``: a local checkpoint whose processor files give the exact settings.
    """
    settings, note = image_settings_for(folder, family, config, data.max_image_pixels)
    notes = [note] if note else []
    width, height = image_size or default_image_size(data.max_image_pixels)
    if images_per_sample == 0:
        tokens = 0
    elif tokens_per_image is not None:
        tokens = tokens_per_image
    else:
        tokens = image_tokens(family, width, height, settings)
    text = seq_len
    if text is None:
        text = train.max_length - images_per_sample * tokens
        if text < 0:
            notes.append(
                f"{images_per_sample} image(s) of {tokens} tokens exceed train.max_length "
                f"{train.max_length}: such samples would be refused; estimated with no text"
            )
            text = 0
    work = Workload(
        batch_size=train.batch_size,
        text_tokens=text,
        images_per_sample=images_per_sample,
        image_tokens=tokens,
        image_patches=image_patches(tokens, settings, _cross_attention_tiles(config)) if tokens else 0,
        image_size=(width, height) if images_per_sample else None,
    )
    if train.packing:
        work, note = packed_workload(work, train.packing_budget)
        notes.append(note)
    return work, notes


def packed_workload(work: Workload, budget: int) -> tuple[Workload, str]:
    """train.packing: a device batch is one row of up to ``budget`` tokens, sized here as whole samples of
    this shape filling the row (each one's text stretched so that the row holds ``budget`` tokens)."""
    samples = max(1, budget // max(work.sequence, 1))
    text = work.text_tokens + max(0, budget - samples * work.sequence) // samples
    packed = replace(work, batch_size=samples, text_tokens=text)
    return packed, (
        f"train.packing: one row of up to {budget:,} tokens a device batch, estimated as {samples} sample(s) "
        f"of {packed.sequence:,} tokens"
    )


def _cross_attention_tiles(config: Any) -> int | None:
    """Tiles a cross-attention tower always sees (Mllama's max_num_tiles); None for the others."""
    return first_int((config.to_dict().get("vision_config") or {}).get("max_num_tiles"))


def estimate_recipe(
    recipe: Recipe,
    *,
    gpus: int = 1,
    gpu_bytes: int | None = None,
    seq_len: int | None = None,
    images_per_sample: int = 1,
    image_size: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
) -> MemoryEstimate:
    """The memory a recipe's training step needs; reads only the model's config, never its weights.

    ``gpus`` > 1 adds the per-GPU peak under DDP and under FSDP (vlmtune.memory.parallel).
    """
    from vlmtune.model.families import detect_family

    resolved = resolve_config(recipe.model.name, recipe.model.revision)
    family = detect_family(resolved.config)
    shape = describe_model(resolved.config)
    training = training_method(recipe.model, recipe.quantization, recipe.lora, recipe.train, shape, family)
    work, notes = workload_for(
        resolved.config, family, recipe.data, recipe.train, seq_len=seq_len, images_per_sample=images_per_sample,
        image_size=image_size, tokens_per_image=tokens_per_image, folder=resolved.folder,
    )  # fmt: skip
    training, work = with_objective(recipe, training, work)
    result = estimate(
        shape,
        training,
        work,
        name=recipe.model.name,
        source=resolved.source,
        gpu_bytes=gpu_bytes,
        notes=notes,
    )
    if gpus == 1:
        return result
    if recipe.train.objective not in FSDP_OBJECTIVES:  # vlmtune refuses FSDP for it: DDP's figure only
        note = f"per GPU: DDP only; train.objective {recipe.train.objective} is not run under FSDP"
        return replace(
            result, gpus=gpus, per_gpu=(data_parallel(result.terms, gpus),), notes=(*result.notes, note)
        )
    per_gpu = (
        data_parallel(result.terms, gpus),
        fully_sharded(shape, training, result.terms, gpus, family.block_lists),
    )
    return replace(result, gpus=gpus, per_gpu=per_gpu)


def with_objective(
    recipe: Recipe, training: TrainingMethod, work: Workload
) -> tuple[TrainingMethod, Workload]:
    """The chosen objective's own memory: grpo samples a whole optimizer step's completions at once,
    and holds a frozen reference only with its KL penalty (beta > 0)."""
    grpo = recipe.grpo if recipe.train.objective == "grpo" else None
    if grpo is None:
        return training, work
    training = replace(training, reference=grpo.beta > 0)
    work = replace(
        work, steps_per_generation=recipe.train.grad_accum, completion_tokens=grpo.max_completion_length
    )
    return training, work
