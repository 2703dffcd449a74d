"""A compiled call that is a fresh process's first flashmux call checks each backend's
availability inside the torch.compile trace. Backends probe packages with calls dynamo may refuse
(importlib.util.find_spec under torch 2.11 failed test_triton_block_mask_under_torch_compile on the
H200); the dispatcher runs that first check eagerly, as a constant of the graph."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import dataclasses, torch, flashmux
from flashmux import dispatch
from flashmux.builtin import reference

calls = []

class Probe(type(reference.backend)):
    def availability(self):
        torch._dynamo.graph_break()  # untraceable under fullgraph=True; a no-op when run eagerly
        calls.append(1)
        return []

dispatch.register(Probe(name="probe", description="reference under another name",
                        capabilities=reference.backend.capabilities))
q, k, v = (torch.randn(1, 19, 2, 8, requires_grad=True) for _ in range(3))
f = torch.compile(lambda q, k, v: flashmux.attention(q, k, v, causal=True, backend="probe"),
                  fullgraph=True)
out = f(q, k, v)
out.sum().backward()
torch.testing.assert_close(out, flashmux.attention(q, k, v, causal=True, backend="reference"))
assert calls == [1], calls  # checked once, eagerly, then cached
print("ok")
"""


def test_first_availability_check_inside_a_fullgraph_trace():
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
