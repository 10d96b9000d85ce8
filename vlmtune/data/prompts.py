"""A sample split at its last answer: the prompt a model answers, the images it shows, the reference.

Eval (`vlmtune eval`, the eval during training) scores an answer to the prompt against the
reference; GRPO samples completions of the prompt, and its reader accepts conversations that end
on a user turn (no reference). ``prompt_reading`` is how the pre-flight reads and measures a GRPO
split, for training and `vlmtune data check` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.data.collator import template_special_tokens
from vlmtune.data.layouts import SampleReader
from vlmtune.data.preflight import Measure
from vlmtune.data.samples import Sample
from vlmtune.recipe import GrpoSection


@dataclass(frozen=True)
class EvalItem:
    index: int  # the sample's position in its file
    messages: list[dict]  # the conversation before the reference answer
    images: list[Any]  # the image sources those messages show
    reference: str
    pair: Any = None  # a PreferencePair when the set holds pairs: the reference is its chosen answer


def eval_item(sample: Sample) -> EvalItem:
    """Split a sample at its last assistant turn: (prompt conversation, images shown, reference)."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    prompt = sample.messages[:last]
    shown = sum(part["type"] == "image" for message in prompt for part in message["content"])
    reference = "".join(p["text"] for p in sample.messages[last]["content"] if p["type"] == "text")
    return EvalItem(sample.index, prompt, sample.images[:shown], reference)


def prompt_text(messages: list[dict]) -> str:
    """A readable one-string prompt for the report: `user: <image> What color ...`."""
    lines = []
    for message in messages:
        parts = ["<image>" if p["type"] == "image" else p["text"] for p in message["content"]]
        lines.append(f"{message['role']}: {' '.join(parts)}")
    return "\n".join(lines)


def pair_item(pair: Any) -> EvalItem:
    """A preference pair as an eval item: its prompt, its images, its chosen answer as the reference."""
    return EvalItem(pair.index, pair.prompt, pair.images, pair.answer_text("chosen"), pair)


@dataclass(frozen=True)
class PromptReader(SampleReader):
    """Reads samples like SFT does, but a conversation may end at a user turn (no reference answer)."""

    require_answer: bool = False


@dataclass(frozen=True)
class Prompt:
    index: int  # the sample's position in its file
    messages: list[dict]  # the conversation the model answers (content parts, bare image parts)
    images: list[Any]  # lazy sources of the images those messages show
    reference: str | None  # the last assistant turn's text, when the sample has one

    @property
    def text(self) -> str:
        return prompt_text(self.messages)


def prompt_of(sample: Sample) -> Prompt:
    """The conversation before the last assistant turn (the whole one if it has none) and that answer."""
    if not any(message["role"] == "assistant" for message in sample.messages):
        return Prompt(sample.index, sample.messages, sample.images, None)
    item = eval_item(sample)
    return Prompt(item.index, item.messages, item.images, item.reference)


def prompt_tokens(processor: Any, completion_tokens: int) -> Measure:
    """A sample's length for the pre-flight: its prompt as the processor builds it, plus the longest
    completion (what train.max_length must hold)."""

    def measure(sample: Sample) -> int:
        prompt = prompt_of(sample)
        text = processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        kwargs: dict[str, Any] = {"text": [text], **template_special_tokens(processor.tokenizer, [text])}
        if prompt.images:
            kwargs["images"] = [list(prompt.images)]
        return len(processor(**kwargs)["input_ids"][0]) + completion_tokens

    return measure


def prompt_reading(processor: Any, options: GrpoSection) -> tuple[type, Measure]:
    """How the pre-flight reads a GRPO split (training and `vlmtune data check` alike): the prompt
    reader, and each prompt's length plus the longest completion."""
    return PromptReader, prompt_tokens(processor, options.max_completion_length)
