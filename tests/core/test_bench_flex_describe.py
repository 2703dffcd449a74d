"""The masks sweep's FlexAttention line says what it compiles (issue 15, session 10): dynamic or
static shapes, IS_DIVISIBLE, and its BlockMask's full/partial tiles, which must match flashmux's
own BlockMask for the same mask. No compile runs here (torch.compile is lazy; the BlockMask is
built on the CPU)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.nn.attention.flex_attention")

from flashmux.bench.impls import Context, FlexImpl  # noqa: E402
from flashmux.bench.maskbench import BLOCK, mask_fn_for  # noqa: E402
from flashmux.bench.shapes import Point  # noqa: E402
from flashmux.blockmask import create_block_mask  # noqa: E402


def _ctx():
    return Context(device="cpu", capability=None, quick=True, fws={})


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    # what is tested is the description; creating the torch.compile wrapper only costs time
    import flashmux.bench.impls as I

    monkeypatch.setattr(I, "_compiled_flex", lambda dynamic: None)


@pytest.mark.parametrize("env, dynamic", [(None, False), ("1", True), ("0", False)])
def test_flex_masks_line_states_its_compile(monkeypatch, env, dynamic):
    if env is None:
        monkeypatch.delenv("FLASHMUX_BENCH_FLEX_DYNAMIC", raising=False)
    else:
        monkeypatch.setenv("FLASHMUX_BENCH_FLEX_DYNAMIC", env)
    s = 1024
    p = Point("masks", 1, s, s, 2, 2, 32, False, "fp32", x=s, mask="doc:3")
    impl = FlexImpl()
    impl.build(p, _ctx())
    d = impl.describe_choice(p, None, None, None, _ctx())
    assert f"dynamic={dynamic}" in d and f"IS_DIVISIBLE={not dynamic}" in d
    c = create_block_mask(mask_fn_for(p.mask, s, s), None, None, s, s, block_size=BLOCK).counts()
    assert f"{c['full']} full + {c['partial']} partial" in d, (d, c)


def test_flex_dynamic_env_rejects_junk(monkeypatch):
    monkeypatch.setenv("FLASHMUX_BENCH_FLEX_DYNAMIC", "yes")
    p = Point("masks", 1, 256, 256, 2, 2, 32, False, "fp32", x=256, mask="causal")
    with pytest.raises(ValueError, match="FLASHMUX_BENCH_FLEX_DYNAMIC"):
        FlexImpl().build(p, _ctx())
