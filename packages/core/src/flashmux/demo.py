"""`python -m flashmux demo`: one realistic attention call, end to end.

It picks torch (else JAX, else NumPy), a GPU if there is one, builds random inputs of a realistic
shape, prints what the dispatcher decides and why, runs forward (and backward where the framework
has autograd), checks the result against the float64 reference on a slice, and times it against the
framework's own attention.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Any

import numpy as np

from . import api
from .reference import reference_backward, reference_forward


def _median_ms(fn, sync, warmup=2, reps=7) -> float:
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _pick_kind(requested: str | None) -> str:
    if requested:
        return requested
    for k in ("torch", "jax"):
        if importlib.util.find_spec(k) is not None:
            return k
    return "numpy"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmux demo")
    ap.add_argument("--framework", choices=["torch", "jax", "numpy"], default=None)
    ap.add_argument("--backend", default=None, help="force a backend (default: the dispatcher's choice)")
    ap.add_argument("--seqlen", type=int, default=None)
    args = ap.parse_args(argv)
    kind = _pick_kind(args.framework)
    rng = np.random.default_rng()

    gpu = False
    if kind == "torch":
        import torch

        gpu = torch.cuda.is_available()
    elif kind == "jax":
        import jax

        gpu = jax.default_backend() == "gpu"
    # A GPU gets a training-sized call; a CPU a smaller one of the same form.
    b, h, d = (4, 16, 128) if gpu else (1, 8, 64)
    s = args.seqlen or (4096 if gpu else 1024)
    dtype = "bfloat16" if gpu else "float32"
    print(f"flashmux demo: {kind} {dtype} on {'GPU' if gpu else 'CPU'}, causal, "
          f"q/k/v (B={b}, S={s}, H={h}, D={d})")
    q64, k64, v64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(4))
    q: Any  # a torch tensor, JAX array or NumPy array, by kind
    k: Any
    v: Any
    do: Any

    if kind == "torch":
        import torch

        dev = "cuda" if gpu else "cpu"
        dt = getattr(torch, dtype)
        q, k, v, do = (torch.from_numpy(x).to(dev, dt).requires_grad_(True) for x in (q64, k64, v64, do64))
        do.requires_grad_(False)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        print(api.explain(q, k, v, causal=True, backend=args.backend))
        out = api.attention(q, k, v, causal=True, backend=args.backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)

        def to64(x):
            return x.detach().double().cpu().numpy()

        def ours():
            o = api.attention(q, k, v, causal=True, backend=args.backend)
            torch.autograd.grad(o, (q, k, v), do)

        def theirs():
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            torch.autograd.grad(o, (q, k, v), do.transpose(1, 2))

        their_name = "torch.nn.functional.scaled_dot_product_attention"
        res = [to64(x) for x in (out, dq, dk, dv)]
        inputs = [to64(x) for x in (q, k, v, do)]
    elif kind == "jax":
        import jax
        import jax.numpy as jnp

        dt = getattr(jnp, dtype)
        q, k, v, do = (jnp.asarray(x, dt) for x in (q64, k64, v64, do64))
        print(api.explain(q, k, v, causal=True, backend=args.backend))

        @jax.jit
        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(lambda q, k, v: api.attention(q, k, v, causal=True, backend=args.backend), q, k, v)
            return (o,) + vjp(do)

        @jax.jit
        def theirs_fn(q, k, v, do):
            o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, k, v)
            return (o,) + vjp(do)

        res = [np.asarray(x, np.float64) for x in fwd_bwd(q, k, v, do)]
        inputs = [np.asarray(x, np.float64) for x in (q, k, v, do)]

        def sync():
            pass

        def ours():
            jax.block_until_ready(fwd_bwd(q, k, v, do))

        def theirs():
            jax.block_until_ready(theirs_fn(q, k, v, do))

        their_name = "jax.nn.dot_product_attention"
    else:
        q, k, v = (x.astype(np.float32) for x in (q64, k64, v64))
        print(api.explain(q, k, v, causal=True, backend=args.backend))
        res = [api.attention(q, k, v, causal=True, backend=args.backend).astype(np.float64)]
        inputs = [x.astype(np.float64) for x in (q, k, v)] + [do64]

        def sync():
            pass

        def ours():
            api.attention(q, k, v, causal=True, backend=args.backend)

        def theirs():
            sc = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
            sc = np.where(np.tril(np.ones((s, s), bool)), sc, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)

        their_name = "plain NumPy attention (forward)"

    # check on a slice (first batch entry, first two heads): heads are independent
    sl = (slice(0, 1), slice(None), slice(0, 2))
    qi, ki, vi, doi = (x[sl] for x in inputs)
    ref = [reference_forward(qi, ki, vi, causal=True)[0]]
    if len(res) > 1:
        ref += list(reference_backward(doi, qi, ki, vi, causal=True))
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    worst = 0.0
    for name, got, want in zip(("out", "dq", "dk", "dv"), res, ref):
        err = float(np.abs(got[sl] - want).max() / max(np.abs(want).max(), 1e-6))
        worst = max(worst, err)
        print(f"  {name}: max error vs float64 reference {err:.2e} (relative to max |ref|)")
    ok = worst < tol
    print(f"check: {'PASS' if ok else 'FAIL'} (tolerance {tol:g})")

    mode = "forward+backward" if len(res) > 1 else "forward"
    t_ours = _median_ms(ours, sync)
    t_theirs = _median_ms(theirs, sync)
    flops = 4 * b * h * s * s * d / 2 * (3.5 if len(res) > 1 else 1.0)
    def rate(ms):
        r = flops / (ms * 1e-3)
        return f"{r / 1e12:.1f} TFLOP/s" if r >= 1e12 else f"{r / 1e9:.1f} GFLOP/s"

    print(f"time ({mode}, median): flashmux {t_ours:.2f} ms ({rate(t_ours)}), "
          f"{their_name} {t_theirs:.2f} ms ({rate(t_theirs)})")
    return 0 if ok else 1
