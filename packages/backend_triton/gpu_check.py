"""GPU check for the Triton backend: correctness of every feature, a config sweep, and timings.

    python packages/backend_triton/gpu_check.py [check] [sweep] [tma] [ws] [fused] [split] [dq] [lpt] [gluon] [bench] [flex] [cudnn]

check: forward+backward vs the float64 reference on the GPU tools' shared cases
       (flashmux.testing.gpu_cases, fp16 and bf16) judged by flashmux.testing.judge (2 x plain
       low-precision attention error + 1e-5), then float32, determinism and the dropout hook.
sweep: times each kernel's candidate configs at S=4096 (bf16, causal and not; head dims from
       FMX_SWEEP_DIMS, default 64,128; 256 has its own candidates) and uses the fastest for the
       rest of the run (printed as a TABLE_SM90 snippet).
tma:   forward TFLOP/s with and without FLASHMUX_TRITON_TMA=1 (Hopper tensor descriptors).
ws:    forward TFLOP/s with and without FLASHMUX_TRITON_WS=1 (warp-specialized interior loop).
fused: forward+backward TFLOP/s, split backward vs FLASHMUX_TRITON_BWD=fused (atomic dQ).
split: head_dim 256/192 (FMX_SPLIT_DIMS), S 4k/8k (FMX_SPLIT_SEQS), causal and not
       (FMX_SWEEP_CAUSAL): backward and forward+backward TFLOP/s of the joint dK/dV program vs
       the split ones (FMX_SPLIT_VARIANTS, default joint,split: FLASHMUX_TRITON_DKDV),
       beside SDPA cuDNN and flash forward+backward (FMX_SPLIT_SDPA); FMX_SPLIT_PROFILE=1 adds
       each backward kernel's time (profiler). `sweep` with FMX_SWEEP_KERNELS=bwd_dv,bwd_dk and
       sweeps the split programs' configs.
dq:    head_dim 64/128 (FMX_DQ_DIMS), S 4k (FMX_DQ_SEQS), causal and not (FMX_SWEEP_CAUSAL):
       backward and forward+backward TFLOP/s of the dQ program ("kernel") vs the atomic dQ in
       the joint dK/dV program ("fused": per-element atomics; "fused_tma": bulk tensor
       reductions), each optionally at a config of that program ("fused_tma@64x64x8x3"), beside
       SDPA cuDNN and flash forward+backward (FMX_DQ_VARIANTS, FMX_SPLIT_SDPA, FMX_SPLIT_PROFILE).
lpt:   causal forward and backward TFLOP/s with FLASHMUX_TRITON_LPT=0 and 1 (heaviest blocks
       first), head dims FMX_LPT_DIMS (default 64,128,256), S FMX_LPT_SEQS (default 4096).
gluon: forward TFLOP/s of the Gluon warp-specialized forward (FLASHMUX_TRITON_GLUON) vs the
       Triton kernel and SDPA cuDNN (FMX_GLUON_DIMS/SEQS/CAUSAL/CFGS; FMX_GLUON_FB=1 adds
       fwd+bwd and the Gluon dK/dV program, FLASHMUX_TRITON_GLUON_BWD, FMX_GLUON_BWD_CFGS).
bench: bf16, B*S = 16384, model dim 2048, head_dim 64/128, S 2k..16k, causal and not; TFLOP/s
       (FlashAttention convention) of this backend beside torch SDPA flash (and cuDNN, flex).
Writes $OUT/triton_gpu.json when OUT is set. Prints a short table last.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "src"))
sys.path.insert(0, os.path.join(ROOT, "packages", "core", "src"))
sys.path.insert(0, os.path.join(ROOT, "tests", "backends"))

from flashmux.spec import Params  # noqa: E402
from flashmux_triton import _launch, backend  # noqa: E402
from flashmux_triton import tuning as T  # noqa: E402

RESULTS: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": triton.__version__, "check": [], "sweep": {}, "bench": []}


def log(*a):
    print(*a, flush=True)


def save():
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "triton_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------

def check():
    import test_triton_kernels as tk  # the unit tests' case runner, on CUDA here

    # the GPU tools' one case list (flashmux.testing.gpu_cases), judged like the conformance suite
    from flashmux.testing.gpu_cases import check as check_cases
    from flashmux.testing.gpu_cases import gpu_cases

    rows: list = []
    ok_all = check_cases(gpu_cases(), "triton", "torch", log=log, results=rows) == 0
    RESULTS["check"] += [[r["case"], r["verdict"], r["msg"]] for r in rows]
    for name, fn in (("float32", lambda: tk._run_case(1, 200, 300, 2, 1, 64, 64, "float32", {"causal": True})),
                     ("deterministic", tk.test_deterministic_backward_is_bitwise_repeatable),
                     ("dropout mask hook", tk.test_dropout_mask_is_a_pure_function_of_seed)):
        try:
            fn()
            res = "ok"
        except Exception as e:  # noqa: BLE001
            res = "FAIL " + str(e).splitlines()[0][:160]
            ok_all = False
        log(f"check {name:36s} {res}")
        RESULTS["check"].append(["-", name, res])
    # deterministic at a size with many blocks and GQA
    q = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    p = Params(scale=0.088, causal=True, window_right=0, deterministic=True)
    out, lse = backend.forward(q, k, v, None, None, p)
    do = torch.randn_like(out)
    g1 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    g2 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    det = all(torch.equal(a, b) for a, b in zip(g1, g2))
    log(f"check deterministic (2x1024, gqa 8/2)      {'ok' if det else 'FAIL'}")
    RESULTS["check"].append(["-", "deterministic large", "ok" if det else "FAIL"])
    return ok_all and det


# ------------------------------------------------------------------------------------------
# benchmark helpers
# ------------------------------------------------------------------------------------------

def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def problem(S, D, causal, layout="bshd"):
    B, H = 16384 // S, 2048 // D
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return B, H, q, k, v, do


def flops(B, H, S, D, causal):
    f = 4.0 * B * H * S * S * D
    return f / 2 if causal else f


def mine_fns(S, D, causal):
    B, H, q, k, v, do = problem(S, D, causal)
    p = Params(scale=1 / math.sqrt(D), causal=causal, window_right=0 if causal else None)
    state = {}

    def fwd():
        state["o"] = backend.forward(q, k, v, None, None, p)

    def fwdbwd():
        o, lse = backend.forward(q, k, v, None, None, p)
        backend.backward(do, None, q, k, v, o, lse, None, None, p)

    return B, H, fwd, fwdbwd, (q, k, v, do, p)


def sdpa_fns(S, D, causal, which):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, q, k, v, do = problem(S, D, causal, "bhsd")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[which]
    F = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with sdpa_kernel(be), torch.no_grad():
            F(q, k, v, is_causal=causal)

    def fwdbwd():
        with sdpa_kernel(be):
            o = F(q, k, v, is_causal=causal)
        o.backward(do)

    return fwd, fwdbwd, (q, k, v)


_FLEX = {}


def flex_fns(S, D, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    flex = _FLEX["fn"]
    B, H, q, k, v, do = problem(S, D, causal, "bhsd")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    bm = None
    if causal:
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")

    def fwd():
        with torch.no_grad():
            flex(q, k, v, block_mask=bm)

    def fwdbwd():
        o = flex(q, k, v, block_mask=bm)
        o.backward(do)

    return fwd, fwdbwd, (q, k, v)


# ------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------

SWEEP_FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 32, 4, 4),
             (64, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 2)]
SWEEP_DKDV = [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3),
              (64, 64, 4, 3), (16, 128, 4, 4)]
SWEEP_DQ = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3),
            (64, 64, 4, 3), (128, 16, 4, 4)]
# the joint program carrying the atomic dQ (FLASHMUX_TRITON_BWD=fused; sm_90 compile, triton 3.6:
# d128 (64,64,8,3) 255 regs / 0 B spill / 169 KiB, (64,64,8,2) 136 KiB, (64,128,8,3) spills 264 B;
# d64 (64,128,8,3) 222 / 0 / 113 KiB, (64,64,8,3) 194 / 0 / 89 KiB)
SWEEP_FUSED = [(64, 64, 8, 3), (64, 64, 8, 2), (64, 64, 8, 4), (64, 128, 8, 3), (64, 128, 8, 2),
               (128, 64, 8, 2), (64, 64, 4, 3)]
SWEEP_DV = [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
SWEEP_DK = [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
# head_dim 256: the tiles that fit 228 KiB of shared memory with 2-3 stages (K+V tiles of 32-64
# rows x 256 x 2 bytes per stage; dK/dV hold two fp32 BLOCK_N x 256 accumulators in registers)
SWEEP_256 = {
    "fwd": [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2),
            (64, 32, 4, 3), (128, 32, 8, 3)],
    "bwd_dkdv": [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (16, 64, 4, 2),
                 (32, 64, 8, 1), (64, 64, 8, 1)],
    # (session 8: the winners first, for FMX_SWEEP_N; with FLASHMUX_TRITON_BWD_TMA=1 the sm_90
    # compile has (128,64,8,1) 254 regs / 0 spill / 192 KiB, (128,32,8,3) 236 / 0 / 224 KiB)
    "bwd_dq": [(128, 64, 8, 1), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2),
               (32, 64, 4, 2), (64, 32, 4, 2), (64, 16, 4, 2)],
    # the split backward (session 8): one fp32 128 x 256 accumulator per program at 8 warps;
    # FMX_SWEEP_N narrows each list to its first N (GPU time: ~5-10 s of compile per entry)
    # comments: registers / spilled bytes / shared KiB of the sm_90 compile (triton 3.9, strides
    # divisible by 16 as in a real launch); the joint (64,64,8,2) program: 255 / 400 B / 193
    "bwd_dv": [(32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2),
               (32, 64, 4, 2)],  # 238/0/160, 242/0/192, 255/56/192
    "bwd_dk": [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (64, 128, 8, 1), (64, 64, 8, 2),
               (32, 64, 4, 2)],  # 245/0/192, 242/0/224, 214/0/176, 255/120/192
}


def sweep_dims() -> list[int]:
    """FMX_SWEEP_DIMS (default "64,128"; 256 uses SWEEP_256); FMX_SWEEP_CAUSAL (default "0,1")."""
    return [int(x) for x in os.environ.get("FMX_SWEEP_DIMS", "64,128").split(",") if x]


def sweep():
    """FMX_SWEEP_KERNELS (default fwd,bwd_dkdv,bwd_dq; bwd_dv,bwd_dk: the split backward's
    programs, timed with FLASHMUX_TRITON_DKDV=split; bwd_fused: the joint program with the
    atomic dQ, timed with FLASHMUX_TRITON_BWD=fused). FMX_SWEEP_CFG_<kernel> (e.g.
    FMX_SWEEP_CFG_bwd_dkdv=64x128x8x3,32x128x8x3) replaces a kernel's candidate list."""
    variant = "split"
    cap = torch.cuda.get_device_capability()
    kernels = os.environ.get("FMX_SWEEP_KERNELS", "fwd,bwd_dkdv,bwd_dq").split(",")
    causals = [bool(int(x)) for x in os.environ.get("FMX_SWEEP_CAUSAL", "0,1").split(",") if x]
    for D in sweep_dims():
        for causal in causals:
            S = 4096
            B, H, fwd, fwdbwd, (q, k, v, do, p) = mine_fns(S, D, causal)
            o, lse = backend.forward(q, k, v, None, None, p)
            best = {}
            lists = (("fwd", SWEEP_FWD), ("bwd_dkdv", SWEEP_DKDV), ("bwd_dq", SWEEP_DQ),
                     ("bwd_dv", SWEEP_DV), ("bwd_dk", SWEEP_DK), ("bwd_fused", SWEEP_FUSED))
            if D > 128:
                lists = tuple(SWEEP_256.items())
            lists = tuple((w, c) for w, c in lists if w in kernels)
            bd = max(16, 1 << (D - 1).bit_length())  # the padded head dim: the tuning class
            for which, cands in lists:
                # FMX_SWEEP_CFG_<kernel>="64x128x8x3,32x128x8x3": this list instead of the built-in
                env_list = os.environ.get("FMX_SWEEP_CFG_" + which, "")
                if env_list:
                    cands = [tuple(int(x) for x in c.split("x")) for c in env_list.split(",") if c]
                times = []
                if which in ("bwd_dv", "bwd_dk"):
                    os.environ["FLASHMUX_TRITON_DKDV"] = variant
                if which == "bwd_fused":
                    os.environ["FLASHMUX_TRITON_BWD"] = "fused"
                for c in cands[:int(os.environ.get("FMX_SWEEP_N", "99"))]:
                    cfg = T.KernelConfig(*c)
                    key = (T.ShapeClass(bd, bd, "16bit", causal), cap, False)
                    base = _launch._CHOSEN.get(key) or T.default_tuning(key[0], cap, False)
                    _launch._CHOSEN[key] = T.with_config(base, which, cfg)
                    try:
                        if which == "fwd":
                            fn = lambda: backend.forward(q, k, v, None, None, p)  # noqa: E731
                        else:
                            fn = lambda: backend.backward(do, None, q, k, v, o, lse, None, None, p)  # noqa: E731
                        ms = bench_ms(fn)
                    except Exception as e:  # noqa: BLE001
                        log(f"sweep d{D} causal={causal} {which} {c}: {type(e).__name__} {str(e)[:80]}")
                        ms = float("inf")
                    times.append((ms, c))
                    _launch._CHOSEN[key] = base
                times.sort()
                os.environ.pop("FLASHMUX_TRITON_DKDV", None)
                if which == "bwd_fused":
                    os.environ.pop("FLASHMUX_TRITON_BWD", None)
                best[which] = times[0][1]
                key = (T.ShapeClass(bd, bd, "16bit", causal), cap, False)
                base = _launch._CHOSEN.get(key) or T.default_tuning(key[0], cap, False)
                _launch._CHOSEN[key] = T.with_config(base, which, T.KernelConfig(*times[0][1]))
                ft = flops(B, H, S, D, causal)
                log(f"sweep d{D} causal={int(causal)} {which:8s} " + "  ".join(
                    f"{c}:{(ft if which == 'fwd' else ft * 2.5) / ms * 1e-9:.0f}" for ms, c in times))
            RESULTS["sweep"][f"d{D}_causal{int(causal)}"] = best
            save()
            log(f"    ({D}, {causal}): " + ", ".join(f"{w}=_c{c}" for w, c in best.items()))


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------

