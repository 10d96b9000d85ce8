"""quant-check: what the recipe's 4-bit (or 8-bit) loading costs this model on the user's own samples.

Before any training, the model is loaded twice, one after the other (never both at once): in the
recipe's 16-bit dtype, then quantized as the recipe asks. Each loading scores the same samples,
teacher-forced, and keeps the next-token distributions at the answer tokens only (the tokens SFT
trains on: the collator's labels). Per sample:

- ``kl``: the mean over answer tokens of KL(p_16bit || p_quantized), in nats per token;
- ``top1_agreement``: the share of answer tokens whose most likely next token is the same;
- ``delta_logp``: the change of the answers' log-likelihood, per token (quantized minus 16-bit;
  negative: the quantized model finds the user's answers less likely).

The verdict: QLoRA is advisable when the mean KL is at most ``MAX_KL`` and the top-1 agreement at
least ``MIN_TOP1`` (docs/quant-check.md says where the numbers come from). A model compared with
itself gives KL 0 and agreement 1 exactly: the forward passes are deterministic.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

from vlmtune.errors import RecipeError

# The documented thresholds (docs/quant-check.md): mean KL per answer token, top-1 agreement.
MAX_KL = 0.05
MIN_TOP1 = 0.90
DEFAULT_SAMPLES = 8


@dataclass(frozen=True)
class Scored:
    """One loading's view of one sample: log-probabilities at the answer positions, and the answer."""

    log_probs: Any  # float32 (answer tokens, vocabulary), on the CPU
    targets: Any  # the answer token ids, (answer tokens,)


def answer_log_probs(model: Any, collator: Any, samples: list, device: str) -> list[Scored]:
    """Next-token log-probabilities at every answer token of each sample (one sample per forward)."""
    import torch

    from vlmtune.constants import IGNORE_INDEX

    out = []
    model.eval()
    for sample in samples:
        batch = collator([sample])
        labels = batch.pop("labels")[0]
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0]
        # the logits at position i predict token i + 1
        targets = labels[1:]
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
        chosen = logits[:-1][kept.to(logits.device)].float().log_softmax(-1).cpu()
        out.append(Scored(chosen, targets[kept].cpu()))
    return out


def compare(reference: list[Scored], other: list[Scored]) -> list[dict]:
    """Per sample: KL(reference || other) per answer token, top-1 agreement, log-likelihood change."""
    import torch

    rows = []
    for index, (ref, oth) in enumerate(zip(reference, other, strict=True)):
        if not torch.equal(ref.targets, oth.targets):  # the same collator on the same samples
            raise RuntimeError(f"sample {index}: the two loadings saw different answer tokens")
        tokens = int(ref.targets.numel())
        if not tokens:
            rows.append({"sample": index, "answer_tokens": 0, "kl": None, "top1_agreement": None,
                         "delta_logp": None})  # fmt: skip
            continue
        kl = (ref.log_probs.exp() * (ref.log_probs - oth.log_probs)).sum(-1).clamp_min(0)
        agree = (ref.log_probs.argmax(-1) == oth.log_probs.argmax(-1)).float()
        picked = ref.targets[:, None]
        delta = oth.log_probs.gather(-1, picked) - ref.log_probs.gather(-1, picked)
        rows.append(
            {
                "sample": index,
                "answer_tokens": tokens,
                "kl": float(kl.mean()),
                "kl_max": float(kl.max()),
                "top1_agreement": float(agree.mean()),
                "delta_logp": float(delta.mean()),
            }
        )
    return rows


def verdict(rows: list[dict], max_kl: float = MAX_KL, min_top1: float = MIN_TOP1) -> dict:
    """Token-weighted means over the samples and the advice they give."""
    scored = [r for r in rows if r["answer_tokens"]]
    tokens = sum(r["answer_tokens"] for r in scored)
    if not tokens:
        raise RecipeError(
            "none of the checked samples has an answer token to compare",
            hint="quant-check scores the assistant answers: check data.train with `vlmtune data check`",
        )

    def mean(key: str) -> float:
        return sum(r[key] * r["answer_tokens"] for r in scored) / tokens

    kl, top1 = mean("kl"), mean("top1_agreement")
    advisable = kl <= max_kl and top1 >= min_top1
    reasons = []
    if kl > max_kl:
        reasons.append(f"mean KL {kl:.4f} nats/token is above {max_kl}")
    if top1 < min_top1:
        reasons.append(f"top-1 agreement {top1:.1%} is below {min_top1:.0%}")
    return {
        "answer_tokens": tokens,
        "kl": kl,
        "kl_max": max(r["kl_max"] for r in scored),
        "top1_agreement": top1,
        "delta_logp": mean("delta_logp"),
        "qlora_advisable": advisable,
        "thresholds": {"max_kl": max_kl, "min_top1": min_top1},
        "verdict": "QLoRA advisable: the quantized model predicts the answers as the 16-bit one does"
        if advisable
        else "QLoRA not advisable: "
        + "; ".join(reasons)
        + " (train in 16-bit LoRA, or try quantization.bits: 8)",
    }


