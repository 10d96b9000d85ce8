"""estimate-memory: will this fine-tuning step fit on my GPU? Options and rendering only; the
arithmetic is the vlmtune.memory package. Only typer, rich and the standard library (and
vlmtune.choices, which is plain typing) load at module level."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console

from vlmtune.choices import NO_QUANTIZATION, Dtype, Objective, Optimizer, words

console = Console(highlight=False)
GiB, MiB = 2**30, 2**20


def estimate_memory(
    recipe: Path = typer.Argument(None, help="A recipe .yaml file (or give --model).", show_default=False),
    overrides: list[str] = typer.Option(
        None,
        "--set",
        "-s",
        help="Override a recipe key: --set train.batch_size=4 (repeatable).",
        show_default=False,
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Hub id (bundled configs work offline), local folder, or tiny:FAMILY.",
        show_default=False,
    ),
    bits: str = typer.Option(
        None, "--bits", help="4 (NF4), 8 or 16 (no quantization). [default: 4]", show_default=False
    ),
    double_quant: bool = typer.Option(
        None,
        "--double-quant/--no-double-quant",
        help="Quantize the 4-bit constants too. [default: on]",
        show_default=False,
    ),
    r: int = typer.Option(None, "--r", help="LoRA rank. [default: 16]", show_default=False),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Samples per step. [default: 2]", show_default=False
    ),
    seq_len: int = typer.Option(
        None,
        "--seq-len",
        min=0,
        show_default=False,
        help="Text tokens per sample; image tokens are added. [default: train.max_length minus the image tokens]",
    ),
    images_per_sample: int = typer.Option(1, "--images-per-sample", min=0, help="Images in each sample."),
    image_size: str = typer.Option(
        None,
        "--image-size",
        help="WIDTHxHEIGHT of each image. [default: a square at data.max_image_pixels]",
        show_default=False,
    ),
    image_tokens: int = typer.Option(
        None,
        "--image-tokens",
        min=1,
        help="Tokens per image, instead of the family's count.",
        show_default=False,
    ),
    grad_ckpt: bool = typer.Option(
        None, "--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing. [default: on]", show_default=False
    ),
    optim: str = typer.Option(
        None,
        "--optim",
        show_default=False,
        help=f"{', '.join(words(Optimizer))}. [default: adamw_torch]",
    ),
    vision: bool = typer.Option(
        None, "--vision/--no-vision", help="LoRA on the vision tower. [default: on]", show_default=False
    ),
    language: bool = typer.Option(
        None, "--language/--no-language", help="LoRA on the language model. [default: on]", show_default=False
    ),
    attention: bool = typer.Option(
        None,
        "--attention/--no-attention",
        help="LoRA on attention projections. [default: on]",
        show_default=False,
    ),
    mlp: bool = typer.Option(
        None, "--mlp/--no-mlp", help="LoRA on MLP projections. [default: on]", show_default=False
    ),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning: every weight trains (16-bit base)."),
    objective: str = typer.Option(
        None,
        "--objective",
        show_default=False,
        help=f"{', '.join(words(Objective))}; dpo: two sequences per sample and a reference; kto: a reference. [default: sft]",
    ),
    dtype: str = typer.Option(
        None, "--dtype", help=f"{', '.join(words(Dtype))}. [default: bfloat16]", show_default=False
    ),
    supervised_loss: bool = typer.Option(
        None,
        "--supervised-loss/--full-logits",
        show_default=False,
        help="vlmtune's chunked loss over labelled positions, or logits for the whole sequence. [default: supervised]",
    ),
    gpu_memory: str = typer.Option(
        None,
        "--gpu-memory",
        show_default=False,
        help="Card size, e.g. 24GB: does it fit, and the largest batch size and sequence length that do.",
    ),
    gpus: int = typer.Option(
        1,
        "--gpus",
        min=1,
        help="GPUs the run is spread over (torchrun --nproc-per-node x nodes): adds the per-GPU peak under "
        "DDP and under FSDP. batch_size stays per GPU.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    list_models: bool = typer.Option(
        False, "--list-models", help="List the bundled offline configs and exit."
    ),
) -> None:
    """Estimate the GPU memory of a training step, per component and per term, without downloading weights.

    The model is built on the meta device from its config (bundled for popular checkpoints, so
    no download), then weights, LoRA, gradients, optimizer states, activations (image tokens
    included), the loss buffer and the CUDA context are added up. docs/memory.md explains the
    model and shows it against measurements.

    Examples:

        vlmtune estimate-memory --model Qwen/Qwen2.5-VL-7B-Instruct --gpu-memory 24GB

        vlmtune estimate-memory --model google/gemma-3-12b-it --seq-len 1024 --images-per-sample 2 --json

        vlmtune estimate-memory recipes/demo.yaml --set train.batch_size=8 --no-grad-ckpt

        vlmtune estimate-memory --model Qwen/Qwen2-VL-7B-Instruct --objective dpo

        vlmtune estimate-memory --model Qwen/Qwen2.5-VL-72B-Instruct --full --gpus 8 --gpu-memory 80GB
    """
    from vlmtune import memory as mem
    from vlmtune.errors import RecipeError

    if list_models:
        for hub_id in mem.bundled_configs():
            print(hub_id)
        return
    if (recipe is None) == (model is None):
        raise RecipeError(
            "give either a RECIPE or --model NAME_OR_PATH",
            hint="vlmtune estimate-memory --model Qwen/Qwen2-VL-7B-Instruct (see --list-models for offline ones)",
        )
    gpu_bytes = parse_gpu_memory(gpu_memory) if gpu_memory is not None else None
    size = parse_image_size(image_size) if image_size is not None else None
    knobs = _knob_overrides(bits, double_quant, r, batch_size, grad_ckpt, optim, vision, language, attention,
                            mlp, full, dtype, supervised_loss, objective)  # fmt: skip
    parsed = _recipe(recipe, model, [*(overrides or []), *knobs])
    _quiet_libraries()
    result = mem.estimate_recipe(
        parsed, gpus=gpus, gpu_bytes=gpu_bytes, seq_len=seq_len, images_per_sample=images_per_sample,
        image_size=size, tokens_per_image=image_tokens,
    )  # fmt: skip
    sizes = {"seq_len": seq_len, "images_per_sample": images_per_sample, "image_size": size,
             "tokens_per_image": image_tokens}  # fmt: skip
    would_fit = (
        what_would_fit(parsed, gpus, gpu_bytes, sizes)
        if result.fit is not None and not result.fit.fits
        else []
    )
    if json_out:
        print(json.dumps({**result.to_json(), **({"would_fit": would_fit} if would_fit else {})}, indent=2))
    else:
        render(result)
        for line in would_fit:
            console.print(f"  would fit: {line}", markup=False)


GPU_COUNTS = (2, 4, 8, 16, 32, 64)  # tried under FSDP when one GPU is too small


def what_would_fit(parsed, gpus: int, gpu_bytes: int, sizes: dict) -> list[str]:
    """When the step does not fit: the changes that would make it fit, each estimated on its own.

    4-bit QLoRA (from a 16-bit or full run), an 8-bit optimizer, gradient checkpointing, a smaller
    batch, and the fewest GPUs that hold it under FSDP."""
    from vlmtune import memory as mem

    def peak(recipe, count: int = gpus) -> int:
        estimate = mem.estimate_recipe(recipe, gpus=count, **sizes)
        if count > 1:
            return min(p.peak_bytes for p in estimate.per_gpu)
        return estimate.peak_bytes

    def changed(**updates):
        recipe = parsed
        for section, values in updates.items():
            recipe = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=values)})
        return recipe

    found = []
    train, lora, quant = parsed.train, parsed.lora, parsed.quantization
    tries = []
    if lora.method == "full" or quant.bits != 4:
        tries.append(
            ("4-bit QLoRA (--bits 4, LoRA r=16)", changed(quantization={"bits": 4}, lora={"method": "lora"}))
        )
    if "8bit" not in train.optim:
        tries.append(
            ("an 8-bit optimizer (--optim paged_adamw_8bit)", changed(train={"optim": "paged_adamw_8bit"}))
        )
    if not train.gradient_checkpointing:
        tries.append(
            ("gradient checkpointing (--grad-ckpt)", changed(train={"gradient_checkpointing": True}))
        )
    if train.batch_size > 1:
        tries.append(("batch size 1 (--batch-size 1; raise grad_accum to keep the effective batch)",
                      changed(train={"batch_size": 1})))  # fmt: skip
    for label, recipe in tries:
        if peak(recipe) <= gpu_bytes:
            found.append(label)
    for count in (c for c in GPU_COUNTS if c > gpus):
        if (
            peak(
                changed(train={"distributed": train.distributed.model_copy(update={"strategy": "fsdp"})}),
                count,
            )
            <= gpu_bytes
        ):
            found.append(f"{count} GPUs under FSDP (--gpus {count}; train.distributed.strategy: fsdp)")
            break
    return found or [
        "none of 4-bit, an 8-bit optimizer, batch size 1 or up to 64 GPUs: a smaller model, or shorter samples"
    ]


def _knob_overrides(
    bits, double_quant, r, batch_size, grad_ckpt, optim, vision, language, attention, mlp, full, dtype,
    supervised_loss, objective=None,
) -> list[str]:  # fmt: skip
    """Knobs as recipe overrides, so the schema's defaults and checks apply to them too."""
    from vlmtune.errors import RecipeError

    out = []
    if bits is not None:
        if bits.lower() not in ("4", "8", *NO_QUANTIZATION):
            raise RecipeError(
                f"--bits {bits!r} is not one of 4, 8, 16", hint="--bits 4 (QLoRA), 8, or 16 (no quantization)"
            )
        out.append(f"quantization.bits={bits.lower()}")
    if full:
        out.append("lora.method=full")
        if bits is None:
            out.append("quantization.bits=null")
    pairs = {
        "quantization.double_quant": double_quant,
        "lora.r": r,
        "train.batch_size": batch_size,
        "train.gradient_checkpointing": grad_ckpt,
        "train.optim": optim,
        "lora.finetune_vision_layers": vision,
        "lora.finetune_language_layers": language,
        "lora.finetune_attention_modules": attention,
        "lora.finetune_mlp_modules": mlp,
        "model.dtype": dtype,
        "train.supervised_loss": supervised_loss,
        "train.objective": objective,
    }
    for key, value in pairs.items():
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _recipe(recipe: Path | None, model: str | None, overrides: list[str]):
    from vlmtune.recipe import load_recipe, parse_recipe

    if recipe is not None:
        return load_recipe(recipe, overrides)
    # A recipe with every default: the model, and a data file that is never read.
    text = json.dumps({"model": {"name": model}, "data": {"train": "unused.jsonl"}})
    return parse_recipe(text, source=f"--model {model}", overrides=overrides)


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


