"""flashmux as an attention implementation of Hugging Face transformers (>= 5.0).

    import flashmux.integrations.transformers        # registers "fmx"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fmx")

Importing this module registers an attention function and a mask function under the name
`NAME` ("fmx") with transformers' public `AttentionInterface` and `AttentionMaskInterface`.
(transformers treats every name that contains "flash" as a FlashAttention package and refuses it
at model load when that package is missing, so the name is not "flashmux".) `register(name)`
registers under another name too.

What the attention function does with what a model passes:
- query/key/value arrive as (B, H, S, D) views of (B, S, H, D) projections; they are transposed
  back (views, no copy) and handed to `flashmux.attention` in its BSHD layout; GQA key/value heads
  go in unrepeated.
- `scaling` -> scale, `softcap` -> softcap, `sliding_window=w` -> window=(w - 1, 0) with causal
  (w - 1 on both sides without), `is_causal` (or the module's) -> causal, `dropout` -> dropout_p
  (its seed drawn on the device from torch's generator, passed as a tensor).
  Masks are aligned bottom-right, which is what decoding with a KV cache (Sq < Sk) needs.
- Padding (a 2-D attention_mask with zeros): the mask function hands the 2-D mask through (None
  when it has no zero, as transformers' FlashAttention path does). On GPUs the attention function
  runs the padded (B, S) rows as one packed batch of 5 segments per row through `cu_seqlens`
  (padding queries with no key, padding keys with no query, the tokens against their keys): no
  gather, no copy, no data-dependent shape, no work on padding. On the CPU it gathers the tokens
  instead (`PADDING` below). Causal layers place the queries at the last key positions (KV
  cache) and their padding query rows come out 0, as with transformers' FlashAttention path;
  non-causal ones (encoders, cross-attention) let every query attend its row's tokens. A mask
  whose ones are not one contiguous run per row (a hole in the middle) is refused.
- Packed batches without padding ("padding-free" training): sequences that restart their
  `position_ids` inside a batch of one row (as DataCollatorWithFlattening makes them; like
  transformers' FlashAttention path, batches of several rows are not searched for packing, which
  would cost a host synchronization per forward), or explicit `cu_seq_lens_q/k` keyword
  arguments, become `cu_seqlens`.
- Decoding: the DynamicCache hands the cached keys/values as (B, Hkv, Sk, D); the call is the same
  with Sq < Sk (bottom-right causal), and padded batches (left padding in `generate`) go through
  the same segments.

- Static caches (`cache_implementation="static"`, `StaticCache`): the layers hand the whole
  preallocated buffer (B, Hkv, max_cache_len, D), of which the first q_offset + Sq slots are
  filled (the new tokens already written). The mask function then returns a (B, 1, 1,
  max_cache_len) boolean "filled slots" row (True for the first q_offset + Sq slots, computed on
  the device from transformers' own query offset; a 4-D tensor, so that `generate` and the
  models pass it through unchanged), and the attention function runs
  `flashmux.attention_with_kvcache(q, keys, values, cache_seqlens=<count of the row>,
  causal=...)` on the buffer's (B, S_max, Hkv, D) views: slots past the filled ones are never
  attended, nothing is copied, and CUDA graphs / torch.compile see fixed shapes. Any (B, 1, 1,
  Sk) boolean mask whose True entries are a prefix of the keys takes this route (for one query
  that is the mask's own meaning). Sliding-window layers keep a buffer of `sliding_window` slots:
  until it wraps the filled-slots row and the window mask apply; once full, transformers asks for
  no mask and every slot (the last `sliding_window` tokens, in ring order, which attention does
  not depend on) is attended. Inference only (no gradient).

Not supported (refused with an error, never silently wrong): attention sinks (`s_aux`), custom
4-D masks, mask overlays from `or_mask_function`/`and_mask_function` (some multimodal models),
static caches with padded batches (the padding keys sit at the start of each row of the buffer,
which attention_with_kvcache cannot skip), and transformers' paged attention (continuous batching runs `"paged|<name>"` implementations with its
own flattened batch, block tables and cache manager: not mapped; the name is refused by
`register`). `output_attentions=True` returns no weights, as with FlashAttention.
Under torch.compile a packed layout is not detected from `position_ids` (that needs the values).
"""

