"""PyTorch glue: two custom ops (``flashmux::fwd_ext``, ``flashmux::bwd_ext``) with fake
implementations and autograd, so every torch backend is differentiable and traceable by
torch.compile without graph breaks. The backend is named by a string argument; the ops look it up
in the registry, so the backward runs on the backend that ran the forward. Plain calls pass no
ALiBi slopes, an empty block mask and no seed array; eager calls skip the ops (`_Attention`).

Imported only when torch tensors reach `flashmux.attention`.
"""



import torch

from . import dispatch
from .spec import Params

_NONE = -1  # window sentinel for "unbounded" in op signatures


def _params(scale, causal, wl, wr, softcap, dropout_p, seed, varlen, mq, mk, ret_lse, det):
    return Params(
        scale=scale,
        causal=causal,
        window_left=None if wl == _NONE else wl,
        window_right=None if wr == _NONE else wr,
        softcap=softcap if softcap > 0 else None,
        dropout_p=dropout_p,
        dropout_seed=seed,
        varlen=varlen,
        max_seqlen_q=mq,
        max_seqlen_k=mk,
        return_lse=ret_lse,
        deterministic=det,
    )


def _flat(p: Params):
    return (
        p.scale,
        p.causal,
        _NONE if p.window_left is None else p.window_left,
        _NONE if p.window_right is None else p.window_right,
        p.softcap or 0.0,
        p.dropout_p,
        p.dropout_seed,
        p.varlen,
        p.max_seqlen_q,
        p.max_seqlen_k,
        p.return_lse,
        p.deterministic,
    )


# The ops' schemas (what torch.library.infer_schema made of their annotations before, kept
# as they were): the flags in the order of `_flat`, then the extra operands. Their Python
# functions take the flags as *flat.
_FLAGS = ("float scale, bool causal, SymInt window_left, SymInt window_right, float softcap, "
          "float dropout_p, SymInt dropout_seed, bool varlen, SymInt max_seqlen_q, "
          "SymInt max_seqlen_k, bool return_lse, bool deterministic")
_OPERANDS = ("Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, Tensor[] block_mask, "
             "SymInt[] block_mask_meta, Tensor? seed, str backend")
_OUT = "(Tensor, Tensor, Tensor)"


def _fake_fwd(q, v, backend, residual):
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    if q.dim() == 3:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    wants = _wants_residual(dispatch.get_backend(backend), q, residual)
    return out, lse, q.new_empty(out.shape if wants else (0,))


def _wants_residual(be, q, residual: bool) -> bool:
    # only 16-bit outputs are rounded enough to matter; the fake implementation and the real
    # call decide alike, so the traced shape of the residual is the real one
    return residual and be.capabilities.out_residual and q.dtype in (torch.float16, torch.bfloat16)


def _forward(be, q, k, v, cu_q, cu_k, p: Params, residual: bool, extra=None):
    """(out, lse, out_residual or None); the residual only from backends that offer it.
    `extra`: the keyword operands of the _ext route (alibi_slopes, block_mask), else empty."""
    extra = extra or {}
    if _wants_residual(be, q, residual):
        out, lse, res = be.forward(q, k, v, cu_q, cu_k, p, residual=True, **extra)
        if res is None or res.shape != out.shape:
            raise RuntimeError(f"backend {be.name!r} was asked for out_residual of shape "
                               f"{tuple(out.shape)} and returned "
                               f"{None if res is None else tuple(res.shape)}")
        return out, lse, res
    out, lse = be.forward(q, k, v, cu_q, cu_k, p, **extra)
    return out, lse, None


def _backward_call(be, do, dlse, q, k, v, out, lse, cu_q, cu_k, p: Params, res, extra=None):
    extra = extra or {}
    if res is not None and res.numel():
        extra = dict(extra, out_residual=res)
    return be.backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, p, **extra)


