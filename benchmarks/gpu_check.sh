#!/usr/bin/env bash
# The GPU run (issue 17 item 4): the numbers that decide tuning.py's defaults come back first, and
# no failing part can empty the run. Default budget 8 min (GPU_CHECK_LIMIT=480 s) of device time:
#   0. offline wheels from .whl/ (the peers), nvidia-smi and the versions  -> $OUT/00_env.log
#   then benchmarks/gpu_check.py (its docstring has the order; GPU_CHECK_DRY=1 prints it on a CPU):
#   selfcheck in the background; at N = 16384 bf16 the floor, the default path, the split forward
#   and the atomic backward on Zephyr-7B, then Qwen2.5-3B; the breakdown; compaction / host count /
#   frozen head / IRIS fused vs composed; the peers; N = 32768; pytest -m gpu with what is left.
# Every provider runs in its own process with a timeout and checks its errors on the device; every
# row is appended to $OUT/rows.jsonl the moment it exists; a summary table ends the run.
#
# Run from anywhere:  OUT=/some/folder bash benchmarks/gpu_check.sh   (default OUT: benchmarks/results/gpu)
# GPU_CHECK_DRY=1: the same plan on a CPU at tiny shapes (Triton through the interpreter).
# Where the tree has no .git, pass GIT_COMMIT=<sha> so that the records name the commit measured.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # compiled Triton on the GPU; the dry run's bench sets it per process
START=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== 0. installing offline wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee "$OUT/00_wheels.log"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

echo "== 0. device and versions"
{
  if [ "$DRY" = 1 ]; then echo "(dry run: no nvidia-smi)"; else nvidia-smi; fi
  "$PY" - <<'EOF'
import json, platform, sys
import torch
import iris_kernels
from iris_kernels import selfcheck, tuning
print("python", platform.python_version(), sys.executable)
print(json.dumps(selfcheck.versions()))
print(json.dumps(selfcheck.device_info()))
print("peers:", json.dumps(selfcheck.peers()))
print("iris_kernels from", iris_kernels.__file__)
print("auto table:", tuning.AUTO)
EOF
} 2>&1 | tee "$OUT/00_env.log"

"$PY" benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "== gpu_check.sh done in $(( SECONDS - START )) s; results in $OUT"
exit "$rc"
