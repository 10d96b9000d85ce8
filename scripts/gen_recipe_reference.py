#!/usr/bin/env python3
"""Regenerate docs/recipe-reference.md from the recipe schema."""

from pathlib import Path

from vlmtune.recipe.reference import recipe_reference

target = Path(__file__).resolve().parent.parent / "docs" / "recipe-reference.md"
target.write_text(recipe_reference(), encoding="utf-8")
print(f"wrote {target}")
