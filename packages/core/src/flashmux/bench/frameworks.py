"""Per-framework plumbing: random inputs, layout conversion, the three modes, timing, memory.

Each framework (torch, jax, numpy) exposes the same small surface so the runner stays generic:

- ``make_sets(impl, point, n, seed)``: n independent random input sets (q, k, v, do) in the
  implementation's layout, on the device (never zeros; rotated so the cache isn't measured);
- ``from_numpy`` / ``to_numpy64``: move check inputs in and results out (flashmux layout BSHD,
  or packed THD for varlen);
- ``prepare(impl, fn, sets, mode)``: a zero-argument-per-set callable ``call(i)`` for the mode;
- ``time(call, n, ...)``: per-call times in ms (device events / block_until_ready);
- ``peak_memory(...)``: peak extra device memory of one call, in bytes.

Frameworks are imported lazily: `import flashmux` never imports torch or jax.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .shapes import DTYPES, Point

# JAX timing: calls are enqueued in groups of about this many seconds, then blocked on once.
_JAX_GROUP_S = 0.02
_JAX_MAX_GROUP = 200


def _shape(point: Point, which: str, layout: str, heads_q: int, heads_kv: int, dv: int):
    """Shape of q/k/v/do for a point in a layout ('bshd' or 'bhsd'; varlen packs)."""
    h = heads_q if which in ("q", "do") else heads_kv
    d = point.head_dim if which in ("q", "k") else dv
    if point.varlen:
        t = point.total_q if which in ("q", "do") else point.total_k
        return (t, h, d) if layout == "bshd" else (1, h, t, d)
    s = point.seqlen_q if which in ("q", "do") else point.seqlen_k
    return (point.batch, s, h, d) if layout == "bshd" else (point.batch, h, s, d)


def shapes_for(point: Point, layout: str):
    return tuple(
        _shape(point, w, layout, point.heads_q, point.heads_kv, point.head_dim)
        for w in ("q", "k", "v", "do")
    )


def bshd_to_layout_np(x: np.ndarray, layout: str, varlen: bool) -> np.ndarray:
    if layout == "bshd":
        return x
    if varlen:  # (T, H, D) -> (1, H, T, D)
        return np.ascontiguousarray(x.transpose(1, 0, 2)[None])
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


def layout_to_bshd_np(x: np.ndarray, layout: str, varlen: bool) -> np.ndarray:
    if layout == "bshd":
        return x
    if varlen:  # (1, H, T, D) -> (T, H, D)
        return x[0].transpose(1, 0, 2)
    return x.transpose(0, 2, 1, 3)


def is_oom(exc: BaseException) -> bool:
    s = f"{type(exc).__name__}: {exc}".lower()
    return (
        "out of memory" in s
        or "outofmemory" in s
        or "resource_exhausted" in s
        or "resource exhausted" in s
        or "failed to allocate" in s
    )


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


class Framework:
    name = "base"
    device = "cpu"

    def __init__(self, device: str):
        self.device = device

    def available(self) -> str | None:  # reason it can't run, or None
        return None

    def info(self) -> dict:
        return {}

    def dtype_of(self, dt: str):
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
class TorchFW(Framework):
    name = "torch"

    def __init__(self, device: str):
        super().__init__(device)
        import torch

        self.torch = torch

    def dtype_of(self, dt: str):
        return getattr(self.torch, DTYPES[dt])

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def make_sets(self, impl, point: Point, n: int, seed: int):
        t = self.torch
        dt = self.dtype_of(impl.dtype_for(point))
        g = t.Generator(device=self.device)
        g.manual_seed(seed)
        scale = impl.input_q_scale(point)
        sets = []
        for _ in range(n):
            xs = [
                t.randn(s, generator=g, device=self.device, dtype=t.float32).to(dt)
                for s in shapes_for(point, impl.layout)
            ]
            if scale != 1.0:
                xs[0] = (xs[0].float() * scale).to(dt)
            sets.append(xs)
        return sets

    def from_numpy(self, x: np.ndarray, dt: str):
        t = self.torch
        return (
            t.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            .to(self.device)
            .to(self.dtype_of(dt))
        )

    def to_numpy64(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy().astype(np.float64)

    def int32(self, x: np.ndarray):
        return self.torch.from_numpy(np.asarray(x, dtype=np.int32)).to(self.device)

    def run_modes(self, fn, q, k, v, do, with_bwd: bool, impl=None, compiled=None):
        """One call, for the correctness check: (out, grads or None)."""
        t = self.torch
        if not with_bwd:
            with t.no_grad():
                return fn(q, k, v), None
        q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out = fn(q, k, v)
        grads = t.autograd.grad(out, (q, k, v), do)
        return out.detach(), grads

    def prepare(self, fn, sets, mode: str, impl=None, compiled=None):
        t = self.torch
        if mode == "fwd":

            def call(i):
                q, k, v, _ = sets[i]
                with t.no_grad():
                    return fn(q, k, v)

            return call
        leaves = [[x.detach().requires_grad_(True) for x in s[:3]] + [s[3]] for s in sets]
        if mode == "fwd_bwd":

            def call(i):
                q, k, v, do = leaves[i]
                out = fn(q, k, v)
                return t.autograd.grad(out, (q, k, v), do)

            return call
        # bwd: the forward (and its graph) is built once per set, outside the timing
        outs = [fn(*s[:3]) for s in leaves]

        def call(i):
            q, k, v, do = leaves[i]
            return t.autograd.grad(outs[i], (q, k, v), do, retain_graph=True)

        return call

    def time(
        self,
        call,
        n_sets: int,
        warmup: int,
        reps: int | None,
        target_s: float,
        min_reps: int,
        max_reps: int,
    ):
        t = self.torch
        for w in range(warmup):
            call(w % n_sets)
        if not self.cuda:
            t0 = time.perf_counter()
            call(0)
            est = time.perf_counter() - t0
            r = reps or int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
            out = []
            for i in range(r):
                t0 = time.perf_counter()
                call(i % n_sets)
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        self.sync()
        s, e = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
        s.record()
        call(0)
        e.record()
        e.synchronize()
        est = s.elapsed_time(e) / 1e3
        r = reps or int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
        starts = [t.cuda.Event(enable_timing=True) for _ in range(r)]
        ends = [t.cuda.Event(enable_timing=True) for _ in range(r)]
        for i in range(r):
            starts[i].record()
            call(i % n_sets)
            ends[i].record()
        self.sync()
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]

    def peak_memory(self, call) -> int | None:
        """Peak bytes allocated by one call beyond what was allocated before it."""
        if not self.cuda:
            return None
        t = self.torch
        self.sync()
        t.cuda.reset_peak_memory_stats()
        base = t.cuda.memory_allocated()
        res = call(0)
        self.sync()
        peak = t.cuda.max_memory_allocated() - base
        del res
        return int(peak)

    def device_memory(self) -> int | None:
        if not self.cuda:
            return None
        return int(self.torch.cuda.get_device_properties(0).total_memory)

    def l2_bytes(self) -> int:
        if not self.cuda:
            return 8 << 20
        return int(getattr(self.torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))

    def cleanup(self, full: bool = False):
        """Return cached blocks to the device; `full` also collects garbage (after an OOM)."""
        if full:
            import gc

            gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # plain attention (materialized, float32 softmax) in BSHD: the SPEC's yardstick
    def plain(self, q, k, v, point: Point, scale: float, cu_seqlens=None):
        t = self.torch
        if cu_seqlens is not None:
            cu = [int(c) for c in cu_seqlens]
            outs = []
            for b in range(len(cu) - 1):
                sl = slice(cu[b], cu[b + 1])
                outs.append(self.plain(q[sl][None], k[sl][None], v[sl][None], point, scale)[0])
            return t.cat(outs, 0)
        g = q.shape[2] // k.shape[2]
        if g > 1:
            k = k.repeat_interleave(g, dim=2)
            v = v.repeat_interleave(g, dim=2)
        s = t.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
        if point.causal:
            sq, sk = q.shape[1], k.shape[1]
            i = t.arange(sq, device=q.device)[:, None]
            j = t.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (sk - sq), float("-inf"))
        if point.mask is not None:  # masks sweep (bench/maskbench.py)
            from .maskbench import dense_mask, score_bias

            bias = score_bias(point.mask, q.shape[2], q.shape[1], k.shape[1])  # ALiBi specs
            if bias is not None:
                s = s + t.from_numpy(bias).to(q.device)
            ok = t.from_numpy(dense_mask(point.mask, q.shape[1], k.shape[1]).copy()).to(q.device)
            s = s.masked_fill(~ok, float("-inf"))
        p = t.softmax(s, dim=-1).to(q.dtype)
        return t.einsum("bhqk,bkhd->bqhd", p, v)


# --------------------------------------------------------------------------------------------
class JaxFW(Framework):
    name = "jax"

    def __init__(self, device: str):
        super().__init__(device)
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        plat = "gpu" if device == "cuda" else "cpu"
        try:
            self.dev = jax.devices(plat)[0]
        except RuntimeError:
            self.dev = jax.devices("cpu")[0]
            self.device = "cpu"

    def dtype_of(self, dt: str):
        return getattr(self.jnp, DTYPES[dt])

    def put(self, x):
        return self.jax.device_put(x, self.dev)

    def make_sets(self, impl, point: Point, n: int, seed: int):
        jax, jnp = self.jax, self.jnp
        dt = self.dtype_of(impl.dtype_for(point))
        key = jax.random.PRNGKey(seed)
        scale = impl.input_q_scale(point)
        sets = []
        with jax.default_device(self.dev):
            for _ in range(n):
                xs = []
                for s in shapes_for(point, impl.layout):
                    key, sub = jax.random.split(key)
                    xs.append(jax.random.normal(sub, s, jnp.float32).astype(dt))
                if scale != 1.0:
                    xs[0] = (xs[0].astype(jnp.float32) * scale).astype(dt)
                sets.append(xs)
        return sets

    def from_numpy(self, x: np.ndarray, dt: str):
        return self.put(self.jnp.asarray(np.asarray(x, np.float32)).astype(self.dtype_of(dt)))

    def to_numpy64(self, x) -> np.ndarray:
        return np.asarray(self.jax.device_get(x.astype(self.jnp.float32))).astype(np.float64)

    def int32(self, x: np.ndarray):
        return self.put(self.jnp.asarray(np.asarray(x, dtype=np.int32)))

    def _wrap(self, fn, impl):
        return self.jax.jit(fn) if impl is None or impl.jit else fn

    def mode_fn(self, fn, kind: str):
        """The function jitted for a kind: "fwd" (q, k, v) -> out; "fwd_bwd" (q, k, v, do) ->
        grads; "check" (q, k, v, do) -> (out, grads)."""
        jax = self.jax
        if kind == "fwd":
            return fn
        if kind == "fwd_bwd":

            def fb(q, k, v, do):
                out, vjp = jax.vjp(fn, q, k, v)
                return vjp(do)

            return fb

        def fbo(q, k, v, do):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(do)

        return fbo

    def abstract_args(self, impl, point: Point, kind: str):
        dt = self.dtype_of(impl.dtype_for(point))
        shapes = shapes_for(point, impl.layout)
        n = 3 if kind == "fwd" else 4
        return [self.jax.ShapeDtypeStruct(s, dt) for s in shapes[:n]]

    def compile_ahead(self, fn, impl, point: Point, kind: str):
        """Lower and compile without running (called from worker threads)."""
        f = self.jax.jit(self.mode_fn(fn, kind))
        return f.lower(*self.abstract_args(impl, point, kind)).compile()

    def run_modes(self, fn, q, k, v, do, with_bwd: bool, impl=None, compiled=None):
        if not with_bwd:
            f = self._wrap(fn, impl)
            return f(q, k, v), None
        f = compiled if compiled is not None else self._wrap(self.mode_fn(fn, "check"), impl)
        out, grads = f(q, k, v, do)
        return out, grads

    def prepare(self, fn, sets, mode: str, impl=None, compiled=None):
        jax = self.jax
        if mode in ("fwd", "fwd_bwd"):
            f = compiled if compiled is not None else self._wrap(self.mode_fn(fn, mode), impl)
            n = 3 if mode == "fwd" else 4

            def call(i):
                return f(*sets[i][:n])

            jitted = compiled is not None or impl is None or impl.jit
            call.jitted = (f, lambda: sets[0][:n]) if jitted else None
            call.compiled = compiled
            return call
        # bwd: residuals from one forward per set, outside the timing. The vjp function is a
        # pytree (jax.tree_util.Partial), so a jitted apply times the backward alone.
        vjps = [jax.vjp(fn, *s[:3])[1] for s in sets]
        apply = self._wrap(lambda vjp, do: vjp(do), impl)

        def call(i):
            return apply(vjps[i], sets[i][3])

        call.jitted = None
        call.compiled = None
        return call

    def time(
        self,
        call,
        n_sets: int,
        warmup: int,
        reps: int | None,
        target_s: float,
        min_reps: int,
        max_reps: int,
    ):
        block = self.jax.block_until_ready
        for w in range(warmup):
            block(call(w % n_sets))
        # Per-call estimate from a short burst: one call plus block_until_ready costs a host
        # round trip (measured ~0.2 ms on an H100 host) that is not the call's time.
        t0 = time.perf_counter()
        res = None
        for j in range(4):
            res = call(j % n_sets)
        block(res)
        est = max((time.perf_counter() - t0) / 4, 1e-6)
        # Enqueue a group of calls and block once, so that round trip is < ~1% of a group.
        group = int(min(_JAX_MAX_GROUP, max(1, math.ceil(_JAX_GROUP_S / est))))
        r = reps or int(min(max_reps, max(min_reps, target_s / (est * group))))
        out = []
        for i in range(r):
            t0 = time.perf_counter()
            res = None
            for j in range(group):
                res = call((i * group + j) % n_sets)
            block(res)
            out.append((time.perf_counter() - t0) * 1e3 / group)
        return out

    def peak_memory(self, call) -> int | None:
        """XLA's own account of the compiled call: temporaries plus outputs, in bytes."""
        j = getattr(call, "jitted", None)
        if not j:
            return None
        f, args = j
        try:
            comp = getattr(call, "compiled", None)
            if comp is None:
                comp = f.lower(*args()).compile()
            ma = comp.memory_analysis()
            if ma is None:
                return None
            return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
        except Exception:
            return None

    def device_memory(self) -> int | None:
        try:
            st = self.dev.memory_stats() or {}
            return int(st.get("bytes_limit")) if st.get("bytes_limit") else None
        except Exception:
            return None

    def l2_bytes(self) -> int:
        return 50 << 20 if self.device == "cuda" else 8 << 20

    def cleanup(self, full: bool = False):
        if full:
            import gc

            gc.collect()

    def plain(self, q, k, v, point: Point, scale: float, cu_seqlens=None):
        jnp = self.jnp
        if cu_seqlens is not None:
            cu = [int(c) for c in cu_seqlens]
            outs = [
                self.plain(
                    q[cu[b] : cu[b + 1]][None],
                    k[cu[b] : cu[b + 1]][None],
                    v[cu[b] : cu[b + 1]][None],
                    point,
                    scale,
                )[0]
                for b in range(len(cu) - 1)
            ]
            return jnp.concatenate(outs, 0)
        g = q.shape[2] // k.shape[2]
        if g > 1:
            k = jnp.repeat(k, g, axis=2)
            v = jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        if point.causal:
            sq, sk = q.shape[1], k.shape[1]
            i = jnp.arange(sq)[:, None]
            j = jnp.arange(sk)[None, :]
            s = jnp.where(j > i + (sk - sq), -jnp.inf, s)
        if point.mask is not None:  # masks sweep (bench/maskbench.py)
            from .maskbench import dense_mask, score_bias

            bias = score_bias(point.mask, q.shape[2], q.shape[1], k.shape[1])  # ALiBi specs
            if bias is not None:
                s = s + jnp.asarray(bias)
            s = jnp.where(jnp.asarray(dense_mask(point.mask, q.shape[1], k.shape[1])), s, -jnp.inf)
        p = self.jax.nn.softmax(s, axis=-1).astype(q.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)


