#!/usr/bin/env python3
"""Where one arm of bench/compare.py spends its CPU memory: RSS at each phase of a short run.

    python bench/rss_timeline.py A            # vlmtune, 3 steps
    python bench/rss_timeline.py B --steps 4  # the plain stack

Run bench/compare.py once first (it builds the checkpoint and the data). A thread samples the
process's RSS every 2 ms; the table gives the RSS at each mark (imports done, training begins,
each step begins and ends) and the highest sample since the previous mark. It tells the floor
both arms share (libraries, loaded weights) from what a training step adds.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import compare


class Sampler:
    def __init__(self):
        self.marks: list[tuple[float, str, float]] = []
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), compare.current_rss_mb()))
            time.sleep(0.002)

    def start(self) -> None:
        self._thread.start()
        self.mark("start")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, name: str) -> None:
        self.marks.append((time.perf_counter(), name, compare.current_rss_mb()))

    def table(self, process_peak_mb: float) -> str:
        rows, previous = (
            [f"{'seconds':>8}  {'mark':<14}{'RSS MB':>8}{'peak since last':>17}"],
            self.marks[0][0],
        )
        for at, name, rss in self.marks:
            window = [mb for t, mb in self.samples if previous <= t <= at]
            rows.append(f"{at - self.marks[0][0]:8.2f}  {name:<14}{rss:8.0f}{max(window, default=rss):17.0f}")
            previous = at
        rows.append(f"process peak (VmHWM): {process_peak_mb:.0f} MB")
        return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("arm", choices=["A", "B"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--work", type=Path, default=compare.ROOT / ".cache" / "bench")
    args = parser.parse_args()
    ckpt = args.work / "qwen2vl-h512-l2-v151936"
    data = args.work / f"data-{args.image_side}" / "train.jsonl"
    if not data.is_file() or not ckpt.is_dir():
        raise SystemExit(
            f"run bench/compare.py --image-side {args.image_side} first: it builds {ckpt} and {data}"
        )

    sampler = Sampler()
    sampler.start()
    import peft  # noqa: F401  (both arms import these; the mark separates them from the run)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from transformers import TrainerCallback

    sampler.mark("imports")

    class Marks(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            sampler.mark("train begins")

        def on_step_begin(self, *args, **kwargs):
            sampler.mark("step begins")

        def on_step_end(self, *args, **kwargs):
            sampler.mark("step ends")

    timer = compare.StepTimer()
    timer.callbacks.append(Marks())
    run = compare.run_arm_a if args.arm == "A" else compare.run_arm_b
    out = args.work / f"timeline-{args.arm}-{time.time_ns()}"
    run(ckpt, data, compare.max_pixels(args.image_side), out, args.steps, timer)
    sampler.stop()
    # The probe restarts VmHWM when training begins; the larger of its two marks is the process's.
    print(sampler.table(timer.summary()["run_peak"]["rss_hwm"] / 2**20))


if __name__ == "__main__":
    main()
