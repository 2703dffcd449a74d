"""FlashAttention's Python API (flash_attn 2.x, `flash_attn.flash_attn_interface`) on flashmux.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flashmux.compat.flash_attn import flash_attn_func, flash_attn_varlen_func

Same layouts (q (B, S, H, D), packed (T, H, D) with int32 cu_seqlens), same conventions:
`softmax_scale` (None: 1/sqrt(D)), `causal` aligned bottom-right, `window_size=(left, right)` with
-1 for unbounded, `softcap=0.0` for none, `dropout_p` (torch tensors: the seed is drawn on q's
device from torch's generator, as FlashAttention does, and passed as a tensor: no host read, no
graph break), `deterministic`, `alibi_slopes` ((H,) or (B, H) float32). Any array kind
flashmux takes works (torch, JAX, NumPy), not only torch.

Refused with an error: `return_attn_probs=True` (flashmux never materializes probabilities; use
`flashmux.attention(..., return_lse=True)` for the log-sum-exp), paged `block_table` in the varlen
call, and in flash_attn_with_kvcache the rotary embedding, `cache_batch_idx` and `cache_leftpad`.
"""

from __future__ import annotations

import numbers

import flashmux

from ._align import device_seed


def _window(window_size):
    if window_size is None:
        return None
    if not isinstance(window_size, tuple | list) or len(window_size) != 2:
        raise ValueError(f"window_size: expected a pair (left, right) with -1 for unbounded, "
                         f"got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size: expected the {side} entry to be an int, got {w!r}")
        if w < -1:
            raise ValueError(f"window_size: expected the {side} entry >= -1 (-1: unbounded), "
                             f"got {w}")
        out.append(None if w == -1 else int(w))
    return None if out == [None, None] else tuple(out)


def _softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float (0.0 for none), got {softcap!r}")
    if softcap < 0:
        raise ValueError(f"softcap: expected >= 0 (0.0 for none), got {softcap}")
    return float(softcap) if softcap > 0 else None


def _common(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs):
    if return_attn_probs:
        raise ValueError(
            "return_attn_probs: flashmux never materializes the attention probabilities; pass "
            "False (for the log-sum-exp call flashmux.attention(..., return_lse=True))"
        )
    kw = dict(
        causal=causal,
        scale=softmax_scale,
        window=_window(window_size),
        softcap=_softcap(softcap),
        dropout_p=dropout_p,
        deterministic=deterministic,
    )
    if alibi_slopes is not None:
        if "alibi_slopes" not in (flashmux.attention.__kwdefaults__ or {}):
            raise ValueError("alibi_slopes: this flashmux version has no ALiBi; pass None")
        kw["alibi_slopes"] = alibi_slopes
    return kw


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv)."""
    kw = _common(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic, return_attn_probs)
    return flashmux.attention(q, k, v, **kw, **device_seed(q, dropout_p))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D/Dv), cu_seqlens int32 (B+1,) -> out (Tq, Hq, Dv)."""
    if block_table is not None:
        raise ValueError("block_table: paged keys are not supported by flash_attn_varlen_func on "
                         "flashmux; use flash_attn_with_kvcache (flashmux.attention_with_kvcache)")
    kw = _common(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic, return_attn_probs) | device_seed(q, dropout_p)
    return flashmux.attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              max_seqlen_q=_hint(max_seqlen_q, "max_seqlen_q"),
                              max_seqlen_k=_hint(max_seqlen_k, "max_seqlen_k"), **kw)


def _hint(m, name):
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {m!r}")
    return int(m)


def _split(packed, n, axis, name):
    if len(packed.shape) <= axis or packed.shape[axis] != n:
        raise ValueError(f"{name}: expected {n} along axis {axis}, got shape "
                         f"{tuple(packed.shape)}")
    index = [slice(None)] * len(packed.shape)
    parts = []
    for i in range(n):
        index[axis] = i
        parts.append(packed[tuple(index)])  # views for torch and NumPy
    return parts


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv (B, S, 3, H, D) -> out (B, S, H, D)."""
    if len(qkv.shape) != 5:
        raise ValueError(f"qkv: expected rank 5 (B, S, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = _split(qkv, 3, 2, "qkv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> out (B, Sq, Hq, D)."""
    if len(kv.shape) != 5:
        raise ValueError(f"kv: expected rank 5 (B, S, 2, H, D), got shape {tuple(kv.shape)}")
    k, v = _split(kv, 2, 2, "kv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (T, 3, H, D), cu_seqlens int32 (B+1,) -> out (T, H, D)."""
    if len(qkv.shape) != 4:
        raise ValueError(f"qkv: expected rank 4 (T, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = _split(qkv, 3, 1, "qkv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """q (Tq, Hq, D), kv (Tk, 2, Hkv, D) -> out (Tq, Hq, D)."""
    if len(kv.shape) != 4:
        raise ValueError(f"kv: expected rank 4 (T, 2, H, D), got shape {tuple(kv.shape)}")
    k, v = _split(kv, 2, 1, "kv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Decoding against a KV cache (torch tensors: k, v are appended to the caches in place).
    q (B, Sq, Hq, D); k_cache/v_cache (B, S_max, Hkv, D) or paged (pages, page_size, Hkv, D) with
    block_table; cache_seqlens an int or (B,) int32. Returns out, or (out, lse) with
    return_softmax_lse."""
    for name, val in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                      ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if val is not None:
            raise ValueError(f"{name}: not supported by flashmux's flash_attn_with_kvcache; pass "
                             f"None (apply rotary embeddings before the call)")
    if not hasattr(flashmux, "attention_with_kvcache"):
        raise ValueError("flash_attn_with_kvcache: this flashmux version has no "
                         "attention_with_kvcache")
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both or neither, got only one")
    if k is not None and type(q).__module__.split(".")[0] != "torch":
        raise TypeError("k, v: appending to the cache in place needs torch tensors; with JAX "
                        "arrays call flashmux.attention_with_kvcache, which returns the new caches")
    batch = q.shape[0]
    if cache_seqlens is None:
        cache_seqlens = k_cache.shape[1] if block_table is None else None
        if cache_seqlens is None:
            raise ValueError("cache_seqlens: expected it with a paged cache (block_table), got None")
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = _full_int32(q, batch, int(cache_seqlens))
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits: expected an int (0: automatic), got {num_splits!r}")
    got = flashmux.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, k=k, v=v, block_table=block_table,
        causal=causal, scale=softmax_scale, window=_window(window_size), softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes, return_lse=bool(return_softmax_lse),
        num_splits=None if num_splits <= 0 else int(num_splits),
    )
    if k is not None:
        got = got[:-2]  # the caches, updated in place
        got = got[0] if len(got) == 1 else got
    return tuple(got) if isinstance(got, tuple) else got


def _full_int32(like, n, value):
    mod = type(like).__module__.split(".")[0]
    if mod == "torch":
        import torch

        return torch.full((n,), value, dtype=torch.int32, device=like.device)
    if mod.startswith("jax"):
        import jax.numpy as jnp

        return jnp.full((n,), value, dtype=jnp.int32)
    import numpy as np

    return np.full((n,), value, dtype=np.int32)


__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
