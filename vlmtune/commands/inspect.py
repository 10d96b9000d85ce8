"""inspect: what the load and lora stages make of a model, component by component.

Heavy imports stay inside the functions (module level: typer, rich and the standard library).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(highlight=False)
status = Console(stderr=True, highlight=False)  # progress notes; stdout keeps only the result


def inspect(
    recipe: Path = typer.Argument(
        None, help="A recipe .yaml file: its model, quantization and lora sections.", show_default=False
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Hub id, local folder or tiny:FAMILY, inspected with the recipe defaults (4-bit, LoRA on both "
        "towers).",
        show_default=False,
    ),
    overrides: list[str] = typer.Option(
        None, "--set", "-s", help="Override a recipe key: --set lora.r=32 (repeatable).", show_default=False
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object for scripts instead of a table."
    ),
) -> None:
    """Load a model as training would and show each component: vision, projector, language, lm_head, other.

    Per component: parameters, dtype after loading, how many Linears are 4-bit, how many get LoRA
    under the recipe, and the trainable parameters. Nothing is trained or written.

    Examples:

        vlmtune inspect recipes/gemma3/4b_qlora.yaml

        vlmtune inspect --model tiny:pixtral --json

        vlmtune inspect recipes/gemma3/4b_qlora.yaml --set model.name=tiny:gemma3
    """
    from vlmtune.commands.core import _quiet_libraries
    from vlmtune.errors import RecipeError

    if (recipe is None) == (model is None):
        raise RecipeError(
            "give either a RECIPE or --model NAME_OR_PATH", hint="vlmtune inspect --model tiny:qwen2_vl"
        )
    _quiet_libraries()
    if overrides and recipe is None:
        raise RecipeError("--set needs a RECIPE", hint="vlmtune inspect RECIPE --set lora.r=32")
    sections = _recipe_sections(recipe, overrides) if recipe is not None else _default_sections(model)
    status.print(f"loading [bold]{sections['model'].name}[/] ...")
    result = inspect_model(**sections)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render(result, console)


def _recipe_sections(path: Path, overrides: list[str] | None) -> dict:
    from vlmtune.recipe import load_recipe

    parsed = load_recipe(path, overrides or [])
    return dict(
        model=parsed.model,
        quantization=parsed.quantization,
        lora=parsed.lora,
        max_image_pixels=parsed.data.max_image_pixels,
        device=parsed.train.device,
    )


def _default_sections(name: str) -> dict:
    """--model NAME: the recipe schema's defaults for everything but the model name."""
    from pydantic import ValidationError

    from vlmtune.errors import RecipeError
    from vlmtune.recipe import DataSection, LoraSection, ModelSection, QuantizationSection, TrainSection

    try:
        model = ModelSection(name=name)
    except ValidationError as exc:
        raise RecipeError(
            f"--model {name!r} is not usable: {exc.errors()[0]['msg']}",
            hint="give a hub id, a local checkpoint folder, or tiny:FAMILY",
        ) from None
    return dict(
        model=model,
        quantization=QuantizationSection(),
        lora=LoraSection(),
        max_image_pixels=DataSection.model_fields["max_image_pixels"].default,
        device=TrainSection.model_fields["device"].default,
    )


def inspect_model(
    model: Any, quantization: Any, lora: Any, max_image_pixels: int | None, device: str
) -> dict:
    """Run the load stage and the LoRA plan (applied, so trainable counts are peft's own) and summarise."""
    from vlmtune.stages import load
    from vlmtune.stages import lora as lora_stage

    loaded = load.load(model, quantization, max_image_pixels, load.choose_device(device))
    dtypes = component_dtypes(loaded.model, loaded.family)
    tied = _lm_head_tied(loaded.model)
    plan = lora_stage.plan(loaded.model, loaded.family, lora)
    adapted = lora_stage.apply(loaded.model, lora, plan, seed=0)  # counts only: the init is irrelevant
    trainable = lora_stage.trainable_report(adapted, loaded.family, plan)
    return summarize(loaded, quantization, plan, trainable, dtypes, tied)