# --- rendering ----------------------------------------------------------------------------------------


def render(result) -> None:
    from rich.table import Table

    from vlmtune import units

    work = result.workload
    console.print(
        f"[bold]{result.model}[/] ({result.family}, {result.source}): "
        f"{units.human_count(result.total_params)} params"
        + (f" ({units.human_count(result.active_params)} active)" if result.active_params is not None else "")
        + f", {units.human_count(result.trainable_params)} trainable"
    )
    weights = Table(title="weights", title_justify="left", show_footer=True)
    weights.add_column("component", footer="total")
    weights.add_column("params", justify="right", footer=f"{result.total_params:,}")
    weights.add_column("dtype")
    weights.add_column("bytes", justify="right", footer=units.human_bytes(result.terms["weights"]))
    for c in result.components:
        weights.add_row(c.name, f"{c.params:,}", c.dtype, units.human_bytes(c.bytes))
    console.print(weights)

    terms = Table(title="peak memory of a training step", title_justify="left", show_footer=True)
    terms.add_column("term", footer="peak")
    terms.add_column("bytes", justify="right", footer=f"[bold]{units.human_bytes(result.peak_bytes)}[/]")
    terms.add_column("what")
    for name, value in result.terms.items():
        terms.add_row(name, units.human_bytes(value), describe_term(name, result))
    console.print(terms)
    if result.fit is not None:
        console.print(fit_text(result.fit, work))
    if result.per_gpu:
        render_per_gpu(result)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)


