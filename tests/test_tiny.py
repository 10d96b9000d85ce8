"""Tiny checkpoints: they reload with the Auto classes, their processors honour one contract, and
their chat templates render every conversation shape with each prompt a prefix of the whole."""

from __future__ import annotations

import json

import pytest

from vlmtune.errors import ModelError
from vlmtune.model.families import family_names, get_family

from conftest import assistant, user

NAMES = family_names()

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}


CONVERSATIONS = {
    "one image": [user("What color is the shape?", 1), assistant("It is red.")],
    "system + two images, two turns": [
        SYSTEM,
        user("How many images?", 2),
        assistant("There are two."),
        user("Which is first?"),
        assistant("The red one."),
    ],
    "string content": [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi."},
    ],
}


@pytest.fixture(scope="module", params=NAMES)
def processor(request, tiny_path):
    from vlmtune.model.processing import load_processor

    return load_processor(tiny_path(request.param), get_family(request.param))


@pytest.mark.parametrize("family", NAMES)
def test_the_folder_reloads_with_the_auto_class_at_tiny_sizes(family: str, tiny_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_path(family))
    text = model.config.get_text_config()
    assert text.hidden_size == 64 and text.num_hidden_layers == 2
    record = get_family(family)
    assert record.vision_prefix in dict(model.named_modules())
    # bitsandbytes' CPU path needs in_features >= 64 on every Linear it quantizes
    for name, module in model.named_modules():
        if record.component_of(name) == "language" and type(module).__name__ == "Linear":
            assert module.in_features >= 64, name
    assert model.generation_config.eos_token_id


def test_the_processor_contract(processor):
    from PIL import Image

    assert callable(processor.apply_chat_template)
    assert processor.tokenizer is not None and processor.image_processor is not None
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (40, 60), "blue")
    messages = CONVERSATIONS["one image"]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text, text], images=[[red], [blue]], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" in batch


def test_the_template_renders_content_lists_and_strings(processor):
    text = processor.apply_chat_template(CONVERSATIONS["system + two images, two turns"], tokenize=False)
    for words in ("Answer in one short sentence.", "How many images?", "There are two.", "The red one."):
        assert words in text
    assert "Hello there" in processor.apply_chat_template(CONVERSATIONS["string content"], tokenize=False)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_the_template_is_prefix_stable(processor, conversation: str):
    """What the collator relies on to find each answer: prompt + answer extends the prompt."""
    messages = CONVERSATIONS[conversation]
    whole = processor.apply_chat_template(messages, tokenize=False)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: i + 1], tokenize=False)
        assert through.startswith(prompt) and whole.startswith(through), (i, prompt, through)
        answer = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
        assert answer in through[len(prompt) :]


@pytest.mark.parametrize("family", ["llava_onevision", "internvl", "qwen3_vl"])
def test_processors_without_a_video_processor_keep_their_settings(family: str, tiny_path):
    """Saved and reloaded without torchvision, the processor keeps num_image_tokens & co."""
    from vlmtune.model.processing import load_processor

    record = get_family(family)
    processor = load_processor(tiny_path(family), record)
    saved = json.loads((tiny_path(family) / "processor_config.json").read_text())
    assert saved["processor_class"] == record.processor_class
    for key, value in saved.items():
        if key not in ("processor_class", "image_processor"):
            assert getattr(processor, key) == value, key


def test_build_tiny_into_a_folder_and_unknown_names(tmp_path):
    from vlmtune.model.tiny import build_tiny

    out = build_tiny("llava", tmp_path / "llava")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(ModelError, match="unknown family"):
        build_tiny("llava2", tmp_path / "nope")


def test_qwen_keeps_its_vocabulary_builder():
    from vlmtune.model.tiny.tokenizer import train_byte_bpe

    vocab, merges = train_byte_bpe("<|endoftext|>")
    assert vocab["<|endoftext|>"] == 0 and len(vocab) == 400 and merges


@pytest.mark.parametrize("family", [f for f in NAMES if get_family(f).processor_needs_video])
def test_where_torchvision_is_installed_an_image_only_folder_still_loads(family: str, tiny_path, monkeypatch):
    """With torchvision the base class demands a video processor (an H200 machine showed it):
    tiny folders build and load without one, and the loaded processor is the base class."""
    import transformers

    import vlmtune.model.processing as processing

    record = get_family(family)
    if record.prepare_processor_import is not None:
        record.prepare_processor_import()
    base = getattr(transformers, record.processor_class)
    monkeypatch.setattr(processing, "processor_class", lambda _family: base)

    assert processing.image_only_processor_class(record) is not base
    processor = processing.load_processor(tiny_path(family), record)
    assert isinstance(processor, base)
