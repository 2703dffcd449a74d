"""The Pallas decode kernel (flashmux_pallas/decode.py) in interpret mode on the CPU, judged
against the float64 reference (flashmux.reference.attention_with_kvcache), plus what the CPU can
check of the GPU path: the kernel lowers to a Triton custom call (cross-platform lowering), the
GPU declines, the split heuristic, jit with donated caches, clamping of bad lengths and pages.

The full feature matrix through the public API runs in tests/kvcache
(FLASHMUX_TEST_BACKEND=pallas); these cases call the backend's decode directly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import flashmux  # noqa: E402
from flashmux import reference  # noqa: E402
from flashmux.kvcache import DecodeParams  # noqa: E402
from flashmux.testing.decode import decode_spec  # noqa: E402


def _backend():
    import flashmux_pallas

    return flashmux_pallas.backend


def _seed() -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def _params(d, causal=False, window=None, softcap=None, alibi=False, ns=None, page_size=0):
    wl, wr = (None, None) if window is None else window
    if causal:
        wr = 0 if wr is None else min(wr, 0)
    return DecodeParams(
        scale=d**-0.5,
        causal=causal,
        window_left=wl,
        window_right=wr,
        softcap=softcap,
        alibi=alibi,
        num_splits=ns,
        page_size=page_size,
        return_lse=True,
    )


def _inputs(rng, B, Sq, Hq, Hkv, D, Dv, cap, page, lens, alibi, dtype):
    q = rng.standard_normal((B, Sq, Hq, D))
    table = None
    if page:
        mp = cap // page
        n_pages = B * mp + 3  # pages no sequence uses
        kc = rng.standard_normal((n_pages, page, Hkv, D))
        vc = rng.standard_normal((n_pages, page, Hkv, Dv))
        table = rng.permutation(n_pages)[: B * mp].reshape(B, mp).astype(np.int32)
    else:
        kc = rng.standard_normal((B, cap, Hkv, D))
        vc = rng.standard_normal((B, cap, Hkv, Dv))
    slopes = None
    if alibi:
        shape = (Hq,) if alibi == "h" else (B, Hq)
        slopes = rng.uniform(0.05, 0.5, shape).astype(np.float32)
    lens = np.array(lens, np.int32)
    q, kc, vc = (
        np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64) for x in (q, kc, vc)
    )
    return q, kc, vc, lens, table, slopes


def _run(q, kc, vc, lens, table, slopes, p, dtype):
    """backend.decode directly. On a GPU machine the arrays land on the GPU (Triton lowering):
    cases that the GPU declines (decode.gpu_reasons) are skipped there."""
    if jax.default_backend() != "cpu":
        from types import SimpleNamespace

        from flashmux_pallas import decode

        why = decode.gpu_reasons(
            SimpleNamespace(
                head_dim=q.shape[-1],
                head_dim_v=vc.shape[-1],
                paged=table is not None,
                page_size=p.page_size,
            )
        )
        if why:
            pytest.skip("GPU declines: " + "; ".join(why))
    dev = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return _backend().decode(
        jnp.asarray(q, dtype),
        jnp.asarray(kc, dtype),
        jnp.asarray(vc, dtype),
        dev(lens),
        dev(table),
        dev(slopes),
        p,
    )


def _check(out, lse, ref_out, ref_lse, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    atol = 2e-5 if dtype == jnp.float32 else 4e-3
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "rows that see no key: lse -inf"
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max(initial=0.0) <= atol
    assert np.abs(out - np.nan_to_num(ref_out)).max() <= atol


# (B, Sq, Hq, Hkv, D, Dv, cap, page, lens, causal, window, softcap, alibi, splits, dtype)
CASES = [
    (2, 1, 4, 2, 32, 32, 40, 0, (40, 0), False, None, None, "", None, "float32"),  # full + empty
    (3, 1, 4, 1, 32, 32, 48, 0, (17, 48, 3), False, None, None, "", 3, "float32"),  # MQA, splits
    (2, 3, 2, 2, 16, 16, 40, 0, (2, 33), True, None, None, "", 2, "float32"),  # MHA, no-key rows
    (2, 5, 8, 2, 32, 16, 64, 0, (64, 29), True, None, None, "h", 4, "float32"),  # 20 rows, Dv
    (2, 2, 4, 2, 32, 32, 40, 0, (40, 23), False, (5, 1), 4.0, "bh", 7, "float32"),  # window/cap
    (2, 2, 4, 2, 32, 32, 48, 8, (48, 9), True, None, None, "", 3, "float32"),  # pages of 8
    (3, 3, 4, 2, 32, 32, 64, 16, (0, 64, 30), True, (9, 0), None, "bh", 2, "float32"),
    (2, 1, 4, 2, 32, 32, 48, 24, (47, 25), False, None, 3.0, "", None, "float32"),  # page 24
    (2, 2, 8, 2, 64, 64, 64, 16, (64, 41), True, None, None, "", 5, "bfloat16"),
    (2, 4, 4, 4, 32, 32, 40, 0, (40, 12), True, None, None, "", 3, "float16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_matches_float64_reference(case):
    B, Sq, Hq, Hkv, D, Dv, cap, page, lens, causal, window, softcap, alibi, ns, dt = case
    rng = np.random.default_rng(_seed())
    dtype = jnp.dtype(dt)
    q, kc, vc, lens, table, slopes = _inputs(
        rng, B, Sq, Hq, Hkv, D, Dv, cap, page, lens, alibi, dtype
    )
    p = _params(D, causal, window, softcap, bool(alibi), ns, page)
    out, lse = _run(q, kc, vc, lens, table, slopes, p, dtype)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    ref_out, ref_lse, _, _ = reference.attention_with_kvcache(
        q,
        kc,
        vc,
        cache_seqlens=lens,
        block_table=table,
        causal=causal,
        scale=D**-0.5,
        window=window,
        softcap=softcap,
        alibi_slopes=slopes,
    )
    _check(out, lse, ref_out, ref_lse, dtype)


def test_splits_agree():
    """num_splits 1 and several give the same answer (the lse merge is exact up to rounding)."""
    rng = np.random.default_rng(_seed())
    q, kc, vc, lens, table, _ = _inputs(rng, 2, 2, 4, 2, 32, 32, 64, 0, (64, 37), "", jnp.float32)
    outs = [
        _run(q, kc, vc, lens, None, None, _params(32, True, ns=ns), jnp.float32) for ns in (1, 2, 9)
    ]
    for o, lse in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0][0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(outs[0][1]), atol=1e-5)


def test_clamps_lengths_and_pages():
    """seqlens_k above the capacity reads as the capacity; block-table entries outside
    [0, num_pages) read as the nearest page: the answer equals the reference on clamped values."""
    rng = np.random.default_rng(_seed())
    q, kc, vc, _, _, _ = _inputs(rng, 2, 1, 4, 2, 32, 32, 32, 0, (0, 0), "", jnp.float32)
    p = _params(32)
    out, lse = _run(q, kc, vc, np.array([1000, 32], np.int32), None, None, p, jnp.float32)
    ref = _run(q, kc, vc, np.array([32, 32], np.int32), None, None, p, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[0]))
    # paged: 4 pages of 16 per sequence, entries -7 and 10**6 in the table
    q, kc, vc, _, table, _ = _inputs(rng, 2, 1, 4, 2, 32, 32, 64, 16, (0, 0), "", jnp.float32)
    n_pages = kc.shape[0]
    bad = table.copy()
    bad[0, 1], bad[1, 3] = -7, 10**6
    fixed = np.clip(bad, 0, n_pages - 1)
    lens = np.array([32, 999], np.int32)
    p = _params(32, page_size=16, ns=2)
    out, lse = _run(q, kc, vc, lens, bad, None, p, jnp.float32)
    ref_out, ref_lse, _, _ = reference.attention_with_kvcache(
        q, kc, vc, cache_seqlens=np.array([32, 64]), block_table=fixed, scale=32**-0.5
    )
    _check(out, lse, ref_out, ref_lse, jnp.float32)


def test_public_api_under_jit_with_donated_caches():
    """flashmux.attention_with_kvcache(backend="pallas") under jax.jit, caches donated: the
    append and the decode trace (no host read of the lengths) and match the eager call."""
    rng = np.random.default_rng(_seed())
    B, Hkv, D, page = 2, 2, 32, 16
    q = jnp.asarray(rng.standard_normal((B, 2, 4, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, 2, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, 2, Hkv, D)), jnp.float32)
    kc = rng.standard_normal((B * 4 + 1, page, Hkv, D)).astype(np.float32)
    vc = rng.standard_normal((B * 4 + 1, page, Hkv, D)).astype(np.float32)
    table = jnp.asarray(rng.permutation(B * 4 + 1)[: B * 4].reshape(B, 4).astype(np.int32))
    lens = jnp.asarray([5, 30], jnp.int32)

    def f(q, kc, vc, lens, k, v, table):
        return flashmux.attention_with_kvcache(
            q,
            kc,
            vc,
            cache_seqlens=lens,
            k=k,
            v=v,
            block_table=table,
            causal=True,
            return_lse=True,
            num_splits=2,
            backend="pallas",
        )

    eager = f(q, jnp.asarray(kc), jnp.asarray(vc), lens, k, v, table)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU jax may not use the donated buffers
        jitted = jax.jit(f, donate_argnums=(1, 2))(
            q, jnp.asarray(kc), jnp.asarray(vc), lens, k, v, table
        )
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    ref_out, ref_lse, ref_k, _ = reference.attention_with_kvcache(
        np.asarray(q),
        kc,
        vc,
        cache_seqlens=np.asarray(lens),
        k=np.asarray(k),
        v=np.asarray(v),
        block_table=np.asarray(table),
        causal=True,
    )
    _check(jitted[0], jitted[1], ref_out, ref_lse, jnp.float32)
    np.testing.assert_array_equal(np.asarray(jitted[2]), ref_k.astype(np.float32))


def _spec(**kw):
    return decode_spec(**{"kind": "jax", **kw})


def test_gpu_declines_and_cpu_accepts():
    from flashmux_pallas import decode

    assert decode.gpu_reasons(_spec()) == []
    assert any("head_dim 96" in r for r in decode.gpu_reasons(_spec(head_dim=96, head_dim_v=96)))
    assert any("page_size 8" in r for r in decode.gpu_reasons(_spec(paged=True, page_size=8)))
    assert decode.gpu_reasons(_spec(paged=True, page_size=16)) == []
    cpu = _spec(
        device_type="cpu",
        device_name="cpu",
        compute_capability=None,
        head_dim=24,
        head_dim_v=24,
        paged=True,
        page_size=8,
    )
    assert _backend().decode_reasons(cpu) == []
    assert any("require grad" in r for r in _backend().decode_reasons(_spec(requires_grad=True)))


def test_split_heuristic():
    from flashmux_pallas import decode

    p = _params(128)
    # 16-bit caches (session 9 default: 3 stages, one whole wave): B=8, Hkv=8 is 64 programs
    # per split and one 3-stage program fits an SM, so 2 splits on 132 SMs
    assert decode.plan(_spec(capacity=131072), p, interpret=False, cores=132).num_splits == 2
    assert decode.plan(_spec(capacity=131072), p, interpret=False, cores=132).num_stages == 3
    paged = decode.plan(_spec(paged=True, page_size=16, capacity=131072), p, interpret=False,
                        cores=132)
    assert (paged.num_stages, paged.num_splits) == (2, 9)  # paged: the earlier default
    with decode.tuning(waves=0, num_stages=2):  # the earlier default: ~4 programs per SM
        # B=8, Hkv=8: 64 programs per split; 132 SMs want ~9 splits, when the cache is long
        assert decode.plan(_spec(capacity=131072), p, interpret=False, cores=132).num_splits == 9
        assert decode.plan(_spec(capacity=512), p, interpret=False, cores=132).num_splits == 2
        assert (decode.plan(_spec(batch=64, capacity=131072), p, interpret=False,
                            cores=132).num_splits == 2)
    forced = _params(128, ns=5)
    assert decode.plan(_spec(), forced, interpret=False, cores=132).num_splits == 5
    st = decode.plan(_spec(seqlen_q=4), p, interpret=False, cores=132)
    assert (st.rows, st.block_m, st.block_n) == (16, 16, 128)
    st = decode.plan(_spec(paged=True, page_size=48), p, interpret=False, cores=132)
    assert st.block_n == 16  # the largest power of two dividing the page, >= 16
    assert st.pages_per_step == 8  # 8 page tiles per loop trip: ~128 keys a trip
    st = decode.plan(_spec(paged=True, page_size=64), p, interpret=False, cores=132)
    assert (st.block_n, st.pages_per_step) == (64, 2)
    assert decode.plan(_spec(), p, interpret=False, cores=132).pages_per_step == 1


def test_explain_names_kernel_and_splits():
    q = jnp.zeros((2, 1, 4, 32), jnp.float32)
    kc = jnp.zeros((2, 64, 2, 32), jnp.float32)
    ex = flashmux.explain_kvcache(
        q, kc, kc, cache_seqlens=jnp.asarray([3, 4], jnp.int32), num_splits=3, backend="pallas"
    )
    assert ex.chosen == "pallas"
    assert ex.splits == 3 and "pallas split-KV decode" in ex.kernel
    on_cpu = jax.default_backend() == "cpu"  # the GPU names its lowering instead
    assert ("(interpret" in ex.kernel) == on_cpu, ex.kernel


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("ns", [None, 1])
def test_lowers_to_triton_for_cuda(paged, ns):
    """The GPU path lowers (Pallas -> Triton IR custom call) at the benchmark shape, from the
    CPU: catches constructs the Triton lowering rejects without a GPU (not a run)."""
    pytest.importorskip("jax.experimental.pallas.triton")
    from flashmux_pallas import decode

    B, Hq, Hkv, D, S, page = 8, 32, 8, 128, 4096, 16
    p = _params(D, causal=True, alibi=True, ns=ns, page_size=page if paged else 0)
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), bf)
    if paged:
        kc = jax.ShapeDtypeStruct((B * S // page, page, Hkv, D), bf)
        bt = jax.ShapeDtypeStruct((B, S // page), jnp.int32)
    else:
        kc, bt = jax.ShapeDtypeStruct((B, S, Hkv, D), bf), None
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    sl = jax.ShapeDtypeStruct((Hq,), jnp.float32)

    def f(q, kc, vc, lens, bt, sl):
        return decode.decode(q, kc, vc, lens, bt, sl, p, interpret=False)

    try:
        lowered = jax.jit(f).trace(q, kc, kc, lens, bt, sl).lower(lowering_platforms=("cuda",))
    except (AttributeError, TypeError) as e:  # a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")
    text = lowered.as_text()
    assert "xla.gpu.triton" in text and "flashmux_decode" in text
