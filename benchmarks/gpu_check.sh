#!/usr/bin/env bash
# One check on a CUDA machine with no network (issue 2 item 6, issue 4 item 5), well under 8 min:
#   1. nvidia-smi and the versions in use;
#   2. pytest -m gpu: compiled-Triton parity tests at real sizes (tests/test_gpu_parity.py);
#   3. bwd_breakdown.py: where the workspace backward's time goes (forward, dZ kernel, the two
#      cuBLAS products) at N = 16384 on both shapes, ~1 min (issue 8);
#   4. bench_loss.py at bf16 on the two real shapes (zephyr-7b H4096 V32000, qwen2.5-3b H2048
#      V151936), N = 16384 and, while time is left, 32768; the four-GEMM floor first, then the
#      iris-triton variants (workspace / atomic backward, with / without compaction), then the
#      peers (the ones not installed there are listed as skipped), torch.compile last (it
#      compiles for tens of seconds). One failing provider is a "failed" row, never the end of
#      the run.
# Results (JSON, CSV, PNG) and a log per step go to ${OUT:-benchmarks/results/gpu}.
#
# Run from anywhere:  bash benchmarks/gpu_check.sh
# If a folder .whl/ exists at the repository root, its wheels are installed first (offline) into
# /tmp/site, which goes on PYTHONPATH.
# GPU_CHECK_DRY=1 runs the CPU-reachable parts instead (no nvidia-smi, bench with --device cpu
# --quick): the way to check this script without a GPU. Where the tree has no .git, pass
# GIT_COMMIT=<sha> so that the records name the commit measured.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY:-0}"
# Whole-script limits (seconds): the bench gets what the tests left, minus a margin to write out.
TOTAL_LIMIT="${GPU_CHECK_LIMIT:-450}"
TEST_LIMIT="${GPU_CHECK_TEST_LIMIT:-120}"
BREAKDOWN_LIMIT="${GPU_CHECK_BREAKDOWN_LIMIT:-60}"

# The package is used from this checkout, not installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # compiled Triton on the GPU, never the interpreter
START=$SECONDS
failed=()

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== 0. installing offline wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee "$OUT/00_wheels.log" \
    || failed+=("wheels")
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

echo "== 1. device and versions"
{
  if [ "$DRY" = 1 ]; then
    echo "(dry run: no nvidia-smi)"
  else
    nvidia-smi
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
for dist in ("torch", "triton", "numpy", "transformers", "pytest", "hypothesis", "matplotlib", "tqdm",
             "liger-kernel", "cut-cross-entropy"):
    try:
        print(f"{dist:18s} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist:18s} not installed")
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
import iris_kernels
print("iris_kernels", iris_kernels.__version__, "from", iris_kernels.__file__)
from iris_kernels import tuning
print("auto table:", tuning.AUTO)
if torch.cuda.is_available():
    # Which fp32 weight-gradient accumulation this torch offers (autograd.WGRAD_PATH).
    from iris_kernels import autograd, linear_logprobs
    h = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(100, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    linear_logprobs(h, w, torch.randint(0, 100, (64,), device="cuda"), backend="triton", bwd="workspace").sum().backward()
    print("workspace dW accumulation:", autograd.WGRAD_PATH)
EOF
} 2>&1 | tee "$OUT/01_env.log" || failed+=("env")

echo "== 2. pytest -m gpu (limit ${TEST_LIMIT}s)"
if "$PY" -c "import pytest, hypothesis" 2> /dev/null; then
  # Each test's Triton compiles are CPU work: spread them over the machine's cores (pytest-xdist is
  # on the GPU image); the real shapes are collected first and need ~20 GB each at most.
  XDIST=()
  if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2> /dev/null; then
    XDIST=(-n 6)
  fi
  timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${XDIST[@]}" tests 2>&1 | tee "$OUT/02_pytest_gpu.log"
  rc=$?
  # 5 = nothing collected: only acceptable in the dry run, where no GPU test can run.
  if [ "$rc" -ne 0 ] && ! { [ "$DRY" = 1 ] && [ "$rc" -eq 5 ]; }; then
    failed+=("pytest-gpu(rc=$rc)")
  fi
else
  echo "pytest or hypothesis is not importable here: GPU tests NOT run (put their wheels in .whl/)" | tee "$OUT/02_pytest_gpu.log"
  failed+=("pytest-gpu(not installed)")
fi

echo "== 3. bwd_breakdown.py (limit ${BREAKDOWN_LIMIT}s)"
if [ "$DRY" = 1 ]; then
  BD_ARGS=(--dry)
else
  BD_ARGS=(--tokens 16384)
fi
timeout "$BREAKDOWN_LIMIT" "$PY" benchmarks/bwd_breakdown.py "${BD_ARGS[@]}" --output-dir "$OUT" 2>&1 \
  | tee "$OUT/03_breakdown.log" || failed+=("breakdown")

left=$(( TOTAL_LIMIT - (SECONDS - START) ))
echo "== 4. bench_loss.py (${left}s left of ${TOTAL_LIMIT}s)"
# Most decisive rows first: the floor, the library's variants, then the peers; torch.compile last.
# Providers not named here (added later) run before naive-compile; names absent are dropped.
PROVIDERS=$(cd benchmarks && "$PY" - <<'EOF'
import providers as P
first = ["floor", "iris-triton", "iris-triton-ws-hostcount", "iris-triton-ws-nocompact", "iris-triton-atomic",
         "iris-triton-atomic-nocompact", "liger-flce", "cce", "cce-exact", "liger-dpo", "iris-torch", "naive"]
last = ["torch-linear_cross_entropy", "naive-compile"]
names = [n for n in first if n in P.PROVIDERS]
names += [n for n in P.PROVIDERS if n not in first + last] + [n for n in last if n in P.PROVIDERS]
print(",".join(names))
EOF
) || PROVIDERS=""
echo "providers, in order: ${PROVIDERS:-all (could not list them)}"
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--device cpu --quick --shapes 256,64,2000)  # every row, Triton ones interpreted, fast
  [ -n "$PROVIDERS" ] && BENCH_ARGS+=(--providers "${PROVIDERS#floor,}")
else
  BENCH_ARGS=(--device cuda --dtype bf16 --shapes zephyr-7b qwen2.5-3b --tokens 16384 32768
              --repeats 10 --warmup 2)
  [ -n "$PROVIDERS" ] && BENCH_ARGS+=(--providers "$PROVIDERS")
fi
# Rows not started within the budget are recorded as skipped ("time budget exhausted"): all the
# N = 16384 rows come first. The hard timeout only guards against a hung kernel.
budget=$(( left - 90 ))
[ "$budget" -lt 30 ] && budget=30
timeout "$(( left > 60 ? left : 60 ))" "$PY" benchmarks/bench_loss.py "${BENCH_ARGS[@]}" \
  --time-budget "$budget" --output-dir "$OUT" 2>&1 | tee "$OUT/04_bench.log" || failed+=("bench")

echo "== done in $(( SECONDS - START ))s; results in $OUT:"
ls -l "$OUT"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