from __future__ import annotations

import warnings
from typing import TypeGuard

import torch

import flashmux
from flashmux import _prepared
from flashmux.compat._align import device_seed

NAME = "fmx"

# Per-forward derived index tensors, keyed by the identity of the tensor they came from (the
# same mask / position_ids object reaches every layer of one forward): computed once per forward.
_derived: dict[tuple, tuple] = {}


def _cached(kind: str, src: torch.Tensor, extra: tuple, fn):
    if torch.compiler.is_compiling():
        return fn()
    key = (kind, id(src)) + extra
    hit = _derived.get(key)
    if hit is not None and hit[0] is src:
        return hit[1]
    value = fn()
    if len(_derived) >= 8:
        _derived.clear()
    _derived[key] = (src, value)  # holding src keeps its id from being reused while cached
    return value


def _padding_segments(mask: torch.Tensor, sq: int, causal: bool):
    """cu_seqlens_q, cu_seqlens_k (int32, length 5B+1) for a (B, Sk) padding mask whose ones are
    one contiguous run per row [start, end). Causal: the queries are the last sq key positions
    (self-attention, with a KV cache when sq < Sk). Not causal: every query attends the run
    (cross-attention, encoders).

    Per row five segments: leading padding queries with no key, leading padding keys with no
    query, the tokens (queries against their keys), trailing padding queries with no key, trailing
    padding keys with no query. Padding costs no attention work and its query rows come out 0
    (as transformers' FlashAttention path leaves them), with no gather and no copy."""
    b, sk = mask.shape
    dev = mask.device
    m = mask.to(torch.bool)
    count = m.sum(dim=1, dtype=torch.int32)
    start = m.to(torch.int32).argmax(dim=1).to(torch.int32)  # 0 when the row has no one
    end = start + count
    cols = torch.arange(sk, device=dev, dtype=torch.int32)
    runs = (cols >= start[:, None]) & (cols < end[:, None])
    _check_runs((runs == m).all())
    zero = torch.zeros_like(start)
    if causal:
        off = sk - sq
        qstart = (start - off).clamp(0, sq)
        qend = (end - off).clamp(0, sq)
    else:
        qstart, qend = zero, zero + sq

    def cu(bounds, n):
        base = torch.arange(b, device=dev, dtype=torch.int32)[:, None] * n
        rows = (base + torch.stack(bounds, dim=1)).reshape(-1)
        return torch.cat([rows, torch.full((1,), b * n, device=dev, dtype=torch.int32)])

    return (cu([zero, qstart, qstart, qend, zero + sq], sq),
            cu([zero, zero, start, end, end], sk))


def _check_runs(ok: torch.Tensor):
    if torch.compiler.is_compiling():
        torch._assert_async(ok, "attention_mask: flashmux needs one contiguous run of ones per row")
    elif not bool(ok):
        raise ValueError(
            "attention_mask: expected one contiguous run of ones per row (left or right "
            "padding), got a row with a hole; flashmux cannot mask single keys inside a sequence "
            "(use attn_implementation='sdpa' for such masks)"
        )


def _unpad(mask: torch.Tensor, sq: int, causal: bool):
    """(index of the kept query rows, index of the kept key rows, cu_q, cu_k) for the same masks
    and the same causal / not causal query placement as `_padding_segments`, to gather the tokens
    into a smaller packed batch (the CPU path)."""
    b, sk = mask.shape
    m = mask.to(torch.bool)
    count = m.sum(dim=1, dtype=torch.int32)
    start = m.to(torch.int32).argmax(dim=1).to(torch.int32)
    cols = torch.arange(sk, device=m.device, dtype=torch.int32)
    _check_runs((((cols >= start[:, None]) & (cols < (start + count)[:, None])) == m).all())
    mq = m[:, sk - sq:] if causal else torch.ones(b, sq, dtype=torch.bool, device=m.device)
    idx_k = m.reshape(-1).nonzero().flatten()
    idx_q = mq.reshape(-1).nonzero().flatten()

    def cu(rows):
        out = torch.zeros(b + 1, dtype=torch.int32, device=m.device)
        out[1:] = rows.sum(dim=1).cumsum(0)
        return out

    return idx_q, idx_k, cu(mq), cu(m)


