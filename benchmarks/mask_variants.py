"""Block-sparse Triton variants on the masks sweep's problems, in ONE process (issue 15): each
variant is a set of environment variables `_launch_bs` reads per call (FLASHMUX_TRITON_BS_*),
timed with CUDA events on every mask after the dense call, so a GPU call pays the torch import
and the mask building once instead of once per variant. Prints, per (variant, mask, mode), the
time and the density ratio time / (tile density x dense time) (the issue's bar: <= 1.25).

    python benchmarks/mask_variants.py --variants "def:;pre:FLASHMUX_TRITON_BS_PRE=1" \
        --masks prefix:8192,causal,sliding:1024,doc:8 --modes fwd,fwd_bwd --budget 100

A variant's output is checked against the first variant's (the default, unless told) on each
mask before it is timed: max |difference| above --tol marks the row BAD (the float64 judgment
is the GPU tests' job: tests/backends/test_triton_bs_variants_gpu.py). --budget: seconds after
which no new variant starts (a row's compile included); rows not run are listed as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _variants(text: str) -> list[tuple[str, dict]]:
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, envs = part.partition(":")
        env = {}
        for kv in envs.split(" "):
            if kv.strip():
                k, _, v = kv.partition("=")
                env[k.strip()] = v.strip()
        out.append((name.strip(), env))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default="def:",
                    help='"name:ENV=V ENV2=V2;name2:..." (space-separated settings in a variant)')
    ap.add_argument("--masks", default="prefix:8192,causal,sliding:1024,sliding:4096,doc:8,"
                                       "prefix:2048,dilated:256:1024")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=0, help="timed calls (0: ~60 ms worth)")
    ap.add_argument("--budget", type=float, default=1e9)
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--pairs", default="",
                    help='"A/B,C/D": per variant, time spec A and spec B alternately in --rounds '
                         'rounds (medians and B over A), e.g. "dense/alibi" for the ALiBi bar '
                         '(specs as the masks sweep: dense, alibi, SPEC+alibi); replaces --masks')
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true",
                    help="per variant and mask: the fwd_bwd call's kernels (torch.profiler, "
                         "device us per call) instead of the timing rows")
    ap.add_argument("--host", action="store_true",
                    help="per variant, mask and mode: host time per call (enqueueing 50 calls, "
                         "no sync) beside the device time per call (CUDA events), and the "
                         "call's top Python functions (cProfile, tottime): is a sparse call "
                         "host-bound?")
    args = ap.parse_args(argv)

    import torch

    import flashmux
    from flashmux.bench.maskbench import alibi_for, block_mask_for, mask_stats

    t_start = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run (TRITON_INTERPRET=1)
    s, b, h, d = args.seqlen, args.batch, args.heads, args.dim
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",") if p]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--pairs: expected A/B,C/D, got {args.pairs!r}")
    masks = ([m for p in pairs for m in p] if pairs
             else [m for m in args.masks.split(",") if m])
    masks = list(dict.fromkeys(masks))
    modes = [m for m in args.modes.split(",") if m]
    bms = {m: block_mask_for(m, s, s, q, ("mask_variants", dev)) for m in masks}
    dens = {m: mask_stats(m, s, s)["density"] for m in masks}
    slopes = {m: (None if alibi_for(m, h) is None
                  else torch.as_tensor(alibi_for(m, h), device=dev)) for m in masks}

    def call(mode, bm, sl=None):
        if mode == "fwd":
            return lambda: flashmux.attention(q, k, v, block_mask=bm, alibi_slopes=sl,
                                              backend="triton")

        def fb():
            o = flashmux.attention(qg, kg, vg, block_mask=bm, alibi_slopes=sl, backend="triton")
            return torch.autograd.grad(o, (qg, kg, vg), do)
        return fb

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        one = time.perf_counter() - t0
        reps = args.reps or max(3, min(200, int(0.06 / max(one, 1e-5))))
        if dev == "cpu":
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps * 1e3
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(reps):
            fn()
        en.record()
        torch.cuda.synchronize()
        return st.elapsed_time(en) / reps

    dense = {mode: timed(call(mode, None)) for mode in modes}
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"mask_variants: B{b} H{h} D{d} S{s} bf16 on {name}, "
          f"dense {' / '.join(f'{dense[m]:.3f}' for m in modes)} ms ({'/'.join(modes)})",
          flush=True)
    base_out: dict = {}
    keep = {k2: os.environ.get(k2) for _, env in _variants(args.variants) for k2 in env}
    for vi, (name, env) in enumerate(_variants(args.variants)):
        if time.time() - t_start > args.budget:
            print(f"{name}: skipped (budget {args.budget:.0f} s spent)", flush=True)
            continue
        for k2, old in keep.items():  # each variant starts from the process's own settings
            if old is None:
                os.environ.pop(k2, None)
            else:
                os.environ[k2] = old
        os.environ.update(env)
        t_v = time.time()
        if args.profile:  # where the time goes: forward, preprocess, dK/dV, dQ, glue
            from torch.profiler import ProfilerActivity, profile

            for m in ["dense"] + masks:
                fn = call("fwd_bwd", bms.get(m), slopes.get(m))
                fn()
                sync()
                n_calls = 5
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(n_calls):
                        fn()
                    sync()
                rows = []
                for e in prof.key_averages():
                    t = getattr(e, "self_device_time_total", None)
                    if t is None:
                        t = getattr(e, "self_cuda_time_total", 0)
                    if dev == "cpu":  # (a smoke run: host times)
                        t = e.self_cpu_time_total if e.key.startswith("bs_") else 0
                    if t and t > 0:
                        rows.append((t / n_calls, e.count / n_calls, e.key))
                rows.sort(reverse=True)
                tot = sum(r[0] for r in rows)
                print(f"{name:18s} {m:18s} device {tot:8.1f} us/call: " + "; ".join(
                    f"{k[:40]} {t:.1f} us x{c:g}" for t, c, k in rows[:7]), flush=True)
            print(f"  ({name}: {time.time() - t_v:.1f} s)", flush=True)
            continue
        if args.host:
            import cProfile
            import pstats

            for m in ["dense"] + masks:
                for mode in modes:
                    fn = call(mode, bms.get(m), slopes.get(m))
                    dev_ms = timed(fn)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(50):
                        fn()
                    host_ms = (time.perf_counter() - t0) / 50 * 1e3
                    sync()
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(20):
                        fn()
                    prof.disable()
                    sync()
                    st = pstats.Stats(prof)
                    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:6]
                    ours = sorted(((k_, v) for k_, v in st.stats.items() if "flashmux" in k_[0]),
                                  key=lambda kv: -kv[1][3])[:8]

                    def fmt(rows, i):
                        return "; ".join(f"{f_[2]}({os.path.basename(f_[0])}:{f_[1]}) "
                                         f"{v[i] / 20 * 1e3:.3f}" for f_, v in rows)
                    print(f"{name:18s} {m:18s} {mode:7s} host {host_ms:.3f} ms/call, device+queue "
                          f"{dev_ms:.3f} ms/call\n    top tottime ms/call: {fmt(top, 2)}\n"
                          f"    flashmux cumtime ms/call: {fmt(ours, 3)}", flush=True)
            print(f"  ({name}: {time.time() - t_v:.1f} s)", flush=True)
            continue
        if pairs:  # A and B alternately, several rounds: is B's overhead over A noise?
            for a_, b_ in pairs:
                for mode in modes:
                    fa = call(mode, bms[a_], slopes[a_])
                    fb_ = call(mode, bms[b_], slopes[b_])
                    ta, tb = [], []
                    for _ in range(args.rounds):
                        ta.append(timed(fa))
                        tb.append(timed(fb_))
                    ma, mb = sorted(ta)[len(ta) // 2], sorted(tb)[len(tb) // 2]
                    print(f"{name:18s} {a_ + '/' + b_:24s} {mode:7s} {ma:.3f} / {mb:.3f} ms "
                          f"(median of {args.rounds}) {100 * (mb / ma - 1):+.1f}%  rounds "
                          + " ".join(f"{100 * (y / x - 1):+.1f}" for x, y in zip(ta, tb)),
                          flush=True)
            print(f"  ({name}: {time.time() - t_v:.1f} s)", flush=True)
            continue
        for m in masks:
            cells = []
            try:
                out = call("fwd", bms[m], slopes[m])().float()
                if vi == 0:
                    base_out[m] = out
                    err = 0.0
                else:
                    err = float((out - base_out[m]).abs().max()) if m in base_out else float("nan")
                bad = " BAD" if err > args.tol else ""
                for mode in modes:
                    ms = timed(call(mode, bms[m], slopes[m]))
                    cells.append(f"{mode} {ms:.3f} ms x{ms / (dens[m] * dense[mode]):.2f}")
                print(f"{name:18s} {m:18s} dens {dens[m]:.3f}  " + "  ".join(cells)
                      + f"  maxdiff {err:.2g}{bad}", flush=True)
            except Exception as e:  # noqa: BLE001 - a variant that fails: say so, go on
                print(f"{name:18s} {m:18s} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
                break
        print(f"  ({name}: {time.time() - t_v:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
