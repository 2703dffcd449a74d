"""JAX glue of the KV-cache decode kernel: the XLA FFI target over fmx_decode (handler in
csrc/jax_ffi/decode_ffi.cc, built into libflashmux_cuda_jax.so with the forward/backward ones),
called through jax.ffi.ffi_call, so it traces under jax.jit (caches may be donated by the caller:
the kernel only reads them). Shapes are static: the checks of `abi.make_decode_args` and the
split choice run at trace time on shapes alone, and the workspace of several splits is an extra
uint8 output. seqlens_k and block_table stay device operands (never read on the host).
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import abi
from .jax_glue import _ref

DECODE_TARGET = "flashmux_cuda_decode"

_lock = threading.Lock()
_registered: dict[str, object] = {}


def register(jax_lib_path) -> None:
    """Register the decode target for the CUDA platform (once per process)."""
    with _lock:
        if "lib" in _registered:
            return
        lib = ctypes.CDLL(str(jax_lib_path))
        try:
            fn = lib.FlashmuxCudaDecode
        except AttributeError:
            raise abi.KernelError(
                f"{jax_lib_path} has no FlashmuxCudaDecode (built before the decode handler)"
            ) from None
        jax.ffi.register_ffi_target(DECODE_TARGET, jax.ffi.pycapsule(fn), platform="CUDA")
        _registered["lib"] = lib


def _sm_count(default: int = 132) -> int:
    try:
        n = getattr(jax.devices()[0], "core_count", None)
        return int(n) if n else default
    except Exception:
        return default


def decode(lib, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
    """(out (B, Sq, Hq, Dv), lse (B, Hq, Sq) float32) of one decode step on JAX arrays.

    `lib` is the loaded abi.Library (asked for the workspace size at trace time).
    """
    B, Sq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    out_shape = (B, Sq, Hq, Dv)
    dt = _ref("q", q).dtype
    out_ref = abi.ArrayRef("out", 0, out_shape, (Sq * Hq * Dv, Hq * Dv, Dv, 1), dt)
    bt_ref = None
    if block_table is not None:
        bt_ref = abi.ArrayRef(
            "block_table",
            0,
            tuple(block_table.shape),
            (block_table.shape[1], 1),
            str(jnp.dtype(block_table.dtype)),
        )
    ns = params.num_splits
    if ns is None:
        cap = (
            block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
        )
        ns = abi.choose_splits(B, Hkv, Sq * (Hq // max(Hkv, 1)), cap, _sm_count())
    alibi_mode = 0
    if alibi_slopes is not None:
        alibi_mode = 2 if alibi_slopes.ndim == 2 else 1
    args = abi.make_decode_args(
        _ref("q", q),
        _ref("k_cache", k_cache),
        _ref("v_cache", v_cache),
        out_ref,
        0,
        1,
        params,
        ns,
        block_table=bt_ref,
        alibi_ptr=1 if alibi_mode else 0,
        alibi_stride=Hq if alibi_mode == 2 else 0,
    )
    nbytes = max(abi.decode_workspace_size(lib, args), 1)
    dummy_i = jnp.zeros((1,), jnp.int32)
    dummy_f = jnp.zeros((1,), jnp.float32)
    bt = block_table.astype(jnp.int32) if block_table is not None else dummy_i
    sl = jnp.asarray(alibi_slopes, jnp.float32) if alibi_mode else dummy_f
    out, lse, _ = jax.ffi.ffi_call(
        DECODE_TARGET,
        (
            jax.ShapeDtypeStruct(out_shape, q.dtype),
            jax.ShapeDtypeStruct((B, Hq, Sq), jnp.float32),
            jax.ShapeDtypeStruct((nbytes,), jnp.uint8),
        ),
        vmap_method="sequential",
    )(
        q,
        k_cache,
        v_cache,
        seqlens_k.astype(jnp.int32),
        bt,
        sl,
        scale=np.float32(args.scale),
        softcap=np.float32(args.softcap),
        window_left=np.int32(args.window_left),
        window_right=np.int32(args.window_right),
        num_splits=np.int32(ns),
        paged=np.int32(block_table is not None),
        alibi=np.int32(alibi_mode),
    )
    return out, lse
