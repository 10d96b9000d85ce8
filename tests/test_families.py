"""Family records: detection from saved configs, and image-token arithmetic against the real processors."""

from __future__ import annotations

import json
import re

import pytest

from vlmtune.errors import ModelError
from vlmtune.model.families import FAMILIES, LLAVA, PIXTRAL, detect_family, family_names, get_family
from vlmtune.model.tiny import tiny_builder

NAMES = family_names()
SIZES = [(56, 56), (90, 30), (30, 90), (200, 130), (17, 41)]  # (width, height)


def test_every_family_has_a_unique_name_and_a_tiny_builder():
    assert len(set(NAMES)) == len(NAMES) == 25
    assert all(callable(tiny_builder(family)) for family in FAMILIES)


@pytest.mark.parametrize("family", NAMES)
def test_detection_from_the_saved_config(family: str, tiny_path):
    config = json.loads((tiny_path(family) / "config.json").read_text())
    assert detect_family(config).name == family


@pytest.mark.parametrize("family", NAMES)
def test_detection_from_a_loaded_config_object(family: str, tiny_path):
    from transformers import AutoConfig

    assert detect_family(AutoConfig.from_pretrained(tiny_path(family))).name == family


def test_a_llava_config_with_a_pixtral_tower_is_pixtral_and_with_clip_is_llava():
    assert detect_family({"model_type": "llava", "vision_config": {"model_type": "pixtral"}}) is PIXTRAL
    assert (
        detect_family({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}) is LLAVA
    )
    assert detect_family({"model_type": "llava"}) is LLAVA
    # FAMILIES order must not matter for the specific match
    assert FAMILIES.index(LLAVA) < FAMILIES.index(PIXTRAL)


def test_an_unknown_architecture_lists_every_family_and_the_guide():
    with pytest.raises(ModelError, match="unsupported architecture: model_type 'blip-2'") as info:
        detect_family({"model_type": "blip-2", "vision_config": {"model_type": "blip_2_vision_model"}})
    assert "blip_2_vision_model" in info.value.message
    for family in FAMILIES:
        assert family.title in info.value.hint
    assert "docs/adding-a-family.md" in info.value.hint


def test_an_unknown_family_name_lists_the_names():
    with pytest.raises(ModelError, match="unknown family 'gemma5'") as info:
        get_family("gemma5")
    assert "gemma3" in info.value.hint


@pytest.mark.parametrize("family", NAMES)
def test_the_records_vision_tokens_exist_in_the_tiny_tokenizer(family: str, tiny_path):
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    tokenizer = load_processor(tiny_path(family), record).tokenizer
    for token in (record.image_token, record.image_feature_token, *record.structural_tokens):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id is not None and token_id != tokenizer.unk_token_id, token


@pytest.mark.parametrize("family", NAMES)
def test_keep_16bit_names_full_prefixes_and_lm_head(family: str):
    record = get_family(family)
    keep = record.keep_16bit()
    assert keep[0] == record.vision_prefix and record.lm_head in keep
    # tower prefixes as module names; language Linears kept 16-bit as anchored regexes (model\\.language_model...)
    towers = (record.vision_prefix, *record.projector_prefixes, record.lm_head)
    assert all(p in towers or p.startswith(re.escape(record.language_prefix) + "\\.") for p in keep)


# --- image tokens ------------------------------------------------------------------------------


def count_feature_tokens(processor, record, width: int, height: int) -> int:
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(
        text=[text], images=[[Image.new("RGB", (width, height), (200, 30, 30))]], return_tensors="pt"
    )
    feature = processor.tokenizer.convert_tokens_to_ids(record.image_feature_token)
    return int((batch["input_ids"][0] == feature).sum())


@pytest.mark.parametrize("budget", [None, 2000])
@pytest.mark.parametrize("family", NAMES)
def test_tokens_per_image_matches_the_processor(family: str, budget, tiny_path):
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    processor = load_processor(tiny_path(family), record, budget)
    settings = record.image_settings(processor)
    for width, height in SIZES:
        expected = count_feature_tokens(processor, record, width, height)
        assert record.tokens_per_image(width, height, settings) == expected, (width, height)


# Released-checkpoint settings put onto the tiny processors: the arithmetic must hold at full scale
# too (tiling, pooling and budget branches the tiny sizes never reach).
def _qwen(processor):
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 12845056}


def _llava_next(processor):
    ip = processor.image_processor
    ip.size, ip.crop_size = {"shortest_edge": 336}, {"height": 336, "width": 336}
    ip.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _onevision(processor):
    processor.vision_aspect_ratio = "anyres_max_1"  # pools every grid above one tile


def _pixtral(processor):
    processor.image_processor.size = {"longest_edge": 1024}


def _idefics3(processor):
    processor.image_processor.size = {"longest_edge": 4 * 364}
    processor.image_processor.max_image_size = {"longest_edge": 364}
    processor.image_seq_len = 169


def _internvl(processor):
    processor.image_processor.size = {"height": 448, "width": 448}
    processor.image_processor.max_patches = 12
    processor.image_seq_length = 256


def _glm(processor):
    processor.image_processor.size = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}


def _llama4(processor):
    processor.image_processor.size = {"height": 336, "width": 336}
    processor.image_processor.max_patches = 16


def _gemma4(processor):
    processor.image_processor.max_soft_tokens = 280


def _aya_vision(processor):
    processor.image_processor.size = {"height": 364, "width": 364}
    processor.image_processor.max_patches = 12
    processor.img_size, processor.patch_size = 364, 28


