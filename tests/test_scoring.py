"""Each answer metric against values worked out by hand (empty answers and unicode included)."""

from __future__ import annotations

import pytest

from vlmtune.scoring import answer_scores, greater_is_better, number_match, sample_scores
from vlmtune.scoring.metrics import METRICS, anls, cer, rouge_l, wer


def test_exact_match_and_contains_compare_normalised_text():
    got = answer_scores(
        ["The Cat sat.", "a dog", ""], ["the  cat sat", "dog", "dog"], ["exact_match", "contains"]
    )
    assert got == {"exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3)}


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("kitten", "sitting", 1 - 3 / 7),  # 3 edits over the longer 7 characters
        ("abcd", "ABCE", 0.75),  # case does not count: 1 edit / 4
        ("ab", "ac", 0.0),  # distance 0.5 reaches the threshold: 0
        ("abc", "xyz", 0.0),
        ("", "", 1.0),
        ("", "abc", 0.0),
        ("café", "cafe", 0.75),  # é is one character, one substitution
        ("北京大学", "北京大字", 0.75),
    ],
)
def test_anls(prediction, reference, expected):
    assert anls(prediction, reference) == pytest.approx(expected)


def test_cer_and_wer_sum_edits_over_the_whole_set():
    # 'abd' for 'abc' (1 substitution) and 'xy' for 'x' (1 insertion): 2 edits over 4 reference characters
    assert answer_scores(["abd", "xy"], ["abc", "x"], ["cer"])["cer"] == pytest.approx(0.5)
    # one word deleted of four, and one substituted of two: 2 / 6
    got = answer_scores(["the cat sat", "hello there"], ["the cat sat down", "hello world"], ["wer"])
    assert got["wer"] == pytest.approx(2 / 6)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected_cer", "expected_wer"),
    [
        ("ABC", "abc", 1.0, 1.0),  # case counts (OCR, LaTeX)
        ("naïve", "naive", 0.2, 1.0),
        ("x^{2}", "x^2", 2 / 3, 1.0),  # two inserted braces over three characters
        ("a  b", "a b", 0.0, 0.0),  # runs of spaces collapse
        ("", "", 0.0, 0.0),
        ("abc", "", 3.0, 1.0),  # an empty reference: each predicted unit is an error
        ("", "ab cd", 1.0, 1.0),
    ],
)
def test_cer_and_wer_per_answer(prediction, reference, expected_cer, expected_wer):
    assert cer(prediction, reference) == pytest.approx(expected_cer)
    assert wer(prediction, reference) == pytest.approx(expected_wer)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # longest common subsequence "the cat on the mat": 5 of 6 words each way
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        ("The Cat!", "the cat", 1.0),
        # each CJK character is a word: LCS 4, precision 4/5, recall 4/4, F1 = 8/9
        ("猫在垫子上", "猫在垫子", 8 / 9),
        ("grün blau", "grün rot", 0.5),  # non-ASCII letters are kept (rouge-score's own tokenizer drops them)
        ("", "the cat", 0.0),
        ("", "", 0.0),  # rouge-score scores nothing against nothing as 0
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_bleu_and_chrf_on_sacrebleus_0_to_100_scale():
    same = answer_scores(["the cat sat on the mat"], ["the cat sat on the mat"], ["bleu", "chrf"])
    assert same == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty): 100 * 0.2 ** (1/4)
    assert answer_scores(["a b c d e"], ["a b c d f"], ["bleu"])["bleu"] == pytest.approx(100 * 0.2**0.25)
    assert answer_scores([""], ["the cat"], ["bleu", "chrf"]) == {"bleu": 0.0, "chrf": 0.0}
    assert answer_scores(["猫在垫子上"], ["猫在垫子上"], ["chrf"])["chrf"] == pytest.approx(100)


def test_number_within_tolerance():
    assert number_match("It costs 1,234.5 dollars", "1234.5") is True
    assert number_match("about 3.14", "pi is 3.1416") is False
    assert number_match("about 3.14", "pi is 3.1416", tolerance=0.01) is True
    assert number_match("99", "100", relative=0.01) is True
    assert number_match("98", "100", relative=0.01) is False
    assert number_match("no number", "7") is False
    assert number_match("7", "seven") is None  # the reference has no number: it does not apply
    got = answer_scores(["7", "8", "x"], ["7", "9", "no number"], ["number"])
    assert got["number"] == pytest.approx(0.5)  # the third does not count
    assert answer_scores(["a"], ["b"], ["number"]) == {"number": None}


