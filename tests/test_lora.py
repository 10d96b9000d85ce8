"""LoRA stage, on the Qwen families: the options (regex, projector, peft knobs, seed) and the schema's
refusal of toggles that train nothing.

Every family's targets under every toggle combination: tests/test_family_training.py.
"""

from __future__ import annotations

import itertools

import pytest

from vlmtune.errors import RecipeError
from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection
from vlmtune.stages import load, lora

from conftest import PIXEL_BUDGET, QWEN_FAMILIES

TOGGLES = list(itertools.product([True, False], repeat=4))  # vision, language, attention, mlp


def load_4bit(family: str):
    return load.load(ModelSection(name=f"tiny:{family}"), QuantizationSection(), PIXEL_BUDGET, "cpu")


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def loaded(request):
    return load_4bit(request.param)


@pytest.mark.parametrize("vision, language, attention, mlp", TOGGLES)
def test_toggles_that_train_nothing_are_refused_by_the_schema(vision, language, attention, mlp):
    section = dict(
        finetune_vision_layers=vision,
        finetune_language_layers=language,
        finetune_attention_modules=attention,
        finetune_mlp_modules=mlp,
    )
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="would train nothing"):
            LoraSection(**section)
    else:
        LoraSection(**section)


def test_qwen2_5_vision_mlp_names_do_not_leak_into_language_only_lora():
    """Qwen2.5-VL's vision MLP reuses gate/up/down_proj: a suffix list would hit the vision tower."""
    loaded = load_4bit("qwen2_5_vl")
    plan = lora.plan(loaded.model, loaded.family, LoraSection(finetune_vision_layers=False))
    assert plan.targets and all(t.startswith("model.language_model.") for t in plan.targets)


def test_explicit_regex_override_and_a_regex_matching_nothing(loaded):
    plan = lora.plan(loaded.model, loaded.family, LoraSection(target_modules=r".*\.q_proj"))
    assert plan.targets and all(t.endswith(".q_proj") for t in plan.targets)
    with pytest.raises(RecipeError, match="match no Linear"):
        lora.plan(loaded.model, loaded.family, LoraSection(target_modules="nothing_here"))
    with pytest.raises(RecipeError, match="not a valid regex"):
        lora.plan(loaded.model, loaded.family, LoraSection(target_modules="(unclosed"))


def test_train_projector_makes_the_merger_fully_trainable():
    loaded = load_4bit("qwen2_vl")
    section = LoraSection(train_projector=True)
    plan = lora.plan(loaded.model, loaded.family, section)
    model = lora.apply(loaded.model, section, plan, seed=0)
    report = lora.trainable_report(model, loaded.family, plan)
    merger = sum(p.numel() for n, p in loaded.model.named_parameters() if "merger.modules_to_save" in n)
    assert plan.modules_to_save == ("model.visual.merger",)
    assert report["trainable_params"]["projector"] == merger > 0


def test_lora_options_reach_peft():
    loaded = load_4bit("qwen2_vl")
    section = LoraSection(r=8, alpha=32, dropout=0.1, use_rslora=True, bias="lora_only")
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section), seed=0)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.bias) == (
        8, 32, 0.1, True, "lora_only",
    )  # fmt: skip


# Two QLoRA steps per family (only LoRA moves, vision included): tests/test_family_training.py.


def lora_a_weights(seed: int) -> dict:
    loaded = load_4bit("qwen2_vl")
    section = LoraSection()
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section), seed=seed)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_the_seed_fixes_the_adapter_initialisation():
    """Two runs of one recipe must start from the same adapters, or they part ways at step 2."""
    first, again, other = lora_a_weights(7), lora_a_weights(7), lora_a_weights(8)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(first[n].equal(again[n]) for n in first)
    assert not any(first[n].equal(other[n]) for n in first)
