"""The reference backend's fast path for float32 NumPy arrays on the CPU (issue 14).

The generic reference (builtin/reference.py) issues one batched matmul per query chunk and lets
the BLAS library thread it. On a machine with few cores that is slow twice over: NumPy's
elementwise passes (max, exp, sum) run on one core, and OpenBLAS's own thread pool, for matmuls
this small (64-256 rows, K = 64), spends more time synchronizing than computing; on a loaded
2-core machine the same forward took 3-12 s instead of 0.3 s (packages/core/NOTES.md).

Here the work is cut into independent items, each run start to finish by one worker thread of a
small pool (one per core; NumPy releases the GIL in BLAS calls and ufuncs), with the BLAS
library told to use one thread *in that worker only* (OpenBLAS's `openblas_set_num_threads_local`,
found in the loaded library; nothing process-wide changes). Without that symbol (another BLAS),
the work runs serially in the caller's thread.

- forward: an item is (batch x KV head, block of `ROWS` heads-first rows); FlashAttention's
  online softmax over key blocks of `KEYS` columns, so a score block (256 x 1024 float32, 1 MiB)
  stays in the core's cache; causal and window bands skip the key blocks no row of the item can
  see and build a mask only for the blocks a band cuts through.
- backward: an item is one (batch x KV head) (all its row blocks, so dK/dV of that head have
  one writer); with fewer heads than workers the rows of a head are split and each part
  accumulates into its own dK/dV, summed in a fixed order (deterministic either way).
  delta = rowsum(dO * O) from the float32 output (exact for float32 inputs).

Taken for NumPy float32 q/k/v (and dO) without varlen, dropout or softcap; everything else goes
to the generic path. Memory: float32 heads-first copies of the operands plus a few score blocks
per worker: linear in the sequence length.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..spec import Params

ROWS = 256  # heads-first query rows per block (a multiple of the GQA group size)
KEYS = 1024  # keys per score block (forward)
BWD_KEYS = 512  # keys per score block (backward: two blocks live at a time)
SERIAL_BELOW = 1 << 18  # score elements (B*Hq*Sq*Sk) under which one worker does all items
INLINE_BELOW = 1 << 15  # ... and under which the caller's thread does (GEMMs this small run on
# one BLAS thread anyway; measured S=64 x 8 heads: 0.3 ms inline vs 0.5-1.0 ms through the pool)

_NEG_INF = np.float32(-np.inf)


def applies(q, k, v, cu_q, p: Params, do=None) -> bool:
    """True when this path computes the call (else the generic reference does)."""
    if cu_q is not None or p.dropout_p or p.softcap or p.alibi or p.mask_block_size:
        return False
    xs = (q, k, v) if do is None else (q, k, v, do)
    if not all(type(x) is np.ndarray and x.dtype == np.float32 for x in xs):
        return False
    return all(n > 0 for x in (q, k, v) for n in x.shape)


# -- threads: a pool of one worker per core, each with a one-thread BLAS -----------------------

_blas_local = None  # openblas_set_num_threads_local, or False when not found
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _find_blas_local():
    """OpenBLAS's per-thread thread count setter, from the library NumPy loaded (None if none)."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            fn = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def threads() -> int:
    """Worker threads: FLASHMUX_CPU_THREADS, else the cores this process may run on; 1 (the
    caller's thread) when the BLAS library's thread count cannot be set per thread."""
    global _blas_local
    if _blas_local is None:
        np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # BLAS is loaded by now
        _blas_local = _find_blas_local() or False
    env = os.environ.get("FLASHMUX_CPU_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FLASHMUX_CPU_THREADS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FLASHMUX_CPU_THREADS: expected a positive integer, got {env!r}")
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
    return n if _blas_local else 1


def _init_worker():
    if _blas_local:
        _blas_local(1)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="flashmux-cpu", initializer=_init_worker)
        return _pool


def _reset_after_fork():
    global _pool
    _pool = None  # the child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _run(fn, items, work: int):
    """fn(item) for every item on the pool's one-BLAS-thread workers; small work (or one item)
    in a single worker, so that the caller's thread's BLAS setting is never touched; in the
    caller's thread only where the BLAS thread count cannot be set per thread."""
    if not _blas_local:
        threads()  # finds the symbol on first use
    if not _blas_local or work < INLINE_BELOW:  # tiny: a thread hand-off would cost more
        for it in items:
            fn(it)
        return
    n = threads()
    pool = _get_pool(max(n, 1))
    if n == 1 or work < SERIAL_BELOW or len(items) == 1:
        def all_items():
            for it in items:
                fn(it)

        pool.submit(all_items).result()
        return
    for f in [pool.submit(fn, it) for it in items]:
        f.result()  # re-raises a worker's exception


