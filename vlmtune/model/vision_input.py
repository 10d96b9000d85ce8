"""pixel_values in the vision tower's dtype, for towers that take them as they come (Family.cast_pixel_values).

Llama 4's vision tower feeds pixel_values straight into a Linear: transformers' processor gives bfloat16,
which fails against a float32 tower, and vlmtune's PIL processor gives float32, which fails against a
bfloat16 tower outside autocast (generation, evaluation). A pre-hook on the tower casts them to its weights'
dtype, so neither depends on the processor.
"""

from __future__ import annotations

from typing import Any

from vlmtune.model.families import Family


def cast_pixel_values_at_the_tower(model: Any, family: Family) -> None:
    """Register the cast on the family's vision tower, where its record asks for it (idempotent per model)."""
    if not family.cast_pixel_values:
        return
    tower = model.get_submodule(family.vision_prefix)
    if getattr(tower, "_vlmtune_casts_pixels", False):
        return
    dtype = next(p.dtype for p in tower.parameters() if p.is_floating_point())

    def cast(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and args[0] is not None and args[0].is_floating_point():
            args = (args[0].to(dtype), *args[1:])
        if kwargs.get("pixel_values") is not None and kwargs["pixel_values"].is_floating_point():
            kwargs = {**kwargs, "pixel_values": kwargs["pixel_values"].to(dtype)}
        return args, kwargs

    tower.register_forward_pre_hook(cast, with_kwargs=True)
    tower._vlmtune_casts_pixels = True
