"""Reading a recipe's YAML with limits: size, alias expansion, and no key given twice.

PyYAML's safe loader refuses tags and code, but not a 512-byte "billion laughs" document whose
aliases expand to billions of values once anything walks the result (validation does), nor a key
or a whole section written twice, of which it silently keeps the last. Here the document is
composed into nodes first (aliases stay shared, so that is cheap), checked, and only then built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from vlmtune.errors import RecipeError

MAX_BYTES = 1 << 20  # a recipe is a page of text; 1 MiB is far beyond any real one
MAX_VALUES = 100_000  # values (scalars, lists, mappings) after every alias is expanded
MERGE_TAG = "tag:yaml.org,2002:merge"
INT_TAG, FLOAT_TAG, BINARY_TAG = (
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:binary",
)


@dataclass(frozen=True)
class Document:
    data: Any
    lines: dict[tuple[str, ...], int]  # key path -> its 1-based line


def load(text: str, source: str) -> Document:
    """The YAML document in ``text``, checked; a RecipeError naming the problem (and lines) otherwise."""
    size = len(text.encode("utf-8"))
    if size > MAX_BYTES:
        raise RecipeError(
            f"{source} is {size:,} bytes; a recipe is at most {MAX_BYTES:,}",
            hint="a recipe holds settings; data goes in the files that data.train names",
        )
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return Document({}, {})
        _check_expansion(root, source)
        surprises = _yaml11_surprises(root)
        if surprises:
            raise RecipeError(
                f"{source} holds value(s) YAML 1.1 would read as something other than what they look like:",
                surprises,
                hint="quote a value meant as text ('1:30'); write numbers as plain decimals (lr: 0.0002, "
                "max_steps: 90)",
            )
        duplicates = _duplicate_keys(root)
        if duplicates:
            raise RecipeError(
                f"{source} gives {len(duplicates)} key{'s' * (len(duplicates) > 1)} twice; YAML would keep only "
                "the last (a section given twice loses every key of the first):",
                duplicates,
                hint="merge them into one",
            )
        return Document(loader.construct_document(root), _key_lines(root))
    except RecursionError:
        raise RecipeError(
            f"{source} nests too deeply to be a recipe", hint="a recipe is a few levels deep"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(
            f"{source} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
        ) from None
    finally:
        loader.dispose()


def load_value(text: str, source: str) -> Any:
    """One value (a --set right-hand side), with the same limits."""
    return load(text, source).data


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the values the document expands to, each shared node once per use, without expanding it."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise RecipeError(
                f"{source} has an alias that contains itself", hint="remove the recursive alias"
            )
        in_progress.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        in_progress.discard(key)
        sizes[key] = min(total, MAX_VALUES + 1)  # saturate: the count only has to cross the limit
        return sizes[key]

    if size(root) > MAX_VALUES:
        raise RecipeError(
            f"{source} expands to more than {MAX_VALUES:,} values through its aliases (*name); "
            "it is refused before it is built",
            hint="write the recipe without nested aliases",
        )


def _yaml11_surprises(root: yaml.Node) -> list[str]:
    """Scalars YAML 1.1 turns into something a reader would not expect: base-60 numbers (``lr: 1:30``
    reads as 90, ``1:30.5`` as 90.5) and ``!!binary`` data (bytes in a settings file)."""
    problems: list[str] = []
    seen: set[int] = set()

    def where(path: tuple[str, ...], node: yaml.Node) -> str:
        return f"{'.'.join(path) or 'the document'} at line {node.start_mark.line + 1}"

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag in (INT_TAG, FLOAT_TAG) and ":" in str(node.value):
                problems.append(
                    f"{where(path, node)}: {node.value} is a YAML 1.1 base-60 number (it would read as "
                    f"{yaml.safe_load(node.value)}), not text"
                )
            elif node.tag == BINARY_TAG:
                problems.append(f"{where(path, node)}: !!binary data; a recipe holds settings, not bytes")
        elif isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                walk(key_node, path)
                walk(value_node, (*path, str(key_node.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    walk(root, ())
    return problems


def _duplicate_keys(root: yaml.Node) -> list[str]:
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    dotted = ".".join((*path, key))
                    problems.append(f"{dotted} at line {first_line[key]} and again at line {line}")
                else:
                    first_line[key] = line
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, path)

    walk(root, ())
    return problems


def _key_lines(root: yaml.Node) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in seen:
            return
        seen.add(id(node))
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            lines.setdefault(key_path, key_node.start_mark.line + 1)
            walk(value_node, key_path)

    walk(root, ())
    return lines
