"""The harness's decode sweep narrowed to some kvcache rows (--kv-pages, --kv-sq,
--kv-no-extras), as the GPU timing call uses it. Reference pass only (no kernels run)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass only", allow_module_level=True)

from flashmux.bench.cli import parser  # noqa: E402
from flashmux.bench.shapes import SweepConfig, build_points  # noqa: E402


def _rows(**kw):
    pts = build_points(SweepConfig(sweeps=["decode"], seqlens=[4096, 32768, 131072],
                                   kvcache_only=True, **kw))
    return sorted((p.seqlen_k, p.seqlen_q, p.page_size, p.heads_kv, p.kv_lens is not None)
                  for p in pts)


def test_narrowed_kvcache_rows():
    every = _rows()
    assert len(every) == 3 * 10  # Sq 1 and 4 x (contiguous, 16, 64) + ragged x 2 + MQA x 2
    got = _rows(kv_pages=[0, 16], kv_sq=[1], kv_extras=False)
    assert got == sorted((sk, 1, page, 8, False) for sk in (4096, 32768, 131072)
                         for page in (0, 16))
    with_extras = _rows(kv_pages=[16], kv_sq=[4])
    assert {(r[1], r[2], r[3], r[4]) for r in with_extras} == {
        (4, 16, 8, False), (1, 16, 8, True), (1, 16, 1, False)}


def test_command_line_options():
    a = parser().parse_args(["--sweep", "decode", "--kvcache-only", "--kv-pages", "0,16",
                             "--kv-sq", "1", "--kv-no-extras"])
    assert (a.kv_pages, a.kv_sq, a.kv_no_extras) == ("0,16", "1", True)