def component_dtypes(model: Any, family: Any) -> dict[str, dict[str, int]]:
    """Per component: parameters by storage type after loading ("nf4", "int8", "bfloat16", ...)."""
    from vlmtune.families import COMPONENTS
    from vlmtune.stages.load import logical_numel

    found: dict[str, dict[str, int]] = {c: {} for c in COMPONENTS}
    for name, param in model.named_parameters(remove_duplicate=True):
        kind = {"Params4bit": getattr(param, "quant_type", "4-bit"), "Int8Params": "int8"}.get(
            type(param).__name__, str(param.dtype).removeprefix("torch.")
        )
        counts = found[family.component_of(name.rsplit(".", 1)[0])]
        counts[kind] = counts.get(kind, 0) + logical_numel(param)
    return found


def _lm_head_tied(model: Any) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def summarize(loaded: Any, quantization: Any, plan: Any, trainable: dict, dtypes: dict, tied: bool) -> dict:
    """The plain, stable JSON of `vlmtune inspect --json`."""
    report = loaded.report
    components = []
    for name, figures in report["components"].items():
        components.append(
            {
                "name": name,
                "params": figures["params"],
                "bytes": figures["bytes"],
                "dtypes": dict(sorted(dtypes[name].items(), key=lambda item: -item[1])),
                "linears": figures["linears"],
                "quantized_linears": figures["quantized_linears"],
                "lora_targets": plan.targets_per_component.get(name, 0),
                "trainable_params": trainable["trainable_params"][name],
                **({"tied_to_embeddings": tied} if name == "lm_head" else {}),
            }
        )
    return {
        "model": loaded.path,
        "family": loaded.family.name,
        "family_title": loaded.family.title,
        "model_class": report["model_class"],
        "quantization": _quantization_label(quantization),
        "method": plan.method,
        "lora_regex": plan.regex,
        "lora_targets": len(plan.targets),
        "modules_to_save": list(plan.modules_to_save),
        "components": components,
        "total_params": report["total_params"],
        "total_bytes": report["total_bytes"],
        "trainable_params": trainable["trainable_total"],
    }


def _quantization_label(quantization: Any) -> str | None:
    if quantization.bits is None:
        return None
    return f"4-bit {quantization.quant_type}" if quantization.bits == 4 else "8-bit"


def render(result: dict, out: Console) -> None:
    from rich.table import Table

    table = Table(
        title=f"{result['model']}: {result['family_title']} ({result['model_class']})",
        title_justify="left",
    )
    for column in ("component", "params", "dtype", "4-bit Linears", "LoRA targets", "trainable"):
        table.add_column(column, justify="left" if column in ("component", "dtype") else "right")
    for row in result["components"]:
        if row["name"] == "other" and not (row["params"] or row["linears"]):
            continue
        dtype = ", ".join(row["dtypes"]) or "-"
        if row.get("tied_to_embeddings"):
            dtype = "tied to the embeddings"
        table.add_row(
            row["name"],
            _count(row["params"]),
            dtype,
            f"{row['quantized_linears']} / {row['linears']}",
            str(row["lora_targets"]),
            _count(row["trainable_params"]),
        )
    table.add_section()
    table.add_row("total", _count(result["total_params"]), "", "", str(result["lora_targets"]),
                  _count(result["trainable_params"]))  # fmt: skip
    out.print(table)
    share = 100 * result["trainable_params"] / max(result["total_params"], 1)
    out.print(
        f"quantization: {result['quantization'] or 'none (16-bit)'}; method: {result['method']}; "
        f"trainable: {share:.2f}% of {_count(result['total_params'])} parameters; "
        f"weights: {result['total_bytes'] / 2**20:.1f} MiB",
        markup=False,
    )
    if result["lora_regex"]:
        out.print(f"LoRA targets regex: {result['lora_regex']}", markup=False, soft_wrap=True)


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
