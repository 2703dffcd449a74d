"""KV-cache decoding in Triton: split-KV (Flash-Decoding) over contiguous or paged caches.

Imported lazily (imports torch and triton). Contract: flashmux/kvcache.py.

Work decomposition. One program owns one (sequence b, KV head h, split s, query block m). Its
query tile packs every query row that reads KV head h: the G = Hq / Hkv query heads times the Sq
query rows (row r = i * G + g, query head h * G + g, query row i), so each byte of K and V is
read once per split instead of G * Sq times (GQA packing). The keys of the sequence are cut into
`num_splits` block-aligned ranges; each program runs FlashAttention's online softmax over its
range and writes a float32 partial output and its lse. The last program of each (sequence, KV
head, query block) to finish (an atomic ticket) merges the splits by lse (FUSED; the separate
merge kernel `decode_merge` remains for fused_merge=0); with one split the program writes the
final output itself.

Appending (the core's fast path, `runner`): the new tokens k, v are written by the same launch
(NEW): keys at positions >= cache_seqlens are read from k, v, never from the cache, and each
split's first query block writes the new tokens that fall in its keys. Host side: launch plans
per call signature (`_Launch`), compiled kernels relaunched without Triton's per-call binding
(`_FastLaunch`), partials and ticket counters kept per stream.

Paged caches: token t of sequence b is in page block_table[b, t // page_size], slot
t % page_size. When the key block divides the page (page_size % BLOCK_N == 0) a block never
crosses a page and costs one table lookup; otherwise each key row looks its page up (a gather).

Lengths and page ids come from device memory and are clamped (seqlens_k to the capacity, page
ids to [0, num_pages)); the host never reads them, so a launch can be captured in a CUDA graph.
Scores are kept in log2 units: s2 = (scale * q.k [softcap] [- alibi]) * log2(e).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import tuning_decode as T

# the dot, cast and tanh helpers of the attention kernels (interpreter-safe bf16 handling)
from ._kernels import _cast, _dot, _dot_acc, _part, _tanh

try:  # programmatic dependent launch (sm90+; triton >= 3.4): the `pdl` variant only
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: the variant is refused on the host
    gdc_wait = gdc_launch_dependents = None


@triton.jit
def _pages(TBL, start_n, offs_n, max_pages, num_pages, PAGE_SIZE: tl.constexpr,
           PAGE_BLOCK: tl.constexpr):
    """Page ids (clamped) of the key block at start_n: a scalar when the block lies in one page,
    else one per key row."""
    if PAGE_BLOCK:
        pidx = tl.minimum(start_n // PAGE_SIZE, max_pages - 1)
    else:
        pidx = tl.minimum((start_n + offs_n) // PAGE_SIZE, max_pages - 1)
    page = tl.load(TBL + pidx)
    return tl.minimum(tl.maximum(page, 0), num_pages - 1)


@triton.jit
def _pages_sel(TBL, start_n, offs, max_pages, num_pages, PAGE_SIZE: tl.constexpr,
               NP: tl.constexpr):
    """Page ids (clamped) of the key rows start_n + offs (any shape) of a block holding NP
    whole pages: NP scalar loads spread over the rows by select. Built from scalars and an
    arange, the result takes whatever layout its user needs (no conversion)."""
    first = start_n // PAGE_SIZE
    ids = tl.zeros(offs.shape, dtype=tl.int32)
    for j in tl.static_range(NP):
        pj = tl.load(TBL + tl.minimum(first + j, max_pages - 1))
        pj = tl.minimum(tl.maximum(pj, 0), num_pages - 1)
        ids = tl.where(offs // PAGE_SIZE == j, pj, ids)
    return ids


@triton.jit
def _kv_rows(page, start_n, offs_n, stride_page, stride_slot, PAGE_SIZE: tl.constexpr,
             PAGED: tl.constexpr, PAGE_BLOCK: tl.constexpr, OFF32: tl.constexpr = False):
    """int64 offsets (BLOCK_N,) of key rows start_n + offs_n inside one (sequence, KV head);
    int32 with OFF32 (the host checked that every offset fits)."""
    cols = start_n + offs_n
    if OFF32:
        if PAGED:
            if PAGE_BLOCK:
                rows = page * stride_page + ((start_n % PAGE_SIZE) + offs_n) * stride_slot
            else:
                rows = page * stride_page + (cols % PAGE_SIZE) * stride_slot
        else:
            rows = cols * stride_page
    elif PAGED:
        if PAGE_BLOCK:
            rows = (page.to(tl.int64) * stride_page
                    + ((start_n % PAGE_SIZE) + offs_n).to(tl.int64) * stride_slot)
        else:
            rows = page.to(tl.int64) * stride_page + (cols % PAGE_SIZE).to(tl.int64) * stride_slot
    else:
        rows = cols.to(tl.int64) * stride_page
    return rows


@triton.jit
def _decode_inner(
    acc, l_i, m_i, q, K, V, TBL, lo, hi, length, pos, slope,
    max_pages, num_pages, stride_kp, stride_ks, stride_vp, stride_vs,
    offs_n, offs_d, offs_dv, window_left, window_right, scale, softcap,
    KN, VN, stride_kns, stride_vns, cache_len, snew,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_BLOCK: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, IEEE: tl.constexpr, NEW: tl.constexpr,
    OFF32: tl.constexpr = False, PREFETCH: tl.constexpr = True, DUAL: tl.constexpr = False,
    SEL: tl.constexpr = False, desc_k=None, desc_v=None, k_row0=0, k_col=0, v_col=0,
    TMA: tl.constexpr = False,
):
    """NEW (masked loops of a launch that appends): keys at positions < cache_len come from the
    cache, keys at cache_len .. length - 1 (this call's new tokens, token t = position -
    cache_len) from KN / VN, never from the cache slots the same launch writes. A block holding
    both kinds is processed once, as the separate append's launch processes it, so the fused
    and the separate append give the same scores, running maxima and roundings of P."""
    # paged: the page ids of the next block are loaded one iteration ahead, so the K/V loads'
    # addresses come from the loop's carried values and the pipeliner can multi-buffer them
    nxt = tl.zeros([BLOCK_N], dtype=tl.int32)
    if PAGED and PREFETCH:
        if PAGE_BLOCK:
            nxt = _pages(TBL, lo, offs_n, max_pages, num_pages, PAGE_SIZE, True) + nxt
        else:
            nxt = _pages(TBL, lo, offs_n, max_pages, num_pages, PAGE_SIZE, False)
    # DUAL (per-row pages, prefetched): the ids are loaded twice, as a (1, BLOCK_N) row for K^T
    # and a (BLOCK_N, 1) column for V, each in its own operand's layout (one shared vector
    # took layout conversions through shared memory, with barriers, every iteration at 128 keys)
    # SEL (with DUAL, pages dividing the block): the row and column are built from the block's
    # BLOCK_N / PAGE_SIZE page ids as scalar loads (no gather load whose layout needs converting)
    DUAL_ON: tl.constexpr = (DUAL or SEL) and PAGED and PREFETCH and not PAGE_BLOCK
    SEL_ON: tl.constexpr = SEL and DUAL_ON and BLOCK_N % PAGE_SIZE == 0
    NP: tl.constexpr = max(BLOCK_N // PAGE_SIZE, 1)
    nk = tl.zeros([1, BLOCK_N], dtype=tl.int32)
    nv = tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    if SEL_ON:
        nk = _pages_sel(TBL, lo, offs_n[None, :], max_pages, num_pages, PAGE_SIZE, NP)
        nv = _pages_sel(TBL, lo, offs_n[:, None], max_pages, num_pages, PAGE_SIZE, NP)
    elif DUAL_ON:
        nk = _pages(TBL, lo, offs_n[None, :], max_pages, num_pages, PAGE_SIZE, False)
        nv = _pages(TBL, lo, offs_n[:, None], max_pages, num_pages, PAGE_SIZE, False)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        page = nxt
        if PAGED:
            if PREFETCH:
                if PAGE_BLOCK:
                    nxt = _pages(TBL, start_n + BLOCK_N, offs_n, max_pages, num_pages,
                                 PAGE_SIZE, True) + nxt * 0
                else:
                    nxt = _pages(TBL, start_n + BLOCK_N, offs_n, max_pages, num_pages,
                                 PAGE_SIZE, False)
            else:  # this block's ids, in the loop (the pipeliner stages the index load)
                page = _pages(TBL, start_n, offs_n, max_pages, num_pages, PAGE_SIZE,
                              PAGE_BLOCK) + nxt * 0
        if PAGE_BLOCK:
            page = tl.max(page, 0)  # every entry holds the block's one page id
        if DUAL_ON:
            pk = nk
            pv = nv
            if SEL_ON:
                nk = _pages_sel(TBL, start_n + BLOCK_N, offs_n[None, :], max_pages, num_pages,
                                PAGE_SIZE, NP)
                nv = _pages_sel(TBL, start_n + BLOCK_N, offs_n[:, None], max_pages, num_pages,
                                PAGE_SIZE, NP)
            else:
                nk = _pages(TBL, start_n + BLOCK_N, offs_n[None, :], max_pages, num_pages,
                            PAGE_SIZE, False)
                nv = _pages(TBL, start_n + BLOCK_N, offs_n[:, None], max_pages, num_pages,
                            PAGE_SIZE, False)
            kt_ptrs = K + _kv_rows(pk, start_n, offs_n[None, :], stride_kp, stride_ks,
                                   PAGE_SIZE, PAGED, PAGE_BLOCK, OFF32) + offs_d[:, None]
            v_ptrs = V + _kv_rows(pv, start_n, offs_n[:, None], stride_vp, stride_vs,
                                  PAGE_SIZE, PAGED, PAGE_BLOCK, OFF32) + offs_dv[None, :]
        else:
            k_rows = _kv_rows(page, start_n, offs_n, stride_kp, stride_ks, PAGE_SIZE, PAGED,
                              PAGE_BLOCK, OFF32)
            v_rows = _kv_rows(page, start_n, offs_n, stride_vp, stride_vs, PAGE_SIZE, PAGED,
                              PAGE_BLOCK, OFF32)
            kt_ptrs = K + k_rows[None, :] + offs_d[:, None]
            v_ptrs = V + v_rows[:, None] + offs_dv[None, :]
        if NEW:  # (always masked) cached keys from the cache, new ones from KN / VN
            # one load per tile through per-key pointers (cache slot or new token): the
            # pipeliner buffers one K and one V tile, as for the cache alone (two loads per
            # operand, one per source, took 324 KiB of shared memory at D = 128 on sm90)
            is_new = cols >= cache_len
            t64 = tl.minimum(tl.maximum(cols - cache_len, 0), tl.maximum(snew - 1, 0)).to(tl.int64)
            kt_ptrs = tl.where(is_new[None, :], KN + t64[None, :] * stride_kns + offs_d[:, None],
                               kt_ptrs)
            v_ptrs = tl.where(is_new[:, None], VN + t64[:, None] * stride_vns + offs_dv[None, :],
                              v_ptrs)
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < length) & (offs_d[:, None] < HEAD_DIM),
                         other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < length) & (offs_dv[None, :] < HEAD_DIM_V),
                        other=0.0)
        elif MASKED:
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < length) & (offs_d[:, None] < HEAD_DIM),
                         other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < length) & (offs_dv[None, :] < HEAD_DIM_V),
                        other=0.0)
        elif TMA:
            # (contiguous cache, unmasked blocks, unpadded head dims) the tiles through Hopper
            # tensor descriptors over the (B * S_max, Hkv * D) view: in bounds by construction
            # (an unmasked block ends at or before the sequence's length <= S_max)
            kt = tl.trans(desc_k.load([k_row0 + start_n, k_col]))
            v = desc_v.load([k_row0 + start_n, v_col])
        else:
            if BLOCK_D != HEAD_DIM:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
            if BLOCK_DV != HEAD_DIM_V:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
            else:
                v = tl.load(v_ptrs)
        s = _dot(q, kt, IEEE) * scale
        if SOFTCAP:
            s = softcap * _tanh(s * (1.0 / softcap))
        if ALIBI:
            s = s - slope[:, None] * tl.abs(pos[:, None] - cols[None, :]).to(tl.float32)
        s = s * 1.4426950408889634
        if MASKED:
            ok = cols[None, :] < length
            if HAS_LEFT:
                ok = ok & (cols[None, :] >= pos[:, None] - window_left)
            if HAS_RIGHT:
                ok = ok & (cols[None, :] <= pos[:, None] + window_right)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot_acc(_cast(p, v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["window_left", "window_right", "max_pages", "num_pages",
                               "split_len", "seqlen_add"])
def decode_fwd(
    Q, K, V, SEQLENS, TBL, ALIBI_SLOPES, O, LSE, OP, LP, CNT, KN, VN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kp, stride_kh, stride_ks,
    stride_vb, stride_vp, stride_vh, stride_vs,
    stride_tb, stride_ab,
    stride_os, stride_ob, stride_oi, stride_oh,
    stride_ls, stride_lb, stride_lh,
    seqlen_q, capacity, max_pages, num_pages, split_len, window_left, window_right,
    scale, softcap, seqlen_add, num_splits,
    stride_ob2, stride_oi2, stride_oh2, stride_lb2, stride_lh2,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh, batch_n,
    GROUP: tl.constexpr, HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_BLOCK: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, NEW: tl.constexpr,
    OFF32: tl.constexpr = False, PREFETCH: tl.constexpr = True, L2PF: tl.constexpr = 0,
    LINE: tl.constexpr = 64, DUAL: tl.constexpr = False, SEL: tl.constexpr = False,
    PDL: tl.constexpr = False, BAL: tl.constexpr = False, BLOCK_B: tl.constexpr = 2,
    DESC_K=None, DESC_V=None, TMA: tl.constexpr = False, PDL_EARLY: tl.constexpr = False,
):
    """One (split, batch * KV head, query block). O/LSE are the final out (B, Sq, Hq, Dv) and
    lse (B, Hq, Sq) when SPLIT is False, else float32 partials with a leading split axis.

    FUSED (with SPLIT): the last program of a (batch * KV head, query block) to finish (a ticket
    from the int32 counter CNT, one per such group, left at 0 again) merges the splits' partials
    by lse into OP (out) and LP (lse), strides stride_*2; no second launch. The lengths are
    SEQLENS[b] + seqlen_add (the append's new tokens), clamped to the capacity.

    NEW: the seqlen_add new tokens KN / VN (B, Snew, Hkv, D / Dv) are appended here: keys at
    positions >= SEQLENS[b] are read from KN / VN (so no program reads a cache slot this launch
    writes), and the first query block of the split whose keys hold a new token's position
    writes it into the cache (positions clamped to the capacity, pages to the pool)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = bh // HEADS_KV
    h = bh % HEADS_KV
    b64 = b.to(tl.int64)
    part = split  # this program's partial slot
    nsplit = num_splits
    first_part = 0
    active = split >= 0

    if L2PF:
        # (contiguous caches, compiled GPUs only) L2 prefetch of this split's first L2PF key
        # blocks of K and V, issued before the length is known: the pipeline's first loads,
        # which wait for SEQLENS, then hit L2. One prefetch per 128-byte line (LINE elements).
        NL: tl.constexpr = (BLOCK_D + LINE - 1) // LINE
        pr = tl.arange(0, L2PF * BLOCK_N)
        pc = tl.arange(0, NL)
        prow = tl.minimum(split * split_len + pr, capacity - 1).to(tl.int64)
        pk = (K + b64 * stride_kb + h * stride_kh + prow[:, None] * stride_kp
              + pc[None, :] * LINE)
        pv = (V + b64 * stride_vb + h * stride_vh + prow[:, None] * stride_vp
              + pc[None, :] * LINE)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pk],
                                  dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pv],
                                  dtype=tl.int32, is_pure=False, pack=1)

    if PDL:
        # launched with programmatic dependent launch: everything above (index math, the L2
        # prefetch of cache rows, which only warms L2) may overlap the previous kernel; every
        # read of q, the lengths, the table, the cache and the new tokens comes after this wait
        gdc_wait()
        if PDL_EARLY:  # the next kernel's programs may launch now (they wait for our end)
            gdc_launch_dependents()

    if BAL:
        # length-balanced splits (ragged batches; no append): grid (programs, KV heads, query
        # blocks). The keys of all sequences are cut into chunks of one size, at least
        # split_len keys and few enough that num_splits programs per KV head hold them; the
        # chunks of sequence b are the programs ends[b - 1] .. ends[b] - 1 (from the lengths,
        # on the device). Programs past the last chunk do nothing. Partials by program.
        h = bh
        offs_b = tl.arange(0, BLOCK_B)
        in_b = offs_b < batch_n
        lens_b = tl.load(SEQLENS + offs_b, mask=in_b, other=0)
        lens_b = tl.where(in_b, tl.minimum(tl.maximum(lens_b + seqlen_add, 0), capacity), 0)
        total = tl.sum(lens_b, 0)
        chunk = tl.maximum((total + num_splits - 1) // num_splits, split_len)
        chunk = ((chunk + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        nb = tl.where(in_b, tl.maximum((lens_b + chunk - 1) // chunk, 1), 0)
        ends = tl.cumsum(nb, 0)
        b = tl.sum((ends <= part).to(tl.int32), 0)
        active = b < batch_n
        b = tl.minimum(b, batch_n - 1)
        nsplit = tl.sum(tl.where(offs_b == b, nb, 0), 0)
        first_part = tl.sum(tl.where(offs_b == b, ends - nb, 0), 0)
        split = part - first_part
        split_len = chunk
        bh = b * HEADS_KV + h
        b64 = b.to(tl.int64)

    cache_raw = tl.load(SEQLENS + b)
    length = tl.minimum(tl.maximum(cache_raw + seqlen_add, 0), capacity)
    cache_len = length
    if NEW:
        cache_len = tl.minimum(tl.maximum(cache_raw, 0), length)
    off = length - seqlen_q  # query row i sits at position off + i

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows r = i * GROUP + g
    row_i = offs_r // GROUP
    row_g = offs_r % GROUP
    row_ok = row_i < seqlen_q
    head = h * GROUP + row_g
    pos = off + row_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(
        Q + b64 * stride_qb + row_i[:, None] * stride_qs + head[:, None] * stride_qh
        + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope = tl.load(ALIBI_SLOPES + b64 * stride_ab + head, mask=row_ok, other=0.0)

    # Keys of this split, cut to the band the block's rows can see; the middle needs no mask.
    first = pid_m * BLOCK_M // GROUP
    last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seqlen_q - 1)
    s0 = split * split_len
    s1 = tl.minimum(s0 + split_len, length)
    lo = s0
    hi = s1
    full_lo = s0
    full_hi = s1
    if HAS_LEFT:
        lo = tl.maximum(lo, off + first - window_left)
        full_lo = tl.maximum(full_lo, off + last - window_left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, off + last + window_right + 1)
        full_hi = tl.minimum(full_hi, off + first + window_right + 1)
    if NEW:  # new tokens only in masked blocks (read from KN / VN)
        full_hi = tl.minimum(full_hi, cache_len)
    lo_b = (tl.maximum(lo, s0) // BLOCK_N) * BLOCK_N
    mid0 = ((tl.maximum(full_lo, s0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    mid1 = (full_hi // BLOCK_N) * BLOCK_N
    mid0 = tl.maximum(tl.minimum(mid0, hi), lo_b)
    mid1 = tl.minimum(tl.maximum(mid1, mid0), tl.maximum(hi, mid0))
    mid1 = tl.maximum(mid1, mid0)

    if PAGED:
        k_base = K + h * stride_kh
        v_base = V + h * stride_vh
    else:
        k_base = K + b64 * stride_kb + h * stride_kh
        v_base = V + b64 * stride_vb + h * stride_vh
    tbl = TBL + b64 * stride_tb
    kn_base = KN + b64 * stride_knb + h * stride_knh
    vn_base = VN + b64 * stride_vnb + h * stride_vnh

    if NEW:
        if pid_m == 0:
            # the new tokens whose (clamped) positions fall in this split's keys, into the cache
            for t0 in range(0, seqlen_add, BLOCK_N):
                t = t0 + offs_n
                p_t = tl.minimum(tl.maximum(cache_raw + t, 0), capacity - 1)
                own = (t < seqlen_add) & (p_t >= s0) & (p_t < s0 + split_len)
                if PAGED:
                    pg = tl.load(tbl + tl.minimum(p_t // PAGE_SIZE, max_pages - 1), mask=own,
                                 other=0)
                    pg = tl.minimum(tl.maximum(pg, 0), num_pages - 1).to(tl.int64)
                    k_row = pg * stride_kp + (p_t % PAGE_SIZE).to(tl.int64) * stride_ks
                    v_row = pg * stride_vp + (p_t % PAGE_SIZE).to(tl.int64) * stride_vs
                else:
                    k_row = p_t.to(tl.int64) * stride_kp
                    v_row = p_t.to(tl.int64) * stride_vp
                t64 = t.to(tl.int64)
                mk = own[:, None] & (offs_d[None, :] < HEAD_DIM)
                x = tl.load(kn_base + t64[:, None] * stride_kns + offs_d[None, :], mask=mk)
                tl.store(k_base + k_row[:, None] + offs_d[None, :], x, mask=mk)
                mv = own[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
                y = tl.load(vn_base + t64[:, None] * stride_vns + offs_dv[None, :], mask=mv)
                tl.store(v_base + v_row[:, None] + offs_dv[None, :], y, mask=mv)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # head (left window edge), middle (no mask) and tail blocks. With NEW the masked head and
    # tail blocks take cached keys from the cache and new ones from KN / VN in one pass (the
    # middle stops before cache_len), the blocks the separate append's launch has.
    for seg in tl.static_range(3):
        # seg 1 (the middle) unmasked, without the append's new keys, through TMA where on;
        # segs 0 and 2 masked (TMA is never taken there: the masked loads come first)
        seg_lo, seg_hi = _part(seg, lo_b, mid0, mid1, hi)
        acc, l_i, m_i = _decode_inner(
            acc, l_i, m_i, q, k_base, v_base, tbl, seg_lo, seg_hi, length, pos, slope,
            max_pages, num_pages, stride_kp, stride_ks, stride_vp, stride_vs,
            offs_n, offs_d, offs_dv, window_left, window_right, scale, softcap,
            kn_base, vn_base, stride_kns, stride_vns, cache_len, seqlen_add,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, PAGE_SIZE, PAGED, PAGE_BLOCK,
            seg != 1, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, IEEE, NEW and seg != 1, OFF32,
            PREFETCH, DUAL, SEL, DESC_K, DESC_V, b * capacity, h * HEAD_DIM, h * HEAD_DIM_V, TMA,
        )

    if PDL and not PDL_EARLY:
        gdc_launch_dependents()  # the next kernel may start launching (it waits for our exit)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (O + part.to(tl.int64) * stride_os + b64 * stride_ob + row_i[:, None] * stride_oi
              + head[:, None] * stride_oh + offs_dv[None, :])
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if SPLIT:
        tl.store(o_ptrs, acc, mask=o_mask)
    else:
        tl.store(o_ptrs, _cast(acc, O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + part.to(tl.int64) * stride_ls + b64 * stride_lb + head * stride_lh + row_i,
             lse, mask=row_ok)
    if FUSED:
        # every thread's partial stores happen before the ticket (barrier, then a release);
        # the last ticket acquires them and merges; it leaves the counter at 0 for the next call
        tl.debug_barrier()
        slot = CNT + bh * tl.num_programs(2) + pid_m
        if BAL:  # programs past the last chunk take no ticket
            ticket = tl.atomic_add(slot, 1, sem="acq_rel", mask=active)
            ticket = tl.where(active, ticket, -2)
        else:
            ticket = tl.atomic_add(slot, 1, sem="acq_rel")
        if ticket == nsplit - 1:
            tl.debug_barrier()
            m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            den = tl.zeros([BLOCK_M], dtype=tl.float32)
            o_all = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            for s_i in range(0, nsplit):
                s64 = tl.cast(first_part + s_i, tl.int64)
                l_s = tl.load(LSE + s64 * stride_ls + b64 * stride_lb + head * stride_lh + row_i,
                              mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                o_s = tl.load(O + s64 * stride_os + b64 * stride_ob + row_i[:, None] * stride_oi
                              + head[:, None] * stride_oh + offs_dv[None, :], mask=o_mask,
                              other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_all, l_s)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                a = tl.exp(m_all - m_use)
                w = tl.exp(l_s - m_use)  # 0 for an empty split
                o_all = o_all * a[:, None] + o_s * w[:, None]
                den = den * a + w
                m_all = m_new
            den_ok = den > 0
            den_safe = tl.where(den_ok, den, 1.0)
            m_fin = tl.where(m_all == float("-inf"), 0.0, m_all)
            o_fin = o_all * (1.0 / den_safe)[:, None]
            l_fin = tl.where(den_ok, m_fin + tl.log(den_safe), float("-inf"))
            tl.store(OP + b64 * stride_ob2 + row_i[:, None] * stride_oi2
                     + head[:, None] * stride_oh2 + offs_dv[None, :],
                     _cast(o_fin, OP.dtype.element_ty), mask=o_mask)
            tl.store(LP + b64 * stride_lb2 + head * stride_lh2 + row_i, l_fin, mask=row_ok)
            tl.atomic_xchg(slot, 0)


@triton.jit
def decode_merge(
    OP, LP, O, LSE, num_splits,
    stride_ops, stride_opb, stride_opi, stride_oph,
    stride_lps, stride_lpb, stride_lph,
    stride_ob, stride_oi, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, heads_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False,
):
    """Merge the splits of one (batch, query head, query row) by their lse. PDL: launched with
    programmatic dependent launch after the decode kernel; waits for it before any read.
    TRIGGER (with PDL): lets the next PDL launch (the next step's decode kernel) start its
    programs now; they still wait for this grid's end before reading anything."""
    if PDL:
        gdc_wait()
        if TRIGGER:
            gdc_launch_dependents()
    pid = tl.program_id(0)
    i = pid % seqlen_q
    h = (pid // seqlen_q) % heads_q
    b = (pid // seqlen_q // heads_q).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LP + offs_s.to(tl.int64) * stride_lps + b * stride_lpb + h * stride_lph + i,
                    mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)  # 0 for empty splits
    den = tl.sum(w, 0)
    o_s = tl.load(
        OP + offs_s[:, None].to(tl.int64) * stride_ops + b * stride_opb + i * stride_opi
        + h * stride_oph + offs_dv[None, :],
        mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
    )
    den_safe = tl.where(den > 0, den, 1.0)
    o = tl.sum(o_s * w[:, None], 0) / den_safe
    lse = tl.where(den > 0, m_use + tl.log(den_safe), float("-inf"))
    tl.store(O + b * stride_ob + i * stride_oi + h * stride_oh + offs_dv, _cast(o, O.dtype.element_ty),
             mask=offs_dv < HEAD_DIM_V)
    tl.store(LSE + b * stride_lb + h * stride_lh + i, lse)


# -- launch -------------------------------------------------------------------------------------


# Configs shrunk after a launch ran out of shared memory (a GPU with less than the table assumes).
_SHRUNK: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(q) -> int:
    if q.is_cuda:
        return sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return 8  # the interpreter: a few splits, so tests exercise the merge


@functools.lru_cache(maxsize=1024)
def plan(batch, seqlen_q, heads_q, heads_kv, head_dim, head_dim_v, capacity, page_size, dtype,
         num_splits, sms, config=None):
    """Host-side plan from shapes only (never device values): (config, block_m, m_blocks,
    num_splits, split_len, page_block)."""
    group = heads_q // heads_kv
    cfg = config or _SHRUNK.get((head_dim, head_dim_v, dtype)) or T.config_for(
        head_dim, head_dim_v, dtype, page_size, capacity)
    rows = group * seqlen_q
    block_m = max(16, min(T.MAX_BLOCK_M, triton.next_power_of_2(max(rows, 1))))
    m_blocks = triton.cdiv(rows, block_m)
    n_blocks = max(1, triton.cdiv(capacity, cfg.block_n))
    if num_splits is None:
        # whole waves: programs <= waves x the programs that fit the GPU at once (a partial last
        # wave leaves SMs idle while its programs run: 320 programs on 132 one-program SMs took
        # 3 rounds for 2.4 rounds of work, the 4k decode of session 5)
        progs = batch * heads_kv * m_blocks
        itemsize = 4 if dtype == "float32" else 2
        slots = sms * T.programs_per_sm(cfg, head_dim, head_dim_v, itemsize)
        want = int(cfg.waves * slots) // max(progs, 1)
        want = min(want, max(1, n_blocks // cfg.min_blocks_per_split), T.MAX_SPLITS)
        num_splits = max(1, want)
    num_splits = max(1, min(int(num_splits), n_blocks))
    blocks_per_split = triton.cdiv(n_blocks, num_splits)
    num_splits = triton.cdiv(n_blocks, blocks_per_split)  # no split left empty by rounding
    split_len = blocks_per_split * cfg.block_n
    page_block = bool(page_size) and page_size % cfg.block_n == 0
    return cfg, block_m, m_blocks, num_splits, split_len, page_block


def splits_for(spec, params) -> int:
    """The number of key splits a call would run (explain); the SM count of device 0 on CUDA."""
    sms = 8
    if spec.device_type == "cuda" and torch.cuda.is_available():
        sms = sm_count(torch.cuda.current_device())
    return plan(spec.batch, spec.seqlen_q, spec.heads_q, spec.heads_kv, spec.head_dim,
                spec.head_dim_v, spec.capacity, params.page_size, spec.dtype,
                params.num_splits, sms)[3]


def kernel_for(spec, params) -> str:
    sms = 8
    if spec.device_type == "cuda" and torch.cuda.is_available():
        sms = sm_count(torch.cuda.current_device())
    cfg, block_m, m_blocks, ns, split_len, page_block = plan(
        spec.batch, spec.seqlen_q, spec.heads_q, spec.heads_kv, spec.head_dim, spec.head_dim_v,
        spec.capacity, params.page_size, spec.dtype, params.num_splits, sms)
    merge = ", lse merge in the last program" if cfg.fused_merge else ", lse merge kernel"
    paging = ""
    if params.page_size:
        paging = ", one page lookup per block" if page_block else ", page lookup per key row"
        if not page_block and cfg.page_select and cfg.block_n % params.page_size == 0:
            paging = (f", {cfg.block_n // params.page_size} page ids per block as scalar "
                      "loads")
    split = f"{split_len} keys per split"
    if cfg.balanced and params.num_splits is None:
        split = (f"length-balanced splits (at least {cfg.min_blocks_per_split * cfg.block_n} "
                 "keys each, from the device lengths)")
        ns = 2  # the merge runs
    extra = ", programmatic dependent launch" if cfg.pdl and spec.device_type == "cuda" else ""
    return (f"triton split-KV decode (block_m {block_m} packing {spec.heads_q // spec.heads_kv} "
            f"heads x {spec.seqlen_q} rows, block_n {cfg.block_n}, {cfg.num_warps} warps, "
            f"{cfg.num_stages} stages, {split}{paging}"
            f"{merge if ns > 1 else ''}{extra})")


def decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params, config=None):
    """-> (out (B, Sq, Hq, Dv) in q's dtype, lse (B, Hq, Sq) float32). `config` overrides the
    tuning table (benchmarks). A launch that runs out of shared memory is retried with fewer
    pipeline stages, then narrower key blocks, and the smaller config is remembered."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if seqlens_k.dtype != torch.int32:
        seqlens_k = seqlens_k.to(torch.int32)
    launch = _launch_for(q, k_cache, v_cache, block_table, alibi_slopes, params, config)
    return _retrying(launch, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, 0, params,
                     config)


def _retrying(launch, q, k_cache, v_cache, seqlens, block_table, alibi_slopes, seqlen_add,
              params, config, new=None):
    k, v = new if new is not None else (None, None)
    while True:
        try:
            return launch(q, k_cache, v_cache, seqlens, block_table, alibi_slopes, seqlen_add,
                          k, v)
        except triton.runtime.errors.OutOfResources:
            if config is not None:
                raise
            d, dv = q.shape[-1], v_cache.shape[-1]
            dtype = str(q.dtype).rsplit(".", 1)[-1]
            cur = _SHRUNK.get((d, dv, dtype)) or T.config_for(d, dv, dtype, 0)
            smaller = T.smaller(cur)
            if smaller is None:
                raise
            _SHRUNK[(d, dv, dtype)] = smaller
            plan.cache_clear()
            _LAUNCHES.clear()
            launch = _launch_for(q, k_cache, v_cache, block_table, alibi_slopes, params, config,
                                 new)


# Launch plans by call signature (shapes, strides, dtype, device, params): a decode loop pays
# the host-side planning once, then (with the fused merge) one launch per step.
_LAUNCHES: dict = {}


def _launch_for(q, k_cache, v_cache, block_table, alibi_slopes, params, config, new=None):
    """The launch of a call signature; `new` = (k, v): the new tokens appended by the same
    launch (the fast path's fused append), their shapes and strides part of the signature."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the triton decode kernel needs a contiguous last "
                         "(head_dim) dimension")
    key = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(),
           v_cache.shape, v_cache.stride(),
           None if block_table is None else (block_table.shape, block_table.stride()),
           None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.stride()),
           params, config,
           None if new is None else tuple((x.shape, x.stride()) for x in new))
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _Launch(q, k_cache, v_cache, block_table, alibi_slopes, params, config, new)
        if len(_LAUNCHES) > 1024:
            _LAUNCHES.clear()
        _LAUNCHES[key] = launch
    return launch


class _FastLaunch:
    """Relaunch one compiled Triton kernel without `JITFunction.run`'s per-call work (binding
    and specializing ~50 arguments, the cache-key lookup): the CompiledKernel's own launcher
    with the tensors of this call and the fixed scalars of the signature. Used only when what
    the compiled kernel was specialized on still holds: every pointer 16-byte aligned (as at
    the first launch), the same current device, and no launch hooks (profilers) installed.
    Anything else goes back through `kernel[grid](...)`."""

    __slots__ = ("run", "function", "meta", "grid", "tail", "device", "stream", "knobs")

    def __init__(self, kernel, grid, tail, device):
        self.run = kernel.run
        self.function = kernel.function
        self.meta = kernel.packed_metadata
        self.grid = grid
        self.tail = tail
        self.device = device
        drv = triton.runtime.driver.active
        self.stream = drv.get_current_stream
        self.knobs = getattr(triton, "knobs", None)

    @staticmethod
    def make(jitfn, kernel, grid, n_tensors, args, kw):
        """From the first launch's CompiledKernel: the launcher takes every parameter of the
        kernel in order (constexprs included, as JITFunction.run passes them)."""
        if kernel is None or _interpreting() or not hasattr(kernel, "packed_metadata"):
            return None
        names = list(getattr(jitfn, "arg_names", None) or [])
        if len(names) < len(args):
            return None
        vals = dict(zip(names, args))
        for n in names[len(args):]:
            if n not in kw:
                return None
            vals[n] = kw[n]
        tail = tuple(vals[n] for n in names[n_tensors:])
        drv = triton.runtime.driver.active
        return _FastLaunch(kernel, grid, tail, drv.get_current_device())

    def hooks_off(self) -> bool:
        k = self.knobs
        if k is None:
            return False
        rt = k.runtime
        return _no_hook(rt.launch_enter_hook) and _no_hook(rt.launch_exit_hook)

    def __call__(self, device, *tensors) -> bool:
        if device != self.device or self.run is None:
            return False
        g = self.grid
        try:
            self.run(g[0], g[1], g[2], self.stream(device), self.function, self.meta, None, None,
                     None, *tensors, *self.tail)
        except (TypeError, ValueError):  # a launcher that takes its arguments otherwise (an
            self.run = None              # untested Triton version): Triton's own launch from now
            return False
        return True


def _direct_launch() -> bool:
    """Relaunch compiled kernels directly (`_FastLaunch`) when FLASHMUX_TRITON_DIRECT_LAUNCH=1.
    Off by default: it follows Triton 3.9's launcher convention and has not yet run on a GPU
    (the H200 has Triton 3.6); Triton's own launch is used until a GPU run confirms it
    (tests/kvcache/test_decode_fastpath_gpu.py)."""
    return not _interpreting() and os.environ.get("FLASHMUX_TRITON_DIRECT_LAUNCH", "0") == "1"


def _no_hook(h) -> bool:
    """None (triton 3.6) or an empty HookChain (3.9)."""
    return h is None or (isinstance(getattr(h, "calls", None), list) and not h.calls)


def _aligned(*tensors) -> bool:
    a = 0
    for t in tensors:
        a |= t.data_ptr()
    return a & 15 == 0


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_key(dev) -> int:
    """The current stream's handle on q's device (what the launch runs on)."""
    if _RAW_STREAM is not None and dev.index is not None:
        return _RAW_STREAM(dev.index)
    return torch.cuda.current_stream(dev).cuda_stream


# Partials and counters kept across calls, all signatures and streams together: a serving loop
# whose batch size changes every step makes a signature per size, and kept buffers must not
# grow without bound (past this, a signature allocates per call and zeroes a fresh counter).
KEEP_BYTES = 256 << 20
_KEPT = [0]


def _pdl_ok(q) -> bool:
    """Programmatic dependent launch: a compiled sm90+ GPU and a triton with GDC."""
    if _interpreting() or not q.is_cuda or gdc_wait is None:
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9


def _tma_ok(q, k_cache, v_cache, paged: bool, cfg) -> bool:
    """The `tma` variant: a contiguous 16-bit cache whose (B * S_max, Hkv * D) views are
    descriptor-legal (last dim contiguous, heads adjacent, rows evenly strided, 16-byte aligned
    rows), on a compiled sm90+ GPU or the interpreter, with a Triton that has descriptors."""
    if not cfg.tma or paged or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not _interpreting() and (not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401 (triton >= 3.4)
    except ImportError:
        return False
    for x in (k_cache, v_cache):
        d = x.shape[-1]
        if d & (d - 1) or d < 16 or x.stride(-1) != 1 or x.stride(-2) != d:
            return False
        if x.stride(0) != x.shape[1] * x.stride(1) or (x.stride(1) * x.element_size()) % 16:
            return False
    return True


def _fits32(k_cache, v_cache, paged, capacity) -> bool:
    """Whether every key-row offset the kernel forms fits in int32: the whole pool of a paged
    cache (every page id is clamped into it), or one sequence's rows of a contiguous one."""
    lim = 2**31 - 1
    if paged:
        return all(sum((n - 1) * st for n, st in zip(c.shape, c.stride())) + 1 <= lim
                   for c in (k_cache, v_cache))
    return all(capacity * c.stride(1) <= lim for c in (k_cache, v_cache))


# Ticket counters for fused-merge launches captured in CUDA graphs: one int32 pool per device,
# zeroed once outside any capture; each captured launch takes its own slice for good (so graphs
# replayed concurrently never share counters), and each replay leaves its slice at 0 again (the
# last program of a group resets it). A zeroed buffer made during capture would put a memset
# node before every captured decode launch (session 8's fused-merge graph timings paid it).
_GRAPH_POOL_INTS = 1 << 18
_GRAPH_POOL: dict = {}  # str(device) -> [tensor, next free offset]


def _graph_pool_ready(dev) -> None:
    """Allocate the device's zeroed counter pool (outside capture only)."""
    key = str(dev)
    if key not in _GRAPH_POOL and not (dev.type == "cuda" and _capturing()):
        _GRAPH_POOL[key] = [torch.zeros(_GRAPH_POOL_INTS, dtype=torch.int32, device=dev), 0]


def _graph_counters(dev, n: int):
    """n zeroed counters of the pool for one captured launch, or None (no pool yet, or used up:
    the caller then zeroes a fresh buffer inside the graph)."""
    pool = _GRAPH_POOL.get(str(dev))
    if pool is None or pool[1] + n > _GRAPH_POOL_INTS:
        return None
    off = pool[1]
    pool[1] += -(-n // 32) * 32  # 128-byte aligned slices
    return pool[0][off: off + n]


class _Launch:
    """Everything about one decode call signature that does not change from step to step."""

    def __init__(self, q, k_cache, v_cache, block_table, alibi_slopes, params, config,
                 new=None):
        b, sq, hq, d = q.shape
        paged = block_table is not None
        self.new = new is not None
        hkv, dv = k_cache.shape[2], v_cache.shape[3]
        page_size = k_cache.shape[1] if paged else 0
        if paged:
            num_pages, max_pages = k_cache.shape[0], block_table.shape[1]
            capacity = max_pages * page_size
        else:
            num_pages, max_pages = 1, 1
            capacity = k_cache.shape[1]
        dtype = str(q.dtype).rsplit(".", 1)[-1]
        cfg, block_m, m_blocks, ns, split_len, page_block = plan(
            b, sq, hq, hkv, d, dv, capacity, page_size, dtype, params.num_splits, _sms(q), config)
        self.paged = paged
        self.split = ns > 1
        self.fused = self.split and cfg.fused_merge
        # length-balanced splits (cfg.balanced): no append in the launch, no forced count
        self.bal = bool(cfg.balanced) and new is None and params.num_splits is None
        self.out_shape = (b, sq, hq, dv)
        self.lse_shape = (b, hq, sq)
        self.n_opart = ns * b * sq * hq * dv
        self.n_ws = self.n_opart + ns * b * hq * sq
        self.opart_shape = (ns, b, sq, hq, dv)
        self.lpart_shape = (ns, b, hq, sq)
        self.n_cnt = b * hkv * m_blocks
        grid = (ns, b * hkv, m_blocks)
        if self.bal:
            # num_splits (kernel argument): programs per KV head the keys are spread over;
            # split_len: the shortest chunk; b more programs for the rounding of chunks
            slots = _sms(q) * T.programs_per_sm(cfg, d, dv, q.element_size())
            ns = max(1, int(cfg.waves * slots) // (hkv * m_blocks))
            split_len = cfg.min_blocks_per_split * cfg.block_n
            nprog = ns + b
            self.split = self.fused = True
            self.n_opart = nprog * sq * hq * dv
            self.n_ws = self.n_opart + nprog * hq * sq
            self.opart_shape = (nprog, sq, hq, dv)
            self.lpart_shape = (nprog, hq, sq)
            so = (sq * hq * dv, 0, hq * dv, dv)  # partials by program: no batch stride
            sl = (hq * sq, 0, sq)
            grid = (nprog, hkv, m_blocks)
        elif self.split:  # contiguous float32 partials
            so = (b * sq * hq * dv, sq * hq * dv, hq * dv, dv)
            sl = (b * hq * sq, hq * sq, sq)
        else:  # straight into out / lse (fresh, contiguous)
            so = (0, sq * hq * dv, hq * dv, dv)
            sl = (0, hq * sq, sq)
        stride_ab = 0
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            stride_ab = alibi_slopes.stride(0)
        if paged:  # (num_pages, page_size, Hkv, D): "page" stride, no batch stride
            skb, skp, skh, sks = 0, k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
            svb, svp, svh, svs = 0, v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)
        else:  # (B, S_max, Hkv, D): rows are sequence positions
            skb, skp, skh, sks = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 0
            svb, svp, svh, svs = v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 0
        wl, wr = params.window_left, params.window_right
        self.pdl = bool(cfg.pdl) and _pdl_ok(q)
        self.grid = grid
        # the scalars after seqlen_add (num_splits and the final out/lse strides of the fused
        # merge) follow it in `tail`
        self.head = (
            q.stride(0), q.stride(1), q.stride(2),
            skb, skp, skh, sks, svb, svp, svh, svs,
            block_table.stride(0) if paged else 0, stride_ab,
            so[0], so[1], so[2], so[3], sl[0], sl[1], sl[2],
            sq, capacity, max_pages, num_pages, split_len,
            0 if wl is None else int(wl), 0 if wr is None else int(wr),
            float(params.scale), float(params.softcap or 1.0),
        )
        kn_s = (0, 0, 0) if new is None else tuple(new[0].stride()[:3])
        vn_s = (0, 0, 0) if new is None else tuple(new[1].stride()[:3])
        self.tail = (ns, sq * hq * dv, hq * dv, dv, hq * sq, sq, *kn_s, *vn_s, b)
        block_dv = max(16, triton.next_power_of_2(dv))
        self.kw = dict(
            GROUP=hq // hkv, HEADS_KV=hkv, HEAD_DIM=d, HEAD_DIM_V=dv,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=block_dv,
            PAGE_SIZE=max(page_size, 1), PAGED=paged, PAGE_BLOCK=page_block,
            HAS_LEFT=wl is not None, HAS_RIGHT=wr is not None, SOFTCAP=bool(params.softcap),
            ALIBI=alibi_slopes is not None, IEEE=q.dtype == torch.float32, SPLIT=self.split,
            FUSED=self.fused, NEW=self.new,
            OFF32=bool(cfg.off32) and _fits32(k_cache, v_cache, paged, capacity),
            PREFETCH=bool(cfg.page_prefetch),
            # L2 prefetch: inline PTX, so compiled GPUs and contiguous caches only
            L2PF=0 if paged or self.bal or not q.is_cuda or _interpreting()
            else int(cfg.l2_prefetch),
            LINE=128 // k_cache.element_size(), DUAL=bool(cfg.page_dual),
            SEL=bool(cfg.page_select),
            PDL=self.pdl, BAL=self.bal, BLOCK_B=max(2, triton.next_power_of_2(b)),
            PDL_EARLY=self.pdl and bool(cfg.pdl_early),
            num_warps=cfg.num_warps if block_m <= 64 else max(cfg.num_warps, 8),
            num_stages=cfg.num_stages,
        )
        self.launch_kw = {"launch_pdl": True} if self.pdl else {}
        self.merge_grid = (b * hq * sq,)
        self.merge_args = (ns, *so, *sl, sq * hq * dv, hq * dv, dv, hq * sq, sq, sq, hq)
        block_s = max(2, triton.next_power_of_2(ns))
        # merge_warps, or more where a warp would hold over 128 partial elements per thread
        # (many splits x a wide Dv)
        mw = cfg.merge_warps
        while mw < 8 and block_s * block_dv > mw * 32 * 128:
            mw *= 2
        self.merge_kw = dict(HEAD_DIM_V=dv, BLOCK_S=block_s,
                             BLOCK_DV=block_dv, num_warps=mw, PDL=self.pdl,
                             TRIGGER=self.pdl and bool(cfg.merge_trigger))
        self.dev = q.device
        # fused merge: per stream, the ticket counters (zeroed once, left at 0 by each launch)
        # and the float32 partials (stream order makes reuse safe); under CUDA-graph capture
        # fresh ones every call (a graph's own memory; its replays zero the counters)
        self.buffers: dict = {}
        self.kept = 0  # bytes of buffers kept (counted against KEEP_BYTES)
        # (kept per stream up to 16 MiB of partials; larger ones, e.g. long chunked prefills,
        # are allocated per call with a zeroed counter)
        self.persist = q.is_cuda and self.n_ws * 4 <= (16 << 20)
        self.fast = {}  # seqlen_add -> _FastLaunch | False
        self.fast_ok = _direct_launch()
        if self.fused and q.is_cuda:
            _graph_pool_ready(q.device)  # so that a later capture needs no memset
        # the `tma` variant: descriptors of this call's caches, remade when the caches change
        self.tma = _tma_ok(q, k_cache, v_cache, paged, cfg)
        self.descs = (None, None, None)  # (data pointers, desc_k, desc_v)
        if self.tma:
            self.fast_ok = False  # a direct relaunch would keep the first call's descriptors
            self.kw["TMA"] = True
            self.tma_block = [cfg.block_n, block_dv]
            self.tma_block_k = [cfg.block_n, max(16, triton.next_power_of_2(d))]

    def _descs(self, k_cache, v_cache) -> dict:
        """DESC_K / DESC_V over the caches' (B * S_max, Hkv * D) views (host objects; the
        launcher encodes them), kept while the caches' storage stays the same; TMA=False for a
        call whose caches are not 16-byte aligned."""
        ptrs = (k_cache.data_ptr(), v_cache.data_ptr())
        if self.descs[0] != ptrs:
            from triton.tools.tensor_descriptor import TensorDescriptor

            if (ptrs[0] | ptrs[1]) & 15:
                return {"TMA": False}
            out = []
            for x, blk in ((k_cache, self.tma_block_k), (v_cache, self.tma_block)):
                b, s, h, d = x.shape
                out.append(TensorDescriptor(x, [b * s, h * d], [x.stride(1), 1], blk))
            self.descs = (ptrs, out[0], out[1])
        return {"DESC_K": self.descs[1], "DESC_V": self.descs[2]}

    def _buffers(self, dev):
        if _capturing():
            return self._new_buffers(dev)
        key = _stream_key(dev)
        bufs = self.buffers.get(key)
        if bufs is None:
            bufs = self._new_buffers(dev)
            size = 4 * (self.n_ws + self.n_cnt)
            if _KEPT[0] + size <= KEEP_BYTES:  # else fresh ones each call (a zeroed counter)
                self.buffers[key] = bufs
                self.kept += size
                _KEPT[0] += size
        return bufs

    def __del__(self):
        try:
            _KEPT[0] -= getattr(self, "kept", 0)
        except Exception:  # interpreter shutdown: module globals already gone
            pass

    def _new_buffers(self, dev):
        ws = torch.empty(self.n_ws, dtype=torch.float32, device=dev)
        cnt = None
        if self.fused:
            # under CUDA-graph capture: counters from the pre-zeroed pool (no memset node in
            # the graph: every replay leaves them at 0 again); else a zeroed fresh buffer
            cnt = _graph_counters(dev, self.n_cnt) if dev.type == "cuda" and _capturing() \
                else None
            if cnt is None:
                cnt = torch.zeros(self.n_cnt, dtype=torch.int32, device=dev)
        return (ws[: self.n_opart].view(self.opart_shape),
                ws[self.n_opart :].view(self.lpart_shape), cnt)

    def __call__(self, q, k_cache, v_cache, seqlens, block_table, alibi_slopes, seqlen_add=0,
                 k=None, v=None):
        dev = q.device
        out = torch.empty(self.out_shape, dtype=q.dtype, device=dev)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=dev)
        if self.split and self.persist:
            # kept per stream (stream order: the next step's decode writes them after this
            # step's merge, in the launch or in the merge kernel, has read them)
            o_dst, l_dst, cnt = self._buffers(dev)
        elif self.split:  # both float32 partials in one allocation
            o_dst, l_dst, cnt = self._new_buffers(dev)
        else:
            o_dst, l_dst, cnt = out, lse, None
        tbl = block_table if self.paged else seqlens  # a dummy pointer when contiguous
        slopes = alibi_slopes if alibi_slopes is not None else lse
        tensors = (q, k_cache, v_cache, seqlens, tbl, slopes, o_dst, l_dst, out, lse,
                   cnt if cnt is not None else seqlens, q if k is None else k,
                   q if v is None else v)
        fast = self.fast.get(seqlen_add) if self.fast_ok else None
        kw = self.kw
        if self.tma:
            kw = {**kw, **self._descs(k_cache, v_cache)}
        if fast and fast.hooks_off() and _aligned(*tensors) and \
                fast(torch.cuda.current_device(), *tensors):
            pass
        else:
            kernel = decode_fwd[self.grid](*tensors, *self.head, seqlen_add, *self.tail,
                                           **kw, **self.launch_kw)
            if self.fast_ok and seqlen_add not in self.fast:
                f = None
                if _aligned(*tensors):
                    f = _FastLaunch.make(decode_fwd, kernel, self.grid, len(tensors),
                                         (*tensors, *self.head, seqlen_add, *self.tail), self.kw)
                self.fast[seqlen_add] = f or False
        if self.split and not self.fused:
            decode_merge[self.merge_grid](o_dst, l_dst, out, lse, *self.merge_args,
                                          **self.merge_kw, **self.launch_kw)
        return out, lse


def runner(spec, params, q, k_cache, v_cache, block_table, alibi_slopes):
    """The fast path's step for one validated call signature (kvcache.py's `decode_runner`):
    the append kernel when the call brings new tokens, then one decode launch that forms the
    lengths cache_seqlens + Snew itself (no separate add)."""
    return _Step(spec, params, q, k_cache, v_cache, block_table, alibi_slopes)


def _fused_append() -> bool:
    """Append the new tokens inside the decode launch (one launch per step);
    FLASHMUX_TRITON_FUSED_APPEND=0: the separate append kernel first (two launches)."""
    return os.environ.get("FLASHMUX_TRITON_FUSED_APPEND", "1") != "0"


class _Step:
    def __init__(self, spec, params, q, k_cache, v_cache, block_table, alibi_slopes):
        self.snew = spec.seqlen_new
        self.page_size = params.page_size
        self.params = params
        self.contig_q = q.stride(-1) == 1
        self.fuse = bool(self.snew) and _fused_append()
        self.launch = None
        self.append = None

    def __call__(self, q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes):
        new = None
        if self.fuse:
            if k.stride(-1) != 1:
                k = k.contiguous()
            if v.stride(-1) != 1:
                v = v.contiguous()
            new = (k, v)
        elif self.snew:
            app = self.append
            if app is None:
                app = self.append = _Append(k_cache, v_cache, k, v, block_table, self.page_size)
            app(k_cache, v_cache, k, v, cache_seqlens, block_table)
        if not self.contig_q:
            q = q.contiguous()
        launch = self.launch
        if launch is not None:
            return launch(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                          self.snew, k, v) if new else \
                launch(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, self.snew)
        launch = _launch_for(q, k_cache, v_cache, block_table, alibi_slopes, self.params, None,
                             new)
        res = _retrying(launch, q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                        self.snew, self.params, None, new)
        self.launch = _launch_for(q, k_cache, v_cache, block_table, alibi_slopes, self.params,
                                  None, new)
        return res


# -- appending new tokens -----------------------------------------------------------------------


@triton.jit(do_not_specialize=["capacity", "max_pages", "num_pages", "snew"])
def kv_append(
    K, V, KN, VN, SEQLENS, TBL,
    stride_kb, stride_kp, stride_kh, stride_ks,
    stride_vb, stride_vp, stride_vh, stride_vs,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
    stride_tb, capacity, max_pages, num_pages, snew,
    HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
):
    """One new token (sequence b, t-th new token): K/V rows at position seqlens[b] + t, clamped
    to the capacity; paged through the (clamped) block table."""
    pid = tl.program_id(0)
    b = pid // snew
    t = pid % snew
    b64 = b.to(tl.int64)
    pos = tl.load(SEQLENS + b) + t
    pos = tl.minimum(tl.maximum(pos, 0), capacity - 1)
    if PAGED:
        page = tl.load(TBL + b64 * stride_tb + tl.minimum(pos // PAGE_SIZE, max_pages - 1))
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        k_row = page * stride_kp + (pos % PAGE_SIZE).to(tl.int64) * stride_ks
        v_row = page * stride_vp + (pos % PAGE_SIZE).to(tl.int64) * stride_vs
    else:
        k_row = b64 * stride_kb + pos.to(tl.int64) * stride_kp
        v_row = b64 * stride_vb + pos.to(tl.int64) * stride_vp
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mk = (offs_h[:, None] < HEADS_KV) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(KN + b64 * stride_knb + t * stride_kns + offs_h[:, None] * stride_knh
                + offs_d[None, :], mask=mk)
    tl.store(K + k_row + offs_h[:, None] * stride_kh + offs_d[None, :], x, mask=mk)
    mv = (offs_h[:, None] < HEADS_KV) & (offs_dv[None, :] < HEAD_DIM_V)
    y = tl.load(VN + b64 * stride_vnb + t * stride_vns + offs_h[:, None] * stride_vnh
                + offs_dv[None, :], mask=mv)
    tl.store(V + v_row + offs_h[:, None] * stride_vh + offs_dv[None, :], y, mask=mv)


def append(k_cache, v_cache, k, v, cache_seqlens, block_table, page_size):
    """Write k, v (B, Snew, Hkv, D/Dv) into the caches in place, one program per new token."""
    b, snew = k.shape[0], k.shape[1]
    if not (b and snew):
        return
    _Append(k_cache, v_cache, k, v, block_table, page_size)(k_cache, v_cache, k, v,
                                                             cache_seqlens, block_table)


class _Append:
    """The append launch of one call signature (the fast path keeps it): static arguments
    computed once, then the compiled kernel relaunched directly (`_FastLaunch`)."""

    def __init__(self, k_cache, v_cache, k, v, block_table, page_size):
        b, snew, hkv, d = k.shape
        dv = v.shape[-1]
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("k_cache, v_cache: the triton append kernel needs a contiguous last "
                             "(head_dim) dimension")
        self.contig = k.stride(-1) == 1 and v.stride(-1) == 1
        if not self.contig:
            k, v = k.contiguous(), v.contiguous()
        self.paged = paged = block_table is not None
        if paged:
            num_pages, max_pages = k_cache.shape[0], block_table.shape[1]
            capacity = max_pages * page_size
            sk = (0, k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
            sv = (0, v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        else:
            num_pages, max_pages = 1, 1
            capacity = k_cache.shape[1]
            sk = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 0)
            sv = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 0)
        self.grid = (b * snew, 1, 1)
        self.args = (*sk, *sv, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                     v.stride(2), block_table.stride(0) if paged else 0, capacity, max_pages,
                     num_pages, snew)
        self.kw = dict(
            HEADS_KV=hkv, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_H=max(2, triton.next_power_of_2(hkv)),
            BLOCK_D=max(2, triton.next_power_of_2(d)), BLOCK_DV=max(2, triton.next_power_of_2(dv)),
            PAGE_SIZE=max(page_size, 1), PAGED=paged, num_warps=4,
        )
        self.fast = None  # None: not tried yet; False: not usable
        self.fast_ok = _direct_launch()

    def __call__(self, k_cache, v_cache, k, v, cache_seqlens, block_table):
        if not self.contig:
            k, v = k.contiguous(), v.contiguous()
        seqlens = cache_seqlens
        if seqlens.dtype != torch.int32:
            seqlens = seqlens.to(torch.int32)
        tensors = (k_cache, v_cache, k, v, seqlens, block_table if self.paged else seqlens)
        fast = self.fast
        if fast and fast.hooks_off() and _aligned(*tensors) and \
                fast(torch.cuda.current_device(), *tensors):
            return
        kernel = kv_append[self.grid](*tensors, *self.args, **self.kw)
        if self.fast is None and self.fast_ok:
            f = None
            if _aligned(*tensors):
                f = _FastLaunch.make(kv_append, kernel, self.grid, len(tensors),
                                     (*tensors, *self.args), self.kw)
            self.fast = f or False
