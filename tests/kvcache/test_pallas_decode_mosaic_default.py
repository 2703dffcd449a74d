"""Session 10: the Mosaic GPU decode kernel is the default for paged 16-bit caches on sm90
(jax >= decode.MOSAIC_MIN_JAX); contiguous caches, other GPUs, other jax versions and calls out
of its scope keep the Triton lowering, and explain() says which and why.

Pallas pass, CPU: decisions only (no lowering, no kernel: milliseconds); the sm90 device and the
jax version are monkeypatched. On a Hopper GPU the last test runs the default paged path
itself (shuffled 16- and 64-token pages, ragged lengths with 0) against float64."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND") != "pallas":
    pytest.skip("runs in the pallas pass only", allow_module_level=True)
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux.kvcache import DecodeParams  # noqa: E402

B, HQ, HKV, D = 8, 32, 8, 128


def _p(**kw):
    base = dict(scale=D ** -0.5, causal=True, window_left=None, window_right=0, softcap=None,
                alibi=False, num_splits=None, page_size=16, return_lse=False)
    base.update(kw)
    return DecodeParams(**base)


@pytest.fixture
def sm90(monkeypatch):
    from flashmux_pallas import decode, mosaic_kernels, ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mosaic_kernels, "available", lambda: True)
    monkeypatch.setattr(decode, "_jax_version", lambda: (0, 11, 2))
    monkeypatch.delenv("FLASHMUX_PALLAS_DECODE", raising=False)
    return decode


def _choice(decode, page=16, dtype=jnp.bfloat16, paged=True, params=None, alibi=False):
    q = (B, 1, HQ, D)
    k = (4096, page, HKV, D) if paged else (B, 4096, HKV, D)
    return decode.mosaic_choice(q, k, k, dtype, paged, params or _p(page_size=page if paged
                                                                    else 0), alibi)


def test_paged_default_is_mosaic_on_sm90_and_says_why(sm90, monkeypatch):
    decode = sm90
    for page in (16, 32, 64, 256):
        on, why = _choice(decode, page)
        assert on and "Mosaic GPU kernel" in why and "paged" in why
    on, why = _choice(decode, paged=False)
    assert not on and "Triton lowering" in why and "contiguous" in why
    # out of scope: a 48-token page, float32, a window, ALiBi
    for kw, words in ((dict(page=48), "page_size 48"), (dict(dtype=jnp.float32), "float32"),
                      (dict(params=_p(window_left=64)), "window"), (dict(alibi=True), "ALiBi")):
        on, why = _choice(decode, **kw)
        assert not on and "scope" in why and words in why, (kw, why)
    monkeypatch.setattr(decode, "_jax_version", lambda: (0, 10, 2))
    on, why = _choice(decode)
    assert not on and "jax >= 0.11" in why and "0.10.2" in why
    monkeypatch.setattr(decode, "_jax_version", lambda: (0, 11, 2))
    from flashmux_pallas import ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
    on, why = _choice(decode)
    assert not on and "sm90" in why and "sm80" in why


def test_the_tuning_field_overrides_the_default(sm90, monkeypatch):
    decode = sm90
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "mosaic=0")
    on, why = _choice(decode)
    assert not on and "mosaic=0" in why
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "mosaic=1")
    on, why = _choice(decode, paged=False)
    assert on and "forced" in why


def test_short_paged_caches_can_keep_the_triton_lowering(sm90, monkeypatch):
    """mosaic_min_keys (MOSAIC_PAGED_MIN_KEYS by default): a paged cache holding fewer keys per
    sequence keeps the Triton lowering unless mosaic=1 forces the kernel."""
    decode = sm90
    q, k = (B, 1, HQ, D), (4096, 16, HKV, D)
    p = _p()
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "mosaic_min_keys=8192")
    on, why = decode.mosaic_choice(q, k, k, jnp.bfloat16, True, p, False, capacity=4096)
    assert not on and "shorter than 8192" in why and "4096" in why
    assert decode.mosaic_choice(q, k, k, jnp.bfloat16, True, p, False, capacity=8192)[0]
    monkeypatch.setenv("FLASHMUX_PALLAS_DECODE", "mosaic_min_keys=8192,mosaic=1")
    assert decode.mosaic_choice(q, k, k, jnp.bfloat16, True, p, False, capacity=4096)[0]


def test_decode_routes_paged_calls_with_two_consumers(sm90, monkeypatch):
    """decode() hands an in-scope paged call to decode_mosaic with two consumer warpgroups,
    a contiguous one to the Triton lowering's pallas_call."""
    decode = sm90
    from flashmux_pallas import decode_mosaic

    seen = {}

    class Routed(Exception):
        pass

    def fake_mosaic(*a, **kw):
        seen["mosaic"] = kw
        raise Routed

    def fake_call(*a, **kw):
        seen["triton"] = True
        raise Routed

    monkeypatch.setattr(decode_mosaic, "decode", fake_mosaic)
    monkeypatch.setattr(decode, "_call", fake_call)
    q = jnp.zeros((2, 1, HQ, D), jnp.bfloat16)
    pages = jnp.zeros((16, 16, HKV, D), jnp.bfloat16)
    table = jnp.zeros((2, 8), jnp.int32)
    lens = jnp.zeros((2,), jnp.int32)
    with pytest.raises(Routed):
        decode.decode(q, pages, pages, lens, table, None, _p(), False)
    assert seen.pop("mosaic")["consumers"] == 2
    cont = jnp.zeros((2, 128, HKV, D), jnp.bfloat16)
    with pytest.raises(Routed):
        decode.decode(q, cont, cont, lens, None, None, _p(page_size=0), False)
    assert seen == {"triton": True}


