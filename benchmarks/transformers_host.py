"""Where the transformers integration's time goes on a GPU: host cost per attention call, host
synchronizations, and a profile of one model forward, flashmux ("fmx") against "sdpa".

    python benchmarks/transformers_host.py            # GPU: about 30-60 s
    python benchmarks/transformers_host.py --quick    # tiny shapes, any device (smoke test)

1. Host microseconds per attention call (the Python + launch cost the CPU pays, measured as
   the wall time of N back-to-back calls on small tensors, GPU work far shorter than the host
   work): SDPA (enable_gqa, as transformers' sdpa calls it), the integration's attention
   function, `flashmux.attention` on the same tensors, and both with the prepared fast path off
   (FLASHMUX_ATTENTION_FASTPATH's switch), no grad and with grad (forward only: the autograd
   graph is built but no backward runs).
2. Synchronizing CUDA calls during one no-grad model forward (torch.cuda.set_sync_debug_mode),
   with the Python line that made each one.
3. torch.profiler of one no-grad forward of the Llama-shaped model (B4 S2048, 4 layers, GQA
   4:1, bf16) per implementation: wall time, GPU busy time, the CUDA runtime calls that block
   (cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy*), and the top GPU kernels.
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings

import torch
import transformers

import flashmux
from flashmux import _prepared
from flashmux.integrations import transformers as fmx_tf


def host_us(fn, n, rounds, device):
    """Best per-call host microseconds over `rounds` runs of n calls (no sync inside a run)."""
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return best


def per_call(args, device, dtype):
    b, s, hq, hkv = 1, 128, 16, 4
    print(f"\n1. host us per attention call (B{b} S{s} Hq{hq} Hkv{hkv}, causal, {dtype})")
    mod = torch.nn.Module()
    mod.is_causal = True
    for d in (64, 128):
        for grad in (False, True):
            # (B, H, S, D) views of (B, S, H, D) tensors, as the projections make them
            q = torch.randn(b, s, hq, d, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(b, s, hkv, d, device=device, dtype=dtype).transpose(1, 2)
            v = torch.randn(b, s, hkv, d, device=device, dtype=dtype).transpose(1, 2)
            if grad:
                q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            sc = d ** -0.5

            def sdpa(q=q, k=k, v=v, sc=sc):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=sc, enable_gqa=True).transpose(1, 2).contiguous()

            def integ(q=q, k=k, v=v, sc=sc):
                return fmx_tf.attention_forward(mod, q, k, v, None, scaling=sc)[0]

            def direct(q=q, k=k, v=v, sc=sc):
                return flashmux.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          causal=True, scale=sc)

            row = []
            for name, fn, fast in (("sdpa", sdpa, True), ("fmx", integ, True),
                                   ("direct", direct, True), ("fmx_nofast", integ, False),
                                   ("direct_nofast", direct, False)):
                _prepared.ENABLED = fast
                try:
                    if grad:
                        us = host_us(fn, args.n, args.rounds, device)
                    else:
                        with torch.no_grad():
                            us = host_us(fn, args.n, args.rounds, device)
                finally:
                    _prepared.ENABLED = True
                row.append(f"{name} {us:6.1f}")
            print(f"  D{d} {'grad  ' if grad else 'nograd'}: " + " | ".join(row), flush=True)


def model_for(impl, head_dim, args, device, dtype):
    heads = 4 if args.quick else 16
    cfg = transformers.LlamaConfig(
        vocab_size=256 if args.quick else 32000, hidden_size=heads * head_dim,
        intermediate_size=(2 if args.quick else 4) * heads * head_dim,
        num_hidden_layers=2 if args.quick else 4, num_attention_heads=heads,
        num_key_value_heads=heads // 4, max_position_embeddings=8192, head_dim=head_dim)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl,
                                                         dtype=dtype).to(device)


def syncs(args, device, dtype, ids):
    print("\n2. synchronizing CUDA calls in one no-grad forward (d64)")
    if device.type != "cuda":
        print("  (no CUDA device: skipped)")
        return
    for impl in ("sdpa", fmx_tf.NAME):
        model = model_for(impl, 64, args, device, dtype)
        with torch.no_grad():
            model.model(ids, use_cache=False)  # warm: caches filled
            torch.cuda.synchronize()
            seen = []
            old = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                stack = [f for f in traceback.extract_stack()[:-1]
                         if "warnings" not in f.filename][-6:]
                seen.append((str(message)[:80], [f"{f.filename.split('site-packages/')[-1]}:"
                                                 f"{f.lineno} {f.name}" for f in stack]))
            warnings.showwarning = show
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = show
                    torch.cuda.set_sync_debug_mode("warn")
                    model.model(ids, use_cache=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = old
            torch.cuda.synchronize()
        print(f"  {impl}: {len(seen)} synchronizing call(s)")
        for msg, stack in seen[:8]:
            print(f"    {msg}")
            for f in stack:
                print(f"      {f}")
        del model
        torch.cuda.empty_cache()


def profile(args, device, dtype, ids):
    print("\n3. profile of one no-grad model forward")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for d in (64, 128):
        for impl in ("sdpa", fmx_tf.NAME):
            model = model_for(impl, d, args, device, dtype)
            with torch.no_grad():
                for _ in range(3):
                    model.model(ids, use_cache=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with tprofile(activities=acts) as prof:
                    model.model(ids, use_cache=False)
                    host = time.perf_counter() - t0
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            ev = prof.key_averages()
            gpu = sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / 1e3
            block = {e.key: (e.count, e.cpu_time_total / 1e3) for e in ev
                     if e.key.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                          "cudaMemcpy", "cudaEventSynchronize"))}
            print(f"  D{d} {impl:5}: wall {wall * 1e3:.2f} ms (host enqueue {host * 1e3:.2f} ms), "
                  f"GPU kernels {gpu:.2f} ms; blocking runtime calls: {block or 'none'}")
            top = sorted(ev, key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:6]
            for e in top:
                t = (getattr(e, "self_device_time_total", 0) or 0) / 1e3
                if t:
                    print(f"      {t:7.3f} ms x{e.count:<4} {e.key[:90]}")
            cpu_top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
            print("      host, self time: " + "; ".join(
                f"{e.key[:48]} {e.self_cpu_time_total / 1e3:.2f} ms x{e.count}" for e in cpu_top))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=300, help="calls per timing run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: 1,2,3")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.n, args.rounds = min(args.n, 50), min(args.rounds, 2)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    skip = set(args.skip.split(","))
    batch, seq = (2, 64) if args.quick else (4, 2048)
    ids = torch.randint(0, 256, (batch, seq), device=device)
    if "1" not in skip:
        per_call(args, device, dtype)
    if "2" not in skip:
        syncs(args, device, dtype, ids)
    if "3" not in skip:
        profile(args, device, dtype, ids)


if __name__ == "__main__":
    main()
