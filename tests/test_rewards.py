"""GRPO rewards: the built-ins' figures, a user's function (imported only when allowed), and the
errors that name the reward, its function and the sample when a reward misbehaves."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import spawn

from vlmtune.errors import RecipeError
from vlmtune.recipe import parse_recipe
from vlmtune.training import rewards
from vlmtune.training.rewards import Batch, RewardError

from conftest import ROOT

MINIMAL = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: train.jsonl\ntrain:\n  objective: grpo\n"


def batch(completions: list[str], references: list[str | None] | None = None, tokens=None) -> Batch:
    n = len(completions)
    return Batch(
        completions=completions,
        references=references or ["Red."] * n,
        prompts=["user: <image> What colour?"] * n,
        samples=list(range(10, 10 + n)),
        completion_tokens=tokens or [3] * n,
    )


def built(*lines: str, allow_code: bool = False, base_dir: Path | None = None) -> list[rewards.Reward]:
    text = (
        MINIMAL
        + f"grpo:\n  allow_code: {str(allow_code).lower()}\n  rewards:\n"
        + "".join(f"    - {line}\n" for line in lines)
    )
    return rewards.build(parse_recipe(text, base_dir=base_dir).grpo.rewards)


# --- the built-ins ----------------------------------------------------------------------------------


def test_exact_match_and_contains_compare_as_eval_does():
    exact, contains = built("{type: exact_match}", "{type: contains, weight: 0.5}")
    b = batch(["red", " RED. ", "It is red.", "blue"], ["Red.", "Red.", "Red.", None])
    assert rewards.call(exact, b) == [1.0, 1.0, 0.0, None]  # no reference: the reward does not apply
    assert rewards.call(contains, b) == [1.0, 1.0, 1.0, None]
    assert (exact.name, exact.weight, contains.name, contains.weight) == ("exact_match", 1.0, "contains", 0.5)


def test_regex_must_match_the_whole_completion_across_lines():
    (fmt,) = built("{type: regex, pattern: '<think>.*</think> *[a-z]+', name: format}")
    b = batch(
        ["<think>it is\nred</think> red", "  <think>x</think> red  ", "red <think>x</think> red", "red"]
    )
    assert rewards.call(fmt, b) == [1.0, 1.0, 0.0, 0.0]
    assert fmt.name == "format"


def test_number_reads_the_last_number_within_tolerance():
    (exact,) = built("{type: number}")
    (loose,) = built("{type: number, tolerance: 0.5}")
    (relative,) = built("{type: number, relative_tolerance: 0.01}")
    b = batch(
        ["There are 3 cats, so 1,250 in all", "1250.4", "about 1240", "none", "-2"],
        ["1250", "1250", "The answer is 1,250.", "1250", "-2.0"],
    )
    assert rewards.call(exact, b) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert rewards.call(loose, b) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert rewards.call(relative, b) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert rewards.last_number("no digits") is None and rewards.last_number("x=1e3") == 1000.0


def test_length_penalty_starts_past_max_tokens_and_bottoms_at_minus_one():
    (length,) = built("{type: length, max_tokens: 10}")
    b = batch(["a"] * 5, tokens=[3, 10, 15, 20, 400])
    assert rewards.call(length, b) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_total_and_group_spread():
    values = [[1.0, 0.0, None, 1.0], [0.5, 0.5, None, None]]
    totals = rewards.weighted_total(values, [1.0, -2.0])
    assert totals == [0.0, -1.0, None, 1.0]  # None counts 0 beside a value; alone it stays None
    assert rewards.group_spread(totals, 2) == pytest.approx(0.70710678)  # group 2 has one scored completion
    assert rewards.group_spread([1.0, 1.0, 0.0, 0.0], 2) == 0.0  # no spread: nothing to learn from
    assert rewards.group_spread([None, None], 2) is None


# --- a user's function ------------------------------------------------------------------------------


def write_module(folder: Path, body: str, name: str = "my_rewards.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_function_beside_the_recipe_gets_the_arguments_it_names(tmp_path: Path):
    write_module(
        tmp_path,
        """
        def brevity(completions, completion_tokens):
            return [1.0 / n for n in completion_tokens]

        def everything(completions, **kwargs):
            return [float(sorted(kwargs) == ["completion_tokens", "prompts", "references", "samples", "step"])
                    for _ in completions]
        """,
    )
    brevity, everything = built(
        "{type: function, function: 'my_rewards:brevity'}",
        "{type: function, function: 'my_rewards:everything', weight: 0.1}",
        allow_code=True,
        base_dir=tmp_path,
    )
    assert brevity.name == "brevity" and brevity.source == f"{tmp_path / 'my_rewards.py'}:brevity"
    assert rewards.call(brevity, batch(["a", "b"], tokens=[2, 4])) == [0.5, 0.25]
    assert rewards.call(everything, batch(["a"])) == [1.0]


def test_function_that_needs_an_argument_vlmtune_does_not_pass_is_refused(tmp_path: Path):
    write_module(tmp_path, "def f(completions, solution):\n    return [0.0]\n")
    with pytest.raises(RewardError, match=r"needs argument\(s\) solution.*") as info:
        built("{type: function, function: 'my_rewards:f'}", allow_code=True, base_dir=tmp_path)
    assert "completions, references, prompts" in info.value.hint


def test_unknown_module_or_function_is_refused_with_its_name(tmp_path: Path):
    write_module(tmp_path, "def f(completions):\n    return [0.0]\n")
    with pytest.raises(RewardError, match="my_rewards.py has no function 'g'"):
        built("{type: function, function: 'my_rewards:g'}", allow_code=True, base_dir=tmp_path)
    with pytest.raises(RewardError, match="cannot import no_such_module_xyz: ModuleNotFoundError"):
        built("{type: function, function: 'no_such_module_xyz:f'}", allow_code=True, base_dir=tmp_path)


def test_function_without_opt_in_is_refused_by_the_schema_and_never_imported(tmp_path: Path):
    marker = tmp_path / "imported"
    write_module(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef f(completions):\n    return [0.0]\n")
    with pytest.raises(RecipeError) as info:
        built("{type: function, function: 'my_rewards:f'}", base_dir=tmp_path)
    assert "grpo.allow_code is false" in str(info.value) and "my_rewards:f" in str(info.value)
    assert not marker.exists()


# --- what a misbehaving reward says -------------------------------------------------------------------


@pytest.fixture
def misbehaving(tmp_path: Path) -> dict[str, rewards.Reward]:
    write_module(
        tmp_path,
        """
        def raises_on_blue(completions, **kwargs):
            return [float(len(c)) if c != "blue" else 1 / 0 for c in completions]

        def one_short(completions, **kwargs):
            return [0.0] * (len(completions) - 1)

        def words(completions, **kwargs):
            return ["good" if c == "red" else 0.0 for c in completions]

        def nan(completions, **kwargs):
            return [float("nan")] * len(completions)

        def a_number(completions, **kwargs):
            return 1.0
        """,
    )
    names = ("raises_on_blue", "one_short", "words", "nan", "a_number")
    lines = [f"{{type: function, function: 'my_rewards:{n}'}}" for n in names]
    return dict(zip(names, built(*lines, allow_code=True, base_dir=tmp_path), strict=True))


def test_a_reward_that_raises_names_itself_and_the_sample(misbehaving):
    with pytest.raises(RewardError) as info:
        rewards.call(misbehaving["raises_on_blue"], batch(["red", "green", "blue", "red"]))
    message = str(info.value)
    assert "reward `raises_on_blue`" in message and "my_rewards.py:raises_on_blue" in message
    assert "ZeroDivisionError" in message and "sample 12 (completion 'blue')" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # --debug shows the user's traceback


def test_a_reward_of_the_wrong_length_names_itself_and_the_samples(misbehaving):
    with pytest.raises(RewardError) as info:
        rewards.call(misbehaving["one_short"], batch(["a", "b", "c"]))
    assert "reward `one_short`" in str(info.value) and "returned 2 value(s) for 3 completions" in str(
        info.value
    )
    assert "samples 10, 11, 12" in str(info.value)


def test_a_reward_that_is_not_a_number_names_itself_and_the_sample(misbehaving):
    with pytest.raises(RewardError) as info:
        rewards.call(misbehaving["words"], batch(["blue", "red"]))
    assert "reward `words`" in str(info.value) and "'good' (str) for sample 11 (completion 'red')" in str(
        info.value
    )
    with pytest.raises(RewardError, match="returned nan .* for sample 10"):
        rewards.call(misbehaving["nan"], batch(["x"]))
    with pytest.raises(RewardError, match="returned a float, not a list of numbers"):
        rewards.call(misbehaving["a_number"], batch(["x"]))


def test_recipe_rewards_need_unique_plain_names():
    with pytest.raises(RecipeError, match="two rewards would be logged as exact_match"):
        parse_recipe(MINIMAL + "grpo:\n  rewards: [{type: exact_match}, {type: exact_match, weight: 2}]\n")
    with pytest.raises(RecipeError, match="reward name 'std' is taken"):
        parse_recipe(MINIMAL + "grpo:\n  rewards: [{type: contains, name: std}]\n")
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        parse_recipe(MINIMAL + "grpo:\n  rewards: [{type: regex, pattern: '(['}]\n")


# --- rewards that exit, hang, overflow or change their arguments (issue 23) ---------------------------


def isolated(code: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a reward that ends the process must not end pytest), with a
    time limit (a hang fails instead of hanging the suite)."""
    script = tmp_path / "isolated.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return spawn.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )


