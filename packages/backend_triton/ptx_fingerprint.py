"""Fingerprints of the compiled attention kernels, on a machine without a GPU: each kernel is
compiled for sm_90 (PTX, line info stripped; with --sass, the SASS from the bundled ptxas and
nvdisasm) over combinations of window/softcap/dropout/ALiBi, and one hash per (kernel, flags) is
printed. Run it before and after a refactor of _kernels.py / _kernels_bs.py: equal hashes mean
the GPU runs the same code.

    python packages/backend_triton/ptx_fingerprint.py > /tmp/before.txt     # on the old tree
    python packages/backend_triton/ptx_fingerprint.py > /tmp/after.txt      # on the new one
    diff /tmp/before.txt /tmp/after.txt
    python packages/backend_triton/ptx_fingerprint.py --kernels bs_fwd,bs_dq --sass

Shapes: head_dim 64, 64x64 tiles, fp16, one KV head per query head, 4 warps, 2 stages (the
flags are what changes the code; the sizes only its constants). Takes a few seconds per kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

KERNELS = ("fwd", "dkdv", "dq", "bs_fwd", "bs_dkdv", "bs_dq")
FLAGS = ("HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "DROPOUT", "ALIBI")


def _constexpr_default(fn, name) -> bool:
    """A `tl.constexpr` parameter with a default (e.g. an opt-in flag): compiled at its default."""
    p = inspect.signature(fn.fn).parameters[name]
    return p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation)


def signature(fn, consts):
    """Argument types by the kernels' naming: UPPER = pointers, strides/lengths i32."""
    ints = {"CU_Q", "CU_K", "QNF", "QFI", "QNP", "QPI", "KNF", "KFI", "KNP", "KPI", "TILE",
            "BITS"}
    f32 = {"LSE", "DELTA", "DLSE", "SLOPES", "DQA"}
    out = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            out[name] = "constexpr"
        elif _constexpr_default(fn, name):
            consts[name] = inspect.signature(fn.fn).parameters[name].default
            out[name] = "constexpr"
        elif name in ("scale_a", "scale_b", "p_drop", "drop_scale", "sm_scale"):
            out[name] = "fp32"
        elif name == "seed":
            out[name] = "i64"
        elif name in ints or name in f32:
            out[name] = "*i32" if name in ints else "*fp32"
        elif name.isupper():
            out[name] = "*fp16"
        else:
            out[name] = "i32"
    return out


def fingerprint(fn, consts, sass: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = triton.compile(ASTSource(fn, signature(fn, consts), consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    if sass:
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
        lines = [re.sub(r"/\*[0-9a-f]+\*/", "", x).strip() for x in text.splitlines()
                 if "/*" in x and not x.strip().startswith("//")]
    else:
        lines = [x for x in k.asm["ptx"].splitlines() if not re.match(r"\s*(\.loc|\.file|//)", x)]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--sass", action="store_true", help="hash the SASS instead of the PTX")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from flashmux_triton import _kernels as K
    from flashmux_triton import _kernels_bs as KB

    tiles = dict(GROUP=1, HEAD_DIM=64, HEAD_DIM_V=64, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
                 BLOCK_DV=64, IEEE=False)
    plain = {"fwd": (K.attn_fwd, dict(VARLEN=False, TMA=False, RESID=True)),
             "dkdv": (K.attn_bwd_dkdv, dict(VARLEN=False, FUSED_DQ=False)),
             "dq": (K.attn_bwd_dq, dict(VARLEN=False))}
    sparse = {"bs_fwd": (KB.bs_fwd, dict(RESID=False)), "bs_dkdv": (KB.bs_bwd_dkdv, {}),
              "bs_dq": (KB.bs_bwd_dq, {})}
    for values in itertools.product([False, True], repeat=len(FLAGS)):
        flags = dict(zip(FLAGS, values))
        if sum(values) - flags["HAS_RIGHT"] > 2:  # at most two of left/softcap/dropout/ALiBi
            continue
        tag = "".join(n[4] if n.startswith("HAS_") else n[0] for n in FLAGS if flags[n]) or "-"
        for name in args.kernels.split(","):
            fn, extra = {**plain, **sparse}[name]
            consts = dict(tiles, **flags, **extra)
            if name in plain and name == "fwd":
                consts["FOLD"] = not flags["ALIBI"]
            if name in sparse:
                consts.update(MBS=128, CHECK_FULL=flags["HAS_RIGHT"])
            print(f"{name:8s} {tag:6s} {fingerprint(fn, consts, args.sass)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
