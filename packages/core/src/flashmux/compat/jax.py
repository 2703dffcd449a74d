"""`jax.nn.dot_product_attention` on flashmux.

    # from jax.nn import dot_product_attention
    from flashmux.compat.jax import dot_product_attention

Same layout ((B, T, N, H) or unbatched (T, N, H)), same semantics as jax's (checked against
jax 0.10's source): `is_causal` and `local_window_size` are aligned at the top-left corner
(query i sees keys i - left ... i + right; the call maps that onto flashmux's bottom-right masks),
`query_seq_lengths` / `key_value_seq_lengths` (int32 (B,)) keep the first L rows of each batch
entry and zero the padded query rows of the output. Works under jax.jit, grad and vmap (the
lengths may be traced): padded rows run as segments of a packed batch (cu_seqlens computed on
the device), no copies.

Differences and refusals (ValueError naming the argument):
- a query row with no allowed key (key_value_seq_lengths of 0) gives 0 here; jax gives the mean
  of the value rows;
- `bias` (additive) is refused; a boolean `mask` becomes a flashmux block mask, which must be
  built from a concrete array (refused under jit);
- with is_causal or a window, query and key lengths must be equal per row (the same array, or
  equal concrete values): other combinations have no exact flashmux mapping;
- `implementation`: None (or jax's "xla" / "cudnn", which let the dispatcher choose too), or a
  flashmux backend name to force ("reference", "pallas", ...).
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

import flashmux
from flashmux._arrays import is_traced

from ._align import top_left


def _window(local_window_size):
    if local_window_size is None:
        return None, None
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
        local_window_size = (int(local_window_size), int(local_window_size))
    if not isinstance(local_window_size, tuple | list) or len(local_window_size) != 2:
        raise ValueError(f"local_window_size: expected an int or a pair (left, right), got "
                         f"{local_window_size!r}")
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size: expected entries >= 0, got {local_window_size!r}")
    return left, right


def _lengths(name, x, b):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != (b,) or x.dtype != jnp.int32:
        raise ValueError(f"{name}: expected an int32 array of shape ({b},), got {x.dtype} "
                         f"{x.shape}")
    return x


def _cu(lengths, n, b):
    """cu_seqlens of 2B+1 entries: per batch row the L kept rows, then its n - L padding rows."""
    base = jnp.arange(b, dtype=jnp.int32) * n
    rows = jnp.stack([base, base + jnp.clip(lengths, 0, n)], axis=1).reshape(-1)
    return jnp.concatenate([rows, jnp.array([b * n], dtype=jnp.int32)])


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual=False):
    """query (B, T, N, H), key/value (B, S, K, H) -> (B, T, N, H); with return_residual also
    the log-sum-exp (B, T, N) in key's dtype, as jax returns it."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name}: expected rank 4 (B, T, N, H) or 3 (T, N, H), got shape "
                             f"{x.shape}")
    if bias is not None:
        raise ValueError("bias: additive biases are not supported by flashmux; pass None (a "
                         "boolean mask goes in `mask`, ALiBi in flashmux.attention(alibi_slopes=))")
    if implementation is not None and not isinstance(implementation, str):
        raise TypeError(f"implementation: expected None or a flashmux backend name, got "
                        f"{implementation!r}")
    if implementation in ("xla", "cudnn"):
        implementation = None  # jax's own names: code written for jax.nn passes them; dispatch
    if is_causal not in (True, False):
        raise TypeError(f"is_causal: expected a bool, got {is_causal!r}")
    b, sq, hq, _ = query.shape
    sk = key.shape[1]
    left, right = _window(local_window_size)
    lq = _lengths("query_seq_lengths", query_seq_lengths, b)
    lk = _lengths("key_value_seq_lengths", key_value_seq_lengths, b)
    kw = dict(scale=None if scale is None else float(scale), return_lse=bool(return_residual),
              backend=implementation)
    banded = is_causal or local_window_size is not None

    if mask is not None:
        kw["block_mask"] = _block_mask(mask, b, hq, sq, sk, query, is_causal, left, right)
    elif banded:
        # with lengths, the kept rows of each row are a segment of equal query and key count
        seg = lq is not None or lk is not None
        mapped = top_left(is_causal, left, right, sk if seg else sq, sk)
        if mapped is None:
            kw["block_mask"] = _block_mask(None, b, hq, sq, sk, query, is_causal, left, right)
        else:
            kw["causal"], kw["window"] = mapped

    if lq is None and lk is None:
        out = flashmux.attention(query, key, value, **kw)
        out, lse = out if return_residual else (out, None)
    else:
        if "block_mask" in kw:
            raise ValueError("query_seq_lengths/key_value_seq_lengths: not supported together "
                             "with a boolean mask or a top-left mask flashmux needs a block mask "
                             "for; fold the lengths into the mask")
        if banded:
            lq, lk = _equal_lengths(lq, lk, sq, sk, is_causal or right == 0)
        cu_q = _cu(lq if lq is not None else jnp.full((b,), sq, jnp.int32), sq, b)
        cu_k = _cu(lk if lk is not None else jnp.full((b,), sk, jnp.int32), sk, b)
        got = flashmux.attention(query.reshape(b * sq, hq, -1), key.reshape(b * sk, *key.shape[2:]),
                                 value.reshape(b * sk, *value.shape[2:]),
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                                 max_seqlen_k=sk, **kw)
        out, lse = got if return_residual else (got, None)
        out = out.reshape(b, sq, hq, -1)
        if lse is not None:
            lse = lse.reshape(hq, b, sq).transpose(1, 0, 2)  # (Hq, B*Sq) -> (B, Hq, Sq)
        if lq is not None:
            keep = jnp.arange(sq)[None, :] < lq[:, None]
            out = jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))
    if unbatched:
        out = out[0]
    if not return_residual:
        return out
    lse = jnp.transpose(lse, (0, 2, 1)).astype(key.dtype)  # (B, Hq, Sq) -> (B, T, N)
    return out, (lse[0] if unbatched else lse)


