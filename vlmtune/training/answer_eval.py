"""Answers generated during training: at train.eval_generate_steps, greedy answers to the eval split's
prompts (or a seeded sample of train.eval_max_samples of them, the same at every step), scored with
train.metrics (vlmtune.scoring) and a user's train.metric_function when the recipe opts in
(train.allow_metric_code). The scores are logged through the trainer as one row, ``eval_<metric>``:
metrics.jsonl, the trackers, the curves picture and train.best_metric all read it.

``generate_answer`` is the one greedy generation every answer comes from (`vlmtune predict`, `vlmtune
eval` and this).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlmtune.data.prompts import EvalItem, eval_item, prompt_text
from vlmtune.errors import VlmtuneError
from vlmtune.recipe import MODULE_FUNCTION, TrainSection
from vlmtune.scoring import answer_scores

METRIC_ARGUMENTS = ("predictions", "references", "prompts")


class MetricError(VlmtuneError):
    """A user's metric function could not be imported or returned something that is not a number."""


def generate_answer(
    model: Any, processor: Any, messages: list[dict], images: list[Any], max_new_tokens: int
) -> str:
    """Greedy continuation of ``messages`` (rendered with the generation prompt), special tokens removed."""
    import torch

    from vlmtune.data.collator import template_special_tokens

    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The same tokenization as training: no second BOS after a template that writes one.
    kwargs: dict[str, Any] = {
        "text": [prompt],
        "return_tensors": "pt",
        **template_special_tokens(processor.tokenizer, [prompt]),
    }
    if images:
        kwargs["images"] = [images]
    inputs = processor(**kwargs).to(model.device)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def sample_items(samples: Sequence[Any], max_samples: int | None, seed: int) -> list[EvalItem]:
    """Eval items of the samples, or of ``max_samples`` of them drawn with ``seed`` (kept in file order)."""
    chosen = list(range(len(samples)))
    if max_samples and max_samples < len(samples):
        chosen = sorted(random.Random(seed).sample(chosen, max_samples))
    return [eval_item(samples[i]) for i in chosen]


# --- a user's metric ----------------------------------------------------------------------------


def user_metric(spec: str) -> Callable[[list[str], list[str], list[str]], float]:
    """Import ``module:function`` (or ``path/file.py:function``); called with the keyword arguments it
    names among predictions, references and prompts (all of them with ``**kwargs``), it returns a number."""
    match = MODULE_FUNCTION.fullmatch(spec)
    if match is None:
        raise MetricError(f"metric function {spec!r} is not module:function", hint="e.g. my_metrics:score")
    function = getattr(_import(match["module"], spec), match["function"], None)
    if not callable(function):
        raise MetricError(
            f"metric function {spec}: {Path(match['module']).name} has no function {match['function']!r}",
            hint="check the name after the colon",
        )
    parameters = inspect.signature(function).parameters.values()
    names = (
        set(METRIC_ARGUMENTS)
        if any(p.kind is p.VAR_KEYWORD for p in parameters)
        else {p.name for p in parameters} & set(METRIC_ARGUMENTS)
    )

    def score(predictions: list[str], references: list[str], prompts: list[str]) -> float:
        given = {"predictions": predictions, "references": references, "prompts": prompts}
        value = function(**{name: given[name] for name in names})
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MetricError(
                f"metric function {spec} returned {value!r}, not a finite number",
                hint="return one number for the whole set (e.g. the mean of a per-answer score)",
            )
        return float(value)

    return score


def _import(module: str, spec: str) -> Any:
    try:
        if not module.endswith(".py"):
            return importlib.import_module(module)
        path = Path(module)
        name = f"vlmtune_metrics_{path.stem}"
        known = sys.modules.get(name)
        if known is not None and Path(known.__file__ or "") == path:
            return known
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        loaded = importlib.util.module_from_spec(loader)
        sys.modules[name] = loaded
        loader.loader.exec_module(loaded)
        return loaded
    except Exception as exc:  # the user's module may raise anything while it is imported
        raise MetricError(
            f"metric function {spec}: cannot import {module}: {type(exc).__name__}: {exc}",
            hint="put the module beside the recipe (my_metrics.py -> my_metrics:score) or make it importable",
        ) from exc


# --- the scores of one set of answers -----------------------------------------------------------


def score_answers(
    predictions: list[str], items: Sequence[EvalItem], train: TrainSection, custom: Callable | None = None
) -> dict[str, float | None]:
    """train.metrics (and the user's metric, under its function's name) of these answers."""
    references = [item.reference for item in items]
    found = answer_scores(
        predictions, references, train.metrics, train.number_tolerance, train.number_relative_tolerance
    )
    if custom is not None:
        found[train.metric_function_name] = custom(
            predictions, references, [prompt_text(item.messages) for item in items]
        )
    return found


class AnswerEval(TrainerCallback):
    """Every ``train.eval_generate_steps`` steps: the answers generated, scored and logged as one row."""

    def __init__(self, trainer: Any, processor: Any, items: list[EvalItem], train: TrainSection):
        self.trainer = trainer
        self.processor = processor
        self.items = items
        self.train = train
        self.custom = user_metric(train.metric_function) if train.metric_function else None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        every = self.train.eval_generate_steps
        if not every or state.global_step % every:
            return
        from transformers import Trainer

        found = self.measure(model if model is not None else self.trainer.model)
        logs = {f"eval_{name}": value for name, value in found.items() if value is not None}
        logs["eval_answers"] = len(self.items)
        # Trainer.log itself: TRL's log would fold (and clear) its running train metrics into this row.
        # Logging clears control.should_log, which would swallow this step's train row: keep it.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = self.trainer.control.should_log = should_log

    def measure(self, model: Any) -> dict[str, float | None]:
        from vlmtune.data import open_image

        was_training = model.training
        model.eval()
        try:
            predictions = [
                generate_answer(
                    model,
                    self.processor,
                    item.messages,
                    [open_image(s) for s in item.images],
                    self.train.eval_max_new_tokens,
                )  # fmt: skip
                for item in self.items
            ]
        finally:
            model.train(was_training)
        return score_answers(predictions, self.items, self.train, self.custom)