CALL_ONE = """
    import sys
    from test_rewards import batch, built
    from vlmtune.training import rewards
    try:
        (reward,) = built({line!r}, allow_code=True, base_dir=__import__("pathlib").Path.cwd())
        rewards.call(reward, batch({completions!r}))
    except rewards.RewardError as exc:
        print(exc)
        sys.exit(3)
    print("no error")
"""


@pytest.mark.parametrize(
    ("body", "said"),
    [("import sys; sys.exit(0)", "called sys.exit(0)"), ("import os; os._exit(0)", "called os._exit(0)"),
     ("raise SystemExit('bye')", "called sys.exit('bye')")],
)  # fmt: skip
def test_a_reward_that_exits_is_an_error_naming_the_call(tmp_path: Path, body: str, said: str):
    write_module(tmp_path, f"def leave(completions, **kwargs):\n    {body}\n")
    code = CALL_ONE.format(line="{type: function, function: 'my_rewards:leave'}", completions=["red", "blue"])
    result = isolated(code, tmp_path)
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr[-2000:])
    assert f"my_rewards.py:leave) {said} on sample 10 (completion 'red')" in result.stdout
    assert "a reward may not end the process" in result.stdout


def test_a_module_that_exits_while_imported_is_an_error(tmp_path: Path):
    write_module(tmp_path, "import os\nos._exit(0)\n")
    code = CALL_ONE.format(line="{type: function, function: 'my_rewards:leave'}", completions=["red"])
    result = isolated(code, tmp_path)
    assert result.returncode == 3 and "my_rewards.py: called os._exit(0)" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_a_catastrophically_backtracking_regex_stops_naming_the_sample(tmp_path: Path):
    code = CALL_ONE.format(line="{type: regex, pattern: '(a|aa)+$'}", completions=["aaa", "a" * 40 + "!"])
    result = isolated(code, tmp_path, timeout=60)  # Python's re: longer than the age of the universe
    assert result.returncode == 3, (result.stdout, result.stderr[-2000:])
    assert (
        "ran over 1s matching sample 11" in result.stdout and "backtracks catastrophically" in result.stdout
    )
    (reward,) = built("{type: regex, pattern: '(a|aa)+$'}")
    assert rewards.call(reward, batch(["aaaa", "ab"])) == [1.0, 0.0]  # an ordinary match is unaffected


