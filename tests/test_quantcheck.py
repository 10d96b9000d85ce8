"""`vlmtune quant-check`: 16-bit vs the recipe's quantized loading on the user's own samples."""

from __future__ import annotations

import json
import math

import pytest

from vlmtune.after.quantcheck import MAX_KL, MIN_TOP1, Scored, compare, quant_check, verdict
from vlmtune.errors import RecipeError
from vlmtune.recipe import QuantizationSection, parse_recipe

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

DEMO = ROOT / "data" / "demo" / "train.jsonl"


def recipe_for(family: str, extra: str = ""):
    return parse_recipe(
        f"model: {{name: tiny:{family}}}\ndata: {{train: {DEMO}, max_image_pixels: {PIXEL_BUDGET}}}\n" + extra
    )


# --- the arithmetic ---------------------------------------------------------------------------------


def scored(probs: list[list[float]], targets: list[int]) -> Scored:
    import torch

    return Scored(torch.tensor(probs).log(), torch.tensor(targets))


def test_kl_top1_and_log_likelihood_change_by_hand():
    reference = scored([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]], [0, 1])
    other = scored([[0.25, 0.5, 0.25], [0.8, 0.1, 0.1]], [0, 1])
    (row,) = compare([reference], [other])
    first = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)  # the second token: identical, KL 0
    assert row["kl"] == pytest.approx(first / 2, abs=1e-6) and row["kl_max"] == pytest.approx(first, abs=1e-6)
    assert row["top1_agreement"] == 0.5  # argmax 0 vs 1, then 0 vs 0
    assert row["delta_logp"] == pytest.approx((math.log(0.25) - math.log(0.5)) / 2, abs=1e-6)
    (same,) = compare([reference], [reference])
    assert same["kl"] == 0 and same["top1_agreement"] == 1 and same["delta_logp"] == 0


def test_the_verdict_follows_the_documented_thresholds():
    close = [
        {"answer_tokens": 10, "kl": MAX_KL / 2, "kl_max": 0.1, "top1_agreement": 0.95, "delta_logp": -0.01}
    ]
    assert verdict(close)["qlora_advisable"] is True
    far = [{**close[0], "kl": MAX_KL * 4}]
    result = verdict(far)
    assert result["qlora_advisable"] is False and f"above {MAX_KL}" in result["verdict"]
    disagreeing = [{**close[0], "top1_agreement": MIN_TOP1 - 0.1}]
    assert "top-1 agreement" in verdict(disagreeing)["verdict"]
    # token-weighted: a long close sample outweighs a short far one
    mixed = [{**close[0], "answer_tokens": 90}, {**far[0], "answer_tokens": 10}]
    assert verdict(mixed)["kl"] == pytest.approx(0.9 * MAX_KL / 2 + 0.1 * MAX_KL * 4)
    with pytest.raises(RecipeError, match="no answer token|none of the checked samples"):
        verdict([{"answer_tokens": 0}])


# --- on tiny models ------------------------------------------------------------------------------------


def test_a_model_compared_with_itself_has_kl_zero_and_4bit_has_a_positive_kl():
    recipe = recipe_for("qwen3_5")  # Gated DeltaNet layers: the family Unsloth warns about
    itself = quant_check(recipe, samples=3, against=QuantizationSection(bits=None))
    assert itself["samples"] == 3 and itself["answer_tokens"] > 0
    assert itself["kl"] == 0.0 and itself["top1_agreement"] == 1.0 and itself["delta_logp"] == 0.0
    assert itself["qlora_advisable"] is True
    quantized = quant_check(recipe, samples=3)
    assert quantized["quantization"]["bits"] == 4 and quantized["answer_tokens"] == itself["answer_tokens"]
    assert quantized["kl"] > 0 and all(row["kl"] > 0 for row in quantized["per_sample"])
    assert quantized["weight_bytes"]["quantized"] < quantized["weight_bytes"]["16bit"]


def test_a_recipe_without_quantization_or_with_full_finetuning_is_refused():
    with pytest.raises(RecipeError, match="no quantization to check") as info:
        quant_check(recipe_for("qwen2_vl", "quantization: {bits: null}\n"))
    assert "quantization.bits=4" in info.value.hint
    with pytest.raises(RecipeError, match="lora.method is full") as info:
        quant_check(recipe_for("qwen2_vl", "quantization: {bits: null}\nlora: {method: full}\n"))
    assert "lora.method=lora" in info.value.hint


@pytest.mark.slow
def test_the_command_prints_json_for_scripts(tmp_path):
    recipe = write_recipe(
        tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": str(DEMO), "max_image_pixels": PIXEL_BUDGET}
    )
    done = vlmtune("quant-check", str(recipe), "--samples", "2", "--json", env_extra={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["samples"] == 2 and len(result["per_sample"]) == 2
    assert {"kl", "top1_agreement", "delta_logp", "qlora_advisable", "verdict", "thresholds"} <= set(result)
    refused = vlmtune("quant-check", str(recipe), "--set", "quantization.bits=null")
    assert refused.returncode == 2 and "no quantization to check" in refused.stderr
