"""Values a recipe may hold that are almost surely a mistake: warnings, not errors (a run may still mean them).

A learning rate of 1e9 validates (it is a positive number) and then collapses the run; `validate` and
`train` say so first.
"""

from __future__ import annotations

from vlmtune.recipe.schema import Recipe

# Learning rates outside this range are far outside any sensible one for fine-tuning a VLM (LoRA
# 1e-5 to 1e-3, full 1e-6 to 1e-4; the tiny demo model, trained from random weights, 5e-3).
LR_SENSIBLE = (1e-8, 5e-2)


def recipe_warnings(recipe: Recipe) -> list[str]:
    """One line per suspicious value, naming its key and the usual range."""
    found = []
    low, high = LR_SENSIBLE
    for key in ("lr", "lr_vision", "lr_projector", "lr_language"):  # the per-component rates too
        lr = getattr(recipe.train, key)
        if lr is not None and not low <= lr <= high:
            direction = "above" if lr > high else "below"
            found.append(
                f"train.{key} {lr:g} is far {direction} any sensible learning rate (LoRA 1e-5 to 1e-3, full "
                "fine-tuning 1e-6 to 1e-4): "
                + ("the run will diverge or collapse" if lr > high else "the weights will barely move")
            )
    return found
