"""The NoBackendError of a decode call that no (forced) backend can run: the same text as
flashmux.attention's (dispatch._no_backend_message), naming the decode call and every forced
backend with its reasons."""

from __future__ import annotations

import numpy as np
import pytest

import flashmux
from flashmux import dispatch


def test_forced_decline_names_the_decode_call_and_reasons():
    if "triton" not in dispatch.registry():
        pytest.skip("the triton backend is not installed")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 2, 16)).astype(np.float32)
    kc = rng.standard_normal((1, 8, 2, 16)).astype(np.float32)
    with pytest.raises(dispatch.NoBackendError) as err:
        flashmux.attention_with_kvcache(q, kc, kc.copy(), cache_seqlens=np.array([3], np.int32),
                                        backend="triton")
    lines = str(err.value).splitlines()
    assert lines[0] == "no forced backend (triton) can run this decode call:"
    assert len(lines) == 2 and lines[1].startswith("  triton: ") and len(lines[1]) > 10
