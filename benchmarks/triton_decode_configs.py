"""Moved to `python benchmarks/decode_variants.py triton --configs all --shuffle ...`; this alias
(old flags: --sks, --layouts, --candidates, --quick, --sq) goes next session."""
import os
import sys

OLD = {"--sks": "--sk", "--layouts": "--pages", "--candidates": "--configs"}
args = [OLD.get(a, a) for a in sys.argv[1:]]
args += [] if "--configs" in args else ["--configs", "0,1,2" if "--quick" in args else "all"]
new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_variants.py")
os.execv(sys.executable, [sys.executable, new, "triton", "--shuffle", *args])
