"""Every backend must pass these, judged against the float64 reference (see harness.py)."""

from __future__ import annotations

import os

import pytest
from cases import cases
from harness import Case, run_case

TIER = os.environ.get("FLASHMUX_TEST_SIZE") or (
    "small" if os.environ.get("TRITON_INTERPRET") == "1" else "full"
)
CASES = cases(TIER)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_case(case: Case, backend: str, kind: str):
    skip = run_case(case, backend, kind)
    if skip:
        pytest.skip(skip)
