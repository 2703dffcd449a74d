"""The C ABI of libflashmux_cuda (csrc/flashmux_cuda.h) mirrored in ctypes, and the argument
checks that run before any launch.

Nothing here imports a framework: the glue modules turn torch tensors or XLA buffers into
`ArrayRef`s (pointer, shape, element strides, dtype) and `make_args` checks them and fills the
struct. A check that fails raises ValueError (bad input) or `Unsupported` (valid input that the
kernels don't cover), never a crash in a kernel.
"""

from __future__ import annotations

import ctypes
import math
import os
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


class FmxAttnExt(ctypes.Structure):
    """Mirror of `FmxAttnExt` in flashmux_cuda.h: the optional operands of fmx_attn_*_ext
    (added after ABI version 1; struct_size lets the C side read older, shorter structs)."""

    _fields_ = [
        ("struct_size", ctypes.c_int64),
        ("alibi_slopes", ctypes.c_void_p),
        ("alibi_stride", ctypes.c_int64),
        ("mask_block", ctypes.c_int32),
        ("mask_batch", ctypes.c_int32),
        ("mask_heads", ctypes.c_int32),
        ("mask_nq", ctypes.c_int32),
        ("mask_nk", ctypes.c_int32),
        ("mask_reserved", ctypes.c_int32),
        ("q_num_full", ctypes.c_void_p),
        ("q_full_idx", ctypes.c_void_p),
        ("q_num_part", ctypes.c_void_p),
        ("q_part_idx", ctypes.c_void_p),
        ("tile_id", ctypes.c_void_p),
        ("bits", ctypes.c_void_p),
        ("kv_num_full", ctypes.c_void_p),
        ("kv_full_idx", ctypes.c_void_p),
        ("kv_num_part", ctypes.c_void_p),
        ("kv_part_idx", ctypes.c_void_p),
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

    Padded: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), out (B, Sq, Hq, Dv).
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
    # Dv != D: the kernels of max(D, Dv) run it, the smaller one zero-filled on load (NOTES.md)
    for name, n in (("head_dim", D), ("head_dim_v", Dv)):
        if n > MAX_HEAD_DIM:
            raise Unsupported(f"{name} {n} > {MAX_HEAD_DIM}")
        if n % ALIGN_ELEMS:
            raise ValueError(f"{name} {n} must be a multiple of {ALIGN_ELEMS} (pad it)")
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


def make_ext(alibi: ArrayRef | None, batch: int, heads_q: int) -> FmxAttnExt | None:
    """Check the optional operands and fill FmxAttnExt; None when there are none (plain call).

    alibi: float32 slopes (heads_q,) or (batch, heads_q), last dimension contiguous; `batch` is
    the number of sequences (varlen: len(cu_seqlens) - 1).
    """
    if alibi is None:
        return None
    if alibi.dtype != "float32":
        raise ValueError(f"alibi_slopes: expected float32, got {alibi.dtype}")
    if tuple(alibi.shape) == (heads_q,):
        stride = 0
    elif tuple(alibi.shape) == (batch, heads_q):
        stride = int(alibi.strides[0]) if batch > 1 else heads_q
    else:
        raise ValueError(
            f"alibi_slopes: expected shape ({heads_q},) or ({batch}, {heads_q}), got {alibi.shape}"
        )
    if heads_q > 1 and alibi.strides[-1] != 1:
        raise ValueError(f"alibi_slopes: the head dimension must be contiguous, strides {alibi.strides}")
    if stride and stride < heads_q:
        raise ValueError(f"alibi_slopes: batch stride {stride} < heads {heads_q}")
    if alibi.ptr % 4:
        raise ValueError(f"alibi_slopes: data pointer {alibi.ptr:#x} is not 4-byte aligned")
    ext = FmxAttnExt()
    ext.struct_size = ctypes.sizeof(FmxAttnExt)
    ext.alibi_slopes = alibi.ptr or None
    ext.alibi_stride = stride
    return ext


# The BlockMask arrays the kernels read (flashmux.blockmask), with their trailing dims: "q" the
# query blocks, "k" the key blocks, "-" not checked (bits: one row per partial tile).
MASK_ARRAYS = {"q_num_full": "q", "q_full_idx": "qk", "q_num_part": "q", "q_part_idx": "qk",
               "tile_id": "qk", "bits": "---", "kv_num_full": "k", "kv_full_idx": "kq",
               "kv_num_part": "k", "kv_part_idx": "kq"}
