"""The measuring loop: for each framework, point and implementation, check correctness on a small
problem of the same configuration, then time every mode on rotated random inputs.

Nothing here may crash a sweep: every failure (missing package, unsupported shape, out of
memory, wrong answer) becomes a record with a status and a reason.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..reference import reference_backward, reference_forward
from .frameworks import bshd_to_layout_np, is_oom, layout_to_bshd_np, shapes_for
from .impls import Context, Impl, cu_seqlens, kvcache_unsupported, masks_unsupported
from .shapes import ITEMSIZE, Point, check_point, modes_for

STATUSES = ("ok", "wrong", "unsupported", "unavailable", "oom", "error", "budget")


@dataclass
class RunOptions:
    modes: list[str] | None = None
    warmup: int = 2
    reps: int | None = None  # None: adaptive, to spend about target_s per measurement
    target_s: float = 0.2
    min_reps: int = 5
    max_reps: int = 100
    time_budget_s: float | None = None
    check: bool = True
    seed: int = 0
    max_sets: int = 8
    precompile_threads: int = 0  # JAX: compile ahead in this many threads (0: off)
    # called as on_event(runner, "start" | "done", impl, point) around every measurement (the
    # CLI writes the results so far after each one, so a killed run leaves what it measured)
    on_event: object = None
    log_each: bool = False  # a stderr line per measurement (status, median, wall seconds)


# Messages by which libraries decline a problem (rather than fail on it).
_DECLINES = (
    "no available kernel",
    "not supported",
    "unsupported",
    "no forced backend",
    "can run this call",
    "not implemented",
)


def classify(exc: BaseException) -> str:
    if is_oom(exc):
        return "oom"
    if isinstance(exc, ImportError):
        return "unavailable"
    if isinstance(exc, (NotImplementedError, ValueError, TypeError)):
        return "unsupported"
    name = type(exc).__name__
    if "NoBackend" in name or "Unsupported" in name or "NotSupported" in name:
        return "unsupported"
    if any(d in str(exc).lower() for d in _DECLINES):
        return "unsupported"
    return "error"


def short(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _maxerr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != reference {b.shape}")
    if a.size == 0:
        return 0.0
    d = np.abs(a - b)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(d.max())


class Progress:
    """tqdm when stderr is a terminal and tqdm is installed, else a line every ~10%/30 s."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        self.t0 = self.last = time.monotonic()
        self.last_pct = -1
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="meas", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int, desc: str):
        self.n += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(desc[:60], refresh=False)
            self.bar.update(k)
            return
        pct = int(100 * self.n / max(1, self.total))
        now = time.monotonic()
        if pct // 10 != self.last_pct // 10 or now - self.last > 30 or self.n == self.total:
            self.last_pct, self.last = pct, now
            print(
                f"[bench {self.n}/{self.total} {pct}% {now - self.t0:.0f}s] {desc}",
                file=sys.stderr,
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class Runner:
    ctx: Context
    opts: RunOptions
    results: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    _check_cache: dict = field(default_factory=dict)
    _ref_cache: dict = field(default_factory=dict)
    _plain_cache: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    check_wall_s: float = 0.0
    compiled: dict = field(default_factory=dict)  # (impl id, point, kind) -> executable
    precompile_s: float = 0.0
    # impl id -> wall seconds of its latest measurement that ran: under a time budget, a
    # measurement that would end past the deadline by this estimate is not started
    cost: dict = field(default_factory=dict)

    # -- correctness ------------------------------------------------------------------------
    def _inputs(self, cp: Point, dt: str, impl: Impl, point: Point):
        """Check inputs (rounded to dt) and the float64 reference, shared by every impl."""
        key = (cp, dt, impl.prescale_q)
        if key in self._ref_cache:
            return self._ref_cache[key]
        seed = zlib.crc32(repr(key).encode()) ^ self.opts.seed
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal(s).astype(np.float32) for s in shapes_for(cp, "bshd")]
        if impl.prescale_q:
            xs[0] = xs[0] * np.float32(impl.input_q_scale(point))
        self._ref_cache[key] = {"raw": xs}
        return self._ref_cache[key]

    def _reference(self, entry, fw, dt, cp, scale, with_bwd):
        """float64 reference from the values as rounded by the framework."""
        rkey = ("ref", dt, with_bwd)
        if rkey in entry:
            return entry[rkey]
        rounded = [fw.to_numpy64(fw.from_numpy(x, dt)) for x in entry["raw"]]
        q, k, v, do = rounded
        cu = cu_seqlens(cp) if cp.varlen else None
        kw = dict(causal=cp.causal, scale=scale, cu_seqlens_q=cu, cu_seqlens_k=cu)
        if cp.mask is not None:  # masks sweep: the mask function itself (not the BlockMask)
            from .maskbench import alibi_for, mask_fn_for

            kw["block_mask"] = mask_fn_for(cp.mask, cp.seqlen_q, cp.seqlen_k)
            kw["alibi_slopes"] = alibi_for(cp.mask, cp.heads_q)
        out, _ = reference_forward(q, k, v, **kw)
        grads = reference_backward(do, q, k, v, **kw) if with_bwd else None
        entry[rkey] = (rounded, out, grads)
        return entry[rkey]

    def _plain_errors(self, fw, dt, cp, scale, rounded, ref_out, ref_grads, with_bwd):
        key = (fw.name, cp, dt, scale, with_bwd)
        if key in self._plain_cache:
            return self._plain_cache[key]
        xs = [fw.from_numpy(x.astype(np.float32), dt) for x in rounded]
        cu = cu_seqlens(cp) if cp.varlen else None

        def plain(q, k, v):
            return fw.plain(q, k, v, cp, scale, cu)

        try:
            out, grads = fw.run_modes(plain, *xs, with_bwd and fw.name != "numpy")
            errs = {"out": _maxerr(fw.to_numpy64(out), ref_out)}
            if grads is not None:
                for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                    errs[n] = _maxerr(fw.to_numpy64(g), r)
        except Exception as e:  # the yardstick failing must not stop the check
            self.log.append(f"plain attention ({fw.name}) failed: {short(e)}")
            errs = {}
        self._plain_cache[key] = errs
        return errs

    def check(self, impl: Impl, point: Point, with_bwd: bool) -> dict:
        """{'fwd': verdict, 'bwd': verdict|None}; cached per small problem."""
        cp = check_point(point)
        key = (impl.id, cp, impl.dtype_for(point), with_bwd)
        if key in self._check_cache:
            return self._check_cache[key]
        res = self._check(impl, point, cp, with_bwd)
        self._check_cache[key] = res
        for mode, v in res.items():
            if v is not None:
                self.checks.append(
                    {
                        "impl": impl.id,
                        "framework": impl.framework,
                        "family": impl.family,
                        "mode": mode,
                        "point": cp.to_json(),
                        **v,
                    }
                )
        return res

    def _check(self, impl, point, cp, with_bwd):
        fw = self.ctx.fws[impl.framework]
        dt = impl.dtype_for(point)
        scale = impl.ref_scale(point)
        entry = self._inputs(cp, dt, impl, point)
        try:
            rounded, ref_out, ref_grads = self._reference(entry, fw, dt, cp, scale, with_bwd)
        except Exception as e:
            v = {"ok": False, "status": classify(e), "reason": f"inputs: {short(e)}"}
            return {"fwd": v, "bwd": v if with_bwd else None}
        base = self._plain_errors(fw, dt, cp, scale, rounded, ref_out, ref_grads, with_bwd)
        native = [
            fw.from_numpy(bshd_to_layout_np(x.astype(np.float32), impl.layout, cp.varlen), dt)
            for x in rounded
        ]

        def attempt(bwd):
            for _ in range(3):
                try:
                    fn = impl.build(cp, self.ctx)
                    comp = self.compiled.pop((impl.id, cp, "check"), None) if bwd else None
                    return fw.run_modes(fn, *native, bwd, impl, compiled=comp), None
                except Exception as e:  # noqa: PERF203
                    if impl.on_failure(e):
                        continue
                    return None, e
            return None, RuntimeError("gave up after retries")

        def verdict(errs, names):
            tol = {n: impl.tol_factor * base.get(n, float("nan")) + impl.tol_abs for n in names}
            ok = all(
                math.isfinite(errs[n]) and (not math.isfinite(tol[n]) or errs[n] <= tol[n])
                for n in names
            )
            bad = [n for n in names if not (errs[n] <= tol[n] or not math.isfinite(tol[n]))]
            return {
                "ok": bool(ok),
                "status": "ok" if ok else "wrong",
                "errors": {n: errs[n] for n in names},
                "plain_errors": {n: base.get(n) for n in names},
                "tolerance": {n: tol[n] for n in names},
                "reason": None if ok else "error above tolerance in " + ", ".join(bad),
                "rule": f"err <= {impl.tol_factor:g} x plain-attention err + {impl.tol_abs:g}",
                "dtype": dt,
            }

        def to64(x):
            return layout_to_bshd_np(fw.to_numpy64(x), impl.layout, cp.varlen)

        out = {"fwd": None, "bwd": None}
        res, exc = attempt(True) if with_bwd else (None, None)
        if with_bwd and exc is None:
            o, grads = res
            errs = {"out": _maxerr(to64(o), ref_out)}
            for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                errs[n] = _maxerr(to64(g), r)
            out["fwd"] = verdict(errs, ["out"])
            out["bwd"] = verdict(errs, ["out", "dq", "dk", "dv"])
            return out
        if with_bwd:
            out["bwd"] = {"ok": False, "status": classify(exc), "reason": short(exc)}
        res, exc2 = attempt(False)
        if exc2 is not None:
            out["fwd"] = {"ok": False, "status": classify(exc2), "reason": short(exc2)}
        else:
            o, _ = res
            out["fwd"] = verdict({"out": _maxerr(to64(o), ref_out)}, ["out"])
        return out

    # -- timing -----------------------------------------------------------------------------
    def _n_sets(self, fw, impl, point, memory_only):
        if memory_only:
            return 1
        set_bytes = (
            sum(math.prod(s) for s in shapes_for(point, impl.layout))
            * ITEMSIZE[impl.dtype_for(point)]
        )
        if fw.device != "cuda":
            return 2
        n = max(2, min(self.opts.max_sets, math.ceil(4 * fw.l2_bytes() / max(set_bytes, 1))))
        mem = fw.device_memory()
        if mem and n * set_bytes > 0.25 * mem:
            n = max(1, int(0.25 * mem // set_bytes))
        return n

    def _predicted_oom(self, fw, impl, point, mode) -> str | None:
        if not impl.quadratic or fw.device != "cuda":
            return None
        mem = fw.device_memory()
        if not mem:
            return None
        pairs = (
            point.batch * point.seqlen_q * point.seqlen_k
            if not point.varlen
            else sum(s * s for s in point.seqlens)
        )
        # bytes per score element alive at the peak: ~8 forward (scores low precision + float32,
        # probabilities), ~12 with the backward's dP/dS (measured: 32 GiB at B1 H16 S16k).
        need = pairs * point.heads_q * (8 if mode == "fwd" else 12)
        if need > 0.9 * mem:
            return (
                f"would need ~{need / 2**30:.0f} GiB for the score matrix "
                f"(device has {mem / 2**30:.0f} GiB)"
            )
        return None

    def _record(self, impl: Impl, point: Point, mode: str, status: str, reason=None, **kw):
        rec = {
            "impl": impl.id,
            "framework": impl.framework,
            "family": impl.family,
            "backend": impl.backend,
            "sweep": point.sweep,
            "mode": mode,
            "dtype": impl.dtype_for(point),
            "point": point.to_json(),
            "status": status,
            "reason": reason,
        }
        rec.update(kw)
        self.results.append(rec)
        return rec

    def measure(self, impl: Impl, point: Point, modes: list[str], deadline: float | None):
        """Every mode of one impl at one point; appends records (with the wall time spent)."""
        t0, n0 = time.monotonic(), len(self.results)
        try:
            self._measure(impl, point, modes, deadline)
        finally:
            spent = time.monotonic() - t0
            for r in self.results[n0:]:
                r["wall_s"] = round(spent / max(1, len(self.results) - n0), 3)
            if any(r["status"] in ("ok", "wrong") for r in self.results[n0:]):
                self.cost[impl.id] = spent

    def _measure(self, impl, point, modes, deadline):
        ctx, opts = self.ctx, self.opts
        fw = ctx.fws.get(impl.framework)
        reason = impl.unavailable(ctx)
        if reason:
            for m in modes:
                self._record(impl, point, m, "unavailable", reason)
            return
        todo = []
        for m in modes:
            r = (kvcache_unsupported(impl, point) or masks_unsupported(impl, point)
                 or impl.unsupported(point, m, ctx)
                 or self._predicted_oom(fw, impl, point, m))
            if r:
                self._record(impl, point, m, "unsupported", r)
            else:
                todo.append(m)
        if not todo:
            return
        if deadline is not None and time.monotonic() > deadline:
            for m in todo:
                self._record(impl, point, m, "budget", "time budget exhausted")
            return
        est = self.cost.get(impl.id)
        if deadline is not None and est is not None and time.monotonic() + est > deadline:
            left = deadline - time.monotonic()
            for m in todo:
                self._record(impl, point, m, "budget", f"time budget: its last point took "
                             f"{est:.1f} s, {left:.1f} s were left")
            return
        verdicts = {"fwd": None, "bwd": None}
        if opts.check:
            need_bwd = any(m != "fwd" for m in todo)
            tc = time.monotonic()
            verdicts = self.check(impl, point, need_bwd)
            self.check_wall_s += time.monotonic() - tc
        sets = None
        try:
            n = self._n_sets(fw, impl, point, point.memory_only)
            sets = fw.make_sets(impl, point, n, seed=opts.seed + 7919 * len(self.results))
            fn = impl.build(point, ctx)
            chosen = None
            if impl.backend == "auto" or getattr(impl, "describes_build", False):
                chosen = impl.describe_choice(point, *sets[0][:3], ctx)
            for m in todo:
                v = verdicts["fwd" if m == "fwd" else "bwd"]
                if v is not None and v["status"] not in ("ok", "wrong"):
                    self._record(
                        impl, point, m, v["status"], "check: " + (v["reason"] or ""), check=v
                    )
                    continue
                self._time_one(fw, impl, point, m, fn, sets, v, chosen, deadline)
        except Exception as e:
            st = classify(e)
            done = {
                (r["impl"], r["mode"])
                for r in self.results
                if r["point"] == point.to_json() and r["impl"] == impl.id
            }
            for m in todo:
                if (impl.id, m) not in done:
                    self._record(impl, point, m, st, short(e))
            if st == "error":
                self.log.append(f"{impl.id} {point.label}: {traceback.format_exc(limit=3)}")
            if st == "oom":
                fw.cleanup(full=True)
        finally:
            del sets
            if impl.quadratic or point.memory_only:
                fw.cleanup()

    def _time_one(self, fw, impl, point, mode, fn, sets, verdict, chosen, deadline):
        opts = self.opts
        if deadline is not None and time.monotonic() > deadline:
            self._record(impl, point, mode, "budget", "time budget exhausted")
            return
        status = "ok" if verdict is None or verdict["ok"] else "wrong"
        extra = {"check": verdict, "chosen": chosen, "n_sets": len(sets)}
        try:
            comp = self.compiled.pop((impl.id, point, mode), None)
            call = fw.prepare(fn, sets, mode, impl, compiled=comp)
            if point.memory_only:
                for _w in range(max(1, opts.warmup - 1)):
                    r = call(0)
                    del r
                peak = fw.peak_memory(call)
                self._record(
                    impl,
                    point,
                    mode,
                    status if peak is not None else "unsupported",
                    None if peak is not None else "no memory figure on this device",
                    peak_mem_bytes=peak,
                    **extra,
                )
                return
            times = fw.time(
                call, len(sets), opts.warmup, opts.reps, opts.target_s, opts.min_reps, opts.max_reps
            )
            peak = None
            # One extra call under torch's peak counter is cheap; XLA's figure needs a second
            # compile, so JAX reports memory in the memory sweep only.
            if fw.name == "torch" and fw.device == "cuda":
                try:
                    peak = fw.peak_memory(call)
                except Exception:
                    peak = None
        except Exception as e:
            st = classify(e)
            self._record(impl, point, mode, st, short(e), **extra)
            if st == "oom":
                fw.cleanup(full=True)
            if st == "error":
                self.log.append(f"{impl.id} {point.label} {mode}: {traceback.format_exc(limit=3)}")
            return
        ms = float(np.median(times))
        tflops = point.flops(mode) / (ms * 1e-3) / 1e12
        gbps = point.kv_bytes / (ms * 1e-3) / 1e9 if mode == "fwd" else None
        self._record(
            impl,
            point,
            mode,
            status,
            None if status == "ok" else verdict.get("reason"),
            ms=ms,
            ms_min=float(np.min(times)),
            ms_mean=float(np.mean(times)),
            ms_std=float(np.std(times)),
            reps=len(times),
            times_ms=[round(t, 5) for t in times],
            tflops=tflops,
            gbps=gbps,
            peak_mem_bytes=peak,
            **extra,
        )


def _precompile(runner: Runner, fw, work, threads: int, deadline: float | None) -> None:
    """Compile every JAX function the phase will time, in worker threads, before any timing.

    XLA (and the Pallas/Triton and Mosaic GPU compilers behind it) compiles outside the GIL, so
    a pool cuts the JAX phase from one compile after another to about the longest few. Nothing
    is timed while it runs (XLA's autotuning runs kernels on the device). Any failure here just
    leaves that function to be compiled on first use, as without this step.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    ctx = runner.ctx
    jobs = []
    checks_seen = set()
    for _, impl, point, modes in work:
        if impl.unavailable(ctx) or not impl.jit or not impl.precompile:
            continue
        for m in modes:
            if m not in ("fwd", "fwd_bwd"):
                continue
            if impl.unsupported(point, m, ctx) or runner._predicted_oom(fw, impl, point, m):
                continue
            jobs.append((impl, point, m, point))
            cp = check_point(point)
            ck = (impl.id, cp, "check")
            if m == "fwd_bwd" and runner.opts.check and ck not in checks_seen:
                checks_seen.add(ck)
                jobs.append((impl, cp, "check", cp))
    if not jobs:
        return
    t0 = time.monotonic()

    def job(impl, point, kind, build_point):
        fn = impl.build(build_point, ctx)
        return fw.compile_ahead(fn, impl, build_point, kind)

    with ThreadPoolExecutor(max_workers=threads) as ex:
        futs = {ex.submit(job, *j): j for j in jobs}
        # Under a time budget, compile ahead for at most 40% of what the phase has left: if
        # compilation turns out not to overlap, the rest compiles on first use as usual.
        timeout = None if deadline is None else 0.4 * max(0.0, deadline - time.monotonic())
        wait(futs, timeout=timeout)
        for f in futs:
            f.cancel()  # not started yet: compiled on first use instead
    failed = []
    for f, (impl, point, kind, _) in futs.items():
        if f.cancelled():
            continue
        if f.exception() is None:
            runner.compiled[(impl.id, point, kind)] = f.result()
        else:
            failed.append(f"{impl.id} {kind}: {short(f.exception(), 120)}")
    if failed:
        runner.log.append(
            f"jax: {len(failed)} ahead-of-time compiles failed (retried on first "
            f"use), e.g. {failed[0]}"
        )
    runner.precompile_s += time.monotonic() - t0
    runner.log.append(
        f"jax: compiled {len(runner.compiled)} of {len(jobs)} functions ahead in "
        f"{time.monotonic() - t0:.1f} s with {threads} threads"
    )


def spread_order(points: list[Point]) -> list[Point]:
    """Execution order: sequence lengths in a bisection order (middle, ends, then the gaps),
    groups interleaved, so that a time budget running out drops an even sample of the sweep
    rather than its whole tail."""
    xs = sorted({p.x for p in points})
    order, spans = [], [(0, len(xs) - 1)]
    if xs:
        order = [len(xs) // 2, len(xs) - 1, 0]
        spans = [(0, len(xs) // 2), (len(xs) // 2, len(xs) - 1)]
    while spans:
        nxt = []
        for a, b in spans:
            if b - a > 1:
                m = (a + b) // 2
                order.append(m)
                nxt += [(a, m), (m, b)]
        spans = nxt
    seen, rank = set(), {}
    for i in order:
        if i not in seen:
            seen.add(i)
            rank[xs[i]] = len(rank)
    return sorted(points, key=lambda p: (p.sweep, rank.get(p.x, 0)))


def _log_records(recs: list) -> None:
    """One stderr line per record that did something (ran, failed, or ran out of budget), with
    the wall seconds of the whole step (check, compile, every mode: one measure() call)."""
    step = sum(r.get("wall_s", 0) for r in recs)
    for r in recs:
        if r["status"] in ("unsupported", "unavailable"):
            continue
        p = r["point"]
        what = p.get("mask") or ("causal" if p.get("causal") else "dense")
        ms = f" {r['ms']:.3f} ms" if r.get("ms") is not None else ""
        why = f" ({r['reason'][:120]})" if r.get("reason") and r["status"] != "ok" else ""
        # anchors that say what they compiled (flex: dynamic or not, its BlockMask's tiles)
        built = f" <{r['chosen']}>" if r.get("chosen") and r.get("family") == "anchor" else ""
        print(f"[bench] {r['impl']} S{p.get('seqlen_q')} {what} {r['mode']}: {r['status']}{ms}"
              f" [step {step:.1f} s]{why}{built}", file=sys.stderr, flush=True)


def _cheap(impl: Impl, point: Point, ctx: Context) -> bool:
    """True for plan entries that record a reason without running anything."""
    try:
        return bool(impl.unavailable(ctx) or kvcache_unsupported(impl, point)
                    or masks_unsupported(impl, point))
    except Exception:
        return False


def run_all(
    points: list[Point], impls: list[Impl], ctx: Context, opts: RunOptions, progress: bool = True
) -> Runner:
    """Torch implementations first, then JAX, then NumPy: one framework's allocator at a time."""
    runner = Runner(ctx, opts)
    order = ["torch", "jax", "numpy"]
    plan = []  # (framework, impl, point, modes)
    for fwname in order:
        for point in spread_order(points):
            for impl in impls:
                if impl.framework == fwname:
                    plan.append((fwname, impl, point, modes_for(point, opts.modes)))
    total = sum(len(m) for *_, m in plan)
    bar = Progress(total, progress)
    t_start = time.monotonic()
    budget = opts.time_budget_s
    for fwname in order:
        work = [p for p in plan if p[0] == fwname]
        if not work:
            continue
        deadline = None
        if budget is not None:
            # the budget left is shared by measurements that will run (not those that only
            # record a reason: most anchors at a masks sweep's masked points)
            def runs(p):
                return 0 if _cheap(p[1], p[2], ctx) else len(p[3])

            remaining_work = sum(runs(p) for p in plan[plan.index(work[0]) :])
            left = budget - (time.monotonic() - t_start)
            deadline = time.monotonic() + max(0.0, left) * sum(runs(p) for p in work) / max(
                1, remaining_work
            )
        fw = ctx.fws.get(fwname)
        if fw is not None and fwname == "jax" and opts.precompile_threads > 0:
            try:
                _precompile(runner, fw, work, opts.precompile_threads, deadline)
            except Exception as e:  # never lose the sweep over an optimization
                runner.log.append(f"jax precompile failed: {short(e)}")
        for _, impl, point, modes in work:
            if fw is None:
                for m in modes:
                    runner._record(
                        impl,
                        point,
                        m,
                        "unavailable",
                        ctx.fws.get(f"_{fwname}_reason") or f"{fwname} not available",
                    )
            else:
                n0 = len(runner.results)
                if opts.on_event is not None:
                    opts.on_event(runner, "start", impl, point)
                runner.measure(impl, point, modes, deadline)
                if opts.log_each:
                    _log_records(runner.results[n0:])
                if opts.on_event is not None:
                    opts.on_event(runner, "done", impl, point)
            bar.update(len(modes), f"{impl.id} {point.label}")
        if runner.compiled:
            runner.log.append(
                f"{fwname}: {len(runner.compiled)} functions compiled ahead went unused"
            )
            runner.compiled.clear()
        if fw is not None:
            fw.cleanup()
            if fwname == "torch" and fw.device == "cuda":
                fw.torch.cuda.empty_cache()
    bar.close()
    return runner
