"""docs/recipe-reference.md, generated from the schema so it cannot go stale (a test checks)."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlmtune.recipe import Recipe

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
        lines += _section_table(section_name, section_field.annotation)
    return "\n".join(lines) + "\n"


def _section_table(dotted: str, section: type[BaseModel]) -> list[str]:
    """One table per section; a nested section (train.distributed) gets its own table after its parent's."""
    lines = [f"\n## `{dotted}`\n", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in section.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        if _is_section(field.annotation):
            lines.append(f"| `{dotted}.{name}` | section | see below | {meaning} |")
            nested.append((f"{dotted}.{name}", field.annotation))
            continue
        type_name = _type_name(field.annotation).replace("|", "\\|")
        lines.append(f"| `{dotted}.{name}` | `{type_name}` | {_default(field)} | {meaning} |")
    for name, annotation in nested:
        lines += _section_table(name, annotation)
    return lines


def _is_section(annotation: typing.Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
