"""Every bad input of SPEC.md raises ValueError/TypeError naming the argument, what was expected
and what came."""

import re

import numpy as np
import pytest
from corearrays import ints, make

import flashmux


def qkv(kind, b=2, sq=5, sk=7, hq=4, hkv=2, d=8, dv=8):
    return make(kind, (b, sq, hq, d)), make(kind, (b, sk, hkv, d)), make(kind, (b, sk, hkv, dv))


def expect(exc, pattern, fn, *a, **kw):
    with pytest.raises(exc, match=pattern) as info:
        fn(*a, **kw)
    return str(info.value)


def test_rank(kind):
    q, k, v = qkv(kind)
    msg = expect(ValueError, r"^q: expected rank 4", flashmux.attention, q[0], k, v)
    assert "got shape (5, 4, 8)" in msg


def test_batch_mismatch(kind):
    q, k, v = qkv(kind)
    expect(ValueError, r"k, v: expected batch size 2", flashmux.attention, q, k[:1], v[:1])


def test_head_dim_mismatch(kind):
    q, _, v = qkv(kind)
    k = make(kind, (2, 7, 2, 16))
    expect(ValueError, r"k: expected head_dim 8 like q, got 16", flashmux.attention, q, k, v)


def test_kv_shape_mismatch(kind):
    q, k, _ = qkv(kind)
    v = make(kind, (2, 6, 2, 8))
    expect(ValueError, r"v: expected shape", flashmux.attention, q, k, v)


def test_heads_not_multiple(kind):
    q = make(kind, (2, 5, 4, 8))
    k, v = make(kind, (2, 7, 3, 8)), make(kind, (2, 7, 3, 8))
    expect(ValueError, r"k: expected a KV head count that divides q's 4 heads, got 3", flashmux.attention, q, k, v)


def test_mixed_dtypes(kind):
    q, k, v = qkv(kind)
    k16 = make(kind, (2, 7, 2, 8), dtype="float16")
    expect(TypeError, r"k: expected dtype float32 like q, got float16", flashmux.attention, q, k16, v)


def test_integer_dtype(kind):
    q, k, v = qkv(kind)
    qi = ints(kind, np.zeros((2, 5, 4, 8)))
    expect(TypeError, r"q: expected dtype float16, bfloat16, float32 or float64, got int32", flashmux.attention, qi, k, v)


def test_mixed_array_kinds():
    pytest.importorskip("torch")
    q, k, v = qkv("numpy")
    import torch

    expect(TypeError, r"k: expected a numpy array like q, got a torch array", flashmux.attention, q, torch.from_numpy(k), v)


def test_not_an_array():
    q, k, v = qkv("numpy")
    expect(TypeError, r"q: expected a torch tensor, JAX array or NumPy array, got list", flashmux.attention, [1.0], k, v)


def test_mixed_devices():
    pytest.importorskip("torch")
    q, k, v = qkv("torch")
    expect(ValueError, r"k: expected it on q's device \(cpu\), got meta", flashmux.attention, q, k.to("meta"), v)


def _varlen(kind):
    q = make(kind, (6, 4, 8))
    k = make(kind, (9, 2, 8))
    v = make(kind, (9, 2, 8))
    return q, k, v


@pytest.mark.parametrize(
    "cu_q,cu_k,exc,pattern",
    [
        ([0, 2, 6], [0, 4, 9], None, None),
        ([1, 2, 6], [0, 4, 9], ValueError, r"cu_seqlens_q: expected to start at 0, got 1"),
        ([0, 4, 2, 6], [0, 4, 5, 9], ValueError, r"cu_seqlens_q: expected non-decreasing offsets, got \[0, 4, 2, 6\]"),
        ([0, 2, 5], [0, 4, 9], ValueError, r"cu_seqlens_q: expected to end at the row count 6, got 5"),
        ([0, 2, 6], [0, 4, 10], ValueError, r"cu_seqlens_k: expected to end at the row count 9, got 10"),
        ([0, 2, 6], [0, 9], ValueError, r"cu_seqlens_k: expected length 3 like cu_seqlens_q, got length 2"),
    ],
)
def test_cu_seqlens_values(kind, cu_q, cu_k, exc, pattern):
    q, k, v = _varlen(kind)
    if exc is None:
        out = flashmux.attention(q, k, v, cu_seqlens_q=ints(kind, cu_q), cu_seqlens_k=ints(kind, cu_k))
        assert tuple(out.shape) == (6, 4, 8)
    else:
        expect(exc, pattern, flashmux.attention, q, k, v, cu_seqlens_q=ints(kind, cu_q), cu_seqlens_k=ints(kind, cu_k))


