"""`vlmtune export RUN --format vllm`: the folder vLLM serves for this family, checked, with its command.

vLLM loads LoRA only on the modules it knows for an architecture and skips the others without a
word (for a year it skipped every vision-tower LoRA: vllm #23796). So the export is chosen from the
family record and the adapter, then proved:
- ``--merge``: the merged 16-bit model (``model/``); nothing for vLLM to skip.
- the adapter alone (``adapter/``) when every trained module is one vLLM loads: the language Linears,
  plus the tower and connector where the family is on vLLM's tower-LoRA list (``vllm_tower_lora``,
  served with ``--enable-tower-connector-lora``);
- otherwise (vision LoRA on a family off that list): the vision and projector LoRA merged into a
  16-bit copy of the base (``model/``) and the language LoRA as the adapter (``adapter/``).
Every module of the shipped adapter is then checked against what vLLM loads (``unsupported_modules``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.after.export import ExportError, Probe, card_facts, check_merged, merge_probes, model_card
from vlmtune.after.export_staging import curves_lines, staged, write_card_and_report
from vlmtune.after.trained import TrainedRun
from vlmtune.model.families import Family, ends_with, get_family
from vlmtune.paths import is_hub_id
from vlmtune.runs import rundir

TOWER = ("vision", "projector")  # what vLLM calls the tower and the connector
MODEL_DIR, ADAPTER_DIR = "model", "adapter"  # inside the export folder
ADAPTER_NAME = "finetune"  # the LoRA's name in `vllm serve --lora-modules` (the request's "model")
# vLLM's --max-lora-rank accepts these values only; the adapter's r is rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.\w+)?\.weight$"
)


@dataclass(frozen=True)
class VllmPlan:
    layout: str  # merged | adapter | adapter+merged-tower
    tower_lora: bool  # serve with --enable-tower-connector-lora
    why: str


def plan(family: Family, trained_components: set[str], merge: bool) -> VllmPlan:
    """What to ship for vLLM, from the family record and the components the adapter trains (pure)."""
    if merge:
        return VllmPlan(
            "merged", False, "--merge: the LoRA merged into a 16-bit model; vLLM serves it as a base"
        )
    tower = bool(trained_components & set(TOWER))
    if not tower:
        return VllmPlan(
            "adapter", False, "the adapter trains the language model only, which vLLM loads as LoRA"
        )
    if family.vllm_tower_lora:
        return VllmPlan(
            "adapter",
            True,
            f"{family.title} is on vLLM's tower/connector-LoRA list: the vision LoRA loads with "
            "--enable-tower-connector-lora",
        )
    return VllmPlan(
        "adapter+merged-tower",
        False,
        f"vLLM loads no vision-tower LoRA for {family.title} (it would skip it without a word): the vision "
        "and projector LoRA are merged into a 16-bit copy of the base, the language LoRA stays an adapter",
    )


# --- what vLLM loads ------------------------------------------------------------------------------


def adapter_modules(weights_file: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The adapter file's LoRA modules (module name -> its keys) and its other keys (modules_to_save ...)."""
    from safetensors import safe_open

    modules: dict[str, list[str]] = {}
    others = []
    with safe_open(str(weights_file), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            match = LORA_KEY.match(key)
            if match:
                modules.setdefault(match["module"], []).append(key)
            else:
                others.append(key)
    return modules, others


def loads_as_lora(family: Family, module: str, tower_lora: bool) -> bool:
    """Does vLLM load a LoRA on ``module`` for this family (with or without tower/connector LoRA)?

    vLLM's LoRA reaches the language model's Linears (q/k/v/o, gate/up/down, fused by vLLM into its
    packed qkv_proj and gate_up_proj); the tower's and the connector's only on its tower-LoRA list.
    Never the LM head or the embeddings of these architectures, nor anything peft saved whole.
    """
    component = family.component_of(module)
    if component == "language":
        return any(ends_with(module, name) for name in (*family.language_attention, *family.language_mlp))
    if component == "vision":
        return tower_lora and any(
            ends_with(module, n) for n in (*family.vision_attention, *family.vision_mlp)
        )
    return component == "projector" and tower_lora


def unsupported_modules(family: Family, weights_file: Path, tower_lora: bool) -> list[str]:
    """The adapter's modules and keys vLLM would skip without a word (empty: it loads them all)."""
    modules, others = adapter_modules(weights_file)
    skipped = [m for m in sorted(modules) if not loads_as_lora(family, m, tower_lora)]
    return skipped + sorted(others)


def check_vllm_modules(family: Family, weights_file: Path, tower_lora: bool) -> dict:
    skipped = unsupported_modules(family, weights_file, tower_lora)
    if skipped:
        raise ExportError(
            f"vLLM would skip {len(skipped)} module(s) of the adapter without a word for {family.title}, "
            f"e.g. {skipped[:3]}",
            hint="train LoRA only on the language model (and, on vLLM's tower-LoRA list, the vision tower), "
            "or export with --format vllm --merge",
        )
    modules, _ = adapter_modules(weights_file)
    return {
        "check": "every adapter module is one vLLM loads for this family",
        "modules": len(modules),
        "ok": True,
    }


def max_lora_rank(r: int) -> int:
    """The --max-lora-rank to pass: the smallest value vLLM accepts that holds rank ``r``."""
    return next((v for v in VLLM_LORA_RANKS if v >= r), r)


def serve_command(layout: str, base: str, rank: int | None, tower_lora: bool) -> str:
    """The exact `vllm serve` command, run from inside the export folder (relative paths)."""
    if layout == "merged":
        return f"vllm serve ./{MODEL_DIR}"
    model = base if layout == "adapter" else f"./{MODEL_DIR}"
    parts = [f"vllm serve {model}", "--enable-lora", f"--max-lora-rank {max_lora_rank(rank or 16)}",
             f"--lora-modules {ADAPTER_NAME}=./{ADAPTER_DIR}"]  # fmt: skip
    if tower_lora:
        parts.append("--enable-tower-connector-lora")
    return " ".join(parts)


# --- the export -----------------------------------------------------------------------------------


def export_vllm(trained: TrainedRun, out: Path, merge: bool, dtype: str) -> dict:
    """Write the vLLM folder into ``out`` (new); returns its report (plan, command, checks)."""
    from vlmtune.after import export as hf_export

    if trained.is_full:
        raise ExportError(
            "--format vllm is for LoRA runs; a full fine-tune is already a standalone model",
            hint=f"export it as it is (vlmtune export {trained.run.path} --out DIR) and `vllm serve DIR`",
        )
    family = get_family(trained.run.read_json(rundir.MODEL_REPORT)["family"])
    targets = trained.run.read_json(rundir.LORA_PLAN)["targets"]
    chosen = plan(family, {family.component_of(t) for t in targets}, merge)
    base = trained.recipe.model.name if is_hub_id(trained.recipe.model.name) else "path/to/the/base/model"
    command = serve_command(chosen.layout, base, trained.recipe.lora.r, chosen.tower_lora)
    with staged(out) as staging:
        if chosen.layout == "merged":
            checks = hf_export.export_merged(trained, staging / MODEL_DIR, dtype)
        elif chosen.layout == "adapter":
            checks = hf_export.export_adapter(trained, staging / ADAPTER_DIR)
        else:
            checks = export_split(trained, family, staging, dtype)
        if chosen.layout != "merged":
            weights = staging / ADAPTER_DIR / rundir.PEFT_WEIGHTS
            checks.append(check_vllm_modules(family, weights, chosen.tower_lora))
        (staging / "serve.sh").write_text(f"#!/bin/sh\n# run from this folder\n{command}\n", encoding="utf-8")
        facts = {**card_facts(trained, "vllm", dtype), "dtype": dtype if chosen.layout != "adapter" else None}
        report = {
            **facts,
            "vllm": {"layout": chosen.layout, "why": chosen.why, "command": command},
            "checks": checks,
        }
        write_card_and_report(
            staging,
            model_card(
                facts, Path(out).name, serve_lines(chosen, command) + curves_lines(trained.run, staging)
            ),
            report,
        )
    return report


def serve_lines(chosen: VllmPlan, command: str) -> list[str]:
    return ["## Serve it with vLLM", "", chosen.why + ".", "", "```sh", "# from inside this folder",
            command, "```", ""]  # fmt: skip


def export_split(trained: TrainedRun, family: Family, staging: Path, dtype: str) -> list[dict]:
    """``model/``: the base (16-bit) with the tower's LoRA merged; ``adapter/``: the language LoRA alone."""
    from peft.tuners.lora import LoraLayer

    from vlmtune.after import export as hf_export

    model, base_weights = _base_with_adapter(trained, dtype)
    probes = merge_probes(model, family.component_of, 8)
    tower_probes = [p for p in probes if family.component_of(p.module) in TOWER]
    # A language module must stay unmerged: its saved weight is the base's, away from base + LoRA.
    untouched = [
        Probe(p.module, p.expected, p.before) for p in probes if family.component_of(p.module) == "language"
    ]
    for name, module in model.named_modules():
        if (
            isinstance(module, LoraLayer)
            and family.component_of(name.removeprefix("base_model.model.")) in TOWER
        ):
            module.merge()
    model.unload().save_pretrained(str(staging / MODEL_DIR))
    hf_export.save_export_processor(trained, staging / MODEL_DIR)
    checks = check_merged(staging / MODEL_DIR, tower_probes[:2] + untouched[:1])
    write_language_adapter(base_weights, staging / ADAPTER_DIR, family)
    hf_export.save_export_processor(trained, staging / ADAPTER_DIR)
    return checks


def _base_with_adapter(trained: TrainedRun, dtype: str) -> tuple[Any, Path]:
    """The base reloaded unquantized in ``dtype`` (never merging into 4-bit weights), with the adapter."""
    from peft import PeftModel

    from vlmtune.stages import load

    recipe = trained.recipe
    base = load.load(
        recipe.model.model_copy(update={"dtype": dtype}),
        recipe.quantization.model_copy(update={"bits": None}),
        recipe.data.max_image_pixels,
        "cpu",
    )
    return PeftModel.from_pretrained(base.model, str(trained.weights)), trained.weights


def write_language_adapter(weights: Path, folder: Path, family: Family) -> int:
    """The run's adapter cut to its language modules: its tensors and a config targeting exactly them."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(weights / rundir.PEFT_WEIGHTS))
    kept = {}
    for key, value in tensors.items():
        match = LORA_KEY.match(key)
        if match and family.component_of(match["module"]) == "language":
            kept[key] = value
    modules = sorted({LORA_KEY.match(k)["module"] for k in kept})
    save_file(kept, str(folder / rundir.PEFT_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((weights / rundir.PEFT_CONFIG).read_text(encoding="utf-8"))
    config["target_modules"] = "|".join(re.escape(m) for m in modules)  # peft full-matches a string
    config["modules_to_save"] = None
    (folder / rundir.PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return len(modules)
