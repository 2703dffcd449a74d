"""Compile the Triton decode kernels for a GPU target without a GPU (the ptxas shipped with the
triton wheel) and report, per variant, the shared memory and whether the key/value loads were
software-pipelined (cp.async copies in the TTGIR). A quick check of a kernel change or a tuning
candidate before the one GPU run of a session.

    python packages/backend_triton/decode_aot.py              # sm90, the table's defaults
    python packages/backend_triton/decode_aot.py --arch 80    # an A100

Uses triton.compiler.ASTSource with `attrs` for the 16-byte alignment a real launch infers from
its arguments (without them nothing is pipelined); written against triton 3.9. Shared memory
above the device's limit (227 KiB on sm90) means the launcher's fallback steps the config down.
"""

from __future__ import annotations

import argparse
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashmux_triton import _decode as D
from flashmux_triton import tuning_decode as T

NOT_ALIGNED = {"scale", "softcap", "window_left", "window_right", "max_pages", "num_pages",
               "split_len", "seqlen_q", "snew", "seqlen_add", "num_splits", "stride_lh2",
               "batch_n"}


def compile_decode(target, dtype="bf16", d=128, paged=False, page_block=False, split=True,
                   block_m=16, cfg: T.DecodeConfig | None = None, new=False):
    cfg = cfg or T.config_for(d, d, {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype), 0)
    ptr = {"Q": dtype, "K": dtype, "V": dtype, "SEQLENS": "i32", "TBL": "i32",
           "ALIBI_SLOPES": "fp32", "O": "fp32" if split else dtype, "LSE": "fp32",
           "OP": dtype, "LP": "fp32", "CNT": "i32", "KN": dtype, "VN": dtype}
    consts = dict(GROUP=4, HEADS_KV=8, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=block_m,
                  BLOCK_N=cfg.block_n, BLOCK_D=d, BLOCK_DV=d, PAGE_SIZE=16 if paged else 1,
                  PAGED=paged, PAGE_BLOCK=page_block, HAS_LEFT=False, HAS_RIGHT=True,
                  SOFTCAP=False, ALIBI=False, IEEE=dtype == "fp32", SPLIT=split,
                  FUSED=split and bool(cfg.fused_merge), NEW=new, OFF32=bool(cfg.off32),
                  PREFETCH=bool(cfg.page_prefetch), L2PF=0 if paged else cfg.l2_prefetch,
                  LINE=64 if dtype != "fp32" else 32, DUAL=bool(cfg.page_dual), SEL=bool(cfg.page_select), PDL=bool(cfg.pdl), BAL=bool(cfg.balanced) and not new,
                  BLOCK_B=8)
    names = D.decode_fwd.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        sig[n] = f"*{ptr[n]}" if n in ptr else ("fp32" if n in ("scale", "softcap") else "i32")
        if n not in NOT_ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    warps = cfg.num_warps if block_m <= 64 else max(cfg.num_warps, 8)
    k = triton.compile(ASTSource(D.decode_fwd, sig, consts, attrs=attrs), target=target,
                       options={"num_warps": warps, "num_stages": cfg.num_stages,
                                **({"launch_pdl": True} if cfg.pdl else {})})
    ir = k.asm["ttgir"]
    return k.metadata.shared, ir.count("async_copy_global_to_local"), _registers(k)


def _registers(k) -> str:
    """ptxas's registers and stack (spills) per thread, from the cubin (cuobjdump, shipped with
    the triton wheel); '' when it cannot be read."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    cubin = k.asm.get("cubin")
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            parts = dict(p.split(":") for p in line.split() if ":" in p)
            return f", {parts.get('REG')} registers, stack {parts.get('STACK')} B"
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--candidates", action="store_true", help="every tuning candidate too")
    ap.add_argument("--only", help="candidate indices (comma list): these, contiguous and paged")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    variants = [
        dict(), dict(split=False), dict(paged=True), dict(paged=True, page_block=True),
        dict(block_m=128), dict(dtype="fp32", d=128), dict(new=True), dict(paged=True, new=True),
    ]
    if args.only:
        variants = []
        for i in (int(x) for x in args.only.split(",")):
            c = T.CANDIDATES[i]
            variants += [dict(cfg=c), dict(cfg=c, paged=True), dict(cfg=c, paged=True,
                                                                     page_block=True)]
    if args.candidates:
        variants += [dict(cfg=c) for c in T.CANDIDATES] + [dict(cfg=c, paged=True)
                                                         for c in T.CANDIDATES]
    print(f"sm{args.arch}, triton {triton.__version__}")
    for v in variants:
        t0 = time.time()
        try:
            smem, copies, regs = compile_decode(target, **v)
            label = ", ".join(f"{k}={c.label() if k == 'cfg' else c}" for k, c in v.items())
            print(f"{label or 'default'}: shared {smem / 1024:.0f} KiB, async copies {copies}"
                  f"{regs}, {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{v}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
