"""GRPO rewards: the built-ins a recipe names without code, a user's function, and the checks every
reward's output passes.

A reward scores a batch of completions at once: ``score(batch) -> one value per completion``, a
number, or None where it does not apply (left out of that reward's mean, counted 0 in the total,
as TRL does). The built-ins compare with the reference answer (a sample's last assistant turn)
the way `vlmtune eval` does (case, spaces and trailing punctuation do not count), so the rewards
and the eval report agree.

A user's function is ``module:function``; it is imported only when the recipe sets
grpo.allow_code (the schema refuses it otherwise), before any model loads. It is called with
keyword arguments (those it names, or all of them if it takes ``**kwargs``):

    completions        list[str]         the generated answers, special tokens removed
    references         list[str | None]  the reference answer of each completion's prompt
    prompts            list[str]         the prompt as text, ``<image>`` where an image is
    samples            list[int]         each prompt's index in the data file
    completion_tokens  list[int]         each completion's length in tokens
    step               int               the optimizer step

and returns one number (or None) per completion. Whatever goes wrong (it raises, returns the
wrong count, something that is not a number, or a number beyond +-REWARD_LIMIT, or it calls
``sys.exit()``/``os._exit()``) stops training with a RewardError naming the reward, the function
and the sample. It gets copies of the lists, so changing them changes nothing vlmtune reads.
``os._exit`` ends a process without unwinding it, so while a reward function runs it is replaced
by one that raises; only a reference taken before (``from os import _exit`` at import time, or a
C extension's own exit) escapes that, and then the run is left `running`, never `done`.

The built-in regex reward matches with the ``regex`` package and a time limit per completion
(REGEX_TIMEOUT): a pattern that backtracks catastrophically on some completion stops the run with
that sample named instead of hanging it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.recipe import (
    MODULE_FUNCTION,
    ContainsReward,
    ExactMatchReward,
    FunctionReward,
    LengthReward,
    NumberReward,
    RegexReward,
)
from vlmtune.scoring import contains_answer, exact_match, last_number

Value = float | None
ARGUMENTS = ("completions", "references", "prompts", "samples", "completion_tokens", "step")
REWARD_LIMIT = 1e6  # |reward| at most: TRL sums and scales rewards in float32, where 1e300 is inf
REGEX_TIMEOUT = 1.0  # seconds the regex reward may spend matching one completion


class RewardError(VlmtuneError):
    """A reward could not score a completion: the message names the reward, its function and the sample."""


@dataclass(frozen=True)
class Batch:
    """What one reward call sees: one entry per completion (a prompt's group is consecutive)."""

    completions: list[str]
    references: list[str | None]
    prompts: list[str]
    samples: list[int]
    completion_tokens: list[int]
    step: int = 0

    def __len__(self) -> int:
        return len(self.completions)

    def row(self, i: int) -> Batch:
        return Batch(
            self.completions[i : i + 1], self.references[i : i + 1], self.prompts[i : i + 1],
            self.samples[i : i + 1], self.completion_tokens[i : i + 1], self.step,
        )  # fmt: skip

    def arguments(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ARGUMENTS}


@dataclass(frozen=True)
class Reward:
    """One reward of the recipe, ready to score."""

    name: str  # metrics.jsonl: reward_<name>
    weight: float
    score: Callable[[Batch], Sequence[Any]]
    source: str  # what the error messages call it: "built-in exact_match", "my_rewards.py:brevity"
    needs_reference: bool = False
    needs_number: bool = False  # the reference must hold a number (the number reward)


# --- the built-ins (pure) -------------------------------------------------------------------------


def exact_match_scores(batch: Batch) -> list[Value]:
    pairs = zip(batch.completions, batch.references, strict=True)
    return [None if ref is None else float(exact_match(c, ref)) for c, ref in pairs]


def contains_scores(batch: Batch) -> list[Value]:
    pairs = zip(batch.completions, batch.references, strict=True)
    return [None if ref is None else float(contains_answer(c, ref)) for c, ref in pairs]


def regex_scores(pattern: str, timeout: float = REGEX_TIMEOUT) -> Callable[[Batch], list[Value]]:
    """1.0 where the whole completion matches. Matched by the ``regex`` package (the same syntax as
    ``re``) with ``timeout`` seconds per completion: ``re`` cannot be interrupted, and a pattern such
    as ``(a|aa)+$`` takes longer than the universe's age on 40 characters."""
    import regex

    try:
        compiled = regex.compile(pattern, regex.DOTALL)
    except regex.error as exc:
        raise RewardError(
            f"regex reward pattern {pattern!r} does not compile: {exc}", hint="fix grpo.rewards' pattern"
        ) from None

    def score(batch: Batch) -> list[Value]:
        out: list[Value] = []
        for i, completion in enumerate(batch.completions):
            try:
                out.append(float(compiled.fullmatch(completion.strip(), timeout=timeout) is not None))
            except TimeoutError:
                raise RewardError(
                    f"regex reward pattern {pattern!r} ran over {timeout:g}s matching sample {batch.samples[i]} "
                    f"(completion {_quote(completion)}): it backtracks catastrophically",
                    hint="simplify the pattern: no nested or overlapping repeats such as (a+)+ or (a|aa)+",
                ) from None
        return out

    return score


def number_scores(tolerance: float, relative_tolerance: float) -> Callable[[Batch], list[Value]]:
    def score(batch: Batch) -> list[Value]:
        out: list[Value] = []
        for completion, reference in zip(batch.completions, batch.references, strict=True):
            expected = None if reference is None else last_number(reference)
            if expected is None:
                out.append(None)
                continue
            got = last_number(completion)
            close = got is not None and math.isclose(
                got, expected, rel_tol=relative_tolerance, abs_tol=tolerance
            )
            out.append(float(close))
        return out

    return score


def length_scores(max_tokens: int) -> Callable[[Batch], list[Value]]:
    def score(batch: Batch) -> list[Value]:
        return [-min(1.0, max(0, n - max_tokens) / max_tokens) for n in batch.completion_tokens]

    return score


# --- from the recipe ------------------------------------------------------------------------------


def build(specs: Sequence[Any]) -> list[Reward]:
    """The recipe's rewards, ready to score; a function reward's code is imported here.

    The schema has already refused function rewards without grpo.allow_code.
    """
    return [_build_one(spec) for spec in specs]


def _build_one(spec: Any) -> Reward:
    base = {"name": spec.label, "weight": spec.weight}
    if isinstance(spec, ExactMatchReward):
        return Reward(**base, score=exact_match_scores, source="built-in exact_match", needs_reference=True)
    if isinstance(spec, ContainsReward):
        return Reward(**base, score=contains_scores, source="built-in contains", needs_reference=True)
    if isinstance(spec, RegexReward):
        return Reward(**base, score=regex_scores(spec.pattern), source=f"built-in regex {spec.pattern!r}")
    if isinstance(spec, NumberReward):
        return Reward(
            **base, score=number_scores(spec.tolerance, spec.relative_tolerance), source="built-in number",
            needs_reference=True, needs_number=True,
        )  # fmt: skip
    if isinstance(spec, LengthReward):
        return Reward(**base, score=length_scores(spec.max_tokens), source="built-in length")
    if isinstance(spec, FunctionReward):
        return Reward(**base, score=user_function(spec.function), source=spec.function)
    raise TypeError(f"no reward for {type(spec).__name__}")  # a schema class without a builder: a bug


def user_function(spec: str) -> Callable[[Batch], Sequence[Any]]:
    """Import ``module:function`` (or ``path/file.py:function``) and adapt it to a Batch."""
    match = MODULE_FUNCTION.fullmatch(spec)
    if match is None:
        raise RewardError(f"reward function {spec!r} is not module:function", hint="e.g. my_rewards:brevity")
    module = _import(match["module"], spec)
    function = getattr(module, match["function"], None)
    if not callable(function):
        raise RewardError(
            f"reward function {spec}: {Path(match['module']).name} has no function {match['function']!r}",
            hint="check the name after the colon",
        )
    names = _accepted_arguments(function, spec)

    def score(batch: Batch) -> Any:
        # Copies: a function that changes its lists (pops, sorts) must not change what the checks read.
        arguments = {
            n: list(v) if isinstance(v, list) else v for n, v in batch.arguments().items() if n in names
        }
        with no_process_exit():
            return function(**arguments)

    return score


class ProcessExit(SystemExit):
    """``os._exit`` called by user code while ``no_process_exit`` is in force."""


@contextlib.contextmanager
def no_process_exit() -> Iterator[None]:
    """``os._exit`` raises ProcessExit meanwhile (it would end the process with no summary, no error,
    and exit 0). Rewards run in the main thread, one at a time."""
    real = os._exit

    def refused(code: int = 0) -> None:
        raise ProcessExit(code)

    os._exit = refused
    try:
        yield
    finally:
        os._exit = real


def _import(module: str, spec: str) -> Any:
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            name = f"vlmtune_rewards_{path.stem}"
            known = sys.modules.get(name)
            if known is not None and Path(known.__file__ or "") == path:
                return known  # imported once per process: before the model loads, reused by the trainer
            loader = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(loader)
            sys.modules[name] = loaded  # dataclasses and pickling look modules up by name
            try:
                with no_process_exit():
                    loader.loader.exec_module(loaded)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return loaded
        with no_process_exit():
            return importlib.import_module(module)
    except (Exception, SystemExit) as exc:  # the user's module may raise anything while it is imported
        raise RewardError(
            f"reward function {spec}: cannot import {module}: {_what(exc)}",
            hint="put the module beside the recipe (my_rewards.py -> my_rewards:function) or make it importable; "
            "--debug shows the traceback",
        ) from exc


def _accepted_arguments(function: Callable, spec: str) -> set[str]:
    """The keyword arguments to pass: those it names, or all of them if it takes **kwargs."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return set(ARGUMENTS)
    required = [
        p.name for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ARGUMENTS
    ]  # fmt: skip
    if required:
        raise RewardError(
            f"reward function {spec} needs argument(s) {', '.join(required)} that vlmtune does not pass",
            hint=f"it is called with keyword arguments from: {', '.join(ARGUMENTS)}",
        )
    return {p.name for p in parameters} & set(ARGUMENTS)


# --- calling, with checked output -----------------------------------------------------------------


def call(reward: Reward, batch: Batch) -> list[Value]:
    """The reward's values for ``batch``, checked: one finite number (or None) per completion."""
    try:
        values = reward.score(batch)
    except RewardError:
        raise
    except (Exception, SystemExit) as exc:  # any error of the reward's code (an exit too): find the sample
        raise _raised(reward, batch, exc) from exc
    return checked(reward, values, batch)


def checked(reward: Reward, values: Any, batch: Batch) -> list[Value]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {_who(reward)} returned a {type(values).__name__}, not a list of numbers, for samples "
            f"{_samples(batch)}",
            hint=f"return one number (or None) per completion: a list of {len(batch)}",
        )
    if len(values) != len(batch):
        raise RewardError(
            f"reward {_who(reward)} returned {len(values)} value(s) for {len(batch)} completions (samples "
            f"{_samples(batch)})",
            hint="return exactly one number (or None) per completion, in the order given",
        )
    out: list[Value] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
            raise RewardError(
                f"reward {_who(reward)} returned {_clip(repr(value), 80)} ({type(value).__name__}) for sample "
                f"{batch.samples[i]} (completion {_quote(batch.completions[i])}); a reward must be a finite number "
                "or None",
                hint="return a float (None where the reward does not apply)",
            )
        if abs(value) > REWARD_LIMIT:
            raise RewardError(
                f"reward {_who(reward)} returned {_clip(repr(value), 80)} for sample {batch.samples[i]} (completion "
                f"{_quote(batch.completions[i])}); rewards are summed and scaled in 32-bit floats, so one must lie "
                f"within +-{REWARD_LIMIT:g}",
                hint="scale the reward down (GRPO learns from differences within a group, not from the size)",
            )
        out.append(float(value))
    return out


