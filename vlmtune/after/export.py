"""Export a finished run so it leaves the tool: a peft adapter, a merged 16-bit model, or a full fine-tune.

Every export is proved before it is handed over, because merged checkpoints that silently lack
their LoRA weights are a known way to ship nothing:
- adapter: the saved file holds lora_A/lora_B for every module of 2-lora/lora_plan.json, and
  training moved lora_B away from zero;
- merged: the base is reloaded UNQUANTIZED in 16 bit (never merging into 4-bit weights); before
  merging, the modules the adapter changes most are noted with their expected merged weights, and
  after saving those exact weights are looked up in the saved safetensors rundir.
The folder is written under a temporary name and renamed at the end: an existing --out is never
touched, and a failed export leaves nothing half-written behind. A process killed outright (kill -9)
cannot clean up: its folder keeps the visible name ``OUT.partial-PID`` (never taken for an export, as
it is not the name asked for), and the next export to OUT removes the ones whose process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.after.trained import TrainedRun
from vlmtune.errors import RunDirError, VlmtuneError
from vlmtune.paths import is_hub_id
from vlmtune.runs import rundir

PROBES = 4  # modules whose merged weights are looked up in the saved files


class ExportError(VlmtuneError):
    """An export that cannot be written or does not hold what it should."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # adapter | merged | full
    checks: list[dict]
    scored: dict | None = None  # the exported model's own eval scores (merged, full), and its agreement
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    module: str
    before: Any  # the base weight
    expected: Any  # base weight + LoRA delta, as peft merges it


def export_run(trained: TrainedRun, out: Path, merge: bool, dtype: str, score: bool = True) -> ExportResult:
    """Write the export into ``out`` (which must not exist), with its model card and checks.

    A merged (or full) export is scored on the recipe's eval samples from the saved files themselves,
    beside the answers of the adapter as trained: the card and vlmtune_export.json quote what ships.
    """
    out = Path(out)
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staging = out.parent / f"{out.name}{PARTIAL}{os.getpid()}"
    try:
        if trained.is_full:
            kind, checks = "full", export_full(trained, staging)
        elif merge:
            kind, checks = "merged", export_merged(trained, staging, dtype)
        else:
            kind, checks = "adapter", export_adapter(trained, staging)
        scored = (
            score_export(trained, staging, dtype if kind == "merged" else None)
            if score and kind != "adapter"
            else None
        )
        facts = card_facts(trained, kind, dtype, scored)
        facts["autoprocessor_needs_torchvision"] = declares_video(staging)
        (staging / rundir.EXPORT_CARD).write_text(model_card(facts, out.name), encoding="utf-8")
        report = json.dumps({**facts, "checks": checks}, indent=2, ensure_ascii=False)
        (staging / rundir.EXPORT_REPORT).write_text(report + "\n", encoding="utf-8")
        check_new_folder(out)  # created meanwhile? rename would replace an empty folder
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, kind, checks, scored, tuple(export_warnings(scored)))


# --- the export measured ---------------------------------------------------------------------------


def score_export(trained: TrainedRun, folder: Path, dtype: str | None) -> dict | None:
    """The saved model's eval scores on data.eval, and how often it gives the adapter's answer.

    The adapter's answers are the eval stage's (4-eval/eval_report.json) when it scored the same
    samples, else they are generated now from the base as trained plus the adapter.
    """
    from vlmtune.after import evaluate
    from vlmtune.after.trained import load_export, load_for_inference
    from vlmtune.scoring import exact_match, scores

    data = trained.recipe.data
    if not data.eval:
        return None
    items, source = evaluate.load_items(data.eval, data, None)
    references = [item.reference for item in items]
    adapter, adapter_from = _reported_answers(trained, items), rundir.EVAL_REPORT
    if adapter is None:
        inference = load_for_inference(trained, device="cpu")
        adapter = evaluate.answers(inference.model, inference.processor, items, evaluate.MAX_NEW_TOKENS)
        adapter_from = "generated at export"
        del inference
    exported = load_export(folder, device="cpu", dtype=dtype)
    mine = evaluate.answers(exported.model, exported.processor, items, evaluate.MAX_NEW_TOKENS)
    agreeing = sum(map(exact_match, mine, adapter))
    own, theirs = scores(mine, references), scores(adapter, references)
    return {
        "n": len(items),
        "data": _short_path(source["source"]),
        "exact_match": own["exact_match"],
        "contains": own["contains"],
        "adapter_exact_match": theirs["exact_match"],
        "adapter_contains": theirs["contains"],
        "agreeing": agreeing,
        "agreement_with_adapter": agreeing / len(items) if items else 1.0,
        "adapter_answers_from": adapter_from,
        "max_new_tokens": evaluate.MAX_NEW_TOKENS,
        "predictions": [
            {"index": item.index, "reference": item.reference, "export": m, "adapter": a}
            for item, m, a in zip(items, mine, adapter, strict=True)
        ],
    }


