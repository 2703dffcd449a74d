#!/usr/bin/env bash
# Moved to `python scripts/gpu.py setup context-parallel` (nvidia-h200-x2); kept for this session only (SKIP_TESTS=1, BENCH_ARGS and OUT still work). Delete next session.
exec "${PYTHON:-python}" "$(dirname "$0")/gpu.py" setup context-parallel --show 30 --out "${OUT:-/tmp/flashmux-cp}" --cp-tests="$([ -n "${SKIP_TESTS:-}" ] || echo 'nccl or gpus')" --cp-args="${BENCH_ARGS:-}" "$@"
