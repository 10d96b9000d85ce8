"""The normalised text comparisons: exact match, contains, the last number within a tolerance.

Scores compare normalised text: case, whitespace and trailing punctuation do not count. Used by
`vlmtune eval`, by GRPO's built-in rewards and by the eval during training.
"""

from __future__ import annotations

import math
import re

_TRAILING = re.compile(r"[\s.!?,;:。！？]+$")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation."""
    return _TRAILING.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains_answer(prediction: str, reference: str) -> bool:
    reference = normalize(reference)
    return bool(reference) and reference in normalize(prediction)


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed: 1,234.5), or None."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    return float(found[-1]) if found else None


def number_match(
    prediction: str, reference: str, tolerance: float = 0.0, relative: float = 0.0
) -> bool | None:
    """Is the prediction's last number within ``tolerance`` (absolute) or ``relative`` (a fraction of the
    reference) of the reference's last number? None when the reference has no number (it does not apply)."""
    expected = last_number(reference)
    if expected is None:
        return None
    got = last_number(prediction)
    return got is not None and math.isclose(got, expected, rel_tol=relative, abs_tol=tolerance)


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
