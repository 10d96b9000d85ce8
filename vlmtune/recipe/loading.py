"""Reading a recipe: the YAML read safely, --set overrides applied, validated, paths made absolute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vlmtune.errors import RecipeError
from vlmtune.paths import TINY_PREFIX, written_as_path
from vlmtune.recipe import safe_yaml
from vlmtune.recipe.messages import describe_error
from vlmtune.recipe.objectives import FunctionReward
from vlmtune.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", hint="pass the path of a .yaml recipe (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            hint="save the recipe as UTF-8 (a binary or damaged file cannot be a recipe)",
        ) from None
    return parse_recipe(text, source=str(path), base_dir=path.resolve().parent, overrides=overrides)


def parse_recipe(
    text: str, *, source: str = "<recipe>", base_dir: Path | None = None, overrides: list[str] | None = None
) -> Recipe:
    document = safe_yaml.load(text, source)
    raw = {} if document.data is None else document.data
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a mapping of sections (model:, data:, ...)")
    overridden = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_error(err, document.lines, overridden) for err in exc.errors()]
        raise RecipeError(
            f"{source} has {len(problems)} problem{'s' * (len(problems) > 1)}:",
            problems,
            hint="the recipe reference is docs/recipe-reference.md; `vlmtune schema` gives editors the schema",
        ) from None
    return _resolve_paths(recipe, base_dir) if base_dir else recipe


def apply_overrides(raw: dict, overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply ``a.b=value`` overrides in place; values are parsed as YAML (so 4, true, null work), and a
    mapping merges into the mapping it lands on."""
    touched = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"bad override {item!r}", hint="write --set section.key=value, e.g. --set lora.r=32"
            )
        keys = tuple(key.strip().split("."))
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"bad override {item!r}: {k} is not a section")
        try:
            parsed = safe_yaml.load_value(value, "the value") if value.strip() else None
        except RecipeError as exc:
            quoting = f"--set '{key.strip()}=\"{value}\"'"
            raise RecipeError(
                f"bad override {item!r}: {exc.message}",
                exc.problems,
                hint=f"{exc.hint}: {quoting}"
                if exc.problems
                else f"quote a value that starts with [, {{, *, & or !: {quoting}",
            ) from None
        node[keys[-1]] = merged(node.get(keys[-1]), parsed)
        touched.add(keys)
    return touched


def merged(current: Any, value: Any) -> Any:
    """An override's value over what the recipe has: a mapping onto a mapping sets only its own keys
    (``--set 'train={max_steps: 2}'`` keeps the section's other keys), anything else replaces."""
    if isinstance(current, dict) and isinstance(value, dict):
        return {**current, **{key: merged(current.get(key), item) for key, item in value.items()}}
    return value


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Paths in a recipe are relative to its folder; make them absolute so later stages need no base."""

    def local(value: str | None, *, must_look_local: bool) -> str | None:
        if value is None or value.startswith(TINY_PREFIX):
            return value
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        if candidate.exists() or (must_look_local and written_as_path(value)):
            return str(candidate.resolve())
        return value  # a hub id

    data = recipe.data.model_copy(
        update={
            "train": local(recipe.data.train, must_look_local=True),
            "eval": local(recipe.data.eval, must_look_local=True),
            "image_root": local(recipe.data.image_root, must_look_local=True),
        }
    )
    model = recipe.model.model_copy(
        update={
            "name": local(recipe.model.name, must_look_local=True),
            "adapter": local(recipe.model.adapter, must_look_local=True),
        }
    )
    grpo = recipe.grpo and recipe.grpo.model_copy(
        update={"rewards": [_beside(reward, base_dir) for reward in recipe.grpo.rewards]}
    )
    out_dir = Path(recipe.output.dir).expanduser()
    output = recipe.output.model_copy(
        update={"dir": str(out_dir if out_dir.is_absolute() else (base_dir / out_dir).resolve())}
    )
    train = recipe.train.model_copy(
        update={"metric_function": function_beside(recipe.train.metric_function, base_dir)}
    )
    return recipe.model_copy(
        update={"data": data, "model": model, "output": output, "grpo": grpo, "train": train}
    )


def _beside(reward: Any, base_dir: Path) -> Any:
    """A function reward whose module is a file beside the recipe, named by its absolute path."""
    if not isinstance(reward, FunctionReward):
        return reward
    return reward.model_copy(update={"function": function_beside(reward.function, base_dir)})


def function_beside(spec: str | None, base_dir: Path) -> str | None:
    """module:function whose module is a file beside the recipe -> /absolute/path.py:function; else as given."""
    if spec is None:
        return None
    module, function = spec.rsplit(":", 1)
    relative = Path(module) if module.endswith(".py") else Path(*module.split(".")).with_suffix(".py")
    candidate = relative.expanduser() if relative.expanduser().is_absolute() else base_dir / relative
    if not candidate.is_file():
        return spec  # an importable module (or a missing file, reported when the run starts)
    return f"{candidate.resolve()}:{function}"
