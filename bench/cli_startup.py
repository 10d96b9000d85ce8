#!/usr/bin/env python3
"""How long `vlmtune --help` and `vlmtune validate` take, against a bare interpreter start.

    python bench/cli_startup.py [--repeat 15]

Interleaved runs (bare, help, validate, bare, ...); medians and the overhead over a bare
`python -c pass`, which is what vlmtune itself adds. Targets: help < 0.3 s, validate < 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "bare python": [sys.executable, "-c", "pass"],
    "vlmtune --help": [sys.executable, "-m", "vlmtune", "--help"],
    "vlmtune validate": [sys.executable, "-m", "vlmtune", "validate", str(ROOT / "recipes" / "demo.yaml")],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["bare python"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:18} median {median:.3f} s   over bare python {median - bare:+.3f} s")


if __name__ == "__main__":
    main()
