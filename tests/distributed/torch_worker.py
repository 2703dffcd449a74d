"""One rank of the torch context-parallel check: runs every case of a case file with
flashmux.ring_attention on its shards and saves its out, lse, dq, dk, dv (judged by the test).

    torchrun --nproc-per-node 2 tests/distributed/torch_worker.py CASES.json OUT_DIR

Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun or by the test).
NCCL on CUDA devices, gloo otherwise (FLASHMUX_CP_DEVICE=cpu forces gloo on a GPU machine).
"""

from __future__ import annotations

import faulthandler
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cp_cases import global_inputs, load_cases, result_path  # noqa: E402

import flashmux  # noqa: E402


def main(cases_path, out_dir):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and os.environ.get("FLASHMUX_CP_DEVICE") != "cpu"
    device = "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        for i, case in enumerate(load_cases(cases_path)):
            if case.world != world:
                continue
            print(f"rank {rank}: case {i} {case.id()}", flush=True)
            q, k, v, do, dlse = global_inputs(case)
            dt = getattr(torch, case.dtype)

            def local(x, dtype=dt, dim=1):
                x = flashmux.shard_sequence(x, rank, world, case.layout, dim=dim)
                return torch.from_numpy(np.ascontiguousarray(x)).to(dtype).to(device)

            qa, ka, va = (local(x).requires_grad_(True) for x in (q, k, v))
            res = flashmux.ring_attention(
                qa, ka, va, layout=case.layout, causal=case.causal, scale=case.scale,
                softcap=case.softcap, return_lse=case.return_lse, variant=case.variant, backend=case.backend,
            )
            out, lse = res if case.return_lse else (res, None)
            loss = (out.float() * local(do).float()).sum()
            if case.lse_grad:
                loss = loss + (lse * local(dlse, torch.float32, 2)).sum()
            loss.backward()
            got = {"out": out, "dq": qa.grad, "dk": ka.grad, "dv": va.grad}
            if lse is not None:
                got["lse"] = lse
            np.savez(result_path(out_dir, i, rank),
                     **{n: t.detach().float().cpu().numpy() for n, t in got.items()})
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.enable()
    main(sys.argv[1], sys.argv[2])
