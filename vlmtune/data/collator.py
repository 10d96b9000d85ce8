"""Samples -> model inputs with labels on exactly the tokens worth learning.

Masked (-100): padding, every vision token of the family (the image placeholder the processor
expands and the structural tokens around it), and, with train_on_responses_only, everything
outside the assistant turns. Nothing is truncated: a sample longer than max_length is refused
with its index (the data pre-flight drops or rejects such samples before training starts).

Assistant spans are found without knowing the template: the conversation is rendered up to each
assistant turn (with the generation prompt) and through it; the characters in between are the
answer, its end-of-turn token included, so the model learns to stop. Those characters are mapped
onto the processor's tokens by aligning the plain tokenization of the rendered text with the
processor's output, whose additions are vision tokens (and, from a few processors, newlines
beside them, see align_expanded).

A template that ends answers with no stop token at all (Llava-1.5's released one: "ASSISTANT:
answer ") would train a model that never stops; there the tokenizer's eos token is appended to
every answer, as peers do for such templates, and ``appended_stop`` says so.

A family whose token_type_ids mark a prefix-LM's answer (PaliGemma) gets them from the labels.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import Sample, open_image
from vlmtune.data.images import open_images
from vlmtune.errors import DataError, ModelError
from vlmtune.model.families import Family


class VisionCollator:
    def __init__(
        self, processor: Any, family: Family, *, max_length: int | None, train_on_responses_only: bool
    ):
        import torch

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.max_length = max_length
        self.train_on_responses_only = train_on_responses_only
        self.vision_ids = torch.tensor(vision_token_ids(self.tokenizer, family), dtype=torch.long)
        self.appended_stop = missing_stop_token(processor)

    # --- public ----------------------------------------------------------------------------------

    def __call__(self, samples: list[Sample]) -> dict:
        texts = [self.render(s.messages) for s in samples]
        spans = [self.trained_spans(s, text) for s, text in zip(samples, texts, strict=True)]
        batch = self._process(texts, [open_images(s.index, s.images, s.image_fields) for s in samples])
        batch["labels"] = self._labels(batch, texts, spans)
        if self.family.token_types_from_labels:
            batch["token_type_ids"] = answer_token_types(batch["labels"])
        self._check_length(batch, samples)
        return batch

    def count_tokens(self, sample: Sample) -> int:
        """The sample's real length, image tokens included, as the processor builds it."""
        images = [[open_image(source) for source in sample.images]]
        return int(self._process([self.render(sample.messages)], images)["attention_mask"].sum())

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.appended_stop:
            messages = [with_stop(m, self.appended_stop) for m in messages]
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def trained_spans(self, sample: Sample, full_text: str) -> list[tuple[int, int]]:
        """The assistant spans trained on: those of the turns from ``sample.trained_from`` on (TRL's
        prompt/completion trains the completion only; the prompt's answers are context)."""
        context = sum(message["role"] == "assistant" for message in sample.messages[: sample.trained_from])
        return self.assistant_spans(sample.messages, full_text)[context:]

    def assistant_spans(self, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
        """Character ranges of the assistant turns inside ``full_text``."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full_text.startswith(through)):
                raise ModelError(
                    f"the chat template of {self.family.title} renders a conversation differently from its "
                    "prefixes, so assistant turns cannot be located",
                    hint="set data.train_on_responses_only: false to train on every non-vision token",
                )
            end = len(through)
            if self.appended_stop:  # the answer ends at its stop token, not at the space after it
                end = through.rindex(self.appended_stop, len(before)) + len(self.appended_stop)
            spans.append((len(before), end))
        return spans

    # --- steps -----------------------------------------------------------------------------------

    def _process(self, texts: list[str], images: list[list]) -> dict:
        kwargs: dict[str, Any] = {
            "text": texts,
            "padding": True,
            "padding_side": "right",  # some processors default to left (InternVL); labels assume right
            "return_tensors": "pt",
            **self._special_tokens(texts),
        }
        if any(images):
            kwargs["images"] = images
        return dict(self.processor(**kwargs))

    def _labels(self, batch: dict, texts: list[str], spans: list[list[tuple[int, int]]]):
        import torch

        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (text, row_spans) in enumerate(zip(texts, spans, strict=True)):
            length = int(batch["attention_mask"][row].sum())
            keep = self._trainable_positions(ids[row, :length].tolist(), text, row_spans)
            labels[row, :length] = torch.where(torch.tensor(keep), ids[row, :length], IGNORE_INDEX)
        labels[torch.isin(ids, self.vision_ids)] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        return labels

    def _trainable_positions(
        self, expanded: list[int], text: str, spans: list[tuple[int, int]]
    ) -> list[bool]:
        """For each processor token: is it inside an assistant span? (vision and pad are masked later)"""
        if not self.train_on_responses_only:
            return [True] * len(expanded)
        plain = self.tokenizer(text, return_offsets_mapping=True, **self._special_tokens([text]))
        starts = [start for start, _ in plain["offset_mapping"]]

        def in_answer(j: int) -> bool:
            return any(a <= starts[j] < b for a, b in spans)

        return [
            j is not None and in_answer(j)
            for j in align_expanded(expanded, plain["input_ids"], must_match=in_answer)
        ]

    def _special_tokens(self, texts: list[str]) -> dict:
        return template_special_tokens(self.tokenizer, texts)

    def _check_length(self, batch: dict, samples: list[Sample]) -> None:
        if self.max_length is None:
            return
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for sample, length in zip(samples, lengths, strict=True):
            if length > self.max_length:
                raise DataError(
                    f"sample {sample.index} is {length} tokens (image tokens included), over "
                    f"train.max_length={self.max_length}; vlmtune never cuts a sample",
                    hint="raise train.max_length, lower data.max_image_pixels, or set data.too_long: drop",
                )


STOP_PROBE = "Stop-probe answer."


def missing_stop_token(processor: Any) -> str | None:
    """The eos token, when the chat template renders no special token after an answer; else None."""
    from jinja2 import TemplateError

    eos = processor.tokenizer.eos_token
    if not eos:
        return None
    probe = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": STOP_PROBE}]},
    ]
    try:
        through = processor.apply_chat_template(probe, tokenize=False)
    except TemplateError:  # a template that refuses a text-only turn: samples will tell, not the probe
        return None
    if STOP_PROBE not in through:  # the answer was not rendered at all: nothing to end
        return None
    after_answer = through[through.rindex(STOP_PROBE) + len(STOP_PROBE) :]
    return None if any(token in after_answer for token in special_tokens(processor.tokenizer)) else eos


def special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t for t in tokenizer.all_special_tokens if t} | {t.content for t in added.values() if t.special}


def with_stop(message: dict, stop: str) -> dict:
    """An assistant message with ``stop`` after its last text; other messages unchanged.

    Content is a list of parts: vlmtune.data normalises every sample's messages that way.
    """
    if message["role"] != "assistant":
        return message
    content = message["content"]
    last_text = max((i for i, part in enumerate(content) if part.get("type") == "text"), default=None)
    if last_text is None:
        return message
    parts = list(content)
    parts[last_text] = {**parts[last_text], "text": parts[last_text]["text"] + stop}
    return {**message, "content": parts}


def template_special_tokens(tokenizer: Any, texts: list[str]) -> dict:
    """Tokenizer kwargs for rendered chat texts: a template that writes the bos token itself
    (Gemma 3, Llama 3, Idefics3) must not get a second one from the tokenizer. Generation from a
    rendered prompt needs the same, or it sees a sequence training never showed it."""
    bos = tokenizer.bos_token
    if bos and all(text.startswith(bos) for text in texts):
        return {"add_special_tokens": False}
    return {}


def vision_token_ids(tokenizer: Any, family: Family) -> list[int]:
    """Ids of the family's vision tokens that this tokenizer knows."""
    ids = []
    for token in family.vision_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if not ids:
        raise ModelError(
            f"the tokenizer knows none of {family.title}'s vision tokens {family.vision_tokens}",
            hint="the processor does not match the model; load both from the same checkpoint",
        )
    return ids


def align_expanded(
    expanded: list[int], plain: list[int], must_match: Callable[[int], bool] = lambda j: True
) -> list[int | None]:
    """Map each token of ``expanded`` to its index in ``plain`` (None: inserted by the processor).

    The processor's output is usually the plain tokenization with vision tokens inserted around
    and after each image placeholder, so a greedy two-pointer walk aligns them. Some processors
    also insert text next to an image (Gemma 3 writes "\n\n" on both sides), which a tokenizer
    may merge with a neighbouring newline; then the longest common blocks align them, and plain
    tokens left unmatched are allowed where ``must_match(index)`` is false (outside the answers).
    """
    origin: list[int | None] = []
    j = 0
    for token in expanded:
        if j < len(plain) and token == plain[j]:
            origin.append(j)
            j += 1
        else:
            origin.append(None)
    if j == len(plain):
        return origin
    origin = [None] * len(expanded)
    matcher = difflib.SequenceMatcher(None, plain, expanded, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            origin[block.b + k] = block.a + k
    matched = set(i for i in origin if i is not None)
    if any(must_match(i) for i in range(len(plain)) if i not in matched):
        raise ModelError(
            "the processor's tokens do not contain the rendered text's tokens; labels cannot be placed",
            hint="this processor rewrites text beyond image tokens; set data.train_on_responses_only: false",
        )
    return origin


def answer_token_types(labels: Any) -> Any:
    """token_type_ids of a prefix-LM (PaliGemma): 0 up to the first supervised token, 1 from it on.

    The prefix (image, prompt) attends bidirectionally, the rest causally, so no position sees a
    token it is trained to predict.
    """
    return ((labels != IGNORE_INDEX).long().cumsum(dim=1) > 0).long()
