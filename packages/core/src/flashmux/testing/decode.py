"""A ready-made `kvcache.DecodeSpec` for backend tests of `decode_reasons` / split choices."""

from __future__ import annotations

from dataclasses import replace

from ..kvcache import DecodeSpec


def decode_spec(**overrides) -> DecodeSpec:
    """The decode benchmark's problem (H200, bf16, B=8, Hq=32, Hkv=8, D=128, one new token
    against a 4096-token contiguous cache, causal), with `overrides` replacing any field."""
    base = DecodeSpec(
        kind="torch",
        device_type="cuda",
        device_name="NVIDIA H200",
        compute_capability=(9, 0),
        dtype="bfloat16",
        batch=8,
        seqlen_q=1,
        seqlen_new=1,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        head_dim_v=128,
        capacity=4096,
        paged=False,
        page_size=0,
        causal=True,
        window=False,
        softcap=False,
        alibi=False,
        return_lse=False,
        num_splits=None,
        traced=False,
        requires_grad=False,
    )
    return replace(base, **overrides)
