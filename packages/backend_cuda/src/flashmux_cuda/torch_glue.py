"""PyTorch glue: torch tensors -> the C ABI, on the current CUDA stream.

The core registers the custom op, its fake implementation and autograd; these two functions are
the raw kernels on real CUDA tensors. Inputs the kernels can't read as they are (a head_dim that
is not a multiple of 8, a non-contiguous head_dim, rows not on 16 bytes) are copied or
zero-padded here; zero columns change neither the scores nor the kept columns of the results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .abi import (
    ALIGN_BYTES,
    ALIGN_ELEMS,
    MASK_ARRAYS,
    ArrayRef,
    add_backward,
    add_block_mask,
    make_args,
    make_ext,
)

_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_name(t: torch.Tensor) -> str:
    return _DTYPE.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _ref(name: str, t: torch.Tensor) -> ArrayRef:
    return ArrayRef(name, t.data_ptr(), tuple(t.shape), tuple(t.stride()), _dtype_name(t))


def _kernel_ok(t: torch.Tensor) -> bool:
    """Whether the kernels can address t in place (see abi._check_rows)."""
    return (
        (t.shape[-1] <= 1 or t.stride(-1) == 1)
        and t.data_ptr() % ALIGN_BYTES == 0
        and all(s % ALIGN_ELEMS == 0 or n <= 1 for n, s in zip(t.shape[:-1], t.stride()[:-1]))
    )


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it in place, else a dense copy."""
    return t if _kernel_ok(t) else t.contiguous()


def _grad_buffers(like: torch.Tensor, padded_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(result, kernel buffer) for a gradient: the result has empty_like(like)'s layout, as the
    core's fake implementation says; the kernel writes into it directly when it can."""
    res = torch.empty_like(like)
    if tuple(res.shape) == tuple(padded_shape) and _kernel_ok(res):
        return res, res
    return res, torch.empty(padded_shape, dtype=like.dtype, device=like.device)


def _pad(t: torch.Tensor, d: int) -> torch.Tensor:
    return t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))


def _padded_dim(d: int) -> int:
    return -(-d // ALIGN_ELEMS) * ALIGN_ELEMS


def _seqlens(cu: torch.Tensor | None, name: str, device) -> torch.Tensor | None:
    if cu is None:
        return None
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name}: on {cu.device}, q is on {device}")
    return cu.contiguous()


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ext(alibi_slopes, q, cu_q):
    """FmxAttnExt for the optional operands (ALiBi slopes), None for a plain call. The slopes
    become float32 and contiguous on q's device (a no-op for the usual float32 tensor)."""
    if alibi_slopes is None:
        return None, None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes: expected a torch.Tensor, got {type(alibi_slopes).__name__}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes: on {alibi_slopes.device}, q is on {q.device}")
    sl = alibi_slopes.to(torch.float32).contiguous()
    batch = (cu_q.shape[0] - 1) if cu_q is not None else q.shape[0]
    hq = q.shape[-2]
    return make_ext(ArrayRef("alibi_slopes", sl.data_ptr(), tuple(sl.shape), tuple(sl.stride()),
                             "float32"), batch, hq), sl


