"""Decode (KV-cache) bandwidth of the CUDA backend's fmx_decode against torch SDPA cuDNN and the
HBM read ceiling, in GB/s of K and V read once. GPU only.

    python packages/backend_cuda/tools/decode_bench.py                 # the issue's sweep
    python packages/backend_cuda/tools/decode_bench.py --splits auto,1,4,8,16,32 --sk 4096,131072
    FLASHMUX_CUDA_NVCC_FLAGS="-DFMX_DECODE_PREFETCH=1" python .../decode_bench.py   # a variant build
    FLASHMUX_CUDA_DECODE_PROGRAMS_PER_SM=8 python .../decode_bench.py                # split target

Shape: B=8, Hq=32, Hkv=8, D=128, bf16, causal (bottom-right), Sq 1 (and --sq 4), full caches;
paged caches use in-order block tables. Every number is the median of --reps timed replays of a
CUDA graph holding --inner calls (no Python or launch overhead in the figure; what a serving
engine that captures its decode step sees). The ceiling is torch.sum over the same K and V.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F


def graph_time(fn, inner: int, reps: int) -> float:
    """Seconds per call: median over reps of a CUDA graph replay of `inner` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sk", default="4096,16384,65536,131072")
    ap.add_argument("--sq", default="1")
    ap.add_argument("--pages", default="0,16,64", help="0 = contiguous cache")
    ap.add_argument("--splits", default="auto", help="auto and/or forced counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32,8", help="Hq,Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-anchors", action="store_true")
    args = ap.parse_args(argv)

    from flashmux import dispatch
    from flashmux.kvcache import DecodeParams
    from flashmux_cuda import abi, torch_glue

    be = dispatch.get_backend("cuda")
    reasons = dispatch.availability(be)
    if reasons:
        raise SystemExit("cuda backend unavailable: " + "; ".join(reasons))
    dt = getattr(torch, args.dtype)
    B, D = args.batch, args.head_dim
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    dev = torch.device("cuda")
    print(
        f"# {torch.cuda.get_device_name()} B={B} Hq={Hq} Hkv={Hkv} D={D} {args.dtype}, "
        f"programs/SM target {abi.PROGRAMS_PER_SM}, GB/s of K+V read once"
    )
    print("| Sq | Sk | cache | impl | splits | us | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for sq in (int(x) for x in args.sq.split(",")):
        for sk in (int(x) for x in args.sk.split(",")):
            k = torch.randn((B, sk, Hkv, D), dtype=dt, device=dev)
            v = torch.randn_like(k)
            q = torch.randn((B, sq, Hq, D), dtype=dt, device=dev)
            lens = torch.full((B,), sk, dtype=torch.int32, device=dev)
            nbytes = 2 * k.numel() * k.element_size()

            def row(cache, impl, splits, sec):
                print(
                    f"| {sq} | {sk} | {cache} | {impl} | {splits} | {sec * 1e6:.1f} | "
                    f"{nbytes / sec / 1e9:.0f} |",
                    flush=True,
                )

            for page in (int(x) for x in args.pages.split(",")):
                if page and sk % page:
                    continue
                if page:
                    kc = k.view(-1, page, Hkv, D)
                    vc = v.view(-1, page, Hkv, D)
                    mp = sk // page
                    table = torch.arange(B * mp, dtype=torch.int32, device=dev).view(B, mp)
                else:
                    kc, vc, table = k, v, None
                for sp in args.splits.split(","):
                    ns = None if sp == "auto" else int(sp)
                    p = DecodeParams(
                        scale=D**-0.5,
                        causal=True,
                        window_left=None,
                        window_right=0,
                        softcap=None,
                        alibi=False,
                        num_splits=ns,
                        page_size=page,
                        return_lse=False,
                    )
                    fn = lambda: torch_glue.decode(be.lib, q, kc, vc, lens, table, None, p)  # noqa: E731
                    shown = (
                        ns
                        if ns
                        else abi.choose_splits(
                            B, Hkv, sq * (Hq // Hkv), sk, torch_glue.sm_count(dev)
                        )
                    )
                    row(
                        f"page{page}" if page else "contig",
                        "flashmux-cuda",
                        shown,
                        graph_time(fn, args.inner, args.reps),
                    )
            if args.no_anchors:
                continue
            # SDPA cuDNN (B, H, S, D); Sq > 1 attends to every key (cuDNN has no bottom-right
            # causal here): the same bytes
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def sdpa():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=Hq != Hkv)

                row("contig", "sdpa-cudnn", "-", graph_time(sdpa, args.inner, args.reps))
            except Exception as e:  # not every torch/cuDNN takes this shape
                print(f"| {sq} | {sk} | contig | sdpa-cudnn | - | - | {type(e).__name__}: {e} |")
            row(
                "contig",
                "ceiling (torch.sum K,V)",
                "-",
                graph_time(
                    lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32)),
                    args.inner,
                    args.reps,
                ),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
