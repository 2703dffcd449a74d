"""attention_with_kvcache on the backend under test (FLASHMUX_TEST_BACKEND, default reference)
against the float64 reference, for every array kind it serves: contiguous and paged caches
(page sizes 8-256, shuffled block tables), ragged cache_seqlens including 0 and full, Sq 1-16
and a chunked prefill, with and without new tokens, MHA/GQA/MQA, causal, window, softcap, ALiBi,
lse, num_splits forced to 1 and to several; untouched cache slots must keep their contents.
FLASHMUX_TEST_SEED replays a draw."""

from __future__ import annotations

import os

import pytest
from kvjudge import KvCase, run_case

C = KvCase()
CASES = [
    C,  # fp16, GQA 2, Sq 1, one new token, contiguous, ragged lengths with 0 and full
    KvCase(snew=0, lens=(96, 5, 0)),  # no new tokens, one sequence full
    KvCase(heads_q=4, heads_kv=4, seqlen_q=4, snew=4, causal=True),  # MHA, speculative
    KvCase(heads_q=8, heads_kv=1, seqlen_q=2, snew=2, causal=True, dtype="bfloat16"),  # MQA
    KvCase(seqlen_q=16, snew=16, capacity=128, lens=(-1, 0, 50), causal=True),
    KvCase(batch=2, seqlen_q=40, snew=40, capacity=128, lens=(88, 0), causal=True, num_splits=3),
    KvCase(num_splits=1, lens=(-1, 3, 60)),
    KvCase(num_splits=5, lens=(-1, 1, 60), causal=True, seqlen_q=2, snew=2),
    KvCase(window=(17, 0), seqlen_q=3, snew=3, num_splits=3),
    KvCase(window=(9, 2), causal=False, seqlen_q=3, snew=1, softcap=5.0),
    KvCase(softcap=2.0, causal=True, seqlen_q=2, snew=1, dtype="float32"),
    KvCase(alibi="h", causal=True, seqlen_q=2, snew=2),
    KvCase(alibi="bh", seqlen_q=1, snew=1, num_splits=2, dtype="bfloat16"),
    KvCase(head_dim=64, head_dim_v=32, snew=0, lens=(40, 96, 1)),
    KvCase(scale=-0.3, causal=True),
    KvCase(seqlen_q=3, snew=0, lens=(1, 0, 2), causal=True),  # rows that see no key
    # paged caches, shuffled tables
    KvCase(page_size=8, capacity=96, causal=True, seqlen_q=2, snew=2),
    KvCase(page_size=16, capacity=96, lens=(-1, 0, 33), num_splits=3),
    KvCase(page_size=24, capacity=96, snew=3, seqlen_q=3, causal=True, window=(20, 0)),
    KvCase(page_size=32, capacity=128, heads_q=8, heads_kv=1, alibi="h", dtype="bfloat16"),
    KvCase(page_size=64, capacity=128, lens=(-1, 0, 64), snew=1, softcap=3.0, num_splits=1),
    KvCase(page_size=128, capacity=256, batch=2, lens=(-1, 130), seqlen_q=4, snew=4, causal=True),
    KvCase(page_size=256, capacity=256, batch=2, lens=(-1, 7), dtype="float32", num_splits=2),
    KvCase(page_size=16, capacity=64, batch=2, seqlen_q=24, snew=24, lens=(40, 0), causal=True),
    # more packed rows than one program holds (8/2 heads x 40 rows = 160 > 128), and a window
    KvCase(heads_q=8, heads_kv=2, seqlen_q=40, snew=40, capacity=128, page_size=8,
           lens=(88, 0, 10), window=(30, 0), num_splits=4),
    KvCase(head_dim=48, head_dim_v=80, page_size=16, capacity=64, lens=(-1, 0, 5)),  # padded D
]
# JAX compiles every new shape (~0.3 s per compile on the CI CPU): eager JAX runs a subset.
JAX_EAGER = {0, 3, 5, 9, 16, 21}
JAX_JIT = [
    KvCase(transform="jit", causal=True, seqlen_q=2, snew=2),
    KvCase(transform="jit", page_size=16, capacity=64, lens=(-1, 0, 9), alibi="h"),
]


def _seed(i: int) -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little") ^ i


@pytest.mark.parametrize("case", CASES + JAX_JIT, ids=lambda c: c.id())
def test_kvcache_case(case, backend, kind):
    if case.transform == "jit" and kind != "jax":
        pytest.skip("jit cases are for JAX")
    if kind == "jax" and case.transform == "eager" and CASES.index(case) not in JAX_EAGER:
        pytest.skip("eager JAX runs a subset of the cases (compile time)")
    if kind == "numpy" and case.dtype == "bfloat16":
        case = KvCase(**{**case.__dict__, "dtype": "float16"})
    skip = run_case(case, backend, kind, _seed(hash(case.id()) & 0xFFFF))
    if skip:
        pytest.skip(skip)
