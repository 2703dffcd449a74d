"""Dv != D (head_dim_v != head_dim) on the GPU, through the C ABI: the in-kernel route against the
padded route and SDPA (issue 12, session 9).

  python dv_bench.py LIB            # bf16, D/Dv 192/128 and 128/64, S 4096, causal and not
  FMX_DV_DIMS=192:128 FMX_DV_SEQS=4096,8192 python dv_bench.py LIB
  compute-sanitizer --tool memcheck python dv_bench.py LIB sanitize   # small calls, both families

Routes, per (D, Dv, causal, S), B*S = 16384 tokens, 16 heads:
  dv    fmx_attn_fwd/bwd with v (.., Dv): the kernels of max(D, Dv), the smaller head dim
        zero-filled on load (what flashmux.attention runs now);
  pad   what a caller (or the backend before session 9) does without it: v (and dO) zero-padded
        to D, the Dv == D kernels, out (and dv) sliced back;
  eq    the Dv == D call alone on already padded arrays (the same instantiation, no copies);
  sdpa  torch SDPA with v (.., Dv), whichever backend torch picks (cuDNN tried first).
Prints ms and TFLOP/s (the flops of the real shapes: forward 2*S*S*(D+Dv) per head, backward
2*S*S*(3*D+2*Dv), halved when causal) of each route, forward and forward+backward, and the
largest |out_dv - out_pad| (same kernels: expected 0).
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_check as kc  # noqa: E402


def _dims():
    env = os.environ.get("FMX_DV_DIMS", "192:128,128:64")
    return [tuple(int(x) for x in pair.split(":")) for pair in env.split(",") if pair]


def _seqs():
    return [int(x) for x in os.environ.get("FMX_DV_SEQS", "4096").split(",") if x]


def _sdpa(qt, kt, vt, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        backend = [SDPBackend.CUDNN_ATTENTION]
        name = "cuDNN"
    except RuntimeError:
        backend, name = None, "auto"

    def run():
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return run, name


def main():
    import triton.testing as tt

    dt = torch.bfloat16
    bench = lambda f: tt.do_bench(f, warmup=10, rep=40)  # noqa: E731
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print("| D | Dv | causal | S | route | fwd ms | fwd TFLOP/s | f+b ms | f+b TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    H = 16
    for D, Dv in _dims():
        W = max(D, Dv)
        for causal in (False, True):
            for S in _seqs():
                B = max(1, 16384 // S)
                torch.manual_seed(0)
                q = torch.randn(B, S, H, D, device="cuda", dtype=dt)
                k = torch.randn(B, S, H, D, device="cuda", dtype=dt)
                v = torch.randn(B, S, H, Dv, device="cuda", dtype=dt)
                do = torch.randn(B, S, H, Dv, device="cuda", dtype=dt)
                scale = 1.0 / math.sqrt(D)
                pad = lambda t: t if t.shape[-1] == W else F.pad(t, (0, W - t.shape[-1]))  # noqa
                kw = dict(causal=causal, scale=scale)
                div = 2 if causal else 1
                fl_f = 2 * B * H * S * S * (D + Dv) / div
                fl_b = 2 * B * H * S * S * (3 * D + 2 * Dv) / div

                def dv_f():
                    return kc.fmx_forward(q, k, v, **kw)

                def dv_fb():
                    o, lse = kc.fmx_forward(q, k, v, **kw)
                    return kc.fmx_backward(do, q, k, v, o, lse, **kw)

                def pad_f():
                    o, lse = kc.fmx_forward(pad(q), pad(k), pad(v), **kw)
                    return o[..., :Dv].contiguous(), lse

                def pad_fb():
                    qp, kp, vp = pad(q), pad(k), pad(v)
                    o, lse = kc.fmx_forward(qp, kp, vp, **kw)
                    o_s = o[..., :Dv].contiguous()
                    dq, dk, dv = kc.fmx_backward(pad(do), qp, kp, vp, o, lse, **kw)
                    return o_s, dq[..., :D].contiguous(), dk[..., :D].contiguous(), \
                        dv[..., :Dv].contiguous()

                qp, kp, vp, dop = pad(q), pad(k), pad(v), pad(do)

                def eq_f():
                    return kc.fmx_forward(qp, kp, vp, **kw)

                def eq_fb():
                    o, lse = kc.fmx_forward(qp, kp, vp, **kw)
                    return kc.fmx_backward(dop, qp, kp, vp, o, lse, **kw)

                o_dv, _ = dv_f()
                o_pad, _ = pad_f()
                torch.cuda.synchronize()
                diff = (o_dv.float() - o_pad.float()).abs().max().item()
                rows = {"dv": (dv_f, dv_fb), "pad": (pad_f, pad_fb), "eq": (eq_f, eq_fb)}
                qt, kt, vt = (t.transpose(1, 2).requires_grad_(True) for t in (q, k, v))
                dot = do.transpose(1, 2)
                sdpa_f, sname = _sdpa(qt, kt, vt, causal)

                def sdpa_fb():
                    sdpa_f().backward(dot)

                rows[f"sdpa {sname}"] = (sdpa_f, sdpa_fb)
                times = {}
                for name, (f, fb) in rows.items():
                    try:
                        tf_ = bench(f)
                        tfb = bench(fb) if name[:4] != "sdpa" else tt.do_bench(
                            fb, warmup=10, rep=40, grad_to_none=[qt, kt, vt])
                    except RuntimeError as e:  # an SDPA backend without Dv != D
                        print(f"| {D} | {Dv} | {int(causal)} | {S} | {name} | n/a: "
                              f"{str(e)[:80]} | | | |", flush=True)
                        continue
                    times[name] = (tf_, tfb)
                    print(f"| {D} | {Dv} | {int(causal)} | {S} | {name} | {tf_:.3f} | "
                          f"{fl_f / tf_ / 1e9:.0f} | {tfb:.3f} | {(fl_f + fl_b) / tfb / 1e9:.0f} |",
                          flush=True)
                d = times.get("dv")
                ratios = ", ".join(f"{n}/dv fwd {t[0] / d[0]:.2f} f+b {t[1] / d[1]:.2f}"
                                   for n, t in times.items() if n != "dv") if d else ""
                print(f"  D {D} Dv {Dv} causal {int(causal)} S {S}: max|out_dv - out_pad| "
                      f"{diff:.3g}; time ratios (>1: dv faster) {ratios}", flush=True)


def sanitize():
    """Small Dv != D forward + backward calls of both families (under compute-sanitizer: the
    zero-filled V / dO columns and the Dv-bounded O / dV stores), tails and GQA; no timing."""
    dt = torch.bfloat16
    cases = [(192, 128, 1, 130, 200, 4, 2, True), (128, 64, 2, 77, 150, 2, 1, False),
             (64, 128, 1, 100, 64, 2, 2, True), (64, 32, 1, 70, 129, 4, 2, False)]
    for fam in ("sm90", "sm80"):
        if fam == "sm80":
            os.environ["FLASHMUX_CUDA_FAMILY"] = "sm80"
        else:
            os.environ.pop("FLASHMUX_CUDA_FAMILY", None)
        for D, Dv, B, Sq, Sk, Hq, Hkv, causal in cases:
            g = torch.Generator(device="cpu").manual_seed(D + Dv)
            mk = lambda *s: torch.randn(s, generator=g).to(dt).cuda()  # noqa: E731
            q, k, v, do = mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, Dv), mk(B, Sq, Hq, Dv)
            o, lse = kc.fmx_forward(q, k, v, causal=causal, scale=1.0 / math.sqrt(D))
            dq, dk, dv = kc.fmx_backward(do, q, k, v, o, lse, causal=causal,
                                         scale=1.0 / math.sqrt(D))
            torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(t).all()) for t in (o, dq, dk, dv))
            print(f"sanitize {fam} D {D} Dv {Dv} B {B} Sq {Sq} Sk {Sk} Hq {Hq} Hkv {Hkv} "
                  f"causal {int(causal)}: {'ok' if finite else 'NON-FINITE'}", flush=True)
    os.environ.pop("FLASHMUX_CUDA_FAMILY", None)


if __name__ == "__main__":
    kc.load(sys.argv[1])
    t0 = time.time()
    if sys.argv[2:] == ["sanitize"]:
        sanitize()
    else:
        main()
    print(f"[dv_bench took {time.time() - t0:.1f}s]", flush=True)
