"""The conformance judge: one case = one call of flashmux.attention on a forced backend, judged
against the NumPy float64 reference by SPEC.md's rule:

    error(backend) <= 2 * error(plain attention in the same framework and precision) + 1e-5

for out, lse, dq, dk, dv (max absolute error). "Plain" attention materializes the scores in the
input precision, takes a float32 softmax, and multiplies in the input precision, as
FlashAttention's own tests do. Inputs are fresh random numbers every run; the seed is printed in
the failure message so a failing case can be replayed (FLASHMUX_TEST_SEED).

This module is the one place the rule lives: tests/conformance/harness.py re-exports it for the
conformance suite, and the backends' own checks (flashmux_pallas._check, the per-backend GPU
tools) import it from here, since an installed package cannot import tests/. It imports only
NumPy at import time; torch and JAX load when a case of their kind runs.

    measure(case, backend, kind, seed=...)  -> {name: (error, bound)}, or a skip reason (str)
    passed(report)                          -> every error within its bound (NaN fails)
    redraw(draw, seed)                      -> (ok, draws): the redraw rule around any draw(seed)
    run_case(case, backend, kind)           -> None / skip reason; AssertionError with a report
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

import flashmux
from flashmux import dispatch
from flashmux.reference import allowed_mask, reference_backward, reference_forward

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    batch: int = 2
    seqlen_q: int = 17
    seqlen_k: int = 17
    heads_q: int = 4
    heads_kv: int = 4
    head_dim: int = 64
    head_dim_v: int | None = None
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    seqlens: tuple | None = None  # varlen: ((lq, lk), ...)
    dtype: str = "float16"
    lse_grad: bool = False
    grad: bool = True
    scale: float | None = None
    # JAX only: "eager", or the call (forward and VJP) under "jit", or "vmap" over a leading axis
    # of 1 (the same problem, vmapped); other kinds run eagerly
    transform: str = "eager"
    tags: tuple = field(default=(), compare=False)

    @property
    def dv(self):
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def id(self) -> str:
        parts = [self.dtype]
        if self.transform != "eager":
            parts.append(self.transform)
        if self.seqlens is not None:
            parts.append("varlen" + "-".join(f"{a}x{b}" for a, b in self.seqlens))
        else:
            parts.append(f"b{self.batch}s{self.seqlen_q}x{self.seqlen_k}")
        parts.append(f"h{self.heads_q}x{self.heads_kv}d{self.head_dim}")
        if self.head_dim_v is not None:
            parts.append(f"dv{self.head_dim_v}")
        for flag, name in ((self.causal, "causal"), (self.lse_grad, "lsegrad"), (not self.grad, "nograd")):
            if flag:
                parts.append(name)
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p}")
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


def on_gpu() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch.cuda.is_available()
    return False


def size_tier() -> str:
    """"small" under CPU interpreters (Triton's, Pallas' interpret mode), else "full";
    FLASHMUX_TEST_SIZE overrides."""
    env = os.environ.get("FLASHMUX_TEST_SIZE")
    if env:
        return env
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    backend = os.environ.get("FLASHMUX_TEST_BACKEND", "reference")
    return "small" if interp or (backend != "reference" and not on_gpu()) else "full"


# -- frameworks ------------------------------------------------------------------------------


def default_device(kind: str) -> str:
    if kind == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "jax":
        import jax

        return "cuda" if jax.default_backend() in ("gpu", "cuda") else "cpu"
    return "cpu"


# -- plain attention, one step at a time (shared with the decode and mask judges in tests/) ------


def _is_torch(xp) -> bool:
    return getattr(xp, "__name__", "") == "torch"


def plain_scores(xp, q, k, v, scale, spec: str, head_axis: int, softcap=None):
    """Plain attention's scores: K/V heads repeated for GQA along `head_axis`, the `spec` einsum
    in the input precision (NumPy has no bfloat16 matmul: float32 products of the rounded
    inputs), then float32 * scale and the softcap. -> (scores, repeated v). xp: numpy,
    jax.numpy or torch."""
    g = q.shape[head_axis] // k.shape[head_axis]
    if _is_torch(xp):
        k = k.repeat_interleave(g, dim=head_axis)
        v = v.repeat_interleave(g, dim=head_axis)
        s = xp.einsum(spec, q, k).float() * scale
    else:
        k = xp.repeat(k, g, axis=head_axis)
        v = xp.repeat(v, g, axis=head_axis)
        if xp is np:
            q, k, v = (x.astype(np.float32) for x in (q, k, v))
        s = xp.einsum(spec, q, k).astype(xp.float32) * scale
    if softcap:
        s = softcap * xp.tanh(s / softcap)
    return s, v


def masked_softmax(xp, s, allowed):
    """Float32 softmax of the scores with the element mask `allowed` (broadcast against s), by the
    row maximum: -> (lse, p), lse -inf and p 0 on rows that see nothing."""
    s = xp.where(allowed, s, -np.inf)
    if not s.shape[-1]:
        m = xp.zeros(s.shape[:-1] + (1,), xp.float32)
    elif _is_torch(xp):
        m = s.amax(-1, keepdim=True)
    else:
        m = s.max(-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    den = xp.exp(s - m).sum(-1)
    lse = xp.where(den > 0, xp.log(xp.where(den > 0, den, 1.0)) + m[..., 0], -np.inf)
    p = xp.where(allowed, xp.exp(s - xp.where(xp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return lse, p


def plain_softmax(xp, s, allowed):
    """masked_softmax, but torch's own logsumexp for torch (the conformance and decode judges)."""
    if not _is_torch(xp):
        return masked_softmax(xp, s, allowed)
    s = xp.where(allowed, s, -np.inf)
    lse = xp.logsumexp(s, dim=-1)
    return lse, xp.where(allowed, xp.exp(s - lse[..., None].clamp(min=-1e30)), 0.0)


