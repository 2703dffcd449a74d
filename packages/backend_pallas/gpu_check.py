"""One GPU session for the Pallas backend: correctness on every feature, block-size sweep, timings.

Run on the device machine from the repository root:
    pip install -q --no-deps --no-build-isolation -e packages/core -e packages/backend_pallas
    PYTHONUNBUFFERED=1 python packages/backend_pallas/gpu_check.py [--deadline SECONDS] [--skip-sweep]

Timings: bf16 (fp16 for attention_mgpu), B*S = 16384 tokens, model dim 2048 (H = 2048 / D),
per-call time = median over 7 groups of calls enqueued back to back (>= 25 ms a group), one
block_until_ready per group (runs A-E blocked after every call: see bench()); TFLOP/s = 4*B*H*S*S*D (halved for causal),
forward+backward counted as 3.5x that. Writes JSON and the log under $OUT when set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import numpy as np

T0 = time.time()
RESULTS: dict = {"correctness": [], "sweep": [], "table": []}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    out = os.environ.get("OUT")
    if out:
        name = os.environ.get("GPU_CHECK_TAG", "pallas_gpu") + ".json"
        with open(os.path.join(out, name), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


# ----------------------------------------------------------------------------- correctness


def correctness(deadline, subset="all"):
    from flashmux.testing.gpu_cases import gpu_cases
    from flashmux_pallas._check import Case, passed, run_case

    # the GPU tools' one case list (flashmux.testing.gpu_cases) under jax.jit, plus what only a
    # JAX tool checks: vmap, and float32
    cases = gpu_cases(transform="jit")
    cases += [
        Case(batch=2, seqlen_q=128, seqlen_k=128, heads_q=2, heads_kv=2, head_dim=64,
             transform="vmap", causal=True, dtype="bfloat16"),
        Case(batch=1, seqlen_q=130, seqlen_k=130, heads_q=2, heads_kv=2, head_dim=64, causal=True,
             dtype="float32"),
    ]
    mosaic_cases = mbwd_cases()[:3] + [  # the Mosaic backward's first cases, then:
        Case(
            batch=1,
            seqlen_q=256,
            seqlen_k=256,
            heads_q=2,
            heads_kv=1,
            head_dim=64,
            causal=True,
            dtype="float16",
            transform="vmap",
        ),
    ]
    if subset == "mosaic":
        cases = [("on", c) for c in mosaic_cases]
    else:
        cases = [("off", c) for c in cases]
    from flashmux_pallas import ops

    nfail = 0
    for i, (mode, c) in enumerate(cases):
        if time.time() > deadline:
            log("correctness: deadline, skipping the rest")
            break
        try:
            ops.MOSAIC_MODE = mode
            lw = "mosaic" if mode == "on" else "triton"
            rep = run_case(c, seed=100 + i)
            ok = passed(rep)
            msg = " ".join(f"{k}={e:.1e}/{b:.1e}" for k, (e, b) in rep.items())
        except Exception as e:  # noqa: BLE001
            ok, rep, msg = False, {}, f"ERROR {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
        finally:
            ops.MOSAIC_MODE = "off"
        nfail += (not ok) * (2 if c.transform == "vmap" and subset == "mosaic" else 1)
        RESULTS["correctness"].append(
            {"case": c.id(), "lowering": lw, "ok": ok, "report": rep, "msg": msg}
        )
        log(("PASS" if ok else "FAIL"), lw, c.id(), msg)
    save()
    return nfail


# ----------------------------------------------------------------------------- timing


def bench(fn, *args, groups=7, warmup=3, group_s=0.025):
    """Seconds per call: enqueue a group of calls (enough for ~group_s), block once, median over
    groups. Blocking after every call adds a host round trip (~0.2 ms on the H100 machine) to each
    call and pulls short-duration ratios toward 1 (runs A-E timed that way)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t
    n = max(1, min(200, int(group_s / max(one, 1e-6)) + 1))
    ts = []
    for _ in range(groups):
        t = time.perf_counter()
        for _ in range(n):
            r = fn(*args)
        jax.block_until_ready(r)
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts))


def _pallas_vjp(params):
    import jax

    from flashmux_pallas import ops

    @jax.custom_vjp
    def f(q, k, v):
        return ops.forward(q, k, v, None, None, params, interpret=False)[0]

    def fwd(q, k, v):  # the training path the core takes: forward also writes out_residual
        out, lse, r = ops.forward(q, k, v, None, None, params, residual=True, interpret=False)
        return out, (q, k, v, out, lse, r)

    def bwd(res, do):
        q, k, v, out, lse, r = res
        return ops.backward(
            do, None, q, k, v, out, lse, None, None, params, out_residual=r, interpret=False
        )

    f.defvjp(fwd, bwd)
    return f


