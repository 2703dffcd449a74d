"""The priority table by problem class (issue 14): regenerated from a results JSON, it ranks the
fastest correct backend of each class first, and the dispatcher uses it, falling back to the
device class's list for a class the table does not have."""

from __future__ import annotations

import json

import pytest

from flashmux import dispatch
from flashmux.backend import Backend, Capabilities
from flashmux.bench.priority import regenerate, result_class
from flashmux.spec import ProblemSpec


def _rec(backend, head_dim, causal, mode, tflops, status="ok", sq=4096, sk=4096, fw="torch"):
    return {
        "impl": f"flashmux-{backend}[{fw}]", "framework": fw, "family": "flashmux",
        "backend": backend, "sweep": "papers", "mode": mode, "dtype": "bf16", "status": status,
        "tflops": tflops,
        "point": {"sweep": "papers", "batch": 2, "seqlen_q": sq, "seqlen_k": sk, "heads_q": 16,
                  "heads_kv": 16, "head_dim": head_dim, "causal": causal, "dtype": "bf16",
                  "x": sk, "group": f"hd{head_dim}"},
    }


# d64 inference: fa fastest; d256 training: fb fastest, fa's faster number is wrong (ignored);
# decode (Sq=1): fc fastest
RESULTS = [
    _rec("fa", 64, False, "fwd", 300.0), _rec("fb", 64, False, "fwd", 200.0),
    _rec("fc", 64, False, "fwd", 100.0), _rec("reference", 64, False, "fwd", 1.0),
    _rec("fa", 256, True, "fwd_bwd", 500.0, status="wrong"), _rec("fb", 256, True, "fwd_bwd", 150.0),
    _rec("fc", 256, True, "fwd_bwd", 120.0), _rec("fa", 256, True, "fwd_bwd", 100.0, sq=8192, sk=8192),
    _rec("fb", 256, True, "fwd_bwd", 200.0, sq=8192, sk=8192),
    _rec("fc", 64, True, "fwd", 3.0, sq=1, sk=8192), _rec("fa", 64, True, "fwd", 1.0, sq=1, sk=8192),
]


def _spec(head_dim, causal, grad, sq=4096, sk=4096, dtype="bfloat16"):
    return ProblemSpec(
        kind="torch", device_type="cuda", device_name="H200", compute_capability=(9, 0),
        dtype=dtype, batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=16, heads_kv=16,
        head_dim=head_dim, head_dim_v=head_dim, varlen=False, causal=causal, window=False,
        softcap=False, dropout=False, return_lse=False, deterministic=False, requires_grad=grad,
        traced=False,
    )


@pytest.fixture
def table(tmp_path, monkeypatch):
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"env": {"device_class": "sm90"}, "results": RESULTS}))
    out = tmp_path / "priority.json"
    out.write_text(json.dumps({"default": {"torch": ["fc", "reference"]}}))
    t = regenerate(res, out)
    monkeypatch.setenv("FLASHMUX_PRIORITY_FILE", str(out))
    dispatch.clear_caches()
    for name in ("fa", "fb", "fc"):
        dispatch.register(Backend(name=name, capabilities=Capabilities(
            frozenset({"torch"}), frozenset({"cuda"}), frozenset({"bfloat16"}), priority=50)))
    yield t
    monkeypatch.delenv("FLASHMUX_PRIORITY_FILE")
    dispatch.clear_caches()


def test_classes_of_results():
    assert result_class(RESULTS[0]) == "d64-full-infer-prefill-16bit"
    assert result_class(RESULTS[5]) == "d256-causal-train-prefill-16bit"
    assert result_class(RESULTS[-1]) == "d64-causal-infer-decode-16bit"
    assert dispatch.spec_class(_spec(256, True, True)) == "d256-causal-train-prefill-16bit"
    assert dispatch.spec_class(_spec(80, False, False, 2, 4096, "float32")) == (
        "d128-full-infer-decode-fp32")


def test_table_ranks_fastest_correct_per_class(table):
    cls = table["sm90"]["classes"]
    assert cls["d64-full-infer-prefill-16bit"]["torch"][:3] == ["fa", "fb", "fc"]
    # fa's 500 TFLOP/s at S=4096 was wrong: fb is fastest where fa ran correctly (S=8192)
    assert cls["d256-causal-train-prefill-16bit"]["torch"][0] == "fb"
    assert cls["d64-causal-infer-decode-16bit"]["torch"][0] == "fc"
    for c in cls.values():
        assert c["torch"][-1] == "reference"


def test_dispatcher_uses_class_then_device_list(table):
    def first(spec):
        return [b.name for b in dispatch.ordered(spec) if b.name in ("fa", "fb", "fc")][0]

    assert first(_spec(64, False, False)) == "fa"
    assert first(_spec(256, True, True)) == "fb"
    assert first(_spec(64, True, False, sq=1, sk=8192)) == "fc"
    # no d128 class in the table: the device class's overall list
    overall = table["sm90"]["torch"]
    assert first(_spec(128, False, True)) == [n for n in overall if n in ("fa", "fb", "fc")][0]
