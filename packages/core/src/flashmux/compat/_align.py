"""Top-left mask alignment (torch SDPA, jax.nn.dot_product_attention) in flashmux's
bottom-right terms."""

from __future__ import annotations


def device_seed(q, dropout_p):
    """{"dropout_seed": ...} for a torch call with dropout: a seed tensor drawn on q's device from
    torch's generator for that device (as FlashAttention and SDPA draw from the CUDA generator),
    so the call reads nothing on the host and torch.compile traces it without a graph break.
    Empty for other array kinds or without dropout (flashmux then draws or requires the seed)."""
    if not dropout_p or type(q).__module__.split(".")[0] != "torch":
        return {}
    import torch

    return {"dropout_seed": torch.randint(0, 2**31 - 1, (), device=q.device)}


def top_left(causal: bool, left, right, sq: int, sk: int):
    """(causal, window) for `flashmux.attention` that allow exactly the keys j of query i with
    i - left <= j <= i + right (None: unbounded; causal: right = min(right, 0)), aligned at the
    top-left corner as SDPA and jax.nn do, or None when no such window exists (it would need a
    negative entry: a block mask must say it)."""
    if causal:
        right = 0 if right is None else min(right, 0)
    off = sk - sq  # flashmux measures from i + off
    if off == 0:
        if right == 0 and causal:
            return True, (None if left is None else (left, None))
        return False, (None if left is None and right is None else (left, right))
    wl = None if left is None else left + off
    wr = None if right is None else right - off
    if (wl is not None and wl < 0) or (wr is not None and wr < 0):
        return None
    return False, (None if wl is None and wr is None else (wl, wr))