@pytest.mark.parametrize("value", ["1e300", "-1e7", "10**400"])
def test_a_reward_beyond_the_limit_is_refused_naming_the_sample(tmp_path: Path, value: str):
    write_module(tmp_path, f"def huge(completions, **kwargs):\n    return [0.5, {value}]\n")
    (reward,) = built("{type: function, function: 'my_rewards:huge'}", allow_code=True, base_dir=tmp_path)
    with pytest.raises(RewardError) as info:
        rewards.call(reward, batch(["red", "blue"]))
    assert "for sample 11 (completion 'blue')" in str(info.value) and "within +-1e+06" in str(info.value)
    at_the_limit = dataclasses.replace(reward, score=lambda b: [1e6, -1e6])
    assert rewards.call(at_the_limit, batch(["a", "b"])) == [1e6, -1e6]


def test_a_reward_that_changes_its_arguments_changes_nothing_vlmtune_reads(tmp_path: Path):
    write_module(
        tmp_path,
        """
        def greedy(completions, samples, references, **kwargs):
            n = len(completions)
            completions.clear(); samples.reverse(); references[:] = []
            return [1.0] * n

        def short(completions, samples, **kwargs):
            completions.pop(); samples.pop()
            return [1.0] * len(completions)
        """,
    )
    greedy, short = built(
        "{type: function, function: 'my_rewards:greedy'}", "{type: function, function: 'my_rewards:short'}",
        allow_code=True, base_dir=tmp_path,
    )  # fmt: skip
    given = batch(["red", "blue", "green"])
    assert rewards.call(greedy, given) == [1.0, 1.0, 1.0]
    assert given.completions == ["red", "blue", "green"] and given.samples == [10, 11, 12]
    with pytest.raises(RewardError, match=r"returned 2 value\(s\) for 3 completions \(samples 10, 11, 12\)"):
        rewards.call(short, given)


def test_coverage_stops_once_enough_completions_got_no_reward_at_all():
    (reward,) = built("{type: contains}")
    coverage = rewards.Coverage([reward])
    coverage.check()  # nothing scored yet (a resume at its last step): no verdict
    for _ in range(rewards.NO_REWARD_COMPLETIONS // 16 - 1):
        coverage.add([None] * 16)
    with pytest.raises(
        RewardError, match=r"no reward applied to any of the 512 completions scored: `contains`"
    ):
        coverage.add([None] * 16)
    rescued = rewards.Coverage([reward])
    rescued.add([None] * 15 + [0.0])  # one value anywhere: the rewards apply, a zero is a signal too
    for _ in range(64):
        rescued.add([None] * 16)
    rescued.check()