def _reported_answers(trained: TrainedRun, items: list) -> list[str] | None:
    """The adapter's answers from the eval stage's report, when it scored exactly these samples."""
    path = trained.run / rundir.EVAL_REPORT
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    rows = report.get("predictions", [])
    if report.get("max_new_tokens") != _max_new_tokens() or [r.get("index") for r in rows] != [
        item.index for item in items
    ]:
        return None
    return [r["adapter"] for r in rows]


def _max_new_tokens() -> int:
    from vlmtune.after.evaluate import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS


def export_warnings(scored: dict | None) -> list[str]:
    if not scored or scored["agreeing"] == scored["n"]:
        return []
    return [
        f"the exported model gives the adapter's answer on only {scored['agreeing']} of {scored['n']} eval "
        f"samples (exact match {scored['exact_match']:.1%} vs the adapter's {scored['adapter_exact_match']:.1%}): "
        "a 16-bit merge of an adapter trained on a 4-bit base is not the model that was trained; compare "
        "them in vlmtune_export.json (scored.predictions), or ship the adapter without --merge"
    ]


PARTIAL = ".partial-"  # OUT.partial-PID: an export being written (or killed while it was)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial folders of earlier exports to ``out`` whose process no longer runs."""
    removed = []
    for folder in out.parent.glob(f"{out.name}{PARTIAL}*"):
        pid = folder.name.rsplit(PARTIAL, 1)[1]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_new_folder(out: Path) -> None:
    if out.exists():
        raise ExportError(
            f"{out} already exists; vlmtune never overwrites an export",
            hint="pass a new --out folder, or remove the old one yourself first",
        )
    if PARTIAL in out.name:
        raise ExportError(
            f"{out} is named like the partial folder of an export being written ({PARTIAL}PID)",
            hint="pass another --out name",
        )


# --- the three kinds ------------------------------------------------------------------------------


def export_adapter(trained: TrainedRun, staging: Path) -> list[dict]:
    """adapter_config.json + adapter_model.safetensors + the processor (with its chat template)."""
    staging.mkdir()
    for name in (rundir.PEFT_CONFIG, rundir.PEFT_WEIGHTS):
        if not (trained.weights / name).is_file():
            raise RunDirError(
                f"{trained.weights / name} is missing",
                hint="the run folder was changed after training; train again",
            )
        shutil.copy2(trained.weights / name, staging / name)
    save_export_processor(trained, staging)
    targets = trained.run.read_json(rundir.LORA_PLAN)["targets"]
    return [check_adapter(staging / rundir.PEFT_WEIGHTS, targets)]


def export_merged(trained: TrainedRun, staging: Path, dtype: str) -> list[dict]:
    """The LoRA merged into a 16-bit reload of the base, saved as safetensors with the processor."""
    from peft import PeftModel

    from vlmtune.model.modelinfo import is_quantized_linear
    from vlmtune.stages import load

    recipe = trained.recipe
    # A LoftQ adapter starts as the 4-bit weights' quantization error and trains against those weights: it
    # merges into them, dequantized (merged into the 16-bit weights it would add the error a second time).
    loftq = recipe.lora.init == "loftq"
    base = load.load(
        recipe.model.model_copy(update={"dtype": dtype}),
        recipe.quantization if loftq else recipe.quantization.model_copy(update={"bits": None}),
        recipe.data.max_image_pixels,
        "cpu",
    )
    weights = base.model.dequantize() if loftq else base.model  # never merge into 4-bit weights
    quantized = [name for name, m in weights.named_modules() if is_quantized_linear(m)]
    assert not quantized, f"the merge base must be unquantized, found 4-bit {quantized[:3]}"
    model = PeftModel.from_pretrained(weights, str(trained.weights))
    probes = merge_probes(model, base.family.component_of, PROBES)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(staging))
    save_export_processor(trained, staging)
    return check_merged(staging, probes)


def export_full(trained: TrainedRun, staging: Path) -> list[dict]:
    """A full fine-tune is already a standalone model: copy it (no merge needed)."""
    shutil.copytree(trained.weights, staging)
    weights = sorted(p.name for p in staging.glob("*.safetensors"))
    if not weights:
        raise RunDirError(f"{trained.weights} holds no .safetensors weights", hint="train again")
    return [{"check": "full fine-tune weights copied", "files": weights, "ok": True}]