def plain_pv(xp, spec: str, p, v, lo_dtype):
    """P rounded to the input precision times V (`spec` einsum); NumPy: float32 products of the
    rounded P (v is float32 from plain_scores), stored in the input precision."""
    if _is_torch(xp):
        return xp.einsum(spec, p.to(lo_dtype), v)
    if xp is np:
        return np.einsum(spec, p.astype(lo_dtype).astype(np.float32), v).astype(lo_dtype)
    return xp.einsum(spec, p.astype(lo_dtype), v)


class Framework:
    """Conversions and plain attention (with gradients) for one array kind."""

    def __init__(self, kind: str, device: str):
        self.kind, self.device = kind, device
        if kind == "torch":
            import torch

            self.t = torch
        elif kind == "jax":
            import jax
            import jax.numpy as jnp

            self.jax, self.jnp = jax, jnp

    def dtype(self, name):
        if self.kind == "torch":
            return getattr(self.t, name)
        if self.kind == "jax":
            return getattr(self.jnp, name)
        if name == "bfloat16":
            import ml_dtypes

            return ml_dtypes.bfloat16
        return np.dtype(name)

    def array(self, x: np.ndarray, dtype: str | None = None):
        if self.kind == "torch":
            t = self.t.from_numpy(np.ascontiguousarray(x))
            if dtype is not None:
                t = t.to(self.dtype(dtype))
            return t.to(self.device)
        if self.kind == "jax":
            a = self.jnp.asarray(x)
            return a if dtype is None else a.astype(self.dtype(dtype))
        return x if dtype is None else x.astype(self.dtype(dtype))

    def numpy(self, x) -> np.ndarray:
        if self.kind == "torch":
            return x.detach().float().cpu().numpy().astype(np.float64)
        return np.asarray(x).astype(np.float32).astype(np.float64)

    def poison_allocator(self):
        """Fill free device memory with NaN so that an output a kernel forgets to write shows."""
        if self.kind == "torch" and self.device == "cuda":
            junk = self.t.full((64 << 20,), float("nan"), device="cuda")
            del junk

    # plain attention: materialized scores in the input precision, float32 softmax
    def plain(self, q, k, v, case: Case, cu_q, cu_k, keep, do, dlse):
        """(out, lse, dq, dk, dv) as numpy float64, from the framework's own autograd."""
        if self.kind == "torch":
            return self._plain_torch(q, k, v, case, cu_q, cu_k, keep, do, dlse)
        if self.kind == "jax":
            return self._plain_jax(q, k, v, case, cu_q, cu_k, keep, do, dlse)
        return self._plain_numpy(q, k, v, case, cu_q, cu_k, keep)

    def _plain_seq(self, xp, q, k, v, case, keep_b, lo_dtype):
        """One sequence: q (Sq,Hq,D), k/v (Sk,Hkv,*) in the input dtype."""
        scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.head_dim)
        s, v = plain_scores(xp, q, k, v, scale, "qhd,khd->hqk", 1, case.softcap)
        allowed = allowed_mask(q.shape[0], k.shape[0], case.causal, case.window)
        if self.kind == "torch":
            allowed = self.t.from_numpy(allowed).to(s.device)
        lse, p = plain_softmax(xp, s, allowed[None])
        if case.dropout_p:
            p = p * keep_b / (1.0 - case.dropout_p)
        return plain_pv(xp, "hqk,khd->qhd", p, v, lo_dtype), lse

    def _segments(self, case, cu_q, cu_k, nb):
        if cu_q is None:
            return [((b,), (b,)) for b in range(nb)]
        return [((slice(cu_q[b], cu_q[b + 1]),), (slice(cu_k[b], cu_k[b + 1]),)) for b in range(len(cu_q) - 1)]

    def _plain_all(self, xp, q, k, v, case, cu_q, cu_k, keep, lo_dtype, cat):
        outs, lses = [], []
        segs = self._segments(case, cu_q, cu_k, q.shape[0])
        for b, (qi, ki) in enumerate(segs):
            qs, ks, vs = q[qi], k[ki], v[ki]
            kb = None
            if case.dropout_p:
                kb = keep[b, :, : qs.shape[0], : ks.shape[0]]
            o, l = self._plain_seq(xp, qs, ks, vs, case, kb, lo_dtype)
            outs.append(o)
            lses.append(l)
        if cu_q is None:
            return xp.stack(outs), xp.stack(lses)
        return cat(outs, 0), cat(lses, 1)

    def _plain_torch(self, q, k, v, case, cu_q, cu_k, keep, do, dlse):
        t = self.t
        q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        keep_t = None if keep is None else t.from_numpy(keep).to(q.device)
        out, lse = self._plain_all(t, q, k, v, case, cu_q, cu_k, keep_t, q.dtype, lambda xs, a: t.cat(xs, a))
        res = [self.numpy(out), self.numpy(lse)]
        if case.grad:
            loss = (out.float() * do.float()).sum()
            if dlse is not None:
                loss = loss + (t.where(t.isfinite(lse), lse, 0.0) * dlse).sum()
            loss.backward()
            res += [self.numpy(x.grad) for x in (q, k, v)]
        return res

    def _plain_jax(self, q, k, v, case, cu_q, cu_k, keep, do, dlse):
        jnp, jax = self.jnp, self.jax

        @jax.jit  # one compile instead of one per eager op
        def f(q, k, v):
            return self._plain_all(jnp, q, k, v, case, cu_q, cu_k, keep, q.dtype, lambda xs, a: jnp.concatenate(xs, a))

        (out, lse), vjp = jax.vjp(f, q, k, v)
        res = [self.numpy(out), self.numpy(lse)]
        if case.grad:
            cl = jnp.zeros_like(lse) if dlse is None else jnp.where(jnp.isfinite(lse), dlse, 0.0)
            res += [self.numpy(x) for x in vjp((do.astype(out.dtype), cl))]
        return res

    def _plain_numpy(self, q, k, v, case, cu_q, cu_k, keep):
        out, lse = self._plain_all(np, q, k, v, case, cu_q, cu_k, keep, q.dtype, np.concatenate)
        return [out.astype(np.float64), lse.astype(np.float64)]


