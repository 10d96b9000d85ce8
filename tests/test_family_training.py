"""Every family through the stages: 4-bit load, LoRA targets, collator labels, two training steps.

This is the one place for checks that hold for every family; tests/test_load.py, test_lora.py and
test_collator.py keep what is specific to one family or to one stage's options. Expected module
sets are written from the module names of the loaded model (tower roots and the parent module of
each Linear), not from the Family records they check.
"""

from __future__ import annotations

import itertools

import pytest

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import Sample
from vlmtune.data.collator import VisionCollator, align_expanded
from vlmtune.errors import ModelError
from vlmtune.model.families import family_names, get_family
from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection
from vlmtune.stages import load, lora

from conftest import ONE_IMAGE, PIXEL_BUDGET, TEXT_ONLY, TWO_TURNS

NAMES = family_names()
TOGGLES = list(itertools.product([True, False], repeat=4))  # vision, language, attention, mlp

# Where each tower's repeated blocks live (a tower's other Linears are never LoRA targets).
VISION_BLOCKS = {
    "qwen2_vl": ("model.visual.blocks.",),
    "qwen2_5_vl": ("model.visual.blocks.",),
    "qwen3_vl": ("model.visual.blocks.",),
    "llava": ("model.vision_tower.encoder.layers.",),
    "llava_next": ("model.vision_tower.encoder.layers.",),
    "llava_onevision": ("model.vision_tower.encoder.layers.",),
    "pixtral": ("model.vision_tower.transformer.layers.",),
    "mistral3": ("model.vision_tower.transformer.layers.",),
    "gemma3": ("model.vision_tower.encoder.layers.",),
    "mllama": ("model.vision_model.transformer.layers.", "model.vision_model.global_transformer.layers."),
    "idefics3": ("model.vision_model.encoder.layers.",),
    "smolvlm": ("model.vision_model.encoder.layers.",),
    "paligemma": ("model.vision_tower.encoder.layers.",),
    "internvl": ("model.vision_tower.encoder.layer.",),
    "qwen3_5": ("model.visual.blocks.",),
    "qwen3_vl_moe": ("model.visual.blocks.",),
    "qwen3_5_moe": ("model.visual.blocks.",),
    "gemma4": ("model.vision_tower.encoder.layers.",),
    "glm4v": ("model.visual.blocks.",),
    "glm46v": ("model.visual.blocks.",),
    "aya_vision": ("model.vision_tower.encoder.layers.",),
    "minicpmv4_6": ("model.vision_tower.encoder.layers.", "model.vision_tower.vit_merger."),
    "glm4v_moe": ("model.visual.blocks.",),
    "llama4": ("vision_model.model.layers.",),  # no `model.` wrapper in Llama 4
    "lfm2_vl": ("model.vision_tower.encoder.layers.",),
}
LANGUAGE_BLOCKS = {name: ("model.text_model.layers.",) if name in ("idefics3", "smolvlm") else
                   ("model.language_model.layers.",) for name in NAMES}  # fmt: skip
LANGUAGE_BLOCKS["llama4"] = ("language_model.model.layers.",)
ATTENTION_PARENTS = {"self_attn", "cross_attn", "attn", "attention", "linear_attn", "conv"}  # conv: LFM2's
MLP_PARENTS = {"mlp", "feed_forward", "shared_expert", "shared_experts"}
# Fused expert tensors (3-D parameters) of the MoE families, read from the loaded model's names.
EXPERT_TENSORS = (".experts.gate_up_proj", ".experts.down_proj")
# Language Linears that stay 16-bit and untrained: gates with a few outputs per head or one per token
# (Gated DeltaNet's decay and write strength, the shared expert's gate).
LANGUAGE_16BIT = {
    "qwen3_5": ("linear_attn.in_proj_a", "linear_attn.in_proj_b"),
    "qwen3_5_moe": ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.shared_expert_gate"),
    "gemma4": ("router.proj",),  # the MoE router is a Linear here: never quantized, never a target
    "minicpmv4_6": ("linear_attn.in_proj_a", "linear_attn.in_proj_b"),
    "llama4": ("feed_forward.router",),  # likewise (a Linear subclass)
}

