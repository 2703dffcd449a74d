"""flashmux inside Hugging Face transformers models (attn_implementation="fmx") against the
models' own eager attention on the same random weights: tiny Llama, Mistral (sliding window),
Gemma2 (softcap, alternating sliding layers) and Qwen2 (a sliding layer) built from configs,
nothing downloaded. CPU, float32, the reference backend."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinymodels import VOCAB, model_pair  # noqa: E402

import flashmux  # noqa: E402
from flashmux import _prepared  # noqa: E402
from flashmux.integrations import transformers as fmx_tf  # noqa: E402

SEQ = 12


def _pair(family: str):
    """(eager model, fmx model) with the same weights, in eval mode."""
    return model_pair(family, "eager", 1234)


def _ids(batch=2, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def _mask(kind: str, batch=2, seq=SEQ):
    m = torch.ones(batch, seq, dtype=torch.long)
    if kind == "left":
        m[0, :5] = 0
        m[1, :1] = 0
    elif kind == "right":
        m[0, 7:] = 0
        m[1, 3:] = 0
    return m


def _close(a, b, tol=2e-4):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=0, atol=tol * scale)


@pytest.fixture
def calls(monkeypatch):
    """Counts flashmux.attention calls, so that a test knows flashmux ran."""
    seen = []
    real = flashmux.attention

    def spy(q, k, v, **kw):
        seen.append((q, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(flashmux, "attention", spy)
    # the common case (no mask, packing or dropout) takes flashmux's prepared route for the
    # (B, H, S, D) views: recorded as the flashmux.attention call it stands for
    real_bhsd = _prepared.attention_bhsd

    def spy_bhsd(query, key, value, causal, scale, window, softcap):
        seen.append((query.transpose(1, 2), dict(causal=causal, scale=scale, window=window,
                                                 softcap=softcap)))
        return real_bhsd(query, key, value, causal, scale, window, softcap)

    monkeypatch.setattr(_prepared, "attention_bhsd", spy_bhsd)
    return seen


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_eager(family, padding, calls):
    ref, fmx = _pair(family)
    ids, mask = _ids(), _mask(padding)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = fmx(ids, attention_mask=mask).logits
    assert len(calls) == 2  # one call per layer
    keep = mask.bool()
    _close(got[keep], want[keep])
    if padding != "none":
        assert calls[0][1].get("cu_seqlens_q") is not None  # padding went in as segments


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_segments_padding_path(family, monkeypatch, calls):
    """The GPU's padding path (5 cu_seqlens segments per row, no copies) on the CPU: padded
    logits and a left-padded greedy generate, against eager."""
    monkeypatch.setattr(fmx_tf, "PADDING", "segments")
    ref, fmx = _pair(family)
    ids = _ids(seed=11)
    for padding in ("left", "right"):
        mask = _mask(padding)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = fmx(ids, attention_mask=mask).logits
        keep = mask.bool()
        _close(got[keep], want[keep])
        assert len(calls[-1][1]["cu_seqlens_q"]) == 5 * 2 + 1
    mask = _mask("left")
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fmx.generate(ids, **kw), ref.generate(ids, **kw))


def test_sliding_window_and_softcap_reach_flashmux(calls):
    _, fmx = _pair("gemma2")
    with torch.no_grad():
        fmx(_ids())
    kws = [kw for _, kw in calls]
    assert [kw["window"] for kw in kws] == [(3, 0), None]  # gemma2 alternates sliding, full
    assert all(kw["softcap"] == 1.5 and kw["causal"] for kw in kws)
    assert kws[0]["scale"] == pytest.approx(16**-0.5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_training_step_gradients(family):
    ref, fmx = _pair(family)
    # right padding, as for training: with left padding the last padding position would predict
    # the first token, and padding rows are not defined alike by eager and FlashAttention
    ids, mask = _ids(seed=3), _mask("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (ref, fmx):
        model.train()
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.eval()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        _close(grads[1][name], grads[0][name], tol=5e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generate_is_token_identical(family):
    ref, fmx = _pair(family)
    ids, mask = _ids(seq=6, seed=5), _mask("none", seq=6)
    mask[0, :2] = 0  # left padding, as generate wants it
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kw)
    got = fmx.generate(ids, **kw)
    assert got.shape == (2, 14)  # past mistral's window of 4: decoding slides too
    assert torch.equal(got, want)


def test_packed_position_ids_match_separate_sequences(calls):
    _, fmx = _pair("llama")
    a, b = _ids(1, 5, seed=7), _ids(1, 7, seed=8)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = fmx(packed, position_ids=pos).logits
        want = torch.cat([fmx(a).logits, fmx(b).logits], dim=1)
    assert calls[0][1]["cu_seqlens_q"].tolist() == [0, 5, 12]
    _close(got, want)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.no_grad():
        got2 = fmx(packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=7, max_length_k=7).logits
    _close(got2, want)


def test_compiled_forward_fullgraph():
    ref, fmx = _pair("llama")
    ids = _ids(2, 8, seed=9)
    mask = _mask("left", seq=8)
    torch._dynamo.reset()
    compiled = torch.compile(fmx, fullgraph=True, backend="eager")
    with torch.no_grad():
        _close(compiled(ids).logits, ref(ids).logits)
        # padded: the segments path, whose offsets are computed and used inside the graph
        got = compiled(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    _close(got[keep], want[keep])


def test_views_go_in_without_copies(calls):
    """(B, H, S, D) transposes of (B, S, H, D) projections reach flashmux as the same memory."""
    q, k, v = (torch.randn(2, 6, h, 8).transpose(1, 2) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal = True
    out, weights = fmx_tf.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 4, 8)
    assert calls[0][0].data_ptr() == q.data_ptr() and calls[0][0].shape == (2, 6, 4, 8)
    want, _ = flashmux.reference.reference_forward(
        *(x.transpose(1, 2).numpy() for x in (q, k, v)), causal=True, scale=0.3)
    _close(out, torch.from_numpy(want).float())


@pytest.mark.parametrize("mode", ["segments", "unpad"])
@pytest.mark.parametrize("causal,sq", [(False, 3), (False, 9), (True, 3), (True, 9)])
def test_padding_paths_against_sdpa(mode, causal, sq, monkeypatch):
    """The attention function alone on a (B, Sk) padding mask: not causal, every query attends
    the row's tokens (cross-attention, Sq != Sk); causal, the queries are the last Sq key
    positions (a KV cache). Against SDPA with the equivalent boolean mask, on the rows that have
    a token to see."""
    monkeypatch.setattr(fmx_tf, "PADDING", mode)
    sk = 9
    q, k, v = _t_bhsd(2, 4, sq, seed=1), _t_bhsd(2, 2, sk, seed=2), _t_bhsd(2, 2, sk, seed=3)
    mask = torch.ones(2, sk, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 6:] = False  # right padding
    module = torch.nn.Module()
    module.is_causal = causal
    got, _ = fmx_tf.attention_forward(module, q, k, v, mask, scaling=0.4)
    allowed = mask[:, None, None, :].expand(2, 1, sq, sk)
    if causal:
        i = torch.arange(sq)[:, None] + sk - sq
        allowed = allowed & (torch.arange(sk)[None, :] <= i)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=0.4, enable_gqa=True).transpose(1, 2)
    rows = allowed[:, 0].any(-1)  # (B, Sq): rows that see a token
    if causal:
        rows = rows & mask[:, sk - sq:]  # padding query rows are unspecified
    _close(got[rows], want[rows])


def _t_bhsd(b, h, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, h, 8, generator=g).transpose(1, 2)  # (B, H, S, D) view


def test_refusals():
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 4, 8)
    hole = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="contiguous run"):
        fmx_tf.attention_forward(module, q, q, q, hole)
    with pytest.raises(ValueError, match="attention_mask"):
        fmx_tf.attention_forward(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="s_aux"):
        fmx_tf.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="custom mask"):
        fmx_tf.attention_mask(batch_size=1, kv_length=4, use_vmap=True)
    with pytest.raises(ValueError, match="flash"):
        fmx_tf.register("flashmux")
    assert fmx_tf.attention_mask(attention_mask=torch.ones(2, 4, dtype=torch.long),
                                 kv_length=4) is None
    # static caches (supported, and their refusals): test_transformers_static_cache.py


def test_packing_is_searched_in_one_row_only(calls, monkeypatch):
    """Like transformers' FlashAttention path: position_ids restarting inside a batch of several
    rows are not read (no host synchronization per forward); one row is."""
    _, fmx = _pair("llama")
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    reads = []
    real = fmx_tf._packed_from_position_ids
    monkeypatch.setattr(fmx_tf, "_packed_from_position_ids",
                        lambda *a: reads.append(a) or real(*a))
    with torch.no_grad():
        fmx(_ids(2, 12), position_ids=pos.expand(2, -1), use_cache=False)
    assert not reads and all(kw.get("cu_seqlens_q") is None for _, kw in calls)
    with torch.no_grad():
        fmx(_ids(1, 12), position_ids=pos, use_cache=False)
    assert len(reads) == 1 and calls[-1][1]["cu_seqlens_q"].tolist() == [0, 5, 12]
