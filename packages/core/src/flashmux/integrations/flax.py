"""flashmux as the `attention_fn` of Flax's attention modules (NNX and Linen).

    from flashmux.integrations import flax as fmx_flax
    mha = nnx.MultiHeadAttention(num_heads=8, in_features=512, attention_fn=fmx_flax.attention_fn,
                                 decode=False, rngs=nnx.Rngs(0))
    y = mha(x, is_causal=True)                                     # causal
    y = mha(x, mask=valid[:, None, None, :], is_causal=True)       # key padding (B, 1, 1, S)
    y = mha(x, mask=fmx_flax.segments(segment_ids), is_causal=True)  # packed documents

    # Linen's MultiHeadDotProductAttention has no is_causal: bake it into the function
    attn = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=fmx_flax.make_attention_fn(causal=True))

Works under jax.jit / nnx.jit and grad: padding and segments become the `cu_seqlens` of a packed
batch, computed on the device (no copies, no data-dependent shapes).

What the mask may be (a dense (B, H, Sq, Sk) mask cannot be checked under jit, so only these):
- None, with `is_causal` (NNX) or `make_attention_fn(causal=True)`. `is_causal` is aligned at the
  top-left corner, as Flax's own attention (jax.nn.dot_product_attention) does.
- A key mask broadcast over heads and queries, shape (B, 1, 1, Sk) or (1, 1, 1, Sk), whose True
  entries are one contiguous run per row (right or left padding; the decode cache's
  `arange(max_length) <= index` mask that NNX/Linen build in decode mode is one). Without a
  causal mask every query attends the run; with one (Sq == Sk) the run's own queries attend it
  causally and padding query rows are unspecified (finite). A row whose mask is not one run
  comes out NaN (the check runs on the device, so it cannot raise under jit).
- `segments(segment_ids, max_segments=None)`: (B, S) ints, tokens attend tokens of their own
  contiguous run of equal ids (documents packed in a row); with causal, causally inside each
  run. A bound on the runs per row keeps the packed call small (more runs than the bound: NaN).

Attention dropout (`dropout_rate > 0`, not deterministic) draws its seed from the PRNG key Flax
hands in (`dropout_rng`, from the module's `rngs` / the 'dropout' stream): 32 random bits of the
key become flashmux's `dropout_seed` as a traced int32 scalar, so under jit a new key compiles
nothing, the same key gives the same output, and the backward redraws the forward's mask. The
mask is flashmux's counter-based one, drawn per (batch, head, query, key): Flax's default
`broadcast_dropout=True` (one mask shared by the batch and heads) is not reproduced, and the mask
bits differ from Flax's own `random.bernoulli` draw (same keep probability, same 1/(1 - rate)
scaling).

Refused with a ValueError: other dense masks (for causal use is_causal / causal=True), `bias`,
sown attention weights (`sow_weights=True`), and dropout without a `dropout_rng`.
A query row that sees no key gives 0 (Flax's own gives the mean of the values).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import flashmux
from flashmux.compat._align import top_left


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Segment ids (B, S) int: see `segments`. A pytree, so it passes through jit."""

    ids: jax.Array
    max_segments: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def segments(segment_ids, max_segments: int | None = None) -> Segments:
    """Mask for packed documents: token i attends token j of the same row when both lie in one
    contiguous run of equal ids. Pass as `mask=` to the attention module.

    max_segments: an upper bound on the runs per row (default S). The packed call has
    B * max_segments segments, most of them empty: a tight bound keeps the kernels' grids small.
    If a batch has more runs than B * max_segments in total, the output is NaN (the count is only
    known on the device)."""
    ids = jnp.asarray(segment_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer array (B, S), got {ids.dtype} "
                         f"{ids.shape}")
    if max_segments is not None and (isinstance(max_segments, bool)
                                     or not isinstance(max_segments, int) or max_segments < 1):
        raise ValueError(f"max_segments: expected an int >= 1 or None, got {max_segments!r}")
    return Segments(ids, max_segments)


def _segment_cu(ids, max_segments):
    """cu_seqlens of the runs of equal ids (B * max_segments + 1 entries, empty segments at the
    end) and whether every run got a segment."""
    b, s = ids.shape
    starts = jnp.ones((b, s), bool).at[:, 1:].set(ids[:, 1:] != ids[:, :-1]).reshape(-1)
    seg = jnp.cumsum(starts.astype(jnp.int32))  # 1-based segment of each row
    n = b * s
    nseg = b * min(s, max_segments or s)
    # segment i starts at the first row whose running count reaches i + 1 (n when none does)
    cu = jnp.searchsorted(seg, jnp.arange(1, nseg + 1, dtype=jnp.int32)).astype(jnp.int32)
    return jnp.concatenate([cu, jnp.array([n], jnp.int32)]), seg[-1] <= nseg


def _run_cu(m, sq, causal):
    """cu_seqlens for a (B, Sk) key mask of one run per row; and a per-row `one run` flag."""
    b, sk = m.shape
    count = m.sum(axis=1, dtype=jnp.int32)
    start = jnp.argmax(m, axis=1).astype(jnp.int32)
    end = start + count
    cols = jnp.arange(sk, dtype=jnp.int32)
    ok = jnp.all(((cols >= start[:, None]) & (cols < end[:, None])) == m, axis=1)
    base_k = jnp.arange(b, dtype=jnp.int32) * sk
    cu_k = jnp.stack([base_k, base_k + start, base_k + end], axis=1).reshape(-1)
    if causal:  # Sq == Sk: the run's own queries
        cu_q = cu_k
    else:  # every query of the row attends the run
        base_q = jnp.arange(b, dtype=jnp.int32) * sq
        cu_q = jnp.stack([base_q, base_q, base_q + sq], axis=1).reshape(-1)
    tail = lambda n: jnp.array([n], jnp.int32)
    return jnp.concatenate([cu_q, tail(b * sq)]), jnp.concatenate([cu_k, tail(b * sk)]), ok