PER_GPU_TERMS = {
    "buckets": "DDP's gradient buckets: a second copy of the trainable gradients",
    "gathered": "FSDP: the root unit (embeddings, lm_head, projector) and two blocks gathered whole, with "
    "their gradients before the reduce-scatter",
}


def render_per_gpu(result) -> None:
    """One column per strategy: what each GPU holds when the run is spread over --gpus GPUs."""
    from rich.table import Table

    from vlmtune import units

    per_gpu = {p.strategy: p for p in result.per_gpu}
    table = Table(title=f"per GPU, spread over {result.gpus} GPUs", title_justify="left", show_footer=True)
    table.add_column("term", footer="peak per GPU")
    for strategy, p in per_gpu.items():
        table.add_column(strategy, justify="right", footer=f"[bold]{units.human_bytes(p.peak_bytes)}[/]")
    table.add_column("what")
    names = dict.fromkeys(name for p in per_gpu.values() for name in p.terms)
    for name in names:
        cells = [units.human_bytes(p.terms[name]) if name in p.terms else "-" for p in per_gpu.values()]
        what = PER_GPU_TERMS.get(name) or (
            "sharded over the GPUs under FSDP" if name in SHARDED else "per GPU"
        )
        table.add_row(name, *cells, what)
    console.print(table)
    if result.fit is not None:
        for strategy, p in per_gpu.items():
            verdict = (
                "[bold green]fits[/]" if p.peak_bytes <= result.fit.gpu_bytes else "[bold red]does not fit[/]"
            )
            console.print(f"{strategy}: {verdict} in {units.human_bytes(result.fit.gpu_bytes)} per GPU")


