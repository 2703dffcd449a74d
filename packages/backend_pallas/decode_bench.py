"""Decode (KV-cache) bandwidth of the Pallas decode kernel (flashmux_pallas/decode.py, Triton
lowering) against JAX's cuDNN attention and an HBM read ceiling, in GB/s of K and V read once.
GPU only.

    python packages/backend_pallas/decode_bench.py                       # the issue's sweep
    python packages/backend_pallas/decode_bench.py --configs             # + block/warp/split variants
    python packages/backend_pallas/decode_bench.py --sk 4096 --pages 16 --splits auto,4,16

Shape: B=8, Hq=32, Hkv=8, D=128, bf16, causal (bottom-right), Sq 1 (and --sq 4), full caches;
paged caches use in-order block tables. Each figure: --iters calls of the jitted step dispatched
back to back (asynchronous, so host dispatch overlaps the kernels), wall time / iters, best of
--reps. The ceiling is jnp.sum over the same K and V.
"""

from __future__ import annotations

import argparse
import time

# (block_n, num_warps, num_stages) variants for --configs
CONFIGS = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 8, 2), (64, 4, 4)]


def timeit(fn, args, iters: int, reps: int) -> float:
    out = fn(*args)
    _block(out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        _block(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def _block(out):
    import jax

    jax.tree_util.tree_map(lambda x: x.block_until_ready(), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sk", default="4096,16384,65536,131072")
    ap.add_argument("--sq", default="1")
    ap.add_argument("--pages", default="0,16,64", help="0 = contiguous cache")
    ap.add_argument("--splits", default="auto", help="auto and/or forced counts")
    ap.add_argument(
        "--configs", action="store_true", help="also time CONFIGS (block_n, warps, stages)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32,8", help="Hq,Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-anchors", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import flashmux
    from flashmux_pallas import decode

    B, D = args.batch, args.head_dim
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    dt = jnp.bfloat16
    key = jax.random.PRNGKey(0)
    print(
        f"# {jax.devices()[0].device_kind} jax {jax.__version__} B={B} Hq={Hq} Hkv={Hkv} "
        f"D={D} bf16, GB/s of K+V read once"
    )
    print("| Sq | Sk | cache | impl | splits | config | us | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for sq in (int(x) for x in args.sq.split(",")):
        for sk in (int(x) for x in args.sk.split(",")):
            kk, kv, kq = jax.random.split(jax.random.fold_in(key, sk), 3)
            k = jax.random.normal(kk, (B, sk, Hkv, D), dt)
            v = jax.random.normal(kv, (B, sk, Hkv, D), dt)
            q = jax.random.normal(kq, (B, sq, Hq, D), dt)
            lens = jnp.full((B,), sk, jnp.int32)
            nbytes = 2 * k.size * k.dtype.itemsize

            def row(cache, impl, splits, cfg, sec):
                print(
                    f"| {sq} | {sk} | {cache} | {impl} | {splits} | {cfg} | {sec * 1e6:.1f} | "
                    f"{nbytes / sec / 1e9:.0f} |",
                    flush=True,
                )

            for page in (int(x) for x in args.pages.split(",")):
                if page and sk % page:
                    continue
                if page:
                    kc, vc = k.reshape(-1, page, Hkv, D), v.reshape(-1, page, Hkv, D)
                    table = jnp.arange(B * (sk // page), dtype=jnp.int32).reshape(B, -1)
                else:
                    kc, vc, table = k, v, None
                variants = [None] + (CONFIGS if args.configs else [])
                for sp in args.splits.split(","):
                    ns = None if sp == "auto" else int(sp)
                    for cfg in variants:
                        kw = (
                            {}
                            if cfg is None
                            else dict(block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
                        )

                        def step(q, kc, vc, lens, table, ns=ns):
                            return flashmux.attention_with_kvcache(
                                q,
                                kc,
                                vc,
                                cache_seqlens=lens,
                                block_table=table,
                                causal=True,
                                num_splits=ns,
                                backend="pallas",
                            )

                        try:
                            with decode.tuning(**kw):
                                fn = jax.jit(step)
                                sec = timeit(fn, (q, kc, vc, lens, table), args.iters, args.reps)
                        except Exception as e:
                            print(
                                f"| {sq} | {sk} | page{page} | flashmux-pallas | {sp} | {cfg} "
                                f"| - | {type(e).__name__}: {str(e)[:80]} |"
                            )
                            continue
                        ex = flashmux.explain_kvcache(
                            q,
                            kc,
                            vc,
                            cache_seqlens=lens,
                            block_table=table,
                            causal=True,
                            num_splits=ns,
                            backend="pallas",
                        )
                        row(
                            f"page{page}" if page else "contig",
                            "flashmux-pallas",
                            ex.splits,
                            "default" if cfg is None else f"bn{cfg[0]} w{cfg[1]} s{cfg[2]}",
                            sec,
                        )
            if args.no_anchors:
                continue
            try:
                cudnn = jax.jit(
                    lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
                )
                row(
                    "contig", "jax-cudnn", "-", "-", timeit(cudnn, (q, k, v), args.iters, args.reps)
                )
            except Exception as e:
                print(
                    f"| {sq} | {sk} | contig | jax-cudnn | - | - | - | {type(e).__name__}: "
                    f"{str(e)[:80]} |"
                )
            ceil = jax.jit(
                lambda k, v: (jnp.sum(k, dtype=jnp.float32), jnp.sum(v, dtype=jnp.float32))
            )
            row(
                "contig",
                "ceiling (jnp.sum K,V)",
                "-",
                "-",
                timeit(ceil, (k, v), args.iters, args.reps),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
