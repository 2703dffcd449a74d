"""attention_with_kvcache's API: argument errors, return values per framework, explain_kvcache,
the decode dispatcher, clamping, inference-only, torch.compile and jax.jit with donated caches.
Runs on the CPU with the reference backend (the Triton kernel is covered in the interpreter by
test_kvcache_conformance.py with FLASHMUX_TEST_BACKEND=triton, and on a GPU by
test_kvcache_gpu.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Backend-independent: runs once, in the reference pass (the per-backend passes of CI set
# FLASHMUX_TEST_BACKEND to each kernel backend and would repeat it).
if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass only", allow_module_level=True)

import flashmux
from flashmux import kvcache, reference


def _np_inputs(b=2, sq=1, hq=4, hkv=2, d=16, cap=32, snew=1, paged=0, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    if paged:
        mp = cap // paged
        kc = rng.standard_normal((b * mp + 2, paged, hkv, d)).astype(np.float32)
        vc = rng.standard_normal((b * mp + 2, paged, hkv, d)).astype(np.float32)
        table = rng.permutation(b * mp + 2)[: b * mp].reshape(b, mp).astype(np.int32)
    else:
        kc = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
        vc = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
        table = None
    k = rng.standard_normal((b, snew, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, snew, hkv, d)).astype(np.float32)
    lens = np.array([3, cap - snew][:b] + [0] * max(0, b - 2), np.int32)
    return q, kc, vc, lens, k, v, table


# -- errors ---------------------------------------------------------------------------------


def _call(**over):
    q, kc, vc, lens, k, v, table = _np_inputs()
    kw = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, k=k, v=v)
    kw.update(over)
    q = kw.pop("q")
    kc = kw.pop("k_cache")
    vc = kw.pop("v_cache")
    return flashmux.attention_with_kvcache(q, kc, vc, **kw)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(q=np.zeros((2, 4, 16), np.float32)), ValueError, ["q", "rank 4"]),
        (dict(q=[1, 2]), TypeError, ["q", "list"]),
        (dict(k_cache=np.zeros((2, 32, 2, 16), np.float16)), TypeError, ["k_cache", "float16"]),
        (dict(v_cache=np.zeros((2, 31, 2, 16), np.float32)), ValueError, ["v_cache", "(2, 32, 2)"]),
        (dict(k_cache=np.zeros((2, 32, 3, 16), np.float32),
              v_cache=np.zeros((2, 32, 3, 16), np.float32)), ValueError, ["k_cache", "divides"]),
        (dict(k_cache=np.zeros((3, 32, 2, 16), np.float32),
              v_cache=np.zeros((3, 32, 2, 16), np.float32)), ValueError, ["k_cache", "batch 2"]),
        (dict(cache_seqlens=None), TypeError, ["cache_seqlens", "None"]),
        (dict(cache_seqlens=np.array([1, 2], np.int64)), TypeError, ["cache_seqlens", "int32", "int64"]),
        (dict(cache_seqlens=np.array([1, 2, 3], np.int32)), ValueError, ["cache_seqlens", "(2,)"]),
        (dict(cache_seqlens=np.array([-1, 2], np.int32)), ValueError, ["cache_seqlens", ">= 0"]),
        (dict(cache_seqlens=np.array([32, 2], np.int32)), ValueError, ["cache_seqlens", "capacity 32"]),
        (dict(v=None), ValueError, ["v", "k was given"]),
        (dict(k=np.zeros((2, 1, 2, 8), np.float32)), ValueError, ["k", "(2, 1, 2, 16)"]),
        (dict(block_table=np.zeros((2, 4), np.int64)), TypeError, ["block_table", "int32"]),
        (dict(block_table=np.zeros((3, 4), np.int32)), ValueError, ["block_table", "(2, max_pages)"]),
        (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, ["alibi_slopes", "(4,)"]),
        (dict(alibi_slopes=np.ones(4, np.float64)), TypeError, ["alibi_slopes", "float32"]),
        (dict(num_splits=0), ValueError, ["num_splits", ">= 1"]),
        (dict(num_splits=2.0), TypeError, ["num_splits"]),
        (dict(window=(-1, 0)), ValueError, ["window"]),
        (dict(softcap=0.0), ValueError, ["softcap"]),
        (dict(scale=float("nan")), ValueError, ["scale"]),
        (dict(causal=1), TypeError, ["causal"]),
        (dict(return_lse="yes"), TypeError, ["return_lse"]),
        (dict(backend="nope"), ValueError, ["backend", "nope"]),
    ],
)
def test_errors_name_the_argument(over, exc, words):
    with pytest.raises(exc) as info:
        _call(**over)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg


def test_paged_table_out_of_range_is_an_error_when_host_visible():
    q, kc, vc, lens, k, v, table = _np_inputs(paged=8)
    table = table.copy()
    table[1, -1] = kc.shape[0]  # used by sequence 1 (full)
    with pytest.raises(ValueError, match="block_table"):
        flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v, block_table=table)


# -- return values --------------------------------------------------------------------------


def test_numpy_returns_and_in_place_update():
    q, kc, vc, lens, k, v, _ = _np_inputs()
    ref = reference.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v)
    out, kc2, vc2 = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v)
    assert kc2 is kc and vc2 is vc
    np.testing.assert_array_equal(kc, ref[2].astype(np.float32))
    np.testing.assert_allclose(out, ref[0], atol=1e-5)
    out2 = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens + 1)
    np.testing.assert_allclose(out2, out, atol=1e-6)  # the same keys, already appended
    o3, lse = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens + 1, return_lse=True)
    assert lse.shape == (2, 4, 1) and lse.dtype == np.float32
    np.testing.assert_allclose(lse, ref[1], atol=1e-5)


def test_torch_in_place_and_jax_functional():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    q, kc, vc, lens, k, v, table = _np_inputs(paged=8)
    t = [torch.from_numpy(x.copy()) for x in (q, kc, vc, lens, k, v, table)]
    out, lse, kc_t, vc_t = flashmux.attention_with_kvcache(
        t[0], t[1], t[2], cache_seqlens=t[3], k=t[4], v=t[5], block_table=t[6], return_lse=True)
    assert kc_t is t[1] and vc_t is t[2]
    j = [jnp.asarray(x) for x in (q, kc, vc, lens, k, v, table)]
    out_j, lse_j, kc_j, vc_j = flashmux.attention_with_kvcache(
        j[0], j[1], j[2], cache_seqlens=j[3], k=j[4], v=j[5], block_table=j[6], return_lse=True)
    np.testing.assert_array_equal(np.asarray(j[1]), kc)  # the input array is not modified
    np.testing.assert_array_equal(np.asarray(kc_j), kc_t.numpy())
    np.testing.assert_allclose(np.asarray(out_j), out.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse_j), lse.numpy(), atol=1e-5)


def test_empty_problems_and_rows_that_see_nothing():
    q, kc, vc, lens, k, v, _ = _np_inputs()
    out, lse = flashmux.attention_with_kvcache(q[:, :0], kc, vc, cache_seqlens=lens,
                                               return_lse=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    zero = np.zeros(2, np.int32)
    out, lse = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=zero, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


# -- explain and dispatch -------------------------------------------------------------------


def test_explain_kvcache_names_backend_kernel_and_splits():
    q, kc, vc, lens, k, v, table = _np_inputs(paged=16)
    ex = flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v, block_table=table,
                                  causal=True)
    assert ex.chosen == "reference" and ex.splits == 1
    text = str(ex)
    assert "paged cache (page_size 16)" in text and "CHOSEN" in text and "key splits: 1" in text
    assert "Snew=1" in text and "[causal]" in text
    # nothing ran: the cache is unchanged
    assert not np.array_equal(kc[table[0, 0], 3], k[0, 0])
    with pytest.raises(TypeError, match="unexpected keyword"):
        flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens, dropout_p=0.1)


def test_decode_is_its_own_problem_class():
    spec = flashmux.explain_kvcache(*_np_inputs()[:3], cache_seqlens=_np_inputs()[3]).spec
    gpu = kvcache.DecodeSpec(**{**spec.__dict__, "kind": "torch", "device_type": "cuda",
                                "compute_capability": (9, 0)})
    names = [b.name for b in kvcache.decode_order(gpu)]
    assert names.index("reference") > 0  # kernels first on a GPU
    cpu = kvcache.DecodeSpec(**{**spec.__dict__, "kind": "torch"})
    assert kvcache.decode_order(cpu)[0].name == "reference"


def test_backend_without_decode_is_passed_over_with_a_reason():
    q, kc, vc, lens, *_ = _np_inputs()
    ex = flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens)
    for name, reasons in ex.rows:
        be = flashmux.dispatch.registry()[name]
        if type(be).decode_reasons is flashmux.Backend.decode_reasons and not flashmux.dispatch.availability(be):
            assert reasons == ["no KV-cache (decode) kernel"]


def test_forced_backend_never_falls_back():
    torch = pytest.importorskip("torch")
    q, kc, vc, lens, *_ = (torch.from_numpy(x) for x in _np_inputs()[:4])
    names = [b.name for b in flashmux.backends()]
    others = [n for n in names if n != "reference"]
    if not others:
        pytest.skip("only the reference backend is installed")
    with pytest.raises(flashmux.NoBackendError) as info:
        flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="pallas"
                                        if "pallas" in names else others[0])
    assert "decode" in str(info.value)


def test_inference_only():
    torch = pytest.importorskip("torch")
    q, kc, vc, lens = (torch.from_numpy(x) for x in _np_inputs()[:4])
    q.requires_grad_(True)
    with pytest.raises(flashmux.NoBackendError, match="inference only"):
        flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
    with torch.no_grad():
        flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)


# -- clamping (values the host cannot see are the caller's error; never read outside) -------


@pytest.mark.parametrize("paged", [0, 8])
def test_backend_decode_clamps_lengths_and_pages(paged):
    q, kc, vc, lens, k, v, table = _np_inputs(paged=paged, snew=0)
    be = flashmux.dispatch.get_backend("reference")
    p = kvcache.DecodeParams(scale=0.25, causal=True, window_left=None, window_right=0,
                             softcap=None, alibi=False, num_splits=None, page_size=paged,
                             return_lse=True)
    bad_lens = np.array([1000, -5], np.int32)
    if paged:
        bad = table.copy()
        bad[0, 0] = 10**6
        bad[0, 1] = -3
        clamped = np.clip(bad, 0, kc.shape[0] - 1)
    out, lse = be.decode(q, kc, vc, bad_lens, bad if paged else None, None, p)
    cap = 32
    ref = reference.attention_with_kvcache(q, kc, vc, cache_seqlens=np.array([cap, 0], np.int32),
                                           block_table=clamped if paged else None, causal=True,
                                           scale=0.25)
    np.testing.assert_allclose(out, ref[0], atol=1e-5)
    assert np.isneginf(lse[1]).all()


# -- compilers ------------------------------------------------------------------------------


def test_torch_compile_fullgraph_decode_step():
    torch = pytest.importorskip("torch")
    q, kc, vc, lens, k, v, table = (torch.from_numpy(x) for x in _np_inputs(paged=8))

    def step(q, kc, vc, lens, k, v, table):
        return flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                               block_table=table, causal=True, return_lse=True)

    kc_e, vc_e = kc.clone(), vc.clone()
    eager = step(q, kc_e, vc_e, lens, k, v, table)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, kc, vc, lens, k, v, table)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])
    torch.testing.assert_close(kc, kc_e)  # the compiled append wrote the caller's cache
    torch.testing.assert_close(vc, vc_e)


def test_jax_jit_with_donated_caches_and_traced_lengths():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, kc, vc, lens, k, v, table = _np_inputs(paged=8, sq=2, snew=2)
    ref = reference.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                           block_table=table, causal=True)

    def step(q, kc, vc, lens, k, v, table):
        return flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                               block_table=table, causal=True)

    donated = jax.jit(step, donate_argnums=(1, 2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, kc2, vc2 = donated(*(jnp.asarray(x) for x in (q, kc, vc, lens, k, v, table)))
    np.testing.assert_allclose(np.asarray(out), ref[0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kc2), ref[2].astype(np.float32))
    seen = []

    @jax.jit
    def traced(q, kc, vc, lens, table):  # explain at trace time: torch-only backends decline
        seen.append(flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table))
        return q

    traced(*(jnp.asarray(x) for x in (q, kc, vc, lens, table)))
    ex = seen[0]
    assert ex.spec.traced and ex.chosen == "reference"
    if "triton" in [n for n, _ in ex.rows]:
        assert any("JAX transformation" in r or "unavailable" in r or "CUDA" in r
                   for r in ex.reasons("triton")), ex.reasons("triton")
