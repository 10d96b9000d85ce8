"""Text-only batches under FSDP: the vision tower still runs, on a blank image at zero weight.

DDP handles them with unused-parameter detection (vlmtune.distributed.trainer_arguments); FSDP
has no such thing. docs/distributed.md has the measurements behind both choices.
"""

from __future__ import annotations

from typing import Any

from vlmtune.distributed import ranks, strategy_of
from vlmtune.errors import ModelError
from vlmtune.model.families import Family
from vlmtune.recipe import DistributedSection


class TextOnlyGuard:
    """Runs the vision tower on a blank image in a text-only batch while another rank has an image.

    FSDP gathers each block's parameters in a collective as the block runs, so every rank must run
    the same blocks in the same order. A rank whose batch is text-only would skip the vision
    blocks while its peers gather theirs: measured on CPU, gloo aborts ("Received data size
    doesn't match expected size ... collective mismatch"). The guard runs the vision tower on a
    blank image where an image batch runs it (after the token embeddings, before the language
    model's blocks) and adds its output times zero to the embeddings: the same collectives in the
    same order, the same loss, zero gradients for the vision weights.
    """

    def __init__(self, model: Any, family: Family, processor: Any):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family = family
        # the transformers *Model that owns get_image_features (Llama 4 has no `model` wrapper: the top module)
        self.vision_model = getattr(core, "model", core)
        self.text_only = False  # set for each forward of the vision model, cleared once handled
        vision = core.get_submodule(family.vision_prefix)
        weight = next(p for p in vision.parameters() if p.is_floating_point())
        self.device, self.vision_dtype = weight.device, weight.dtype
        self.inputs = self._blank_image_inputs(processor) if self.supported else None
        language_model = core.get_submodule(family.language_prefix)
        self.vision_model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True)

    @property
    def supported(self) -> bool:
        """Can the vision tower run alone? Mllama feeds it to cross-attention layers instead."""
        return callable(getattr(self.vision_model, "get_image_features", None))

    def _blank_image_inputs(self, processor: Any) -> dict:
        import inspect

        from PIL import Image

        accepted = inspect.signature(self.vision_model.get_image_features).parameters
        features = processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        inputs = {}
        for key, value in features.items():
            if key in accepted and hasattr(value, "to"):
                dtype = self.vision_dtype if value.is_floating_point() else None
                inputs[key] = value.to(device=self.device, dtype=dtype)
        return inputs

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Does this rank need the blank image: no image here, but one on some other rank?

        When no rank has an image, none runs the tower: its weights then get no gradient at all
        and AdamW leaves them alone, as on one GPU (a zero gradient would still move them by
        momentum).
        """
        has_image = kwargs.get("pixel_values") is not None
        self.text_only = self.some_rank_has_an_image(has_image) and not has_image

    def some_rank_has_an_image(self, has_image: bool) -> bool:
        """One small all-reduce per forward, in the same place on every rank."""
        import torch
        import torch.distributed as dist

        anyone = torch.tensor([int(has_image)], device=self.device)
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
        return bool(anyone.item())

    def _before_language_model(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Where an image batch has just run the vision tower: after the embeddings, before the blocks."""
        if not self.text_only:
            return None
        self.text_only = False
        if not self.supported:
            raise ModelError(
                f"a batch without an image under FSDP: {self.family.title}'s vision tower cannot run alone, so this "
                "rank would skip collectives its peers wait in",
                hint="use train.distributed.strategy: ddp, or train on samples that all have images",
            )
        features = self.vision_model.get_image_features(**self.inputs)
        zero = sum(t.float().sum() for t in _tensors(features)) * 0.0
        embeds = kwargs["inputs_embeds"]
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}


def _tensors(output: Any) -> list:
    """Every floating tensor in a model output (ModelOutput, tuple, list, nested)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return []


def guard_text_only_batches(model: Any, family: Family, processor: Any, section: DistributedSection) -> None:
    """Install the TextOnlyGuard where the launch needs it: several ranks under FSDP."""
    if strategy_of(section, ranks()) == "fsdp":
        TextOnlyGuard(model, family, processor)
