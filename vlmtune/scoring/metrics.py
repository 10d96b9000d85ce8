"""The answer metrics a recipe names (train.metrics), each computed with the well-kept library of its field.

| name | what | library | range |
|---|---|---|---|
| exact_match | share of answers equal to the reference (normalised) | - | 0..1, higher better |
| contains | share of answers that contain the reference (normalised) | - | 0..1, higher better |
| number | share whose last number is within tolerance of the reference's (those with a number) | - | 0..1 |
| anls | ANLS (DocVQA): 1 - normalised Levenshtein distance, 0 from 0.5 on, averaged | rapidfuzz | 0..1 |
| cer | character error rate: edits / reference characters, over the whole set | jiwer | 0.., lower better |
| wer | word error rate: edits / reference words, over the whole set | jiwer | 0.., lower better |
| rouge_l | ROUGE-L F1 (longest common subsequence of words), averaged | rouge-score | 0..1 |
| bleu | corpus BLEU-4 (13a tokens) | sacrebleu | 0..100 |
| chrf | corpus chrF (character 6-grams, beta 2) | sacrebleu | 0..100 |

exact_match, contains, number and anls compare normalised text (vlmtune.scoring.text.normalize: case,
runs of spaces and trailing punctuation do not count); cer and wer keep case and punctuation (OCR, LaTeX)
and only collapse runs of whitespace; rouge_l lower-cases and splits into words of any script, each CJK
character a word of its own (rouge-score's own tokenizer drops every non-ASCII letter); bleu and chrf
take the text as it is. Every library is imported inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vlmtune.scoring.text import contains_answer, exact_match, normalize, number_match

ANLS_THRESHOLD = 0.5  # a normalised edit distance at or above it scores 0 (the DocVQA definition)


@dataclass(frozen=True)
class Metric:
    name: str
    greater_is_better: bool
    scale: (
        str  # "fraction" (0..1, shown as a percentage) | "rate" (0.., shown as a number) | "points" (0..100)
    )
    per_sample: bool  # a score per answer exists (shown beside each prediction)
    description: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", True, "fraction", True, "answer equals the reference (normalised)"),
        Metric("contains", True, "fraction", True, "answer contains the reference (normalised)"),
        Metric("number", True, "fraction", True, "last number within tolerance of the reference's"),
        Metric("anls", True, "fraction", True, "average normalised Levenshtein similarity (DocVQA)"),
        Metric("cer", False, "rate", True, "character error rate (jiwer)"),
        Metric("wer", False, "rate", True, "word error rate (jiwer)"),
        Metric("rouge_l", True, "fraction", True, "ROUGE-L F1 (rouge-score)"),
        Metric("bleu", True, "points", False, "corpus BLEU-4 (sacrebleu)"),
        Metric("chrf", True, "points", False, "corpus chrF (sacrebleu)"),
    )
}


def greater_is_better(name: str) -> bool:
    """The direction of a metric by its name: a built-in's own; eval_loss and any *_loss lower; else higher."""
    bare = name.removeprefix("eval_")
    if bare in METRICS:
        return METRICS[bare].greater_is_better
    return not bare.endswith("loss")


# --- per answer ---------------------------------------------------------------------------------


def anls(prediction: str, reference: str) -> float:
    from rapidfuzz.distance import Levenshtein

    distance = Levenshtein.normalized_distance(normalize(prediction), normalize(reference))
    return 1.0 - distance if distance < ANLS_THRESHOLD else 0.0


def _spaced(text: str) -> str:
    return " ".join(text.split())


def cer(prediction: str, reference: str) -> float:
    return _jiwer("cer", [prediction], [reference])


def wer(prediction: str, reference: str) -> float:
    return _jiwer("wer", [prediction], [reference])


def _jiwer(which: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """jiwer over a set: edits summed over the set / reference units summed (at least 1, so an empty
    reference counts each predicted unit as one error; empty against empty is 0)."""
    import jiwer

    predictions, references = [_spaced(p) for p in predictions], [_spaced(r) for r in references]
    return float(getattr(jiwer, which)(references, predictions))


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORDS = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


class _UnicodeWords:
    """rouge-score's tokenizer interface: lower-cased words of any script, each CJK character one word."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


_scorer = None


def _rouge():
    global _scorer
    if _scorer is None:
        from rouge_score.rouge_scorer import RougeScorer

        _scorer = RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    return _scorer


# --- over a set ---------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def answer_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    names: Sequence[str] = tuple(METRICS),
    tolerance: float = 0.0,
    relative_tolerance: float = 0.0,
) -> dict[str, float | None]:
    """Each named metric over the whole set. ``number`` is None when no reference holds a number; every
    metric is None on an empty set."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out: dict[str, float | None] = {}
    for name in names:
        if not references:
            out[name] = None
        elif name in ("cer", "wer"):
            out[name] = _jiwer(name, predictions, references)
        elif name in ("bleu", "chrf"):
            import sacrebleu

            corpus = sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf
            out[name] = float(corpus(list(predictions), [list(references)]).score)
        else:
            score = _per_sample(name, tolerance, relative_tolerance)
            out[name] = _mean([score(p, r) for p, r in zip(predictions, references, strict=True)])
    return out


def sample_scores(
    prediction: str,
    reference: str,
    names: Sequence[str] = tuple(METRICS),
    tolerance: float = 0.0,
    relative_tolerance: float = 0.0,
) -> dict[str, float]:
    """The metrics that have a value per answer (corpus BLEU and chrF do not), for one answer."""
    out = {}
    for name in names:
        if METRICS[name].per_sample:
            value = _per_sample(name, tolerance, relative_tolerance)(prediction, reference)
            if value is not None:
                out[name] = float(value)
    return out


def _per_sample(name: str, tolerance: float, relative: float) -> Callable[[str, str], float | bool | None]:
    if name == "number":
        return lambda p, r: number_match(p, r, tolerance, relative)
    return {
        "exact_match": exact_match,
        "contains": contains_answer,
        "anls": anls,
        "cer": cer,
        "wer": wer,
        "rouge_l": rouge_l,
    }[name]