# -- running a case --------------------------------------------------------------------------


def _rng_seed() -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def make_inputs(case: Case, rng):
    cu_q: np.ndarray | None
    cu_k: np.ndarray | None
    qs: tuple[int, ...]
    ks: tuple[int, ...]
    if case.seqlens is not None:
        lq = [a for a, _ in case.seqlens]
        lk = [b for _, b in case.seqlens]
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        qs, ks = (int(cu_q[-1]),), (int(cu_k[-1]),)
    else:
        cu_q = cu_k = None
        qs, ks = (case.batch, case.seqlen_q), (case.batch, case.seqlen_k)
    q = rng.standard_normal(qs + (case.heads_q, case.head_dim))
    k = rng.standard_normal(ks + (case.heads_kv, case.head_dim))
    v = rng.standard_normal(ks + (case.heads_kv, case.dv))
    return q, k, v, cu_q, cu_k


def max_err(x, ref):
    """Max absolute error, with matching infinities counted as exact and NaN as infinite."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != reference {ref.shape}")
    if x.size == 0:
        return 0.0
    if np.isnan(x).any():
        return float("inf")
    both_inf = np.isinf(ref) & (x == ref)
    if (np.isinf(ref) & ~both_inf).any() or (np.isinf(x) & ~both_inf).any():
        return float("inf")
    with np.errstate(invalid="ignore"):
        d = np.where(both_inf, 0.0, np.abs(x - ref))
    return float(d.max())


# A failing draw is confirmed on this many more draws (fresh inputs, seeds derived from the first).
REDRAWS = 2


Report = dict  # {name: (error, bound)}: out, lse, dq, dk, dv (and "keep rate" with dropout)


def passed(report: Report) -> bool:
    """Every error within its bound; NaN compares False, so it fails."""
    return all(e <= b for e, b in report.values())


def format_report(report: Report) -> str:
    return "\n  ".join(
        f"{name}: error {e:.3g}  bound {b:.3g}  {'ok' if e <= b else 'FAIL'}"
        for name, (e, b) in report.items()
    )


def redraw(draw, seed: int, redraws: int = REDRAWS):
    """The redraw rule around `draw(seed) -> Report`: -> (ok, [(seed, report), ...]).

    A failing first draw is judged again on `redraws` fresh draws (seeds derived from the first,
    so one seed replays all of them); the case fails if any of them fails too (see run_case). A lone failing draw
    passes, with a warning."""
    draws = [(seed, draw(seed))]
    if passed(draws[0][1]):
        return True, draws
    for i in range(1, redraws + 1):  # every redraw runs, so a failure report shows them all
        s = int(np.random.default_rng([seed, i]).integers(0, 2**32 - 1))
        draws.append((s, draw(s)))
    if not all(passed(r) for _, r in draws[1:]):
        return False, draws
    warnings.warn(
        f"one draw out of bound, {redraws} fresh redraws within it: seed {seed}\n  "
        + format_report(draws[0][1]), stacklevel=2,
    )
    return True, draws


def run_case(case: Case, backend: str, kind: str, device: str | None = None, seed: int | None = None):
    """Run and judge one case; raises AssertionError with a full report on failure.

    Returns None, or a skip reason when the backend declines the case.

    The rule bounds a maximum over the elements of random tensors, and on the smallest cases
    (tens of rows) that maximum has a long tail. Measured on the CPU interpreters (2026-11-24):
    for the float16 varlen case with window and softcap, error(backend) / error(plain) for dk had
    mean 0.87 and max 1.68 over 25 draws, identical for Triton and Pallas (same arithmetic as
    plain attention: dS * scale rounded to float16 before the dK product); the two cases that
    went over (2.07x and 2.15x, in 2 of 5 CI runs of ~50 Pallas cases) passed 40 of 40 fresh
    draws each. So a failing draw is judged again on REDRAWS fresh draws (seeds derived from
    the first, so FLASHMUX_TEST_SEED replays all of them) and the case fails when any of them
    fails too. The bound is the same on every draw; a defect that shows on most inputs fails
    every time; a lone failing draw stays visible as a warning.
    """
    seed = _rng_seed() if seed is None else seed
    device = device or default_device(kind)
    first = measure(case, backend, kind, device, seed)
    if isinstance(first, str):
        return first
    pending = [first]
    ok, draws = redraw(
        lambda s: pending.pop() if pending else measure(case, backend, kind, device, s), seed
    )
    if not ok:
        failed = [_failure(case, backend, kind, device, s, r) for s, r in draws[1:] if not passed(r)]
        raise AssertionError(
            _failure(case, backend, kind, device, *draws[0])
            + f"\n{len(failed)} of {REDRAWS} fresh redraws failed too:\n" + "\n".join(failed)
        )
    return None


def _failure(case, backend, kind, device, seed, report) -> str:
    bad = [name for name, (e, b) in report.items() if not e <= b]
    return (f"{backend}/{kind}/{device} case {case.id()} seed {seed} failed on {bad}:\n  "
            + format_report(report))


def measure(case: Case, backend: str, kind: str, device: str | None = None,
            seed: int | None = None) -> Report | str:
    """Run one draw of `case` on `backend` with `kind` arrays: -> {name: (error, bound)}, or the
    backend's reasons (a str) when it declines the case."""
    seed = _rng_seed() if seed is None else seed
    device = device or default_device(kind)
    fw = Framework(kind, device)
    rng = np.random.default_rng(seed)
    q64, k64, v64, cu_q, cu_k = make_inputs(case, rng)
    q, k, v = (fw.array(x, case.dtype) for x in (q64, k64, v64))
    # the reference sees exactly the rounded inputs the backend sees
    q64, k64, v64 = (fw.numpy(x) for x in (q, k, v))
    cq = None if cu_q is None else fw.array(cu_q)
    ck = None if cu_k is None else fw.array(cu_k)
    grad = case.grad and kind != "numpy"
    if not grad and case.grad:
        case = replace(case, grad=False, lse_grad=False)
    kw = dict(
        causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale,
        cu_seqlens_q=cq, cu_seqlens_k=ck, dropout_p=case.dropout_p,
    )
    if case.dropout_p:
        kw["dropout_seed"] = int(rng.integers(0, 2**31 - 1))

    # does the backend take this case at all?
    ex_inputs = (q, k, v)
    if kind == "torch" and grad:
        ex_inputs = tuple(x.detach().requires_grad_(True) for x in (q, k, v))
    ex = flashmux.explain(*ex_inputs, return_lse=True, backend=backend, **kw)
    if ex.chosen != backend and not _empty(case, cu_q):
        return f"{backend} declines: " + "; ".join(ex.reasons(backend))

    keep = None
    if case.dropout_p:
        be = dispatch.get_backend(backend)
        nb = case.batch if cu_q is None else len(cu_q) - 1
        lens = case.seqlens or ()
        mq = case.seqlen_q if cu_q is None else max([a for a, _ in lens] + [0])
        mk = case.seqlen_k if cu_q is None else max([b for _, b in lens] + [0])
        if be.dropout_keep_mask is None:
            raise AssertionError(f"{backend} runs dropout but has no dropout_keep_mask to judge it by")
        km = be.dropout_keep_mask(kw["dropout_seed"], case.dropout_p, nb, case.heads_q, mq, mk, q)
        keep = fw.numpy(km) > 0.5

    do64 = rng.standard_normal(_out_shape(case, q64))
    if grad:  # the reference takes the rounded cotangent the backend and plain attention get
        do64 = fw.numpy(fw.array(do64, case.dtype))
    dlse64 = None
    fw.poison_allocator()
    if kind == "torch":
        t = fw.t
        qa, ka, va = (x.detach().requires_grad_(grad) for x in (q, k, v))
        out, lse = flashmux.attention(qa, ka, va, return_lse=True, backend=backend, **kw)
        res = {"out": fw.numpy(out), "lse": fw.numpy(lse)}
        if grad:
            do = fw.array(do64, case.dtype)
            loss = (out.float() * do.float()).sum()
            if case.lse_grad:
                dlse64 = rng.standard_normal(lse.shape)
                dlse = fw.array(dlse64, "float32")
                loss = loss + (t.where(t.isfinite(lse), lse, 0.0) * dlse).sum()
            dq, dk, dv = t.autograd.grad(loss, (qa, ka, va))
            res.update(dq=fw.numpy(dq), dk=fw.numpy(dk), dv=fw.numpy(dv))
    elif kind == "jax":
        jax, jnp = fw.jax, fw.jnp

        if case.transform != "eager" and cu_q is not None:  # traced cu_seqlens: give the maxima
            lens = case.seqlens or ()
            kw["max_seqlen_q"] = max([a for a, _ in lens] + [0])
            kw["max_seqlen_k"] = max([b for _, b in lens] + [0])

        def f(q, k, v):
            return flashmux.attention(q, k, v, return_lse=True, backend=backend, **kw)

        def fwd_bwd(q, k, v, do, dl):
            if not grad:
                return f(q, k, v)
            (out, lse), vjp = jax.vjp(f, q, k, v)
            return (out, lse, *vjp((do, dl)))

        do = dl = None
        if grad:
            do = fw.array(do64, case.dtype)
            lse_shape = (case.heads_q, q.shape[0]) if cu_q is not None else (
                case.batch, case.heads_q, case.seqlen_q)
            dl = jnp.zeros(lse_shape, jnp.float32)
            if case.lse_grad:
                dlse64 = rng.standard_normal(lse_shape)
                dl = jnp.asarray(dlse64, jnp.float32)
        if case.transform == "jit":
            outs = jax.jit(fwd_bwd)(q, k, v, do, dl)
        elif case.transform == "vmap":
            outs = jax.vmap(fwd_bwd)(*(None if x is None else x[None] for x in (q, k, v, do, dl)))
            outs = [x[0] for x in outs]
        elif case.transform == "eager":
            outs = fwd_bwd(q, k, v, do, dl)
        else:
            raise ValueError(f"transform must be 'eager', 'jit' or 'vmap', got {case.transform!r}")
        res = dict(zip(["out", "lse", "dq", "dk", "dv"], (fw.numpy(x) for x in outs)))
        if dlse64 is not None:  # rows that see no key have lse -inf: their cotangent is dropped
            dlse64 = np.where(np.isfinite(res["lse"]), dlse64, 0.0)
    else:
        out, lse = flashmux.attention(q, k, v, return_lse=True, backend=backend, **kw)
        res = {"out": fw.numpy(out), "lse": fw.numpy(lse)}

    rkw = dict(
        causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dropout_p=case.dropout_p, keep_mask=keep,
    )
    ref = {}
    ref["out"], ref["lse"] = reference_forward(q64, k64, v64, **rkw)
    if grad:
        dlse_ref = None
        if dlse64 is not None:
            dlse_ref = np.where(np.isfinite(ref["lse"]), dlse64, 0.0)
        ref["dq"], ref["dk"], ref["dv"] = reference_backward(do64, q64, k64, v64, dlse=dlse_ref, **rkw)

    # plain attention in the same framework and precision
    do_fw = fw.array(do64, case.dtype) if grad else None
    dlse_fw = None
    if dlse64 is not None:
        dlse_fw = fw.array(dlse64, "float32") if kind == "torch" else fw.jnp.asarray(dlse64, fw.jnp.float32)
    plain = fw.plain(q, k, v, case, cu_q, cu_k, keep, do_fw, dlse_fw)
    names = ["out", "lse", "dq", "dk", "dv"][: len(plain)]
    report: Report = {}
    for name, p in zip(names, plain):
        if name in res:
            report[name] = (max_err(res[name], ref[name]), 2 * max_err(p, ref[name]) + ATOL)
    if case.dropout_p and keep is not None:
        n = keep.size
        sd = np.sqrt(case.dropout_p * (1 - case.dropout_p) / n)
        report["keep rate"] = (abs(keep.mean() - (1 - case.dropout_p)), 4 * sd + 1e-12)
    return report


def _empty(case, cu_q):
    if cu_q is not None:
        return int(cu_q[-1]) == 0 or all(b == 0 for _, b in case.seqlens)
    return 0 in (case.batch, case.seqlen_q, case.seqlen_k)


def _out_shape(case, q64):
    return q64.shape[:-1] + (case.dv,)