MOSAIC_OK = False


def impls(causal, d):
    """name -> (fwd(q,k,v) -> out, dtype)."""
    import jax
    import jax.numpy as jnp

    from flashmux.spec import Params

    scale = 1.0 / np.sqrt(d)
    p = Params(scale=scale, causal=causal, window_right=0 if causal else None)
    out = {
        "flashmux-pallas triton": (with_mode("off", _pallas_vjp(p)), jnp.bfloat16),
    }
    if MOSAIC_OK:
        out["flashmux-pallas mosaic-fwd"] = (with_mode("on", _pallas_vjp(p)), jnp.bfloat16)
        out["flashmux-pallas mosaic-f16 (fwd)"] = (with_mode("on", _pallas_vjp(p)), jnp.float16)
    try:
        from jax.experimental.pallas.ops.gpu import attention as pa

        out["jax pallas-mha"] = (
            lambda q, k, v: pa.mha(q, k, v, None, sm_scale=scale, causal=causal),
            jnp.bfloat16,
        )
    except Exception as e:  # noqa: BLE001
        log("no pallas mha:", e)
    out["jax dpa-cudnn"] = (
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, implementation="cudnn"
        ),
        jnp.bfloat16,
    )
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am

        def mgpu(q, k, v):
            cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
            return am.attention(q, k, v, cfg)

        out["jax pallas-mgpu-f16 (fwd)"] = (mgpu, jnp.float16)
    except Exception as e:  # noqa: BLE001
        log("no attention_mgpu:", e)
    return out


def measure(name, f, dtype, S, d, causal, mode):
    import jax
    import jax.numpy as jnp

    B, H = 16384 // S, 2048 // d
    ks = jax.random.split(jax.random.key(S + d), 4)
    q, k, v, do = (jax.random.normal(kk, (B, S, H, d), jnp.float32).astype(dtype) for kk in ks)
    flops = 4.0 * B * H * S * S * d / (2 if causal else 1)
    if mode == "fwd":
        fn = jax.jit(f)
        args = (q, k, v)
    else:
        flops *= 3.5

        def loss(q, k, v, do):
            return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        args = (q, k, v, do)
    t = bench(fn, *args)
    return flops / t / 1e12, t


