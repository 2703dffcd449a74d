"""Decode (KV-cache) GB/s of one backend's kernel variants: forced split counts and tuning configs,
next to an HBM read ceiling (and, unless --no-anchors, the framework's cuDNN attention), on the
harness decode sweep's problem. GPU only. The default configurations and the anchors across
backends are the harness's job (`python -m flashmux bench --sweep decode`); this script is for
picking a backend's defaults.

    python benchmarks/decode_variants.py triton                         # default config, Sk 4k-128k
    python benchmarks/decode_variants.py triton --configs all --quick   # every tuning_decode candidate
    python benchmarks/decode_variants.py triton --configs 0,1,8 --sk 65536,131072
    python benchmarks/decode_variants.py cuda --splits auto,1,4,8,16,32 --sk 4096,131072
    FLASHMUX_CUDA_NVCC_FLAGS="-DFMX_DECODE_PREFETCH=1" python benchmarks/decode_variants.py cuda
    python benchmarks/decode_variants.py pallas --configs all --pages 16 --splits auto,4,16

Problem: B=8, Hq=32, Hkv=8, D=128, bf16, causal (bottom-right), Sq 1 (--sq 1,4), full caches,
contiguous and paged (--pages, in-order block tables; --shuffle permutes them). GB/s counts the
bytes of K and V read once: 2 * B * Sk * Hkv * D * 2. Every variant is first checked against
the reference backend on the same inputs (WRONG: max error above 2% of the largest output).
Timing: torch backends replay a CUDA graph of --inner calls (no Python or launch cost in the
figure, as a serving engine that captures its decode step sees it; median of --reps; a call
that cannot be captured is timed between CUDA events instead, and the output says so); pallas
dispatches --inner jitted calls back to back (host dispatch overlaps the kernels; best of
--reps). Variants (--configs): triton, flashmux_triton.tuning_decode.CANDIDATES (indices or
"all"); pallas, the (block_n, num_warps, num_stages) list PALLAS_CONFIGS below; cuda has none
(its variants are builds: FLASHMUX_CUDA_NVCC_FLAGS, FLASHMUX_CUDA_DECODE_PROGRAMS_PER_SM).
"""

from __future__ import annotations

import argparse
import statistics
import time

# (block_n, num_warps, num_stages) for flashmux_pallas.decode.tuning
PALLAS_CONFIGS = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 8, 2), (64, 4, 4)]


def graph_time(fn, inner: int, reps: int) -> float:
    """Seconds per call: median over reps of a CUDA graph replay of `inner` calls."""
    import torch

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


