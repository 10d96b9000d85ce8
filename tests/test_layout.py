"""The folder tree is the architecture: packages in layers, no import reaching up, one sentence per package.

A module may import its own package, the shared leaves and any package in a lower layer; never one
above it (lazy imports inside functions count too; imports only for type checkers do not).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vlmtune"

# Bottom to top. The shared leaves import nothing of vlmtune's.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "choices", "constants", "units", "paths", "scoring", "redact"),
    ("model",),
    ("kernels",),
    ("recipe",),
    ("runs",),
    ("distributed",),
    ("data",),
    ("observe",),
    ("training",),
    ("memory",),
    ("stages",),
    ("after",),
    ("pipeline", "commands", "cli", "__main__", "__init__"),
)
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def top_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_tops(tree: ast.AST) -> set[str]:
    """The vlmtune packages/modules a module imports at run time (TYPE_CHECKING blocks left out)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        ):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "vlmtune":
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vlmtune" and len(parts) > 1:
                    found.add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_imports_a_package_above_its_own(path):
    own = top_name(path)
    assert own in LAYER, (
        f"{own} is in no layer: add it to tests/test_layout.py's LAYERS (and docs/architecture.md)"
    )
    upward = sorted(
        t for t in imported_tops(ast.parse(path.read_text(encoding="utf-8"))) if LAYER[t] > LAYER[own]
    )
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports {upward}, which sit above it"


def test_the_top_level_holds_only_entry_points_and_shared_leaves():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert loose == sorted(
        ["__main__", "cli", "pipeline", "choices", "constants", "errors", "paths", "redact", "units"]
    )


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc, f"vlmtune/{package}/__init__.py has no docstring saying what the package owns"


def test_the_layer_check_catches_an_upward_import():
    tree = ast.parse("def f():\n    from vlmtune.stages import sft\n")
    assert imported_tops(tree) == {"stages"} and LAYER["stages"] > LAYER["data"]
    typing_only = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlmtune.stages import sft\n"
    )
    assert imported_tops(typing_only) == set()
