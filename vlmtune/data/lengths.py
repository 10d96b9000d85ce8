"""Exact token counts of samples, image tokens included, from the images' sizes alone.

The collator's ``count_tokens`` runs the processor: every image decoded, resized, normalised and cut
into patches, only for the length of the text it expands to. In transformers 5 that text comes
from the image's size alone: the processor replaces each image placeholder with a replacement string
(``replace_image_token``) and tokenizes the result. So does this counter, minus the pixels:

- the conversation is rendered by the collator's own template path;
- each image's replacement string comes from a cache keyed by what decides it: the family's
  token-count arithmetic (vlmtune.model.image_tokens, tested against the processors), plus its layout
  where the count alone does not decide (Pixtral rows and columns, Idefics3 tiles), plus whether the
  sample holds several images (LLaVA-OneVision shrinks those). A key seen for the first time is
  filled by the real processor on a blank image of that size, so every string is the processor's.
  Where the count alone decides, the strings are prefix + feature token x count + suffix: once two
  probes at different counts agree on prefix and suffix, the rest are written from the count;
- the processor's own text steps (``prepare_inputs_layout``: PaliGemma's <bos>, Mllama's prompt
  string; ``get_text_with_replacements``) expand the text, and the tokenizer counts it, a batch at a
  time. A run of the repeated feature token (an added token, never merged with its neighbours) is
  counted, not tokenized.

A sample the arithmetic or the processor's input checks refuse (Qwen's aspect ratio over 200, a
text-only sample for PaliGemma) gets ``None``: the caller measures it with the processor, which
names the problem in its own words.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from vlmtune.data import Sample
from vlmtune.data.collator import VisionCollator, template_special_tokens

Size = tuple[int, int]  # (width, height), upright


@dataclass(frozen=True)
class Pattern:
    """A replacement text of the shape prefix + feature token x count + suffix."""

    prefix: str
    suffix: str
    count: int  # the count it was seen at
    confirmed: bool = False  # seen at two counts with the same prefix and suffix

    @classmethod
    def of(cls, replacement: str, feature: str, count: int) -> Pattern | None:
        run = feature * count
        if count < 1 or replacement.count(run) != 1 or replacement.count(feature) != count:
            return None
        prefix, _, suffix = replacement.partition(run)
        return cls(prefix, suffix, count)

    def text(self, feature: str, count: int) -> str:
        return self.prefix + feature * count + self.suffix


class TokenCounter:
    """Token lengths of samples as ``VisionCollator.count_tokens`` measures them, without pixels."""

    def __init__(self, collator: VisionCollator):
        self.collator = collator
        self.processor = collator.processor
        self.tokenizer = collator.tokenizer
        self.family = collator.family
        self.settings = self.family.image_settings(self.processor)
        self.replacements: dict[Hashable, str] = {}
        self.patterns: dict[bool, Pattern | bool] = {}  # by "several images in the sample"
        self.probes = 0  # keys filled by the processor (for tests and benchmarks)
        self._stand_in = None
        feature = self.family.image_feature_token
        added = getattr(self.tokenizer, "added_tokens_encoder", {}) or {}
        # Runs of an added token tokenize to one token each: count them instead of tokenizing them.
        self._runs = re.compile(f"(?:{re.escape(feature)}){{2,}}") if feature in added else None
        self._feature = feature

    def __getstate__(self) -> dict:  # no PIL image in a pickle
        return {**self.__dict__, "_stand_in": None}

    def count(self, samples: list[Sample], sizes: list[list[Size]]) -> list[int | None]:
        """Each sample's length (image tokens included); None where only the processor can tell."""
        lengths: list[int | None] = [None] * len(samples)
        groups: dict[bool, list[tuple[int, str]]] = {}  # by "the template writes the bos token itself"
        for i, (sample, image_sizes) in enumerate(zip(samples, sizes, strict=True)):
            rendered = self.collator.render(sample.messages)
            text = self._expanded(rendered, image_sizes)
            if text is not None:
                no_special = bool(template_special_tokens(self.tokenizer, [rendered]))  # as the collator asks
                groups.setdefault(no_special, []).append((i, text))
        for no_special, rows in groups.items():
            texts, cut = zip(*(self._compress(text) for _, text in rows), strict=True)
            kwargs = {"add_special_tokens": False} if no_special else {}
            encoded = self.tokenizer(list(texts), **kwargs)["input_ids"]
            for (i, _), ids, extra in zip(rows, encoded, cut, strict=True):
                lengths[i] = len(ids) + extra
        return lengths

    # --- steps -----------------------------------------------------------------------------------

    def _expanded(self, rendered: str, sizes: list[Size]) -> str | None:
        """The text the processor tokenizes for a rendered sample, or None when only it can tell."""
        try:
            replacements = [self.replacement(width, height, len(sizes)) for width, height in sizes]
        except ValueError:
            return None
        images = [[self.stand_in()] * len(sizes)] if sizes else None
        images, text = self.processor.prepare_inputs_layout(images=images, text=[rendered])[:2]
        try:
            self.processor.validate_inputs(images=images, text=text)  # e.g. PaliGemma wants an image
        except ValueError:
            return None
        if sizes:
            text, _ = self.processor.get_text_with_replacements(text, images_replacements=replacements)
        return text[0]

    def replacement(self, width: int, height: int, images_in_sample: int = 1) -> str:
        """The text one image of this size expands to (the processor's own, cached by what decides it)."""
        count = self.family.tokens_per_image(width, height, self.settings)
        layout = self.family.image_layout(width, height, self.settings) if self.family.image_layout else None
        several = images_in_sample > 1
        pattern = self.patterns.get(several) if layout is None else None
        if isinstance(pattern, Pattern) and pattern.confirmed:
            return pattern.text(self._feature, count)
        key = (count, layout, several)
        if key not in self.replacements:
            self.replacements[key] = self._probe(width, height, several)
            self.probes += 1
            if layout is None:
                self._learn(several, count, self.replacements[key])
        return self.replacements[key]

    def _learn(self, several: bool, count: int, replacement: str) -> None:
        """Where the count alone decides the text, it is the same prefix + feature token x count +
        suffix for every size: seen at two counts, the pattern is trusted and probes stop."""
        learned = Pattern.of(replacement, self._feature, count)
        known = self.patterns.get(several)
        if learned is None or known is False:
            self.patterns[several] = False  # not of that shape: probe every key
        elif known is None:
            self.patterns[several] = learned
        elif known.count != count:
            same = (known.prefix, known.suffix) == (learned.prefix, learned.suffix)
            self.patterns[several] = (
                Pattern(known.prefix, known.suffix, count, confirmed=True) if same else False
            )

    def _probe(self, width: int, height: int, several: bool) -> str:
        from PIL import Image

        images = [Image.new("RGB", (width, height))]
        if several:
            images.append(Image.new("RGB", (28, 28)))
        token = self.processor.image_token
        out = self.processor(
            text=[token * len(images)], images=[images], return_text_replacement_offsets=True
        )
        offsets = out.get("text_replacement_offsets")
        # A processor that expands nothing (Mllama: cross-attention) reports no replacement.
        return offsets[0][0]["replacement"] if offsets else token

    def _compress(self, text: str) -> tuple[str, int]:
        """The text with each run of the feature token cut to one, and how many tokens were cut."""
        if self._runs is None:
            return text, 0
        cut = 0
        size = len(self._feature)

        def one(match: re.Match) -> str:
            nonlocal cut
            cut += len(match.group()) // size - 1
            return self._feature

        return self._runs.sub(one, text), cut

    def stand_in(self) -> Any:
        """A 1x1 image for the processor's text steps, which look at how many images there are only."""
        if self._stand_in is None:
            from PIL import Image

            self._stand_in = Image.new("RGB", (1, 1))
        return self._stand_in
