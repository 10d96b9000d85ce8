"""inspect: the CLI and the table; the logic is vlmtune/after/inspection.py.

Heavy imports stay inside the functions (module level: typer, rich and the standard library).
"""

from __future__ import annotations

import json
from pathlib import Path

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
    from vlmtune.after.inspection import inspect_model

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


def render(result: dict, out: Console) -> None:
    from rich.table import Table

    from vlmtune.units import human_bytes, human_count

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
            human_count(row["params"]),
            dtype,
            f"{row['quantized_linears']} / {row['linears']}",
            str(row["lora_targets"]),
            human_count(row["trainable_params"]),
        )
    table.add_section()
    table.add_row("total", human_count(result["total_params"]), "", "", str(result["lora_targets"]),
                  human_count(result["trainable_params"]))  # fmt: skip
    out.print(table)
    share = 100 * result["trainable_params"] / max(result["total_params"], 1)
    init = result.get("lora_init", "kaiming")
    start = "" if init == "kaiming" else f", lora.init {init}"  # peft's default start goes unsaid
    out.print(
        f"quantization: {result['quantization'] or 'none (16-bit)'}; method: {result['method']}{start}; "
        f"trainable: {share:.2f}% of {human_count(result['total_params'])} parameters; "
        f"weights: {human_bytes(result['total_bytes'])}",
        markup=False,
    )
    out.print(result["packing_note"], markup=False)
    if result["lora_regex"]:
        out.print(f"LoRA targets regex: {result['lora_regex']}", markup=False, soft_wrap=True)
    if result.get("dora_magnitude_vectors"):
        out.print(
            f"DoRA: {result['dora_magnitude_vectors']} magnitude vectors, {human_count(result['dora_magnitude_params'])} "
            "trained parameters (one per output channel of each target); each target's forward also builds its "
            "whole weight for the channel norms (estimate-memory counts it)",
            markup=False,
        )
    if result.get("lora_expert_tensors"):
        out.print(
            f"LoRA on the experts: {result['lora_expert_tensors']} fused expert tensors (peft target_parameters; "
            "bitsandbytes leaves them 16-bit)",
            markup=False,
        )