def event_time(fn, inner: int, reps: int) -> float:
    """Seconds per call without a graph (when capture fails): median over reps of `inner`
    back-to-back calls between two CUDA events (host launch cost included where it exceeds
    the kernel's)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


def wall_time(fn, inner: int, reps: int) -> float:
    """Seconds per call on a CPU: best over reps of `inner` calls."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def jax_time(fn, args, inner: int, reps: int) -> float:
    """Seconds per call: best over reps of `inner` asynchronous calls of a jitted function."""
    import jax

    def block(out):
        jax.tree_util.tree_map(lambda x: x.block_until_ready(), out)

    block(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        block(out)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


class Torch:
    """triton and cuda: the caches as torch tensors, timed by CUDA graph replay."""

    def __init__(self, backend: str, args):
        import torch

        self.torch, self.backend, self.args = torch, backend, args
        # without a GPU (a smoke test, TRITON_INTERPRET=1): the CPU, timed by the wall clock
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dt = getattr(torch, args.dtype)
        self.name = torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu"
        if backend == "cuda":
            from flashmux import dispatch
            from flashmux_cuda import torch_glue

            be = dispatch.get_backend("cuda")
            reasons = dispatch.availability(be)
            if reasons:
                raise SystemExit("cuda backend unavailable: " + "; ".join(reasons))
            self.glue, self.lib = torch_glue, be.lib

    def problem(self, b, sq, sk, hq, hkv, d, seed):
        torch = self.torch
        g = torch.Generator(device=self.dev).manual_seed(seed)
        k = torch.randn((b, sk, hkv, d), generator=g, device=self.dev, dtype=self.dt)
        v = torch.randn((b, sk, hkv, d), generator=g, device=self.dev, dtype=self.dt)
        q = torch.randn((b, sq, hq, d), generator=g, device=self.dev, dtype=self.dt)
        return q, k, v, torch.full((b,), sk, dtype=torch.int32, device=self.dev)

    def lengths(self, lens):
        return self.torch.tensor(lens, dtype=self.torch.int32, device=self.dev)

    def paged(self, k, v, page, shuffle, seed):
        torch = self.torch
        b, sk, hkv, d = k.shape
        n = b * (sk // page)
        order = (torch.randperm(n, generator=torch.Generator(device=self.dev).manual_seed(seed),
                                device=self.dev) if shuffle else torch.arange(n, device=self.dev))
        kc = torch.empty((n, page, hkv, d), dtype=k.dtype, device=self.dev)
        vc = torch.empty_like(kc)
        kc[order] = k.reshape(n, page, hkv, d)
        vc[order] = v.reshape(n, page, hkv, d)
        return kc, vc, order.to(torch.int32).view(b, sk // page)

    def call(self, q, kc, vc, lens, table, page, splits, cfg):
        import math

        from flashmux.kvcache import DecodeParams

        p = DecodeParams(scale=1 / math.sqrt(q.shape[-1]), causal=True, window_left=None,
                         window_right=0, softcap=None, alibi=False, num_splits=splits,
                         page_size=page, return_lse=False)
        if self.backend == "cuda":
            return lambda: self.glue.decode(self.lib, q, kc, vc, lens, table, None, p)
        from flashmux_triton import _decode

        return lambda: _decode.decode(q, kc, vc, lens, table, None, p, config=cfg)

    def time(self, fn):
        if self.dev.type != "cuda":
            return wall_time(fn, self.args.inner, self.args.reps)
        try:
            return graph_time(fn, self.args.inner, self.args.reps)
        except Exception as e:  # noqa: BLE001 - capture unsupported: time it eagerly, say so
            print(f"# CUDA graph capture failed ({type(e).__name__}: {str(e)[:80]}); "
                  "the next row is timed without a graph", flush=True)
            self.torch.cuda.synchronize()
            return event_time(fn, self.args.inner, self.args.reps)

    def anchor(self, q, k, v):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def sdpa():  # Sq > 1 attends to every key (no bottom-right causal here): the same bytes
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        return "sdpa-cudnn", sdpa

    def ceiling(self, k, v):
        torch = self.torch
        return lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32))

    def read_ceilings(self, k, v):
        """(label, fn) of Triton read kernels over K and V (the HBM read ceiling: session 7's
        torch.sum read slower than the decode kernel, so it bounded nothing)."""
        if self.dev.type != "cuda":
            return []
        return [(f"read {label}", fn) for label, fn in _triton_read(k, v)]

    def err(self, out, ref):
        o = out[0] if isinstance(out, tuple) else out
        return ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class Jax:
    """pallas: the caches as JAX arrays, timed by back-to-back jitted calls."""

    def __init__(self, backend: str, args):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.args = jax, jnp, args
        self.dt = getattr(jnp, args.dtype)
        self.name = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"

    def problem(self, b, sq, sk, hq, hkv, d, seed):
        jax, jnp = self.jax, self.jnp
        kk, kv, kq = jax.random.split(jax.random.PRNGKey(seed), 3)
        k = jax.random.normal(kk, (b, sk, hkv, d), self.dt)
        v = jax.random.normal(kv, (b, sk, hkv, d), self.dt)
        q = jax.random.normal(kq, (b, sq, hq, d), self.dt)
        return q, k, v, jnp.full((b,), sk, jnp.int32)

    def lengths(self, lens):
        return self.jnp.asarray(lens, self.jnp.int32)

    def paged(self, k, v, page, shuffle, seed):
        jax, jnp = self.jax, self.jnp
        b, sk, hkv, d = k.shape
        n = b * (sk // page)
        order = (jax.random.permutation(jax.random.PRNGKey(seed), n) if shuffle
                 else jnp.arange(n)).astype(jnp.int32)
        kc = jnp.zeros((n, page, hkv, d), k.dtype).at[order].set(k.reshape(n, page, hkv, d))
        vc = jnp.zeros((n, page, hkv, d), v.dtype).at[order].set(v.reshape(n, page, hkv, d))
        return kc, vc, order.reshape(b, sk // page)

    def call(self, q, kc, vc, lens, table, page, splits, cfg):
        import flashmux
        from flashmux_pallas import decode

        if cfg is None:
            kw = {}
        elif isinstance(cfg, dict):  # --tune: decode.tuning fields
            kw = cfg
        else:
            kw = dict(block_n=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
        def step(q, kc, vc, lens, table):
            return flashmux.attention_with_kvcache(
                q, kc, vc, cache_seqlens=lens, block_table=table, causal=True,
                num_splits=splits, backend="pallas")

        with decode.tuning(**kw):  # read at trace time: trace here
            fn = self.jax.jit(step)
            fn.lower(q, kc, vc, lens, table)
            out = fn(q, kc, vc, lens, table)
            if self.args.jax_loop:
                return self.looped(step, q, kc, vc, lens, table), out
        return lambda: fn(q, kc, vc, lens, table), out

    def looped(self, step, q, *rest, eager=True):
        """--jax-loop: one jitted call running `inner` steps in a fori_loop, each step's query
        the previous step's output (a true dependence: nothing is hoisted or merged), so the
        figure is device time with no per-call host dispatch, as a CUDA graph replay gives the
        torch rows. Returns a callable marked with the step count it runs."""
        lax, n = self.jax.lax, self.args.inner

        def many(q, *rest):
            if self.args.jax_unroll:  # straight-line steps: no loop predicate read per step
                x = q
                for _ in range(n):
                    x = step(x, *rest).astype(x.dtype)
                return x
            return lax.fori_loop(0, n, lambda i, x: step(x, *rest).astype(x.dtype), q)

        f = self.jax.jit(many)
        if eager:  # compiled here: the decode's tuning fields are read at trace time
            f = f.lower(q, *rest).compile()

        def run():
            return f(q, *rest)

        run.looped = n
        return run

    # The arrays are jit arguments, never closed over: a closed-over array is a constant of the
    # compiled program, and XLA constant-folds a sum of it on the host (a 1 GiB cache at 32k:
    # minutes; session 8's pallas lines were cut by their limits there, before any kernel row).
    def anchor(self, q, k, v):
        def step(q, k, v):
            return self.jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

        if self.args.jax_loop:
            return "jax-cudnn", self.looped(step, q, k, v, eager=False)
        f = self.jax.jit(step)
        return "jax-cudnn", lambda: f(q, k, v)

    def ceiling(self, k, v):
        jnp = self.jnp
        f = self.jax.jit(lambda k, v: (jnp.sum(k, dtype=jnp.float32),
                                       jnp.sum(v, dtype=jnp.float32)))
        return lambda: f(k, v)

    def time(self, fn):
        n = getattr(fn, "looped", 0)
        if n:  # one dispatch of n device-side steps
            return jax_time(fn, (), 1, self.args.reps) / n
        return jax_time(fn, (), self.args.inner, self.args.reps)

    def err(self, out, ref):
        jnp = self.jnp
        o = out[0] if isinstance(out, tuple) else out
        return float(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32)).max()
                     / jnp.abs(ref.astype(jnp.float32)).max())


def _triton_read(k, v):
    """Triton kernels that only read K and V (16-byte loads, a float32 sum per program so the
    loads are not dropped): one per (tile elements, warps, programs per SM) shape; the fastest
    is the in-run read ceiling."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def read2(X, Y, OUT, n, per_prog, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * per_prog
        for i in range(0, per_prog, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            m = offs < n
            acc += tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
            acc += tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + pid, tl.sum(acc, 0))

    x, y = k.reshape(-1), v.reshape(-1)
    n = x.numel()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    out = []
    for block, warps, per_sm in ((4096, 8, 4), (8192, 8, 2), (2048, 4, 8), (4096, 4, 16)):
        progs = sms * per_sm
        per_prog = triton.cdiv(triton.cdiv(n, progs), block) * block
        grid = (triton.cdiv(n, per_prog),)
        acc = torch.empty(grid[0], dtype=torch.float32, device=x.device)

        def fn(grid=grid, per_prog=per_prog, block=block, warps=warps, acc=acc):
            read2[grid](x, y, acc, n, per_prog, BLOCK=block, num_warps=warps)
            return acc

        out.append((f"{block}x{warps}w {per_sm}/SM", fn))
    return out


def interleaved(entries, rounds: int, fw, row) -> None:
    """--rounds: time every entry once per round, in order, `rounds` times (a drift of the
    GPU's clocks or of a neighbour's load lands on every entry alike), then one row per entry
    with the median, and a '# spread' line: min-max, and the per-round ratio of the first
    entry's time (the anchor, when there is one) to this entry's (> 1: faster than it)."""
    import math

    times: list[list[float]] = [[] for _ in entries]
    for _ in range(rounds):
        for i, e in enumerate(entries):
            try:
                times[i].append(fw.time(e[4]))
            except Exception as ex:  # noqa: BLE001 - report it once, go on
                times[i].append(math.nan)
                print(f"# {e[1]} {e[3]}: {type(ex).__name__}: {str(ex)[:80]}", flush=True)
    for e, ts in zip(entries, times):
        ok = [t for t in ts if t == t]
        row(e[0], e[1], e[2], e[3], statistics.median(ok) if ok else "failed", nbytes=e[5])
    # per-round ratios (the same round's times: paired) to the first entry (the anchor) and,
    # for the page bars, to the contiguous cache's default row (GB/s ratio: its time / this)
    bases = [(entries[0][1], times[0])]
    contig = [i for i, e in enumerate(entries) if e[0] == "contig"
              and e[1].startswith("flashmux-") and e[2] == "auto" and e[3] == "default"]
    if contig:
        bases.append(("contig default", times[contig[0]]))
    for e, ts in zip(entries, times):
        ok = [t for t in ts if t == t]
        if not ok:
            continue
        parts = []
        for name, base in bases:
            ratios = [b / t for b, t in zip(base, ts) if b == b and t == t]
            if ratios:
                parts.append(f"x {name} per round: median {statistics.median(ratios):.3f}, "
                             f"{min(ratios):.3f}-{max(ratios):.3f}")
        print(f"# spread | {e[0]} | {e[1]} | {e[2]} | {e[3]} | {min(ok) * 1e6:.1f}-"
              f"{max(ok) * 1e6:.1f} us over {len(ok)} rounds | "
              + (" | ".join(parts) or "no base time"), flush=True)


def ragged_lengths(b: int, sk: int) -> list[int]:
    """The harness decode sweep's ragged cache_seqlens (shapes._kvcache_points)."""
    import numpy as np

    rng = np.random.default_rng(sk)
    lens = [int(n) for n in rng.integers(max(1, sk // 8), sk + 1, b)]
    return [sk] + lens[1:]


def tune_variants(text: str):
    """--tune "num_stages=3;waves=1,num_stages=3": pallas variants as flashmux_pallas.decode
    tuning fields, one variant per ';'-separated group."""
    out = []
    for group in (g.strip() for g in text.split(";")):
        if not group:
            continue
        kw = {}
        for part in group.split(","):
            name, _, val = part.partition("=")
            kw[name.strip()] = int(val)
        out.append((kw, group))
    return out


def variants(backend: str, configs: str):
    if backend == "triton":
        from flashmux_triton import tuning_decode as T

        if not configs:
            return [(None, "default")]
        if configs == "all":
            return [(c, f"c{i} {c.label()}") for i, c in enumerate(T.CANDIDATES)]
        # "d": the default (tuning_decode.config_for) among the indices
        return [(None, "default") if i == "d" else
                (T.CANDIDATES[int(i)], f"c{i} {T.CANDIDATES[int(i)].label()}")
                for i in configs.split(",")]
    if backend == "pallas":
        if not configs:
            return [(None, "default")]
        idx = (range(len(PALLAS_CONFIGS)) if configs == "all"
               else [int(i) for i in configs.split(",")])
        return [(None, "default")] + [(PALLAS_CONFIGS[i], "bn{} w{} s{}".format(*PALLAS_CONFIGS[i]))
                                      for i in idx]
    if configs:
        raise SystemExit("cuda has no runtime configs: its variants are builds "
                         "(FLASHMUX_CUDA_NVCC_FLAGS)")
    return [(None, "default")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("backend", choices=["triton", "cuda", "pallas"])
    ap.add_argument("--sk", default="4096,16384,65536,131072")
    ap.add_argument("--sq", default="1")
    ap.add_argument("--pages", default="0,16,64", help="page sizes, 0 = contiguous cache")
    ap.add_argument("--shuffle", action="store_true", help="permuted block tables")
    ap.add_argument("--splits", default="auto", help="auto and/or forced split counts")
    ap.add_argument("--configs", default="",
                    help="'all' or indices (see the module doc); triton: 'd' is the default")
    ap.add_argument("--tune", default="",
                    help="pallas: extra variants as decode.tuning fields, ';' between variants "
                         "(e.g. 'num_stages=3;waves=1,num_stages=3;mosaic=1')")
    ap.add_argument("--tune-pages", default="",
                    help="pallas: run the --tune variants only on these page sizes (0 = "
                         "contiguous), e.g. '0': the default on every cache, a variant's own "
                         "contiguous rate beside it")
    ap.add_argument("--no-default", action="store_true",
                    help="pallas: leave out the default row (--configs/--tune rows only)")
    ap.add_argument("--quick", action="store_true", help="Sk 4k and 32k")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32,8", help="Hq,Hkv")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the float64 check of each variant (its host time at long caches)")
    ap.add_argument("--ragged", action="store_true",
                    help="ragged cache_seqlens over [Sk/8, Sk] (the harness's); GB/s counts the "
                         "bytes actually read")
    ap.add_argument("--no-read-ceiling", action="store_true",
                    help="no Triton read-only kernels (the in-run HBM read ceiling)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the anchor and every variant of one length this many times, "
                         "round-robin (interleaved); the rows give the median, '# spread' "
                         "lines the min-max and each variant's per-round ratio to the anchor")
    ap.add_argument("--jax-unroll", action="store_true",
                    help="with --jax-loop: the --inner steps unrolled in the jitted function (no "
                         "while loop: XLA may read a loop's predicate on the host every step)")
    ap.add_argument("--jax-loop", action="store_true",
                    help="pallas: time --inner steps inside one jitted fori_loop (device time, "
                         "no per-call host dispatch) instead of --inner back-to-back calls")
    args = ap.parse_args(argv)

    import flashmux

    fw = Jax(args.backend, args) if args.backend == "pallas" else Torch(args.backend, args)
    b, d = args.batch, args.head_dim
    hq, hkv = (int(x) for x in args.heads.split(","))
    sks = [4096, 32768] if args.quick else [int(x) for x in args.sk.split(",")]
    vs = variants(args.backend, args.configs)
    if args.tune:
        if args.backend != "pallas":
            raise SystemExit("--tune is for pallas (triton: --configs, FLASHMUX_TRITON_DECODE)")
        vs = vs + tune_variants(args.tune)
    if args.no_default:
        vs = [x for x in vs if x[0] is not None] or vs
    print(f"# {fw.name} {args.backend} B={b} Hq={hq} Hkv={hkv} D={d} {args.dtype}; "
          "GB/s of K+V read once" + ("; ragged cache_seqlens" if args.ragged else ""))
    print("| Sq | Sk | cache | impl | splits | config | us | GB/s |\n|---|---|---|---|---|---|---|---|")
    for sq in (int(x) for x in args.sq.split(",")):
        for sk in sks:
            q, k, v, lens = fw.problem(b, sq, sk, hq, hkv, d, seed=sk)
            keys = b * sk
            if args.ragged:  # the harness's ragged batch: lengths over [Sk/8, Sk], the first full
                rl = ragged_lengths(b, sk)
                lens = fw.lengths(rl)
                keys = sum(rl)
            # bytes of the keys actually read (the cache_seqlens), K and V once
            nbytes = 2 * keys * hkv * d * (2 if "16" in args.dtype else 4)
            full = 2 * b * sk * hkv * d * (2 if "16" in args.dtype else 4)  # what a ceiling reads

            def row(cache, impl, splits, cfg, sec, sq=sq, sk=sk, nbytes=nbytes):
                gb = f"{nbytes / sec / 1e9:.0f}" if isinstance(sec, float) else sec
                us = f"{sec * 1e6:.1f}" if isinstance(sec, float) else "-"
                print(f"| {sq} | {sk} | {cache} | {impl} | {splits} | {cfg} | {us} | {gb} |",
                      flush=True)

            # --rounds: what to time, then every entry once per round, round-robin
            pending: list = []

            def timed(cache, impl, splits, cfg, fn, nb=nbytes):
                if args.rounds > 1:
                    pending.append((cache, impl, splits, cfg, fn, nb))
                    return
                try:
                    sec = fw.time(fn)
                except Exception as ex:  # noqa: BLE001 - not every cuDNN takes this shape
                    sec = f"{type(ex).__name__}: {str(ex)[:80]}"
                row(cache, impl, splits, cfg, sec, nbytes=nb)

            # the anchor and ceilings first: a run cut by its time limit still has them
            if not args.no_anchors:
                name, fn = fw.anchor(q, k, v)
                if args.ragged:  # no cache lengths: it reads every key of the padded batch
                    name += " (padded batch: reads every key; GB/s of the ragged bytes)"
                timed("contig", name, "-", "-", fn)
            timed("contig", "ceiling (sum of K, V)", "-", "-", fw.ceiling(k, v), full)
            if not args.no_read_ceiling:
                for label, fn in getattr(fw, "read_ceilings", lambda k, v: [])(k, v):
                    timed("contig", f"ceiling ({label})", "-", "-", fn, full)
            ref = None if args.no_check else flashmux.attention_with_kvcache(
                q, k, v, cache_seqlens=lens, causal=True, backend="reference")
            for page in (int(x) for x in args.pages.split(",")):
                if page and sk % page:
                    continue
                kc, vc, table = (fw.paged(k, v, page, args.shuffle, sk) if page
                                 else (k, v, None))
                cache = f"page{page}" if page else "contig"
                for sp in args.splits.split(","):
                    ns = None if sp == "auto" else int(sp)
                    for cfg, label in vs:
                        if (args.tune_pages and isinstance(cfg, dict)
                                and str(page) not in args.tune_pages.split(",")):
                            continue
                        try:
                            if isinstance(fw, Jax):
                                fn, out = fw.call(q, kc, vc, lens, table, page, ns, cfg)
                            else:
                                fn = fw.call(q, kc, vc, lens, table, page, ns, cfg)
                                out = fn()
                            e = 0.0 if ref is None else fw.err(out, ref)
                        except Exception as ex:  # noqa: BLE001 - out of resources etc.: report
                            row(cache, f"flashmux-{args.backend}", sp, label,
                                f"{type(ex).__name__}: {str(ex)[:80]}")
                            continue
                        if e > 2e-2:
                            row(cache, f"flashmux-{args.backend}", sp, label, f"WRONG ({e:.1e})")
                            continue
                        timed(cache, f"flashmux-{args.backend}", sp, label, fn)
                kc = vc = table = None
            if pending:
                interleaved(pending, args.rounds, fw, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
