"""GB/s of the Triton decode kernel per tuning candidate, next to torch SDPA (cuDNN) and a copy
of the cache (the HBM ceiling measured in the same run), so one GPU run can pick the defaults of
flashmux_triton/tuning_decode.py.

    python benchmarks/triton_decode_configs.py              # B=8 Hq=32 Hkv=8 D=128 bf16, Sk 4k-128k
    python benchmarks/triton_decode_configs.py --quick      # Sk 4k and 32k, 3 candidates
    python benchmarks/triton_decode_configs.py --sks 65536,131072 --candidates 0,1,8

GB/s counts the bytes of K and V read once (the floor of a decode step): 2 * B * Sk * Hkv * D * 2.
Layouts: contiguous, paged with 16-token and 64-token pages (shuffled block tables). Each
kernel is timed with triton.testing.do_bench (the L2 is flushed between runs), after a check
against the reference backend on the same inputs.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton

import flashmux
from flashmux.kvcache import DecodeParams
from flashmux_triton import _decode
from flashmux_triton import tuning_decode as T


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def make(b, sk, hkv, d, page, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    if page:
        mp = sk // page
        n = b * mp
        kc = torch.randn(n, page, hkv, d, generator=g, device=device, dtype=dtype)
        vc = torch.randn(n, page, hkv, d, generator=g, device=device, dtype=dtype)
        table = torch.randperm(n, generator=g, device=device).reshape(b, mp).to(torch.int32)
    else:
        kc = torch.randn(b, sk, hkv, d, generator=g, device=device, dtype=dtype)
        vc = torch.randn(b, sk, hkv, d, generator=g, device=device, dtype=dtype)
        table = None
    return kc, vc, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sq", type=int, default=1)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--sks", default=None, help="comma-separated Sk values (default 4k-128k)")
    ap.add_argument("--layouts", default="0,16,64", help="page sizes, 0 = contiguous")
    ap.add_argument("--candidates", default=None, help="indices into tuning_decode.CANDIDATES")
    args = ap.parse_args()
    b, hq, hkv, d, sq = 8, args.hq, args.hkv, 128, args.sq
    dtype = torch.bfloat16
    sks = [4096, 32768] if args.quick else [4096, 16384, 65536, 131072]
    if args.sks:
        sks = [int(x) for x in args.sks.split(",")]
    cands = T.CANDIDATES[:3] if args.quick else T.CANDIDATES
    if args.candidates:
        cands = tuple(T.CANDIDATES[int(i)] for i in args.candidates.split(","))
    layouts = [int(x) for x in args.layouts.split(",")]
    print(f"device {torch.cuda.get_device_name()}, B={b} Sq={sq} Hq={hq} Hkv={hkv} D={d} bf16")
    print("GB/s of K+V read once; 'copy' = read+write bytes per second of a torch copy of the "
          "K cache (the HBM ceiling)")
    header = ["Sk", "layout", "sdpa-cudnn", "copy"] + [f"c{i}" for i in range(len(cands))]
    for i, c in enumerate(cands):
        print(f"  c{i}: {c.label()}")
    print(" | ".join(header))
    for sk in sks:
        nbytes = 2 * b * sk * hkv * d * 2
        for page in layouts:
            kc, vc, table = make(b, sk, hkv, d, page, dtype)
            q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype)
            lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
            p = DecodeParams(scale=1 / math.sqrt(d), causal=True, window_left=None, window_right=0,
                             softcap=None, alibi=False, num_splits=None, page_size=page,
                             return_lse=False)
            row = [str(sk), f"page{page}" if page else "contig"]
            if page == 0:
                qs = q.transpose(1, 2)
                ks, vs = kc.transpose(1, 2), vc.transpose(1, 2)
                try:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def sdpa():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return torch.nn.functional.scaled_dot_product_attention(
                                qs, ks, vs, enable_gqa=True)

                    row.append(f"{gbps(nbytes, triton.testing.do_bench(sdpa)):.0f}")
                except Exception as e:  # noqa: BLE001 - report, keep going
                    row.append(f"n/a ({type(e).__name__})")
                dst = torch.empty_like(kc)
                ms = triton.testing.do_bench(lambda: dst.copy_(kc))
                row.append(f"{gbps(2 * kc.numel() * kc.element_size(), ms):.0f}")
                del dst
            else:
                row += ["", ""]
            ref = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                  causal=True, backend="reference").float()
            scale_ref = ref.abs().max().item()
            for c in cands:
                try:
                    out, _ = _decode.decode(q, kc, vc, lens, table, None, p, config=c)
                    err = (out.float() - ref).abs().max().item() / scale_ref
                    if err > 2e-2:  # relative to the largest output: wiring, not rounding
                        row.append(f"WRONG({err:.1e})")
                        continue
                    ms = triton.testing.do_bench(
                        lambda c=c: _decode.decode(q, kc, vc, lens, table, None, p, config=c))
                    row.append(f"{gbps(nbytes, ms):.0f}")
                except Exception as e:  # noqa: BLE001 - out of resources etc.: report, keep going
                    row.append(f"fail({type(e).__name__})")
            print(" | ".join(row), flush=True)
            kc = vc = table = None  # free the caches before the next layout
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