def bench(with_flex, with_cudnn):
    rows = []
    for D in (64, 128):
        for causal in (False, True):
            for S in (2048, 4096, 8192, 16384):
                B, H, fwd, fwdbwd, _ = mine_fns(S, D, causal)
                ft = flops(B, H, S, D, causal)
                r = {"D": D, "causal": causal, "S": S}
                r["mine"] = (ft / bench_ms(fwd) * 1e-9, 3.5 * ft / bench_ms(fwdbwd) * 1e-9)
                del fwd, fwdbwd
                impls = [("flash", lambda: sdpa_fns(S, D, causal, "flash"))]
                if with_cudnn:
                    impls.append(("cudnn", lambda: sdpa_fns(S, D, causal, "cudnn")))
                if with_flex:
                    impls.append(("flex", lambda: flex_fns(S, D, causal)))
                for name, mk in impls:
                    try:
                        f, fb, _ = mk()
                        r[name] = (ft / bench_ms(f) * 1e-9, 3.5 * ft / bench_ms(fb) * 1e-9)
                    except Exception as e:  # noqa: BLE001
                        log(f"bench {name} S={S} D={D}: {type(e).__name__}: {str(e)[:100]}")
                        r[name] = (float("nan"), float("nan"))
                    torch.cuda.empty_cache()
                rows.append(r)
                RESULTS["bench"] = rows
                save()
                log("bench " + json.dumps(r))
    RESULTS["bench"] = rows
    return rows


