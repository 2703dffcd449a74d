"""Every backend must pass these, judged against the float64 reference (see harness.py)."""

from __future__ import annotations

import pytest
from cases import cases
from harness import Case, run_case, size_tier

CASES = cases(size_tier())


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_case(case: Case, backend: str, kind: str):
    skip = run_case(case, backend, kind)
    if skip:
        pytest.skip(skip)