# --------------------------------------------------------------------------------------------
class NumpyFW(Framework):
    name = "numpy"

    def __init__(self, device: str):
        super().__init__("cpu")

    def available(self):
        return None

    def dtype_of(self, dt: str):
        if dt != "fp32":
            raise TypeError(f"numpy has no {DTYPES[dt]}")
        return np.float32

    def make_sets(self, impl, point: Point, n: int, seed: int):
        rng = np.random.default_rng(seed)
        dt = self.dtype_of(impl.dtype_for(point))
        return [
            [rng.standard_normal(s).astype(dt) for s in shapes_for(point, impl.layout)]
            for _ in range(n)
        ]

    def from_numpy(self, x, dt):
        return np.asarray(x, dtype=self.dtype_of(dt))

    def to_numpy64(self, x):
        return np.asarray(x, dtype=np.float64)

    def int32(self, x):
        return np.asarray(x, dtype=np.int32)

    def run_modes(self, fn, q, k, v, do, with_bwd: bool, impl=None, compiled=None):
        if with_bwd:
            raise NotImplementedError("numpy arrays have no autograd: forward only")
        return fn(q, k, v), None

    def prepare(self, fn, sets, mode: str, impl=None, compiled=None):
        if mode != "fwd":
            raise NotImplementedError("numpy arrays have no autograd: forward only")

        def call(i):
            q, k, v, _ = sets[i]
            return fn(q, k, v)

        return call

    def time(self, call, n_sets, warmup, reps, target_s, min_reps, max_reps):
        for w in range(warmup):
            call(w % n_sets)
        t0 = time.perf_counter()
        call(0)
        est = max(time.perf_counter() - t0, 1e-6)
        r = reps or int(min(max_reps, max(min_reps, target_s / est)))
        out = []
        for i in range(r):
            t0 = time.perf_counter()
            call(i % n_sets)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def peak_memory(self, call):
        return None

    def device_memory(self):
        return None

    def l2_bytes(self):
        return 8 << 20

    def cleanup(self, full: bool = False):
        pass

    def plain(self, q, k, v, point: Point, scale: float, cu_seqlens=None):
        if cu_seqlens is not None:
            cu = [int(c) for c in cu_seqlens]
            return np.concatenate(
                [
                    self.plain(q[a:b][None], k[a:b][None], v[a:b][None], point, scale)[0]
                    for a, b in zip(cu[:-1], cu[1:])
                ],
                0,
            )
        g = q.shape[2] // k.shape[2]
        k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k).astype(np.float32) * np.float32(scale)
        if point.causal:
            sq, sk = q.shape[1], k.shape[1]
            i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
            s = np.where(j > i + (sk - sq), -np.inf, s)
        if point.mask is not None:  # masks sweep (bench/maskbench.py)
            from .maskbench import dense_mask, score_bias

            bias = score_bias(point.mask, q.shape[2], q.shape[1], k.shape[1])  # ALiBi specs
            if bias is not None:
                s = s + bias
            s = np.where(dense_mask(point.mask, q.shape[1], k.shape[1]), s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p = (p / p.sum(-1, keepdims=True)).astype(q.dtype)
        return np.einsum("bhqk,bkhd->bqhd", p, v)


def make_framework(name: str, device: str) -> tuple[Any, str | None]:
    """(framework or None, reason it is missing)."""
    try:
        if name == "torch":
            fw = TorchFW(device)
            if device == "cuda" and not fw.torch.cuda.is_available():
                return None, "torch sees no CUDA device"
            return fw, None
        if name == "jax":
            fw = JaxFW(device)
            if device == "cuda" and fw.device != "cuda":
                return None, "jax sees no GPU"
            return fw, None
        if name == "numpy":
            if device != "cpu":
                return None, "numpy arrays live on the CPU (GPU run)"
            return NumpyFW(device), None
    except ImportError as e:
        return None, f"{name} not installed ({e})"
    except Exception as e:  # a broken install must not crash the sweep
        return None, f"{name} failed to start: {type(e).__name__}: {e}"
    return None, f"unknown framework {name}"
