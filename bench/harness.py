"""What the bench scripts share: random-weight checkpoints at real shapes, a probe on training runs,
and `vlmtune` run inside the calling process.

vlmtune is driven through its CLI here (its internals are being reorganised), and the plain stack
through TRL; both end in ``transformers.Trainer.train``, so one hook there measures every run the
same way: step times, losses, tokens per batch, trainable parameters and peak memory (CUDA's
allocator on a GPU, the process's RSS high-water mark on CPU, each labelled with its kind).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import runpy
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

# --- memory ---------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    return _proc_status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. Not ru_maxrss: Linux carries that across exec from the parent."""
    return _proc_status_mb("VmHWM:")


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this benchmark measures memory on Linux only")


def reset_peak(device: str) -> None:
    """Start a new high-water mark: CUDA's allocator peaks, or the kernel's VmHWM (clear_refs 5)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def memory_now(device: str) -> dict:
    """Bytes held now. On CUDA what the allocator hands out and keeps; on CPU the resident set."""
    if device == "cuda":
        import torch

        return {
            "kind": "cuda",
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
        }
    return {"kind": "rss", "rss": int(current_rss_mb() * 2**20)}


def memory_peak(device: str) -> dict:
    """The high-water marks since the last reset_peak (or the process start)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return {
            "kind": "cuda",
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
        }
    return {"kind": "rss_hwm", "rss_hwm": int(peak_rss_mb() * 2**20)}


def peak_bytes(peak: dict) -> int:
    """The one figure a goal compares: max_memory_allocated on CUDA, the RSS high-water mark on CPU."""
    return peak["max_memory_allocated"] if peak["kind"] == "cuda" else peak["rss_hwm"]


def larger_peak(a: dict, b: dict) -> dict:
    return {k: max(a[k], b[k]) if k != "kind" else a[k] for k in a}


# --- the probe ------------------------------------------------------------------------------------


class StepTimer:
    """Wall time, loss and tokens of every step of a Trainer run, and its memory before and during training.

    ``with timer.watching():`` hooks every Trainer.train() in the block (vlmtune's, TRL's): our
    callbacks join the trainer's, and its collator is wrapped to count the real tokens (attention
    mask) of each batch. ``callbacks`` may be extended before the run (bench/rss_timeline.py does).
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.batch_tokens: list[int] = []
        self.trainable_params: int | None = None
        self.language_attention: str | None = None  # the language model's attention as the run trains it
        self.rss_before_training_mb = 0.0
        self.before_training: dict = {}
        self.load_peak: dict = {}
        self.training_peak: dict = {}
        self.started = 0.0
        self.at_train_begin: list[Callable[[], None]] = []  # run once the model is loaded
        self.callbacks = [self._callback()]

    def _callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                timer.train_begins(model)

            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()  # CUDA runs asynchronously: the step is done when its kernels are
                timer.seconds.append(time.perf_counter() - timer.started)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                timer.training_peak = memory_peak(timer.device)

        return Callback()

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def train_begins(self, model: Any) -> None:
        """Memory the run holds before its first step (imports, weights, data), then a fresh peak."""
        self.rss_before_training_mb = current_rss_mb()
        self.before_training = memory_now(self.device)
        self.load_peak = memory_peak(self.device)
        if model is not None:
            self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.language_attention = model.config.get_text_config()._attn_implementation
        for action in self.at_train_begin:
            action()
        reset_peak(self.device)

    @contextlib.contextmanager
    def watching(self) -> Iterator[StepTimer]:
        from transformers import Trainer

        original = Trainer.train
        timer = self

        def train(trainer, *args, **kwargs):
            for callback in timer.callbacks:
                trainer.add_callback(callback)
            trainer.data_collator = TokenCounter(trainer.data_collator, timer.batch_tokens)
            return original(trainer, *args, **kwargs)

        Trainer.train = train
        try:
            yield self
        finally:
            Trainer.train = original

    def summary(self) -> dict:
        """The figures of the run; run_peak covers loading and training."""
        timed = self.seconds[1:] or self.seconds  # the first step warms caches (and compiles)
        median = sorted(timed)[len(timed) // 2] if timed else None
        tokens = self.batch_tokens[: len(self.seconds)]
        per_step = sum(tokens) / len(tokens) if tokens else None
        return {
            "steps": len(self.seconds),
            "step_seconds": self.seconds,
            "median_step_s": median,
            "losses": self.losses,
            "tokens_per_step": per_step,
            "tokens_per_s": per_step / median if per_step and median else None,
            "trainable_params": self.trainable_params,
            "language_attention": self.language_attention,
            "before_training": self.before_training,
            "load_peak": self.load_peak,
            "training_peak": self.training_peak,
            "run_peak": larger_peak(self.load_peak, self.training_peak)
            if self.training_peak
            else self.load_peak,
        }


class TokenCounter:
    """A collator wrapper: the real tokens (attention mask) of each batch it builds, in order."""

    def __init__(self, collator: Callable, counts: list[int]):
        self.collator = collator
        self.counts = counts

    def __call__(self, rows: list) -> Any:
        batch = self.collator(rows)
        mask = batch.get("attention_mask")
        self.counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


# --- vlmtune through its CLI, in this process -------------------------------------------------


def run_vlmtune(args: list[str]) -> None:
    """``python -m vlmtune ARGS`` inside this process, so a StepTimer sees its trainer.

    VLMTUNE_DEBUG=1 makes vlmtune raise its errors instead of printing them, so the caller gets
    the message; any non-zero exit becomes a RuntimeError.
    """
    saved_argv, saved_debug = sys.argv, os.environ.get("VLMTUNE_DEBUG")
    sys.argv = ["vlmtune", *args]
    os.environ["VLMTUNE_DEBUG"] = "1"
    try:
        runpy.run_module("vlmtune", run_name="__main__", alter_sys=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"vlmtune {' '.join(args)} exited with {exc.code}") from None
    finally:
        sys.argv = saved_argv
        if saved_debug is None:
            os.environ.pop("VLMTUNE_DEBUG", None)
        else:
            os.environ["VLMTUNE_DEBUG"] = saved_debug


# --- random-weight checkpoints ----------------------------------------------------------------


def bundled_config(hub_id: str) -> dict:
    """The architecture config vlmtune ships for estimate-memory (vlmtune/model/configs/OWNER--NAME.json)."""
    name = hub_id.replace("/", "--", 1) + ".json"
    return json.loads((resources.files("vlmtune.model") / "configs" / name).read_text(encoding="utf-8"))


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def with_tiny_token_ids(config: dict, tiny_config: dict) -> dict:
    """The real config with the tiny tokenizer's special ids (the model finds image tokens by id).

    Top-level ``*_token_id`` / ``*_token_index`` keys and the text config's bos/eos/pad come from
    the tiny checkpoint's config; the vocabulary keeps its real size, so every tiny id fits.
    """
    out = dict(config)
    for key, value in tiny_config.items():
        if not key.startswith("_") and key.endswith(("_token_id", "_token_index")):
            out[key] = value
    text = dict(out.get("text_config", {}))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in tiny_config.get("text_config", {}):
            text[key] = tiny_config["text_config"][key]
    out["text_config"] = text
    return out


def fit_mllama_processor(processor: Any, config: dict) -> None:
    """Mllama tiles images at the vision tower's size; the tiny processor's 28 px tiles would not match."""
    side = config["vision_config"]["image_size"]
    size = processor.image_processor.size  # a SizeDict in transformers 5.23, which a plain dict breaks
    processor.image_processor.size = type(size)(height=side, width=side)
    processor.image_processor.max_image_tiles = config["vision_config"]["max_num_tiles"]


# What the tiny processor must learn from a real config, per family (Qwen's geometry already matches).
FIT_PROCESSOR: dict[str, Callable[[Any, dict], None]] = {"mllama": fit_mllama_processor}


def open_cross_attention_gates(model: Any) -> None:
    """Mllama's cross-attention gates start at zero; released checkpoints hold trained values, so
    images reach the text (and the vision tower gets gradients) as they do here once opened."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)