def test_cu_seqlens_dtype(kind):
    q, k, v = _varlen(kind)
    cu64 = np.array([0, 2, 6], np.int64)
    if kind == "torch":
        import torch

        cu64 = torch.from_numpy(cu64)
    elif kind == "jax":
        import jax.numpy as jnp

        cu64 = jnp.asarray(cu64.astype(np.float32))  # int64 is off by default in JAX
    expect(TypeError, r"cu_seqlens_q: expected dtype int32, got (int64|float32)", flashmux.attention, q, k, v,
           cu_seqlens_q=cu64, cu_seqlens_k=ints(kind, [0, 4, 9]))


def test_cu_seqlens_only_one(kind):
    q, k, v = _varlen(kind)
    expect(ValueError, r"cu_seqlens_k: expected it too", flashmux.attention, q, k, v, cu_seqlens_q=ints(kind, [0, 6]))


def test_varlen_rank(kind):
    q, k, v = qkv(kind)
    expect(ValueError, r"q: expected rank 3 \(T, H, D\) with cu_seqlens", flashmux.attention, q, k, v,
           cu_seqlens_q=ints(kind, [0, 2]), cu_seqlens_k=ints(kind, [0, 2]))


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(window=(-1, 3)), ValueError, r"window: expected the left entry to be >= 0 or None, got -1"),
        (dict(window=(2, -4)), ValueError, r"window: expected the right entry to be >= 0 or None, got -4"),
        (dict(window=5), ValueError, r"window: expected None or a pair \(left, right\), got 5"),
        (dict(window=(1.5, 2)), TypeError, r"window: expected the left entry to be an int or None"),
        (dict(softcap=0.0), ValueError, r"softcap: expected a finite number > 0 or None, got 0.0"),
        (dict(softcap=-2), ValueError, r"softcap: expected a finite number > 0 or None, got -2"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a value in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p: expected a value in \[0, 1\), got -0.1"),
        (dict(scale=float("nan")), ValueError, r"scale: expected a finite number, got nan"),
        (dict(scale=float("inf")), ValueError, r"scale: expected a finite number, got inf"),
        (dict(scale="0.1"), TypeError, r"scale: expected a finite real number or None, got '0.1'"),
        (dict(causal="yes"), TypeError, r"causal: expected a bool, got 'yes'"),
        (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q: expected None without cu_seqlens, got 4"),
        (dict(backend="nope"), ValueError, r"backend: unknown backend 'nope' \(known: .*reference"),
        (dict(dropout_p=0.1, dropout_seed="x"), TypeError, r"dropout_seed: expected an int or None, got 'x'"),
    ],
)
def test_keyword_errors(kind, kw, exc, pattern):
    q, k, v = qkv(kind)
    expect(exc, pattern, flashmux.attention, q, k, v, **kw)


def test_jax_dropout_needs_seed():
    pytest.importorskip("jax")
    q, k, v = qkv("jax")
    expect(ValueError, r"dropout_seed: expected an int when dropout_p > 0 with JAX arrays", flashmux.attention,
           q, k, v, dropout_p=0.1)


def test_max_seqlen_too_small(kind):
    q, k, v = _varlen(kind)
    expect(ValueError, r"max_seqlen_q: expected >= the longest sequence \(4\), got 3", flashmux.attention, q, k, v,
           cu_seqlens_q=ints(kind, [0, 2, 6]), cu_seqlens_k=ints(kind, [0, 4, 9]), max_seqlen_q=3)


def test_messages_name_argument_expected_and_got(kind):
    q, k, v = qkv(kind)
    msg = expect(ValueError, "window", flashmux.attention, q, k, v, window=(-3, 0))
    assert re.search(r"expected .* got -3", msg)
