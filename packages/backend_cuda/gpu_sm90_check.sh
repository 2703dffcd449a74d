#!/usr/bin/env bash
# Moved to `python scripts/gpu.py setup sm90 --sm90 "fwd bench correctness" --sm90-variants "- 1"`; kept for this session only. Delete next session.
exec "${PYTHON:-python3}" "$(dirname "$0")/../../scripts/gpu.py" setup sm90 --sm90="${*:-fwd bench correctness}" --sm90-variants="${SM90_VARIANTS:-- 1}"