def _packed_from_position_ids(position_ids: torch.Tensor, b: int, s: int):
    """(cu_seqlens (int32), longest sequence) when position_ids restart inside a row (packed
    sequences), else None. Reads the host once per forward (cached by identity)."""
    pos = position_ids.expand(b, -1) if position_ids.shape[0] != b else position_ids
    starts = torch.ones((b, s), dtype=torch.bool, device=pos.device)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    if not bool(starts[:, 1:].any()):  # one host read per forward (cached by identity)
        return None
    idx = starts.reshape(-1).nonzero().flatten()
    total = torch.full((1,), b * s, dtype=idx.dtype, device=idx.device)
    cu = torch.cat([idx, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# How padded batches reach flashmux: "segments" (5 cu_seqlens segments per row on the padded
# tensors, no copies), "unpad" (gather the tokens, attend, scatter back), or "auto": unpad on the
# CPU, where the reference backend's packed path costs (total rows)^2 and fewer rows win, and
# segments elsewhere, where kernels skip empty segments and the copies are pure overhead.
# NOTES.md next to this file has the measurements.
PADDING = "auto"


def _padding_mode(q) -> str:
    if PADDING not in ("auto", "segments", "unpad"):
        raise ValueError(f"PADDING: expected 'auto', 'segments' or 'unpad', got {PADDING!r}")
    if PADDING != "auto":
        return PADDING
    return "unpad" if q.device.type == "cpu" and not torch.compiler.is_compiling() else "segments"


def _rows(x):
    """(B, S, H, D) -> (B * S, H, D); a view when the rows are evenly spaced."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


_warned_attn_weights = False


def _is_filled_row(m) -> TypeGuard[torch.Tensor]:
    """A (B, 1, 1, Sk) boolean mask: the static-cache "filled slots" row (see the docstring)."""
    return (isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1
            and m.dtype == torch.bool)


def _filled_count(row: torch.Tensor) -> torch.Tensor:
    """(B,) int32 count of a (B, Sk) row that must be a prefix of True (checked on the device;
    one host read per forward in eager mode, an async assert under torch.compile)."""
    n = row.sum(dim=1, dtype=torch.int32)
    cols = torch.arange(row.shape[1], device=row.device, dtype=torch.int32)
    ok = (row == (cols[None, :] < n[:, None])).all()
    if torch.compiler.is_compiling():
        torch._assert_async(ok, "attention_mask: a (B, 1, 1, Sk) mask must be a prefix of keys")
    elif not bool(ok):
        raise ValueError(
            "attention_mask: a (B, 1, 1, Sk) boolean mask (a static cache's filled slots) must "
            "be True on a prefix of the keys in every row; padded batches with a static cache "
            "are not supported by flashmux's transformers integration (the padding keys sit "
            "inside the cache buffer): use the default dynamic cache, or batches without padding"
        )
    return n


def _static_attention(q, k, v, mask: torch.Tensor, opts, sliding_window):
    """Attention over a static cache buffer: q (B, Sq, Hq, D), k/v (B, S_max, Hkv, D) views,
    mask the (B, 1, 1, S_max) filled-slots row."""
    if opts["dropout_p"]:
        raise ValueError("dropout: a static KV cache is for inference; call model.eval()")
    if q.requires_grad or k.requires_grad or v.requires_grad:
        raise ValueError("cache: a static KV cache is for inference (attention_with_kvcache takes "
                         "no gradient); run generation under torch.no_grad()")
    if mask.shape[0] not in (1, q.shape[0]) or mask.shape[3] != k.shape[1]:
        raise ValueError(f"attention_mask: expected a filled-slots row of shape ({q.shape[0]}, 1, "
                         f"1, {k.shape[1]}), got {tuple(mask.shape)}")
    row = mask[:, 0, 0, :].expand(q.shape[0], -1)
    seqlens = _cached("filled", mask, (q.shape[0],), lambda: _filled_count(row))
    return flashmux.attention_with_kvcache(
        q, k, v, cache_seqlens=seqlens, causal=opts["causal"], scale=opts["scale"],
        window=opts["window"], softcap=opts["softcap"],
    )



def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, Sq, D), key/value
    (B, Hkv, Sk, D/Dv), attention_mask from `attention_mask` below. Returns ((B, Sq, Hq, Dv), None)."""
    global _warned_attn_weights
    if s_aux is not None:
        raise ValueError(
            "s_aux: flashmux does not support attention sinks yet; use attn_implementation='sdpa' "
            "or 'eager' for this model"
        )
    if kwargs.get("output_attentions") and not _warned_attn_weights:
        _warned_attn_weights = True
        warnings.warn("flashmux never materializes attention weights: output_attentions gives None",
                      stacklevel=2)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal)
    window = None
    if sliding_window is not None:
        w = int(sliding_window) - 1
        window = (w, 0 if causal else w)
    scale = None if scaling is None else float(scaling)
    softcap = float(softcap) if softcap else None
    dropout_p = float(dropout or 0.0)
    position_ids = kwargs.get("position_ids")
    b, hq, sq = query.shape[0], query.shape[1], query.shape[2]
    sk = key.shape[2]
    cu_given = kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None
    packed = None
    # packing is looked for in a batch of one row only, as transformers' FlashAttention path does
    # (DataCollatorWithFlattening makes one row): the check reads the device once per forward,
    # and a padded-free batch of several rows pays no synchronization (H200: 3-5% of the d64
    # model step)
    if (attention_mask is None and not cu_given and position_ids is not None and b == 1
            and sq == sk and sq > 1 and not torch.compiler.is_compiling()):
        hit = _derived.get(("pos", id(position_ids), b, sq))  # every layer after the first
        if hit is not None and hit[0] is position_ids:
            packed = hit[1]
        else:
            packed = _cached("pos", position_ids, (b, sq),
                             lambda: _packed_from_position_ids(position_ids, b, sq))
    if attention_mask is None and not dropout_p and packed is None and not cu_given:
        # the common case (no padding, no packing, no dropout): flashmux's prepared call for
        # the (B, H, S, D) views as they are (no transposes on a repeated signature)
        return _prepared.attention_bhsd(query, key, value, causal, scale, window, softcap), None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    opts = dict(causal=causal, scale=scale, window=window, softcap=softcap, dropout_p=dropout_p)
    if dropout_p:
        # training dropout: a seed tensor drawn on the device (no host read, no graph break)
        opts.update(device_seed(q, dropout_p))

    if _is_filled_row(attention_mask):
        return _static_attention(q, k, v, attention_mask, opts, sliding_window), None

    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(getattr(attention_mask, "shape", ()))
            raise ValueError(
                f"attention_mask: expected the (B, kv_length) padding mask that flashmux's mask "
                f"function makes, got {type(attention_mask).__name__} of shape {shape} (a custom "
                f"4-D mask?); flashmux takes padding masks only: use attn_implementation='sdpa' "
                f"for arbitrary masks"
            )
        if attention_mask.shape[1] < sk:
            raise ValueError(
                f"attention_mask: expected at least {sk} columns (the keys), got "
                f"{attention_mask.shape[1]}; static caches are not supported by flashmux's "
                f"transformers integration yet (use the default dynamic cache)"
            )
        mask = attention_mask[:, -sk:] if attention_mask.shape[1] > sk else attention_mask
        if _padding_mode(q) == "unpad":
            idx_q, idx_k, cu_q, cu_k = _cached("unpad", attention_mask, (sq, sk, causal),
                                               lambda: _unpad(mask, sq, causal))
            out = flashmux.attention(_rows(q).index_select(0, idx_q),
                                     _rows(k).index_select(0, idx_k),
                                     _rows(v).index_select(0, idx_k),
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                                     max_seqlen_k=sk, **opts)
            full = out.new_zeros((b * sq, hq, out.shape[-1]))
            return full.index_copy(0, idx_q, out).view(b, sq, hq, out.shape[-1]), None
        cu_q, cu_k = _cached("pad", attention_mask, (sq, sk, causal),
                             lambda: _padding_segments(mask, sq, causal))
        # sq / sk bound every segment: with the hints flashmux reads no offsets on the host
        out = flashmux.attention(_rows(q), _rows(k), _rows(v), cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=sq, max_seqlen_k=sk, **opts)
        return out.view(b, sq, hq, out.shape[-1]), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        out = flashmux.attention(
            _rows(q), _rows(k), _rows(v),
            cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
            max_seqlen_q=_int_or_none(kwargs.get("max_length_q")),
            max_seqlen_k=_int_or_none(kwargs.get("max_length_k")), **opts,
        )
        return out.view(b, sq, hq, out.shape[-1]), None

    if packed is not None:
        cu, longest = packed
        out = flashmux.attention(_rows(q), _rows(k), _rows(v), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=longest, max_seqlen_k=longest, **opts)
        return out.view(b, sq, hq, out.shape[-1]), None

    return flashmux.attention(q, k, v, **opts), None


def _int_or_none(x):
    if x is None:
        return None
    return int(x)


def attention_mask(
    batch_size: int | None = None,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' mask-function signature (AttentionMaskInterface). Returns the 2-D (B,
    kv_length) boolean padding mask for `attention_forward`, or None when nothing is padded.
    Causal and sliding-window masking is done by the kernel from the attention call's arguments."""
    if kwargs.get("use_vmap"):
        # transformers sets use_vmap exactly when a model overlays or_mask_function /
        # and_mask_function (e.g. bidirectional image tokens): a mask flashmux cannot express.
        raise ValueError(
            "mask_function: this model overlays a custom mask function on the causal mask, which "
            "flashmux's transformers integration cannot express yet; use attn_implementation="
            "'sdpa' for it"
        )
    if "allow_is_bidirectional_skip" not in kwargs and _static_cache(q_length, kv_length,
                                                                     q_offset):
        # The layers hand the whole buffer: tell the attention function which slots are filled
        # (the past tokens plus this forward's, written before attention runs), as a 4-D row.
        if kv_length is None or q_length is None:
            raise ValueError("cache: a static cache's mask needs q_length and kv_length, got "
                             f"{q_length!r} and {kv_length!r}")
        dev = kwargs.get("device")
        if isinstance(q_offset, torch.Tensor):
            dev = q_offset.device
        elif attention_mask is not None:
            dev = attention_mask.device
        cols = torch.arange(kv_length, device=dev)
        row = (cols < q_offset + q_length)[None, :].expand(batch_size or 1, -1)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask: expected a 2-D padding mask with a static "
                                 f"cache, got shape {tuple(attention_mask.shape)}")
            pad = attention_mask.to(device=dev, dtype=torch.bool)[:, :kv_length]
            if pad.shape[1] < kv_length:  # slots past the mask: not filled yet
                pad = torch.nn.functional.pad(pad, (0, kv_length - pad.shape[1]), value=False)
            row = row & pad
        return row[:, None, None, :]
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # the attention function refuses it with a sentence
    if kv_length is not None and attention_mask.shape[1] > kv_length:
        attention_mask = attention_mask[:, -kv_length:]
    attention_mask = attention_mask.to(torch.bool)
    if (not torch.compiler.is_compiling() and attention_mask.shape[1] == kv_length
            and bool(attention_mask.all())):
        return None  # one host read per forward, as transformers' FlashAttention mask does
    return attention_mask


def _static_cache(q_length, kv_length, q_offset) -> bool:
    """A causal mask sized for a preallocated cache: transformers >= 5.2x passes the query offset
    as a tensor for static cache layers, and a key length beyond the tokens seen so far. (Sliding
    dynamic layers have fewer keys than that, which is fine: masks align bottom-right.)"""
    if isinstance(q_offset, torch.Tensor):
        return True
    if isinstance(q_offset, int) and isinstance(q_length, int) and isinstance(kv_length, int):
        return kv_length > q_offset + q_length
    return False


def register(name: str = NAME) -> str:
    """Register flashmux's attention and mask functions with transformers under `name` (default
    "fmx"); returns the name to pass as `attn_implementation`. Idempotent."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    for word in ("flash", "sdpa", "flex", "paged", "eager", "/"):
        if word in name:
            raise ValueError(
                f"name: expected a name without {word!r} (transformers gives names containing it "
                f"special treatment), got {name!r}"
            )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


register()

__all__ = ["NAME", "attention_forward", "attention_mask", "register"]
