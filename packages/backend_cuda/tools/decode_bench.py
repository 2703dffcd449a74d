"""Moved to `python benchmarks/decode_variants.py cuda ...` (same flags); this alias goes next
session."""
import os
import sys

new = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../benchmarks/decode_variants.py")
os.execv(sys.executable, [sys.executable, new, "cuda", *sys.argv[1:]])
