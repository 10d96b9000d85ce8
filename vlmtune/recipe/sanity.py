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
    lr = recipe.train.lr
    low, high = LR_SENSIBLE
    if not low <= lr <= high:
        direction = "above" if lr > high else "below"
        found.append(
            f"train.lr {lr:g} is far {direction} any sensible learning rate (LoRA 1e-5 to 1e-3, full fine-tuning "
            f"1e-6 to 1e-4): "
            + ("the run will diverge or collapse" if lr > high else "the weights will barely move")
        )
    return found