def test_an_empty_set_has_no_scores_and_lengths_must_match():
    assert set(answer_scores([], []).values()) == {None}
    with pytest.raises(ValueError):
        answer_scores(["a"], [])


def test_sample_scores_hold_the_per_answer_metrics_only():
    row = sample_scores("the cat", "the cat")
    assert row == {"exact_match": 1.0, "contains": 1.0, "anls": 1.0, "cer": 0.0, "wer": 0.0, "rouge_l": 1.0}
    assert "bleu" not in row and "number" not in row  # corpus-only; no number in the reference


def test_directions():
    assert [name for name in METRICS if not greater_is_better(name)] == ["cer", "wer"]
    assert greater_is_better("eval_rouge_l") and not greater_is_better("eval_loss")


def test_the_recipe_offers_exactly_the_metrics_there_are():
    from vlmtune.choices import AnswerMetric, words

    assert words(AnswerMetric) == tuple(METRICS)


# --- the recipe keys: every mistake refused with its fix ------------------------------------------

RECIPE = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"best_metric": "rouge_l"}, "measured at train.eval_generate_steps; set it"),
        ({"best_metric": "loss"}, "measured at train.eval_steps; set it"),
        ({"best_metric": "bleu", "metrics": ["anls"], "eval_generate_steps": 5}, "'bleu' is not measured"),
        (
            {"best_metric": "anls", "eval_generate_steps": 3, "save_steps": 10},
            "not a multiple of train.eval_gen",
        ),
        ({"early_stopping_patience": 2}, "needs train.best_metric"),
        ({"metric_function": "my_metrics:score"}, "allow_metric_code is false"),
        ({"metric_function": "no colon"}, "is not module:function"),
        ({"metrics": ["bleu", "meteor"]}, "meteor"),
    ],
)
def test_metric_keys_refuse_what_cannot_work(train, message):
    import yaml

    from vlmtune.errors import RecipeError
    from vlmtune.recipe import parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe(RECIPE + yaml.safe_dump({"train": train}))


def test_eval_generate_steps_needs_eval_data_and_sft():
    from vlmtune.errors import RecipeError
    from vlmtune.recipe import parse_recipe

    no_eval = RECIPE.replace("  eval: eval.jsonl\n", "")
    with pytest.raises(RecipeError, match="eval_generate_steps is set but data.eval is empty"):
        parse_recipe(no_eval + "train:\n  eval_generate_steps: 5\n")
    with pytest.raises(RecipeError, match="applies to sft only"):
        parse_recipe(RECIPE + "train:\n  objective: dpo\n  eval_generate_steps: 5\n")
    recipe = parse_recipe(
        RECIPE + "train:\n  eval_generate_steps: 5\n  save_steps: 10\n  best_metric: cer\n"
        "  early_stopping_patience: 2\n"
    )
    assert recipe.train.best_metric == "cer" and recipe.train.metrics == list(METRICS)


def test_a_metric_function_beside_the_recipe_is_found_and_checked(tmp_path):
    from vlmtune.recipe import load_recipe
    from vlmtune.training.answer_eval import MetricError, user_metric

    (tmp_path / "my_metrics.py").write_text(
        "def score(predictions, references):\n    return sum(p == r for p, r in zip(predictions, references))\n"
        "def text(predictions):\n    return 'high'\n"
    )
    (tmp_path / "r.yaml").write_text(
        RECIPE + "train:\n  metric_function: my_metrics:score\n  allow_metric_code: true\n"
    )
    spec = load_recipe(tmp_path / "r.yaml").train.metric_function
    assert spec == f"{tmp_path / 'my_metrics.py'}:score"
    assert user_metric(spec)(["a", "b"], ["a", "c"], ["q1", "q2"]) == 1.0
    with pytest.raises(MetricError, match="not a finite number"):
        user_metric(spec.replace(":score", ":text"))(["a"], ["a"], ["q"])
    with pytest.raises(MetricError, match="has no function 'nope'"):
        user_metric(spec.replace(":score", ":nope"))
    with pytest.raises(MetricError, match="cannot import"):
        user_metric(f"{tmp_path / 'missing.py'}:score")
