"""A run folder as an lmms-eval model, so its benchmark suite scores what vlmtune trained.

    lmms-eval --model vlmtune --model_args run=runs/demo-20261123-101500 --tasks mmmu_val,chartqa

lmms-eval (the optional `[lmms]` extra, `make install-lmms`) finds the model through the entry point
``lmms_eval.models: vlmtune`` (pyproject.toml), which names ``manifest`` below. The run opens as
predict opens it (``open_trained_run``: the best checkpoint, or ``checkpoint=`` last, best or a step),
or an export folder as predict loads one, and every request is answered greedily by
``generate_answer``, the generation predict, eval and the training-time answer metrics use; so a
benchmark sees the answers `vlmtune predict` would print.

This module imports lmms-eval at the top: only lmms-eval (through the entry point) and the tests
import it, never vlmtune's own commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from vlmtune.after.generate import generate_answer, open_images, user_turn
from vlmtune.after.trained import is_export, load_export, load_for_inference, open_trained_run
from vlmtune.errors import DataError, VlmtuneError

MODEL_ID = "vlmtune"  # --model vlmtune
# The answer's limit when a task's generation_kwargs name none (lmms-eval's own models use 128 to 1024).
DEFAULT_MAX_NEW_TOKENS = 128


def manifest() -> Any:
    """What the ``lmms_eval.models`` entry point hands lmms-eval: the model id and its class path.

    Imported here, not at the top: lmms_eval.models reads the entry points while it initialises, and
    importing it from this module's top would make a process that imports this module first read the
    entry point of a module not yet defined."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{VlmtuneRun.__name__}")


