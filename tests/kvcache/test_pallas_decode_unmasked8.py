"""Session 8's Pallas decode variant `unmasked` (FLASHMUX_PALLAS_DECODE=unmasked=1 or
decode.tuning(unmasked=1)): leading key trips that every row of a block sees in full skip the
score mask. Judged against the float64 reference in interpret mode on the CPU (the Triton
lowering on a GPU): causal Sq 1 and 3, a right window, pages of 16, several splits, a ragged
batch with an empty sequence. Runs in the pallas pass (FLASHMUX_TEST_BACKEND=pallas)."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND") != "pallas":
    pytest.skip("runs in the pallas pass only", allow_module_level=True)
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux import reference  # noqa: E402
from flashmux.kvcache import DecodeParams  # noqa: E402


@pytest.mark.parametrize("sq,page,window,ns", [(1, 0, None, 2), (3, 16, (None, 2), 3),
                                               (3, 0, None, 1), (2, 0, (None, None), 2)])
def test_unmasked_trips_match_reference(sq, page, window, ns):
    """window None: causal (bottom-right); (None, 2): not causal, keys up to 2 past each row;
    (None, None): not causal, every key."""
    import flashmux_pallas
    from flashmux_pallas import decode

    rng = np.random.default_rng(7 + sq)
    b, hq, hkv, d, cap = 3, 4, 2, 32, 64
    lens = np.array([64, 0, 37], np.int32)
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    causal = window is None
    wl, wr = (None, 0) if causal else window
    ref_out, ref_lse, _, _ = reference.attention_with_kvcache(
        q, k, v, cache_seqlens=lens, causal=causal,
        window=None if causal or window == (None, None) else window)
    kc, vc, table = k, v, None
    if page:
        n = b * cap // page
        order = rng.permutation(n)
        kc = np.empty((n, page, hkv, d), np.float32)
        vc = np.empty_like(kc)
        kc[order] = k.reshape(n, page, hkv, d)
        vc[order] = v.reshape(n, page, hkv, d)
        table = order.astype(np.int32).reshape(b, cap // page)
    p = DecodeParams(scale=d**-0.5, causal=causal, window_left=wl, window_right=wr, softcap=None,
                     alibi=False, num_splits=ns, page_size=page, return_lse=True)
    with decode.tuning(unmasked=1):
        st = decode.plan(decode.shapes_of(jnp.asarray(q), jnp.asarray(kc),
                                          None if table is None else jnp.asarray(table)),
                         p, jax.default_backend() == "cpu")
        assert st.unmasked
        out, lse = flashmux_pallas.backend.decode(
            jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(lens),
            None if table is None else jnp.asarray(table), None, p)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.abs(lse[fin] - ref_lse[fin]).max() < 2e-5
    assert np.abs(out - np.nan_to_num(ref_out)).max() < 2e-5


@pytest.mark.parametrize("paged", [False, True])
def test_unmasked_lowers_to_triton_for_cuda(paged):
    """The two-loop kernel lowers to the Triton custom call at the benchmark shape, from the
    CPU (catches constructs the Triton lowering rejects; not a run)."""
    pytest.importorskip("jax.experimental.pallas.triton")
    from flashmux_pallas import decode

    B, Hq, Hkv, D, S, page = 8, 32, 8, 128, 4096, 16
    p = DecodeParams(scale=D**-0.5, causal=True, window_left=None, window_right=0,
                     softcap=None, alibi=False, num_splits=2, page_size=page if paged else 0,
                     return_lse=False)
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), bf)
    if paged:
        kc = jax.ShapeDtypeStruct((B * S // page, page, Hkv, D), bf)
        bt = jax.ShapeDtypeStruct((B, S // page), jnp.int32)
    else:
        kc, bt = jax.ShapeDtypeStruct((B, S, Hkv, D), bf), None
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)

    def f(q, kc, vc, lens, bt):
        with decode.tuning(unmasked=1, num_stages=3):
            return decode.decode(q, kc, vc, lens, bt, None, p, interpret=False)

    try:
        lowered = jax.jit(f).trace(q, kc, kc, lens, bt).lower(lowering_platforms=("cuda",))
    except (AttributeError, TypeError) as e:  # a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")
    assert "xla.gpu.triton" in lowered.as_text()