# -- layout ------------------------------------------------------------------------------------


def _rows_scaled(buf, x, bi, h, g, r0, r1, scale):
    """Heads-first rows r0:r1 of KV head h, batch bi, of x (B, S, Hkv*g, D) as a contiguous
    float32 (r1 - r0, D) block in buf (times scale): a copy, the caller's x is never written."""
    src = x[bi, r0 // g : r1 // g, h * g : (h + 1) * g]  # (positions, g, D) view
    dst = buf[: (r1 - r0) * src.shape[-1]].reshape(src.shape)
    if scale is None:
        np.copyto(dst, src)
    else:
        np.multiply(src, scale, out=dst)
    return dst.reshape(r1 - r0, src.shape[-1])


def _rows_hf(x, hkv, g):
    """(B, Hq, S) -> (B, Hkv, S*g), heads-first row order."""
    b, _, s = x.shape
    return np.ascontiguousarray(x.reshape(b, hkv, g, s).transpose(0, 1, 3, 2)).reshape(b, hkv, s * g)


class _Band:
    """Which keys the heads-first rows [r0, r1) may see (bottom-right aligned windows)."""

    def __init__(self, p: Params, sq: int, sk: int, g: int):
        self.wl, self.wr, self.off, self.g, self.sk = p.window_left, p.window_right, sk - sq, g, sk
        self._cache: dict = {}  # (rows, cols, first column - first position): the masked keys

    def keys(self, r0, r1):
        """[lo, hi): the keys any row of the block sees; [a, z): those every row sees."""
        p0, p1 = r0 // self.g, (r1 - 1) // self.g
        lo, hi, a, z = 0, self.sk, 0, self.sk
        if self.wl is not None:
            lo = min(self.sk, max(0, p0 + self.off - self.wl))
            a = max(0, p1 + self.off - self.wl)
        if self.wr is not None:
            hi = min(self.sk, max(lo, p1 + self.off + self.wr + 1))
            z = max(0, p0 + self.off + self.wr + 1)
        return lo, hi, a, z

    def mask_(self, s, r0, r1, c0, c1, a, z, fill):
        """s (rows r0:r1, keys c0:c1) = fill where not allowed, touching only the columns
        outside [a, z) (those every row sees)."""
        for x0, x1 in ((c0, min(c1, a)), (max(c0, z), c1)):
            if x1 > x0:
                np.copyto(s[:, x0 - c0 : x1 - c0], fill, where=self.hidden(r0, r1, x0, x1))

    def hidden(self, r0, r1, c0, c1):
        """~masked(r0, r1, c0, c1), cached: it depends only on the block's shape and on c0
        minus the block's first position (r0 is a multiple of g), so the diagonal blocks of a
        causal call share one."""
        key = (r1 - r0, c1 - c0, c0 - r0 // self.g)
        m = self._cache.get(key)
        if m is None:
            m = ~self.masked(r0, r1, c0, c1)
            if len(self._cache) < 64:
                self._cache[key] = m
        return m

    def masked(self, r0, r1, c0, c1):
        """Bool (r1 - r0, c1 - c0): False where the key is not allowed."""
        pos = (np.arange(r0, r1) // self.g)[:, None] + self.off
        j = np.arange(c0, c1)[None, :]
        ok = np.ones((r1 - r0, c1 - c0), bool)
        if self.wl is not None:
            ok &= j >= pos - self.wl
        if self.wr is not None:
            ok &= j <= pos + self.wr
        return ok


class _Bufs:
    pass


def _scratch(scratch: dict, **sizes):
    """This worker thread's float32 buffers for one call (allocated on its first item)."""
    key = threading.get_ident()
    bufs = scratch.get(key)
    if bufs is None:
        bufs = _Bufs()
        for name, n in sizes.items():
            setattr(bufs, name, np.empty(n, np.float32))
        scratch[key] = bufs
    return bufs


def _key_blocks(lo: int, hi: int, width: int):
    """[lo, hi) in blocks of at most width keys, of equal widths (no narrow last block)."""
    n = -(-(hi - lo) // width)
    w = -(-(hi - lo) // max(n, 1))
    return [(c0, min(hi, c0 + w)) for c0 in range(lo, hi, max(w, 1))]


def _row_blocks(sg: int, g: int):
    step = max(g, (ROWS // g) * g)
    return [(r0, min(sg, r0 + step)) for r0 in range(0, sg, step)]


# -- forward -----------------------------------------------------------------------------------


def forward(q, k, v, p: Params):
    """float32 out (B, Sq, Hq, Dv) and lse (B, Hq, Sq)."""
    b, sq, hq, _ = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    d = q.shape[3]
    scale = np.float32(p.scale)
    out = np.empty((b, sq, hq, dv), np.float32)
    lse_h = np.empty((b, hkv, sq * g), np.float32)
    band = _Band(p, sq, sk, g)
    scratch: dict = {}  # per worker thread: {thread id: buffers}

    def item(it):
        bi, h, r0, r1 = it
        m = r1 - r0
        rows = max(ROWS, g)
        tls = _scratch(scratch, s=rows * KEYS, t=rows * dv, acc=rows * dv, q=rows * d)
        qc = _rows_scaled(tls.q, q, bi, h, g, r0, r1, scale)  # K, V: read in place (strided)
        kb, vb = k[bi, :, h], v[bi, :, h]  # (Sk, D), (Sk, Dv) views
        lo, hi, a, z = band.keys(r0, r1)
        acc = tls.acc[: m * dv].reshape(m, dv)
        acc[:] = 0
        mx = np.full((m, 1), _NEG_INF)
        den = np.zeros((m, 1), np.float32)
        tmp = tls.t[: m * dv].reshape(m, dv)
        for c0, c1 in _key_blocks(lo, hi, KEYS):
            s = tls.s[: m * (c1 - c0)].reshape(m, c1 - c0)
            np.matmul(qc, kb[c0:c1].T, out=s)
            band.mask_(s, r0, r1, c0, c1, a, z, _NEG_INF)
            mn = np.maximum(mx, s.max(-1, keepdims=True))
            ms = np.where(mn == _NEG_INF, np.float32(0), mn)  # rows that saw nothing yet
            np.subtract(s, ms, out=s)
            np.exp(s, out=s)
            if c0 == lo:  # first block: nothing to rescale
                s.sum(-1, keepdims=True, out=den)
                np.matmul(s, vb[c0:c1], out=acc)
            else:
                alpha = np.exp(mx - ms)
                den *= alpha
                den += s.sum(-1, keepdims=True)
                np.matmul(s, vb[c0:c1], out=tmp)
                acc *= alpha
                acc += tmp
            mx = mn
        seen = den > 0
        dst = out[bi, r0 // g : r1 // g, h * g : (h + 1) * g]  # (positions, g, Dv) view
        np.divide(acc.reshape(dst.shape), np.where(seen, den, np.float32(1)).reshape(-1, g, 1),
                  out=dst)
        with np.errstate(divide="ignore"):
            lse_h[bi, h, r0:r1] = np.where(seen, np.log(np.where(seen, den, 1)) + mx, _NEG_INF)[:, 0]

    items = [(bi, h, r0, r1) for bi in range(b) for h in range(hkv) for r0, r1 in _row_blocks(sq * g, g)]
    _run(item, items, b * hq * sq * sk)
    lse = np.ascontiguousarray(lse_h.reshape(b, hkv, sq, g).transpose(0, 1, 3, 2)).reshape(b, hq, sq)
    return out, lse


# -- backward ----------------------------------------------------------------------------------


def backward(do, dlse, q, k, v, out, lse, p: Params):
    """float32 dq, dk, dv (the caller casts)."""
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    # q and dO are copied (q scaled) per row block by the workers; K, V, dK, dV, dQ in place
    delta = np.einsum("bshd,bshd->bhs", do, np.asarray(out, np.float32))  # rowsum(dO * O)
    if dlse is not None:
        delta -= dlse
    delta = _rows_hf(delta, hkv, g)
    lse_h = _rows_hf(np.asarray(lse, np.float32), hkv, g)
    lse_h = np.where(np.isfinite(lse_h), lse_h, np.float32(0))  # rows that see no key: masked
    dq = np.empty((b, sq, hq, d), np.float32)
    dk = np.zeros((b, sk, hkv, d), np.float32)
    dvv = np.zeros((b, sk, hkv, dv), np.float32)
    band = _Band(p, sq, sk, g)
    blocks = _row_blocks(sq * g, g)
    # parts per head: one writer of dK/dV per head, or (fewer heads than workers) row-split parts
    # with their own dK/dV, summed below in part order
    parts = max(1, min(len(blocks), -(-threads() // (b * hkv))))
    own = {}
    if parts > 1:
        own = {(bi, h, j): (np.zeros((sk, d), np.float32), np.zeros((sk, dv), np.float32))
               for bi in range(b) for h in range(hkv) for j in range(parts)}
    scratch: dict = {}  # per worker thread: {thread id: buffers}
    kb = BWD_KEYS
    scale = np.float32(p.scale)

    def item(it):
        bi, h, j = it
        rows = max(ROWS, g)
        tls = _scratch(scratch, s=rows * kb, dp=rows * kb, kd=kb * max(d, dv), qd=rows * d,
                       dq=rows * d, q=rows * d, do=rows * dv)
        dk_, dv_ = own.get((bi, h, j), (dk[bi, :, h], dvv[bi, :, h]))
        kh, vh = k[bi, :, h], v[bi, :, h]  # (Sk, D), (Sk, Dv) views
        for r0, r1 in blocks[j::parts]:
            m = r1 - r0
            qc = _rows_scaled(tls.q, q, bi, h, g, r0, r1, scale)
            doc = _rows_scaled(tls.do, do, bi, h, g, r0, r1, None)
            lr = lse_h[bi, h, r0:r1, None]
            dl = delta[bi, h, r0:r1, None]
            acc = tls.dq[: m * d].reshape(m, d)
            acc[:] = 0
            qd = tls.qd[: m * d].reshape(m, d)
            lo, hi, a, z = band.keys(r0, r1)
            for c0, c1 in _key_blocks(lo, hi, kb):
                n = c1 - c0
                s = tls.s[: m * n].reshape(m, n)
                dp = tls.dp[: m * n].reshape(m, n)
                np.matmul(qc, kh[c0:c1].T, out=s)
                np.subtract(s, lr, out=s)
                with np.errstate(over="ignore"):  # rows that see no key: masked just below
                    np.exp(s, out=s)  # P
                band.mask_(s, r0, r1, c0, c1, a, z, np.float32(0))
                np.matmul(doc, vh[c0:c1].T, out=dp)  # dP
                kd = tls.kd[: n * dv].reshape(n, dv)
                np.matmul(s.T, doc, out=kd)
                dv_[c0:c1] += kd
                np.subtract(dp, dl, out=dp)
                np.multiply(dp, s, out=dp)  # dS
                np.matmul(dp, kh[c0:c1], out=qd)
                acc += qd
                kd = tls.kd[: n * d].reshape(n, d)
                np.matmul(dp.T, qc, out=kd)  # qc carries the scale
                dk_[c0:c1] += kd
            dst = dq[bi, r0 // g : r1 // g, h * g : (h + 1) * g]  # (positions, g, D) view
            np.multiply(acc.reshape(dst.shape), scale, out=dst)

    items = [(bi, h, j) for bi in range(b) for h in range(hkv) for j in range(parts)]
    _run(item, items, b * hq * sq * sk)
    for (bi, h, _j), (dk_, dv_) in own.items():  # insertion order: part 0, 1, ... per head
        dk[bi, :, h] += dk_
        dvv[bi, :, h] += dv_
    return dq, dk, dvv


# -- JAX on the CPU: the same threaded path, called from XLA -----------------------------------


def jax_applies(q, k, v, cu_q, p: Params, do=None) -> bool:
    """True for float32 JAX arrays (or tracers) when JAX's default device is the CPU and the
    call is one this path computes (as applies(); FLASHMUX_JAX_CPU_CALLBACK=0 turns it off)."""
    if os.environ.get("FLASHMUX_JAX_CPU_CALLBACK", "1") == "0":
        return False
    if cu_q is not None or p.dropout_p or p.softcap or p.alibi or p.mask_block_size:
        return False
    import jax

    xs = (q, k, v) if do is None else (q, k, v, do)
    if not all(x.dtype == np.float32 and x.ndim == 4 for x in xs):
        return False
    if not all(n > 0 for x in (q, k, v) for n in x.shape):
        return False
    return jax.default_backend() == "cpu"


def jax_forward(q, k, v, p: Params):
    """(out, lse) through jax.pure_callback: works eagerly and under jit / vmap (sequential);
    the host arrays are only read (the path copies before it scales)."""
    import jax

    b, sq, hq, _ = q.shape
    shapes = (jax.ShapeDtypeStruct((b, sq, hq, v.shape[3]), np.float32),
              jax.ShapeDtypeStruct((b, hq, sq), np.float32))

    def host(q, k, v):
        return forward(np.asarray(q), np.asarray(k), np.asarray(v), p)

    return jax.pure_callback(host, shapes, q, k, v, vmap_method="sequential")


def jax_backward(do, dlse, q, k, v, out, lse, p: Params):
    import jax

    shapes = tuple(jax.ShapeDtypeStruct(x.shape, np.float32) for x in (q, k, v))

    def host(do, q, k, v, out, lse, *dlse_):
        a = [np.asarray(x) for x in (do, q, k, v, out, lse)]
        dl = np.asarray(dlse_[0], np.float32) if dlse_ else None
        return backward(a[0], dl, *a[1:], p)

    extra = () if dlse is None else (dlse,)
    return jax.pure_callback(host, shapes, do, q, k, v, out, lse, *extra, vmap_method="sequential")
