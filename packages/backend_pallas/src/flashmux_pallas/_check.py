"""Correctness checks shared by the CPU tests and gpu_check.py (not used by the kernels).

One case = one jitted flashmux.attention call on backend="pallas" with return_lse, plus its VJP
for a random dO (and dlse), judged against flashmux.reference (float64) by SPEC.md's rule:
error <= 2 * error(plain JAX attention in the same precision) + 1e-5, for out, lse, dq, dk, dv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    batch: int = 2
    seqlen_q: int = 33
    seqlen_k: int = 33
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 32
    head_dim_v: int | None = None
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    seqlens: tuple | None = None  # varlen: ((lq, lk), ...)
    dtype: str = "float32"
    lse_grad: bool = False
    transform: str = "jit"  # "jit" | "eager" | "vmap"

    @property
    def dv(self):
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def id(self) -> str:
        bits = [self.dtype, self.transform]
        if self.seqlens:
            bits.append("varlen" + "_".join(f"{a}x{b}" for a, b in self.seqlens))
        else:
            bits.append(f"b{self.batch}s{self.seqlen_q}x{self.seqlen_k}")
        bits.append(f"h{self.heads_q}x{self.heads_kv}d{self.head_dim}x{self.dv}")
        for on, name in ((self.causal, "causal"), (self.lse_grad, "lsegrad")):
            if on:
                bits.append(name)
        if self.window:
            bits.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            bits.append(f"cap{self.softcap}")
        if self.dropout_p:
            bits.append(f"drop{self.dropout_p}")
        return "-".join(bits)


def _plain_seq(jnp, q, k, v, case, keep):
    """Plain attention of one sequence in the input precision (float32 softmax)."""
    from flashmux.reference import allowed_mask

    g = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    scale = 1.0 / np.sqrt(case.head_dim)
    s = jnp.einsum("qhd,khd->hqk", q, k).astype(jnp.float32) * scale
    if case.softcap:
        s = case.softcap * jnp.tanh(s / case.softcap)
    ok = jnp.asarray(allowed_mask(q.shape[0], k.shape[0], case.causal, case.window))[None]
    s = jnp.where(ok, s, -jnp.inf)
    if s.shape[-1]:
        m = jnp.max(jnp.where(ok, s, -1e30), axis=-1, keepdims=True)
    else:
        m = jnp.zeros(s.shape[:-1] + (1,), jnp.float32)
    e = jnp.where(ok, jnp.exp(s - m), 0.0)
    den = jnp.sum(e, axis=-1)
    lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + m[..., 0], -jnp.inf)
    p = e / jnp.where(den > 0, den, 1.0)[..., None]
    if case.dropout_p:
        p = p * keep / (1.0 - case.dropout_p)
    out = jnp.einsum("hqk,khd->qhd", p.astype(q.dtype), v)
    return out, lse


def plain(case, q, k, v, cu_q, cu_k, keep, do, dlse):
    """(out, lse, dq, dk, dv) of plain JAX attention, as float64 numpy."""
    import jax
    import jax.numpy as jnp

    def f(q, k, v):
        outs, lses = [], []
        if cu_q is None:
            segs = [((b,), (b,)) for b in range(q.shape[0])]
        else:
            segs = [
                ((slice(cu_q[b], cu_q[b + 1]),), (slice(cu_k[b], cu_k[b + 1]),))
                for b in range(len(cu_q) - 1)
            ]
        for b, (qi, ki) in enumerate(segs):
            qs, ks, vs = q[qi], k[ki], v[ki]
            kb = None if keep is None else keep[b, :, : qs.shape[0], : ks.shape[0]]
            o, l_ = _plain_seq(jnp, qs, ks, vs, case, kb)
            outs.append(o)
            lses.append(l_)
        if cu_q is None:
            return jnp.stack(outs), jnp.stack(lses)
        return jnp.concatenate(outs, 0), jnp.concatenate(lses, 1)

    (out, lse), vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp((do, dlse if dlse is not None else jnp.zeros_like(lse)))
    return [np.asarray(x.astype(jnp.float32), np.float64) for x in (out, lse, dq, dk, dv)]


def _err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    with np.errstate(invalid="ignore"):
        d = np.where(both_inf, 0.0, np.abs(a - b))
    return float(np.max(d)) if not np.isnan(d).any() else float("nan")


def run_case(case: Case, seed: int = 0, backend: str = "pallas"):
    """Returns {name: (error, bound)}; passes when every error <= bound (no NaN)."""
    import jax
    import jax.numpy as jnp

    import flashmux
    from flashmux.reference import reference_backward, reference_forward

    rng = np.random.default_rng(seed)
    H, Hk, D, Dv = case.heads_q, case.heads_kv, case.head_dim, case.dv
    if case.seqlens:
        lq = [a for a, _ in case.seqlens]
        lk = [b for _, b in case.seqlens]
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        qs, ks = (int(cu_q[-1]), H, D), (int(cu_k[-1]), Hk, D)
        vs = (int(cu_k[-1]), Hk, Dv)
        nb, mq, mk = len(lq), max(lq), max(lk)
    else:
        cu_q = cu_k = None
        qs = (case.batch, case.seqlen_q, H, D)
        ks, vs = (case.batch, case.seqlen_k, Hk, D), (case.batch, case.seqlen_k, Hk, Dv)
        nb, mq, mk = case.batch, case.seqlen_q, case.seqlen_k
    dt = getattr(jnp, case.dtype)
    # Round through the low precision so the reference sees exactly the kernel's inputs.
    q64, k64, v64 = (
        np.asarray(jnp.asarray(rng.standard_normal(s)).astype(dt).astype(jnp.float32), np.float64)
        for s in (qs, ks, vs)
    )
    q, k, v = (jnp.asarray(x).astype(dt) for x in (q64, k64, v64))
    seed_drop = int(rng.integers(1 << 30)) if case.dropout_p else None
    keep = None
    if case.dropout_p:
        from flashmux_pallas import backend as pallas_backend

        keep = np.asarray(
            pallas_backend.dropout_keep_mask(seed_drop, case.dropout_p, nb, H, mq, mk)
        )
    kw = dict(
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        dropout_p=case.dropout_p,
        dropout_seed=seed_drop,
        return_lse=True,
        backend=backend,
    )
    if cu_q is not None:
        kw.update(
            cu_seqlens_q=jnp.asarray(cu_q),
            cu_seqlens_k=jnp.asarray(cu_k),
            max_seqlen_q=mq,
            max_seqlen_k=mk,
        )

    def fn(q, k, v):
        return flashmux.attention(q, k, v, **kw)

    ro, rl = reference_forward(
        q64,
        k64,
        v64,
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        dropout_p=case.dropout_p,
        keep_mask=keep,
    )
    do64 = np.asarray(
        jnp.asarray(rng.standard_normal(ro.shape)).astype(dt).astype(jnp.float32), np.float64
    )
    dlse64 = rng.standard_normal(rl.shape) if case.lse_grad else None
    do = jnp.asarray(do64).astype(dt)
    dlse = (
        None if dlse64 is None else jnp.asarray(np.where(np.isfinite(rl), dlse64, 0.0), jnp.float32)
    )
    if dlse is not None:
        dlse64 = np.asarray(dlse, np.float64)

    def fwd_bwd(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        ct_lse = dlse if dlse is not None else jnp.zeros_like(lse)
        return out, lse, *vjp((do, ct_lse))

    if case.transform == "jit":
        res = jax.jit(fwd_bwd)(q, k, v, do, dlse)
    elif case.transform == "vmap":  # a leading axis of 1 mapped away: same problem, vmapped
        res = jax.vmap(fwd_bwd)(*(None if x is None else x[None] for x in (q, k, v, do, dlse)))
        res = [r[0] for r in res]
    else:
        res = fwd_bwd(q, k, v, do, dlse)
    res = [np.asarray(jnp.asarray(r).astype(jnp.float32), np.float64) for r in res]
    rq, rk, rv = reference_backward(
        do64,
        q64,
        k64,
        v64,
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        dropout_p=case.dropout_p,
        keep_mask=keep,
        dlse=dlse64,
    )
    refs = [ro, rl, rq, rk, rv]
    pl_ = plain(case, q, k, v, cu_q, cu_k, None if keep is None else jnp.asarray(keep), do, dlse)
    names = ["out", "lse", "dq", "dk", "dv"]
    report = {}
    for n, r, ref, p in zip(names, res, refs, pl_):
        report[n] = (_err(r, ref), 2.0 * _err(p, ref) + 1e-5)
    return report


def passed(report) -> bool:
    return all(e <= b for e, b in report.values())  # NaN compares False: fails


def passes(case: Case, seed: int, redraws: int = 2):
    """-> (ok, [(seed, report), ...]): the conformance suite's judging (tests/conformance/
    harness.py): a failing draw is judged again on `redraws` fresh draws with seeds derived from
    the first, and the case fails if any of them fails too (the rule bounds maxima over small
    random tensors, whose tail crosses 2x plain on a few float16 draws in a thousand). A lone
    failing draw is a warning."""
    import warnings

    draws = [(seed, run_case(case, seed=seed))]
    if passed(draws[0][1]):
        return True, draws
    for i in range(1, redraws + 1):
        s = int(np.random.default_rng([seed, i]).integers(0, 2**32 - 1))
        draws.append((s, run_case(case, seed=s)))
        if not passed(draws[-1][1]):
            return False, draws
    warnings.warn(f"{case.id()}: one draw out of bound, {redraws} redraws within it: {draws[0]}",
                  stacklevel=2)
    return True, draws


def judge(cases, seed0: int, label: str, log=print) -> int:
    """Run and judge each case (seeds seed0, seed0 + 1, ...), one PASS/FAIL line each (an
    exception counts as a failure, with its traceback); -> the number of failures."""
    import traceback

    bad = 0
    for i, c in enumerate(cases):
        try:
            rep = run_case(c, seed=seed0 + i)
            ok = passed(rep)
            msg = " ".join(f"{k}={e:.1e}/{b:.1e}" for k, (e, b) in rep.items())
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"ERROR {type(e).__name__}: {str(e)[:600]}"
            traceback.print_exc(limit=4)
        bad += not ok
        log(("PASS" if ok else "FAIL"), label, c.id(), msg)
    return bad