def sweep(deadline, S=4096):
    """Per (head_dim, causal): time forward, dK/dV and dQ block candidates one kernel at a time
    (fresh jit functions per candidate, so every candidate is really traced), keep the fastest."""
    import jax
    import jax.numpy as jnp

    from flashmux.spec import Params
    from flashmux_pallas import ops
    from flashmux_pallas.ops import Blocks as B_
    from flashmux_pallas.ops import Config

    fwd_c = {
        64: [
            (B_(128, 64, 4, 3), True),
            (B_(128, 64, 4, 3), False),
            (B_(128, 64, 4, 4), True),
            (B_(128, 128, 8, 3), True),
        ],
        128: [
            (B_(128, 64, 8, 3), True),
            (B_(128, 64, 8, 3), False),
            (B_(128, 128, 8, 2), True),
            (B_(64, 64, 4, 3), True),
        ],
    }
    dkdv_c = {
        64: [B_(32, 128, 4, 3), B_(32, 128, 4, 5), B_(64, 128, 8, 3), B_(64, 64, 4, 3)],
        128: [B_(32, 128, 8, 3), B_(32, 128, 4, 3), B_(64, 128, 8, 2), B_(64, 64, 4, 3)],
    }
    dq_c = {
        64: [B_(128, 32, 4, 3), B_(128, 32, 4, 5), B_(128, 64, 8, 3), B_(64, 64, 4, 3)],
        128: [B_(128, 32, 8, 3), B_(128, 32, 4, 3), B_(128, 64, 8, 2), B_(64, 64, 4, 3)],
    }
    for d in (64, 128):
        for causal in (False, True):
            if time.time() > deadline:
                log("sweep: deadline")
                return
            base = ops.GPU_CONFIGS[(d, causal)]
            B, H = 16384 // S, 2048 // d
            ks = jax.random.split(jax.random.key(d + causal), 4)
            q, k, v, do = (
                jax.random.normal(kk, (B, S, H, d), jnp.float32).astype(jnp.bfloat16) for kk in ks
            )
            p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
            flops = 4.0 * B * H * S * S * d / (2 if causal else 1)

            def run(cfg, kind):
                ops.MOSAIC_MODE = "off"
                with ops.use_config(cfg):
                    if kind == "fwd":
                        fn = jax.jit(
                            lambda q, k, v: ops.forward(q, k, v, None, None, p, interpret=False)
                        )
                        return bench(fn, q, k, v)
                    fn = jax.jit(
                        lambda do, q, k, v, o, l_: ops.backward(
                            do, None, q, k, v, o, l_, None, None, p, interpret=False
                        )
                    )
                    return bench(fn, do, q, k, v, out, lse)

            def best_of(cands, make, kind, fl):
                res = []
                for c in cands:
                    try:
                        t = run(make(c), kind)
                    except Exception as e:  # noqa: BLE001
                        t = float("inf")
                        log("sweep error", kind, c, str(e)[:200])
                    res.append((t, c))
                    log(
                        f"sweep d={d} causal={causal} {kind} {c}: {fl / t / 1e12:.0f} TFLOP/s ({t * 1e3:.3f} ms)"
                    )
                RESULTS["sweep"].append(
                    {"d": d, "causal": causal, "kind": kind, "res": [(t, str(c)) for t, c in res]}
                )
                return min(res, key=lambda r: r[0])[1]

            fbest, fast = best_of(
                fwd_c[d], lambda c: Config(c[0], base.dkdv, base.dq, fast_exp=c[1]), "fwd", flops
            )
            with ops.use_config(Config(fbest, base.dkdv, base.dq, fast_exp=fast)):
                out, lse = jax.jit(
                    lambda q, k, v: ops.forward(q, k, v, None, None, p, interpret=False)
                )(q, k, v)
            dkbest = best_of(
                dkdv_c[d],
                lambda c: Config(fbest, c, base.dq, fast_exp=fast),
                "bwd(dkdv varies)",
                2.5 * flops,
            )
            dqbest = best_of(
                dq_c[d],
                lambda c: Config(fbest, dkbest, c, fast_exp=fast),
                "bwd(dq varies)",
                2.5 * flops,
            )
            chosen = Config(fbest, dkbest, dqbest, fast_exp=fast)
            ops.GPU_CONFIGS[(d, causal)] = chosen
            log(f"CHOSEN d={d} causal={causal}: {chosen}")
            RESULTS.setdefault("chosen", {})[f"{d},{causal}"] = str(chosen)
            save()


def table(deadline, seqs, use_best=None):
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for S in seqs:
                for name, (f, dt) in impls(causal, d).items():
                    for mode in ("fwd", "fwdbwd"):
                        if "(fwd)" in name and mode == "fwdbwd":
                            continue
                        if time.time() > deadline:
                            continue
                        try:
                            tf, t = measure(name, f, dt, S, d, causal, mode)
                            cell = f"{tf:.0f}"
                        except Exception as e:  # noqa: BLE001
                            tf, t, cell = float("nan"), float("nan"), "err"
                            log("error", name, S, d, causal, mode, type(e).__name__, str(e)[:200])
                        rows.append((d, causal, S, name, mode, tf, t))
                        RESULTS["table"].append(rows[-1])
                        log(
                            f"d={d} causal={causal} S={S} {mode:6s} {name:28s} {cell} TFLOP/s ({t * 1e3:.2f} ms)"
                        )
                save()
    return rows


