"""Compile one dense Triton kernel (`_kernels.attn_fwd`, `attn_bwd_dkdv`, `attn_bwd_dq`) for sm_90
without a GPU and print registers, spilled bytes (stack), shared memory, wgmma / mma.sync counts,
bulk tensor reductions (the atomic dQ's TMA path) and whether Triton warp-specialized the loop.
Strides and pointers carry tt.divisibility=16 as a real launch infers them (without it the
compile shows 2-4x the spills and no cp.async: not representative). Loads _kernels.py by path,
so any triton wheel works (the H200 runs 3.6: `python -m venv /tmp/t36 && /tmp/t36/bin/pip
install --no-deps triton==3.6.0`, or the wheel under /opt/pypi/files).

    python packages/backend_triton/dense_aot.py KERNEL D BLOCK_M BLOCK_N WARPS STAGES [FLAG=VALUE ...]
    python packages/backend_triton/dense_aot.py dkdv 128 64 64 8 3 TMA=True FUSED_DQ=True DQ_TMA=True
    python packages/backend_triton/dense_aot.py fwd 128 128 128 8 3 TMA=True WS=True CAUSAL=True

KERNEL: fwd, dkdv or dq; FLAGs are the kernel's constexprs (CAUSAL=True sets HAS_RIGHT).
bf16, one KV head per query head, no varlen/window/softcap/dropout unless given.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "flashmux_triton", "_kernels.py")
_spec = importlib.util.spec_from_file_location("fmx_dense_kernels", _PATH)
K = importlib.util.module_from_spec(_spec)
sys.modules["fmx_dense_kernels"] = K
_spec.loader.exec_module(K)

FLOATS = ("scale_a", "scale_b", "p_drop", "drop_scale", "sm_scale")


def signature(fn, consts, descs):
    """(signature, attrs): UPPER names are pointers (bf16; LSE/DELTA/DLSE/SLOPES/DQA float32,
    CU_* int32), strides i32 divisible by 16 (not the ALiBi batch stride), the rest i32."""
    out, attrs = {}, {}
    for i, (name, p) in enumerate(inspect.signature(fn.fn).parameters.items()):
        if name in consts:
            out[name] = "constexpr"
        elif p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
            consts[name] = p.default
            out[name] = "constexpr"
        elif name in descs:
            out[name] = descs[name]
        elif name in FLOATS:
            out[name] = "fp32"
        elif name == "seed":
            out[name] = "i64"
        elif name.isupper():
            if name in ("CU_Q", "CU_K"):
                out[name] = "*i32"
            elif name in ("LSE", "DELTA", "DLSE", "SLOPES", "DQA"):
                out[name] = "*fp32"
            else:
                out[name] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            out[name] = "i32"
            if name.startswith("stride") and name != "stride_sb":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return out, attrs


def _value(v):
    return {"True": True, "False": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)


def main(argv):
    kern, d, bm, bn, w, s = argv[0], *map(int, argv[1:6])
    extra = dict((kv.split("=")[0], _value(kv.split("=")[1])) for kv in argv[6:])
    fn = {"dkdv": K.attn_bwd_dkdv, "dq": K.attn_bwd_dq, "fwd": K.attn_fwd}[kern]
    consts = dict(GROUP=1, HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                  BLOCK_DV=d, VARLEN=False, HAS_LEFT=False,
                  HAS_RIGHT=bool(extra.pop("CAUSAL", False)), SOFTCAP=False, DROPOUT=False,
                  IEEE=False)
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
    sig, attrs = signature(fn, consts, descs)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": w, "num_stages": s})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", res)
    print(f"triton {triton.__version__} {kern} d{d} ({bm},{bn},{w},{s}) {extra}: "
          f"regs {m.group(1)} stack {m.group(2)} B, shared {k.metadata.shared // 1024} KiB, "
          f"wgmma {ptx.count('wgmma.mma_async')} mma.sync {ptx.count('mma.sync')}, "
          f"bulk reductions {ptx.count('cp.reduce.async.bulk')}, "
          f"warp-specialized {k.asm.get('ttgir', '').count('ttg.warp_specialize') > 0}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