def _score(recipe: Any, quantization: Any, samples: list, device: str) -> tuple[list[Scored], dict]:
    from vlmtune.data.collator import VisionCollator
    from vlmtune.stages import load

    loaded = load.load(recipe.model, quantization, recipe.data.max_image_pixels, device)
    collator = VisionCollator(loaded.processor, loaded.family, max_length=None, train_on_responses_only=True)
    scored = answer_log_probs(loaded.model, collator, samples, device)
    facts = {"family": loaded.family.name, "bytes": loaded.report["total_bytes"]}
    del loaded, collator
    gc.collect()
    _free_cuda()
    return scored, facts


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quant_check(
    recipe: Any, *, samples: int = DEFAULT_SAMPLES, against: Any = None, max_kl: float = MAX_KL,
    min_top1: float = MIN_TOP1,
) -> dict:  # fmt: skip
    """The recipe's model in 16-bit, then as ``against`` (default: the recipe's quantization section).

    Samples are the first ``samples`` usable ones of data.train. Returns the JSON document.
    """
    from vlmtune.data.preflight import read_split
    from vlmtune.model.checkpoint import choose_device
    from vlmtune.recipe import QuantizationSection

    quantization = against if against is not None else recipe.quantization
    if recipe.lora.method == "full" and against is None:
        raise RecipeError(
            "quant-check compares 16-bit with the recipe's quantized loading, but lora.method is full "
            "(full fine-tuning never loads 4-bit)",
            hint="check the QLoRA recipe you are weighing: --set lora.method=lora",
        )
    if quantization.bits is None and against is None:
        raise RecipeError(
            "the recipe loads the model in 16-bit (quantization.bits: null): there is no quantization to check",
            hint="check the quantization you are weighing: --set quantization.bits=4",
        )
    device = choose_device(recipe.train.device)
    split = read_split(recipe.data.train, recipe.data)
    chosen = split.samples[:samples]
    reference, base = _score(recipe, QuantizationSection(bits=None), chosen, device)
    other, quantized = _score(recipe, quantization, chosen, device)
    rows = compare(reference, other)
    return {
        "model": recipe.model.name,
        "family": base["family"],
        "device": device,
        "quantization": {
            "bits": quantization.bits,
            "quant_type": quantization.quant_type,
            "double_quant": quantization.double_quant,
        },  # fmt: skip
        "dtype": recipe.model.dtype,
        "samples": len(rows),
        "weight_bytes": {"16bit": base["bytes"], "quantized": quantized["bytes"]},
        **verdict(rows, max_kl, min_top1),
        "per_sample": rows,
    }


def render(result: dict, console: Any) -> None:
    from rich.table import Table

    from vlmtune import units

    q = result["quantization"]
    label = f"{q['bits']}-bit {q['quant_type']}" if q["bits"] == 4 else f"{q['bits']}-bit"
    console.print(
        f"[bold]{result['model']}[/] ({result['family']}): {result['dtype']} vs {label}, "
        f"{result['samples']} samples, {result['answer_tokens']} answer tokens; weights "
        f"{units.human_bytes(result['weight_bytes']['16bit'])} -> {units.human_bytes(result['weight_bytes']['quantized'])}"
    )
    table = Table(show_footer=True)
    table.add_column("sample", footer="all")
    table.add_column("answer tokens", justify="right", footer=str(result["answer_tokens"]))
    table.add_column("KL (nats/token)", justify="right", footer=f"{result['kl']:.4f}")
    table.add_column("top-1 agreement", justify="right", footer=f"{result['top1_agreement']:.1%}")
    table.add_column("delta log-lik/token", justify="right", footer=f"{result['delta_logp']:+.4f}")
    for row in result["per_sample"]:
        if not row["answer_tokens"]:
            table.add_row(str(row["sample"]), "0", "-", "-", "-")
            continue
        table.add_row(str(row["sample"]), str(row["answer_tokens"]), f"{row['kl']:.4f}",
                      f"{row['top1_agreement']:.1%}", f"{row['delta_logp']:+.4f}")  # fmt: skip
    console.print(table)
    style = "green" if result["qlora_advisable"] else "yellow"
    thresholds = result["thresholds"]
    console.print(
        f"[{style}]{result['verdict']}[/] (thresholds: mean KL <= {thresholds['max_kl']}, "
        f"top-1 agreement >= {thresholds['min_top1']:.0%})"
    )