def save_export_processor(trained: TrainedRun, folder: Path) -> None:
    """The run's processor, plus the video-processor config AutoProcessor reads for families that declare one.

    vlmtune trains on images and builds its processors without a video processor (FACTS.md), but
    ``AutoProcessor.from_pretrained`` of Qwen2-VL, InternVL, SmolVLM ... loads one and fails with
    "Can't load video processor" when the folder has no video_preprocessor_config.json. With it the
    folder loads wherever torchvision is installed, as the family's own checkpoints do; without
    torchvision transformers says plainly that the video processor needs it.
    """
    from vlmtune.model.processing import save_processor

    processor = run_processor(trained)
    save_processor(processor, folder)
    write_video_processor_config(processor, folder)


def _transformers_classes(processor: Any) -> list[type]:
    return [c for c in type(processor).__mro__ if c.__module__.startswith("transformers.models.")]


def video_processor_type(processor: Any) -> str | None:
    """The transformers video-processor class of the processor's family; None when it declares none."""
    import inspect

    import transformers

    classes = _transformers_classes(processor)
    if not any("video_processor" in inspect.signature(c.__init__).parameters for c in classes):
        return None
    image_type = type(getattr(processor, "image_processor", None)).__name__
    candidates = [
        classes[0].__name__.removesuffix("Processor")
        + "VideoProcessor",  # Qwen3VLProcessor -> Qwen3VLVideoProcessor
        image_type.removesuffix("Pil").removesuffix("Fast").replace("ImageProcessor", "VideoProcessor"),
    ]  # the second is transformers' own fallback (Qwen2_5_VL uses Qwen2VLVideoProcessor)
    return next((name for name in candidates if hasattr(transformers, name)), None)


