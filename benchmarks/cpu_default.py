"""flashmux's CPU defaults against torch's own CPU attention, in one run (issue 14).

    python benchmarks/cpu_default.py                       # S 1k-16k, forward; fwd+bwd up to 4k
    python benchmarks/cpu_default.py --seqlens 1024,2048 --modes fwd,fwd_bwd --memory
    python benchmarks/cpu_default.py --json cpu_default.json

float32, B=1, H=8, D=64, causal and not. Rows: torch SDPA (torch.nn.functional.
scaled_dot_product_attention, its CPU flash kernel), and flashmux.attention with no backend named
on torch tensors, NumPy arrays and JAX arrays (under jax.jit; fwd_bwd = jax.grad), each taking
whatever the dispatcher picks (printed). Speed is SDPA's time / the default's time; the bars:
torch >= 0.9, NumPy and JAX >= 0.5. NumPy has no autograd: its fwd_bwd row times the backend's
forward + backward directly. --memory runs every measurement in a fresh process and reports its
peak resident memory (ru_maxrss, which includes the framework's own import footprint).

Timings are medians of --repeats calls after one warm-up, the implementations of a row timed in
turn within each repeat (--no-interleave: back to back); spread = (max - min) / median of an
implementation's repeats. On a machine whose cores are shared
(load above the core count), multi-threaded BLAS/OpenMP spin-waits distort small-kernel workloads
badly: the script prints the load average and thread settings next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

B, H, D = 1, 8, 64
IMPLS = ("sdpa", "torch", "numpy", "jax")
BARS = {"torch": 0.9, "numpy": 0.5, "jax": 0.5}


def _inputs(s: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, s, H, D), dtype=np.float32) for _ in range(3)]


def _callable(impl: str, s: int, causal: bool, mode: str):
    """(fn, backend name): fn() runs one call and waits for it."""
    import flashmux

    q, k, v = _inputs(s)
    grad = mode == "fwd_bwd"
    if impl in ("sdpa", "torch"):
        import torch

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        if impl == "sdpa":  # its own layout (B, H, S, D)
            tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (tq, tk, tv))
        for x in (tq, tk, tv):
            x.requires_grad_(grad)

        def run():
            if impl == "sdpa":
                o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            else:
                o = flashmux.attention(tq, tk, tv, causal=causal)
            if grad:
                o.sum().backward()

        name = "sdpa" if impl == "sdpa" else flashmux.explain(tq, tk, tv, causal=causal).chosen
        return run, name
    if impl == "numpy":
        name = flashmux.explain(q, k, v, causal=causal).chosen
        if not grad:
            return (lambda: flashmux.attention(q, k, v, causal=causal)), name
        from flashmux import dispatch
        from flashmux.spec import Params, default_scale

        be = dispatch.get_backend(name)
        p = Params(scale=default_scale(D), causal=causal, window_right=0 if causal else None)
        do = _inputs(s, 1)[0]

        def run_np():
            out, lse = be.forward(q, k, v, None, None, p)
            be.backward(do, None, q, k, v, out, lse, None, None, p)

        return run_np, name
    import jax
    import jax.numpy as jnp

    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    name = flashmux.explain(jq, jk, jv, causal=causal).chosen
    if grad:
        f = jax.jit(jax.grad(lambda q, k, v: flashmux.attention(q, k, v, causal=causal).sum(),
                             argnums=(0, 1, 2)))
        return (lambda: jax.block_until_ready(f(jq, jk, jv))), name
    f = jax.jit(lambda q, k, v: flashmux.attention(q, k, v, causal=causal))
    return (lambda: f(jq, jk, jv).block_until_ready()), name


STAT = "median"  # --stat: what "ms" (and the speed ratio) is, of the repeats' times


def _record(impl, name, s, causal, mode, ts) -> dict:
    med = statistics.median(ts)
    return {"impl": impl, "backend": name, "S": s, "causal": causal, "mode": mode,
            "ms": 1e3 * (min(ts) if STAT == "min" else med), "stat": STAT,
            "spread": (max(ts) - min(ts)) / med, "times_ms": [1e3 * t for t in ts],
            "peak_rss_mb": None}


def measure(impl: str, s: int, causal: bool, mode: str, repeats: int) -> dict:
    fn, name = _callable(impl, s, causal, mode)
    fn()  # warm-up (jit compiles, caches)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return _record(impl, name, s, causal, mode, ts)


def measure_interleaved(impls, s: int, causal: bool, mode: str, repeats: int) -> dict:
    """Each repeat times every implementation once, in turn (a load change on a shared machine
    then hits all of them alike); one warm-up each first."""
    fns, out, ts = {}, {}, {}
    for impl in impls:
        try:
            fns[impl] = _callable(impl, s, causal, mode)
            fns[impl][0]()
            ts[impl] = []
        except Exception as e:  # report, keep going
            out[impl] = {"impl": impl, "S": s, "causal": causal, "mode": mode, "ms": None,
                         "backend": None, "error": f"{type(e).__name__}: {e}"}
    for _ in range(repeats):
        for impl, (fn, _name) in fns.items():
            t = time.perf_counter()
            fn()
            ts[impl].append(time.perf_counter() - t)
    for impl, (_fn, name) in fns.items():
        out[impl] = _record(impl, name, s, causal, mode, ts[impl])
    return {impl: out[impl] for impl in impls}


def measure_in_subprocess(impl, s, causal, mode, repeats) -> dict:
    cmd = [sys.executable, __file__, "--one", f"{impl},{s},{int(causal)},{mode},{repeats}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"impl": impl, "S": s, "causal": causal, "mode": mode, "ms": None,
                "backend": None, "peak_rss_mb": None, "error": r.stderr.strip()[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _env() -> str:
    import numpy as np

    parts = [f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
             f"numpy {np.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    try:
        import jax

        parts.append(f"jax {jax.__version__}")
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--bwd-max", type=int, default=4096, help="longest S timed with fwd_bwd")
    ap.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="one process per measurement, peak RSS")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="ms = the median (default) or the fastest of the repeats (on a shared "
                         "machine the fastest is the least disturbed)")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time each implementation's repeats back to back (default: round robin)")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global STAT
    STAT = a.stat
    if a.one:
        impl, s, causal, mode, rep = a.one.split(",")
        rec = measure(impl, int(s), causal == "1", mode, int(rep))
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(rec))
        return 0

    impls = a.impls.split(",")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    print(f"# flashmux CPU defaults vs torch SDPA: float32 B={B} H={H} D={D}; {_env()}; "
          f"ms = {a.stat} of {a.repeats}")
    recs = []
    for mode in a.modes.split(","):
        for s in map(int, a.seqlens.split(",")):
            if mode == "fwd_bwd" and s > a.bwd_max:
                continue
            for causal in causals:
                row = {}
                if not a.memory and not a.no_interleave:
                    row = measure_interleaved(impls, s, causal, mode, a.repeats)
                    recs.extend(row.values())
                    _print_row(row, s, causal, mode)
                    continue
                for impl in impls:
                    if a.memory:
                        r = measure_in_subprocess(impl, s, causal, mode, a.repeats)
                    else:
                        try:
                            r = measure(impl, s, causal, mode, a.repeats)
                        except Exception as e:  # report, keep going
                            r = {"impl": impl, "S": s, "causal": causal, "mode": mode, "ms": None,
                                 "backend": None, "error": f"{type(e).__name__}: {e}"}
                    recs.append(r)
                    row[impl] = r
                _print_row(row, s, causal, mode)
    _summary(recs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": _env(), "records": recs}, f, indent=1)
    return 0


def _summary(recs):
    """One line per default: its speed range against SDPA and how many points meet the bar."""
    base = {(r["mode"], r["S"], r["causal"]): r.get("ms") for r in recs if r["impl"] == "sdpa"}
    for impl, bar in BARS.items():
        sp = [base[(r["mode"], r["S"], r["causal"])] / r["ms"] for r in recs
              if r["impl"] == impl and r.get("ms") and base.get((r["mode"], r["S"], r["causal"]))]
        if sp:
            print(f"# {impl}: {min(sp):.2f}-{max(sp):.2f}x SDPA, bar {bar}: met at "
                  f"{sum(x >= bar for x in sp)} of {len(sp)} points")


_header_done = False


def _print_row(row, s, causal, mode):
    global _header_done
    if not _header_done:
        print("| mode | S | causal | impl (backend) | ms | speed vs SDPA | bar | spread | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        _header_done = True
    base = (row.get("sdpa") or {}).get("ms")
    for impl, r in row.items():
        ms = r.get("ms")
        speed = base / ms if (base and ms) else None
        bar = BARS.get(impl)
        verdict = "" if bar is None or speed is None else ("ok" if speed >= bar else f"< {bar}")
        rss = r.get("peak_rss_mb")
        sp = r.get("spread")
        print(f"| {mode} | {s} | {'yes' if causal else 'no'} | {impl} ({r.get('backend')}) | "
              f"{'-' if ms is None else f'{ms:.0f}'} | {'-' if speed is None else f'{speed:.2f}'} | "
              f"{verdict} | {'-' if sp is None else f'{sp:.2f}'} | "
              f"{'-' if rss is None else f'{rss:.0f}'} |"
              + (f" {r['error']}" if r.get("error") else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