def _lfm2_vl(processor):
    ip = processor.image_processor  # LFM2-VL-1.6B's: tiles of 512 pixels, 16-pixel patches, 64..256 tokens
    ip.encoder_patch_size, ip.tile_size, ip.max_tiles = 16, 512, 10
    ip.min_image_tokens, ip.max_image_tokens = 64, 256


def _minicpm(processor):
    ip = processor.image_processor
    ip.patch_size, ip.scale_resolution, ip.max_slice_nums = 14, 448, 9


RELEASED = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "llava_next": _llava_next,
    "llava_onevision": _onevision,
    "pixtral": _pixtral,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "internvl": _internvl,
    "gemma4": _gemma4,
    "glm4v": _glm,
    "glm46v": _glm,
    "aya_vision": _aya_vision,
    "minicpmv4_6": _minicpm,
    "glm4v_moe": _glm,
    "llama4": _llama4,
    "lfm2_vl": _lfm2_vl,
}


@pytest.mark.parametrize("family", sorted(RELEASED))
def test_tokens_per_image_at_released_settings(family: str, tiny_path):
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    processor = load_processor(tiny_path(family), record)
    RELEASED[family](processor)
    settings = record.image_settings(processor)
    for width, height in [(1200, 900), (500, 1400), (300, 300)]:
        expected = count_feature_tokens(processor, record, width, height)
        assert record.tokens_per_image(width, height, settings) == expected, (width, height)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES if f.pixel_budget is not None])
def test_a_smaller_pixel_budget_never_gives_more_tokens(family: str, tiny_path):
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    counts = []
    for budget in (None, 4000, 1200):
        processor = load_processor(tiny_path(family), record, budget)
        counts.append(count_feature_tokens(processor, record, 200, 160))
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2], counts


def test_missing_settings_raise_a_value_error_naming_the_field():
    from vlmtune.model.image_tokens import ImageSettings

    with pytest.raises(ValueError, match="grid_pinpoints"):
        get_family("llava_next").tokens_per_image(
            100, 100, ImageSettings(image_size=336, tokens_per_tile=576)
        )
    with pytest.raises(ValueError, match="tokens_per_tile"):
        get_family("gemma3").tokens_per_image(100, 100, ImageSettings())


def test_qwen_extreme_aspect_ratio_rounds_like_smart_resize():
    """A 13-pixel side rounds to zero tiles before the min_pixels check, as the processor does."""
    from vlmtune.model.image_tokens import ImageSettings, qwen_tokens

    settings = ImageSettings(min_pixels=3136, max_pixels=50176, patch_size=14, merge_size=2)
    assert qwen_tokens(13, 200, settings) == 8


def test_a_checkpoint_without_a_chat_template_gets_the_familys(tmp_path, tiny_path):
    """Released PaliGemma checkpoints ship no chat template; vlmtune supplies a prefix-stable one."""
    import shutil

    from vlmtune.model.families import PALIGEMMA_CHAT_TEMPLATE
    from vlmtune.model.processing import load_processor

    folder = tmp_path / "paligemma"
    shutil.copytree(tiny_path("paligemma"), folder)
    (folder / "chat_template.jinja").unlink()
    processor = load_processor(folder, get_family("paligemma"))
    assert processor.chat_template == PALIGEMMA_CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption en"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == "<image>caption en\nA red square.<eos>"


def test_the_support_matrix_names_every_family_and_its_inputs():
    from conftest import ROOT

    matrix = (ROOT / "docs" / "families.md").read_text(encoding="utf-8")
    rows: dict[str, str] = {}
    for line in matrix.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)  # the first table: the matrix
    for family in FAMILIES:
        row = rows[family.title]
        assert all(f"`{model_type}`" in row for model_type in family.model_types), family.title
        assert all(name in row for name in family.extra_inputs), family.title
    assert (ROOT / "docs" / "adding-a-family.md").is_file()


def test_a_record_that_refuses_an_objective_stops_it_with_the_reason():
    import dataclasses

    from vlmtune.model.families import check_objective

    record = dataclasses.replace(
        get_family("qwen3_5"), refused_objectives=(("grpo", "its rollouts cannot be scored"),)
    )
    check_objective(record, "sft")  # the others pass
    with pytest.raises(
        ModelError, match="cannot be trained with train.objective: grpo: its rollouts"
    ) as info:
        check_objective(record, "grpo")
    assert "train.objective" in info.value.hint
    refusing = {
        family.name: dict(family.refused_objectives) for family in FAMILIES if family.refused_objectives
    }
    assert {name: list(refused) for name, refused in refusing.items()} == {
        "glm4v_moe": ["dpo", "kto"],
        "llama4": ["dpo", "kto", "grpo"],
        "mllama": ["kto"],
    }, "mllama: its cross-attention mask runs over the tokens; KTO's KL sequences are of other lengths"


@pytest.mark.parametrize("family", NAMES)
def test_the_memory_models_skip_rule_is_transformers_own(family: str):
    """estimate-memory decides what 4-bit reaches with families.skipped_by; loading asks transformers."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from vlmtune.model.families import skipped_by

    record = get_family(family)
    patterns = record.keep_16bit()
    names = [
        record.vision_prefix + ".blocks.0.attn.qkv",
        record.language_prefix + ".layers.0.self_attn.q_proj",
        record.language_prefix + ".layers.3.linear_attn.in_proj_a",
        record.language_prefix + ".layers.3.linear_attn.in_proj_qkv",
        record.language_prefix + ".layers.1.mlp.gate",
        record.language_prefix + ".layers.1.mlp.gate_proj",
        record.language_prefix + ".layers.1.router.proj",
        record.language_prefix + ".layers.1.mlp.shared_expert_gate",
        "lm_head",
    ]
    for name in names:
        assert skipped_by(name, patterns) is (not should_convert_module(name, patterns)), name
