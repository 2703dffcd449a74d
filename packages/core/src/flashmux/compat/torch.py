"""`torch.nn.functional.scaled_dot_product_attention` on flashmux.

    # from torch.nn.functional import scaled_dot_product_attention
    from flashmux.compat.torch import scaled_dot_product_attention

SDPA's layout ((B, H, S, D), or (H, S, D)) goes to flashmux as transposed views (no copy) and the
output comes back as a (B, H, Sq, Dv) view. SDPA's `is_causal` is aligned at the top-left corner
(query i sees keys j <= i even when Sq != Sk), flashmux's at the bottom-right: the call maps it
exactly, through a window when Sq > Sk and through a block mask when Sq < Sk. `enable_gqa` is
required for Hq != Hkv, as in torch. A boolean `attn_mask` (True: take part) becomes a
`flashmux.create_block_mask` block mask, built per call (outside torch.compile). Refused with a
ValueError: additive (float) masks, attn_mask together with is_causal (torch refuses it too).
"""

from __future__ import annotations

import numbers

import torch

import flashmux

from ._align import device_seed, top_left


def _block_mask(mask_fn, b, h, sq, sk, like):
    if torch.compiler.is_compiling():
        raise ValueError(
            "attn_mask: a boolean mask becomes a flashmux block mask, which is built outside "
            "torch.compile; build it once with flashmux.create_block_mask and call "
            "flashmux.attention(..., block_mask=...) in the compiled code"
        )
    return flashmux.create_block_mask(mask_fn, b, h, sq, sk, like=like)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv) -> (B, Hq, Sq, Dv)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name}: expected rank 4 (B, H, S, D) or 3 (H, S, D), got shape "
                             f"{tuple(x.shape)}")
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[None]
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"key: expected {hq} heads like query (or enable_gqa=True for grouped "
                         f"heads), got {hkv}")
    if is_causal not in (True, False):
        raise TypeError(f"is_causal: expected a bool, got {is_causal!r}")
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    kw = dict(scale=scale, dropout_p=dropout_p, **device_seed(q, dropout_p))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale: expected a float or None, got {scale!r}")

    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (torch refuses both "
                             "too), got a mask")
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise ValueError(
                f"attn_mask: expected a boolean mask (True: take part), got "
                f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}; additive float masks "
                f"are not supported by flashmux (ALiBi: flashmux.attention(alibi_slopes=...))"
            )
        m = attn_mask
        while m.dim() < 4:
            m = m[None]
        mb = b if m.shape[0] != 1 else None
        mh = hq if m.shape[1] != 1 else None
        m = m.expand(m.shape[0], m.shape[1], sq, sk)
        kw["block_mask"] = _block_mask(lambda bi, hi, i, j: m[bi, hi, i, j], mb, mh, sq, sk, q)
    elif is_causal:
        mapped = top_left(True, None, None, sq, sk)
        if mapped is None:  # Sq < Sk: top-left causal needs a mask of its own
            kw["block_mask"] = _block_mask(lambda bi, hi, i, j: j <= i, None, None, sq, sk, q)
        else:
            kw["causal"], kw["window"] = mapped
    out = flashmux.attention(q, k, v, **kw)
    out = out.transpose(1, 2)
    return out[0] if unbatched else out


__all__ = ["scaled_dot_product_attention"]