# What the labels keep of the two-turn sample: each answer and the end of its turn, per template.
TRAINED_TEXT = {
    "qwen2_vl": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "qwen2_5_vl": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "qwen3_vl": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "llava": " There are two.</s> Red.</s>",
    "llava_next": " There are two.</s> Red.</s>",
    "llava_onevision": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "pixtral": "There are two.</s>Red.</s>",
    "mistral3": "There are two.</s>Red.</s>",
    "gemma3": "There are two.<end_of_turn>\nRed.<end_of_turn>\n",
    "mllama": "There are two.<|eot_id|>Red.<|eot_id|>",
    "idefics3": " There are two.<end_of_utterance>\n Red.<end_of_utterance>\n",
    "smolvlm": " There are two.<end_of_utterance>\n Red.<end_of_utterance>\n",
    "paligemma": "There are two.<eos>Red.<eos>",
    "internvl": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "qwen3_5": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "qwen3_vl_moe": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "qwen3_5_moe": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "gemma4": "There are two.<turn|>\nRed.<turn|>\n",
    # GLM-4's template ends no answer: the collator appends eos to each (as for Llava-1.5's released one)
    "glm4v": "There are two.<|endoftext|>Red.<|endoftext|>",
    "glm46v": "There are two.<|endoftext|>Red.<|endoftext|>",
    "aya_vision": "There are two.<|END_OF_TURN_TOKEN|>Red.<|END_OF_TURN_TOKEN|>",
    "minicpmv4_6": "There are two.<|im_end|>\nRed.<|im_end|>\n",
    "glm4v_moe": "There are two.<|endoftext|>Red.<|endoftext|>",
    "llama4": "There are two.<|eot|>Red.<|eot|>",
    "lfm2_vl": "There are two.<|im_end|>\nRed.<|im_end|>\n",
}
APPENDS_STOP = {"glm4v", "glm46v", "glm4v_moe"}
NEEDS_AN_IMAGE = {"paligemma"}  # its processor refuses a text-only row


def samples_for(family: str) -> list[Sample]:
    return [TWO_TURNS, ONE_IMAGE] + ([] if family in NEEDS_AN_IMAGE else [TEXT_ONLY])


def load_4bit(family: str):
    return load.load(ModelSection(name=f"tiny:{family}"), QuantizationSection(), PIXEL_BUDGET, "cpu")


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    return load_4bit(request.param)


def expected_targets(loaded, vision: bool, language: bool, attention: bool, mlp: bool) -> set[str]:
    name = loaded.family.name
    chosen = set()
    for linear in loaded.report["linears"]:
        module = linear["name"]
        parts = module.removesuffix(".linear").split(".")  # Gemma 4's vision Linears: q_proj.linear
        parent = parts[-2] if len(parts) > 1 else ""
        in_vision = module.startswith(VISION_BLOCKS[name])
        in_language = module.startswith(LANGUAGE_BLOCKS[name]) and not module.endswith(
            LANGUAGE_16BIT.get(name, ())
        )
        if not ((vision and in_vision) or (language and in_language)):
            continue
        if (attention and parent in ATTENTION_PARENTS) or (mlp and parent in MLP_PARENTS):
            chosen.add(module)
    return chosen


# --- load ----------------------------------------------------------------------------------------


def test_every_language_linear_is_4bit_and_nothing_else_is(loaded):
    linears = loaded.report["linears"]
    by_component = {
        c: [lin for lin in linears if lin["component"] == c] for c in ("vision", "language", "lm_head")
    }
    assert all(by_component.values()), "vision, language and lm_head Linears were found"
    kept = LANGUAGE_16BIT.get(loaded.family.name, ())
    for linear in linears:
        quantized = linear["component"] == "language" and not linear["name"].endswith(kept)
        assert linear["quantized"] is quantized, linear
    assert not [lin["name"] for lin in linears if lin["component"] == "other"], "every Linear has a component"
    modules = dict(loaded.model.named_modules())
    assert type(modules[loaded.family.lm_head]).__name__ == "Linear"
    # the first self-attention output projection (Qwen3.5's layer 0 is linear attention, Mllama's cross-attention,
    # LFM2's a short convolution; LFM2 calls it out_proj)
    prefix = loaded.family.language_prefix
    language = next(
        n for n in modules if n.startswith(prefix) and n.endswith(("self_attn.o_proj", "self_attn.out_proj"))
    )
    assert type(modules[language]).__name__ == "Linear4bit"
    for name in kept:
        assert any(lin["name"].endswith(name) and not lin["quantized"] for lin in linears), name


