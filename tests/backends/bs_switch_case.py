"""The block-sparse backward variant tests' shared case (FUSE_DELTA, fused dQ, joint launch):
one call with a switch on, then off, both judged against the float64 reference."""

from __future__ import annotations

import numpy as np
import torch

import flashmux
from flashmux.reference import reference_backward, reference_forward


def switch_vs_float64(monkeypatch, env, *, s=64, hkv=2, tma=True, after_on=None, after_off=None):
    """Block-sparse kernels at 32x32 tiles (tensor descriptors `tma`), fp16, B 1, Hq 2, head_dim
    16, Hkv `hkv`, S `s`; a causal mask whose rows 0-7 see nothing (a full tile at (1, 0)) and an
    lse cotangent. Runs forward + backward with `env`=1 (then `after_on()`), with `env`=0 (then
    `after_off()`), and asserts the first run's out/dq/dk/dv error vs float64 is at most twice
    the second run's + 1e-5 (the conformance rule, the switch-off call as the yardstick)."""
    for kern in ("FWD", "BWD_DQ", "BWD_DKDV"):
        monkeypatch.setenv(f"FLASHMUX_TRITON_BS_{kern}", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1" if tma else "0")
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d = 1, 2, 16

    def fn(b_, h_, qi, ki):  # causal, rows 0-7 see nothing; a full tile at (1, 0)
        return (qi >= 8) & (ki <= qi)

    q64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(2))
    k64, v64 = (rng.standard_normal((b, s, hkv, d)) for _ in range(2))
    dlse64 = rng.standard_normal((b, h, s))
    dlse64[:, :, :8] = 0.0  # (rows without keys: lse is -inf, its cotangent unused)
    q, k, v, do = (torch.tensor(x, dtype=torch.float16) for x in (q64, k64, v64, do64))
    dlse = torch.tensor(dlse64, dtype=torch.float32)
    bm = flashmux.create_block_mask(fn, None, None, s, s, block_size=32, like=q)

    def run():
        qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
        o, lse = flashmux.attention(qa, ka, va, block_mask=bm, return_lse=True, backend="triton")
        return (o, *torch.autograd.grad((o, lse), (qa, ka, va), (do, dlse)))

    monkeypatch.setenv(env, "1")
    res = run()
    if after_on is not None:
        after_on()
    ref = (reference_forward(q64, k64, v64, block_mask=fn)[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, dlse=dlse64))
    monkeypatch.setenv(env, "0")
    plain = run()
    if after_off is not None:
        after_off()
    for name, got, p, r in zip(("out", "dq", "dk", "dv"), res, plain, ref):
        err = float(np.abs(got.detach().double().numpy() - r).max())
        bound = 2 * float(np.abs(p.detach().double().numpy() - r).max()) + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