def mosaic_variants(deadline):
    """Unmeasured Mosaic forward variants (fma_softmax, early_k_wait) against the default one and
    attention_mgpu, fp16: output check against the Triton forward, then timings."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from flashmux.spec import Params
    from flashmux_pallas import mosaic_kernels as mk
    from flashmux_pallas import ops

    variants = {
        "default": mk.MosaicConfig(fma_softmax=False, early_k_wait=False),
        "fma": mk.MosaicConfig(fma_softmax=True, early_k_wait=False),
        "early-k": mk.MosaicConfig(fma_softmax=False, early_k_wait=True),
        "fma+early-k": mk.MosaicConfig(fma_softmax=True, early_k_wait=True),
        "fma+early-k 3 stages": mk.MosaicConfig(fma_softmax=True, early_k_wait=True, stages=3),
    }
    for d in (64, 128):
        for causal in (False, True):
            p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
            ks = jax.random.split(jax.random.key(7), 3)
            q, k, v = (
                jax.random.normal(kk, (2, 1024, 4, d), jnp.float32).astype(jnp.float16) for kk in ks
            )
            ref = ops.forward(
                q, k, v, None, None, dataclasses.replace(p), interpret=False
            )  # MOSAIC auto
            for name, cfg in variants.items():
                if time.time() > deadline:
                    return
                try:
                    o, l_ = jax.jit(lambda q, k, v: mk.forward(q, k, v, p, cfg))(q, k, v)
                    err = float(
                        jnp.max(jnp.abs(o.astype(jnp.float32) - ref[0].astype(jnp.float32)))
                    )
                    lerr = float(jnp.max(jnp.abs(l_ - ref[1])))
                    cells = []
                    for S in (4096, 16384):
                        tf, _ = measure(
                            name,
                            lambda q, k, v: mk.forward(q, k, v, p, cfg)[0],
                            jnp.float16,
                            S,
                            d,
                            causal,
                            "fwd",
                        )
                        cells.append(f"{tf:.0f}")
                    log(
                        f"mosaic variant d={d} causal={causal} {name:22s} err={err:.1e}/{lerr:.1e} fwd f16 S4096/S16384: {' / '.join(cells)}"
                    )
                except Exception as e:  # noqa: BLE001
                    log(
                        f"mosaic variant d={d} causal={causal} {name} ERROR {type(e).__name__}: {str(e)[:200]}"
                    )


def plan5(deadline):
    """Run 5: dS rounding point A/B (scale_ds), then the final table (default lowering, defaults)
    against mha (bf16 fwd+bwd and fwd) and attention_mgpu (fp16 fwd)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention as pa
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    from flashmux.spec import Params
    from flashmux_pallas import ops

    for d, causal, S in (
        (64, True, 2048),
        (128, True, 2048),
        (64, False, 4096),
        (128, False, 4096),
    ):
        B, H = 16384 // S, 2048 // d
        q, k, v, do = (jax_normal(kk, (B, S, H, d), jnp.bfloat16) for kk in jax_split(d, 4))
        p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
        fl = 2.5 * 4.0 * B * H * S * S * d / (2 if causal else 1)
        ops.MOSAIC_MODE = "off"
        row = {}
        for sd in (True, False, True):
            cfg = dataclasses.replace(ops.GPU_CONFIGS[(d, causal)], scale_ds=sd)
            with ops.use_config(cfg):
                out, lse, r = jax.jit(
                    lambda q, k, v: ops.forward(
                        q, k, v, None, None, p, residual=True, interpret=False
                    )
                )(q, k, v)
                fn = jax.jit(
                    lambda do, q, k, v, o, l_, r: ops.backward(
                        do, None, q, k, v, o, l_, None, None, p, out_residual=r, interpret=False
                    )
                )
                t = bench(fn, do, q, k, v, out, lse, r)
            row.setdefault(f"scale_ds={sd}", []).append(round(fl / t / 1e12))
        ops.MOSAIC_MODE = "auto"
        RESULTS.setdefault("ab", []).append({"d": d, "causal": causal, "S": S, **row})
        log(f"AB5 bwd d={d} causal={causal} S={S} {row}")
        save()
    for d in (64, 128):
        for causal in (True, False):
            p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
            for S in (2048, 4096, 8192):
                if time.time() > deadline - 30:
                    break
                row = {}
                fns = {
                    "ours": (_pallas_vjp(p), jnp.bfloat16),
                    "mha": (
                        lambda q, k, v, d=d, c=causal: pa.mha(
                            q, k, v, None, sm_scale=d**-0.5, causal=c
                        ),
                        jnp.bfloat16,
                    ),
                }
                for mode in ("fwdbwd", "fwd"):
                    for name, (f, dt) in fns.items():
                        try:
                            row[f"{name} {mode}"], _ = measure(name, f, dt, S, d, causal, mode)
                        except Exception as e:  # noqa: BLE001
                            row[f"{name} {mode}"] = float("nan")
                            log("error", name, str(e)[:200])
                RESULTS["table"].append({"d": d, "causal": causal, "S": S, **row})
                log(
                    f"TABLE5 d={d} causal={causal} S={S} "
                    + " ".join(f"{k}={v:.0f}" for k, v in row.items())
                )
                save()
    for causal in (False, True):
        for S in (4096, 8192, 16384):
            if time.time() > deadline:
                break
            d = 128
            p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)

            def mgpu(q, k, v, causal=causal):
                cfg = am.TuningConfig(
                    block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal
                )
                return am.attention(q, k, v, cfg)

            row = {}
            for name, f in (("ours", _pallas_vjp(p)), ("mgpu", mgpu)):
                try:
                    row[name], _ = measure(name, f, jnp.float16, S, d, causal, "fwd")
                except Exception as e:  # noqa: BLE001
                    row[name] = float("nan")
                    log("error", name, str(e)[:200])
            RESULTS.setdefault("mosaic", []).append({"d": d, "causal": causal, "S": S, **row})
            log(
                f"MGPU5 d={d} causal={causal} S={S} fp16 fwd "
                + " ".join(f"{k}={v:.0f}" for k, v in row.items())
            )
            save()


