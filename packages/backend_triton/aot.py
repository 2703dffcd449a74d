"""Compile flashmux's Triton kernels for a GPU target on a machine without a GPU (the ptxas and
cuobjdump shipped with the triton wheel) and print what the compiler made of them: registers,
spilled bytes (stack), shared memory, and per family the counts that say whether the loads were
pipelined (cp.async), went through TMA, or whether the GEMMs are wgmma. A quick check of a kernel
change or a tuning candidate before a session's GPU call.

    python packages/backend_triton/aot.py decode                      # the decode table's defaults
    python packages/backend_triton/aot.py --arch 80 decode            # an A100
    python packages/backend_triton/aot.py decode --only 14            # candidate c14 (+ paged)
    python packages/backend_triton/aot.py decode --candidates         # every decode candidate
    python packages/backend_triton/aot.py bs                          # block-sparse default configs
    python packages/backend_triton/aot.py bs --fwd 128,64,8,2 64,64,4,3 --dq 64,64,4,2
    python packages/backend_triton/aot.py bs --fwd 128,64,8,2,128 --dq --dkdv   # maxnreg 128
    python packages/backend_triton/aot.py dense KERNEL D BLOCK_M BLOCK_N WARPS STAGES [FLAG=VALUE ...]
    python packages/backend_triton/aot.py dense dkdv 128 64 64 8 3 TMA=True FUSED_DQ=True DQ_TMA=True
    python packages/backend_triton/aot.py dense fwd 128 128 128 8 3 TMA=True WS=True CAUSAL=True
    python packages/backend_triton/aot.py gluon                       # the Gluon kernels (sm_90a)
    python packages/backend_triton/aot.py gluon --kernels dq

Families:
- decode: `_decode.decode_fwd` (bf16 unless given, D 128, GQA 4:1); shared memory, cp.async
  copies in the TTGIR, registers. Needs torch (the module imports it).
- bs: `_kernels_bs` (fwd, dq, dkdv) at head_dim 128, bf16, the interior case of the H200 sweep
  (no causal/window, CHECK_FULL off), MBS 128; programs per SM by shared memory and registers,
  TMA and cp.async counts. Configs are "block_m,block_n,warps,stages[,maxnreg]" as
  FLASHMUX_TRITON_BS_* reads them. A config with 2 programs per SM overlaps one program's
  prologue/epilogue with another's main loop (what the ~5 us fixed cost per program wants).
- dense: one `_kernels` kernel (fwd, dkdv or dq); FLAGs are its constexprs (CAUSAL=True sets
  HAS_RIGHT); bf16, one KV head per query head, no varlen/window/softcap/dropout unless given;
  wgmma / mma.sync counts, bulk tensor reductions (the atomic dQ's TMA path), warp
  specialization.
- gluon: `_gluon`'s warp-specialized kernels (forward in its schedules: default, overlapped,
  ping-pong, persistent; dK/dV; dQ) for sm_90a (--arch is not used), bf16, through their
  `compile_*sm90` helpers; also the SASS instruction count, cubin bytes and a hash of the SASS
  instructions (equal hashes before and after a refactor: the GPU runs the same code).

Arguments carry tt.divisibility=16 as a real launch infers it from 16-byte aligned pointers and
strides (without it nothing is pipelined and the compile shows 2-4x the spills: not
representative). One signature builder serves all three; what differs per family is data
(`FAMILIES`: the pointer element types and the arguments a launch does not see as multiples of
16). Kernels are loaded by path (no flashmux import), so bs and dense work with any triton wheel,
e.g. the H200's 3.6: `python -m venv /tmp/t36 && /tmp/t36/bin/pip install --no-deps
triton==3.6.0`. Shared memory above the device's limit (227 KiB on sm90) means the launcher's
fallback steps the config down. Written against triton 3.9, also run with 3.6.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "flashmux_triton")
SMEM_SM90 = 228 * 1024  # per SM; 1 KiB reserved per program
REGS_SM90 = 65536


@dataclass(frozen=True)
class Family:
    """What the signature builder needs to know about one kernel family's arguments.

    UPPER-case names are pointers: element type from `pointers`, else the call's dtype.
    Lower-case names are int32 unless in `floats` (float32) or `int64`. Pointers and ints carry
    the 16-byte divisibility hint unless named in `not_aligned`; floats and TMA descriptors never.
    """

    pointers: dict[str, str]
    not_aligned: frozenset[str]
    floats: frozenset[str] = frozenset()
    int64: frozenset[str] = frozenset({"seed"})
    consts: dict[str, object] = field(default_factory=dict)


FAMILIES = {
    "decode": Family(
        pointers={"SEQLENS": "i32", "TBL": "i32", "CNT": "i32", "ALIBI_SLOPES": "fp32",
                  "LSE": "fp32", "LP": "fp32"},
        not_aligned=frozenset({"max_pages", "num_pages", "split_len", "seqlen_q", "snew",
                               "seqlen_add", "num_splits", "stride_lh2", "batch_n",
                               "window_left", "window_right"}),
        floats=frozenset({"scale", "softcap"}),
        consts=dict(GROUP=4, HEADS_KV=8, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False,
                    ALIBI=False, BLOCK_B=8),
    ),
    "bs": Family(
        pointers={**{n: "i32" for n in ("QNF", "QFI", "QNP", "QPI", "KNF", "KFI", "KNP", "KPI",
                                        "TILE", "BITS", "PTID")},
                  "LSE": "fp32", "DELTA": "fp32", "SLOPES": "fp32"},
        # lengths, counts, flags, and the lse / ALiBi strides a launch does not align
        not_aligned=frozenset({"seqlen_q", "seqlen_k", "window_left", "window_right", "seed",
                               "n_heads", "mask_b", "mask_h", "mask_heads", "n_qb", "n_kb",
                               "stride_lh", "stride_sb", "stride_lb"}),
        floats=frozenset({"scale_a", "scale_b", "p_drop", "drop_scale", "sm_scale"}),
        consts=dict(GROUP=1, MBS=128, CHECK_FULL=False, HAS_LEFT=False, HAS_RIGHT=False,
                    SOFTCAP=False, DROPOUT=False, IEEE=False),
    ),
    "dense": Family(
        pointers={"CU_Q": "i32", "CU_K": "i32", "LSE": "fp32", "DELTA": "fp32", "DLSE": "fp32",
                  "SLOPES": "fp32", "DQA": "fp32"},
        # only pointers and strides are aligned; stride_sb is the ALiBi slopes' batch stride
        not_aligned=frozenset({"seqlen_q", "seqlen_k", "window_left", "window_right", "seed",
                               "n_heads", "stride_sb"}),
        floats=frozenset({"scale_a", "scale_b", "p_drop", "drop_scale", "sm_scale"}),
        consts=dict(GROUP=1, VARLEN=False, HAS_LEFT=False, SOFTCAP=False, DROPOUT=False,
                    IEEE=False),
    ),
}


def kernels(module: str):
    """flashmux_triton.<module>, loaded by path under a stand-in package (relative imports work;
    the package's __init__, which imports flashmux, does not run)."""
    pkg = "_flashmux_triton_aot"
    if pkg not in sys.modules:
        stub = types.ModuleType(pkg)
        stub.__path__ = [SRC]
        sys.modules[pkg] = stub
    return importlib.import_module(f"{pkg}.{module}")


def signature(fn, family: Family, consts: dict, dtype: str = "bf16",
              pointers: dict[str, str] | None = None, descs: dict[str, str] | None = None):
    """(signature, attrs) for triton.compiler.ASTSource. `consts` is completed in place with the
    defaults of constexpr parameters it does not name; `pointers` overrides element types for
    this call; `descs` gives TMA descriptor types (e.g. "tensordesc<bf16[64, 128]>")."""
    ptr = {**family.pointers, **(pointers or {})}
    descs = descs or {}
    sig, attrs = {}, {}
    for i, (name, p) in enumerate(inspect.signature(fn.fn).parameters.items()):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
            consts[name] = p.default
            sig[name] = "constexpr"
            continue
        if name in descs:
            sig[name] = descs[name]
            continue
        if name in family.floats:
            sig[name] = "fp32"
            continue
        if name.isupper():
            sig[name] = f"*{ptr.get(name, dtype)}"
        else:
            sig[name] = "i64" if name in family.int64 else "i32"
        if name not in family.not_aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(fn, family: Family, consts: dict, arch: int, num_warps: int, num_stages: int,
                   options: dict | None = None, **sig_kw):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = signature(fn, family, consts, **sig_kw)
    return triton.compile(ASTSource(fn, sig, consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **(options or {})})


def resources(k) -> dict:
    """Registers and stack (spill) bytes per thread from the cubin (cuobjdump of the triton
    wheel; -1 when it cannot be read), shared bytes, and the IR counts the families print."""
    import triton

    regs = stack = -1
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = k.asm.get("cubin")
    if cubin and os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                 text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
        if m:
            regs, stack = int(m.group(1)), int(m.group(2))
    ir, ptx = k.asm.get("ttgir", ""), k.asm.get("ptx", "")
    return dict(regs=regs, stack=stack, smem=k.metadata.shared,
                async_copies=ir.count("async_copy_global"),
                tma_loads=ir.count("async_tma_copy_global_to_local") + ir.count("descriptor_load"),
                warp_specialized=ir.count("ttg.warp_specialize") > 0,
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                bulk_reductions=ptx.count("cp.reduce.async.bulk"))


# ---------------------------------------------------------------- decode
def compile_decode(arch=90, dtype="bf16", d=128, paged=False, page_block=False, split=True,
                   block_m=16, cfg=None, new=False, tma=False):
    D, T = kernels("_decode"), kernels("tuning_decode")
    cfg = cfg or T.config_for(d, d, {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype), 0)
    fam = FAMILIES["decode"]
    consts = dict(fam.consts, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                  BLOCK_D=d, BLOCK_DV=d, PAGE_SIZE=16 if paged else 1, PAGED=paged,
                  PAGE_BLOCK=page_block, IEEE=dtype == "fp32", SPLIT=split,
                  FUSED=split and bool(cfg.fused_merge), NEW=new, OFF32=bool(cfg.off32),
                  PREFETCH=bool(cfg.page_prefetch), L2PF=0 if paged else cfg.l2_prefetch,
                  LINE=64 if dtype != "fp32" else 32, DUAL=bool(cfg.page_dual),
                  SEL=bool(cfg.page_select), PDL=bool(cfg.pdl),
                  BAL=bool(cfg.balanced) and not new, TMA=tma)
    warps = cfg.num_warps if block_m <= 64 else max(cfg.num_warps, 8)
    k = compile_kernel(D.decode_fwd, fam, consts, arch, warps, cfg.num_stages,
                       {"launch_pdl": True} if cfg.pdl else None, dtype=dtype,
                       pointers={"O": "fp32"} if split else None,
                       descs={n: f"tensordesc<{dtype}[{cfg.block_n}, {d}]>"
                              for n in ("DESC_K", "DESC_V")} if tma else None)
    r = resources(k)
    r["sass"], r["sass_hash"] = sass(k)
    return r


def cmd_decode(args) -> int:
    if importlib.util.find_spec("torch") is None:
        print("decode: flashmux_triton._decode imports torch, which this python lacks; run it "
              "with the development venv (bs and dense need only triton)", file=sys.stderr)
        return 2
    T = kernels("tuning_decode")
    variants = [
        dict(), dict(split=False), dict(paged=True), dict(paged=True, page_block=True),
        dict(block_m=128), dict(dtype="fp32", d=128), dict(new=True), dict(paged=True, new=True),
        dict(tma=True),
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
    import triton

    print(f"sm{args.arch}, triton {triton.__version__}")
    for v in variants:
        t0 = time.time()
        try:
            r = compile_decode(args.arch, **v)
            label = ", ".join(f"{k}={c.label() if k == 'cfg' else c}" for k, c in v.items())
            regs = (f", {r['regs']} registers, stack {r['stack']} B" if r["regs"] >= 0 else "")
            code = f", SASS {r['sass']} ({r['sass_hash']})" if r["sass"] >= 0 else ""
            print(f"{label or 'default'}: shared {r['smem'] / 1024:.0f} KiB, async copies "
                  f"{r['async_copies']}{regs}{code}, {time.time() - t0:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{v}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


# ---------------------------------------------------------------- block-sparse
def compile_bs(which: str, cfg: tuple[int, ...], d: int = 128, tma: bool = True,
               alibi: bool = False, merged: bool = False, extra: dict | None = None,
               arch: int = 90) -> dict:
    KB = kernels("_kernels_bs")
    bm, bn, warps, stages = cfg[:4]
    maxnreg = cfg[4] if len(cfg) > 4 else 0
    fn = {"fwd": KB.bs_fwd, "dq": KB.bs_bwd_dq, "dkdv": KB.bs_bwd_dkdv}[which]
    fam = FAMILIES["bs"]
    consts = dict(fam.consts, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                  BLOCK_DV=d, ALIBI=alibi, TMA=tma, MERGED=merged)
    if which == "fwd":
        consts.update(RESID=False, FOLD=True)
    consts.update(extra or {})
    params = inspect.signature(fn.fn).parameters
    consts = {k: v for k, v in consts.items() if k in params}
    rows = bm if which == "dkdv" else bn
    descs = {n: f"tensordesc<bf16[{rows}, {d}]>" for n in params if n.startswith("DESC_")}
    k = compile_kernel(fn, fam, consts, arch, warps, stages,
                       {"maxnreg": maxnreg} if maxnreg else None, descs=descs)
    r = resources(k)
    r["by_smem"] = SMEM_SM90 // (r["smem"] + 1024)
    r["by_regs"] = REGS_SM90 // (max(r["regs"], 1) * warps * 32)
    r["per_sm"] = min(r["by_smem"], r["by_regs"])
    return r


def _cfg(s: str) -> tuple[int, ...]:
    """"m,n,warps,stages[,maxnreg]" as _launch_bs reads FLASHMUX_TRITON_BS_*."""
    return tuple(int(x) for x in s.split(","))


def cmd_bs(args) -> int:
    for which in ("fwd", "dq", "dkdv"):
        for c in getattr(args, which):
            t0 = time.time()
            try:
                r = compile_bs(which, _cfg(c), tma=not args.no_tma, alibi=args.alibi,
                               extra=({"WS": args.ws, "PRE": args.pre} if which == "fwd"
                                      else {"PRE": args.pre}), arch=args.arch)
                print(f"{which:5s} {c:12s} regs {r['regs']:3d} stack {r['stack']:4d} B  smem "
                      f"{r['smem'] / 1024:5.1f} KiB  programs/SM {r['per_sm']} (smem {r['by_smem']}, "
                      f"regs {r['by_regs']})  tma {r['tma_loads']} async {r['async_copies']}  "
                      f"[{time.time() - t0:.0f} s]", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{which:5s} {c:12s} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 0


# ---------------------------------------------------------------- dense
def _value(v: str):
    return {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)


def compile_dense(kern: str, d: int, bm: int, bn: int, warps: int, stages: int,
                  extra: dict | None = None, arch: int = 90) -> dict:
    K = kernels("_kernels")
    extra = dict(extra or {})
    fn = {"dkdv": K.attn_bwd_dkdv, "dq": K.attn_bwd_dq, "fwd": K.attn_fwd}[kern]
    fam = FAMILIES["dense"]
    consts = dict(fam.consts, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                  BLOCK_DV=d, HAS_RIGHT=bool(extra.pop("CAUSAL", False)))
    if kern == "dkdv":
        consts["FUSED_DQ"] = False
    if kern == "fwd":
        consts.update(FOLD=True, TMA=False, RESID=True)
    consts.update(extra)
    descs = {}
    if consts.get("TMA"):
        names = ("DESC_Q", "DESC_DO") if kern == "dkdv" else ("DESC_K", "DESC_V")
        rows = bm if kern == "dkdv" else bn
        descs = {n: f"tensordesc<bf16[{rows}, {d}]>" for n in names}
    if consts.get("DQ_TMA"):
        descs["DESC_DQA"] = f"tensordesc<fp32[{bm}, {d}]>"
    return resources(compile_kernel(fn, fam, consts, arch, warps, stages, descs=descs))


def cmd_dense(args) -> int:
    import triton

    extra = dict((kv.split("=")[0], _value(kv.split("=")[1])) for kv in args.flags)
    shown = {k: v for k, v in extra.items() if k != "CAUSAL"}
    r = compile_dense(args.kernel, args.d, args.block_m, args.block_n, args.warps, args.stages,
                      extra, args.arch)
    print(f"triton {triton.__version__} {args.kernel} d{args.d} ({args.block_m},{args.block_n},"
          f"{args.warps},{args.stages}) {shown}: regs {r['regs']} stack {r['stack']} B, "
          f"shared {r['smem'] // 1024} KiB, wgmma {r['wgmma']} mma.sync {r['mma_sync']}, "
          f"bulk reductions {r['bulk_reductions']}, "
          f"warp-specialized {r['warp_specialized']}")
    return 0


# ---------------------------------------------------------------- gluon
# (kernel, head_dim, causal, overrides) per compiled variant: the defaults (CONFIGS) and the
# env-selectable schedules (overlap, ping-pong, persistent; the dQ's overlap)
GLUON_VARIANTS = [
    *[("fwd", d, c, {}) for d in (64, 128) for c in (False, True)],
    *[("fwd", 128, c, dict(overlap=True)) for c in (False, True)],
    *[("fwd", 128, c, dict(overlap=True, pingpong=True)) for c in (False, True)],
    *[("fwd", 128, c, dict(persist=1)) for c in (False, True)],
    ("fwd", 128, True, dict(persist=1, pingpong=True)),
    *[("dkdv", d, c, {}) for d in (64, 128) for c in (False, True)],
    *[("dq", d, c, {}) for d in (64, 128) for c in (False, True)],
    *[("dq", 128, c, dict(overlap=True)) for c in (False, True)],
    *[(k, 128, c, dict(alibi=True)) for k in ("dkdv", "dq") for c in (False, True)],
]


def sass(k) -> tuple[int, str]:
    """(SASS instruction count, a hash of the instructions) of a compiled kernel's cubin, from
    the triton wheel's cuobjdump; (-1, "") when it cannot be read. Equal hashes: the same code."""
    import hashlib

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = k.asm.get("cubin")
    if not cubin or not os.path.exists(tool):
        return -1, ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    instrs = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*;)", out)
    return len(instrs), hashlib.sha256("\n".join(instrs).encode()).hexdigest()[:12]


def cmd_gluon(args) -> int:
    import triton

    G = kernels("_gluon")
    compile_fn = {"fwd": G.compile_sm90, "dkdv": G.compile_bwd_sm90, "dq": G.compile_dq_sm90}
    print(f"sm90a, triton {triton.__version__}")
    for kern, d, causal, over in GLUON_VARIANTS:
        if args.kernels and kern not in args.kernels.split(","):
            continue
        label = f"{kern} d{d} causal={int(causal)} " + ",".join(f"{k}={v}" for k, v in over.items())
        t0 = time.time()
        try:
            k = compile_fn[kern](d=d, causal=causal, **over)
            r = resources(k)
            n, h = sass(k)
            print(f"{label:44s} regs {r['regs']:3d} stack {r['stack']:3d} smem "
                  f"{r['smem'] / 1024:5.1f} KiB wgmma {r['wgmma']:3d} sass {n:5d} cubin "
                  f"{len(k.asm['cubin']):6d} B hash {h} [{time.time() - t0:.0f} s]", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{label:44s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    sub = ap.add_subparsers(dest="family", required=True)

    p = sub.add_parser("decode", help="the decode kernel: table defaults or tuning candidates")
    p.add_argument("--candidates", action="store_true", help="every tuning candidate too")
    p.add_argument("--only", help="candidate indices (comma list): these, contiguous and paged")
    p.set_defaults(run=cmd_decode)

    p = sub.add_parser("bs", help="block-sparse fwd/dq/dkdv configs")
    p.add_argument("--fwd", nargs="*", default=["128,128,8,3", "128,64,8,2", "64,64,4,3",
                                                 "64,128,4,2", "128,64,4,2"])
    p.add_argument("--dq", nargs="*", default=["128,64,8,3", "64,64,4,3", "128,64,8,2"])
    p.add_argument("--dkdv", nargs="*", default=["64,128,8,3", "64,64,4,3", "64,128,8,2"])
    p.add_argument("--alibi", action="store_true")
    p.add_argument("--no-tma", action="store_true")
    p.add_argument("--ws", action="store_true", help="forward: warp-specialized walks (WS)")
    p.add_argument("--pre", action="store_true", help="lists preloaded (PRE)")
    p.set_defaults(run=cmd_bs)

    p = sub.add_parser("dense", help="one dense kernel at one config")
    p.add_argument("kernel", choices=("fwd", "dkdv", "dq"))
    for name in ("d", "block_m", "block_n", "warps", "stages"):
        p.add_argument(name, type=int)
    p.add_argument("flags", nargs="*", metavar="FLAG=VALUE",
                   help="kernel constexprs, e.g. TMA=True WS=True CAUSAL=True")
    p.set_defaults(run=cmd_dense)

    p = sub.add_parser("gluon", help="the Gluon kernels (fwd, dkdv, dq): defaults and schedules")
    p.add_argument("--kernels", help="comma list of fwd, dkdv, dq (default all)")
    p.set_defaults(run=cmd_gluon)

    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # a compile, not the interpreter
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
