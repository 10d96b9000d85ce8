"""Unpaired answers -> the batch TRL's KTOTrainer scores: each sample, its label, and its KL sequence.

Each answer is collated by vlmtune's own collator with labels on the final answer only (as a DPO
pair's sides are: vlmtune.data.preference_collator.FinalAnswerCollator), so every family's quirks
are handled as in SFT and nothing is ever cut; ``completion_mask`` marks exactly those tokens, the
answer and its end-of-turn, never the prompt, an image token or padding.

KTO's baseline is the KL divergence of the policy from the reference on answers that do not belong
to their prompt: each prompt of the batch with the previous sample's answer (the last sample's with
the first's), TRL's own mismatch. Those sequences keep their prompt's images, so the batch's pixels
serve both forwards; only their token-level inputs (``KL_input_ids``, ``KL_attention_mask``,
``KL_completion_mask``, and the token types TRL swaps in: ``KL_token_type_ids``,
``KL_mm_token_type_ids``) are added. They are no-grad forwards and are never refused for length: a
prompt with a longer answer than its own may exceed train.max_length.
"""

from __future__ import annotations

from typing import Any

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data.lengths import TokenCounter
from vlmtune.data.preference_collator import FinalAnswerCollator
from vlmtune.data.unpaired import UnpairedAnswer, UnpairedReader
from vlmtune.model.families import Family

KL_TOKEN_TYPES = ("token_type_ids", "mm_token_type_ids")  # the per-token inputs TRL 1.16 swaps for KL ones


class UnpairedCollator:
    def __init__(self, processor: Any, family: Family, *, max_length: int | None, kl: bool = True):
        self.answers = FinalAnswerCollator(processor, family, max_length=max_length)
        self.mismatched = FinalAnswerCollator(processor, family, max_length=None) if kl else None

    @property
    def max_length(self) -> int | None:
        return self.answers.max_length

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        self.answers.max_length = value

    def __call__(self, items: list[UnpairedAnswer]) -> dict:
        import torch

        batch = self.answers(items)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        batch["label"] = torch.tensor([item.desirable for item in items])
        if self.mismatched is not None:
            batch.update(self.kl_inputs(items))
        return batch

    def kl_inputs(self, items: list[UnpairedAnswer]) -> dict:
        """Each prompt with the previous item's answer, as the KL_ inputs TRL reads."""
        shifted = [item.with_answer(items[i - 1]) for i, item in enumerate(items)]
        kl = self.mismatched(shifted)
        out = {
            "KL_input_ids": kl["input_ids"],
            "KL_attention_mask": kl["attention_mask"],
            "KL_completion_mask": (kl["labels"] != IGNORE_INDEX).long(),
        }
        out.update({f"KL_{key}": kl[key] for key in KL_TOKEN_TYPES if key in kl})
        return out

    def token_counter(self) -> TokenCounter:
        """Each sample's length, image tokens included (what train.max_length must hold), measured as SFT
        measures its samples: from image sizes, checked against the processor."""
        return TokenCounter(self.answers)


def unpaired_reading(processor: Any, family: Family) -> tuple[type, TokenCounter]:
    """How the pre-flight reads a KTO split (training and `vlmtune data check` alike): the unpaired
    reader, and each sample's length."""
    return UnpairedReader, UnpairedCollator(processor, family, max_length=None, kl=False).token_counter()
