"""GPU check of the sm90 (wgmma/TMA) family through the C ABI (Hopper, compute capability 9.0).

  python sm90_check.py LIB fwd       # sm90 forward vs float64 reference, poisoned outputs
  python sm90_check.py LIB bwd       # sm90 forward + backward vs float64 (out, lse, dq, dk, dv)
  python sm90_check.py LIB bench     # bf16 forward TFLOP/s: sm90, sm80 (forced), SDPA cuDNN
  (bench: FMX_FWD_VARIANTS=default,persist times the persistent forward beside the default;
   FMX_BENCH_NO_SM80=1 leaves the sm80 column out; benchbwd: FMX_BWD_VARIANTS=0,det adds the
   deterministic backward)
  python sm90_check.py LIB benchbwd  # bf16 backward ms (sm90 vs sm80) and fwd+bwd vs SDPA cuDNN
  (bench and benchbwd: FMX_BENCH_DIMS=64,128 FMX_BENCH_SEQS=2048,8192 narrow the sweep;
   fwd and bwd: FMX_CASES=d256,d192 runs the cases whose names contain one of the strings)
  python sm90_check.py LIB sanitize  # small sm90 forwards (under compute-sanitizer)
  python sm90_check.py LIB sanitizebwd  # small sm90 forward + backward (compute-sanitizer)
  python sm90_check.py LIB profbwd   # one backward of ours and of SDPA cuDNN for ncu (hd128 8k)

FLASHMUX_CUDA_BWD_FAMILY=sm80 (read at every call) keeps the sm90 forward and runs the sm80
backward after it; the backward comparisons use it in the same process.

The library picks the family per call; FLASHMUX_CUDA_FAMILY=sm80 (read at every call) forces the
sm80 kernels, which is how the comparison runs in one process. Judging rule as kernel_check.py:
error vs float64 <= 2 x (error of plain attention in the input dtype) + 1e-5, for out and lse.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_check as kc  # noqa: E402

from flashmux.reference import reference_forward  # noqa: E402


def _family(name):
    if name == "sm80":
        os.environ["FLASHMUX_CUDA_FAMILY"] = "sm80"
    else:
        os.environ.pop("FLASHMUX_CUDA_FAMILY", None)


def fwd_case(
    name,
    dtype,
    *,
    B=2,
    Sq=256,
    Sk=256,
    Hq=4,
    Hkv=4,
    D=64,
    causal=False,
    window=None,
    seed=0,
    strided=False,
):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if strided:  # q, k, v as views into one packed buffer (row stride 3*Hq*D)
        buf = torch.randn((B, max(Sq, Sk), 3, Hq, D), generator=g).to(dtype).cuda()
        q, k, v = buf[:, :Sq, 0], buf[:, :Sk, 1, :Hkv], buf[:, :Sk, 2, :Hkv]
    else:
        q = torch.randn((B, Sq, Hq, D), generator=g).to(dtype).cuda()
        k = torch.randn((B, Sk, Hkv, D), generator=g).to(dtype).cuda()
        v = torch.randn((B, Sk, Hkv, D), generator=g).to(dtype).cuda()
    sc = 1.0 / math.sqrt(D)
    kw = dict(causal=causal, window=window, softcap=None, scale=sc)
    # poisoned outputs: every element must be written
    out = torch.full((B, Sq, Hq, D), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float32, device="cuda")
    a = kc.make_args(q, k, v, out, lse, cu_q=None, cu_k=None, max_q=None, max_k=None, **kw)
    rc = kc.LIB.fmx_attn_fwd(kc.C.byref(a), kc._stream())
    if rc:
        raise RuntimeError(f"fmx_attn_fwd -> {rc}: {kc.LIB.fmx_last_error().decode()}")
    torch.cuda.synchronize()
    npf = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(
        npf(q), npf(k), npf(v), causal=causal, window=window, softcap=None, scale=sc
    )
    p_out, p_lse = kc.plain_attention(q, k, v, cu_q=None, cu_k=None, **kw)
    ok = not (torch.isnan(out).any() or torch.isnan(lse).any())
    rows = []
    for label, mine, plain, ref in (("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)):
        e_m, e_p = kc._err(mine, ref), kc._err(plain, ref)
        good = e_m <= 2 * e_p + 1e-5
        ok &= good
        rows.append(f"{label} {e_m:.2e}/{e_p:.2e}{'' if good else ' FAIL'}")
    dt = "f16 " if dtype == torch.float16 else "bf16"
    print(f"{'ok  ' if ok else 'FAIL'} {dt} {name:34s} " + "  ".join(rows), flush=True)
    return bool(ok)


FWD_CASES = [
    ("d64", dict(D=64)),
    ("d128", dict(D=128)),
    ("d64 causal", dict(D=64, causal=True)),
    ("d128 causal", dict(D=128, causal=True)),
    ("d128 tails 300x517", dict(D=128, Sq=300, Sk=517)),
    ("d64 causal tails 300x517", dict(D=64, Sq=300, Sk=517, causal=True)),
    ("d128 causal Sq>Sk 517x300", dict(D=128, Sq=517, Sk=300, causal=True)),
    ("d64 gqa 8/2 causal", dict(D=64, Hq=8, Hkv=2, causal=True, Sq=384, Sk=640)),
    ("d128 mqa 8/1", dict(D=128, Hq=8, Hkv=1, Sq=200, Sk=1000)),
    ("d40 (pads to 64)", dict(D=40, Sq=130, Sk=70)),
    ("d112 causal (pads to 128)", dict(D=112, Sq=129, Sk=129, causal=True)),
    ("d64 Sq=1", dict(D=64, Sq=1, Sk=1000)),
    ("d128 Sk=1 causal", dict(D=128, Sq=50, Sk=1, causal=True)),
    ("d64 window 64/16", dict(D=64, window=(64, 16), Sq=500, Sk=500)),
    ("d128 window causal 100", dict(D=128, window=(100, None), causal=True, Sq=600, Sk=700)),
    ("d128 strided packed qkv", dict(D=128, strided=True, Sq=300, Sk=300, causal=True)),
    ("d128 long 4096 causal", dict(D=128, B=1, Hq=2, Hkv=2, Sq=4096, Sk=4096, causal=True)),
    # more tiles than SMs (a persistent grid, as in commit cf6c85a, loops over tiles)
    ("d128 512 tiles causal gqa", dict(D=128, B=4, Hq=16, Hkv=4, Sq=1000, Sk=1000, causal=True)),
    ("d64 216 tiles tails", dict(D=64, B=3, Hq=12, Hkv=3, Sq=700, Sk=900)),
    ("d64 640 tiles causal Sq>Sk", dict(D=64, B=2, Hq=40, Hkv=40, Sq=900, Sk=300, causal=True)),
    # head_dim 192 / 256 (session 8: 112- and 80-key blocks, not multiples of 64)
    ("d256", dict(D=256)),
    ("d256 causal tails 300x517", dict(D=256, Sq=300, Sk=517, causal=True)),
    ("d256 causal Sq>Sk 517x300 gqa 4/2", dict(D=256, Sq=517, Sk=300, Hkv=2, causal=True)),
    ("d224 (pads to 256) mqa 8/1", dict(D=224, Hq=8, Hkv=1, Sq=200, Sk=1000)),
    ("d256 window 100/30", dict(D=256, window=(100, 30), Sq=400, Sk=400)),
    ("d256 Sk=1 causal", dict(D=256, Sq=50, Sk=1, causal=True)),
    # more tiles than SMs (160); small enough for the float64 reference on a busy host
    ("d256 160 tiles causal Sq>Sk", dict(D=256, B=1, Hq=20, Hkv=4, Sq=1024, Sk=640, causal=True)),
    ("d192", dict(D=192)),
    ("d192 causal tails 300x517", dict(D=192, Sq=300, Sk=517, causal=True)),
    ("d160 (pads to 192) gqa 8/2", dict(D=160, Hq=8, Hkv=2, Sq=333, Sk=222)),
    ("d192 strided packed qkv", dict(D=192, strided=True, Sq=300, Sk=300, causal=True)),
    # head_dim 65..96: the 96 instantiation (session 10), or 128 with FLASHMUX_CUDA_SM90_PAD96=1
    ("d96 causal tails 300x517", dict(D=96, Sq=300, Sk=517, causal=True)),
    ("d80 gqa 8/2", dict(D=80, Hq=8, Hkv=2, Sq=256, Sk=384)),
]


def _selected(name):
    """$FMX_CASES (comma list of substrings, e.g. "d256,d192") narrows the case lists."""
    want = [w for w in os.environ.get("FMX_CASES", "").split(",") if w]
    return not want or any(w in name for w in want)


def fwd():
    """$FMX_FWD_DTYPES ("bf16,f16" by default) picks the dtypes."""
    _family("auto")
    n = n_ok = 0
    names = os.environ.get("FMX_FWD_DTYPES", "bf16,f16").split(",")
    for dtype in [{"bf16": torch.bfloat16, "f16": torch.float16}[x] for x in names if x]:
        for i, (name, kw) in enumerate(FWD_CASES):
            if not _selected(name):
                continue
            n += 1
            try:
                n_ok += fwd_case(name, dtype, seed=i, **kw)
            except Exception as e:  # noqa: BLE001
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    print(f"sm90 forward: {n_ok}/{n} ok", flush=True)


def sanitize():
    _family("auto")
    # default; sequential variant (tuning builds); the persistent forward (session 10)
    for tune, sched in (("", ""), ("1", ""), ("", "persist")):
        _use_fwd(sched or "default")
        os.environ["FMX_TUNE_SM90"] = tune
        fwd_case(
            f"sanitize gqa causal tails d64 [{tune}{sched}]",
            torch.bfloat16,
            B=1,
            Sq=200,
            Sk=333,
            Hq=4,
            Hkv=2,
            D=64,
            causal=True,
        )
        fwd_case(
            f"sanitize tails d128 [{tune}{sched}]",
            torch.float16,
            B=1,
            Sq=130,
            Sk=260,
            Hq=2,
            Hkv=1,
            D=128,
        )
        fwd_case(
            f"sanitize 300 tiles causal d64 [{tune}{sched}]",
            torch.bfloat16,
            B=1,
            Sq=256,
            Sk=200,
            Hq=150,
            Hkv=50,
            D=64,
            causal=True,
        )
        # head_dim 65..96: the 96 instantiation (session 10; 64-byte swizzled atoms)
        fwd_case(
            f"sanitize gqa causal tails d96 [{tune}{sched}]",
            torch.bfloat16,
            B=1,
            Sq=200,
            Sk=333,
            Hq=4,
            Hkv=2,
            D=96,
            causal=True,
        )
        fwd_case(
            f"sanitize tails d80 [{tune}{sched}]",
            torch.float16,
            B=1,
            Sq=130,
            Sk=260,
            Hq=2,
            Hkv=1,
            D=80,
        )
    os.environ.pop("FMX_TUNE_SM90", None)
    _use_fwd("default")


# Backward cases: kernel_check.check_case keywords (forward + backward through the C ABI, judged
# for out, lse, dq, dk, dv against float64 with the plain-attention yardstick). The sm90 backward
# runs wherever the sm90 forward does and the call is not deterministic (family.backward_family).
BWD_CASES = [
    ("d64 one tile 64x64", dict(B=1, Hq=1, Hkv=1, D=64, Sq=64, Sk=64)),
    ("d128 one tile 64x128", dict(B=1, Hq=1, Hkv=1, D=128, Sq=64, Sk=128)),
    ("d64", dict(D=64, Sq=256, Sk=256)),
    ("d128", dict(D=128, Sq=256, Sk=256)),
    ("d64 causal", dict(D=64, Sq=256, Sk=256, causal=True)),
    ("d128 causal", dict(D=128, Sq=256, Sk=256, causal=True)),
    ("d128 tails 300x517", dict(D=128, Sq=300, Sk=517)),
    ("d64 causal tails 300x517", dict(D=64, Sq=300, Sk=517, causal=True)),
    ("d128 causal Sq>Sk 517x300", dict(D=128, Sq=517, Sk=300, causal=True)),
    ("d64 gqa 8/2 causal", dict(D=64, Hq=8, Hkv=2, causal=True, Sq=384, Sk=640)),
    ("d128 mqa 8/1", dict(D=128, Hq=8, Hkv=1, Sq=200, Sk=1000)),
    ("d40 (pads to 64)", dict(D=40, Sq=130, Sk=70)),
    ("d112 causal (pads to 128)", dict(D=112, Sq=129, Sk=129, causal=True)),
    ("d64 Sq=1", dict(D=64, Sq=1, Sk=300)),
    ("d128 Sk=1 causal", dict(D=128, Sq=50, Sk=1, causal=True)),
    ("d64 window 64/16", dict(D=64, window=(64, 16), Sq=500, Sk=500)),
    ("d128 window causal 100", dict(D=128, window=(100, None), causal=True, Sq=600, Sk=700)),
    ("d128 strided packed qkv", dict(D=128, strided=True, Sq=300, Sk=300, causal=True)),
    ("d64 lse grad causal", dict(D=64, Sq=200, Sk=333, causal=True, dlse=True)),
    ("d128 lse grad gqa", dict(D=128, Hq=4, Hkv=2, Sq=160, Sk=200, dlse=True)),
    (
        "d128 1024 causal gqa many CTAs",
        dict(D=128, B=2, Hq=8, Hkv=2, Sq=1024, Sk=1024, causal=True),
    ),
    ("d64 1024 gqa many CTAs", dict(D=64, B=2, Hq=8, Hkv=4, Sq=1000, Sk=1024)),
    # deterministic=True (session 10: the sm90 kDet kernels; check_case also runs it twice and
    # compares bitwise)
    (
        "d128 det causal gqa 24 key blocks",
        dict(D=128, Hq=4, Hkv=2, Sq=333, Sk=3000, causal=True, deterministic=True),
    ),
    ("d64 det window", dict(D=64, Sq=700, Sk=900, window=(150, 40), deterministic=True)),
    # head_dim 192 / 256: the sm90 forward, then the sm80 backward (no sm90 backward there)
    ("d256 causal tails 300x517", dict(D=256, Sq=300, Sk=517, causal=True)),
    ("d192 gqa 4/2", dict(D=192, Hq=4, Hkv=2, Sq=256, Sk=256)),
    ("d256 lse grad", dict(D=256, Sq=200, Sk=333, dlse=True)),
]


def bwd(dtypes=None):
    """$FMX_BWD_DTYPES ("bf16,f16" by default) picks the dtypes."""
    if dtypes is None:
        names = os.environ.get("FMX_BWD_DTYPES", "bf16,f16").split(",")
        dtypes = [{"bf16": torch.bfloat16, "f16": torch.float16}[n] for n in names if n]
    _family("auto")
    n = n_ok = 0
    for dtype in dtypes:
        for i, (name, kw) in enumerate(BWD_CASES):
            if not _selected(name):
                continue
            n += 1
            try:
                n_ok += bool(kc.check_case("sm90bwd " + name, dtype, seed=100 + i, **kw))
            except Exception as e:  # noqa: BLE001
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    print(f"sm90 forward+backward: {n_ok}/{n} ok", flush=True)


def sanitize_bwd():
    _family("auto")
    kc.check_case(
        "sanitize bwd gqa causal tails d64",
        torch.bfloat16,
        B=1,
        Sq=200,
        Sk=333,
        Hq=4,
        Hkv=2,
        D=64,
        causal=True,
    )
    kc.check_case("sanitize bwd tails d128", torch.float16, B=1, Sq=130, Sk=260, Hq=2, Hkv=1, D=128)
    # the deterministic kernels (session 10): workspace counters, ordered dQ adds
    kc.check_case(
        "sanitize bwd deterministic d128",
        torch.bfloat16,
        B=1,
        Sq=200,
        Sk=700,
        Hq=2,
        Hkv=1,
        D=128,
        causal=True,
        deterministic=True,
    )
    # session 11: the FLASHMUX_CUDA_SM90_BWD variants (bf16; Sq % 8 == 0 so that bulk runs)
    for var in _SM90_BWD_ENV:
        os.environ["FLASHMUX_CUDA_SM90_BWD"] = var
        kc.check_case(
            f"sanitize bwd {var} gqa causal tails d64",
            torch.bfloat16,
            B=1,
            Sq=200,
            Sk=333,
            Hq=4,
            Hkv=2,
            D=64,
            causal=True,
        )
        kc.check_case(
            f"sanitize bwd {var} tails d128",
            torch.bfloat16,
            B=1,
            Sq=136,
            Sk=260,
            Hq=2,
            Hkv=1,
            D=128,
        )
    os.environ.pop("FLASHMUX_CUDA_SM90_BWD", None)


def _sweep(dims, seqs):
    """$FMX_BENCH_DIMS / $FMX_BENCH_SEQS (comma lists, e.g. 64,128 and 2048,8192) narrow a sweep."""
    d, s = os.environ.get("FMX_BENCH_DIMS"), os.environ.get("FMX_BENCH_SEQS")
    return (
        tuple(int(x) for x in d.split(",")) if d else dims,
        tuple(int(x) for x in s.split(",")) if s else seqs,
    )


# FLASHMUX_CUDA_SM90_BWD values (bwd_variant_env in csrc/sm90/bwd_kernel.cuh; bf16, normal builds)
_SM90_BWD_ENV = ("bulk", "pre", "bulk+pre", "plain")  # plain: session 10's dQ adds


def bench_bwd(dims=(64, 128), seqs=(2048, 4096, 8192, 16384)):
    """Backward alone (the sm80 backward and each sm90 variant in $FMX_BWD_VARIANTS, default
    "0": FMX_TUNE_SM90_BWD values of a -DFMX_SM90_BWD_TUNING build, "det": deterministic=True,
    session 10; "bulk", "pre", "bulk+pre", "plain": FLASHMUX_CUDA_SM90_BWD, session 11 (the
    default "0" runs "bulk" since session 12); same out/lse;
    FMX_BENCH_NO_SM80=1 leaves the sm80 backward out) and
    forward+backward (ours with each backward vs torch SDPA cuDNN), bf16, the papers sweep;
    TFLOP/s with kernel_check's 2.5x (backward) / 3.5x (forward+backward) forward-flop rule."""
    import torch.nn.functional as F
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dims, seqs = _sweep(dims, seqs)
    variants = [v for v in os.environ.get("FMX_BWD_VARIANTS", "0").split(",") if v]
    det = {"on": False}  # variant "det": the default kernels with deterministic=True (kDet)
    no80 = os.environ.get("FMX_BENCH_NO_SM80") == "1"
    names = ([] if no80 else ["sm80"]) + [f"sm90v{v}" for v in variants]
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    head = " | ".join(f"bwd {n}" for n in names) + " | " + " | ".join(f"f+b {n}" for n in names)
    print(f"| D | causal | S | {head} | f+b cuDNN | best/cuDNN | best/sm80 f+b |")
    print("|---" * (6 + 2 * len(names)) + "|")

    def use(name):
        os.environ.pop("FMX_TUNE_SM90_BWD", None)
        os.environ.pop("FLASHMUX_CUDA_SM90_BWD", None)
        det["on"] = name == "sm90vdet"
        if name == "sm80":
            os.environ["FLASHMUX_CUDA_BWD_FAMILY"] = "sm80"
        else:
            os.environ.pop("FLASHMUX_CUDA_BWD_FAMILY", None)
            var = name[len("sm90v") :]
            if var in _SM90_BWD_ENV:  # session 11: bulk, pre, bulk+pre (normal builds, bf16)
                os.environ["FLASHMUX_CUDA_SM90_BWD"] = var
            elif not det["on"]:
                os.environ["FMX_TUNE_SM90_BWD"] = var

    for D, causal, S, fl, q, k, v, do in kc._points(dims, seqs):
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        _family("auto")
        o, lse = kc.fmx_forward(qd, kd, vd, causal=causal)
        tb, tfb = {}, {}
        for name in names:
            use(name)
            dt = det["on"]
            tb[name] = tt.do_bench(
                lambda: kc.fmx_backward(do, qd, kd, vd, o, lse, causal=causal, deterministic=dt),
                warmup=10,
                rep=40,
            )

            def fb():
                o2, l2 = kc.fmx_forward(qd, kd, vd, causal=causal)
                return kc.fmx_backward(do, qd, kd, vd, o2, l2, causal=causal, deterministic=dt)

            tfb[name] = tt.do_bench(fb, warmup=10, rep=40)
        use("sm90v0")
        os.environ.pop("FMX_TUNE_SM90_BWD", None)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        dot = do.transpose(1, 2)

        def cudnn_fb():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            out.backward(dot)

        t_cudnn = tt.do_bench(cudnn_fb, warmup=10, rep=40, grad_to_none=[q, k, v])
        tf = lambda ms, m: fl * m / (ms * 1e-3) / 1e12  # noqa: E731
        sm90 = [n for n in names if n != "sm80"]
        nondet = [n for n in sm90 if n != "sm90vdet"] or sm90
        best = min(tfb[n] for n in nondet)  # best/cuDNN: the non-deterministic variants
        cols = " | ".join(f"{tf(tb[n], 2.5):.0f}" for n in names)
        cols += " | " + " | ".join(f"{tf(tfb[n], 3.5):.0f}" for n in names)
        print(
            f"| {D} | {int(causal)} | {S} | {cols} | {tf(t_cudnn, 3.5):.0f} | "
            f"{t_cudnn / best:.2f} | {tfb['sm80'] / best if 'sm80' in tfb else float('nan'):.2f} |",
            flush=True,
        )


