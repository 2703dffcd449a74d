#!/usr/bin/env bash
# KV-cache decode kernels of the CUDA and Pallas backends on one GPU (nvidia-h200), issue 13:
#   1. flashmux's packages, editable, without dependencies (skipped when already importable),
#   2. the CUDA library for sm_90 (kernels + JAX FFI; cold build: minutes),
#   3. GPU tests: tests/backends/test_cuda_decode_gpu.py, test_pallas_decode.py,
#      and the core's decode suite on cuda (torch, jax) and pallas (jax),
#   4. the bandwidth scripts: packages/backend_cuda/tools/decode_bench.py and
#      packages/backend_pallas/decode_bench.py (B=8, Hq=32, Hkv=8, D=128, bf16, Sk 4k-128k,
#      contiguous and 16/64-token pages, vs SDPA cuDNN / JAX cuDNN and a read ceiling).
# Logs in $OUT (default /tmp/flashmux-decode).
#     bash scripts/gpu_decode.sh                 # everything (~10-15 min with a cold build)
#     SKIP_TESTS=1 bash scripts/gpu_decode.sh    # benchmarks only
#     SKIP_BENCH=1 bash scripts/gpu_decode.sh    # tests only
#     TUNE=1 bash scripts/gpu_decode.sh          # + split counts, Pallas configs, CUDA variants
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false FLASHMUX_CUDA_ARCHS=${FLASHMUX_CUDA_ARCHS:-90}
OUT=${OUT:-/tmp/flashmux-decode}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi -L || true
if ! $PY -c "import flashmux_cuda, flashmux_pallas" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation \
    -e packages/core -e packages/backend_triton -e packages/backend_pallas -e packages/backend_cuda 2>&1 | tail -3
fi
start=$(date +%s)
$PY -m flashmux_cuda build --jax 2>&1 | tail -3 | tee "$OUT/build.log"
echo "build: $(( $(date +%s) - start )) s"
rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
  start=$(date +%s)
  $PY -m pytest tests/backends/test_cuda_decode_gpu.py tests/backends/test_cuda_decode_abi.py \
    tests/backends/test_pallas_decode.py -q -rfs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
  rc=${PIPESTATUS[0]}
  FLASHMUX_TEST_BACKEND=cuda $PY -m pytest tests/kvcache -q -rfs -p no:cacheprovider 2>&1 \
    | tee "$OUT/kvcache_cuda.log" | tail -8
  FLASHMUX_TEST_BACKEND=pallas FLASHMUX_TEST_KINDS=jax $PY -m pytest tests/kvcache -q -rfs \
    -p no:cacheprovider 2>&1 | tee "$OUT/kvcache_pallas.log" | tail -8
  echo "tests: exit $rc in $(( $(date +%s) - start )) s"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  $PY packages/backend_cuda/tools/decode_bench.py --sq 1,4 2>&1 | tee "$OUT/bench_cuda.md"
  $PY packages/backend_pallas/decode_bench.py --sq 1,4 2>&1 | tee "$OUT/bench_pallas.md"
  if [ -n "${TUNE:-}" ]; then
    $PY packages/backend_cuda/tools/decode_bench.py --splits auto,2,4,8,16,32 --no-anchors \
      --sk 4096,131072 2>&1 | tee "$OUT/tune_cuda_splits.md"
    FLASHMUX_CUDA_NVCC_FLAGS="-DFMX_DECODE_PREFETCH=1" $PY packages/backend_cuda/tools/decode_bench.py \
      --no-anchors --sk 4096,131072 2>&1 | tee "$OUT/tune_cuda_prefetch.md"
    FLASHMUX_CUDA_DECODE_PROGRAMS_PER_SM=8 $PY packages/backend_cuda/tools/decode_bench.py \
      --no-anchors --sk 4096,131072 2>&1 | tee "$OUT/tune_cuda_8per_sm.md"
    $PY packages/backend_pallas/decode_bench.py --configs --splits auto,4,16 --no-anchors \
      --sk 4096,131072 2>&1 | tee "$OUT/tune_pallas.md"
  fi
fi
exit $rc