# --- lora ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vision, language, attention, mlp",
    [t for t in TOGGLES if (t[0] or t[1]) and (t[2] or t[3])],  # the others train nothing: refused
)
def test_lora_targets_exactly_the_expected_modules(loaded, vision, language, attention, mlp):
    section = LoraSection(
        finetune_vision_layers=vision,
        finetune_language_layers=language,
        finetune_attention_modules=attention,
        finetune_mlp_modules=mlp,
    )
    plan = lora.plan(loaded.model, loaded.family, section)
    expected = expected_targets(loaded, vision, language, attention, mlp)
    assert set(plan.targets) == expected
    per_component = plan.targets_per_component
    # Fused experts are parameters, not Linears: the MLP toggle of the language tower reaches them.
    experts = {n for n, _ in loaded.model.named_parameters() if n.endswith(EXPERT_TENSORS)}
    assert set(plan.expert_parameters) == (experts if language and mlp else set())
    reached_language = per_component["language"] > 0 or bool(plan.expert_parameters)
    assert (per_component["vision"] > 0) is vision and reached_language is language
    assert per_component["projector"] == per_component["lm_head"] == per_component["other"] == 0


def test_mllama_cross_attention_layers_get_lora():
    loaded = load_4bit("mllama")
    plan = lora.plan(loaded.model, loaded.family, LoraSection(finetune_vision_layers=False))
    cross = {t for t in plan.targets if ".cross_attn." in t}
    assert {t.rsplit(".", 1)[-1] for t in cross} == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("family", ["pixtral", "mistral3"])
def test_pixtral_vision_tower_shares_names_with_the_language_model_yet_stays_apart(family: str):
    """Pixtral's vision attention is attention.q_proj ...: a suffix list would mix the towers."""
    loaded = load_4bit(family)
    language_only = lora.plan(loaded.model, loaded.family, LoraSection(finetune_vision_layers=False))
    vision_only = lora.plan(loaded.model, loaded.family, LoraSection(finetune_language_layers=False))
    assert all(t.startswith("model.language_model.") for t in language_only.targets)
    assert all(t.startswith("model.vision_tower.") for t in vision_only.targets)
    assert {t.rsplit(".", 1)[-1] for t in vision_only.targets} & {"q_proj", "gate_proj"}


# --- collator --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def collator(request, tiny_path):
    from vlmtune.model.processing import load_processor

    family = get_family(request.param)
    processor = load_processor(tiny_path(request.param), family, PIXEL_BUDGET)
    return VisionCollator(processor, family, max_length=None, train_on_responses_only=True)


def trained_text(collator, batch, row: int) -> str:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return collator.tokenizer.decode(
        [int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    )


def test_labels_keep_the_answers_only(collator):
    name = collator.family.name
    batch = collator(samples_for(name))
    assert trained_text(collator, batch, 0) == TRAINED_TEXT[name]
    kept = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][kept] == batch["input_ids"][kept]).all()
    for prompt in ("How many images?", "Which is first?", "Be brief.", "What color is it?", "Hello"):
        for row in range(batch["input_ids"].shape[0]):
            assert prompt not in trained_text(collator, batch, row)


def test_pad_and_every_vision_token_are_masked(collator):
    import torch

    batch = collator(samples_for(collator.family.name))
    ids, labels = batch["input_ids"], batch["labels"]
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["attention_mask"] == 0).any(), "rows of different lengths were padded"
    seen = 0
    for token in collator.family.vision_tokens:
        positions = ids == collator.tokenizer.convert_tokens_to_ids(token)
        seen += int(positions.sum())
        assert (labels[positions] == IGNORE_INDEX).all(), token
    feature = ids == collator.tokenizer.convert_tokens_to_ids(collator.family.image_feature_token)
    assert feature.any() and seen >= int(feature.sum())
    # The one-image row holds exactly the tokens the family's arithmetic predicts for that image.
    settings = collator.family.image_settings(collator.processor)
    assert int(feature[1].sum()) == collator.family.tokens_per_image(56, 56, settings)
    assert torch.is_tensor(batch["pixel_values"])


def test_the_batch_carries_exactly_the_extra_inputs_of_the_record(collator):
    batch = collator(samples_for(collator.family.name))
    basics = {"input_ids", "attention_mask", "pixel_values", "labels"}
    assert set(batch) - basics == set(collator.family.extra_inputs)


