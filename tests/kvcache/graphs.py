"""CUDA-graph helpers of the decode GPU tests: capture `n` decode steps in one graph after a
warm-up call (compile, plan), and replay graphs with new device lengths. The tests then compare
the captured outputs with eager calls and with the float64 reference themselves."""

from __future__ import annotations


def capture(step, n=3):
    """(graph, outs): `step()` once eagerly, then `n` calls of it captured in one CUDA graph."""
    import torch

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [step() for _ in range(n)]
    return g, outs


def replay(graphs, lens, new):
    """Write the lengths `new` into the device tensor `lens`, replay every graph, synchronize."""
    import torch

    lens.copy_(torch.tensor(new, dtype=torch.int32, device=lens.device))
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()


def check_replay(step, lens, new, reference, tol):
    """Capture three `step()` calls in one graph, replay it with the lengths `new`: each captured
    output equals an eager call's (bitwise), and the last is within `tol` of `reference` (the
    float64 output for `new`)."""
    import numpy as np
    import torch

    g, outs = capture(step)
    replay([g], lens, new)
    eager = [step() for _ in range(3)]
    for o, e in zip(outs, eager):
        assert torch.equal(o, e)
    assert np.abs(outs[-1].float().cpu().numpy() - reference).max() < tol
