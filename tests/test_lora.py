"""LoRA stage: toggles select exactly the expected modules; training moves only what should move."""

from __future__ import annotations

import itertools

import pytest

from vlmtune.errors import RecipeError
from vlmtune.families import get_family
from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection
from vlmtune.stages import load, lora

from conftest import QWEN_FAMILIES, ROOT

TOGGLES = list(itertools.product([True, False], repeat=4))  # vision, language, attention, mlp


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def loaded(request):
    return load.load(ModelSection(name=f"tiny:{request.param}"), QuantizationSection(), 12544, "cpu")


def expected_targets(
    linear_names: list[str], vision: bool, language: bool, attention: bool, mlp: bool
) -> set:
    """Written from the module names themselves, independently of the Family record."""
    chosen = set()
    for name in linear_names:
        if name.startswith("model.visual.blocks."):
            tower_on = vision
            kind = "attention" if ".attn." in name else "mlp"
        elif name.startswith("model.language_model.layers."):
            tower_on = language
            kind = "attention" if ".self_attn." in name else "mlp"
        else:
            continue  # merger, lm_head, patch embedding: never LoRA targets
        if tower_on and (attention if kind == "attention" else mlp):
            chosen.add(name)
    return chosen


@pytest.mark.parametrize("vision, language, attention, mlp", TOGGLES)
def test_toggles_select_exactly_the_expected_modules(loaded, vision, language, attention, mlp):
    section = dict(
        finetune_vision_layers=vision,
        finetune_language_layers=language,
        finetune_attention_modules=attention,
        finetune_mlp_modules=mlp,
    )
    if not (vision or language) or not (attention or mlp):
        with pytest.raises(ValueError, match="would train nothing"):
            LoraSection(**section)
        return
    plan = lora.plan(loaded.model, loaded.family, LoraSection(**section))
    names = [linear["name"] for linear in loaded.report["linears"]]
    assert set(plan.targets) == expected_targets(names, vision, language, attention, mlp)
    assert plan.targets_per_component["projector"] == 0 and plan.targets_per_component["lm_head"] == 0


def test_qwen2_5_vision_mlp_names_do_not_leak_into_language_only_lora():
    """Qwen2.5-VL's vision MLP reuses gate/up/down_proj: a suffix list would hit the vision tower."""
    loaded = load.load(ModelSection(name="tiny:qwen2_5_vl"), QuantizationSection(), 12544, "cpu")
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
    loaded = load.load(ModelSection(name="tiny:qwen2_vl"), QuantizationSection(), 12544, "cpu")
    section = LoraSection(train_projector=True)
    plan = lora.plan(loaded.model, loaded.family, section)
    model = lora.apply(loaded.model, section, plan)
    report = lora.trainable_report(model, loaded.family, plan)
    merger = sum(p.numel() for n, p in loaded.model.named_parameters() if "merger.modules_to_save" in n)
    assert plan.modules_to_save == ("model.visual.merger",)
    assert report["trainable_params"]["projector"] == merger > 0


def test_lora_options_reach_peft():
    loaded = load.load(ModelSection(name="tiny:qwen2_vl"), QuantizationSection(), 12544, "cpu")
    section = LoraSection(r=8, alpha=32, dropout=0.1, use_rslora=True, bias="lora_only")
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.bias) == (
        8, 32, 0.1, True, "lora_only",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_two_steps_move_lora_weights_only_and_reach_the_vision_tower(family: str):
    """4-bit base, LoRA on both towers, non-reentrant checkpointing as in training."""
    import torch

    from vlmtune.collator import VisionCollator
    from vlmtune.data import load_split

    loaded = load.load(ModelSection(name=f"tiny:{family}"), QuantizationSection(), 12544, "cpu")
    section = LoraSection(r=8, alpha=16)
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    samples = load_split(str(ROOT / "data" / "demo" / "train.jsonl"), None, "error").samples[:4]
    batch = VisionCollator(
        loaded.processor, get_family(family), max_length=512, train_on_responses_only=True
    )(samples)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    vision_grad = 0.0
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        vision_grad += sum(
            p.grad.abs().sum().item()
            for n, p in trainable.items()
            if ".visual.blocks." in n and p.grad is not None
        )
        optimizer.step()
        optimizer.zero_grad()

    assert vision_grad > 0, "vision LoRA received no gradient"
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n in trainable if "lora_" in n}, "exactly the LoRA weights move"
    assert any(".visual.blocks." in n for n in changed) and any(".language_model." in n for n in changed)
