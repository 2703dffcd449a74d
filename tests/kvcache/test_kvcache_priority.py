"""The decode dispatcher's priority: `--priority-from` ranks attention_with_kvcache rows into the
table's "decode" entry (not attention's lists), and decode_order reads it per device class,
falling back to kvcache.DECODE_PRIORITY."""

from __future__ import annotations

import json
import os

import pytest

from flashmux import dispatch, kvcache
from flashmux.bench import priority

if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass only", allow_module_level=True)


def _rec(backend, tflops, kv, x, fw="torch"):
    point = {"group": "g", "x": x, "batch": 8, "head_dim": 128, "causal": True, "seqlen_q": 1,
             "seqlen_k": x, "dtype": "bf16", "kvcache": kv, "page_size": 16 if kv else 0}
    return {"family": "flashmux", "backend": backend, "framework": fw, "status": "ok",
            "tflops": tflops, "sweep": "decode", "mode": "fwd", "point": point, "dtype": "bf16"}


def test_kvcache_rows_rank_the_decode_table_only(tmp_path):
    results = []
    for x in (4096, 8192):
        results += [_rec("triton", 1.0, False, x), _rec("cuda", 2.0, False, x)]  # attention
        results += [_rec("triton", 3.0, True, x), _rec("cuda", 1.0, True, x)]  # kvcache
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"env": {"device_class": "sm90"}, "results": results}))
    out = tmp_path / "priority.json"
    table = priority.regenerate(src, out)
    assert table["sm90"]["torch"][:2] == ["cuda", "triton"]
    assert table["decode"]["sm90"]["torch"][:2] == ["triton", "cuda"]
    for cls, lists in table["sm90"].get("classes", {}).items():
        assert lists["torch"][:2] == ["cuda", "triton"], cls


def test_decode_order_reads_the_table_and_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"decode": {"sm90": {"torch": ["reference"]}}}))
    monkeypatch.setenv("FLASHMUX_PRIORITY_FILE", str(path))
    dispatch.clear_caches()
    try:
        base = dict(kind="torch", device_type="cuda", device_name="x", compute_capability=(9, 0),
                    dtype="bfloat16", batch=1, seqlen_q=1, seqlen_new=0, heads_q=8, heads_kv=8,
                    head_dim=64, head_dim_v=64, capacity=64, paged=False, page_size=0,
                    causal=False, window=False, softcap=False, alibi=False, return_lse=False,
                    num_splits=None, traced=False, requires_grad=False)
        spec = kvcache.DecodeSpec(**base)
        assert kvcache.decode_order(spec)[0].name == "reference"  # the table's sm90 list
        cpu = kvcache.DecodeSpec(**{**base, "device_type": "cpu", "compute_capability": None})
        assert kvcache.decode_order(cpu)[0].name == "reference"  # DECODE_PRIORITY["cpu"]
        sm80 = kvcache.DecodeSpec(**{**base, "compute_capability": (8, 0)})
        names = [b.name for b in kvcache.decode_order(sm80)]
        want = [n for n in kvcache.DECODE_PRIORITY["default"]["torch"] if n in names]
        assert [n for n in names if n in want] == want  # DECODE_PRIORITY["default"]
    finally:
        monkeypatch.delenv("FLASHMUX_PRIORITY_FILE")
        dispatch.clear_caches()