def _raised(reward: Reward, batch: Batch, exc: Exception) -> RewardError:
    """The error naming the first sample the reward raises on alone (the batch if none does)."""
    where = f"samples {_samples(batch)}"
    for i in range(len(batch)):
        try:
            reward.score(batch.row(i))
        except (Exception, SystemExit):  # noqa: BLE001 - any failure of the user's code identifies the sample
            where = f"sample {batch.samples[i]} (completion {_quote(batch.completions[i])})"
            break
    if isinstance(exc, SystemExit):
        return RewardError(
            f"reward {_who(reward)} {_what(exc)} on {where}: a reward may not end the process",
            hint="return a value (None where the reward does not apply) or raise an exception to stop the run",
        )
    return RewardError(
        f"reward {_who(reward)} raised {_clip(f'{type(exc).__name__}: {exc}')} on {where}",
        hint="fix the reward function (--debug shows the traceback); return None where it does not apply",
    )


def _what(exc: BaseException) -> str:
    """An exception in words; an exit says which call made it."""
    if isinstance(exc, ProcessExit):
        return f"called os._exit({exc.code})"
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _who(reward: Reward) -> str:
    return f"`{reward.name}` ({reward.source})"


def _samples(batch: Batch) -> str:
    unique = list(dict.fromkeys(batch.samples))
    return ", ".join(map(str, unique[:8])) + (" ..." if len(unique) > 8 else "")


