"""torch.distributed glue of `flashmux.ring_attention`: a torch.autograd.Function per variant.

Communication is torch.distributed's own: batched isend/irecv to the ring neighbours (NCCL on
GPUs, gloo on CPUs) and all_gather / reduce_scatter. On NCCL the transfers run on the process
group's own CUDA stream, so the send of the next K/V block overlaps the kernel of the current
one; `wait()` only makes the compute stream wait for it (no host synchronization).
Imported only when torch tensors reach ring_attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _torch as core_torch
from . import (
    Config,
    allgather_calls,
    block_backend,
    merge,
    ring_block,
    rows,
    shard_sequence,
    takes_residual,
    unshard_sequence,
)


def world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group: torch.distributed is not initialized (run under torchrun and call "
            "torch.distributed.init_process_group first), got no process group"
        )
    return dist.get_world_size(group)


class _Ring:
    """Point-to-point exchange with the ring neighbours: send to rank+1, receive from rank-1."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = self._global((self.rank + 1) % self.size)
        self.prev = self._global((self.rank - 1) % self.size)

    def _global(self, r):
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def start(self, tensors):
        """Send `tensors` on and post receives of the same shapes; returns what `finish` takes."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in recv]
        return dist.batch_isend_irecv(ops), recv

    @staticmethod
    def finish(pending):
        works, recv = pending
        for w in works:
            w.wait()
        return recv


def _part(x, sl: slice, dim=1):
    if sl.start == 0 and sl.stop == x.shape[dim]:
        return x
    idx = (slice(None),) * dim + (sl,)
    return x[idx].contiguous()


# -- ring --------------------------------------------------------------------------------------


def _ring_forward(q, k, v, cfg: Config, comm: _Ring, grad: bool):
    r, p, n = comm.rank, comm.size, q.shape[1]
    out = lse = None
    kc, vc = k, v
    for s in range(p):
        pending = comm.start([kc, vc]) if s < p - 1 else None  # next block, during this one
        blk = ring_block(cfg.layout, cfg.causal, r, (r - s) % p)
        if blk is not None:
            qr, kr = rows(blk.q, n), rows(blk.k, n)
            qs, ks, vs = _part(q, qr), _part(kc, kr), _part(vc, kr)
            be, prm = block_backend(qs, ks, vs, blk.causal, cfg.scale, cfg.softcap,
                                    cfg.return_lse, grad, cfg.forced)
            o, l = be.forward(qs, ks, vs, None, None, prm)
            if out is None:  # the first block (the rank's own) covers every row
                out, lse = o.to(torch.float32), l
            else:
                assert out is not None and lse is not None
                out[:, qr], lse[:, :, qr] = merge(out[:, qr], lse[:, :, qr], o, l)
        if pending is not None:
            kc, vc = comm.finish(pending)
    return out, lse


def _ring_backward(do, dlse, q, k, v, out, lse, res, cfg: Config, comm: _Ring):
    r, p, n = comm.rank, comm.size, q.shape[1]
    f32 = torch.float32
    dq = torch.zeros(q.shape, dtype=f32, device=q.device)
    kc, vc = k, v
    moving = None  # dK/dV accumulators of the block that came before, on their way
    dk_c = dv_c = None
    for s in range(p):
        pending = comm.start([kc, vc]) if s < p - 1 else None
        blk = ring_block(cfg.layout, cfg.causal, r, (r - s) % p)
        dk_c = torch.zeros(k.shape, dtype=f32, device=k.device)
        dv_c = torch.zeros(v.shape, dtype=f32, device=v.device)
        if blk is not None:
            qr, kr = rows(blk.q, n), rows(blk.k, n)
            qs, ks, vs = _part(q, qr), _part(kc, kr), _part(vc, kr)
            be, prm = block_backend(qs, ks, vs, blk.causal, cfg.scale, cfg.softcap,
                                    cfg.return_lse, True, cfg.forced)
            kw = {"out_residual": _part(res, qr)} if takes_residual(be) else {}
            dq_b, dk_b, dv_b = be.backward(
                _part(do, qr), None if dlse is None else _part(dlse, qr, 2), qs, ks, vs,
                _part(out, qr), _part(lse, qr, 2), None, None, prm, **kw,
            )
            dq[:, qr] += dq_b
            dk_c[:, kr] += dk_b
            dv_c[:, kr] += dv_b
        if moving is not None:
            rk, rv = comm.finish(moving)
            dk_c += rk
            dv_c += rv
        # after P sends, each accumulator is back with the rank that owns its block; the last
        # hop (nothing is added after it, and its transfer is not hidden behind a kernel)
        # travels in the input dtype: the owner would round to it anyway
        if p > 1:
            last = s == p - 1
            moving = comm.start([dk_c.to(k.dtype), dv_c.to(v.dtype)] if last else [dk_c, dv_c])
        if pending is not None:
            kc, vc = comm.finish(pending)
    if moving is not None:
        dk_c, dv_c = comm.finish(moving)
    assert dk_c is not None and dv_c is not None
    return dq.to(q.dtype), dk_c.to(k.dtype), dv_c.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: Config, group):
        comm = _Ring(group)
        grad = any(ctx.needs_input_grad[:3])
        q, k, v = (x.contiguous() for x in (q, k, v))
        out32, lse = _ring_forward(q, k, v, cfg, comm, grad)
        out = out32.to(q.dtype)
        # the rounding error of the stored output: the backward's delta = rowsum(dO * O) is
        # taken from the float32 merged output (out + res)
        res = (out32 - out.to(torch.float32)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, res)
        ctx.cfg, ctx.group = cfg, group
        if not cfg.return_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, res = ctx.saved_tensors
        cfg = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        dlse = dlse.contiguous() if (cfg.return_lse and dlse is not None) else None
        dq, dk, dv = _ring_backward(dout.contiguous(), dlse, q, k, v, out, lse, res, cfg,
                                    _Ring(ctx.group))
        return dq, dk, dv, None, None


# -- all-gather --------------------------------------------------------------------------------


def _gather(x, cfg: Config, group):
    """(B, S/P, ...) shards -> (B, S, ...) in global sequence order."""
    parts = [torch.empty_like(x) for _ in range(cfg.world_size)]
    dist.all_gather(parts, x, group=group)
    return unshard_sequence(parts, cfg.layout, dim=1)


def _scatter_sum(xg, cfg: Config, group):
    """The sum over ranks of (B, S, ...) global-order gradients, this rank's shard of it."""
    p = cfg.world_size
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "nccl":
        ins = [shard_sequence(xg, r, p, cfg.layout).contiguous() for r in range(p)]
        out = torch.empty_like(ins[0])
        dist.reduce_scatter(out, ins, group=group)
        return out
    dist.all_reduce(xg, group=group)  # gloo has no reduce_scatter
    return shard_sequence(xg, rank, p, cfg.layout)