def prof_bwd():
    """One backward of ours (the default sm90 kernel, then each FLASHMUX_CUDA_SM90_BWD value in
    $FMX_BWD_VARIANTS other than "0") and one SDPA cuDNN backward, inside
    torch.cuda.profiler.start()/stop(), for `ncu --profile-from-start off` (everything before is
    warm-up). bf16, $FMX_PROF_D (128), $FMX_PROF_S (8192), $FMX_PROF_CAUSAL (0), B*S = 16k,
    H = 2048 / D (the bench's point). NVTX ranges name each part."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    D = int(os.environ.get("FMX_PROF_D", "128"))
    S = int(os.environ.get("FMX_PROF_S", "8192"))
    causal = os.environ.get("FMX_PROF_CAUSAL", "0") == "1"
    variants = [v for v in os.environ.get("FMX_BWD_VARIANTS", "0").split(",") if v in _SM90_BWD_ENV]
    B, H = 16384 // S, 2048 // D
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    _family("auto")
    os.environ.pop("FLASHMUX_CUDA_BWD_FAMILY", None)
    o, lse = kc.fmx_forward(q, k, v, causal=causal)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v))
    dot = do.transpose(1, 2)

    def ours(var):
        os.environ.pop("FLASHMUX_CUDA_SM90_BWD", None)
        if var != "default":
            os.environ["FLASHMUX_CUDA_SM90_BWD"] = var
        kc.fmx_backward(do, q, k, v, o, lse, causal=causal)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("cudnn backward")
        out.backward(dot)
        torch.cuda.nvtx.range_pop()

    for var in ["default"] + variants:  # warm-up (module loads, cuDNN plans)
        ours(var)
    cudnn()
    torch.cuda.synchronize()
    print(
        f"profbwd: D {D} S {S} B {B} H {H} causal {causal} variants default,{','.join(variants)}",
        flush=True,
    )
    torch.cuda.profiler.start()
    for var in ["default"] + variants:
        torch.cuda.nvtx.range_push(f"ours {var}")
        ours(var)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    cudnn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    os.environ.pop("FLASHMUX_CUDA_SM90_BWD", None)


def _use_fwd(name):
    """Forward variant for the next calls: "default" (the unit's default schedule), "tile"
    (one CTA per tile, FLASHMUX_CUDA_SM90_FWD=tile), "persist"
    (FLASHMUX_CUDA_SM90_FWD=persist, session 10) or "pad96" (head_dim 65..96 on the 128
    instantiation, FLASHMUX_CUDA_SM90_PAD96=1, against the 96 one of session 10), "tN"
    (FMX_TUNE_SM90=N, bf16: t5 = hd64 192-key blocks, the default at seqlen_k >= 8192; t0 =
    hd64 128-key blocks at any length), combined with "+" ("persist+t0")."""
    parts = name.split("+")  # e.g. "persist+t5": combined
    for var in ("FLASHMUX_CUDA_SM90_PAD96", "FLASHMUX_CUDA_SM90_FWD", "FMX_TUNE_SM90"):
        os.environ.pop(var, None)
    if "persist" in parts:
        os.environ["FLASHMUX_CUDA_SM90_FWD"] = "persist"
    if "tile" in parts:  # the one-CTA-per-tile kernel, whatever the unit's default
        os.environ["FLASHMUX_CUDA_SM90_FWD"] = "tile"
    if "pad96" in parts:
        os.environ["FLASHMUX_CUDA_SM90_PAD96"] = "1"
    for part in parts:
        if part.startswith("t"):  # tN: FMX_TUNE_SM90=N (fwd_hdim*.cu variants)
            os.environ["FMX_TUNE_SM90"] = part[1:]


def bench(dims=(64, 128), seqs=(2048, 4096, 8192, 16384)):
    """Forward TFLOP/s, bf16: each sm90 variant of $FMX_FWD_VARIANTS (comma list of "default",
    "persist", "pad96", "tN", "persist+tN": _use_fwd; default "default"), the sm80 family (left out with FMX_BENCH_NO_SM80=1) and SDPA
    cuDNN, in one process; ratios of each variant to cuDNN."""
    import torch.nn.functional as F
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dims, seqs = _sweep(dims, seqs)
    variants = [v for v in os.environ.get("FMX_FWD_VARIANTS", "default").split(",") if v]
    no80 = os.environ.get("FMX_BENCH_NO_SM80") == "1"
    cols = [f"sm90 {v}" for v in variants] + ([] if no80 else ["sm80"]) + ["cuDNN"]
    cols += [f"{v}/cuDNN" for v in variants]
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print("| D | causal | S | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for D, causal, S, fl, q, k, v, _do in kc._points(dims, seqs):
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        times = {}
        for name in variants + ([] if no80 else ["sm80"]):
            _family("sm80" if name == "sm80" else "sm90")
            _use_fwd(name)
            times[name] = tt.do_bench(
                lambda: kc.fmx_forward(qd, kd, vd, causal=causal), warmup=25, rep=100
            )
        _family("auto")
        _use_fwd("default")
        qt, kt, vt = (x.transpose(1, 2) for x in (qd, kd, vd))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            times["cudnn"] = tt.do_bench(
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                warmup=25,
                rep=100,
            )
        tf = {n: fl / (t * 1e-3) / 1e12 for n, t in times.items()}
        row = [f"{tf[n]:.0f}" for n in variants + ([] if no80 else ["sm80"])]
        row += [f"{tf['cudnn']:.0f}"] + [f"{times['cudnn'] / times[n]:.2f}" for n in variants]
        print(f"| {D} | {int(causal)} | {S} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    kc.load(sys.argv[1])
    t0 = time.time()
    for mode in sys.argv[2:]:
        {
            "fwd": fwd,
            "bwd": bwd,
            "bench": bench,
            "benchbwd": bench_bwd,
            "sanitize": sanitize,
            "sanitizebwd": sanitize_bwd,
            "profbwd": prof_bwd,
        }[mode]()
    print(f"[{' '.join(sys.argv[2:])} took {time.time() - t0:.1f}s]", flush=True)
