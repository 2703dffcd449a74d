"""The harness's decode sweep narrowed to some kvcache rows (--kv-pages, --kv-sq,
--kv-no-extras), as the GPU timing call uses it. Reference pass only (no kernels run)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass only", allow_module_level=True)

from flashmux.bench.cli import parser  # noqa: E402
from flashmux.bench.shapes import SweepConfig, build_points  # noqa: E402


def _rows(**kw):
    pts = build_points(SweepConfig(sweeps=["decode"], seqlens=[4096, 32768, 131072],
                                   kvcache_only=True, **kw))
    return sorted((p.seqlen_k, p.seqlen_q, p.page_size, p.heads_kv, p.kv_lens is not None)
                  for p in pts)


def test_narrowed_kvcache_rows():
    every = _rows()
    assert len(every) == 3 * 10  # Sq 1 and 4 x (contiguous, 16, 64) + ragged x 2 + MQA x 2
    got = _rows(kv_pages=[0, 16], kv_sq=[1], kv_extras=False)
    assert got == sorted((sk, 1, page, 8, False) for sk in (4096, 32768, 131072)
                         for page in (0, 16))
    with_extras = _rows(kv_pages=[16], kv_sq=[4])
    assert {(r[1], r[2], r[3], r[4]) for r in with_extras} == {
        (4, 16, 8, False), (1, 16, 8, True), (1, 16, 1, False)}


def test_command_line_options():
    a = parser().parse_args(["--sweep", "decode", "--kvcache-only", "--kv-pages", "0,16",
                             "--kv-sq", "1", "--kv-no-extras"])
    assert (a.kv_pages, a.kv_sq, a.kv_no_extras) == ("0,16", "1", True)


def test_decode_anchors_run_sq1_causal_without_a_mask():
    """A causal decode step (Sq = 1, bottom-right) sees every key: jax's cuDNN anchor runs it
    (unsupported before session 8, so the sweep had no JAX anchor); Sq = 4 stays unsupported."""
    import types

    import numpy as np

    from flashmux.bench.impls import JaxDpaImpl
    from flashmux.bench.shapes import Point

    ctx = types.SimpleNamespace(device="cuda")
    one = Point("decode", 2, 1, 64, 4, 2, 16, True, "fp32", x=64, kvcache=True)
    four = Point("decode", 2, 4, 64, 4, 2, 16, True, "fp32", x=64, kvcache=True)
    assert JaxDpaImpl("cudnn").unsupported(one, "fwd", ctx) is None
    assert "bottom-right" in JaxDpaImpl("cudnn").unsupported(four, "fwd", ctx)
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, 1, 4, 16), (2, 64, 2, 16), (2, 64, 2, 16)))
    out = np.asarray(JaxDpaImpl("xla").build(one, ctx)(jnp.asarray(q), jnp.asarray(k),
                                                        jnp.asarray(v)))
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h reads KV head h//2
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vr)
    assert np.abs(out - ref).max() < 1e-4  # every key, not only the first (top-left causal)