def flag_compare(env: str, tag: str, seqs=(4096, 16384)):
    """Forward TFLOP/s with env=0 and env=1 (FLASHMUX_TRITON_TMA: Hopper tensor descriptors;
    FLASHMUX_TRITON_WS: Triton's warp specialization of the interior loop)."""
    out = []
    for D in sweep_dims():
        for causal in (False, True):
            for S in seqs:
                B, H, fwd, _, _ = mine_fns(S, D, causal)
                ft = flops(B, H, S, D, causal)
                r = {"D": D, "causal": causal, "S": S}
                for flag in ("0", "1"):
                    os.environ[env] = flag
                    try:
                        r[tag + flag] = ft / bench_ms(fwd) * 1e-9
                    except Exception as e:  # noqa: BLE001
                        log(f"{tag}{flag} D={D} S={S}: {type(e).__name__}: {str(e)[:100]}")
                        r[tag + flag] = float("nan")
                os.environ.pop(env)
                log(f"{tag} " + json.dumps(r) + f"  tma_broken={sorted(map(str, _launch._TMA_BROKEN))[:1]}")
                out.append(r)
    RESULTS[tag] = out
    save()


def tma_compare():
    flag_compare("FLASHMUX_TRITON_TMA", "tma")


def fused_compare():
    """Forward+backward with the split backward (default) and FLASHMUX_TRITON_BWD=fused."""
    out = []
    for D in (64, 128):
        for causal in (False, True):
            for S in (4096, 16384):
                B, H, _, fwdbwd, _ = mine_fns(S, D, causal)
                ft = 3.5 * flops(B, H, S, D, causal)
                r = {"D": D, "causal": causal, "S": S}
                for flag in ("split", "fused"):
                    os.environ["FLASHMUX_TRITON_BWD"] = flag
                    try:
                        r[flag] = ft / bench_ms(fwdbwd) * 1e-9
                    except Exception as e:  # noqa: BLE001
                        log(f"{flag} D={D} S={S}: {type(e).__name__}: {str(e)[:100]}")
                        r[flag] = float("nan")
                os.environ["FLASHMUX_TRITON_BWD"] = "split"
                log("fused " + json.dumps(r))
                out.append(r)
    RESULTS["fused"] = out
    save()