def test_explain_names_the_kernel(sm90):
    from flashmux import dispatch
    from flashmux.kvcache import DecodeSpec

    be = dispatch.get_backend("pallas")

    def spec(paged, page=16):
        return DecodeSpec(kind="jax", device_type="cuda", device_name="H200",
                          compute_capability=(9, 0), dtype="bfloat16", batch=B, seqlen_q=1,
                          seqlen_new=0, heads_q=HQ, heads_kv=HKV, head_dim=D, head_dim_v=D,
                          capacity=4096, paged=paged, page_size=page if paged else 0,
                          causal=True, window=False, softcap=False, alibi=False,
                          return_lse=False, num_splits=None, traced=False, requires_grad=False)

    txt = be.decode_kernel(spec(True), _p())
    assert "Mosaic GPU kernel" in txt and "page_size 16" in txt
    txt = be.decode_kernel(spec(True, 48), _p(page_size=48))
    assert "triton" in txt and "Triton lowering" in txt and "page_size 48" in txt
    txt = be.decode_kernel(spec(False), _p(page_size=0))
    assert "triton" in txt and "contiguous" in txt and "Mosaic" in txt


def _sm90_gpu() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 9.0
    except Exception:
        return False


@pytest.mark.skipif(not _sm90_gpu(), reason="needs a Hopper GPU under JAX")
@pytest.mark.parametrize("page,sq", [(16, 1), (64, 1), (16, 4)])
def test_default_paged_path_on_the_gpu(page, sq):
    """flashmux.attention_with_kvcache on a shuffled paged cache (ragged lengths 0, 1, 1000,
    full) through the default (the Mosaic kernel: explain says so), under jit, against float64."""
    import flashmux
    from flashmux import reference

    rng = np.random.default_rng(page + sq)
    b, cap = 4, 2048
    lens = np.array([0, 1, 1000, cap], np.int32)
    q = rng.standard_normal((b, sq, HQ, D)).astype(np.float32)
    k = rng.standard_normal((b, cap, HKV, D)).astype(np.float32)
    v = rng.standard_normal((b, cap, HKV, D)).astype(np.float32)
    bf = jnp.bfloat16
    qj, kj, vj = (jnp.asarray(x).astype(bf) for x in (q, k, v))
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (qj, kj, vj))
    n = b * cap // page
    order = rng.permutation(n + 5)[:n]
    kp = jnp.zeros((n + 5, page, HKV, D), bf).at[order].set(kj.reshape(n, page, HKV, D))
    vp = jnp.zeros((n + 5, page, HKV, D), bf).at[order].set(vj.reshape(n, page, HKV, D))
    table = jnp.asarray(order.astype(np.int32).reshape(b, cap // page))
    lj = jnp.asarray(lens)
    txt = str(flashmux.explain_kvcache(qj, kp, vp, cache_seqlens=lj, block_table=table,
                                           causal=True, backend="pallas"))
    assert "Mosaic GPU kernel" in txt, txt
    f = jax.jit(lambda q, k, v, n, t: flashmux.attention_with_kvcache(
        q, k, v, cache_seqlens=n, block_table=t, causal=True, return_lse=True,
        backend="pallas"))
    out, lse = f(qj, kp, vp, lj, table)
    ref_out, ref_lse, _, _ = reference.attention_with_kvcache(
        q64, k64, v64, cache_seqlens=lens, causal=True)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max() < 1e-3
    assert np.abs(out - np.nan_to_num(ref_out)).max() < 2e-2


@pytest.mark.skipif(not _sm90_gpu(), reason="needs a Hopper GPU under JAX")
def test_default_paged_step_with_an_append_and_donated_caches():
    """A jitted decode step that appends one token per sequence into a shuffled 16-token-page
    cache (donated) and attends through the default Mosaic kernel, twice in a row: outputs
    judged against float64 on the appended caches, and slots no token was written to keep
    their contents."""
    import flashmux
    from flashmux import reference

    rng = np.random.default_rng(7)
    b, cap, page = 3, 1024, 16
    lens = np.array([0, 500, cap - 2], np.int32)
    bf = jnp.bfloat16
    k = jnp.asarray(rng.standard_normal((b, cap, HKV, D)).astype(np.float32)).astype(bf)
    v = jnp.asarray(rng.standard_normal((b, cap, HKV, D)).astype(np.float32)).astype(bf)
    n = b * cap // page
    order = rng.permutation(n)
    kp = jnp.zeros((n, page, HKV, D), bf).at[order].set(k.reshape(n, page, HKV, D))
    vp = jnp.zeros((n, page, HKV, D), bf).at[order].set(v.reshape(n, page, HKV, D))
    table = jnp.asarray(order.astype(np.int32).reshape(b, cap // page))
    k64 = np.asarray(k.astype(jnp.float32), np.float64)
    v64 = np.asarray(v.astype(jnp.float32), np.float64)

    step = jax.jit(lambda q, kc, vc, n, t, kn, vn: flashmux.attention_with_kvcache(
        q, kc, vc, cache_seqlens=n, k=kn, v=vn, block_table=t, causal=True,
        backend="pallas"), donate_argnums=(1, 2))  # -> (out, k_cache, v_cache)
    for it in range(2):
        q = jnp.asarray(rng.standard_normal((b, 1, HQ, D)).astype(np.float32)).astype(bf)
        kn = jnp.asarray(rng.standard_normal((b, 1, HKV, D)).astype(np.float32)).astype(bf)
        vn = jnp.asarray(rng.standard_normal((b, 1, HKV, D)).astype(np.float32)).astype(bf)
        out, kp, vp = step(q, kp, vp, jnp.asarray(lens), table, kn, vn)
        for i in range(b):  # the float64 caches follow the append
            k64[i, lens[i]] = np.asarray(kn[i, 0].astype(jnp.float32), np.float64)
            v64[i, lens[i]] = np.asarray(vn[i, 0].astype(jnp.float32), np.float64)
        lens = lens + 1
        q64 = np.asarray(q.astype(jnp.float32), np.float64)
        ref = reference.attention_with_kvcache(q64, k64, v64, cache_seqlens=lens,
                                               causal=True)[0]
        got = np.asarray(out.astype(jnp.float32), np.float64)
        assert np.abs(got - ref).max() < 2e-2, it
    # every slot of the paged cache equals the float64 cache it mirrors (appended or untouched)
    kc = np.asarray(kp.astype(jnp.float32), np.float64)[np.asarray(table)].reshape(b, cap, HKV, D)
    assert np.array_equal(kc, k64)
