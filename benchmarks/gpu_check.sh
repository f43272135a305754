#!/usr/bin/env bash
# The whole GPU side of the project in one command (issue 14): every `gpu`-marked test (bf16
# parity against the torch reference, kernel-vs-XLA checks, host offload), then a smoke
# benchmark of each family at one real shape, then a short table of what passed.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh            # on the device; logs under $OUT
#
# With pytest-xdist importable the tests run in GPU_CHECK_WORKERS (default 4) processes.
#
# Exit status: 0 only if every step passed. Logs: $OUT/gpu_tests.log (pytest -rA),
# $OUT/smoke.log (every benchmark's output) and $OUT/summary.txt (the table printed last).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$SUMMARY"

step() {  # step NAME LOG COMMAND...: runs COMMAND, appends to LOG, records rc and seconds
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" >>"$log"
  "$@" >>"$log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$SUMMARY.rows"
  return $rc
}

: >"$SUMMARY.rows"
fail=0
# Tests in parallel processes when pytest-xdist is importable (most of their time is compiling,
# on the host's CPUs); each process then allocates GPU memory on demand instead of 75% up front.
workers=()
if python3 -c "import xdist" 2>/dev/null; then
  workers=(-n "${GPU_CHECK_WORKERS:-4}")
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
step gpu-tests "$OUT/gpu_tests.log" python3 -m pytest -q -m gpu -rA -p no:cacheprovider \
  "${workers[@]}" parity_tests tests || fail=1
unset XLA_PYTHON_CLIENT_PREALLOCATE
step smoke-ttt "$OUT/smoke.log" python3 benchmarks/bench_ttt.py --inner linear mlp \
  --variants dual_g4 --batches 1 --seqs 8192 --iters 3 || fail=1
step smoke-lact "$OUT/smoke.log" python3 benchmarks/bench_lact.py --variants custom \
  --seqs 8192 --batches 1 --muon off on --iters 3 || fail=1
step smoke-inplace "$OUT/smoke.log" python3 benchmarks/bench_inplace.py --models 2048x6144 \
  --chunks 1024 --seqs 8192 --iters 3 || fail=1
step smoke-npt "$OUT/smoke.log" python3 benchmarks/bench_npt.py --seqs 512 --iters 3 || fail=1
if [ -f benchmarks/bench_ttt_kernel.py ]; then
  step smoke-ttt-kernel "$OUT/smoke.log" python3 benchmarks/bench_ttt_kernel.py --smoke-gpu \
    || fail=1
fi

{
  echo "--- gpu-marked tests"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu_tests.log" | sed 's/ - .*//' || true
  tail -n 1 "$OUT/gpu_tests.log"
  echo "--- steps"
  cat "$SUMMARY.rows"
  echo "gpu_check: $([ $fail = 0 ] && echo PASSED || echo FAILED)"
} >>"$SUMMARY"
rm -f "$SUMMARY.rows"
cat "$SUMMARY"
exit $fail
