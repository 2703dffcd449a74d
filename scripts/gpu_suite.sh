#!/usr/bin/env bash
# The GPU check of every backend in one call, for a machine without a package registry
# (the H100 box reached through the device tool). From the repository root:
#
#   BACKENDS="reference cuda triton pallas" bash scripts/gpu_suite.sh
#
# Wheels it needs (nox and its pure-Python dependencies, nvidia-cutlass) are read from .carry/
# when present. Installs flashmux's packages without dependencies on the machine's own torch,
# triton and JAX, builds the CUDA library, then runs `nox --no-venv -s "conformance(backend=...)"`
# per backend. Logs go to $OUT (or /tmp/flashmux-gpu).
set -u
source scripts/gpu_setup.sh
python3 -m flashmux info > "$OUT/info.txt" 2>&1
if [[ " ${BACKENDS:-cuda} " == *" cuda "* ]]; then
  t0=$(date +%s)
  FLASHMUX_CUDA_ARCHS=${FLASHMUX_CUDA_ARCHS:-90} python3 -m flashmux_cuda build --jax > "$OUT/cuda_build.log" 2>&1
  echo "cuda build: rc=$? in $(( $(date +%s) - t0 )) s"
fi
for b in ${BACKENDS:-reference cuda triton pallas}; do
  t0=$(date +%s)
  timeout "${PER_BACKEND_S:-170}" python3 -m nox --no-venv -s "conformance(backend='$b')" -- -q -rs \
    -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/conformance_$b.log" 2>&1
  rc=$?
  echo "conformance($b): rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E '(passed|failed|error)' "$OUT/conformance_$b.log" | tail -1)"
done
