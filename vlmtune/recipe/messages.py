"""pydantic's validation errors as a user reads them: the key path, its YAML line (or --set), and a
did-you-mean for an unknown key (a close name, the section it belongs in, or our name for a peer's key)."""

from __future__ import annotations

import difflib
from typing import Any

from vlmtune.recipe.schema import Recipe, section_types


def describe_error(err: dict, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "recipe"
    if loc in overridden:
        where = " (from --set)"
    elif loc in lines:
        where = f" (line {lines[loc]})"
    elif loc[:-1] in lines:
        where = f" (in the section at line {lines[loc[:-1]]})"
    else:
        where = ""
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(loc, err.get("input"))
    elif err["type"] == "missing":
        message = "required, but missing"
    elif "input" in err and err["type"] not in ("value_error", "model_type"):
        message = f"{message} (got {err['input']!r})"
    return f"{dotted}{where}: {message}"


# Names users bring from TRL, Axolotl, Unsloth and LLaMA-Factory configs -> ours.
ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_seq_length": "train.max_length",
    "sequence_len": "train.max_length",
    "cutoff_len": "train.max_length",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "quantization.bits",
    "load_in_8bit": "quantization.bits",
    "output_dir": "output.dir",
    "lora_target_modules": "lora.target_modules",
    "reward_funcs": "grpo.rewards",
    "reward_weights": "grpo.rewards",
}


def _suggestion(loc: tuple[str, ...], value: Any = None) -> str:
    if loc[-1] in ALIASES:
        return f"; did you mean `{ALIASES[loc[-1]]}`?"
    sections = list(Recipe.model_fields)
    if len(loc) == 1 and (prefixed := _prefixed_keys(loc[0], value)):
        return prefixed
    if len(loc) == 1:
        close = difflib.get_close_matches(loc[0], sections, n=1, cutoff=0.6)
        if close:
            return f"; did you mean `{close[0]}`?"
        owner = _section_with_field(loc[0])
        return f"; did you mean `{owner}.{loc[0]}`?" if owner else f"; sections are {', '.join(sections)}"
    if loc[0] not in sections:
        return ""
    if len(loc) > 2:  # a key of a nested section (train.distributed.*)
        return _nested_suggestion(loc)
    owner = _section_with_field(loc[1])
    if owner and owner != loc[0]:
        return f"; it belongs in the `{owner}` section"
    names = list(section_types()[loc[0]].model_fields)
    close = difflib.get_close_matches(loc[1], names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{loc[0]}.{close[0]}`?"
    return _short_key_suggestion(loc[0], loc[1], names)


def _prefixed_keys(name: str, value: Any) -> str:
    """An unknown section whose keys are fields elsewhere with its name as a prefix: the issue tracker's
    `eval: {max_samples: 50}` is `train.eval_max_samples` (one name per knob: no second spelling)."""
    if not isinstance(value, dict):
        return ""
    found = [f"`{owner}.{name}_{key}`" for key in value if (owner := _section_with_field(f"{name}_{key}"))]
    return f"; did you mean {', '.join(found)}?" if found else ""


def _short_key_suggestion(section: str, key: str, names: list[str]) -> str:
    """A key too short for a ratio (lora.r): a misspelt alias of it (rnak -> rank -> lora.r), or a key
    that starts with it (rr -> r)."""
    aliases = {alias: target for alias, target in ALIASES.items() if target.startswith(f"{section}.")}
    close = difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.7)
    if close:
        return f"; did you mean `{aliases[close[0]]}`?"
    short = [name for name in names if len(name) <= 2 and key.startswith(name)]
    return f"; did you mean `{section}.{short[0]}`?" if short else ""


def _nested_suggestion(loc: tuple[str, ...]) -> str:
    model: Any = Recipe
    for key in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return ""
        model = field.annotation
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f"; did you mean `{'.'.join(loc[:-1])}.{close[0]}`?" if close else ""


def _section_with_field(name: str) -> str | None:
    for section, model in section_types().items():
        if name in model.model_fields:
            return section
    return None
