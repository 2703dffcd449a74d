#!/usr/bin/env bash
# Context parallelism on a 2-GPU machine (nvidia-h200-x2), one device call (~5 min):
#   1. flashmux's packages, editable, without dependencies (skipped when already importable),
#   2. tests/distributed's GPU cases: NCCL and JAX on the GPUs (test_torch_nccl, test_jax_gpus),
#   3. benchmarks/ring_scaling.py (B=1, H=16 and Hq32/Hkv8, D=128, bf16, causal, fwd+bwd,
#      S=128k and 256k; torch and JAX; efficiency = t1 / (2 * t2)).
# Logs and ring_scaling.json in $OUT (default /tmp/flashmux-cp).
#     bash scripts/gpu_context_parallel.sh            # all three
#     SKIP_TESTS=1 bash scripts/gpu_context_parallel.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/flashmux-cp}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi -L || true
if ! $PY -c "import flashmux_triton, flashmux_pallas" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation \
    -e packages/core -e packages/backend_triton -e packages/backend_pallas 2>&1 | tail -3
fi
$PY -c "import flashmux; print('backends:', [(b.name, bool(not flashmux.dispatch.availability(b))) for b in flashmux.backends()])"
rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  start=$(date +%s)
  # the GPU cases only (the CPU ones run in CI): NCCL with 2 ranks, JAX on the 2 GPUs
  $PY -m pytest tests/distributed -q -rfs -p no:cacheprovider -k "nccl or gpus" 2>&1 | tee "$OUT/tests.log" | tail -25
  rc=${PIPESTATUS[0]}
  echo "tests: exit $rc in $(( $(date +%s) - start )) s"
fi
start=$(date +%s)
rm -f "$OUT/ring_scaling.json"
$PY benchmarks/ring_scaling.py --out "$OUT/ring_scaling.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
echo "bench: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
[ -s "$OUT/ring_scaling.json" ] && $PY benchmarks/ring_scaling.py --markdown "$OUT/ring_scaling.json"
exit $rc
