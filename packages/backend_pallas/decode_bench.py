"""Moved to `python benchmarks/decode_variants.py pallas ...` (--configs all for the old
--configs, --inner for --iters); this alias goes next session."""
import os
import sys

args = [{"--iters": "--inner"}.get(a, a) for a in sys.argv[1:]]
args = [x for a in args for x in (["--configs", "all"] if a == "--configs" else [a])]
new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../benchmarks/decode_variants.py")
os.execv(sys.executable, [sys.executable, new, "pallas", *args])