MBWD_CASES = None


def mbwd_cases():
    from flashmux_pallas._check import Case

    return [
        Case(
            batch=2,
            seqlen_q=512,
            seqlen_k=512,
            heads_q=4,
            heads_kv=4,
            head_dim=64,
            dtype="bfloat16",
        ),
        Case(
            batch=1,
            seqlen_q=512,
            seqlen_k=512,
            heads_q=4,
            heads_kv=2,
            head_dim=128,
            causal=True,
            dtype="bfloat16",
            lse_grad=True,
        ),
        Case(
            batch=2,
            seqlen_q=256,
            seqlen_k=384,
            heads_q=2,
            heads_kv=2,
            head_dim=128,
            dtype="float16",
        ),
        Case(
            batch=1,
            seqlen_q=300,
            seqlen_k=300,
            heads_q=4,
            heads_kv=1,
            head_dim=64,
            causal=True,
            dtype="float16",
        ),
        Case(
            batch=2,
            seqlen_q=200,
            seqlen_k=333,
            heads_q=4,
            heads_kv=2,
            head_dim=128,
            dtype="bfloat16",
            lse_grad=True,
        ),
        Case(
            batch=1,
            seqlen_q=1000,
            seqlen_k=1000,
            heads_q=2,
            heads_kv=2,
            head_dim=64,
            causal=True,
            dtype="bfloat16",
        ),
        Case(
            batch=2,
            seqlen_q=256,
            seqlen_k=256,
            heads_q=2,
            heads_kv=1,
            head_dim=128,
            causal=True,
            dtype="bfloat16",
            transform="vmap",
        ),
        Case(
            batch=1,
            seqlen_q=33,
            seqlen_k=33,
            heads_q=4,
            heads_kv=2,
            head_dim=64,
            causal=True,
            dtype="bfloat16",
        ),
    ]


def mbwd_check():
    """Mosaic GPU backward (forced on) on SPEC's rule; the forward is the default lowering."""
    from flashmux_pallas import ops
    from flashmux_pallas._check import judge

    ops.MOSAIC_BWD_MODE = "on"
    nfail = judge(mbwd_cases(), 300, "mosaic-bwd", log=log)
    log(f"mosaic-bwd correctness: {nfail} failing")
    return nfail


