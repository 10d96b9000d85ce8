"""Where a model's config comes from: bundled with vlmtune (popular checkpoints, offline), a local
folder, tiny:FAMILY, or (last) the hub."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError


def bundled_configs() -> dict[str, str]:
    """hub id -> file name of the configs shipped in vlmtune/model/configs/."""
    folder = resources.files("vlmtune.model") / "configs"
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            out[entry.name.removesuffix(".json").replace("--", "/", 1)] = entry.name
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def read_bundled(hub_id: str) -> dict | None:
    by_lower = {k.lower(): v for k, v in bundled_configs().items()}
    file_name = by_lower.get(hub_id.lower())
    if file_name is None:
        return None
    text = (resources.files("vlmtune.model") / "configs" / file_name).read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class ModelConfig:
    config: Any  # a transformers PretrainedConfig
    source: str  # where it came from, for the report
    folder: str | None = None  # the local checkpoint folder, when there is one


def resolve_config(name: str, revision: str | None = None) -> ModelConfig:
    """The config of a bundled hub id, a local folder, tiny:FAMILY, or (last) a hub id."""
    from transformers import AutoConfig

    from vlmtune.model.checkpoint import read_config, resolve_model_path
    from vlmtune.paths import TINY_PREFIX, written_as_path

    bundled = read_bundled(name) if not name.startswith(TINY_PREFIX) else None
    if bundled is not None:
        return ModelConfig(
            AutoConfig.for_model(**bundled), f"bundled config of {bundled.get('_name_or_path', name)}"
        )
    path = resolve_model_path(name)
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelConfig(read_config(str(local), revision), f"{local}/config.json", str(local))
    if written_as_path(name) or local.exists():
        raise ModelError(
            f"model {name!r} is not a folder with a config.json",
            hint="give a checkpoint folder, a hub id, or one of the bundled configs (vlmtune estimate-memory "
            "--list-models)",
        )
    try:
        return ModelConfig(read_config(path, revision), f"hub config of {name}")
    except ModelError as exc:
        close = _close_ids(name)
        raise ModelError(
            f"no config for model {name!r}: not bundled, not a local folder, and the hub did not answer "
            f"({exc.message})",
            hint=(f"did you mean {' or '.join(close)}? " if close else "")
            + "bundled configs work offline (--list-models); a local folder needs its config.json",
        ) from None


def _close_ids(name: str) -> list[str]:
    import difflib

    ids = list(bundled_configs())
    by_lower = {i.lower(): i for i in ids}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.6)
    return [by_lower[c] for c in close]
