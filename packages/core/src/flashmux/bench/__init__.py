"""flashmux's benchmark harness: `python -m flashmux bench` (see docs/benchmarks.md).

Measures every flashmux backend (forced, and the dispatcher's own choice) against the attention
implementations users would pick instead, in one run: TFLOP/s and milliseconds for forward,
backward and forward+backward over the FlashAttention papers' sweeps, peak memory, a results
JSON, Markdown tables and PNG plots. Frameworks are imported only when a benchmark runs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