def mbwd_time(deadline, points, variants=True, ab=False):
    """Backward alone (training inputs: out_residual), Mosaic vs Triton lowering, then f+b."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from flashmux.spec import Params
    from flashmux_pallas import mosaic_backward as mb
    from flashmux_pallas import ops

    for d, causal, S in points:
        if time.time() > deadline:
            log("mbwd_time: deadline")
            break
        B, H = 16384 // S, 2048 // d
        q, k, v, do = (jax_normal(kk, (B, S, H, d), jnp.bfloat16) for kk in jax_split(S + d, 4))
        p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
        fl = 2.5 * 4.0 * B * H * S * S * d / (2 if causal else 1)
        out, lse, r = jax.jit(
            lambda q, k, v: ops.forward(q, k, v, None, None, p, residual=True, interpret=False)
        )(q, k, v)
        row = {}
        base = mb.default_config(d, causal, S)
        cands = [("triton", None), ("mosaic", base)]
        if ab:  # session 4: O/r tiles of their own in the fused-delta dQ against serial loads
            cands.append(("mosaic serial-O/r", dataclasses.replace(base, own_or_tiles=False)))
        elif variants:
            cands.append(("mosaic xla-delta", dataclasses.replace(base, fused_delta=False)))
            for name, kw in (
                ("mosaic q128-kv128", dict(block_q_dkv=128, block_kv_dq=128)),
                ("mosaic kv128", dict(block_q_dkv=64, block_kv_dq=128)),
                ("mosaic 64-64", dict(block_q_dkv=64, block_kv_dq=64)),
            ):
                c = dataclasses.replace(base, **kw)
                if c != base and (d == 64 or kw["block_q_dkv"] == 64):
                    cands.append((name, c))
        ref = None
        for name, cfg in cands:
            if time.time() > deadline:
                break
            try:
                if cfg is None:
                    ops.MOSAIC_BWD_MODE = "off"
                    fn = jax.jit(
                        lambda do, q, k, v, o, l_, r: ops.backward(
                            do,
                            None,
                            q,
                            k,
                            v,
                            o,
                            l_,
                            None,
                            None,
                            p,
                            out_residual=r,
                            interpret=False,
                        )
                    )
                else:
                    fn = jax.jit(
                        functools.partial(
                            lambda cfg, do, q, k, v, o, l_, r: mb.backward(
                                do, None, q, k, v, o, l_, p, out_residual=r, cfg=cfg
                            ),
                            cfg,
                        )
                    )
                res = fn(do, q, k, v, out, lse, r)
                if ref is None:
                    ref = res
                    err = 0.0
                else:
                    err = max(
                        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                        for a, b in zip(res, ref)
                    )
                t = bench(fn, do, q, k, v, out, lse, r)
                row[name] = round(fl / t / 1e12)
                row[name + " maxdiff"] = f"{err:.1e}"
            except Exception as e:  # noqa: BLE001
                row[name] = "err"
                log("mbwd error", name, type(e).__name__, str(e)[:300])
        RESULTS.setdefault("mbwd", []).append({"d": d, "causal": causal, "S": S, **row})
        log(f"MBWD bwd-only TFLOP/s d={d} causal={causal} S={S} {row}")
        save()


def fb_table(deadline, points, modes=("off", "on"), fwd=True):
    """fwd+bwd (training path) with the backward on each lowering, and mha, bf16."""
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention as pa

    from flashmux.spec import Params
    from flashmux_pallas import ops

    for d, causal, S in points:
        if time.time() > deadline:
            log("fb_table: deadline")
            break
        p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
        row = {}
        for m in modes:
            ops.MOSAIC_BWD_MODE = m
            try:
                row[f"ours bwd={m}"], _ = measure(
                    "ours", _pallas_vjp(p), jnp.bfloat16, S, d, causal, "fwdbwd"
                )
            except Exception as e:  # noqa: BLE001
                row[f"ours bwd={m}"] = float("nan")
                log("error", m, str(e)[:200])
        ops.MOSAIC_BWD_MODE = "auto"
        for mode in ("fwdbwd", "fwd") if fwd else ("fwdbwd",):
            try:
                row[f"mha {mode}"], _ = measure(
                    "mha",
                    lambda q, k, v, d=d, c=causal: pa.mha(
                        q, k, v, None, sm_scale=d**-0.5, causal=c
                    ),
                    jnp.bfloat16,
                    S,
                    d,
                    causal,
                    mode,
                )
            except Exception as e:  # noqa: BLE001
                row[f"mha {mode}"] = float("nan")
                log("error mha", str(e)[:200])
        if fwd:
            try:
                row["ours fwd"], _ = measure(
                    "ours", _pallas_vjp(p), jnp.bfloat16, S, d, causal, "fwd"
                )
            except Exception:  # noqa: BLE001
                row["ours fwd"] = float("nan")
        mha = row.get("mha fwdbwd")
        if mha:
            for m in modes:
                row[f"ratio bwd={m}"] = row[f"ours bwd={m}"] / mha
        RESULTS.setdefault("fb", []).append({"d": d, "causal": causal, "S": S, **row})
        log(
            f"FB d={d} causal={causal} S={S} "
            + " ".join(f"{k}={v:.2f}" if "ratio" in k else f"{k}={v:.0f}" for k, v in row.items())
        )
        save()

def fwd64(deadline, points, variants, fb=()):
    """D=64 forward: the Triton lowering against Mosaic configs (bf16 and fp16) and attention_mgpu
    (fp16, block_kv as the harness picks it), one process, same inputs; each Mosaic output is first
    checked against the Triton lowering's."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    from flashmux.spec import Params
    from flashmux_pallas import mosaic_kernels as mk
    from flashmux_pallas import ops

    for d, causal, S in points:
        p = Params(scale=1.0 / np.sqrt(d), causal=causal, window_right=0 if causal else None)
        ks = jax.random.split(jax.random.key(S + 3), 3)
        q, k, v = (jax.random.normal(kk, (2, 1024, 4, d), jnp.float32).astype(jnp.bfloat16) for kk in ks)
        fwd = with_mode("off", lambda q, k, v: ops.forward(q, k, v, None, None, p, interpret=False))
        ref = jax.jit(fwd)(q, k, v)
        row = {}
        row["triton bf16"], _ = measure("t", lambda *a: fwd(*a)[0], jnp.bfloat16, S, d, causal, "fwd")
        for name, cfg in variants.items():
            if time.time() > deadline:
                log("fwd64: deadline")
                return
            try:
                o, l_ = jax.jit(lambda q, k, v, cfg=cfg: mk.forward(q, k, v, p, cfg))(q, k, v)
                err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref[0].astype(jnp.float32))))
                lerr = float(jnp.max(jnp.abs(l_ - ref[1])))
                if not (err < 2e-2 and lerr < 1e-3):
                    log(f"fwd64 {name} d={d} causal={causal} WRONG err={err:.2e} lse={lerr:.2e}")
                    continue
                f = lambda q, k, v, cfg=cfg: mk.forward(q, k, v, p, cfg)[0]  # noqa: E731
                row[f"{name} bf16"], _ = measure(name, f, jnp.bfloat16, S, d, causal, "fwd")
                row[f"{name} f16"], _ = measure(name, f, jnp.float16, S, d, causal, "fwd")
            except Exception as e:  # noqa: BLE001
                log(f"fwd64 {name} ERROR {type(e).__name__}: {str(e)[:300]}")
        if fb:  # training path (fwd with residual + default backward) per forward lowering
            old_mode, old_cfg = ops.MOSAIC_MODE, mk.CONFIGS[d]
            for name in ("off",) + tuple(fb):
                ops.MOSAIC_MODE = "off" if name == "off" else "on"
                if name != "off":
                    mk.CONFIGS[d] = variants[name]
                try:
                    row[f"f+b fwd={name}"], _ = measure(
                        name, _pallas_vjp(p), jnp.bfloat16, S, d, causal, "fwdbwd"
                    )
                except Exception as e:  # noqa: BLE001
                    log(f"fwd64 f+b {name} ERROR {type(e).__name__}: {str(e)[:300]}")
                finally:
                    ops.MOSAIC_MODE, mk.CONFIGS[d] = old_mode, old_cfg
        bkv = 256 if d <= 64 and S % 256 == 0 else 128
        cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, causal=causal)
        row["mgpu f16"], _ = measure("mgpu", lambda q, k, v: am.attention(q, k, v, cfg),
                                     jnp.float16, S, d, causal, "fwd")
        RESULTS.setdefault("fwd64", []).append({"d": d, "causal": causal, "S": S, **row})
        log(f"FWD d={d} causal={causal} S={S} " + " ".join(f"{k}={v:.0f}" for k, v in row.items()))
        save()


