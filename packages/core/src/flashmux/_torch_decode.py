"""PyTorch glue for KV-cache decoding: one custom op, ``flashmux::decode``, with a fake
implementation, so torch.compile(fullgraph=True) traces `attention_with_kvcache` without a
graph break. No autograd: decoding is inference only (the core declines inputs that require a
gradient). The op only reads the caches: the append happens before it, in plain torch ops.

Imported only when torch tensors reach `flashmux.attention_with_kvcache`.
"""

from __future__ import annotations

import torch

from . import dispatch
from .kvcache import DecodeParams

_NONE = -1  # sentinel for "unbounded" window sides and "backend chooses" num_splits


def _flat(p: DecodeParams):
    return (
        p.scale,
        p.causal,
        _NONE if p.window_left is None else p.window_left,
        _NONE if p.window_right is None else p.window_right,
        p.softcap or 0.0,
        p.alibi,
        _NONE if p.num_splits is None else p.num_splits,
        p.page_size,
        p.return_lse,
    )


def _params(scale, causal, wl, wr, softcap, alibi, num_splits, page_size, return_lse):
    return DecodeParams(
        scale=scale,
        causal=causal,
        window_left=None if wl == _NONE else wl,
        window_right=None if wr == _NONE else wr,
        softcap=softcap if softcap > 0 else None,
        alibi=alibi,
        num_splits=None if num_splits == _NONE else num_splits,
        page_size=page_size,
        return_lse=return_lse,
    )


@torch.library.custom_op("flashmux::decode", mutates_args=())
def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    block_table: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    backend: str,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi: bool,
    num_splits: int,
    page_size: int,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _params(scale, causal, window_left, window_right, softcap, alibi, num_splits, page_size,
                return_lse)
    return dispatch.get_backend(backend).decode(q, k_cache, v_cache, seqlens_k, block_table,
                                                alibi_slopes, p)


@decode.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, *rest):
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v_cache.shape[-1]))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


def run(backend: str, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes,
        p: DecodeParams):
    if torch.compiler.is_compiling():
        return decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, backend,
                      *_flat(p))
    return dispatch.get_backend(backend).decode(q, k_cache, v_cache, seqlens_k, block_table,
                                                alibi_slopes, p)
