"""Context-parallel scaling: flashmux.attention on one GPU against flashmux.ring_attention on P GPUs.

    python benchmarks/ring_scaling.py                          # torch then JAX, every GPU here
    python benchmarks/ring_scaling.py --frameworks torch --seqlens 131072 --heads 16/16
    python benchmarks/ring_scaling.py --out ring.json --iters 5

For each framework, sequence length S and head configuration Hq/Hkv (B = 1, head_dim 128, bf16,
causal, forward + backward): t1 = one GPU on the whole sequence (the dispatcher's backend),
tP = ring_attention over P GPUs (zigzag layout, each rank holding S/P tokens; every variant in
--variants), efficiency = t1 / (P * tP). torch runs one process per GPU (torch.multiprocessing,
NCCL); JAX runs in its own process with a mesh over the GPUs (shard_map). Every process gets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 and
XLA_PYTHON_CLIENT_PREALLOCATE=false. Prints a table and writes JSON lines to --out.
Timing: --warmup calls, then --iters calls between device synchronizations (torch: max over
ranks); a configuration that fails (out of memory, ...) is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

D = 128


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--seqlens", default="131072,262144")
    ap.add_argument("--heads", default="16/16,32/8", help="Hq/Hkv pairs")
    ap.add_argument("--variants", default="ring,allgather",
                    help="each row also says which one variant='auto' picks")
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--world", type=int, default=0, help="GPUs to use (default: all)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-single", action="store_true", help="skip the one-GPU reference time")
    ap.add_argument("--out", default="")
    ap.add_argument("--markdown", default="", metavar="JSON",
                    help="print a markdown table (for docs/benchmarks.md) of an --out file and exit")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    return ap.parse_args()


def configs(a):
    heads = [tuple(int(x) for x in h.split("/")) for h in a.heads.split(",") if h]
    seqs = [int(s) for s in a.seqlens.split(",") if s]
    return [(s, hq, hkv) for s in seqs for hq, hkv in heads]


def result(base, variant, ran, auto, t1, tp, backend, world, err) -> dict:
    """One row: the case (`base`), the variant run and the one variant='auto' picks, the
    one-device and P-device times (s -> ms; None when not run), efficiency t1 / (P tP), error."""
    row = dict(base, variant=variant, ran=ran, auto_picks=auto, t1_ms=t1 and t1 * 1e3,
               tP_ms=tp and tp * 1e3, backend=backend)
    if t1 and tp:
        row["efficiency"] = t1 / (world * tp)
    if err:
        row["error"] = err
    return row


def emit(a, row):
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


# -- torch -------------------------------------------------------------------------------------


def torch_rank(rank, world, a, port):
    import torch
    import torch.distributed as dist

    import flashmux

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()  # without GPUs: gloo on CPUs (a smoke test of this script)
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(step, ranked):
        for _ in range(a.warmup):
            step()
        sync()
        if ranked:
            dist.barrier()
        t = time.perf_counter()
        for _ in range(a.iters):
            step()
        sync()
        t = (time.perf_counter() - t) / a.iters
        if ranked:
            x = torch.tensor([t], device=dev)
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
            t = float(x.item())
        return t

    def inputs(s, hq, hkv):
        g = torch.Generator(device=dev).manual_seed(0)
        mk = lambda h: torch.randn((1, s, h, D), device=dev, dtype=torch.bfloat16, generator=g)  # noqa: E731
        q, k, v, do = mk(hq), mk(hkv), mk(hkv), mk(hq)
        return [x.requires_grad_(i < 3) for i, x in enumerate((q, k, v, do))]

    for s, hq, hkv in configs(a):
        base = {"framework": "torch", "S": s, "Hq": hq, "Hkv": hkv, "D": D, "P": world,
                "layout": a.layout, "dtype": "bfloat16", "causal": True}
        t1, backend = None, None
        if rank == 0 and not a.no_single:
            try:
                q, k, v, do = inputs(s, hq, hkv)
                backend = flashmux.explain(q, k, v, causal=True).chosen

                def single():
                    out = flashmux.attention(q, k, v, causal=True)
                    torch.autograd.grad(out, (q, k, v), do)

                t1 = timed(single, False)
            except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                emit(a, dict(base, P=1, error=f"{type(e).__name__}: {str(e)[:200]}"))
            q = k = v = do = None
            if cuda:
                torch.cuda.empty_cache()
        dist.barrier()
        for variant in a.variants.split(","):
            err, tp, ran, auto = None, None, None, None
            try:
                q, k, v, do = inputs(s // world, hq, hkv)
                ran = flashmux.context_parallel.choose_variant(
                    variant, q.shape, k.shape, v.shape, world)[0]
                auto = flashmux.context_parallel.choose_variant(
                    "auto", q.shape, k.shape, v.shape, world)[0]

                def ring():
                    out = flashmux.ring_attention(q, k, v, causal=True, layout=a.layout,
                                                  variant=variant)
                    torch.autograd.grad(out, (q, k, v), do)

                tp = timed(ring, True)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {str(e)[:200]}"
            q = k = v = do = None
            if cuda:
                torch.cuda.empty_cache()
            if rank == 0:
                emit(a, result(base, variant, ran, auto, t1, tp, backend, world, err))
            dist.barrier()
    dist.destroy_process_group()


def run_torch(a, world):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.spawn(torch_rank, args=(world, a, port), nprocs=world, join=True)


# -- JAX ---------------------------------------------------------------------------------------


def run_jax(a, world):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import flashmux

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    kw = {"check_vma": False} if "check_vma" in shard_map.__code__.co_varnames else {"check_rep": False}
    devs = jax.devices()[:world]
    mesh = Mesh(np.array(devs), ("sp",))
    seq = NamedSharding(mesh, P(None, "sp"))

    def timed(fn, *args):
        for _ in range(a.warmup):
            jax.block_until_ready(fn(*args))
        t = time.perf_counter()
        for _ in range(a.iters):
            r = fn(*args)
        jax.block_until_ready(r)
        return (time.perf_counter() - t) / a.iters

    def inputs(s, hq, hkv, sharding):
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        shapes = [(1, s, hq, D), (1, s, hkv, D), (1, s, hkv, D), (1, s, hq, D)]
        return [jax.device_put(jax.random.normal(kk, sh, jnp.bfloat16), sharding)
                for kk, sh in zip(keys, shapes)]

    def fwd_bwd(attn):
        def f(q, k, v, do):
            _, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)

        return jax.jit(f)

    for s, hq, hkv in configs(a):
        base = {"framework": "jax", "S": s, "Hq": hq, "Hkv": hkv, "D": D, "P": world,
                "layout": a.layout, "dtype": "bfloat16", "causal": True}
        t1 = backend = None
        if not a.no_single:
            try:
                q, k, v, do = inputs(s, hq, hkv, jax.sharding.SingleDeviceSharding(devs[0]))
                backend = flashmux.explain(q, k, v, causal=True).chosen
                t1 = timed(fwd_bwd(lambda q, k, v: flashmux.attention(q, k, v, causal=True)),
                           q, k, v, do)
            except Exception as e:  # noqa: BLE001
                emit(a, dict(base, P=1, error=f"{type(e).__name__}: {str(e)[:200]}"))
            q = k = v = do = None
        for variant in a.variants.split(","):
            err = tp = ran = auto = None
            try:
                q, k, v, do = inputs(s, hq, hkv, seq)
                shapes = ((1, s // world, hq, D), (1, s // world, hkv, D), (1, s // world, hkv, D))
                ran = flashmux.context_parallel.choose_variant(variant, *shapes, world)[0]
                auto = flashmux.context_parallel.choose_variant("auto", *shapes, world)[0]

                def local(q, k, v, variant=variant):
                    return flashmux.ring_attention(q, k, v, axis_name="sp", causal=True,
                                                   layout=a.layout, variant=variant)

                ring = shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                                 out_specs=P(None, "sp"), **kw)
                tp = timed(fwd_bwd(ring), q, k, v, do)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {str(e)[:200]}"
            q = k = v = do = None
            emit(a, result(base, variant, ran, auto, t1, tp, backend, world, err))


# -- driver ------------------------------------------------------------------------------------


def table(rows):
    head = (f"{'fw':5} {'S':>7} {'Hq/Hkv':>7} {'variant':>9} {'auto':>9} {'t1 ms':>9} {'tP ms':>9} "
            f"{'eff':>6}  backend")
    print(head)
    for r in rows:
        if r.get("P") == 1:
            print(f"{r['framework']:5} {r['S']:>7} {r['Hq']}/{r['Hkv']:<4} single GPU failed: {r['error']}")
            continue
        t1 = f"{r['t1_ms']:.1f}" if r.get("t1_ms") else "-"
        tp = f"{r['tP_ms']:.1f}" if r.get("tP_ms") else "-"
        eff = f"{r['efficiency']:.3f}" if r.get("efficiency") else "-"
        extra = f"  ERROR {r['error']}" if r.get("error") else ""
        print(f"{r['framework']:5} {r['S']:>7} {str(r['Hq']) + '/' + str(r['Hkv']):>7} "
              f"{r['ran'] or r['variant']:>9} {str(r.get('auto_picks')):>9} {t1:>9} {tp:>9} {eff:>6}  {r.get('backend')}{extra}")


def markdown(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| framework | S | Hq/Hkv | variant (auto picks) | 1 GPU ms | P GPUs ms | efficiency | backend |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("P") == 1:
            continue
        eff = f"{r['efficiency']:.3f}" if r.get("efficiency") else r.get("error", "-")[:60]
        t1 = f"{r['t1_ms']:.1f}" if r.get("t1_ms") else "-"
        tp = f"{r['tP_ms']:.1f}" if r.get("tP_ms") else "-"
        seqlen = f"{r['S'] // 1024}k" if r["S"] >= 1024 else str(r["S"])
        print(f"| {r['framework']} | {seqlen} | {r['Hq']}/{r['Hkv']} | {r['ran'] or r['variant']}"
              f" ({r.get('auto_picks')}) | {t1} | {tp} (P={r['P']}) | {eff} | {r.get('backend')} |")


def main():
    a = parse()
    if a.markdown:
        markdown(a.markdown)
        return
    if a.child == "jax":
        import jax

        run_jax(a, a.world or len(jax.devices()))
        return
    if a.child == "torch":
        import torch

        run_torch(a, a.world or torch.cuda.device_count())
        return
    rows = []
    for fw in a.frameworks.split(","):
        # each framework in a process of its own: torch's CUDA context and JAX's allocator apart
        cmd = [sys.executable, os.path.abspath(__file__), "--child", fw] + [
            x for x in sys.argv[1:] if x != "--child"]
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ENV))
        got = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        rows += got
        print(f"{fw}: {len(got)} results in {time.time() - t:.0f} s (exit {p.returncode})", flush=True)
        if p.returncode:
            print(p.stdout[-2000:] + p.stderr[-4000:], flush=True)
    table(rows)


if __name__ == "__main__":
    main()
