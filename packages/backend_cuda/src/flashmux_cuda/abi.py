"""The C ABI of libflashmux_cuda (csrc/flashmux_cuda.h) mirrored in ctypes, and the argument
checks that run before any launch.

Nothing here imports a framework: the glue modules turn torch tensors or XLA buffers into
`ArrayRef`s (pointer, shape, element strides, dtype) and `make_args` checks them and fills the
struct. A check that fails raises ValueError (bad input) or `Unsupported` (valid input that the
kernels don't cover), never a crash in a kernel.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

ABI_VERSION = 1
DTYPES = {"float16": 0, "bfloat16": 1}  # FMX_DTYPE_F16, FMX_DTYPE_BF16
ERRORS = {1: "invalid argument", 2: "unsupported", 3: "CUDA error", 4: "workspace"}
MAX_HEAD_DIM = 256
# Kernels load rows with 16-byte cp.async: rows must start on 16 bytes (8 half elements).
ALIGN_BYTES = 16
ALIGN_ELEMS = 8
_I32_MAX = 2**31 - 1

_Stride = ctypes.c_int64 * 3


class FmxAttnArgs(ctypes.Structure):
    """Mirror of `FmxAttnArgs` in flashmux_cuda.h (field order and types must match)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("batch", ctypes.c_int32),
        ("seqlen_q", ctypes.c_int32),
        ("seqlen_k", ctypes.c_int32),
        ("total_q", ctypes.c_int32),
        ("total_k", ctypes.c_int32),
        ("heads_q", ctypes.c_int32),
        ("heads_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("head_dim_v", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("q_stride", _Stride),
        ("k_stride", _Stride),
        ("v_stride", _Stride),
        ("out_stride", _Stride),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("causal", ctypes.c_int32),
        ("window_left", ctypes.c_int32),
        ("window_right", ctypes.c_int32),
        ("dout", ctypes.c_void_p),
        ("dlse", ctypes.c_void_p),
        ("dq", ctypes.c_void_p),
        ("dk", ctypes.c_void_p),
        ("dv", ctypes.c_void_p),
        ("dout_stride", _Stride),
        ("dq_stride", _Stride),
        ("dk_stride", _Stride),
        ("dv_stride", _Stride),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("deterministic", ctypes.c_int32),
    ]


class Unsupported(ValueError):
    """A valid problem that the CUDA kernels do not cover (the dispatcher normally filters these)."""


class KernelError(RuntimeError):
    """The library returned an error code."""


@dataclass(frozen=True)
class ArrayRef:
    """What the ABI needs of one array: device pointer, shape, element strides, dtype name."""

    name: str
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


# ------------------------------------------------------------------------------------------
# Checks


def _check_rows(a: ArrayRef, rank: int, dtype: str) -> None:
    if len(a.shape) != rank:
        raise ValueError(f"{a.name}: expected rank {rank}, got shape {a.shape}")
    if a.dtype != dtype:
        raise ValueError(f"{a.name}: dtype {a.dtype} differs from q's {dtype}")
    if len(a.strides) != rank:
        raise ValueError(f"{a.name}: {len(a.strides)} strides for rank {rank}")
    if a.shape[-1] > 1 and a.strides[-1] != 1:
        raise ValueError(
            f"{a.name}: the last (head_dim) dimension must be contiguous (stride 1), "
            f"got strides {a.strides}"
        )
    for d, (n, s) in enumerate(zip(a.shape[:-1], a.strides[:-1])):
        if s < 0:
            raise ValueError(f"{a.name}: negative stride {s} in dimension {d}")
        if n > 1 and s % ALIGN_ELEMS:
            raise ValueError(
                f"{a.name}: stride {s} of dimension {d} is not a multiple of {ALIGN_ELEMS} elements "
                "(rows must start on 16 bytes)"
            )
    if a.ptr % ALIGN_BYTES:
        raise ValueError(f"{a.name}: data pointer {a.ptr:#x} is not 16-byte aligned")


