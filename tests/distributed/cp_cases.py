"""Context-parallel test cases, their inputs, and the judge (shared by the workers and the tests).

A worker (torch_worker.py under torchrun / spawned ranks, jax_worker.py on a device mesh) runs
flashmux.ring_attention on its shards of the global inputs drawn here and saves each rank's out,
lse, dq, dk, dv; `judge` reassembles them with flashmux.unshard_sequence and applies the SPEC
rule against the NumPy float64 reference: error <= 2 * error(plain attention in the same
framework and precision) + 1e-5, for out, lse, dq, dk and dv.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

import flashmux
from flashmux.reference import reference_backward, reference_forward

HERE = os.path.dirname(os.path.abspath(__file__))
ATOL = 1e-5


@dataclass(frozen=True)
class CPCase:
    world: int = 2
    layout: str = "zigzag"
    variant: str = "ring"
    causal: bool = True
    batch: int = 2
    seqlen: int = 32
    heads_q: int = 4
    heads_kv: int = 4
    head_dim: int = 16
    dtype: str = "float32"
    softcap: float | None = None
    scale: float | None = None
    return_lse: bool = True
    lse_grad: bool = False
    backend: str | None = None  # forced backend for every block (None: the dispatcher's pick)
    seed: int = 0

    def id(self) -> str:
        parts = [f"P{self.world}", self.layout, self.variant, self.dtype,
                 f"b{self.batch}s{self.seqlen}h{self.heads_q}x{self.heads_kv}d{self.head_dim}"]
        for flag, name in ((self.causal, "causal"), (self.lse_grad, "lsegrad"),
                           (not self.return_lse, "nolse")):
            if flag:
                parts.append(name)
        if self.softcap:
            parts.append(f"cap{self.softcap}")
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        if self.backend:
            parts.append(self.backend)
        return "-".join(parts)


def save_cases(cases, path):
    with open(path, "w") as f:
        json.dump([asdict(c) for c in cases], f)


def load_cases(path):
    with open(path) as f:
        return [CPCase(**d) for d in json.load(f)]


def global_inputs(case: CPCase):
    """q, k, v, do (float64) and dlse (float32 values), the same on every rank."""
    rng = np.random.default_rng(case.seed)
    b, s = case.batch, case.seqlen
    q = rng.standard_normal((b, s, case.heads_q, case.head_dim))
    k = rng.standard_normal((b, s, case.heads_kv, case.head_dim))
    v = rng.standard_normal((b, s, case.heads_kv, case.head_dim))
    do = rng.standard_normal((b, s, case.heads_q, case.head_dim))
    dlse = rng.standard_normal((b, case.heads_q, s))
    return q, k, v, do, dlse


def result_path(out_dir, case_index, rank):
    return os.path.join(out_dir, f"case{case_index}_rank{rank}.npz")


def _framework(kind):
    sys.path.insert(0, os.path.join(HERE, "..", "conformance"))
    import harness  # the conformance suite's plain attention and error measure

    return harness, harness.Framework(kind, harness.default_device(kind))


def judge(case: CPCase, kind: str, out_dir: str, case_index: int) -> list[str]:
    """Judge one case from the ranks' saved shards; returns failure lines (empty: passed)."""
    harness, fw = _framework(kind)
    shards = [np.load(result_path(out_dir, case_index, r)) for r in range(case.world)]
    got = {}
    for name in shards[0].files:
        dim = 2 if name == "lse" else 1
        got[name] = flashmux.unshard_sequence([s[name] for s in shards], case.layout, dim=dim)

    q64, k64, v64, do64, dlse64 = global_inputs(case)
    q, k, v = (fw.array(x, case.dtype) for x in (q64, k64, v64))
    q64, k64, v64 = (fw.numpy(x) for x in (q, k, v))
    do = fw.array(do64, case.dtype)
    do64 = fw.numpy(do)
    dlse = None
    if case.lse_grad:
        dlse = fw.array(dlse64.astype(np.float32), "float32")
        dlse64 = dlse64.astype(np.float32).astype(np.float64)
    rkw = dict(causal=case.causal, softcap=case.softcap, scale=case.scale)
    ref = {}
    ref["out"], ref["lse"] = reference_forward(q64, k64, v64, **rkw)
    ref["dq"], ref["dk"], ref["dv"] = reference_backward(
        do64, q64, k64, v64, dlse=dlse64 if case.lse_grad else None, **rkw
    )
    hc = harness.Case(
        batch=case.batch, seqlen_q=case.seqlen, seqlen_k=case.seqlen, heads_q=case.heads_q,
        heads_kv=case.heads_kv, head_dim=case.head_dim, causal=case.causal,
        softcap=case.softcap, dtype=case.dtype, lse_grad=case.lse_grad, scale=case.scale,
    )
    plain = fw.plain(q, k, v, hc, None, None, None, do, dlse)
    bad = []
    for name, p in zip(["out", "lse", "dq", "dk", "dv"], plain):
        if name not in got:
            continue
        e_b = harness.max_err(got[name], ref[name])
        e_p = harness.max_err(p, ref[name])
        bound = 2 * e_p + ATOL
        if not e_b <= bound:
            bad.append(f"{name}: ring {e_b:.3g} > bound {bound:.3g} (plain {e_p:.3g})")
    return bad