def _attend(query, key, value, bias, mask, dropout_rng, dropout_rate, deterministic, dtype,
            module, is_causal, opts):
    if module is not None:
        raise ValueError("sow_weights: flashmux never materializes attention weights; call the "
                         "module with sow_weights=False")
    drop = {}
    if dropout_rate and not deterministic:
        drop = {"dropout_p": float(dropout_rate), "dropout_seed": dropout_seed(dropout_rng)}
    if bias is not None:
        raise ValueError("bias: additive biases are not supported by flashmux; pass None")
    if dtype is not None:
        query, key, value = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
    batch_shape = query.shape[:-3]
    if len(batch_shape) != 1:
        if mask is not None and len(batch_shape) > 1:
            raise ValueError(f"query: with a mask, expected one batch axis (B, S, H, D), got "
                             f"shape {query.shape}")
        flat = lambda x: x.reshape((math.prod(x.shape[:-3]),) + x.shape[-3:])
        out = _attend(flat(query), flat(key), flat(value), None, mask, dropout_rng,
                      dropout_rate, deterministic, None, None, is_causal, opts)
        return out.reshape(batch_shape + out.shape[-3:])
    causal = bool(is_causal) or opts.get("causal", False)
    b, sq, hq, _ = query.shape
    sk = key.shape[1]
    kw = {k: v for k, v in opts.items() if k != "causal"} | drop

    if mask is None:
        mapped = top_left(causal, None, None, sq, sk)
        if mapped is None:
            raise ValueError(f"is_causal: top-left causal attention with fewer queries than keys "
                             f"({sq} < {sk}) needs a block mask; flashmux's Flax attention_fn "
                             f"cannot build one under jit")
        if mapped[1] is not None and kw.get("window") is not None:
            raise ValueError("window: cannot combine with causal attention when Sq != Sk here")
        kw["causal"] = mapped[0]
        if mapped[1] is not None:
            kw["window"] = mapped[1]
        return flashmux.attention(query, key, value, **kw)

    if isinstance(mask, Segments):
        if sq != sk or mask.ids.shape != (b, sq):
            raise ValueError(f"mask: segments expected ids of shape ({b}, {sq}) and as many "
                             f"queries as keys, got ids {mask.ids.shape} with Sq={sq}, Sk={sk}")
        cu, ok = _segment_cu(mask.ids, mask.max_segments)
        out = flashmux.attention(query.reshape(b * sq, hq, -1), _rows(key), _rows(value),
                                 cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=sq,
                                 max_seqlen_k=sk, causal=causal, **kw)
        return jnp.where(ok, out.reshape(b, sq, hq, -1), jnp.asarray(jnp.nan, out.dtype))

    m = jnp.asarray(mask)
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, b):
        raise ValueError(
            f"mask: expected None, fmx_flax.segments(ids), or a key mask of shape ({b}, 1, 1, "
            f"{sk}) (padding, decode caches), got shape {m.shape}; for causal attention pass "
            f"is_causal=True (NNX) or use make_attention_fn(causal=True) instead of a dense mask"
        )
    if causal and sq != sk:
        raise ValueError(f"mask: a key mask together with causal attention needs Sq == Sk, got "
                         f"Sq={sq}, Sk={sk}")
    m = jnp.broadcast_to(m[:, 0, 0, :].astype(bool), (b, sk))
    cu_q, cu_k, ok = _run_cu(m, sq, causal)
    out = flashmux.attention(query.reshape(b * sq, hq, -1), _rows(key), _rows(value),
                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                             max_seqlen_k=sk, causal=causal, **kw)
    out = out.reshape(b, sq, hq, -1)
    return jnp.where(ok[:, None, None, None], out, jnp.asarray(jnp.nan, out.dtype))


def dropout_seed(dropout_rng):
    """flashmux's dropout seed from a Flax/JAX PRNG key (new-style typed or raw uint32): 32
    random bits of the key as an int32 scalar, traced under jit (nothing compiles per key)."""
    if dropout_rng is None:
        raise ValueError("dropout_rng: expected a PRNG key when dropout_rate > 0 and not "
                         "deterministic (the module's rngs / 'dropout' stream), got None")
    bits = jax.random.bits(dropout_rng, (), jnp.uint32)
    return jax.lax.bitcast_convert_type(bits, jnp.int32)


def _rows(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def make_attention_fn(*, causal=False, scale=None, window=None, softcap=None, backend=None):
    """An `attention_fn` for nnx.MultiHeadAttention / linen.MultiHeadDotProductAttention with
    fixed flashmux options: causal (for Linen, which has no is_causal), scale (default
    1/sqrt(head_dim), as Flax), window=(left, right) and softcap as in `flashmux.attention`,
    backend to force one."""
    opts = {"causal": bool(causal), "scale": scale, "window": window, "softcap": softcap,
            "backend": backend}
    opts = {k: v for k, v in opts.items() if v is not None}

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, is_causal=False, **kwargs):
        return _attend(query, key, value, bias, mask, dropout_rng, dropout_rate, deterministic,
                       dtype, module, is_causal, opts)

    # no functools.wraps: Linen filters the keywords it passes by this function's signature
    attention_fn.__doc__ = (
        "flashmux attention with Flax's attention_fn signature: query (B, Sq, Hq, D), key/value "
        "(B, Sk, Hkv, D/Dv) -> (B, Sq, Hq, Dv). See flashmux.integrations.flax.")
    return attention_fn


attention_fn = make_attention_fn()

__all__ = ["Segments", "attention_fn", "dropout_seed", "make_attention_fn", "segments"]