def test_every_token_of_an_answer_is_trained_without_responses_only(collator):
    everything = VisionCollator(
        collator.processor, collator.family, max_length=None, train_on_responses_only=False
    )
    batch = everything(samples_for(collator.family.name))
    text = trained_text(everything, batch, 0)
    assert "How many images?" in text and "There are two." in text
    for token in collator.family.vision_tokens:
        assert token not in text


def test_no_second_bos_when_the_template_writes_one(collator):
    batch = collator([ONE_IMAGE])
    bos = collator.tokenizer.bos_token_id  # None for ChatML families: nothing to double
    assert bos is None or int((batch["input_ids"][0] == bos).sum()) == 1


def test_templates_that_end_answers_with_a_stop_token_are_rendered_as_they_are(collator):
    expected = collator.tokenizer.eos_token if collator.family.name in APPENDS_STOP else None
    assert collator.appended_stop == expected


# llava-hf/llava-1.5-*'s released template: each answer ends with a space, no </s>.
LLAVA_1_5_RELEASED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_template_without_a_stop_token_gets_eos_after_each_answer():
    """Without it a Llava-1.5 model never learns to stop: its template ends answers with a space."""
    import copy

    from vlmtune.model.processing import load_processor
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("llava")
    processor = copy.copy(load_processor(tiny_model_path("llava"), family, PIXEL_BUDGET))
    processor.chat_template = LLAVA_1_5_RELEASED_TEMPLATE
    collator = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)
    assert collator.appended_stop == "</s>"
    assert collator.render(TWO_TURNS.messages).endswith("ASSISTANT: Red.</s> ")
    batch = collator([TWO_TURNS])
    assert trained_text(collator, batch, 0) == " There are two.</s> Red.</s>"  # the space after </s> is not


def test_paligemma_token_types_make_the_answer_causal():
    from vlmtune.model.processing import load_processor
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("paligemma")
    processor = load_processor(tiny_model_path("paligemma"), family, PIXEL_BUDGET)
    batch = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)([ONE_IMAGE])
    types, labels = batch["token_type_ids"][0], batch["labels"][0]
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    assert (types[:first] == 0).all() and (types[first:] == 1).all()


def test_gemma3_newlines_beside_images_merge_yet_labels_are_right():
    """Gemma 3's processor writes "\\n\\n" around an image, which merges with the newline before it."""
    from vlmtune.model.processing import load_processor
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("gemma3")
    processor = load_processor(tiny_model_path("gemma3"), family, PIXEL_BUDGET)
    collator = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)
    text = collator.render(ONE_IMAGE.messages)
    plain = collator.tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = collator([ONE_IMAGE])
    expanded = batch["input_ids"][0].tolist()
    with pytest.raises(ModelError):  # the plain tokens are not all inside the processor's output
        align_expanded(expanded, plain)
    assert trained_text(collator, batch, 0) == "Yellow.<end_of_turn>\n"


# --- training --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_two_qlora_steps_on_both_towers(family: str):
    """4-bit base, LoRA on both towers, non-reentrant checkpointing: only LoRA moves, vision included."""
    import torch

    loaded = load_4bit(family)
    section = LoraSection(r=8, alpha=16)
    model = lora.apply(loaded.model, section, lora.plan(loaded.model, loaded.family, section), seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    processor_collator = VisionCollator(
        loaded.processor, loaded.family, max_length=None, train_on_responses_only=True
    )
    batch = processor_collator([TWO_TURNS, ONE_IMAGE])

    def component(param_name: str) -> str:
        return loaded.family.component_of(param_name.removeprefix("base_model.model.").split(".lora_")[0])

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
            if component(n) == "vision" and p.grad is not None
        )
        optimizer.step()
        optimizer.zero_grad()

    assert vision_grad > 0, "vision LoRA received no gradient"
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == set(trainable), "exactly the LoRA weights move; every frozen base weight stays"
    assert {component(n) for n in changed} == {"vision", "language"}


def test_a_template_that_refuses_the_text_only_probe_is_left_alone():
    import copy

    from vlmtune.model.processing import load_processor
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("llava")
    processor = copy.copy(load_processor(tiny_model_path("llava"), family, PIXEL_BUDGET))
    processor.chat_template = (
        "{% if messages[0]['content'] | selectattr('type', 'equalto', 'image') | list | length == 0 %}"
        "{{ raise_exception('the first turn needs an image') }}{% endif %}" + LLAVA_1_5_RELEASED_TEMPLATE
    )
    collator = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)
    assert collator.appended_stop is None