def kernel_ms(fn, reps=5):
    """Per-kernel GPU milliseconds of one fn() call (torch profiler, mean over reps), by
    kernel name (the split backward's two programs share attn_bwd_dkdv's name)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if e.key.startswith("attn_") and t:
            out[e.key] = out.get(e.key, 0.0) + t / 1000.0 / reps
    return {k: round(v, 3) for k, v in out.items()}


def _variant_rows(mode: str, env_vars: tuple[str, ...], variants: list[str], dims, seqs,
                  setup) -> list[dict]:
    """One row per (head_dim, causal, S), bf16: backward and forward+backward TFLOP/s of each
    variant (`setup(variant, D, causal)` sets `env_vars` for it and returns a function undoing
    anything else it changed, or None), SDPA's forward+backward (FMX_SPLIT_SDPA, default
    cudnn,flash) and each variant's ratio to it; FMX_SPLIT_PROFILE=1 adds each backward
    kernel's time at the first S. The env_vars are removed before SDPA runs; the rows go to
    RESULTS[mode]."""
    causals = [bool(int(x)) for x in os.environ.get("FMX_SWEEP_CAUSAL", "0,1").split(",") if x]
    sdpa = [x for x in os.environ.get("FMX_SPLIT_SDPA", "cudnn,flash").split(",") if x]
    prof = os.environ.get("FMX_SPLIT_PROFILE", "0") == "1"
    out = []
    for D in dims:
        for causal in causals:
            for S in seqs:
                B, H, _, fwdbwd, (q, k, v, do, p) = mine_fns(S, D, causal)
                ft = flops(B, H, S, D, causal)
                o, lse = backend.forward(q, k, v, None, None, p)

                def bwd():
                    backend.backward(do, None, q, k, v, o, lse, None, None, p)

                r = {"D": D, "causal": causal, "S": S}
                for variant in variants:
                    undo = setup(variant, D, causal)
                    try:
                        r[variant + "_bwd"] = round(2.5 * ft / bench_ms(bwd) * 1e-9, 1)
                        r[variant + "_fb"] = round(3.5 * ft / bench_ms(fwdbwd) * 1e-9, 1)
                        if prof and S == seqs[0]:
                            r[variant + "_ms"] = kernel_ms(bwd)
                    except Exception as e:  # noqa: BLE001
                        log(f"{mode} {variant} D={D} S={S}: {type(e).__name__}: {str(e)[:200]}")
                        r[variant + "_bwd"] = r[variant + "_fb"] = float("nan")
                    if undo is not None:
                        undo()
                for name in env_vars:
                    os.environ.pop(name, None)
                for name in sdpa:
                    try:
                        f, fb, _ = sdpa_fns(S, D, causal, name)
                        r[name + "_fb"] = round(3.5 * ft / bench_ms(fb) * 1e-9, 1)
                        del f, fb
                    except Exception as e:  # noqa: BLE001
                        log(f"{mode} sdpa-{name} D={D} S={S}: {type(e).__name__}: {str(e)[:100]}")
                        r[name + "_fb"] = float("nan")
                    torch.cuda.empty_cache()
                for name in sdpa:
                    for variant in variants:
                        r[f"{variant}/{name}"] = round(r[variant + "_fb"] / r[name + "_fb"], 3)
                log(f"{mode} " + json.dumps(r))
                out.append(r)
                RESULTS[mode] = out
                save()
    return out


def split_compare():
    """The split backward vs the joint one at head_dim 256/192, S 4k/8k, beside SDPA."""
    dims = [int(x) for x in os.environ.get("FMX_SPLIT_DIMS", "256,192").split(",") if x]
    seqs = [int(x) for x in os.environ.get("FMX_SPLIT_SEQS", "4096,8192").split(",") if x]
    variants = os.environ.get("FMX_SPLIT_VARIANTS", "joint,split").split(",")

    def setup(variant, D, causal):  # "split+tma": FLASHMUX_TRITON_BWD_TMA=1 too
        os.environ["FLASHMUX_TRITON_DKDV"] = variant.split("+")[0]
        os.environ["FLASHMUX_TRITON_BWD_TMA"] = "1" if variant.endswith("+tma") else "0"

    return _variant_rows("split", ("FLASHMUX_TRITON_DKDV", "FLASHMUX_TRITON_BWD_TMA"), variants,
                         dims, seqs, setup)


def dq_compare():
    """The dQ program vs the atomic dQ (per-element or bulk reductions) at head_dim 64/128."""
    dims = [int(x) for x in os.environ.get("FMX_DQ_DIMS", "64,128").split(",") if x]
    seqs = [int(x) for x in os.environ.get("FMX_DQ_SEQS", "4096").split(",") if x]
    variants = os.environ.get(
        "FMX_DQ_VARIANTS", "kernel,fused,fused_tma,fused_tma@64x64x8x3,fused_tma@64x128x8x2").split(",")
    cap = torch.cuda.get_device_capability()

    def setup(variant, D, causal):  # "fused_tma@64x64x8x3": that bwd_fused config, then back
        name, _, cfg = variant.partition("@")
        os.environ["FLASHMUX_TRITON_BWD"] = "split" if name == "kernel" else "fused"
        os.environ["FLASHMUX_TRITON_DQ_TMA"] = "1" if name.endswith("_tma") else "0"
        key = (T.ShapeClass(D, D, "16bit", causal), cap, False)
        base = _launch._CHOSEN.get(key) or T.default_tuning(key[0], cap, False)
        if cfg:
            c = T.KernelConfig(*(int(x) for x in cfg.split("x")))
            _launch._CHOSEN[key] = T.with_config(base, "bwd_fused", c)
        return lambda: _launch._CHOSEN.__setitem__(key, base)

    return _variant_rows("dq", ("FLASHMUX_TRITON_BWD", "FLASHMUX_TRITON_DQ_TMA"), variants, dims,
                         seqs, setup)


def lpt_compare():
    """Causal forward and backward with the plain grid order and heaviest-blocks-first."""
    dims = [int(x) for x in os.environ.get("FMX_LPT_DIMS", "64,128,256").split(",") if x]
    seqs = [int(x) for x in os.environ.get("FMX_LPT_SEQS", "4096").split(",") if x]
    out = []
    for D in dims:
        for S in seqs:
            B, H, fwd, _, (q, k, v, do, p) = mine_fns(S, D, True)
            ft = flops(B, H, S, D, True)
            o, lse = backend.forward(q, k, v, None, None, p)

            def bwd():
                backend.backward(do, None, q, k, v, o, lse, None, None, p)

            r = {"D": D, "causal": True, "S": S}
            for flag in ("0", "1"):
                os.environ["FLASHMUX_TRITON_LPT"] = flag
                try:
                    r["fwd" + flag] = round(ft / bench_ms(fwd) * 1e-9, 1)
                    r["bwd" + flag] = round(2.5 * ft / bench_ms(bwd) * 1e-9, 1)
                except Exception as e:  # noqa: BLE001
                    log(f"lpt{flag} D={D} S={S}: {type(e).__name__}: {str(e)[:200]}")
                    r["fwd" + flag] = r["bwd" + flag] = float("nan")
            os.environ.pop("FLASHMUX_TRITON_LPT", None)
            log("lpt " + json.dumps(r))
            out.append(r)
            RESULTS["lpt"] = out
            save()
    return out


def gluon_compare():
    """Forward TFLOP/s (and forward+backward with FMX_GLUON_FB=1) of the Triton kernels, the
    Gluon warp-specialized forward (FLASHMUX_TRITON_GLUON=force) at its default config and at
    each FMX_GLUON_CFGS entry ("bm,bn,stages,pingpong,overlap;..."), and with FMX_GLUON_FB=1
    the Gluon forward + Gluon dK/dV program (FLASHMUX_TRITON_GLUON_BWD=force; configs
    FMX_GLUON_BWD_CFGS "bm,bn,stages;...") and + the Gluon dQ ("gluon+all"; its configs
    FMX_GLUON_DQ_CFGS "bm,bn,stages,overlap;..."), beside SDPA cuDNN; head dims FMX_GLUON_DIMS
    (64,128), S FMX_GLUON_SEQS (4096,16384), causal FMX_GLUON_CAUSAL (0,1). Also the largest
    |variant - triton| forward output difference (a gross-error guard; the tests judge).
    FMX_GLUON_PROFILE=1: each forward+backward's per-kernel milliseconds (profiler)."""
    dims = [int(x) for x in os.environ.get("FMX_GLUON_DIMS", "64,128").split(",")]
    seqs = [int(x) for x in os.environ.get("FMX_GLUON_SEQS", "4096,16384").split(",")]
    causals = [bool(int(x)) for x in os.environ.get("FMX_GLUON_CAUSAL", "0,1").split(",")]
    fb = os.environ.get("FMX_GLUON_FB") == "1"
    G, GB = "FLASHMUX_TRITON_GLUON", "FLASHMUX_TRITON_GLUON_BWD"  # (+ _DQ: the Gluon dQ)
    off = {G: "0", GB: "0", G + "_DQ": "0"}  # every variant names all three (the table aside)
    variants = [("triton", off), ("gluon", {**off, G: "force"})]
    variants += [(f"gluon@{c}", {**off, G: "force", G + "_CFG": c})
                 for c in os.environ.get("FMX_GLUON_CFGS", "").split(";") if c]
    if fb:
        variants.append(("gluon+bwd", {**off, G: "force", GB: "force"}))
        variants.append(("gluon+all", {G: "force", GB: "force", G + "_DQ": "force"}))
        variants += [(f"gluon+bwd@{c}", {**off, G: "force", GB: "force", GB + "_CFG": c})
                     for c in os.environ.get("FMX_GLUON_BWD_CFGS", "").split(";") if c]
        variants += [(f"gluon+all@dq{c}", {G: "force", GB: "force", G + "_DQ": "force",
                                            G + "_DQ_CFG": c})
                     for c in os.environ.get("FMX_GLUON_DQ_CFGS", "").split(";") if c]
    out = []
    for D in dims:
        for causal in causals:
            for S in seqs:
                B, H, fwd, fwdbwd, (q, k, v, do, p) = mine_fns(S, D, causal)
                ft = flops(B, H, S, D, causal)
                r = {"D": D, "causal": causal, "S": S}
                outs = {}
                for name, env in variants:
                    os.environ.update(env)
                    try:
                        if "+" not in name:
                            outs[name] = backend.forward(q, k, v, None, None, p)[0]
                            r[name] = ft / bench_ms(fwd) * 1e-9
                        if fb and (name in ("triton", "gluon") or "+" in name):
                            r[name + "_fb"] = 3.5 * ft / bench_ms(fwdbwd) * 1e-9
                            if os.environ.get("FMX_GLUON_PROFILE") == "1":
                                r[name + "_ms"] = kernel_ms(fwdbwd, reps=3)
                    except Exception as e:  # noqa: BLE001
                        log(f"gluon {name} D={D} S={S}: {type(e).__name__}: {str(e)[:300]}")
                        r[name] = float("nan")
                    for key in env:
                        os.environ.pop(key, None)
                for name in outs:
                    if name != "triton" and "triton" in outs:
                        r["maxdiff_" + name] = (outs[name].float() - outs["triton"].float()).abs().max().item()
                del fwd, fwdbwd, q, k, v, do, outs
                try:
                    f, fbb, _ = sdpa_fns(S, D, causal, "cudnn")
                    r["cudnn"] = ft / bench_ms(f) * 1e-9
                    if fb:
                        r["cudnn_fb"] = 3.5 * ft / bench_ms(fbb) * 1e-9
                    del f, fbb
                except Exception as e:  # noqa: BLE001
                    log(f"gluon cudnn D={D} S={S}: {type(e).__name__}: {str(e)[:100]}")
                torch.cuda.empty_cache()
                if r.get("cudnn"):
                    r["x_cudnn"] = {n: round(v / r["cudnn"], 3) for n, v in r.items()
                                    if isinstance(v, float) and n in dict(variants)}
                if r.get("cudnn_fb"):
                    r["x_cudnn_fb"] = {n: round(v / r["cudnn_fb"], 3) for n, v in r.items()
                                       if isinstance(v, float) and n.endswith("_fb") and n != "cudnn_fb"}
                log("gluon " + json.dumps(r))
                out.append(r)
                RESULTS["gluon"] = out
                save()
    return out