def _strides3(a: ArrayRef, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) element strides; varlen arrays have no batch dimension."""
    if varlen:
        return (0, a.strides[0], a.strides[1])
    return (a.strides[0], a.strides[1], a.strides[2])


def _window(v: int | None) -> int:
    if v is None:
        return -1
    if v < 0:
        raise ValueError(f"window bound {v} < 0")
    return min(int(v), _I32_MAX)


def make_args(
    q: ArrayRef,
    k: ArrayRef,
    v: ArrayRef,
    out: ArrayRef,
    lse_ptr: int,
    params,
    cu_seqlens_q: int = 0,
    cu_seqlens_k: int = 0,
    batch: int | None = None,
) -> FmxAttnArgs:
    """Check a forward problem and fill the struct (backward fields left zero).

    Padded: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out (B, Sq, Hq, D).
    Varlen (params.varlen): q (Tq, Hq, D), ..., with `batch` sequences and cu_seqlens pointers.
    """
    if getattr(params, "dropout_p", 0.0):
        raise Unsupported("dropout not implemented in CUDA kernels")
    dtype = q.dtype
    if dtype not in DTYPES:
        raise Unsupported(f"dtype {dtype} not supported (float16, bfloat16)")
    varlen = bool(params.varlen)
    rank = 3 if varlen else 4
    for a in (q, k, v, out):
        _check_rows(a, rank, dtype)
    D, Dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"k: head_dim {k.shape[-1]} != q's {D}")
    if Dv != D:
        raise Unsupported(f"head_dim_v {Dv} != head_dim {D} is not supported by the CUDA kernels")
    if D > MAX_HEAD_DIM:
        raise Unsupported(f"head_dim {D} > {MAX_HEAD_DIM}")
    if D % ALIGN_ELEMS:
        raise ValueError(f"head_dim {D} must be a multiple of {ALIGN_ELEMS} (pad it)")
    Hq, Hkv = q.shape[-2], k.shape[-2]
    if v.shape[-2] != Hkv:
        raise ValueError(f"v: {v.shape[-2]} heads != k's {Hkv}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"heads: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: shape {v.shape} does not match k's {k.shape} before head_dim")
    if out.shape != q.shape[:-1] + (Dv,):
        raise ValueError(f"out: shape {out.shape}, expected {q.shape[:-1] + (Dv,)}")
    if varlen:
        if not cu_seqlens_q or not cu_seqlens_k:
            raise ValueError("varlen: cu_seqlens_q and cu_seqlens_k are required")
        if batch is None or batch < 0:
            raise ValueError("varlen: the number of sequences is required")
        B = int(batch)
        Tq, Tk = q.shape[0], k.shape[0]
        Sq = int(params.max_seqlen_q or Tq)
        Sk = int(params.max_seqlen_k or Tk)
    else:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        if k.shape[0] != B:
            raise ValueError(f"k: batch {k.shape[0]} != q's {B}")
        Tq, Tk = B * Sq, B * Sk
    for name, n in (("total_q", Tq), ("total_k", Tk), ("batch", B), ("heads_q", Hq)):
        if n > _I32_MAX:
            raise Unsupported(f"{name} {n} exceeds the kernels' int32 range")
    wl, wr = _window(params.window_left), _window(params.window_right)
    if params.causal:
        wr = 0 if wr < 0 else min(wr, 0)
    softcap = float(params.softcap) if params.softcap else 0.0
    if float(params.scale) <= 0 and not softcap:
        # The forward's online softmax takes row maxima of the unscaled scores and masks them
        # with -inf, both of which assume a positive scale (measured for scale < 0: inf/NaN
        # outputs; scale 0 would multiply -inf by 0). Dispatch declines these first.
        raise Unsupported("scale <= 0 (without softcap) is not supported by the CUDA kernels")
    args = FmxAttnArgs()
    args.dtype = DTYPES[dtype]
    args.batch, args.seqlen_q, args.seqlen_k = B, Sq, Sk
    args.total_q, args.total_k = Tq, Tk
    args.heads_q, args.heads_kv, args.head_dim, args.head_dim_v = Hq, Hkv, D, Dv
    args.q, args.k, args.v, args.out = q.ptr, k.ptr, v.ptr, out.ptr
    args.lse = lse_ptr or None
    args.q_stride = _Stride(*_strides3(q, varlen))
    args.k_stride = _Stride(*_strides3(k, varlen))
    args.v_stride = _Stride(*_strides3(v, varlen))
    args.out_stride = _Stride(*_strides3(out, varlen))
    args.cu_seqlens_q = cu_seqlens_q or None
    args.cu_seqlens_k = cu_seqlens_k or None
    args.scale = float(params.scale)
    args.softcap = softcap
    args.causal = int(bool(params.causal))
    args.window_left, args.window_right = wl, wr
    args.deterministic = int(bool(params.deterministic))
    return args


def add_backward(
    args: FmxAttnArgs,
    dout: ArrayRef,
    dq: ArrayRef,
    dk: ArrayRef,
    dv: ArrayRef,
    dlse_ptr: int = 0,
    workspace_ptr: int = 0,
    workspace_bytes: int = 0,
    varlen: bool = False,
    q_shape=None,
    k_shape=None,
) -> FmxAttnArgs:
    """Check the gradient arrays against the forward problem and fill the backward fields."""
    dtype = {v: k for k, v in DTYPES.items()}[args.dtype]
    rank = 3 if varlen else 4
    for a, like in ((dout, q_shape), (dq, q_shape), (dk, k_shape), (dv, k_shape)):
        _check_rows(a, rank, dtype)
        if like is not None and tuple(a.shape) != tuple(like):
            raise ValueError(f"{a.name}: shape {a.shape}, expected {tuple(like)}")
    args.dout, args.dq, args.dk, args.dv = dout.ptr, dq.ptr, dk.ptr, dv.ptr
    args.dlse = dlse_ptr or None
    args.dout_stride = _Stride(*_strides3(dout, varlen))
    args.dq_stride = _Stride(*_strides3(dq, varlen))
    args.dk_stride = _Stride(*_strides3(dk, varlen))
    args.dv_stride = _Stride(*_strides3(dv, varlen))
    args.workspace = workspace_ptr or None
    args.workspace_bytes = workspace_bytes
    return args


# ------------------------------------------------------------------------------------------
# The loaded library


class Library:
    """libflashmux_cuda.so loaded with ctypes, its ABI version checked."""

    def __init__(self, path):
        self.path = str(path)
        self.lib = lib = ctypes.CDLL(self.path)
        lib.fmx_abi_version.restype = ctypes.c_int
        lib.fmx_abi_version.argtypes = []
        got = lib.fmx_abi_version()
        if got != ABI_VERSION:
            raise KernelError(f"{self.path}: ABI version {got}, expected {ABI_VERSION}")
        for fn in (lib.fmx_attn_fwd, lib.fmx_attn_bwd):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(FmxAttnArgs), ctypes.c_void_p]
        lib.fmx_attn_bwd_workspace_size.restype = ctypes.c_size_t
        lib.fmx_attn_bwd_workspace_size.argtypes = [ctypes.POINTER(FmxAttnArgs)]
        lib.fmx_last_error.restype = ctypes.c_char_p
        lib.fmx_last_error.argtypes = []

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = (self.lib.fmx_last_error() or b"").decode(errors="replace")
            kind = ERRORS.get(rc, f"error {rc}")
            cls = Unsupported if rc == 2 else ValueError if rc == 1 else KernelError
            raise cls(f"flashmux_cuda {what}: {kind}: {msg}")

    def forward(self, args: FmxAttnArgs, stream: int) -> None:
        self._check(self.lib.fmx_attn_fwd(ctypes.byref(args), stream or None), "forward")

    def backward(self, args: FmxAttnArgs, stream: int) -> None:
        self._check(self.lib.fmx_attn_bwd(ctypes.byref(args), stream or None), "backward")

    def workspace_size(self, args: FmxAttnArgs) -> int:
        return int(self.lib.fmx_attn_bwd_workspace_size(ctypes.byref(args)))