def _mask_ext(ext, bm, q, k):
    """Add a BlockMask's arrays (int32, contiguous, on q's device) to ext; -> (ext, keepalive)."""
    keep = []
    refs = {}
    for name in MASK_ARRAYS:
        t = getattr(bm, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block_mask.{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"block_mask.{name}: on {t.device}, q is on {q.device}")
        t = t.to(torch.int32).contiguous()
        if name == "bits" and t.numel() == 0:  # no partial tile: a valid pointer all the same
            bs = bm.block_size
            t = torch.zeros((1, bs, bs // 32), dtype=torch.int32, device=q.device)
        keep.append(t)
        refs[name] = ArrayRef(f"block_mask.{name}", t.data_ptr(), tuple(t.shape),
                              tuple(t.stride()), "int32")
    ext = add_block_mask(ext, refs, int(bm.block_size), q.shape[0], q.shape[2], q.shape[1],
                         k.shape[1])
    return ext, keep


def forward(lib, q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None,
            block_mask=None):
    """(out, lse): out like q with v's head_dim, lse (B, Hq, Sq) or varlen (Hq, Tq) float32.
    alibi_slopes: None or float32 (Hq,) / (B, Hq) on q's device. block_mask: None or a
    flashmux BlockMask of torch arrays (block_size a multiple of 128)."""
    if q.device.type != "cuda":
        raise ValueError(f"q: the CUDA backend needs CUDA tensors, got {q.device}")
    d, dv = q.shape[-1], v.shape[-1]
    qp, kp = (_readable(_pad(t, _padded_dim(d))) for t in (q, k))
    vp = _readable(_pad(v, _padded_dim(dv)))
    varlen = bool(params.varlen)
    cu_q = _seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    cu_k = _seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    with torch.cuda.device(q.device):
        out = torch.empty(qp.shape[:-1] + (vp.shape[-1],), dtype=q.dtype, device=q.device)
        if varlen:
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        else:
            lse = torch.empty(
                (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device
            )
        args = make_args(
            _ref("q", qp),
            _ref("k", kp),
            _ref("v", vp),
            _ref("out", out),
            lse.data_ptr(),
            params,
            cu_seqlens_q=cu_q.data_ptr() if cu_q is not None else 0,
            cu_seqlens_k=cu_k.data_ptr() if cu_k is not None else 0,
            batch=(cu_q.shape[0] - 1) if cu_q is not None else None,
        )
        ext, _slopes = _ext(alibi_slopes, q, cu_q)  # _slopes keeps the buffer alive
        if block_mask is not None:  # the forward kernels walk its lists (padded layout only)
            ext, _mask = _mask_ext(ext, block_mask, q, k)
        lib.forward(args, _stream(q.device), ext)
    if out.shape[-1] != v.shape[-1]:
        out = out[..., : v.shape[-1]].contiguous()  # the core's fake impl says contiguous
    return out, lse


def backward(lib, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
             alibi_slopes=None, block_mask=None):
    """(dq, dk, dv) shaped like q, k, v (no gradient for the ALiBi slopes)."""
    d, dv = q.shape[-1], v.shape[-1]
    qp, kp = (_readable(_pad(t, _padded_dim(d))) for t in (q, k))
    vp, outp, dop = (_readable(_pad(t, _padded_dim(dv))) for t in (v, out, do))
    varlen = bool(params.varlen)
    cu_q = _seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    cu_k = _seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    with torch.cuda.device(q.device):
        (dq_res, dq), (dk_res, dk), (dv_res, dv) = (
            _grad_buffers(t, tp.shape) for t, tp in ((q, qp), (k, kp), (v, vp))
        )
        args = make_args(
            _ref("q", qp),
            _ref("k", kp),
            _ref("v", vp),
            _ref("out", outp),
            lse.data_ptr(),
            params,
            cu_seqlens_q=cu_q.data_ptr() if cu_q is not None else 0,
            cu_seqlens_k=cu_k.data_ptr() if cu_k is not None else 0,
            batch=(cu_q.shape[0] - 1) if cu_q is not None else None,
        )
        add_backward(
            args,
            _ref("do", dop),
            _ref("dq", dq),
            _ref("dk", dk),
            _ref("dv", dv),
            dlse_ptr=dlse.data_ptr() if dlse is not None else 0,
            varlen=varlen,
            q_shape=qp.shape,
            k_shape=kp.shape,
            out_shape=outp.shape,
            v_shape=vp.shape,
        )
        nbytes = lib.workspace_size(args)
        workspace = torch.zeros(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
        if workspace is not None:
            args.workspace = workspace.data_ptr()
            args.workspace_bytes = nbytes
        ext, _slopes = _ext(alibi_slopes, q, cu_q)
        if block_mask is not None:
            ext, _mask = _mask_ext(ext, block_mask, q, k)
        lib.backward(args, _stream(q.device), ext)
        for res, buf in ((dq_res, dq), (dk_res, dk), (dv_res, dv)):
            if buf is not res:
                res.copy_(buf[..., : res.shape[-1]])
    return dq_res, dk_res, dv_res


# ------------------------------------------------------------------------------------------
# KV-cache decode (csrc/decode/)

_SM_COUNT: dict[int, int] = {}


def sm_count(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode(lib, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
    """(out (B, Sq, Hq, Dv) in q's dtype, lse (B, Hq, Sq) float32) of one decode step.

    The caches are read in place (never copied: a cache that the kernels cannot address is an
    error, not a silent copy of gigabytes); q is copied only when its rows are not 16-byte
    aligned. No host reads of seqlens_k / block_table: capturable in a CUDA graph.
    """
    from . import abi

    if q.device.type != "cuda":
        raise ValueError(f"q: the CUDA backend needs CUDA tensors, got {q.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _kernel_ok(t):
            raise ValueError(
                f"{name}: the decode kernels read the cache in place; it needs a contiguous "
                f"head_dim, 16-byte aligned rows and strides that are multiples of 8 elements "
                f"(got strides {tuple(t.stride())})"
            )
    qp = _readable(q)
    if seqlens_k.dtype != torch.int32:
        raise TypeError(f"seqlens_k: expected int32, got {seqlens_k.dtype}")
    seqlens_k = seqlens_k.contiguous()
    for name, t in (("seqlens_k", seqlens_k), ("block_table", block_table)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q is on {q.device}")
    bt_ref = None
    if block_table is not None:
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table: expected int32, got {block_table.dtype}")
        if block_table.stride(-1) != 1:
            block_table = block_table.contiguous()
        bt_ref = ArrayRef(
            "block_table",
            block_table.data_ptr(),
            tuple(block_table.shape),
            tuple(block_table.stride()),
            "int32",
        )
    alibi_ptr, alibi_stride = 0, 0
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        alibi_ptr = alibi_slopes.data_ptr()
        alibi_stride = q.shape[2] if alibi_slopes.dim() == 2 else 0
    B, Sq, Hq, _ = q.shape
    Hkv = k_cache.shape[2]
    with torch.cuda.device(q.device):
        out = torch.empty((B, Sq, Hq, v_cache.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        ns = params.num_splits
        if ns is None:
            cap = (
                block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
            )
            ns = abi.choose_splits(B, Hkv, Sq * (Hq // max(Hkv, 1)), cap, sm_count(q.device))
        args = abi.make_decode_args(
            _ref("q", qp),
            _ref("k_cache", k_cache),
            _ref("v_cache", v_cache),
            _ref("out", out),
            lse.data_ptr(),
            seqlens_k.data_ptr(),
            params,
            ns,
            block_table=bt_ref,
            alibi_ptr=alibi_ptr,
            alibi_stride=alibi_stride,
        )
        nbytes = abi.decode_workspace_size(lib, args)
        if nbytes:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
            args.workspace = workspace.data_ptr()
            args.workspace_bytes = nbytes
        abi.decode(lib, args, _stream(q.device))
    return out, lse
