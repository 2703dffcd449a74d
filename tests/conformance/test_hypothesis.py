"""Randomly generated cases (hypothesis): shapes, masks and features in combination."""

from __future__ import annotations

import os

import pytest

hyp = pytest.importorskip("hypothesis")
from harness import Case, on_gpu, run_case, size_tier  # noqa: E402  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SMALL = size_tier() == "small"
MAXLEN = 48 if SMALL else 300
# every example is a fresh shape (a fresh compile for JAX): few on a CPU, more on a GPU
N = int(os.environ.get("FLASHMUX_HYPOTHESIS_EXAMPLES", "25" if on_gpu() else "6"))
if N < 1:  # FLASHMUX_HYPOTHESIS_EXAMPLES=0: fixed cases only
    pytest.skip("FLASHMUX_HYPOTHESIS_EXAMPLES=0", allow_module_level=True)


@st.composite
def case_strategy(draw):
    group = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([1, 2]))
    varlen = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.integers(0, 40)))))
    common = dict(
        heads_q=group * hkv,
        heads_kv=hkv,
        head_dim=draw(st.sampled_from([32, 48, 64, 80, 128])),
        causal=draw(st.booleans()),
        window=window,
        softcap=draw(st.one_of(st.none(), st.floats(1.0, 30.0))),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        lse_grad=draw(st.booleans()),
    )
    if varlen:
        n = draw(st.integers(1, 4))
        seqlens = tuple(
            (draw(st.integers(0, MAXLEN)), draw(st.integers(0, MAXLEN))) for _ in range(n)
        )
        return Case(seqlens=seqlens, **common)
    return Case(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, MAXLEN)),
        seqlen_k=draw(st.integers(1, MAXLEN)),
        **common,
    )


@settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(case=case_strategy(), seed=st.integers(0, 2**32 - 1))
def test_generated(case, seed, backend, kind):
    # the input seed is part of the example, so hypothesis replays (and reports) a failure exactly
    if os.environ.get("FLASHMUX_TEST_SEED"):
        seed = int(os.environ["FLASHMUX_TEST_SEED"])
    skip = run_case(case, backend, kind, seed=seed)
    # a decline is fine here (the fixed cases check coverage); a wrong answer raises
    del skip
