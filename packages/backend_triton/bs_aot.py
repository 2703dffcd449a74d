"""Compile the block-sparse Triton kernels (`_kernels_bs`) for sm_90 without a GPU (the ptxas of
the triton wheel) and print, per (kernel, config), registers, spills (stack bytes), shared memory,
how many programs fit on one SM (by shared memory and by registers) and whether the K/V (Q/dO)
tiles came through TMA. For choosing block-sparse tile configs before a GPU call: a config with
2 programs per SM overlaps one program's prologue/epilogue (Q load, first K/V loads, O/lse
store) with another's main loop, which is what the ~5 us fixed cost per program wants.

    python packages/backend_triton/bs_aot.py                          # the default configs
    python packages/backend_triton/bs_aot.py --fwd 128,64,8,2 64,64,4,3 --dq 64,64,4,2
    python packages/backend_triton/bs_aot.py --fwd 128,64,8,2,128 --dq --dkdv   # maxnreg 128

Shapes: head_dim 128, bf16, the interior case of the H200 sweep (no causal/window, lengths on
the mask block: CHECK_FULL off), TMA on, MBS 128. Written against triton 3.9.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

SMEM_SM90 = 228 * 1024  # per SM; 1 KiB reserved per program
REGS_SM90 = 65536
FLOAT_ARGS = ("scale_a", "scale_b", "p_drop", "drop_scale", "sm_scale")
INT_LISTS = ("QNF", "QFI", "QNP", "QPI", "KNF", "KFI", "KNP", "KPI", "TILE", "BITS", "PTID")
# integer arguments a real launch does not see as multiples of 16 (lengths, counts, flags)
NOT_ALIGNED = ("seqlen_q", "seqlen_k", "window_left", "window_right", "seed", "n_heads", "mask_b",
               "mask_h", "mask_heads", "n_qb", "n_kb", "stride_lh", "stride_sb", "stride_lb")


def _sig(fn, consts, desc_block):
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        p = inspect.signature(fn.fn).parameters[name]
        if name in consts:
            sig[name] = "constexpr"
            continue
        if p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
            consts[name] = p.default
            sig[name] = "constexpr"
            continue
        if name.startswith("DESC_"):
            sig[name] = f"tensordesc<bf16[{desc_block[0]}, {desc_block[1]}]>"
            continue
        if name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        elif name in INT_LISTS:
            sig[name] = "*i32"
        elif name in ("LSE", "DELTA", "SLOPES"):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
        if name not in NOT_ALIGNED and sig[name] != "fp32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _res(cubin: bytes) -> tuple[int, int]:
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            parts = dict(p.split(":") for p in line.split() if ":" in p)
            return int(parts["REG"]), int(parts["STACK"])
    return -1, -1


def compile_one(which: str, cfg: tuple[int, ...], d: int = 128, tma: bool = True,
                alibi: bool = False, merged: bool = False, extra: dict | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashmux_triton import _kernels_bs as KB

    bm, bn, warps, stages = cfg[:4]
    maxnreg = cfg[4] if len(cfg) > 4 else 0
    fn = {"fwd": KB.bs_fwd, "dq": KB.bs_bwd_dq, "dkdv": KB.bs_bwd_dkdv}[which]
    consts = dict(GROUP=1, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                  BLOCK_DV=d, MBS=128, CHECK_FULL=False, HAS_LEFT=False, HAS_RIGHT=False,
                  SOFTCAP=False, DROPOUT=False, IEEE=False, ALIBI=alibi, TMA=tma, MERGED=merged)
    if which == "fwd":
        consts.update(RESID=False, FOLD=True)
    consts.update(extra or {})
    consts = {k: v for k, v in consts.items() if k in inspect.signature(fn.fn).parameters}
    desc_block = (bm if which == "dkdv" else bn, d)
    sig, attrs = _sig(fn, consts, desc_block)
    k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages,
                                **({"maxnreg": maxnreg} if maxnreg else {})})
    regs, stack = _res(k.asm["cubin"])
    smem = k.metadata.shared
    by_smem = SMEM_SM90 // (smem + 1024)
    by_regs = REGS_SM90 // (max(regs, 1) * warps * 32)
    ir = k.asm["ttgir"]
    tma_loads = ir.count("async_tma_copy_global_to_local") + ir.count("descriptor_load")
    return dict(regs=regs, stack=stack, smem=smem, per_sm=min(by_smem, by_regs), by_smem=by_smem,
                by_regs=by_regs, tma_loads=tma_loads, async_copies=ir.count("async_copy_global"))


def _cfg(s: str) -> tuple[int, ...]:
    """"m,n,warps,stages[,maxnreg]" as _launch_bs reads FLASHMUX_TRITON_BS_*."""
    return tuple(int(x) for x in s.split(","))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fwd", nargs="*", default=["128,128,8,3", "128,64,8,2", "64,64,4,3",
                                                  "64,128,4,2", "128,64,4,2"])
    ap.add_argument("--dq", nargs="*", default=["128,64,8,3", "64,64,4,3", "128,64,8,2"])
    ap.add_argument("--dkdv", nargs="*", default=["64,128,8,3", "64,64,4,3", "64,128,8,2"])
    ap.add_argument("--alibi", action="store_true")
    ap.add_argument("--no-tma", action="store_true")
    ap.add_argument("--ws", action="store_true", help="forward: warp-specialized walks (WS)")
    ap.add_argument("--pre", action="store_true", help="lists preloaded (PRE)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    for which in ("fwd", "dq", "dkdv"):
        for c in getattr(args, which):
            t0 = time.time()
            try:
                r = compile_one(which, _cfg(c), tma=not args.no_tma, alibi=args.alibi,
                                extra=({"WS": args.ws, "PRE": args.pre} if which == "fwd"
                                       else {"PRE": args.pre}))
                print(f"{which:5s} {c:12s} regs {r['regs']:3d} stack {r['stack']:4d} B  smem "
                      f"{r['smem'] / 1024:5.1f} KiB  programs/SM {r['per_sm']} (smem {r['by_smem']}, "
                      f"regs {r['by_regs']})  tma {r['tma_loads']} async {r['async_copies']}  "
                      f"[{time.time() - t0:.0f} s]", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{which:5s} {c:12s} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
