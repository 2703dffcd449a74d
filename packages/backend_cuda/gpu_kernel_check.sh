#!/usr/bin/env bash
# Moved to scripts/gpu.py stages: kernels (correctness, big), sanitize, cuda-bench, cuda-profile, cuda-tune (--tune "$TUNE"), cuda-variants (--variants FILE); kept for this session only. Delete next session.
m() { case $1 in correctness|big) echo kernels;; sanitize) echo sanitize;; bench|benchlite) echo cuda-bench;; profile) echo cuda-profile;; tune|tunecheck) echo cuda-tune;; variants) echo cuda-variants;; -*) echo "$1";; esac; }
cd "$(dirname "$0")/../.." && exec "${PYTHON:-python3}" scripts/gpu.py setup build $(for s in ${*:-correctness big sanitize bench}; do m "$s"; done | awk '!seen[$0]++') --backends cuda --tune="${TUNE:-}" --variants="${VARIANTS:-packages/backend_cuda/tools/variants.txt}"