class VlmtuneRun(lmms):
    """A finished vlmtune run (or a merged export) answering lmms-eval's generation requests greedily.

    ``--model_args run=PATH[,checkpoint=last|best|STEP][,max_new_tokens=N][,force=true]``; lmms-eval adds
    ``batch_size`` and ``device`` (``--batch_size``, ``--device``). Answers are generated one request at a
    time, as predict does, whatever ``batch_size`` says.
    """

    is_simple = True  # requests carry the prompt text and a doc_to_visual function, not chat messages

    def __init__(
        self,
        run: str | None = None,
        checkpoint: str | None = None,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        force: bool | str = False,
        device: str | None = None,
        batch_size: int | str | None = None,  # accepted for lmms-eval's --batch_size, see the class doc
        max_batch_size: int | str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown or not run:
            raise VlmtuneError(
                f"--model_args for vlmtune: {_unknown_args_problem(run, unknown)}",
                hint="pass --model_args run=RUN_DIR (a finished `vlmtune train` run or a merged export), and "
                "optionally checkpoint=last|best|STEP, max_new_tokens=N, force=true",
            )
        self.max_new_tokens = int(max_new_tokens)
        run = str(run)  # lmms-eval reads "true" as True and digits as an int in --model_args
        if is_export(run):
            self.which = f"the export {run}"
            self.inference = load_export(run, device=device or "cpu")
        else:
            picked = None if checkpoint in (None, "") else str(checkpoint)  # checkpoint=40 arrives as 40
            trained = open_trained_run(run, picked, force=force is True or str(force).lower() == "true")
            self.which = f"{trained.which} of run {run}"
            self.inference = load_for_inference(trained, device=device or None)
        print(f"vlmtune: scoring {self.which}", file=sys.stderr)  # as predict says which weights answer
        skip_filelock_patch_without_its_module()
        self._warned_sampling = False

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One greedy answer per request: its visuals first in the user turn, then its prompt (as predict)."""
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = request_images(doc_to_visual(self.task_dict[task][split][doc_id]))
            answer = self.answer(context, images, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers

    def answer(self, prompt: str, images: list[Any], gen_kwargs: dict) -> str:
        self._note_sampling(gen_kwargs)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        messages = user_turn(prompt, len(images))
        answer = generate_answer(
            self.inference.model, self.inference.processor, messages, images, max_new_tokens
        )
        return cut_at_stop(answer, gen_kwargs.get("until"))

    def _note_sampling(self, gen_kwargs: dict) -> None:
        """Say once that a task's sampling or beam settings are not followed: vlmtune's answers are greedy."""
        asked = sampling_asked(gen_kwargs)
        if asked and not self._warned_sampling:
            print(f"vlmtune: answers greedily; the task's {asked} is not used", file=sys.stderr)
            self._warned_sampling = True

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise VlmtuneError(
            "the vlmtune model answers generation tasks only (output_type generate_until); this task scores "
            "log-likelihoods (output_type loglikelihood or multiple_choice)",
            hint="pick the task's generation variant (most lmms-eval image benchmarks are generate_until)",
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise VlmtuneError(
            "the vlmtune model answers single-turn generation tasks only; this task asks several rounds",
            hint="pick a single-round task (output_type generate_until)",
        )


def skip_filelock_patch_without_its_module() -> None:
    """lmms-eval 0.7.3's evaluator patches ``filelock._api.FileLockMeta`` before loading any task (against
    nested dataset loads deadlocking under filelock 3.16-3.x); filelock 4, which this stack's datasets and
    huggingface_hub run with, has no ``filelock._api``, and the evaluator would stop on a
    ModuleNotFoundError. The model is created before that patch runs, so it marks the patch done here, only
    when that module is missing. Without the patch, a nested acquire of one lock file by a second lock object
    raises filelock 4's own deadlock error instead of hanging; a task's dataset loads without nesting."""
    import importlib.util

    if importlib.util.find_spec("filelock._api") is None:
        from lmms_eval import evaluator

        evaluator._enable_reentrant_filelocks._patched = True


def sampling_asked(gen_kwargs: dict) -> dict:
    """The generation settings of a task that ask for other than greedy answers (lmms-eval's own models
    sample when temperature > 0, as with do_sample)."""
    asked = {}
    if gen_kwargs.get("do_sample"):
        asked["do_sample"] = gen_kwargs["do_sample"]
    if (gen_kwargs.get("temperature") or 0) > 0:
        asked["temperature"] = gen_kwargs["temperature"]
    if (gen_kwargs.get("num_beams") or 1) > 1:
        asked["num_beams"] = gen_kwargs["num_beams"]
    return asked


def _unknown_args_problem(run: str | None, unknown: dict) -> str:
    if unknown:
        return f"unknown {'arguments' if len(unknown) > 1 else 'argument'} {', '.join(sorted(unknown))}"
    return "run= is missing" if run is None else "run= is empty"


def request_images(visuals: Any) -> list[Any]:
    """A doc's visuals as RGB images: PIL images or image paths, one or a (nested) list; None for none.
    Video and audio (a path of another kind, a dict) are refused: vlmtune trains on images."""
    from PIL import Image

    images = []
    for visual in _flatten(visuals):
        if isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        elif isinstance(visual, str | Path) and Path(visual).suffix.lower() in IMAGE_SUFFIXES:
            images.extend(open_images([visual]))
        else:
            raise DataError(
                f"the vlmtune model takes images only; this task gave {type(visual).__name__} {str(visual)[:80]!r}",
                hint="pick an image task (no video or audio), or return PIL images or image paths from doc_to_visual",
            )
    return images


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, list | tuple):
        return [item for visual in visuals for item in _flatten(visual)]
    return [visuals]


def cut_at_stop(answer: str, until: str | list[str] | None) -> str:
    """The answer up to the first of the task's stop strings (``until``), as lmms-eval's own models cut it."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            answer = answer.split(stop, 1)[0]
    return answer


def doc_images(doc: dict) -> list[Any]:
    """A ``doc_to_visual`` for a local task: the doc's ``image`` or ``images`` column (PIL images or paths).

    In a task YAML: ``doc_to_visual: !function vlmtune.after.lmms_eval_model.doc_images``."""
    for column in ("images", "image"):
        if doc.get(column) is not None:
            return request_images(doc[column])
    raise DataError(
        f"the task's doc has no image or images column (it has {', '.join(sorted(doc)) or 'nothing'})",
        hint="name the image column `image` (one per doc) or `images` (a list), or write your own doc_to_visual",
    )
