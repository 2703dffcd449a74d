"""JAX glue: XLA FFI targets over the C ABI, called through jax.ffi.ffi_call.

The handlers live in csrc/jax_ffi/ffi.cc, built into libflashmux_cuda_jax.so beside the kernel
library. ffi_call is traceable, so forward/backward run under jax.jit; the core wraps them in
jax.custom_vjp. Shapes are static, so the argument checks of `abi.make_args` run at trace time
on shapes alone (null pointers), and the backward's workspace size is asked of the library
then, and passed to XLA as an extra uint8 output that the handler zero-fills.
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np

from .abi import (
    ALIGN_ELEMS,
    MASK_ARRAYS,
    ArrayRef,
    add_backward,
    add_block_mask,
    make_args,
    make_ext,
)

FWD_TARGET = "flashmux_cuda_fwd"
BWD_TARGET = "flashmux_cuda_bwd"
_DTYPE = {jnp.dtype(jnp.float16): "float16", jnp.dtype(jnp.bfloat16): "bfloat16"}

_lock = threading.Lock()
_registered: dict[str, object] = {}


def register(jax_lib_path) -> None:
    """Load the FFI library and register both targets for the CUDA platform (once)."""
    with _lock:
        if "lib" in _registered:
            return
        lib = ctypes.CDLL(str(jax_lib_path))
        jax.ffi.register_ffi_target(
            FWD_TARGET, jax.ffi.pycapsule(lib.FlashmuxCudaFwd), platform="CUDA"
        )
        jax.ffi.register_ffi_target(
            BWD_TARGET, jax.ffi.pycapsule(lib.FlashmuxCudaBwd), platform="CUDA"
        )
        _registered["lib"] = lib


def _dense_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= int(n)
    return tuple(reversed(out))


def _ref(name, x) -> ArrayRef:
    """A shape-only ArrayRef (pointer 0) for the trace-time checks."""
    dt = _DTYPE.get(jnp.dtype(x.dtype), str(jnp.dtype(x.dtype)))
    return ArrayRef(name, 0, tuple(x.shape), _dense_strides(x.shape), dt)


def _padded_dim(d: int) -> int:
    return -(-d // ALIGN_ELEMS) * ALIGN_ELEMS


def _pad(x, d):
    if x.shape[-1] == d:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def _common(params, cu_q, cu_k):
    dummy = jnp.zeros((1,), jnp.int32)
    varlen = bool(params.varlen)
    wl = -1 if params.window_left is None else int(params.window_left)
    wr = -1 if params.window_right is None else int(params.window_right)
    if params.causal:
        wr = 0 if wr < 0 else min(wr, 0)
    attrs = dict(
        scale=np.float32(params.scale),
        softcap=np.float32(params.softcap or 0.0),
        causal=np.int32(bool(params.causal)),
        window_left=np.int32(min(wl, 2**31 - 1)),
        window_right=np.int32(min(wr, 2**31 - 1)),
        varlen=np.int32(varlen),
        max_seqlen_q=np.int32(params.max_seqlen_q or 0),
        max_seqlen_k=np.int32(params.max_seqlen_k or 0),
    )
    cu_q = cu_q.astype(jnp.int32) if cu_q is not None else dummy
    cu_k = cu_k.astype(jnp.int32) if cu_k is not None else dummy
    return attrs, cu_q, cu_k


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _check(q, k, v, out_shape, params, cu_q):
    """The same checks the torch path runs, on shapes only; returns the struct for sizing."""
    out = ArrayRef("out", 0, tuple(out_shape), _dense_strides(out_shape), _ref("q", q).dtype)
    return make_args(
        _ref("q", q),
        _ref("k", k),
        _ref("v", v),
        out,
        0,
        params,
        cu_seqlens_q=1 if params.varlen else 0,  # non-null placeholders: pointers come at run time
        cu_seqlens_k=1 if params.varlen else 0,
        batch=(cu_q.shape[0] - 1) if params.varlen else None,
    )


def _alibi(alibi_slopes, q, cu_q, params):
    """(operand, has_alibi): float32 slopes (checked on shapes at trace time) or a dummy."""
    if alibi_slopes is None:
        return jnp.zeros((1,), jnp.float32), np.int32(0)
    sl = jnp.asarray(alibi_slopes).astype(jnp.float32)
    batch = (cu_q.shape[0] - 1) if params.varlen else q.shape[0]
    make_ext(ArrayRef("alibi_slopes", 0, tuple(sl.shape), _dense_strides(sl.shape), "float32"),
             batch, q.shape[-2])
    return sl, np.int32(1)


def _mask(block_mask, q, k):
    """(extra operands, mask_block attribute): the BlockMask's ten int32 arrays in
    abi.MASK_ARRAYS order (checked on shapes at trace time), or () and 0 without one."""
    if block_mask is None:
        return (), np.int32(0)
    arrays, refs = [], {}
    bs = int(block_mask.block_size)
    for name in MASK_ARRAYS:
        x = jnp.asarray(getattr(block_mask, name)).astype(jnp.int32)
        if name == "bits" and x.shape[0] == 0:  # no partial tile: a valid operand all the same
            x = jnp.zeros((1, bs, bs // 32), jnp.int32)
        arrays.append(x)
        refs[name] = ArrayRef(f"block_mask.{name}", 0, tuple(x.shape), _dense_strides(x.shape),
                              "int32")
    add_block_mask(None, refs, bs, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return tuple(arrays), np.int32(bs)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None, block_mask=None):
    d, dv = q.shape[-1], v.shape[-1]
    qp, kp = (_pad(x, _padded_dim(d)) for x in (q, k))
    vp = _pad(v, _padded_dim(dv))
    attrs, cu_q, cu_k = _common(params, cu_seqlens_q, cu_seqlens_k)
    out_shape = qp.shape[:-1] + (vp.shape[-1],)
    _check(qp, kp, vp, out_shape, params, cu_q)
    alibi, has_alibi = _alibi(alibi_slopes, q, cu_q, params)
    mask, mask_block = _mask(block_mask, q, k)
    out, lse = jax.ffi.ffi_call(
        FWD_TARGET,
        (
            jax.ShapeDtypeStruct(out_shape, q.dtype),
            jax.ShapeDtypeStruct(_lse_shape(q, params.varlen), jnp.float32),
        ),
        vmap_method="sequential",
    )(qp, kp, vp, cu_q, cu_k, alibi, *mask, has_alibi=has_alibi, mask_block=mask_block, **attrs)
    if out.shape[-1] != v.shape[-1]:
        out = out[..., : v.shape[-1]]
    return out, lse


def backward(lib, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
             alibi_slopes=None, block_mask=None):
    d, dv = q.shape[-1], v.shape[-1]
    qp, kp = (_pad(x, _padded_dim(d)) for x in (q, k))
    vp, outp, dop = (_pad(x, _padded_dim(dv)) for x in (v, out, do))
    dop = dop.astype(q.dtype)
    attrs, cu_q, cu_k = _common(params, cu_seqlens_q, cu_seqlens_k)
    args = _check(qp, kp, vp, outp.shape, params, cu_q)
    add_backward(
        args,
        _ref("do", dop),
        _ref("dq", qp),
        _ref("dk", kp),
        _ref("dv", vp),
        dlse_ptr=1 if dlse is not None else 0,
        varlen=bool(params.varlen),
        q_shape=qp.shape,
        k_shape=kp.shape,
        out_shape=outp.shape,
        v_shape=vp.shape,
    )
    alibi, has_alibi = _alibi(alibi_slopes, q, cu_q, params)
    mask, mask_block = _mask(block_mask, q, k)
    nbytes = max(int(lib.workspace_size(args)), 1)
    has_dlse = dlse is not None
    dlse_arg = dlse.astype(jnp.float32) if has_dlse else jnp.zeros((1,), jnp.float32)
    dq, dk, dvv, _ = jax.ffi.ffi_call(
        BWD_TARGET,
        (
            jax.ShapeDtypeStruct(qp.shape, q.dtype),
            jax.ShapeDtypeStruct(kp.shape, k.dtype),
            jax.ShapeDtypeStruct(vp.shape, v.dtype),
            jax.ShapeDtypeStruct((nbytes,), jnp.uint8),
        ),
        vmap_method="sequential",
    )(
        dop,
        dlse_arg,
        qp,
        kp,
        vp,
        outp,
        lse,
        cu_q,
        cu_k,
        alibi,
        *mask,
        deterministic=np.int32(bool(params.deterministic)),
        has_dlse=np.int32(has_dlse),
        has_alibi=has_alibi,
        mask_block=mask_block,
        **attrs,
    )
    if qp.shape[-1] != d:
        dq, dk = dq[..., :d], dk[..., :d]
    if vp.shape[-1] != dv:
        dvv = dvv[..., :dv]
    return dq, dk, dvv