SHARDED = ("weights", "lora", "gradients", "optimizer")


def describe_term(name: str, result) -> str:
    from vlmtune import memory as mem

    training, work = result.training, result.workload
    lora_dtype = "bf16 (TRL casts adapters of a quantized model)" if training.quantized else "fp32"
    images = f" + {work.images_per_sample}x{work.image_tokens} image" if work.images_per_sample else ""
    if name == "weights":
        return f"{training.bits or 16}-bit base" + (
            " (double quant)" if training.bits == 4 and training.double_quant else ""
        )
    if name == "lora":
        if training.method == "full":
            return "full fine-tuning: no adapters"
        dora = " with DoRA magnitudes" if training.dora else ""
        return f"r={training.r} on {result.lora_targets} Linears{dora}, {lora_dtype}"
    if name == "gradients":
        return "one per trainable parameter, in its dtype"
    if name == "optimizer":
        return f"{training.optim} states"
    if name == "activations":
        ckpt = "gradient checkpointing" if training.gradient_checkpointing else "no checkpointing"
        rows = (
            f"{work.batch_size} x 2 (chosen, rejected)" if training.sequences == 2 else f"{work.batch_size}"
        )
        return f"{rows} x ({work.text_tokens:,} text{images}) tokens, {ckpt}"
    if name == "logits":
        if training.objective in ("dpo", "kto", "grpo"):
            return "TRL's chunked log-probabilities: one fp32 tile of logits"
        how = "supervised, chunked" if training.supervised_loss else "whole sequence"
        return f"fp32 logits ({how}) x {mem.LOGITS_MULTIPLE:g}"
    if name == "generation":
        return f"KV cache of {work.generations} sampled sequences x {work.sequence:,} tokens, sampling logits"
    if name == "reference":
        objective = training.objective
        if objective == "sft" or not training.reference:
            return f"none ({objective}{', beta 0' if objective == 'grpo' else ''})"
        if training.method == "full":
            return f"{objective}: a frozen copy of the weights"
        return (
            f"{objective}: the continued adapter, frozen (fp32)"
            if training.continues_adapter
            else f"{objective}: adapter disabled"
        )
    if name == "overhead":
        return "CUDA context (a constant)"
    return ""


def fit_text(fit, work) -> str:
    from vlmtune.units import human_bytes

    verdict = "[bold green]fits[/]" if fit.fits else "[bold red]does not fit[/]"
    lines = [
        f"{verdict} in {human_bytes(fit.gpu_bytes)} (headroom {human_bytes(fit.headroom_bytes)})",
        f"  largest batch size at {work.sequence:,} tokens per sample: {fit.max_batch_size}",
    ]
    if fit.max_seq_len < 0:
        lines.append(f"  at batch size {work.batch_size}, not even the image tokens fit")
    else:
        lines.append(
            f"  largest text length at batch size {work.batch_size}: {fit.max_seq_len:,} tokens "
            f"({fit.max_sequence:,} with the image tokens)"
        )
    return "\n".join(lines)


# --- parsing sizes --------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": GiB, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}


def parse_gpu_memory(text: str) -> int:
    """'24GB', '24 GiB', '80G', '16000MB', '24' (GB) -> bytes. GB and GiB both mean 2^30 bytes:
    cards sold as 24 GB hold 24 GiB."""
    from vlmtune.errors import VlmtuneError

    match = _SIZE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise VlmtuneError(
            f"cannot read --gpu-memory {text!r}",
            hint="write a positive size like 24GB, 80GiB, 16000MB or 24 (GB); GB means 2^30 bytes here",
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _UNITS[unit])


def parse_image_size(text: str) -> tuple[int, int]:
    from vlmtune.errors import VlmtuneError

    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise VlmtuneError(f"cannot read --image-size {text!r}", hint="write WIDTHxHEIGHT, e.g. 1024x768")
    return int(match.group(1)), int(match.group(2))
