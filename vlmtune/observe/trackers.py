"""Experiment trackers (`output.report_to`): is each installed, the trainer's settings, where files go.

vlmtune passes the names through to the trainer's ``report_to``; the HF Trainer's integration
callbacks do the tracking. What vlmtune adds: a tracker named but not installed is a recipe error
with the pip command, raised before the run folder is made or any model loads (the Trainer would
raise only after loading, with a message about its callback), and TensorBoard's event files go to
the run folder's 3-train/tensorboard/.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from vlmtune.errors import RecipeError
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir


@dataclass(frozen=True)
class Tracker:
    pip: str  # what to install
    # Modules that must be importable: each inner tuple is satisfied by any one of its names.
    needs: tuple[tuple[str, ...], ...]


# One entry per word of vlmtune.choices.Tracker (the HF Trainer's integrations, bar kubeflow, which an
# environment variable switches on); the probes are the ones transformers' is_*_available() make.
TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", (("tensorboard", "tensorboardX"),)),
    "wandb": Tracker("wandb", (("wandb",),)),
    "mlflow": Tracker("mlflow", (("mlflow",),)),
    "trackio": Tracker("trackio", (("trackio",),)),
    "comet_ml": Tracker("comet-ml", (("comet_ml",),)),
    "clearml": Tracker("clearml", (("clearml",),)),
    "neptune": Tracker("neptune", (("neptune",),)),
    "dvclive": Tracker("dvclive", (("dvclive",),)),
    "swanlab": Tracker("swanlab", (("swanlab",),)),
    "codecarbon": Tracker("codecarbon", (("codecarbon",),)),
    "azure_ml": Tracker("azureml-core", (("azureml",),)),
    "dagshub": Tracker("dagshub mlflow", (("dagshub",), ("mlflow",))),
    "flyte": Tracker("flytekit flytekitplugins-deck-standard", (("flytekit",), ("flytekitplugins",))),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package
        return False


def installed(name: str) -> bool:
    return all(any(_importable(m) for m in group) for group in TRACKERS[name].needs)


def require_installed(names: tuple[str, ...] | list[str]) -> None:
    """Raise a RecipeError naming every tracker of ``output.report_to`` that is not installed."""
    missing = [name for name in names if not installed(name)]
    if not missing:
        return
    packages = " ".join(dict.fromkeys(p for name in missing for p in TRACKERS[name].pip.split()))
    one = len(missing) == 1
    raise RecipeError(
        f"output.report_to names {', '.join(missing)}, which {'is' if one else 'are'} not installed here",
        hint=f"pip install {packages}  (or remove {'it' if one else 'them'} from output.report_to)",
    )


def trainer_args(names: tuple[str, ...] | list[str], run: RunDir) -> dict[str, Any]:
    """TrainingArguments keys: the trackers, and the run's name as the trackers show it."""
    return {"report_to": list(names) or "none", "run_name": run.path.name}


def place_event_files(trainer: Any, run: RunDir) -> None:
    """TensorBoard writes into 3-train/tensorboard/ (the Trainer's default is under checkpoints/).

    The integration's callback reads its folder from TENSORBOARD_LOGGING_DIR; a user who set that
    keeps it.
    """
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run / rundir.TENSORBOARD)
