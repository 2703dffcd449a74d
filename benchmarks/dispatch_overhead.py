"""How much a cached dispatch costs: argument checks + cache lookup, and a whole call through a
no-op backend (which adds the framework glue: torch custom op / autograd, jax.custom_vjp).

    python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import numpy as np

import flashmux
from flashmux import api, dispatch
from flashmux.backend import Backend, Capabilities


class NoOp(Backend):
    """Returns preallocated outputs: whatever the call costs is dispatch and glue."""

    def forward(self, q, k, v, cu_q, cu_k, p):
        return self.out, self.lse


def per_call_us(fn, n=20000, repeats=5) -> float:
    for _ in range(200):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main():
    rng = np.random.default_rng()
    shape = (2, 128, 8, 64)
    rows = []
    kinds = ["numpy"] + [k for k in ("torch",) if importlib.util.find_spec(k)]
    for kind in kinds:
        if kind == "numpy":
            q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
            out, lse = np.empty(shape, np.float32), np.empty((2, 8, 128), np.float32)
        else:
            import torch

            q, k, v = (torch.randn(shape) for _ in range(3))
            out, lse = torch.empty(shape), torch.empty((2, 8, 128))
        noop = NoOp(
            name="noop",
            capabilities=Capabilities(
                array_kinds=frozenset({kind}), devices=frozenset({"cpu"}),
                dtypes=frozenset({"float32"}), priority=0,
            ),
        )
        noop.out, noop.lse = out, lse
        flashmux.register(noop)
        call = api._resolve(q, k, v, True, None, None, None, 0.0, None, None, None, None, None, False, False)
        select = per_call_us(lambda call=call: dispatch.select(call.spec, ("noop",)))
        resolve = per_call_us(
            lambda: dispatch.select(
                api._resolve(q, k, v, True, None, None, None, 0.0, None, None, None, None, None, False, False).spec,
                dispatch.forced_backends("noop"),
            )
        )
        whole = per_call_us(lambda: flashmux.attention(q, k, v, causal=True, backend="noop"), n=5000)
        rows.append((kind, select, resolve, whole))
        del dispatch.registry()["noop"]
        dispatch.clear_caches()
    print("cached dispatch overhead, median microseconds per call (this CPU)")
    print(f"{'arrays':8s} {'decision cache':>15s} {'first-call checks':>18s} {'repeat call, no-op backend':>27s}")
    for kind, a, b, c in rows:
        print(f"{kind:8s} {a:15.2f} {b:18.2f} {c:27.2f}")


if __name__ == "__main__":
    main()
