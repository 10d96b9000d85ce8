"""How a generated answer is scored against its reference: the pure text metrics every objective shares.

Scores compare normalised text: case, whitespace and trailing punctuation do not count. Used by
`vlmtune eval`, by GRPO's built-in rewards and by the eval during training.
"""

from __future__ import annotations

import re

_TRAILING = re.compile(r"[\s.!?,;:。！？]+$")


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation."""
    return _TRAILING.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains_answer(prediction: str, reference: str) -> bool:
    reference = normalize(reference)
    return bool(reference) and reference in normalize(prediction)


def scores(predictions: list[str], references: list[str]) -> dict:
    n = len(references)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n if n else 0.0,
        "contains": sum(map(contains_answer, predictions, references)) / n if n else 0.0,
    }


def preference_scores(logps: list[tuple[float, float]]) -> dict:
    """Share of pairs whose chosen answer is the likelier one, and the mean log-prob margin (nats)."""
    n = len(logps)
    return {
        "preference_accuracy": sum(chosen > rejected for chosen, rejected in logps) / n if n else 0.0,
        "logp_margin": sum(chosen - rejected for chosen, rejected in logps) / n if n else 0.0,
    }