def write_video_processor_config(processor: Any, folder: Path) -> str | None:
    """video_preprocessor_config.json naming the family's video processor (its defaults apply)."""
    from transformers.utils import VIDEO_PROCESSOR_NAME

    name = video_processor_type(processor)
    if name is None or (folder / VIDEO_PROCESSOR_NAME).exists():
        return None
    config = {"video_processor_type": name, "processor_class": _transformers_classes(processor)[0].__name__}
    (folder / VIDEO_PROCESSOR_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return name


def declares_video(folder: Path) -> bool:
    from transformers.utils import VIDEO_PROCESSOR_NAME

    return (folder / VIDEO_PROCESSOR_NAME).is_file()


def run_processor(trained: TrainedRun) -> Any:
    """The processor saved with the final weights, as it was trained (pixel budget included)."""
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    family = get_family(trained.run.read_json(rundir.MODEL_REPORT)["family"])
    return load_processor(trained.final or trained.weights, family, trained.recipe.data.max_image_pixels)


# --- proofs ---------------------------------------------------------------------------------------


def check_adapter(weights_file: Path, targets: list[str]) -> dict:
    """Every planned target has lora_A and lora_B, and training moved lora_B off zero."""
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as f:
        keys = list(f.keys())
        lora_b = [k for k in keys if ".lora_B." in k]
        nonzero = sum(bool(f.get_tensor(k).any()) for k in lora_b)
    found = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
    missing = sorted(set(targets) - found)
    if missing:
        raise ExportError(
            f"the adapter lacks {len(missing)} of the {len(targets)} planned LoRA modules, e.g. {missing[:3]}",
            hint="the adapter does not match 2-lora/lora_plan.json; train the run again",
        )
    if lora_b and not nonzero:
        raise ExportError(
            "every lora_B of the adapter is zero: it changes nothing (was the run trained for 0 steps?)",
            hint="train for some steps before exporting",
        )
    return {
        "check": "adapter holds every planned LoRA module, trained",
        "targets": len(targets),
        "lora_modules": len(found),
        "lora_B_nonzero": nonzero,
        "ok": True,
    }


def merge_probes(model: Any, component_of: Any, count: int) -> list[Probe]:
    """Before merging: the LoRA modules that change their weight most (relative to it), the top one
    of each component first, with the merged weight peft will produce (added in fp32, rounded once)."""
    from peft.tuners.lora import LoraLayer

    ranked = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
            if not hasattr(module.get_base_layer(), "weight"):
                continue  # fused experts (peft's ParamWrapper on a 3-D parameter): the Linears are probed
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            relative = float(delta.abs().max()) / (float(weight.abs().max()) or 1.0)
            ranked.append((relative, name.removeprefix("base_model.model."), weight, delta))
    ranked.sort(key=lambda r: r[0], reverse=True)
    firsts = {}
    for entry in ranked:
        firsts.setdefault(component_of(entry[1]), entry)
    chosen = list(firsts.values())[:count]
    names = {entry[1] for entry in chosen}
    chosen += [entry for entry in ranked if entry[1] not in names][: count - len(chosen)]
    return [
        Probe(name, weight.detach().clone(), (weight.float() + delta).to(weight.dtype))
        for _, name, weight, delta in chosen
    ]


def check_merged(folder: Path, probes: list[Probe]) -> list[dict]:
    """Find each probe's merged weight among the saved tensors (by content, so checkpoint key
    renaming does not matter): it must be near base+LoRA and clearly away from the base."""
    from safetensors import safe_open

    best: dict[str, tuple[float, str]] = {p.module: (float("inf"), "") for p in probes}
    shapes = {tuple(p.expected.shape) for p in probes}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if tuple(f.get_slice(key).get_shape()) not in shapes:
                    continue
                tensor = f.get_tensor(key).float()
                for p in probes:
                    if tuple(p.expected.shape) == tuple(tensor.shape):
                        distance = float((tensor - p.expected.float()).norm())
                        if distance < best[p.module][0]:
                            best[p.module] = (distance, key)
    checks = []
    for p in probes:
        lora_change = float((p.expected.float() - p.before.float()).norm())
        distance, key = best[p.module]
        ok = lora_change > 0 and distance <= 0.1 * lora_change
        checks.append(
            {
                "check": "merged weight holds the LoRA update",
                "module": p.module,
                "saved_as": key,
                "lora_change_norm": lora_change,
                "distance_to_base_plus_lora": distance,
                "ok": ok,
            }
        )
        if not ok:
            reason = (
                "the adapter changes nothing" if lora_change == 0 else f"nearest saved tensor {key or 'none'}"
            )
            raise ExportError(
                f"the merged checkpoint does not hold the LoRA update of {p.module} ({reason}: distance "
                f"{distance:.3g} vs LoRA change {lora_change:.3g})",
                hint="export the adapter without --merge, and report this as a vlmtune bug",
            )
    return checks


# --- the model card -------------------------------------------------------------------------------


def card_facts(trained: TrainedRun, kind: str, dtype: str, scored: dict | None = None) -> dict:
    """What the model card says, read from the run folder's artifacts. No absolute local path goes in."""
    run, recipe = trained.run, trained.recipe
    summary = run.summary()
    losses = run.losses()
    data = run.read_json(rundir.DATA_REPORT) if (run / rundir.DATA_REPORT).is_file() else {}
    evaluation = run.read_json(rundir.EVAL_REPORT) if (run / rundir.EVAL_REPORT).is_file() else None
    train = data.get("train", {})
    return {
        "export": kind,
        "run": run.path.resolve().name,
        "recipe_name": summary.get("recipe"),
        "base_model": recipe.model.name,
        "method": recipe.lora.method,
        "quantization_bits": recipe.quantization.bits,
        "lora_r": recipe.lora.r if recipe.lora.method != "full" else None,
        "lora_alpha": recipe.lora.alpha if recipe.lora.method != "full" else None,
        "dtype": dtype if kind == "merged" else recipe.model.dtype,
        "train_source": _short_path(train.get("source", recipe.data.train)),
        "train_samples": train.get("samples_kept"),
        "train_images": train.get("images_total"),
        "steps": summary.get("stages", {}).get("train", {}).get("steps"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval": None
        if evaluation is None
        else {k: evaluation[k] for k in ("n", "exact_match", "contains", "base") if k in evaluation},
        "scored": scored,
        "resolved_recipe": _without_local_paths(
            (run / rundir.RESOLVED).read_text(encoding="utf-8"), _local_paths(recipe)
        ),
    }


def _local_paths(recipe: Any) -> list[str]:
    """The absolute local paths resolved.yaml holds (data files, folders, a local model)."""
    values = [recipe.data.train, recipe.data.eval, recipe.data.image_root, recipe.output.dir,
              recipe.model.name, recipe.model.adapter]  # fmt: skip
    return [v for v in values if isinstance(v, str) and os.path.isabs(v)]


def _short_path(value: Any) -> Any:
    """An absolute local path cut to its last two parts (folder/file); anything else as it is."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    return "/".join(Path(value).parts[-2:])


def _without_local_paths(text: str, paths: list[str]) -> str:
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, _short_path(path))
    return text


KIND_TITLES = {
    "adapter": "A peft LoRA adapter for",
    "merged": "A LoRA merged into",
    "full": "A full fine-tune of",
    "gguf": "GGUF files (llama.cpp, Ollama) of a fine-tune of",  # after/export_gguf.py
    "vllm": "What vLLM serves of a fine-tune of",  # after/export_vllm.py
}
LIBRARIES = {"adapter": "peft", "gguf": "gguf"}  # the card's library_name; transformers otherwise


def model_card(facts: dict, folder_name: str, serve: list[str] | None = None) -> str:
    """README.md for the export folder (pure: facts in, markdown out). ``serve``: the markdown lines
    that say how to serve a serving export (GGUF, vLLM), in place of the transformers snippet."""
    kind = facts["export"]
    return "\n".join(
        [
            "---",
            *([f"base_model: {facts['base_model']}"] if is_hub_id(facts["base_model"]) else []),
            f"library_name: {LIBRARIES.get(kind, 'transformers')}",
            "pipeline_tag: image-text-to-text",
            f"tags: [vlmtune, {kind}]",
            "---",
            "",
            f"# {folder_name}",
            "",
            f"{KIND_TITLES[kind]} `{facts['base_model']}`, trained and exported with vlmtune"
            + (f" (saved in {facts['dtype']})." if kind == "merged" else "."),
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{facts['base_model']}` |",
            f"| method | {_method(facts)} |",
            f"| data | {_fmt(facts['train_samples'])} training samples ({_fmt(facts['train_images'])} images) "
            f"from `{facts['train_source']}` |",
            f"| steps | {_fmt(facts['steps'])} |",
            f"| final loss | {_loss(facts['final_loss'])} (first {_loss(facts['first_loss'])}) |",
            *([f"| eval (adapter as trained) | {_eval(facts['eval'])} |"] if facts["eval"] else []),
            *([f"| eval (this folder) | {_scored(facts['scored'])} |"] if facts.get("scored") else []),
            f"| recipe | `{facts['recipe_name']}`, run `{facts['run']}` |",
            "",
            *(serve or ["## Load it", "", "```python", *_load_snippet(kind, facts["base_model"]), "```", ""]),
            *(_TORCHVISION_NOTE if facts.get("autoprocessor_needs_torchvision") else []),
            "The checks that proved this export, and its own answers on the eval samples, are in "
            "`vlmtune_export.json`.",
            "",
            "## Recipe (resolved)",
            "",
            "```yaml",
            facts["resolved_recipe"].rstrip(),
            "```",
            "",
        ]
    )


def _method(facts: dict) -> str:
    if facts["method"] == "full":
        return "full fine-tuning"
    name = "DoRA" if facts["method"] == "dora" else "LoRA"
    base = f"{facts['quantization_bits']}-bit Q{name}" if facts["quantization_bits"] else name
    return f"{base}, r={facts['lora_r']}, alpha={facts['lora_alpha']}"


def _load_snippet(kind: str, base_model: str) -> list[str]:
    lines = ["from transformers import AutoModelForImageTextToText, AutoProcessor", ""]
    if kind == "adapter":
        base = base_model if is_hub_id(base_model) else "path/to/the/base/model"
        return [
            "from peft import PeftModel",
            *lines,
            f'base = AutoModelForImageTextToText.from_pretrained("{base}", dtype="auto")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
        ]
    return [
        *lines,
        'model = AutoModelForImageTextToText.from_pretrained("path/to/this/folder", dtype="auto")',
        'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
    ]


_TORCHVISION_NOTE = [
    "This family's processor declares a video processor, so `AutoProcessor` needs torchvision installed "
    "(as the original checkpoint does); without it, `vlmtune predict` and `vlmtune eval` load this folder.",
    "",
]


def _scored(scored: dict) -> str:
    return (
        f"exact match {scored['exact_match']:.1%} (the adapter as trained: {scored['adapter_exact_match']:.1%}), "
        f"contains answer {scored['contains']:.1%} on {scored['n']} samples; the same answer as the adapter "
        f"on {scored['agreeing']} of {scored['n']}"
    )


def _fmt(value: Any) -> str:
    return "?" if value is None else str(value)


def _loss(value: float | None) -> str:
    return "not logged" if value is None else f"{value:.4f}"


def _eval(result: dict) -> str:
    base = result.get("base", {})
    return (
        f"exact match {result['exact_match']:.1%} (base {base.get('exact_match', 0):.1%}), "
        f"contains answer {result['contains']:.1%} (base {base.get('contains', 0):.1%}) on {result['n']} samples"
    )
