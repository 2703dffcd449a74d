"""A/B timing of the Pallas block-mask kernels in one process (issue 15, session 11): the Mosaic
GPU kernels (mosaic_masks.py forward, mosaic_masks_bwd.py backward) against the Triton-lowered
ones (blocksparse.py), interleaved per mask, plus the dense default kernels (the /density
denominator) and dense ALiBi on both.

    python packages/backend_pallas/masks_ab.py --seqlen 8192 [--masks causal,doc:8] [--modes fwd]
        [--rounds 3] [--budget 45]

B*S = 32k tokens, 16 heads, head_dim 128, bf16 (the masks sweep's shape). Prints one line per
(mask, mode): tile density, ms per kernel (median over rounds of the mean of timed calls), the
ratio triton/mosaic, and time / (density x dense) for each. Stops starting new masks after
--budget seconds. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import flashmux
    from flashmux.bench.maskbench import alibi_slopes, mask_fn_for, mask_stats, sweep_masks
    from flashmux_pallas import ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--masks", default="")
    ap.add_argument("--modes", default="fwd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=45.0)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=0, help="default: 32768 // seqlen")
    a = ap.parse_args(argv)
    t_start = time.time()
    S, H, D = a.seqlen, a.heads, a.head_dim
    B = a.batch or max(1, 32768 // S)
    masks = a.masks.split(",") if a.masks else ["alibi", *sweep_masks(S, False)]
    modes = a.modes.split(",")
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.bfloat16) for _ in range(4))
    print(f"masks_ab: B{B} S{S} H{H} D{D} bf16, {jax.devices()[0].device_kind}, jax "
          f"{jax.__version__}", flush=True)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))  # compile + warm-up
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(a.reps):
            r = fn(*args)
        jax.block_until_ready(r)
        return (time.perf_counter() - t0) / a.reps * 1e3

    def build(mode_env, mode, kw):
        # "mosaic": mosaic_masks.py forward + mosaic_masks_bwd.py backward; "triton": both on
        # the Triton lowering (blocksparse.py / triton_kernels.py)
        ops.MASKS_MODE = ops.ALIBI_MODE = ops.MASKS_BWD_MODE = mode_env

        def fwd(q, k, v, kw):
            return flashmux.attention(q, k, v, backend="pallas", **kw)

        if mode == "fwd":
            f = jax.jit(fwd)
        else:
            def fb(q, k, v, do, kw):
                out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, kw), q, k, v)
                return vjp(do)
            f = jax.jit(fb)
        args = (q, k, v, kw) if mode == "fwd" else (q, k, v, do, kw)
        try:
            timed(f, *args)  # trace under this mode (the choice is made at trace time)
            if kw and mode == "fwd" and jax.default_backend() == "gpu":  # which kernel ran
                got = "mosaic_gpu" in f.lower(*args).as_text()
                if got != (mode_env == "mosaic"):
                    print(f"  note: {mode_env} variant lowered {'with' if got else 'without'} "
                          "Mosaic GPU", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            return None, f"{type(e).__name__}: {str(e)[:300]}"
        return (lambda: timed(f, *args)), None

    dense = {}
    for mode in modes:
        run, err = build("triton", mode, {})
        dense[mode] = statistics.median(run() for _ in range(a.rounds)) if run else None
        print(f"dense {mode}: {dense[mode]:.3f} ms (the default dense kernels)" if run
              else f"dense {mode}: {err}", flush=True)
    print("| mask | mode | tile density | triton ms | mosaic ms | triton/mosaic | triton /dens |"
          " mosaic /dens |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for spec in masks:
        if time.time() - t_start > a.budget:
            print(f"| {spec} | budget | | | | | | |", flush=True)
            continue
        dens = mask_stats(spec, S, S)["density"]
        kw = {}
        fn = mask_fn_for(spec, S, S)
        if fn is not None:
            kw["block_mask"] = flashmux.create_block_mask(fn, None, None, S, S, block_size=128,
                                                          like=q)
        if "alibi" in spec:
            kw["alibi_slopes"] = jnp.asarray(alibi_slopes(H))
        for mode in modes:
            runs = {}
            for env in ("triton", "mosaic"):
                runs[env], err = build(env, mode, kw)
                if err:
                    print(f"  {spec} {mode} {env}: {err}", flush=True)
            ms = {e: [] for e in runs}
            for _ in range(a.rounds):  # interleaved
                for e, r in runs.items():
                    if r is not None:
                        ms[e].append(r())
            med = {e: statistics.median(x) if x else None for e, x in ms.items()}
            t, m = med.get("triton"), med.get("mosaic")
            ref = dense.get(mode)

            def f3(x):
                return "-" if x is None else f"{x:.3f}"

            def rel(x):
                return "-" if x is None or not ref else f"{x / (dens * ref):.2f}"

            ratio = f"{t / m:.2f}" if t and m else "-"
            print(f"| {spec} | {mode} | {dens:.3f} | {f3(t)} | {f3(m)} | {ratio} | {rel(t)} | "
                  f"{rel(m)} |", flush=True)
    print(f"masks_ab: {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