def _quote(text: str, limit: int = 80) -> str:
    return repr(_clip(text, limit))


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- a reward that never applies -------------------------------------------------------------------

NO_REWARD_COMPLETIONS = 512  # completions scored with no reward applying to any: the run stops


class Coverage:
    """Whether any reward applies at all. A reward returning None everywhere (a function that never
    finds its format, a column it never gets) gives GRPO nothing to learn from: every advantage is 0,
    the run trains nothing and would end `done`. Training stops once NO_REWARD_COMPLETIONS
    completions were scored without one value, and a run that ends without one fails."""

    def __init__(self, rewards: Sequence[Reward]):
        self.rewards = list(rewards)
        self.scored = 0
        self.applied = 0

    def add(self, totals: Sequence[float | None]) -> None:
        self.scored += len(totals)
        self.applied += sum(total is not None for total in totals)
        if self.scored >= NO_REWARD_COMPLETIONS:
            self.check()

    def check(self) -> None:
        if self.scored and not self.applied:
            names = ", ".join(_who(reward) for reward in self.rewards)
            raise RewardError(
                f"no reward applied to any of the {self.scored} completions scored: {names} returned None for "
                "every one, so every advantage is 0 and GRPO learns nothing",
                hint="return a number wherever a reward can judge a completion (None only where it cannot); "
                "3-train/completions.jsonl shows what the model wrote",
            )


# --- figures --------------------------------------------------------------------------------------


def weighted_total(values: Sequence[Sequence[Value]], weights: Sequence[float]) -> list[float | None]:
    """Per completion: the weighted sum of its rewards (None counts 0), None when none applies."""
    totals: list[float | None] = []
    for row in zip(*values, strict=True):
        applied = [(v, w) for v, w in zip(row, weights, strict=True) if v is not None]
        totals.append(sum(v * w for v, w in applied) if applied else None)
    return totals


def group_spread(totals: Sequence[float | None], group_size: int) -> float | None:
    """Mean over prompt groups of the std of their completions' total rewards: the signal GRPO learns
    from (a group whose completions all score alike teaches nothing)."""
    spreads = []
    for start in range(0, len(totals), group_size):
        group = [t for t in totals[start : start + group_size] if t is not None]
        if len(group) > 1:
            spreads.append(statistics.stdev(group))  # Bessel-corrected, as TRL scales advantages
    return statistics.fmean(spreads) if spreads else None
