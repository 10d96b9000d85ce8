"""docs/recipe-reference.md, generated from the schema so it cannot go stale (a test checks)."""

from __future__ import annotations

import json
import typing

from pydantic_core import PydanticUndefined

from vlmtune.recipe import Recipe, section_types

HEADER = """# Recipe reference

Generated from `vlmtune/recipe.py` by `make docs`; do not edit by hand. Every key below may be
set in a recipe or overridden with `--set section.key=value`. Unknown keys are errors.
`vlmtune schema` prints the same as JSON schema for editors.
"""


def _type_name(annotation: typing.Any) -> str:
    text = str(annotation).replace("typing.", "")
    for prefix in ("<class '", "'>"):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "None")


def _default(field: typing.Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{json.dumps(value)}`"


def recipe_reference() -> str:
    lines = [HEADER]
    for section_name, section_field in Recipe.model_fields.items():
        section = section_types()[section_name]
        lines.append(f"\n## `{section_name}`\n")
        if section_field.default is None:  # an objective's section
            lines.append(f"{section_field.description}\n")
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in section.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|")
            type_name = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{section_name}.{name}` | `{type_name}` | {_default(field)} | {meaning} |")
    return "\n".join(lines) + "\n"