def table(rows):
    names = [n for n in ("mine", "flash", "cudnn", "flex") if n in rows[0]]
    out = ["", "TFLOP/s bf16 (fwd / fwd+bwd); ratio = triton / sdpa-flash, triton / flex"]
    out.append("D   causal S      " + "  ".join(f"{n:>11s}" for n in names) + "   x-flash     x-flex")
    for r in rows:
        cells = "  ".join(f"{r[n][0]:5.0f}/{r[n][1]:5.0f}" for n in names)
        xf = f"{r['mine'][0] / r['flash'][0]:.2f}/{r['mine'][1] / r['flash'][1]:.2f}"
        xx = f"{r['mine'][0] / r['flex'][0]:.2f}/{r['mine'][1] / r['flex'][1]:.2f}" if "flex" in r else "-"
        out.append(f"{r['D']:<3d} {int(r['causal']):<6d} {r['S']:<6d} {cells}   {xf:9s} {xx}")
    return "\n".join(out)


def main(argv):
    what = set(argv) or {"check", "bench", "flex", "cudnn"}
    t0 = time.time()
    log(f"device {RESULTS['device']} torch {torch.__version__} triton {triton.__version__} "
        f"cap {torch.cuda.get_device_capability()}")
    ok = True
    if "check" in what:
        try:
            ok = check()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
        log(f"check done {time.time() - t0:.0f}s: {'ALL OK' if ok else 'FAILURES'}")
    if "sweep" in what:
        sweep()
        log(f"sweep done {time.time() - t0:.0f}s")
    if "tma" in what:
        tma_compare()
    if "ws" in what:
        flag_compare("FLASHMUX_TRITON_WS", "ws", (4096,))
    if "fused" in what:
        fused_compare()
    if "split" in what:
        split_compare()
    if "dq" in what:
        dq_compare()
    if "lpt" in what:
        lpt_compare()
    if "gluon" in what:
        gluon_compare()
    rows = None
    if "bench" in what:
        rows = bench("flex" in what, "cudnn" in what)
        log(f"bench done {time.time() - t0:.0f}s")
    save()
    if rows:
        log(table(rows))
    log(f"correctness: {'ALL OK' if ok else 'FAILURES'}; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
