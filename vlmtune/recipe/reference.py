"""docs/recipe-reference.md, generated from the schema so it cannot go stale (a test checks)."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlmtune.recipe import REWARD_KINDS, Recipe, section_types

# List fields whose items are sections of several kinds, each told apart by its `type`.
KINDS = {("grpo", "rewards"): REWARD_KINDS}

HEADER = """# Recipe reference

Generated from `vlmtune/recipe/` by `make docs`; do not edit by hand. Every key below may be
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
        lines += _table(section_name, section)
        for (owner, field_name), kinds in KINDS.items():
            if owner == section_name:
                lines += _kinds(f"{section_name}.{field_name}", kinds)
        lines += _subsections(section_name, section)
    return "\n".join(lines) + "\n"


def _subsections(prefix: str, model: typing.Any) -> list[str]:
    """A section inside a section (train.distributed) gets its own table after its parent's."""
    lines = []
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            lines += [f"\n## `{prefix}.{name}`\n", *_table(f"{prefix}.{name}", field.annotation)]
            lines += _subsections(f"{prefix}.{name}", field.annotation)
    return lines


def _is_section(annotation: typing.Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _table(prefix: str, model: typing.Any, skip: tuple[str, ...] = ()) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        meaning = (field.description or "").replace("|", "\\|")
        if _is_section(field.annotation):
            lines.append(f"| `{prefix}.{name}` | section | see below | {meaning} |")
            continue
        nested = any(key == (prefix, name) for key in KINDS)
        type_name = "list of the kinds below" if nested else _type_name(field.annotation).replace("|", "\\|")
        lines.append(f"| `{prefix}.{name}` | `{type_name}` | {_default(field)} | {meaning} |")
    return lines


def _kinds(prefix: str, kinds: tuple) -> list[str]:
    """One table per kind of a list's items, under the `type` that selects it."""
    lines = []
    for kind in kinds:
        word = typing.get_args(kind.model_fields["type"].annotation)[0]
        lines += [f"\n### `{prefix}`: `type: {word}`\n", f"{kind.__doc__.strip()}\n"]
        lines += _table(f"{prefix}[]", kind, skip=("type",))
    return lines
