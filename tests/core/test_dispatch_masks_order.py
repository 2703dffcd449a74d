"""Torch prefill calls with a block mask or ALiBi slopes try Triton before CUDA, even in classes whose
table ranks CUDA first (measured without masks); other calls keep the table's order."""

from __future__ import annotations

import dataclasses

from flashmux import dispatch
from flashmux.spec import ProblemSpec


def _spec(**kw):
    base = ProblemSpec(
        kind="torch", device_type="cuda", device_name="H200", compute_capability=(9, 0),
        dtype="bfloat16", batch=2, seqlen_q=4096, seqlen_k=4096, heads_q=16, heads_kv=16,
        head_dim=128, head_dim_v=128, varlen=False, causal=False, window=False,
        softcap=False, dropout=False, return_lse=False, deterministic=False,
        requires_grad=False, traced=False,
    )
    return dataclasses.replace(base, **kw)


def _names(spec):
    return [b.name for b in dispatch.ordered(spec) if b.name in ("triton", "cuda")]


def test_masks_and_alibi_put_triton_before_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "priority_table", lambda: {
        "sm90": {"classes": {"d128-full-infer-prefill-16bit": {
            "torch": ["native", "cuda", "triton", "reference"],
            "jax": ["pallas", "cuda", "triton"]}}}})
    assert _names(_spec()) == ["cuda", "triton"]  # the table's order without masks
    assert _names(_spec(block_mask=True)) == ["triton", "cuda"]
    assert _names(_spec(alibi=True)) == ["triton", "cuda"]
    assert _names(_spec(kind="jax", block_mask=True)) == ["cuda", "triton"]  # torch only
    # decode (Sq <= 16 against >= 4x the keys) keeps its class order
    monkeypatch.setattr(dispatch, "priority_table", lambda: {
        "sm90": {"classes": {"d128-full-infer-decode-16bit": {"torch": ["cuda", "triton"]}}}})
    assert _names(_spec(alibi=True, seqlen_q=1)) == ["cuda", "triton"]
    assert dispatch._triton_before_cuda(["triton", "cuda"]) == ["triton", "cuda"]
    assert dispatch._triton_before_cuda(["native", "cuda", "reference"]) == [
        "native", "cuda", "reference"]