def _equal_lengths(lq, lk, sq, sk, causal_like):
    """With causal/window masks each kept segment must have as many queries as keys, so that
    top-left and bottom-right alignment agree inside it."""
    if sq != sk:
        raise ValueError(f"query_seq_lengths/key_value_seq_lengths: with is_causal or a window "
                         f"flashmux needs T == S, got T={sq}, S={sk}")
    if lk is None:
        # kept query rows i < L see keys j <= i < L only when nothing reaches right of i
        if not causal_like:
            raise ValueError("query_seq_lengths: with a window reaching right of the diagonal, "
                             "flashmux needs key_value_seq_lengths too (equal per row)")
        return lq, lq
    if lq is None:
        raise ValueError("key_value_seq_lengths: with is_causal or a window, flashmux needs "
                         "query_seq_lengths too (equal per row); jax keeps the padded query "
                         "rows, which have no exact flashmux mapping")
    if lq is lk:
        return lq, lk
    if is_traced(lq) or is_traced(lk):
        raise ValueError("query_seq_lengths/key_value_seq_lengths: with is_causal or a window "
                         "under jit, pass the same array for both (flashmux needs equal "
                         "lengths per row there)")
    if not np.array_equal(np.asarray(lq), np.asarray(lk)):
        raise ValueError(f"query_seq_lengths/key_value_seq_lengths: with is_causal or a window "
                         f"flashmux needs equal lengths per row, got {np.asarray(lq).tolist()} "
                         f"and {np.asarray(lk).tolist()}")
    return lq, lk


def _block_mask(mask, b, hq, sq, sk, like, is_causal, left, right):
    if is_traced(like) or (mask is not None and is_traced(mask)):
        raise ValueError(
            "mask: a boolean mask (or a top-left causal mask with T < S) becomes a flashmux "
            "block mask, which is built from concrete arrays outside jax.jit; build it with "
            "flashmux.create_block_mask and call flashmux.attention(..., block_mask=...)"
        )
    conds = []
    mb = mh = None
    if mask is not None:
        m = jnp.asarray(mask)
        if m.dtype != jnp.bool_:
            raise ValueError(f"mask: expected a boolean mask (True: take part), got {m.dtype}")
        while m.ndim < 4:
            m = m[None]
        mb = b if m.shape[0] != 1 else None
        mh = hq if m.shape[1] != 1 else None
        m = jnp.broadcast_to(m, (m.shape[0], m.shape[1], sq, sk))
        conds.append(lambda bi, hi, i, j: m[bi, hi, i, j])
    if is_causal:
        conds.append(lambda bi, hi, i, j: j <= i)
    if left is not None:
        conds.append(lambda bi, hi, i, j: (j >= i - left) & (j <= i + right))

    def fn(bi, hi, i, j):
        out = conds[0](bi, hi, i, j)
        for c in conds[1:]:
            out = out & c(bi, hi, i, j)
        return out

    return flashmux.create_block_mask(fn, mb, mh, sq, sk, like=like)


__all__ = ["dot_product_attention"]
