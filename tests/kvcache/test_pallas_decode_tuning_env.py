"""FLASHMUX_PALLAS_DECODE sets the Pallas decode kernel's tuning fields for a process (benchmark
runs); a `decode.tuning(...)` block's fields take precedence; an unknown field is an error naming
it. Runs in the pallas pass (FLASHMUX_TEST_BACKEND=pallas)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND") != "pallas":
    pytest.skip("runs in the pallas pass only", allow_module_level=True)
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux.kvcache import DecodeParams  # noqa: E402


def test_the_environment_sets_the_tuning_fields(monkeypatch):
    from flashmux_pallas import decode

    shapes = decode._Shapes(8, 1, 32, 8, 128, 4096, True, 16, jnp.bfloat16, 2048, 256)
    p = DecodeParams(scale=128 ** -0.5, causal=True, window_left=None, window_right=0,
                     softcap=None, alibi=False, num_splits=None, page_size=16, return_lse=True)
    base = decode.plan(shapes, p, interpret=False, cores=132)
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "pages_per_step=4,num_warps=8")
    st = decode.plan(shapes, p, interpret=False, cores=132)
    assert (st.pages_per_step, st.num_warps) == (4, 8) != (base.pages_per_step, base.num_warps)
    with decode.tuning(num_warps=2):  # a tuning block (benchmarks) keeps the other fields
        st = decode.plan(shapes, p, interpret=False, cores=132)
    assert (st.pages_per_step, st.num_warps) == (4, 2)
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "prefetch_pages=1")
    with pytest.raises(ValueError, match="prefetch_pages"):
        decode.plan(shapes, p, interpret=False, cores=132)


def test_whole_wave_splits():
    """Session 8's `waves` field: splits that keep every program in whole waves (B8 Hkv8 on
    132 SMs: 3 stages -> one 128-key program per SM -> 2 splits; 2 stages -> 3 per SM -> 6)."""
    from flashmux_pallas import decode as D

    assert D.whole_wave_splits(8, 8, 1, 32768, 132, 128, 128, 2, 3, 1) == 2
    assert D.whole_wave_splits(8, 8, 1, 32768, 132, 128, 128, 2, 2, 1) == 6
    assert D.whole_wave_splits(8, 8, 1, 32768, 132, 128, 128, 2, 2, 2) == 12
    assert D.whole_wave_splits(8, 8, 1, 512, 132, 128, 128, 2, 2, 1) == 2  # capacity // 256
    assert D.whole_wave_splits(1, 1, 1, 1 << 20, 132, 128, 128, 2, 2, 4) == D.MAX_SPLITS
