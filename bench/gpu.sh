#!/usr/bin/env bash
# The GPU benchmark in one command; bench/gpu.py says what it measures. From the repo root:
#   bash bench/gpu.sh                                         # GPU machine: .whl/ -> .site, then gpu.py
#   PYTHON=.venv/bin/python bash bench/gpu.sh --dry-run       # the same steps on CPU, tiny shapes
# .whl/ comes from ../shared/gpu/fetch-wheels.sh on the CPU machine (the device tool: carry [".whl"]).
# Results: $OUT/gpu-<date>.json (bench/results/ without $OUT), per-part logs and gpu-machine.txt beside it.
# Extra arguments go to gpu.py (e.g. --parts compare env).
set -uo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS
budget=${BENCH_BUDGET_S:-480} # the whole launch, the install included: 8 minutes
python=${PYTHON:-python3}
suffix=""
[[ " $* " == *" --dry-run "* ]] && suffix="-dry-run"
out=${OUT:-$([[ -n $suffix ]] && echo .cache/bench-gpu-dry-run || echo bench/results)}
mkdir -p "$out"

# The GPU machine lacks trl, bitsandbytes, datasets, pydantic (gpu/README.md). A dry run uses the
# caller's environment: the wheels are built for the GPU machine's Python 3.12.
if [[ -z $suffix ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# What the machine holds, to read a failed import afterwards without another launch.
{ "$python" -m pip list --format=freeze; nvidia-smi; } >"$out/gpu-machine$suffix.txt" 2>&1

# gpu.py stops starting and kills parts at its deadline; 20 s stay for its report and the copy back.
deadline=$((budget - (SECONDS - began) - 20))
exec "$python" bench/gpu.py --deadline "$deadline" --out "$out/gpu-$(date +%F)$suffix.json" "$@"