class _Attention(torch.autograd.Function):
    """Eager autograd path: the same forward/backward as the custom ops, minus their dispatch
    cost (tens of microseconds), which matters for small calls. `extra` holds ALiBi slopes / a
    block mask (no gradient flows into either); empty for plain calls."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, backend, p, extra):
        out, lse, res = _forward(dispatch.get_backend(backend), q, k, v, cu_q, cu_k, p, True,
                                 extra)
        ctx.save_for_backward(q, k, v, out, lse, res)
        ctx.cu, ctx.backend, ctx.p, ctx.extra = (cu_q, cu_k), backend, p, extra
        if not p.return_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, res = ctx.saved_tensors
        p = ctx.p
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward_call(dispatch.get_backend(ctx.backend), dout.contiguous(),
                                    dlse if p.return_lse else None, q, k, v, out, lse, *ctx.cu,
                                    p, res, ctx.extra)
        return dq, dk, dv, None, None, None, None, None


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def run(backend: str, q, k, v, cu_q, cu_k, p: Params):
    return run_ext(backend, q, k, v, cu_q, cu_k, p)


# -- the ops' extra operands: ALiBi slopes, a block mask (issue 15), a seed array ------------------
# A BlockMask travels as its list of arrays plus its sizes, and is rebuilt inside the op.


def _extra(slopes, bm_arrays, bm_meta, seed=None):
    extra = {}
    if slopes is not None:
        extra["alibi_slopes"] = slopes
    if seed is not None:  # dropout_seed as a tensor (read by the kernels on the device)
        extra["dropout_seed"] = seed
    if bm_arrays:
        from .blockmask import BlockMask

        bs, sq, sk, b, h = bm_meta
        extra["block_mask"] = BlockMask.from_arrays(
            (bs, sq, sk, None if b < 0 else b, None if h < 0 else h, "torch"), bm_arrays)
    return extra


def _ext_params(flat, slopes, bm_meta):
    from dataclasses import replace

    p = _params(*flat)
    return replace(p, alibi=slopes is not None, mask_block_size=bm_meta[0] if bm_meta else 0)


def _bm_operands(bm):
    if bm is None:
        return [], []
    return list(bm.arrays()), [bm.block_size, bm.seqlen_q, bm.seqlen_k,
                               -1 if bm.batch is None else bm.batch,
                               -1 if bm.heads is None else bm.heads]


@torch.library.custom_op(
    "flashmux::fwd_ext", mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {_OPERANDS}, {_FLAGS}, bool residual) -> {_OUT}")
def fwd_ext(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_mask, block_mask_meta, seed,
            backend, *flat):
    *flat, residual = flat
    p = _ext_params(flat, alibi_slopes, block_mask_meta)
    extra = _extra(alibi_slopes, block_mask, block_mask_meta, seed)
    out, lse, res = _forward(dispatch.get_backend(backend), q, k, v, cu_seqlens_q, cu_seqlens_k,
                             p, residual, extra)
    # An op output can be neither None nor an alias of another output: "no residual" is empty.
    return out, lse, q.new_empty(0) if res is None else res


@fwd_ext.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_mask, block_mask_meta, seed,
      backend, *rest):
    return _fake_fwd(q, v, backend, rest[-1])


@torch.library.custom_op(
    "flashmux::bwd_ext", mutates_args=(),
    schema=f"(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
           f"Tensor out_residual, {_OPERANDS}, {_FLAGS}) -> {_OUT}")
def bwd_ext(do, dlse, q, k, v, out, lse, out_residual, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
            block_mask, block_mask_meta, seed, backend, *flat):
    p = _ext_params(flat, alibi_slopes, block_mask_meta)
    extra = _extra(alibi_slopes, block_mask, block_mask_meta, seed)
    return _backward_call(dispatch.get_backend(backend), do, dlse, q, k, v, out, lse,
                          cu_seqlens_q, cu_seqlens_k, p, out_residual, extra)


@bwd_ext.register_fake
def _(do, dlse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context_ext(ctx, inputs, output):
    q, k, v, cu_q, cu_k, slopes, bm, bm_meta, seed, backend, *flat = inputs
    out, lse, res = output
    ctx.save_for_backward(q, k, v, out, lse, res, cu_q, cu_k, slopes, seed, *bm)
    ctx.backend, ctx.bm_meta = backend, bm_meta
    ctx.flat = flat[:-1]
    ctx.n_inputs, ctx.n_bm = len(inputs), len(bm)
    ctx.mark_non_differentiable(res)


def _backward_ext_op(ctx, dout, dlse, _dres):
    q, k, v, out, lse, res, cu_q, cu_k, slopes, seed, *bm = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if not ctx.flat[10]:
        dlse = None
    dq, dk, dv = bwd_ext(dout.contiguous(), dlse, q, k, v, out, lse, res, cu_q, cu_k, slopes,
                         bm, ctx.bm_meta, seed, ctx.backend, *ctx.flat)
    grads = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
    grads[6] = [None] * ctx.n_bm  # the block mask's list of arrays: a list of no-gradients
    if not ctx.bm_meta:  # plain calls: autograd wants [] for an empty int list, None otherwise
        grads[7] = []
    return tuple(grads)


fwd_ext.register_autograd(_backward_ext_op, setup_context=_setup_context_ext)


def run_ext(backend: str, q, k, v, cu_q, cu_k, p: Params, alibi_slopes=None, block_mask=None,
            dropout_seed=None):
    extra = {}
    if alibi_slopes is not None:
        extra["alibi_slopes"] = alibi_slopes
    if block_mask is not None:
        extra["block_mask"] = block_mask
    if dropout_seed is not None:
        extra["dropout_seed"] = dropout_seed
    grad = _needs_grad(q, k, v)
    if torch.compiler.is_compiling():
        arrays, meta = _bm_operands(block_mask)
        out, lse, _ = fwd_ext(q, k, v, cu_q, cu_k, alibi_slopes, arrays, meta, dropout_seed,
                              backend, *_flat(p), grad)
        return out, lse
    if grad:
        # a backend whose kernels carry torch's own derivatives (native) may take the call under
        # torch's autograd: no Python backward per call (returns None to decline)
        fast = None if extra else getattr(dispatch.get_backend(backend), "forward_autograd", None)
        res = fast(q, k, v, cu_q, cu_k, p) if fast is not None else None
        if res is not None:
            return res
        return _Attention.apply(q, k, v, cu_q, cu_k, backend, p, extra)
    return dispatch.get_backend(backend).forward(q, k, v, cu_q, cu_k, p, **extra)
