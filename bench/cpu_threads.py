#!/usr/bin/env python3
"""Torch threads on CPU: the demo recipe trained with train.cpu_threads = 1, 2, ... and auto, interleaved.

    python bench/cpu_threads.py                          # 20 steps, arms 1 2 auto, 2 rounds
    python bench/cpu_threads.py --steps 20 --rounds 3 --arms 0 1 2 auto

Each arm is its own `vlmtune train recipes/demo.yaml` process (OMP_NUM_THREADS removed from its
environment, so only the recipe key decides; arm 0 = torch's default, one thread per core), run
in the order A B C A B C ... so the machine's load hits every arm alike. The figure is the train
stage's seconds from summary.json (imports and model loading left out) and the process's wall
time; the losses of every arm are compared (threads must not change what is learnt). The machine's
load average is recorded beside each run: on a shared machine it is the point of the benchmark.
Results go to bench/results/cpu_threads-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def one_run(arm: str, steps: int, workdir: Path, index: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    run_dir = workdir / f"run-{arm}-{index}"
    command = [
        sys.executable, "-m", "vlmtune", "train", str(ROOT / "recipes" / "demo.yaml"),
        "--set", f"train.max_steps={steps}", "--set", f"train.cpu_threads={arm}",
        "--set", "train.eval_steps=1000", "--set", "train.save_steps=1000", "--run-dir", str(run_dir),
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    train = summary["stages"]["train"]
    return {
        "arm": arm,
        "threads": summary.get("cpu_threads"),
        "train_seconds": train["seconds"],
        "wall_seconds": round(wall, 2),
        "first_loss": train.get("first_loss"),
        "last_loss": train.get("last_loss"),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"cpu_threads-{date.today()}.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vlmtune-threads-") as tmp:
        for index in range(args.rounds):
            for arm in args.arms:
                runs.append(one_run(arm, args.steps, Path(tmp), index))
                print(json.dumps(runs[-1]), flush=True)
    table = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {
            "threads": mine[0]["threads"],
            "median_train_seconds": statistics.median(r["train_seconds"] for r in mine),
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in mine),
            "last_losses": sorted({r["last_loss"] for r in mine}),
        }
    result = {
        "steps": args.steps,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "runs": runs,
        "arms": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'cpu_threads':>12} {'threads':>8} {'train s (median)':>17} {'wall s (median)':>16}  last loss")
    for arm, row in table.items():
        print(
            f"{arm:>12} {row['threads']!s:>8} {row['median_train_seconds']:>17.1f} "
            f"{row['median_wall_seconds']:>16.1f}  {row['last_losses']}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