def build_random_checkpoint(config: dict, family: str, out: Path, device: str) -> None:
    """Random bf16 weights at ``config``'s shapes, saved with the tiny FAMILY's tokenizer and processor.

    The model is initialised directly on ``device`` in bf16 (no fp32 copy, no CPU detour on a GPU
    machine), saved, and freed, so a later measurement in this process starts clean.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor, save_processor
    from vlmtune.model.tiny import tiny_model_path

    tiny = tiny_model_path(family)
    processor = load_processor(tiny, get_family(family))
    tiny_config = json.loads((tiny / "config.json").read_text())
    fields = with_tiny_token_ids({k: v for k, v in config.items() if k != "_name_or_path"}, tiny_config)
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(model_config, dtype=torch.bfloat16)
    open_cross_attention_gates(model)
    FIT_PROCESSOR.get(family, lambda p, c: None)(processor, config)
    check_disk(out, sum(p.numel() * p.element_size() for p in model.parameters()))
    model.save_pretrained(out)
    save_processor(processor, out)
    del model
    free_memory(device)


def check_disk(out: Path, weight_bytes: int) -> None:
    """Fail before writing rather than with a half-written checkpoint (the GPU machine has 64 GB)."""
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < weight_bytes * 1.05 + 2**30:
        raise RuntimeError(
            f"{out} has {free / 2**30:.1f} GiB free; the checkpoint needs {weight_bytes / 2**30:.1f} GiB"
        )


def drop_weights(checkpoint: Path) -> None:
    """Delete a loaded checkpoint's weight files; config and processor files stay for estimate-memory."""
    for path in checkpoint.glob("*.safetensors*"):
        path.unlink()


class DiskTurn:
    """One real-size checkpoint on disk at a time: two (16 + 21 GB) may not fit beside the machine's
    image. Held from the build until its weights are loaded and deleted; flock is released by the
    kernel if the holder dies, so a killed part never blocks the next."""

    def __init__(self, path: Path):
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        import fcntl

        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
