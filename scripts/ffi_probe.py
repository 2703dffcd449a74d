"""Where does the CUDA backend's JAX (XLA FFI) call lose time against the torch call?

Times the same kernel (flashmux backend="cuda") from torch (CUDA events, 50 calls) and from JAX
(jitted, 50 calls then one block; and the harness's grouping), prints the optimized HLO around the
custom call. Usage on the GPU: python scripts/ffi_probe.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flashmux

for hd, causal, S in [(128, True, 2048), (128, False, 2048), (64, True, 2048), (128, True, 8192)]:
    H = 2048 // hd
    B = 16384 // S
    rng = np.random.default_rng(0)
    qn, kn, vn = (rng.standard_normal((B, S, H, hd)).astype(np.float32) for _ in range(3))
    tq, tk, tv = (torch.tensor(x, device="cuda", dtype=torch.bfloat16) for x in (qn, kn, vn))
    f = lambda: flashmux.attention(tq, tk, tv, causal=causal, backend="cuda")
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(50):
        f()
    e1.record()
    torch.cuda.synchronize()
    t_torch = e0.elapsed_time(e1) / 50

    jq, jk, jv = (jnp.asarray(x, dtype=jnp.bfloat16) for x in (qn, kn, vn))
    g = jax.jit(lambda a, b, c: flashmux.attention(a, b, c, causal=causal, backend="cuda"))
    for _ in range(5):
        g(jq, jk, jv).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(50):
        r = g(jq, jk, jv)
    r.block_until_ready()
    t_jax_loop = (time.perf_counter() - t0) * 1e3 / 50
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        g(jq, jk, jv).block_until_ready()
        ts.append((time.perf_counter() - t0) * 1e3)
    t_jax_one = float(np.median(ts))
    print(f"hd{hd} causal={causal} S={S}: torch {t_torch:.3f} ms, jax loop-of-50 {t_jax_loop:.3f} ms, "
          f"jax one+block {t_jax_one:.3f} ms")
    if hd == 128 and causal and S == 2048:
        txt = g.lower(jq, jk, jv).compile().as_text()
        lines = [l for l in txt.splitlines() if "ENTRY" in l or "custom-call" in l or "copy" in l
                 or "transpose" in l or "fusion" in l or "broadcast" in l]
        print("\n".join(lines[:40]))
