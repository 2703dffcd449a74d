"""The Pallas decode kernel's `prefetch_pages` variant (paged caches: the next loop trip's page
ids loaded a trip ahead and carried, so the K/V loads of a trip do not wait on a table load of
the same trip), in interpret mode against the float64 reference, and its GPU path lowered to a
Triton custom call from the CPU. Off by default until an H200 run measures it
(`python benchmarks/decode_variants.py pallas --pages 16`, packages/backend_pallas/NOTES.md).
Runs in the pallas pass (FLASHMUX_TEST_BACKEND=pallas)."""

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


def _params(causal, ns, page, window=None):
    wl, wr = (None, None) if window is None else window
    if causal:
        wr = 0 if wr is None else min(wr, 0)
    return DecodeParams(scale=32 ** -0.5, causal=causal, window_left=wl, window_right=wr,
                        softcap=None, alibi=False, num_splits=ns, page_size=page,
                        return_lse=True)


@pytest.mark.parametrize("page, per_step, ns, causal, window, lens", [
    (8, 2, 1, True, None, (45, 0, 17)),
    (8, 4, 3, False, None, (48, 31, 1)),
    (24, 2, 2, True, (11, 0), (47, 24, 25)),
])
def test_prefetched_pages_match_the_reference(page, per_step, ns, causal, window, lens):
    import flashmux_pallas
    from flashmux_pallas import decode

    rng = np.random.default_rng(7 + page + per_step)
    B, Sq, Hq, Hkv, D, cap = 3, 2, 4, 2, 32, 48
    mp = cap // page
    n = B * mp + 2
    q = rng.standard_normal((B, Sq, Hq, D))
    kc = rng.standard_normal((n, page, Hkv, D))
    vc = rng.standard_normal((n, page, Hkv, D))
    table = rng.permutation(n)[: B * mp].reshape(B, mp).astype(np.int32)
    lens = np.array(lens, np.int32)
    p = _params(causal, ns, page, window)
    want = reference.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                            causal=causal, scale=p.scale, window=window)[:2]
    got = {}
    for pre in (False, True):
        with decode.tuning(pages_per_step=per_step, prefetch_pages=pre):
            out, lse = flashmux_pallas.backend.decode(
                jnp.asarray(q, jnp.float32), jnp.asarray(kc, jnp.float32),
                jnp.asarray(vc, jnp.float32), jnp.asarray(lens), jnp.asarray(table), None, p)
        got[pre] = (np.asarray(out, np.float64), np.asarray(lse, np.float64))
        np.testing.assert_allclose(got[pre][0], np.nan_to_num(want[0]), atol=2e-5)
        fin = np.isfinite(want[1])
        assert np.array_equal(np.isneginf(got[pre][1]), np.isneginf(want[1]))
        np.testing.assert_allclose(got[pre][1][fin], want[1][fin], atol=2e-5)
    np.testing.assert_allclose(got[True][0], got[False][0], atol=1e-6)


def test_prefetched_pages_lower_to_triton_for_cuda():
    pytest.importorskip("jax.experimental.pallas.triton")
    from flashmux_pallas import decode

    B, Hq, Hkv, D, S, page = 8, 32, 8, 128, 4096, 16
    p = _params(True, None, page)
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), bf)
    kc = jax.ShapeDtypeStruct((B * S // page, page, Hkv, D), bf)
    bt = jax.ShapeDtypeStruct((B, S // page), jnp.int32)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)

    def f(q, kc, vc, lens, bt):
        return decode.decode(q, kc, vc, lens, bt, None, p, interpret=False)

    with decode.tuning(prefetch_pages=True):
        st = decode.plan(decode.shapes_of(q, kc, bt), p, interpret=False, cores=132)
        assert st.prefetch_pages and st.pages_per_step == 8
        try:
            lowered = jax.jit(f).trace(q, kc, kc, lens, bt).lower(lowering_platforms=("cuda",))
        except (AttributeError, TypeError) as e:  # a jax without cross-platform lowering
            pytest.skip(f"cross-platform lowering unavailable: {e}")
    text = lowered.as_text()
    assert "xla.gpu.triton" in text and "flashmux_decode" in text


def test_the_environment_sets_the_variant(monkeypatch):
    from flashmux_pallas import decode

    shapes = decode._Shapes(8, 1, 32, 8, 128, 4096, True, 16, jnp.bfloat16, 2048, 256)
    p = _params(True, None, 16)
    assert not decode.plan(shapes, p, interpret=False, cores=132).prefetch_pages
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "prefetch_pages=1,pages_per_step=16")
    st = decode.plan(shapes, p, interpret=False, cores=132)
    assert st.prefetch_pages and st.pages_per_step == 16
    with decode.tuning(num_warps=8):  # a tuning block (benchmarks) keeps the other fields
        st = decode.plan(shapes, p, interpret=False, cores=132)
    assert st.prefetch_pages and st.num_warps == 8
    with decode.tuning(prefetch_pages=False):
        assert not decode.plan(shapes, p, interpret=False, cores=132).prefetch_pages
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "prefetch=1")
    with pytest.raises(ValueError, match="prefetch"):
        decode.plan(shapes, p, interpret=False, cores=132)
