"""How a generated answer is scored against its reference: the answer metrics every objective and `vlmtune eval` share.

``text`` holds the normalised comparisons (exact match, contains, a number within tolerance); ``metrics`` the
named metrics a recipe picks (ANLS, CER, WER, ROUGE-L, BLEU, chrF computed with the libraries of each field:
rapidfuzz, jiwer, rouge-score, sacrebleu), averaged over a set of answers. A leaf: imports nothing of vlmtune's.
"""

from __future__ import annotations

from vlmtune.scoring.metrics import (
    METRICS,
    Metric,
    answer_scores,
    greater_is_better,
    sample_scores,
)
from vlmtune.scoring.text import (
    contains_answer,
    exact_match,
    last_number,
    normalize,
    number_match,
    preference_scores,
    scores,
)

__all__ = [
    "METRICS",
    "Metric",
    "answer_scores",
    "contains_answer",
    "exact_match",
    "greater_is_better",
    "last_number",
    "normalize",
    "number_match",
    "preference_scores",
    "sample_scores",
    "scores",
]