def with_mode(mode, f):
    """f with ops.MOSAIC_MODE (the forward's lowering choice) set to `mode` while it traces."""
    from flashmux_pallas import ops

    def g(*a):
        old = ops.MOSAIC_MODE
        ops.MOSAIC_MODE = mode
        try:
            return f(*a)
        finally:
            ops.MOSAIC_MODE = old

    return g


def _points(spec):
    """ "64c2048,128n4096" -> [(64, True, 2048), (128, False, 4096)]."""
    out = []
    for tok in spec.split(","):
        c = "c" in tok
        d, S = tok.replace("c", " ").replace("n", " ").split()
        out.append((int(d), c, int(S)))
    return out


def jax_split(seed, n):
    import jax

    return jax.random.split(jax.random.key(seed), n)


def jax_normal(key, shape, dtype):
    import jax
    import jax.numpy as jnp

    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def print_table(rows, seqs):
    names = []
    for r in rows:
        if r[3] not in names:
            names.append(r[3])
    print("\n## TFLOP/s (bf16; mgpu fp16), B*S=16384, H=2048/D\n")
    for d in (64, 128):
        for causal in (False, True):
            for mode in ("fwd", "fwdbwd"):
                print(f"d={d} causal={causal} {mode}: " + " | ".join(f"S={s}" for s in seqs))
                for n in names:
                    cells = []
                    for s in seqs:
                        m = [r for r in rows if r[:5] == (d, causal, s, n, mode)]
                        cells.append("-" if not m or m[0][5] != m[0][5] else f"{m[0][5]:.0f}")
                    if any(c != "-" for c in cells):
                        print(f"  {n:28s} " + " | ".join(cells))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--deadline", type=float, default=420)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--seqs", default="2048,4096,8192,16384")
    ap.add_argument("--cases", default="all")
    ap.add_argument("--mosaic", action="store_true")
    ap.add_argument("--mosaic-variants", action="store_true", help="only time the Mosaic variants")
    ap.add_argument("--only-correctness", action="store_true")
    ap.add_argument("--plan5", action="store_true", help="run 5: dS A/B, final table")
    ap.add_argument("--mbwd-check", action="store_true", help="Mosaic backward: SPEC cases")
    ap.add_argument("--mbwd-time", default="", help="Mosaic vs Triton backward at points")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--fb", default="", help="fwd+bwd vs mha at points, both bwd lowerings")
    ap.add_argument("--fb-auto", default="", help="fwd+bwd vs mha at points, default lowering")
    ap.add_argument("--mbwd-ab", default="", help="dQ O/r tiles A/B at points")
    ap.add_argument("--fwd64", default="", help="Mosaic forward configs vs Triton and mgpu")
    a = ap.parse_args()
    import jax

    log("jax", jax.__version__, jax.devices())
    if a.mbwd_check or a.mbwd_time or a.fb or a.fb_auto or a.mbwd_ab:
        n = mbwd_check() if a.mbwd_check else 0
        if a.mbwd_ab:
            mbwd_time(T0 + a.deadline, _points(a.mbwd_ab), ab=True)
        if a.mbwd_time:
            mbwd_time(T0 + a.deadline, _points(a.mbwd_time), not a.no_variants)
        if a.fb:
            fb_table(T0 + a.deadline, _points(a.fb))
        if a.fb_auto:
            fb_table(T0 + a.deadline, _points(a.fb_auto), modes=("auto",), fwd=False)
        save()
        return 0 if n == 0 else 1
    seqs = [int(s) for s in a.seqs.split(",")]
    if a.fwd64:
        from flashmux_pallas import mosaic_kernels as mk

        variants = {
            "mosaic kv128": mk.MosaicConfig(block_kv=128),
            "mosaic kv256": mk.MosaicConfig(block_kv=256),
            "mosaic kv128 s3": mk.MosaicConfig(block_kv=128, stages=3),
            "mosaic kv64 s3": mk.MosaicConfig(block_kv=64, stages=3),
        }
        fwd64(T0 + a.deadline, _points(a.fwd64), variants, fb=("mosaic kv128", "mosaic kv256"))
        save()
        return 0
    if a.mosaic_variants:
        mosaic_variants(T0 + a.deadline)
        return 0
    if a.plan5:
        plan5(T0 + a.deadline)
        return 0
    if a.only_correctness and a.cases != "mosaic":
        n = correctness(T0 + a.deadline, a.cases)
        log(f"correctness: {n} failing")
        return 0 if n == 0 else 1
    if a.cases == "mosaic":  # child process: a hang or crash here can't take the run down
        n = correctness(T0 + 1e9, "mosaic")  # 2: only the vmap case failed
        return 0 if n == 0 else (2 if n == 2 else 1)
    global MOSAIC_OK
    if a.mosaic:
        import subprocess

        try:
            r = subprocess.run(
                [sys.executable, __file__, "--cases", "mosaic"],
                timeout=120,
                capture_output=True,
                text=True,
            )
            print(
                "\n".join(
                    x
                    for x in (r.stdout + r.stderr).splitlines()
                    if x.startswith("[") or "Error" in x
                )[-6000:]
            )
            MOSAIC_OK = r.returncode in (0, 2)
            RESULTS["mosaic_vmap_ok"] = r.returncode == 0
        except subprocess.TimeoutExpired as e:
            log("mosaic check timed out (hang?)", str(e.stdout)[-2000:] if e.stdout else "")
        log(f"mosaic correctness ok: {MOSAIC_OK}")
        RESULTS["mosaic_ok"] = MOSAIC_OK
    nfail = 0
    t1 = time.time()
    left = T0 + a.deadline - t1
    if not a.skip_correctness:
        nfail = correctness(t1 + 0.2 * left, a.cases)
        log(f"correctness: {nfail} failing")
    if not a.skip_sweep:
        sweep(t1 + 0.45 * left)
    rows = table(T0 + a.deadline, seqs)
    print_table(rows, seqs)
    print(f"\ncorrectness failures: {nfail}")
    save()


if __name__ == "__main__":
    sys.exit(main())