MASK_BLOCK_MULTIPLE = 128  # the forward kernels' query tile: a mask block holds whole tiles


def add_block_mask(ext: FmxAttnExt | None, arrays: dict, block: int, batch: int, heads_q: int,
                   seqlen_q: int, seqlen_k: int) -> FmxAttnExt:
    """Fill the block-mask fields of FmxAttnExt (made here when ext is None) from ArrayRefs of
    the BlockMask's int32 arrays (MASK_ARRAYS), checking dtypes, ranks and contiguity."""
    if block % MASK_BLOCK_MULTIPLE:
        raise Unsupported(f"block_mask: block_size {block} is not a multiple of "
                          f"{MASK_BLOCK_MULTIPLE} (the CUDA kernels' query tile)")
    nq, nk = -(-seqlen_q // block), -(-seqlen_k // block)
    lead: tuple = ()
    for name, dims in MASK_ARRAYS.items():
        a = arrays[name]
        rank = len(dims) + (0 if name == "bits" else 2)
        if a.dtype != "int32":
            raise ValueError(f"block_mask.{name}: expected int32, got {a.dtype}")
        if len(a.shape) != rank:
            raise ValueError(f"block_mask.{name}: expected rank {rank}, got shape {a.shape}")
        dense = tuple(math.prod(a.shape[i + 1:]) for i in range(rank))
        if any(n > 1 and s != d for n, s, d in zip(a.shape, a.strides, dense)):
            raise ValueError(f"block_mask.{name}: must be contiguous, strides {a.strides}")
        if name != "bits":
            lead = lead or tuple(a.shape[:2])
            want = tuple({"q": nq, "k": nk}[c] for c in dims)
            if tuple(a.shape[:2]) != lead or tuple(a.shape[2:]) != want:
                raise ValueError(f"block_mask.{name}: shape {a.shape} does not fit "
                                 f"{nq} x {nk} blocks of {block}")
    if lead[0] not in (1, batch) or lead[1] not in (1, heads_q):
        raise ValueError(f"block_mask: leading dims {lead}, expected 1 or ({batch}, {heads_q})")
    if ext is None:
        ext = FmxAttnExt()
        ext.struct_size = ctypes.sizeof(FmxAttnExt)
    ext.mask_block, ext.mask_batch, ext.mask_heads = block, lead[0], lead[1]
    ext.mask_nq, ext.mask_nk = nq, nk
    for name in MASK_ARRAYS:
        setattr(ext, name, arrays[name].ptr or None)
    return ext


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
    out_shape=None,
    v_shape=None,
) -> FmxAttnArgs:
    """Check the gradient arrays against the forward problem and fill the backward fields.
    dout is checked against out_shape and dv against v_shape (default: q_shape and k_shape,
    the Dv == D shapes)."""
    dtype = {v: k for k, v in DTYPES.items()}[args.dtype]
    rank = 3 if varlen else 4
    out_shape = q_shape if out_shape is None else out_shape
    v_shape = k_shape if v_shape is None else v_shape
    for a, like in ((dout, out_shape), (dq, q_shape), (dk, k_shape), (dv, v_shape)):
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

    def _ext_fn(self, name: str):
        """fmx_attn_{fwd,bwd}_ext, typed; KernelError when the library predates them."""
        fn = getattr(self.lib, name, None)
        if fn is None:
            raise KernelError(f"{self.path} has no {name} (built before ALiBi support: rebuild)")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(FmxAttnArgs), ctypes.POINTER(FmxAttnExt), ctypes.c_void_p]
        return fn

    def forward(self, args: FmxAttnArgs, stream: int, ext: FmxAttnExt | None = None) -> None:
        if ext is None:
            self._check(self.lib.fmx_attn_fwd(ctypes.byref(args), stream or None), "forward")
        else:
            rc = self._ext_fn("fmx_attn_fwd_ext")(ctypes.byref(args), ctypes.byref(ext), stream or None)
            self._check(rc, "forward")

    def backward(self, args: FmxAttnArgs, stream: int, ext: FmxAttnExt | None = None) -> None:
        if ext is None:
            self._check(self.lib.fmx_attn_bwd(ctypes.byref(args), stream or None), "backward")
        else:
            rc = self._ext_fn("fmx_attn_bwd_ext")(ctypes.byref(args), ctypes.byref(ext), stream or None)
            self._check(rc, "backward")

    def workspace_size(self, args: FmxAttnArgs) -> int:
        return int(self.lib.fmx_attn_bwd_workspace_size(ctypes.byref(args)))


