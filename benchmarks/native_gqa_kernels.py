"""The native backend's torch GPU kernels on the transformers benchmark's GQA attention call
(B=4, S=2048, Hq=16, Hkv=4, causal, bf16, (B, H, S, D) views of (B, S, H, D) tensors), each with
K/V repeated to Hq heads and with the KV heads as they are ($FLASHMUX_NATIVE_GQA), against
torch's SDPA with enable_gqa (and the backend SDPA picks), plus the host time of one call.

    python benchmarks/native_gqa_kernels.py            # the GPU run (about 20-40 s)
    python benchmarks/native_gqa_kernels.py --quick    # tiny shapes on the CPU (smoke test)

Columns: fwd / fwd+bwd ms (CUDA events, median), host us: wall time per forward call over a
loop of calls without synchronizing (the launch cost while the GPU queue is not full), and
max|out - sdpa out| as a sanity check. A row that raises prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import flashmux
from flashmux import dispatch
from flashmux.builtin.native import ENV_GQA, NativeBackend
from flashmux.builtin.native import backend as native


def timer(fn, iters, cuda):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(fn, cuda, n=50):
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    if cuda:
        torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    b, s, hq, hkv = (4, 2048, 16, 4) if not args.quick else (2, 64, 4, 1)
    # cuDNN last: a kernel that crashes on the KV heads takes the rest of the run with it
    kernels = ("flash", "efficient", "cudnn") if cuda else ("cpu_flash",)
    for k in kernels:
        dispatch.register(NativeBackend(name=f"native-{k}", kernels=(k,),
                                        capabilities=native.capabilities))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"cudnn {torch.backends.cudnn.version() if cuda else '-'}, B={b} S={s} Hq={hq} "
          f"Hkv={hkv} causal {dt}", flush=True)
    print(f"{'row':24} {'D':>4} {'fwd ms':>8} {'fwd+bwd ms':>11} {'host us':>8} {'max|d|':>9}",
          flush=True)
    for d in (64, 128):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, s, hq, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
        k = torch.randn(b, s, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
        v = torch.randn(b, s, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        scale = d ** -0.5
        with torch.no_grad():
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        rows = {"sdpa(enable_gqa)": (None, lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True))}
        if cuda:
            choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale,
                                             enable_gqa=True)
            print(f"  torch._fused_sdp_choice(enable_gqa=True) at D={d}: {choice} "
                  f"({torch.nn.attention.SDPBackend(choice).name})", flush=True)
            for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
                def call(be=be):
                    with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, be)):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                rows[f"sdpa[{be.split('_')[0].lower()}]"] = (None, call)
        for kern in kernels:
            for mode in ("repeat", "kvheads"):
                def call(kern=kern):
                    return flashmux.attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), causal=True, scale=scale,
                                              backend=f"native-{kern}").transpose(1, 2)
                rows[f"native-{kern}[{mode}]"] = (kern if mode == "kvheads" else "none", call)
        for name, (env, call) in rows.items():
            if env is not None:
                os.environ[ENV_GQA] = env
            try:
                with torch.no_grad():
                    diff = (call().float() - ref.float()).abs().max().item()

                def fwd(call=call):
                    with torch.no_grad():
                        call()

                def fwd_bwd(call=call):
                    call().float().sum().backward()

                f, fb = timer(fwd, args.iters, cuda), timer(fwd_bwd, args.iters, cuda)
                h = host_us(fwd, cuda)
                print(f"{name:24} {d:>4} {f:8.3f} {fb:11.3f} {h:8.1f} {diff:9.2e}", flush=True)
            except Exception as e:  # a kernel that refuses the KV heads: say so, go on
                print(f"{name:24} {d:>4} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            finally:
                os.environ.pop(ENV_GQA, None)
                q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