def _ag_calls(q, kg, vg, cfg: Config, rank: int, grad: bool):
    for r0, r1, nk, causal in allgather_calls(cfg.layout, cfg.causal, cfg.world_size, rank,
                                              q.shape[1]):
        qs = _part(q, slice(r0, r1))
        ks, vs = _part(kg, slice(0, nk)), _part(vg, slice(0, nk))
        be, prm = block_backend(qs, ks, vs, causal, cfg.scale, cfg.softcap, cfg.return_lse,
                                grad, cfg.forced, ring=False)
        yield slice(r0, r1), qs, ks, vs, be, prm


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: Config, group):
        grad = any(ctx.needs_input_grad[:3])
        q, k, v = (x.contiguous() for x in (q, k, v))
        rank = dist.get_rank(group)
        kg, vg = _gather(k, cfg, group), _gather(v, cfg, group)
        outs, lses, ress = [], [], []
        for _, qs, ks, vs, be, prm in _ag_calls(q, kg, vg, cfg, rank, grad):
            o, l, res = core_torch._forward(be, qs, ks, vs, None, None, prm, grad)
            outs.append(o)
            lses.append(l)
            ress.append(res)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, 2)
        ctx.save_for_backward(q, kg, vg, out, lse)
        ctx.cfg, ctx.group, ctx.rank, ctx.res = cfg, group, rank, ress
        if not cfg.return_lse:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kg, vg, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        dlse = dlse.contiguous() if (cfg.return_lse and dlse is not None) else None
        f32 = torch.float32
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dkg = torch.zeros(kg.shape, dtype=f32, device=kg.device)
        dvg = torch.zeros(vg.shape, dtype=f32, device=vg.device)
        for (qr, qs, ks, vs, be, prm), res in zip(
            _ag_calls(q, kg, vg, cfg, ctx.rank, True), ctx.res
        ):
            o_b, do_b = _part(out, qr), _part(dout, qr)
            if q.device.type == "cpu" and q.dtype != f32:
                # on the CPU (no 16-bit fast path to lose) the chunks' backward runs in float32:
                # its gradients are partial sums (two query chunks per rank, then the sum over
                # ranks) and stay float32 until the final sum. Rounded to bfloat16 per call by the
                # CPU default (torch's CPU flash kernel through `native`), 15-20% of draws of the
                # zigzag bf16 cases went over the SPEC bound (2.0-2.4x plain attention's error,
                # 2026-11-30). On GPUs the kernels' 16-bit gradients are summed in float32 as is.
                o_b = o_b.float() + (res.float() if res is not None else 0.0)
                do_b, qs, ks, vs, res = do_b.float(), qs.float(), ks.float(), vs.float(), None
            dq_b, dk_b, dv_b = core_torch._backward_call(
                be, do_b, None if dlse is None else _part(dlse, qr, 2), qs, ks, vs,
                o_b, _part(lse, qr, 2), None, None, prm, res,
            )
            dq[:, qr] = dq_b
            dkg[:, : ks.shape[1]] += dk_b
            dvg[:, : vs.shape[1]] += dv_b
        dk = _scatter_sum(dkg, cfg, ctx.group)
        dv = _scatter_sum(dvg, cfg, ctx.group)
        return dq, dk.to(kg.dtype), dv.to(vg.dtype), None, None


def run(q, k, v, cfg: Config, group):
    fn = _AllGatherAttention if cfg.variant == "allgather" else _RingAttention
    return fn.apply(q, k, v, cfg, group)
