"""The conformance cases: every feature of SPEC.md, at sizes that are not multiples of any block
size. `cases(tier)` gives the list for a size tier ("small" keeps CPU interpreters fast)."""

from __future__ import annotations

from harness import Case

HEAD_DIMS = (32, 40, 64, 72, 80, 96, 128, 160, 192, 256)


def cases(tier: str = "full") -> list[Case]:
    small = tier == "small"
    L = 33 if small else 113
    LL = 65 if small else 255
    out: list[Case] = []
    # sequence lengths, Sq != Sk both ways
    for sq, sk in ((1, 1), (17, 17), (L, LL), (LL, L), (1, LL)) + (() if small else ((1000, 1000),)):
        out.append(Case(seqlen_q=sq, seqlen_k=sk, head_dim=64, batch=1 if sq == 1000 else 2))
    # head dims
    for d in HEAD_DIMS if not small else (32, 40, 72, 128, 256):
        out.append(Case(seqlen_q=L, seqlen_k=L, head_dim=d, heads_q=2, heads_kv=2, batch=1))
    # MHA / GQA / MQA with masks
    out += [
        Case(seqlen_q=L, seqlen_k=LL, heads_q=8, heads_kv=2, causal=True),
        Case(seqlen_q=LL, seqlen_k=L, heads_q=4, heads_kv=1, causal=True),  # rows that see nothing
        Case(seqlen_q=L, seqlen_k=L, heads_q=4, heads_kv=1, head_dim=128),
    ]
    # causal, windows (incl. rows that see nothing), softcap
    out += [
        Case(seqlen_q=LL, seqlen_k=LL, causal=True),
        Case(seqlen_q=LL, seqlen_k=LL, window=(16, 0)),
        Case(seqlen_q=L, seqlen_k=LL, window=(8, 24)),
        Case(seqlen_q=LL, seqlen_k=L, window=(0, 0)),  # the first rows see nothing
        Case(seqlen_q=LL, seqlen_k=LL, window=(None, 5)),
        Case(seqlen_q=L, seqlen_k=LL, causal=True, window=(20, 7)),
        Case(seqlen_q=L, seqlen_k=L, softcap=5.0),
        Case(seqlen_q=L, seqlen_k=LL, softcap=2.0, causal=True, heads_q=4, heads_kv=2),
        Case(seqlen_q=L, seqlen_k=L, scale=0.5),
        Case(seqlen_q=LL, seqlen_k=LL, scale=-0.3, causal=True, head_dim=128),  # scale < 0 is valid
        Case(seqlen_q=L, seqlen_k=LL, scale=0.0, causal=True),  # so is 0: uniform over visible keys
    ]
    # Dv != D
    out += [Case(seqlen_q=L, seqlen_k=LL, head_dim=64, head_dim_v=32, heads_q=4, heads_kv=2)]
    # varlen with empty and length-1 sequences
    out += [
        Case(seqlens=((5, 7), (0, 3), (1, 1), (L, LL), (9, 0), (0, 0)), heads_q=4, heads_kv=2),
        Case(seqlens=((L, L), (1, 17), (17, 1), (3, 3)), causal=True),
        Case(seqlens=((L, LL), (LL, L)), window=(7, 3), softcap=3.0),
    ]
    # gradient through lse
    out += [
        Case(seqlen_q=L, seqlen_k=LL, lse_grad=True, causal=True),
        Case(seqlens=((5, 7), (L, L)), lse_grad=True),
    ]
    # dtypes
    dt_cases = []
    for c in out:
        if c.head_dim in (40, 128) or c.seqlens is not None or c.causal:
            dt_cases.append(c)
    if small:
        # CPU interpreters run the same kernel code for both 16-bit types; the small tier keeps
        # one bfloat16 case per group (padded head dim; varlen with window and softcap; causal
        # with the lse gradient), the full tier (GPUs, `nox -s full`) every one (CI time)
        dt_cases = [c for c in dt_cases if c.head_dim == 40 or (c.seqlens and c.softcap)
                    or (c.causal and c.lse_grad and c.seqlens is None)]
    out += [_with(c, dtype="bfloat16") for c in dt_cases]
    out += [
        Case(seqlen_q=L, seqlen_k=LL, dtype="float32", causal=True, heads_q=4, heads_kv=2),
        Case(seqlens=((5, 7), (L, L)), dtype="float32"),
    ]
    # block multiples (full tier): the shapes that take Hopper-only lowerings (Pallas' Mosaic GPU
    # forward and backward need Sq, Sk multiples of 128) and kernels' unmasked fast paths
    if not small:
        out += [
            Case(seqlen_q=256, seqlen_k=256, head_dim=128, heads_q=4, heads_kv=2, causal=True,
                 dtype="bfloat16", lse_grad=True),
            Case(seqlen_q=128, seqlen_k=384, head_dim=128, dtype="float16"),
            Case(seqlen_q=256, seqlen_k=256, head_dim=64, heads_q=4, heads_kv=1, causal=True,
                 dtype="bfloat16"),
            Case(seqlen_q=384, seqlen_k=128, head_dim=64, dtype="bfloat16"),
            Case(seqlen_q=256, seqlen_k=256, head_dim=128, scale=-0.3, dtype="bfloat16"),
        ]
    # dropout
    out += [
        Case(seqlen_q=L, seqlen_k=LL, dropout_p=0.2),
        Case(seqlen_q=LL, seqlen_k=LL, dropout_p=0.5, causal=True, heads_q=4, heads_kv=2, dtype="bfloat16"),
        Case(seqlens=((5, 7), (L, L)), dropout_p=0.3),
    ]
    return out


def _with(c: Case, **kw) -> Case:
    from dataclasses import replace

    return replace(c, **kw)
