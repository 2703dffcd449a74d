"""`python -m flashmux.bench ...` (same as `python -m flashmux bench ...`)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
