"""flashmux.create_block_mask, BlockMask and flashmux.masks: construction against a dense
evaluation of the mask function, the tile lists, repr, errors, and the attention arguments
(alibi_slopes=, block_mask=) up to dispatch. Numerics of attention with them:
tests/conformance/test_masks.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import flashmux
from flashmux import masks as M
from flashmux.blockmask import BlockMask, create_block_mask

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def _dense(fn, b, h, sq, sk):
    bi = np.arange(b or 1).reshape(-1, 1, 1, 1)
    hi = np.arange(h or 1).reshape(1, -1, 1, 1)
    got = fn(bi, hi, np.arange(sq).reshape(1, 1, -1, 1), np.arange(sk).reshape(1, 1, 1, -1))
    return np.broadcast_to(np.asarray(got, bool), (b or 1, h or 1, sq, sk))


def _host(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _segments(b, s, seed=0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, 5, (b, s)), axis=1)


SEG = _segments(2, 150)
MASKS = {
    "causal": M.causal(),
    "causal_offset": M.causal(-7),
    "sliding": M.sliding_window(40, 5),
    "sliding_left_only": M.sliding_window(None, 0),
    "prefix_lm": M.prefix_lm(45),
    "chunked": M.chunked(50),
    "dilated": M.dilated(6, 9),
    "document": M.document(SEG),
    "doc_and_causal": M.and_(M.causal(), M.document(SEG)),
    "or": M.or_(M.sliding_window(3, 3), M.prefix_lm(10)),
    "lambda": lambda b, h, q, kv: ((q * 7 + kv * 3 + h) % 5 == 0) | (q == kv),
}


def _check_lists(bm):
    """The index lists agree with the tile kinds, and the bitmasks with to_dense()."""
    kind = _host(bm.kind)
    for num, idx, code, k in (
        (bm.q_num_full, bm.q_full_idx, 1, kind),
        (bm.q_num_part, bm.q_part_idx, 2, kind),
        (bm.kv_num_full, bm.kv_full_idx, 1, np.swapaxes(kind, -1, -2)),
        (bm.kv_num_part, bm.kv_part_idx, 2, np.swapaxes(kind, -1, -2)),
    ):
        num, idx = _host(num), _host(idx)
        assert num.dtype == np.int32 and idx.dtype == np.int32
        for pos in np.ndindex(*num.shape):
            n = num[pos]
            want = np.flatnonzero(k[pos] == code)
            assert n == len(want)
            np.testing.assert_array_equal(np.sort(idx[pos][:n]), want)
    tid = _host(bm.tile_id)
    assert (tid[kind == 2] >= 0).all() and (tid[kind != 2] == -1).all()
    assert sorted(tid[kind == 2].tolist()) == list(range(bm.num_partial))


@pytest.mark.parametrize("name", list(MASKS))
def test_ready_made_masks_vs_dense(name):
    fn = MASKS[name]
    heads = 3 if name == "lambda" else None
    bm = create_block_mask(fn, 2, heads, 150, 130, block_size=32)
    want = _dense(fn, 2, heads, 150, 130)
    got = bm.to_dense()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # tile kinds are exact: full tiles all allowed (inside the sequence), empty ones none
    kind = _host(bm.kind)
    pad = np.zeros((2, heads or 1, 160, 160), bool)
    pad[:, :, :150, :130] = want
    inside = np.zeros((160, 160), bool)
    inside[:150, :130] = True
    tiles = pad.reshape(2, heads or 1, 5, 32, 5, 32)
    n_ok = tiles.sum((3, 5))
    n_in = inside.reshape(5, 32, 5, 32).sum((1, 3))
    np.testing.assert_array_equal(kind == 0, n_ok == 0)
    np.testing.assert_array_equal(kind == 1, (n_ok == n_in) & (n_ok > 0))
    _check_lists(bm)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name", ["doc_and_causal", "dilated", "lambda"])
def test_torch_mask_matches_numpy(name):
    import torch

    fn = MASKS[name]
    ref = create_block_mask(fn, 2, 3, 100, 90, block_size=32)
    bm = create_block_mask(fn, 2, 3, 100, 90, block_size=32, like=torch.zeros(1))
    assert bm.array_kind == "torch" and isinstance(bm.kind, torch.Tensor)
    for a, b in zip(ref.arrays(), bm.arrays()):
        np.testing.assert_array_equal(a, _host(b))


@pytest.mark.skipif(not HAS_JAX, reason="jax not installed")
def test_jax_mask_matches_numpy_and_is_a_pytree():
    import jax
    import jax.numpy as jnp

    fn = MASKS["doc_and_causal"]
    ref = create_block_mask(fn, 2, None, 100, 90, block_size=32)
    bm = create_block_mask(fn, 2, None, 100, 90, block_size=32, like=jnp.zeros(1))
    for a, b in zip(ref.arrays(), bm.arrays()):
        np.testing.assert_array_equal(a, np.asarray(b))
    leaves, tree = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == len(bm.arrays())
    back = jax.jit(lambda m: m)(bm)
    assert isinstance(back, BlockMask) and back.block_size == 32
    np.testing.assert_array_equal(np.asarray(back.bits), np.asarray(bm.bits))


def test_tile_classifier_skips_decided_tiles():
    """A ready-made mask evaluates mask_fn only inside undecided tiles: for a document mask at
    S = 8192 that is a few tiles, not S x S elements."""
    s, bs = 8192, 128
    seg = np.repeat(np.arange(8), s // 8)
    inner = M.document(seg)
    seen = []

    def counting(b, h, q, kv):
        out = inner(b, h, q, kv)
        seen.append(np.broadcast_shapes(np.shape(q), np.shape(kv)))
        return out

    fn = M.MaskFn(counting, inner.block_fn)
    bm = create_block_mask(fn, None, None, s, s, block_size=bs)
    evaluated = sum(int(np.prod(x)) for x in seen)
    assert evaluated == 0  # documents aligned to the blocks: every tile is decided
    c = bm.counts()
    assert c["partial"] == 0 and c["full"] == 8 * (s // 8 // bs) ** 2
    seg2 = np.repeat(np.arange(10), [819] * 9 + [s - 9 * 819])  # unaligned: boundary tiles
    inner2 = M.document(seg2)
    seen.clear()
    fn2 = M.MaskFn(lambda *a: (seen.append(np.broadcast_shapes(np.shape(a[2]), np.shape(a[3]))),
                               inner2(*a))[1], inner2.block_fn)
    bm2 = create_block_mask(fn2, None, None, s, s, block_size=bs)
    evaluated = sum(int(np.prod(x)) for x in seen)
    # each of the 9 boundaries leaves undecided the tiles of its query block's row and its key
    # block's column that meet the two documents around it (~2 x 13 tiles)
    assert 0 < evaluated <= 9 * 2 * 14 * bs * bs < s * s // 15
    np.testing.assert_array_equal(bm2.to_dense()[0, 0, ::97, ::89], _dense(inner2, None, None, s, s)[0, 0, ::97, ::89])


def test_repr_and_counts():
    bm = create_block_mask(M.causal(), None, None, 256, 256, block_size=64)
    c = bm.counts()
    assert (c["full"], c["partial"], c["empty"], c["tiles"]) == (6, 4, 6, 16)
    r = repr(bm)
    assert "density 62.5%" in r and "6 full + 4 partial of 16 tiles" in r
    assert r.splitlines()[1:] == ["  +...", "  #+..", "  ##+.", "  ###+"]


def test_explain_shows_block_mask_and_alibi():
    q = np.zeros((1, 64, 2, 8), np.float32)
    bm = create_block_mask(M.sliding_window(16, 0), None, None, 64, 64, block_size=32)
    text = str(flashmux.explain(q, q, q, block_mask=bm, alibi_slopes=np.ones(2, np.float32)))
    assert "block_mask: density 75.0% (0 full + 3 partial of 4 tiles, block 32)" in text
    assert "alibi: slopes of shape (2,)" in text
    assert "[alibi, block_mask]" in text


def test_backends_without_the_features_decline():
    from flashmux.backend import FEATURES, Capabilities, capability_reasons
    from flashmux.spec import ProblemSpec

    spec = ProblemSpec("numpy", "cpu", "cpu", None, "float32", 1, 8, 8, 2, 2, 8, 8, False, False,
                       False, False, False, False, False, False, False, alibi=True, block_mask=True)
    caps = Capabilities(frozenset({"numpy"}), frozenset({"cpu"}), frozenset({"float32"}),
                        features=frozenset(FEATURES))
    assert capability_reasons(caps, spec) == [
        "ALiBi (alibi_slopes) not supported", "block masks (block_mask) not supported"]
    caps2 = Capabilities(frozenset({"numpy"}), frozenset({"cpu"}), frozenset({"float32"}),
                         features=frozenset(FEATURES) | {"alibi", "block_mask"})
    assert capability_reasons(caps2, spec) == []


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(mask_fn=3), TypeError, "mask_fn: expected a callable"),
        (dict(batch=0), ValueError, "batch: expected an int >= 1 or None, got 0"),
        (dict(heads=2.5), TypeError, "heads: expected an int >= 1 or None"),
        (dict(seqlen_q=-1), ValueError, "seqlen_q: expected an int >= 0"),
        (dict(block_size=48), ValueError, "block_size: expected a power of two >= 32, got 48"),
        (dict(block_size=16), ValueError, "block_size: expected a power of two >= 32, got 16"),
        (dict(like=[1, 2]), TypeError, "like: expected a torch tensor, JAX array or NumPy array"),
    ],
)
def test_create_block_mask_errors(kwargs, exc, text):
    args = dict(mask_fn=M.causal(), batch=1, heads=None, seqlen_q=64, seqlen_k=64)
    args.update(kwargs)
    fn = args.pop("mask_fn")
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        create_block_mask(fn, args.pop("batch"), args.pop("heads"), args.pop("seqlen_q"),
                          args.pop("seqlen_k"), **args)


def test_mask_constructor_errors():
    with pytest.raises(ValueError, match="chunk_size: expected an int >= 1, got 0"):
        M.chunked(0)
    with pytest.raises(TypeError, match="left: expected an int or None"):
        M.sliding_window(1.5)
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(S,\) or \(B, S\)"):
        M.document(np.zeros((1, 2, 3), np.int32))
    with pytest.raises(TypeError, match="segment_ids: expected an integer dtype"):
        M.document(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="and_: expected at least one mask function"):
        M.and_()


def _qkv(b=2, s=64, h=2, d=8):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(alibi_slopes=np.ones(3, np.float32)), ValueError,
         r"alibi_slopes: expected shape \(2,\) or \(2, 2\)"),
        (dict(alibi_slopes=np.ones(2, np.float64)), TypeError,
         "alibi_slopes: expected dtype float32, got float64"),
        (dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes: expected a numpy array like q"),
        (dict(block_mask="causal"), TypeError, "block_mask: expected a flashmux.BlockMask"),
        (dict(block_mask=create_block_mask(M.causal(), None, None, 64, 32, block_size=32)),
         ValueError, r"block_mask: expected \(seqlen_q, seqlen_k\) = \(64, 64\)"),
        (dict(block_mask=create_block_mask(M.causal(), 3, None, 64, 64, block_size=32)),
         ValueError, "block_mask: expected batch None or 2, got a mask built for batch 3"),
        (dict(block_mask=create_block_mask(M.causal(), None, 4, 64, 64, block_size=32)),
         ValueError, r"block_mask: expected heads None or 2 \(query heads\)"),
    ],
)
def test_attention_argument_errors(kwargs, exc, text):
    q, k, v = _qkv()
    with pytest.raises(exc, match=text):
        flashmux.attention(q, k, v, **kwargs)


def test_block_mask_with_cu_seqlens_declined():
    q, k, v = _qkv(b=1)
    cu = np.array([0, 30, 64], np.int32)
    bm = create_block_mask(M.causal(), None, None, 64, 64, block_size=32)
    with pytest.raises(ValueError, match="block_mask: expected None with cu_seqlens"):
        flashmux.attention(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, block_mask=bm)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_block_mask_of_another_kind_rejected():
    import torch

    q, k, v = (torch.from_numpy(x) for x in _qkv())
    bm = create_block_mask(M.causal(), None, None, 64, 64, block_size=32)  # numpy arrays
    with pytest.raises(TypeError, match="block_mask: expected a mask of torch arrays like q"):
        flashmux.attention(q, k, v, block_mask=bm)


def test_mask_semantics_on_the_reference():
    """block_mask ANDs with causal, and a causal mask_fn equals causal=True."""
    q, k, v = _qkv()
    bm = create_block_mask(M.causal(), None, None, 64, 64, block_size=32)
    a = flashmux.attention(q, k, v, block_mask=bm)
    b = flashmux.attention(q, k, v, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = flashmux.attention(q, k, v, block_mask=create_block_mask(M.sliding_window(None, 5), None, None, 64, 64),
                           causal=True)
    np.testing.assert_allclose(c, b, atol=1e-6)
    # rows that see nothing: out 0, lse -inf
    empty = create_block_mask(lambda b_, h, qi, kv: qi >= 40, None, None, 64, 64, block_size=32)
    out, lse = flashmux.attention(q, k, v, block_mask=empty, return_lse=True)
    assert (out[:, :40] == 0).all() and np.isneginf(lse[:, :, :40]).all() and np.isfinite(lse[:, :, 40:]).all()


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_compile_fullgraph_reuses_the_mask():
    import torch

    q, k, v = (torch.from_numpy(x).requires_grad_(True) for x in _qkv())
    bm = create_block_mask(M.and_(M.causal(), M.document(SEG[:, :64])), 2, None, 64, 64,
                           block_size=32, like=q)
    slopes = torch.full((2,), 0.25)

    def f(q, k, v, bm):
        return flashmux.attention(q, k, v, block_mask=bm, alibi_slopes=slopes)

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # eager first: dispatch caches availability on first use (a compile would guard on it)
    ref = f(*(x.detach().requires_grad_(True) for x in (q, k, v)), bm)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counting_backend, fullgraph=True)
    out = compiled(q, k, v, bm)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    g = q.grad.clone()
    q.grad = None
    compiled(q, k, v, bm).sum().backward()  # the same mask again: no retrace
    torch.testing.assert_close(q.grad, g)
    assert len(graphs) == 1
    assert any("fwd_ext" in str(n.target) for n in graphs[0].graph.nodes)
