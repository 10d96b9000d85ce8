"""Load stage, on the Qwen families: the model report's bytes, the quantization knobs, the errors.

The 4-bit map (every language Linear 4-bit, nothing else) is checked for every family in
tests/test_family_training.py.
"""

from __future__ import annotations

import pytest

from vlmtune.errors import ModelError
from vlmtune.model.checkpoint import read_config
from vlmtune.recipe import ModelSection, QuantizationSection
from vlmtune.stages import load

from conftest import PIXEL_BUDGET, QWEN_FAMILIES


def _load(family: str, **quant):
    return load.load(ModelSection(name=f"tiny:{family}"), QuantizationSection(**quant), PIXEL_BUDGET, "cpu")


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_report_counts_params_and_bytes_per_component(family: str):
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.checkpoint import resolve_model_path

    report = _load(family, double_quant=False).report
    plain = AutoModelForImageTextToText.from_pretrained(resolve_model_path(f"tiny:{family}"))
    assert report["total_params"] == sum(p.numel() for p in plain.parameters())
    language = report["components"]["language"]
    vision = report["components"]["vision"]
    assert language["quantized_linears"] == language["linears"] > 0
    assert vision["quantized_linears"] == 0
    # 16-bit vision weights: 2 bytes per parameter.
    assert vision["bytes"] == 2 * vision["params"]
    # 4-bit language Linears cost far less than 2 bytes per parameter.
    assert language["bytes"] < 2 * language["params"]


def test_no_quantization_keeps_every_linear_16bit():
    loaded = _load("qwen2_vl", bits=None)
    assert not any(linear["quantized"] for linear in loaded.report["linears"])
    assert {linear["dtype"] for linear in loaded.report["linears"]} == {"bfloat16"}


def test_keep_16bit_prefix_keeps_a_language_layer_out_of_4bit():
    loaded = _load("qwen2_vl", keep_16bit=["model.language_model.layers.0"])
    for linear in loaded.report["linears"]:
        if linear["name"].startswith("model.language_model.layers.0."):
            assert not linear["quantized"]
        elif linear["name"].startswith("model.language_model.layers.1."):
            assert linear["quantized"]


def test_keep_16bit_that_names_nothing_is_an_error():
    with pytest.raises(ModelError, match="names no module"):
        _load("qwen2_vl", keep_16bit=["visual"])  # a bare name, the classic mistake


def test_missing_model_folder_and_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        read_config(str(tmp_path))
    with pytest.raises(ModelError, match="cannot read the model config") as info:
        read_config(str(tmp_path / "no-such-model"))
    assert "tiny:FAMILY" in info.value.hint


def test_unknown_architecture_lists_supported_families():
    from vlmtune.model.families import detect_family

    with pytest.raises(ModelError, match="unsupported architecture: model_type 'bert'") as info:
        detect_family({"model_type": "bert"})
    assert "Qwen2-VL" in info.value.hint and "adding-a-family.md" in info.value.hint