# ------------------------------------------------------------------------------------------
# KV-cache decode (fmx_decode, csrc/decode/): added after ABI version 1, looked up lazily.


class FmxDecodeArgs(ctypes.Structure):
    """Mirror of `FmxDecodeArgs` in flashmux_cuda.h (field order and types must match)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("batch", ctypes.c_int32),
        ("seqlen_q", ctypes.c_int32),
        ("heads_q", ctypes.c_int32),
        ("heads_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("head_dim_v", ctypes.c_int32),
        ("capacity", ctypes.c_int32),
        ("page_size", ctypes.c_int32),
        ("num_pages", ctypes.c_int32),
        ("max_pages", ctypes.c_int32),
        ("q", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("q_stride", _Stride),
        ("k_stride", _Stride),
        ("v_stride", _Stride),
        ("out_stride", _Stride),
        ("seqlens_k", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p),
        ("block_table_stride", ctypes.c_int64),
        ("alibi_slopes", ctypes.c_void_p),
        ("alibi_stride", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("window_left", ctypes.c_int32),
        ("window_right", ctypes.c_int32),
        ("num_splits", ctypes.c_int32),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
    ]


DECODE_HEAD_DIMS = "multiples of 8 up to 256 (kernels for 64, 128 and 256; others use the next)"
MAX_SPLITS = 128
# A split should stream at least this many keys: below it the merge costs more than it buys.
MIN_KEYS_PER_SPLIT = 256
# Programs per SM the split heuristic aims at (the kernel's register budget allows 3-4
# resident); FLASHMUX_CUDA_DECODE_PROGRAMS_PER_SM overrides it for tuning runs.
PROGRAMS_PER_SM = int(os.environ.get("FLASHMUX_CUDA_DECODE_PROGRAMS_PER_SM", "4"))


def rows_per_program(rows: int) -> int:
    """Query rows one program packs (csrc/decode/decode_api.h: rows_per_program)."""
    return 1 if rows <= 1 else 2 if rows <= 2 else 4 if rows <= 4 else 8


def choose_splits(batch: int, heads_kv: int, rows: int, capacity: int, num_sms: int) -> int:
    """Key splits for a decode call when the caller does not force them.

    Programs = batch x heads_kv x row chunks; enough splits for PROGRAMS_PER_SM programs per SM,
    never splits shorter than MIN_KEYS_PER_SPLIT keys of the capacity (the real lengths live on
    the device and are not read), at most MAX_SPLITS.
    """
    chunks = -(-max(rows, 1) // rows_per_program(rows))
    programs = max(1, batch * heads_kv * chunks)
    want = -(-PROGRAMS_PER_SM * max(num_sms, 1) // programs)
    by_len = max(1, capacity // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def make_decode_args(
    q: ArrayRef,
    k_cache: ArrayRef,
    v_cache: ArrayRef,
    out: ArrayRef,
    lse_ptr: int,
    seqlens_ptr: int,
    params,
    num_splits: int,
    block_table: ArrayRef | None = None,
    alibi_ptr: int = 0,
    alibi_stride: int = 0,
) -> FmxDecodeArgs:
    """Check a decode problem (shapes, dtypes, strides, alignment) and fill the struct.

    q (B, Sq, Hq, D), out (B, Sq, Hq, Dv); contiguous k/v_cache (B, S_max, Hkv, D/Dv) or paged
    (num_pages, page_size, Hkv, D/Dv) with block_table (B, max_pages) int32. `params` is the
    core's DecodeParams (scale, window_left/right with causal folded in, softcap, page_size).
    """
    dtype = q.dtype
    if dtype not in DTYPES:
        raise Unsupported(f"dtype {dtype} not supported (float16, bfloat16)")
    for a in (q, k_cache, v_cache, out):
        _check_rows(a, 4, dtype)
    B, Sq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    if k_cache.shape[-1] != D:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[-1]} != q's {D}")
    if Dv != D:
        raise Unsupported(f"head_dim_v {Dv} != head_dim {D} is not supported by the CUDA kernels")
    if D > MAX_HEAD_DIM or D % ALIGN_ELEMS:
        raise Unsupported(f"head_dim {D}: the decode kernels take {DECODE_HEAD_DIMS}")
    if v_cache.shape[:-1] != k_cache.shape[:-1]:
        raise ValueError(f"v_cache: shape {v_cache.shape} does not match k_cache's {k_cache.shape}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"heads: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if out.shape != (B, Sq, Hq, Dv):
        raise ValueError(f"out: shape {out.shape}, expected {(B, Sq, Hq, Dv)}")
    page_size = int(getattr(params, "page_size", 0) or 0)
    if block_table is not None:
        if len(block_table.shape) != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected shape ({B}, max_pages), got {block_table.shape}")
        if block_table.dtype != "int32":
            raise ValueError(f"block_table: expected int32, got {block_table.dtype}")
        if block_table.shape[1] > 1 and block_table.strides[1] != 1:
            raise ValueError(f"block_table: the last dimension must be contiguous, strides {block_table.strides}")
        num_pages, ps = k_cache.shape[0], k_cache.shape[1]
        if page_size and page_size != ps:
            raise ValueError(f"page_size {page_size} != k_cache.shape[1] {ps}")
        max_pages = block_table.shape[1]
        capacity = max_pages * ps
        bt_stride = block_table.strides[0] if B > 1 else max_pages
        if num_pages < 1 or max_pages < 1 or ps < 1:
            raise ValueError(f"paged cache: empty ({num_pages} pages of {ps}, {max_pages} per sequence)")
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache: batch {k_cache.shape[0]} != q's {B}")
        num_pages = max_pages = ps = 0
        capacity = k_cache.shape[1]
        bt_stride = 0
    if capacity > _I32_MAX:
        raise Unsupported(f"cache capacity {capacity} exceeds the kernels' int32 range")
    if B * Hkv > 65535:
        raise Unsupported(f"batch x heads_kv = {B * Hkv} exceeds 65535")
    wl, wr = _window(params.window_left), _window(params.window_right)
    if getattr(params, "causal", False):
        wr = 0 if wr < 0 else min(wr, 0)
    softcap = float(params.softcap) if params.softcap else 0.0
    ns = int(num_splits)
    if not 1 <= ns <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {ns}")
    args = FmxDecodeArgs()
    args.dtype = DTYPES[dtype]
    args.batch, args.seqlen_q, args.heads_q, args.heads_kv = B, Sq, Hq, Hkv
    args.head_dim, args.head_dim_v = D, Dv
    args.capacity, args.page_size = capacity, ps
    args.num_pages, args.max_pages = num_pages, max_pages
    args.q, args.k_cache, args.v_cache, args.out = q.ptr, k_cache.ptr, v_cache.ptr, out.ptr
    args.lse = lse_ptr or None
    args.q_stride = _Stride(*q.strides[:3])
    args.k_stride = _Stride(*k_cache.strides[:3])
    args.v_stride = _Stride(*v_cache.strides[:3])
    args.out_stride = _Stride(*out.strides[:3])
    args.seqlens_k = seqlens_ptr or None
    args.block_table = block_table.ptr if block_table is not None else None
    args.block_table_stride = bt_stride
    args.alibi_slopes = alibi_ptr or None
    args.alibi_stride = alibi_stride
    args.scale = float(params.scale)
    args.softcap = softcap
    args.window_left, args.window_right = wl, wr
    args.num_splits = ns
    return args


def _decode_fns(lib) -> tuple:
    """(fmx_decode, fmx_decode_workspace_size) of a loaded CDLL, typed; KernelError when absent."""
    try:
        run, ws = lib.fmx_decode, lib.fmx_decode_workspace_size
    except AttributeError:
        raise KernelError(
            "this libflashmux_cuda has no fmx_decode (built before the decode kernels: rebuild)"
        ) from None
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.POINTER(FmxDecodeArgs), ctypes.c_void_p]
    ws.restype = ctypes.c_size_t
    ws.argtypes = [ctypes.POINTER(FmxDecodeArgs)]
    return run, ws


def decode(library: Library, args: FmxDecodeArgs, stream: int) -> None:
    """Run fmx_decode from `library` (an abi.Library), raising like Library.forward."""
    run, _ = _decode_fns(library.lib)
    library._check(run(ctypes.byref(args), stream or None), "decode")


def decode_workspace_size(library: Library, args: FmxDecodeArgs) -> int:
    _, ws = _decode_fns(library.lib)
    return int(ws(ctypes.byref(args)))
