#!/usr/bin/env bash
# The one script a GPU session runs (issue 15): the GPU tests, then the GPU latency benchmark.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Everything goes under $OUT (default ./gpu_check_out): env.txt, gpu_tests*.log/.xml (one per shard),
# gpu_latency.log, gpu_latency.json, summary.txt.  Total time about 10 minutes at most: tests are bounded by TEST_TIMEOUT (default
# 270 s), the benchmark by BENCH_TIMEOUT (default 330 s; its own budget is 290 s).  Without a GPU it writes
# "no GPU" to summary.txt and exits 2 without running anything.  Exit status: 0 when every step passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
TEST_TIMEOUT=${TEST_TIMEOUT:-270}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# A Python with torch: the project's venv if it has one, else the one on PATH.  The sources are used in place.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PY=$ROOT/.venv/bin/python
  else
    PY=$(command -v python3 || command -v python)
  fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the GPU tests need the compiled kernels

{
  echo "date: $(date -u +%FT%TZ)"
  echo "python: $PY"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" - <<'EOF'
import importlib
for m in ("torch", "triton", "timm", "pytest", "ivit"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '?')})")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count(),
      "cuda:", torch.version.cuda)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "gpu_check: no GPU (torch.cuda.is_available() is False on this machine); nothing was run or measured"
  exit 2
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "pytest missing: trying pip install -e .[dev] (needs a package index)" | tee -a "$OUT/env.txt"
  "$PY" -m pip install --quiet -e "$ROOT[dev]" >>"$OUT/env.txt" 2>&1 || true
fi

status=0
start=$(date +%s)
# 1. GPU tests: the triton kernels on CUDA, full-size programs, CUDA graphs, QAT on CUDA -> bit-exact engines,
#    the CUDA GEMM path, torchrun/NCCL when there are two GPUs.  Triton compiles each kernel variant once per
#    process (about a hundred variants), so the tests run in SHARDS parallel processes (round-robin split).
TESTS="tests/backends/test_triton.py tests/native/test_cuda_gemm.py"
if "$PY" -c "import pytest" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider $TESTS 2>/dev/null | grep "::" >"$OUT/gpu_tests.txt"
  n=$(wc -l <"$OUT/gpu_tests.txt")
  cores=$(nproc 2>/dev/null || echo 4)
  SHARDS=${SHARDS:-$(( cores >= 16 ? 4 : (cores >= 4 ? 2 : 1) ))}
  echo "gpu tests: $n collected, $SHARDS shards" | tee -a "$SUMMARY"
  pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    awk -v s="$SHARDS" -v i="$i" '(NR - 1) % s == i' "$OUT/gpu_tests.txt" >"$OUT/gpu_tests_$i.txt"
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=$(( cores / SHARDS > 0 ? cores / SHARDS : 1 )) timeout -k 10 "$TEST_TIMEOUT" \
      "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $(cat "$OUT/gpu_tests_$i.txt") \
      --junitxml="$OUT/gpu_tests_$i.xml" >"$OUT/gpu_tests_$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    say "gpu tests shard $i: exit $rc ($(tail -n 1 "$OUT/gpu_tests_$i.log"))"
    [ "$rc" -eq 0 ] || { status=1; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests_$i.log" | tee -a "$SUMMARY"; }
  done
  cat "$OUT"/gpu_tests_*.log >"$OUT/gpu_tests.log"
else
  say "gpu tests: not run (no pytest)"
  status=1
fi

# 2. The benchmark: DeiT-S, DeiT-B, Swin-T at batch 1 and 64; JSON + table; bit-exactness vs the CPU engine.
timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_latency.py --json "$OUT/gpu_latency.json" \
  >"$OUT/gpu_latency.log" 2>&1
rc=$?
tail -n 60 "$OUT/gpu_latency.log"
say "gpu_latency: exit $rc ($( [ -f "$OUT/gpu_latency.json" ] && echo "json written" || echo "no json"))"
[ "$rc" -eq 0 ] || status=1

say "gpu_check: total $(( $(date +%s) - start )) s, status $status"
exit $status
