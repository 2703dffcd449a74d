"""Which kernel family of libflashmux_cuda runs a pass (named by ``explain()`` via ``lowerings()``).

The library decides at launch (csrc/flashmux_cuda_api.cu, ``use_sm90_fwd`` and
``sm90::fwd_unsupported`` in csrc/sm90/sm90_api.h); this module mirrors that rule so that
explain() can say it without launching anything. Keep the two in step.

- forward: ``sm90`` (warp-specialized wgmma + TMA, csrc/sm90/) on compute capability 9.0 when the
  library was built with a 9.x arch, unless ``FLASHMUX_CUDA_FAMILY=sm80``, for problems it has:
  padded (not varlen), no softcap, head_dim <= 256 (129..256 where the library has
  them, ``fmx_families()`` bit 3; 65..96 on the 96 instantiation where it has that, bit 6,
  session 10), seqlen_k > 0, positive strides. With
  head_dim_v != head_dim (``fmx_families()`` bit 4) the instantiation is that of the larger
  of the two (the smaller one zero-filled on load).
  ALiBi slopes and block masks (session 11, ``fmx_families()`` bit 7): at the instantiations 64,
  96 and 128 (the kExt kernels of csrc/sm90/fwd_extras_hdim*.cu), unless
  ``FLASHMUX_CUDA_SM90_EXT=0``; their backward is the sm80 family's.
  Everything else runs the sm80 kernels (mma.sync, cp.async) inside the same call.
- backward: ``sm90`` (wgmma backward, csrc/sm90/bwd_kernel.cuh) where the sm90 forward would
  run with head_dim <= 64 or 97..128 and the library has it (``fmx_families()`` bit 2; with
  Dv != D at the instantiation of max(D, Dv)); deterministic calls too where the library has
  that mode (bit 5, session 10: dQ added in key-block order), unless
  ``FLASHMUX_CUDA_BWD_FAMILY=sm80`` (the sm80 backward after the sm90 forward, for comparisons;
  the API file's ``use_sm90_bwd`` and ``sm90::bwd_unsupported``). Else sm80.
"""

from __future__ import annotations

import os

FAMILY_ENV = "FLASHMUX_CUDA_FAMILY"
SM80 = "sm80"
SM90 = "sm90"
FAMILY_BIT = {SM80: 1, SM90: 2}
SM90_BWD_BIT = 4  # fmx_families(): the library has the sm90 backward
SM90_WIDE_BIT = 8  # fmx_families(): the sm90 forward has head_dim 129..256 (192, 256)
DV_BIT = 16  # fmx_families(): head_dim_v != head_dim (session 9)
SM90_DET_BIT = 32  # fmx_families(): the sm90 backward has deterministic mode (session 10)
SM90_D96_BIT = 64  # fmx_families(): the sm90 forward has head_dim 65..96 (session 10)
# fmx_families(): the sm90 forward takes ALiBi slopes and block masks (issue 15, session 11)
SM90_EXT_BIT = 128
SM90_EXT_ENV = "FLASHMUX_CUDA_SM90_EXT"  # =0: ALiBi / block-mask forwards on sm80 (comparisons)
SM90_EXT_HEAD_DIMS = (64, 96, 128)  # the instantiations with kExt kernels (fwd_extras_hdim*.cu)
BWD_FAMILY_ENV = "FLASHMUX_CUDA_BWD_FAMILY"
PAD96_ENV = "FLASHMUX_CUDA_SM90_PAD96"


def sm90_fwd_head_dim(d: int) -> int:
    """The sm90 forward instantiation for head_dim d, 0 when it has none (as in sm90_api.h)."""
    if d <= 64:
        return 64
    if d <= 96:  # FLASHMUX_CUDA_SM90_PAD96=1: the 128 instantiation (session 8 experiment)
        return 128 if os.environ.get(PAD96_ENV, "").startswith("1") else 96
    if d <= 128:
        return 128
    if 128 < d <= 192:
        return 192
    if 192 < d <= 256:
        return 256
    return 0


def sm90_bwd_head_dim(d: int) -> int:
    """The sm90 backward's instantiation for head_dim d (64, 128), 0 when none (sm90_api.h)."""
    f = sm90_fwd_head_dim(d)
    return f if f <= 128 and (d <= 64 or d > 96) else 0


def forward_family(
    cc: tuple[int, int] | None,
    *,
    families: int | None,
    varlen: bool,
    softcap: float | None,
    head_dim: int,
    seqlen_k: int,
    env: str | None = None,
    alibi: bool = False,
    block_mask: bool = False,
    head_dim_v: int | None = None,
) -> tuple[str, str | None]:
    """(family, why the sm90 family is not used or None). `families` is the library's
    fmx_families() bit mask (None: unknown, assumed built for this device); `env` defaults to
    $FLASHMUX_CUDA_FAMILY. head_dim_v (None: = head_dim): the kernels of max(head_dim,
    head_dim_v) run the call."""
    env = os.environ.get(FAMILY_ENV) if env is None else env
    if head_dim_v is not None and head_dim_v != head_dim:
        head_dim = max(head_dim, head_dim_v)
    if families is not None and not families & FAMILY_BIT[SM90]:
        return SM80, "library built without a 9.x arch"
    if cc != (9, 0):
        return SM80, "device is not compute capability 9.0"
    if env == SM80:
        return SM80, f"{FAMILY_ENV}=sm80"
    if varlen:
        return SM80, "sm90 forward lacks varlen"
    if softcap:
        return SM80, "sm90 forward lacks softcap"
    if alibi or block_mask:  # session 11: the kExt kernels at head dims 64, 96, 128
        what = " and ".join(n for n, on in (("ALiBi", alibi), ("block masks", block_mask)) if on)
        if families is not None and not families & SM90_EXT_BIT:
            return SM80, f"library built without the sm90 forward's {what} (rebuild)"
        if os.environ.get(SM90_EXT_ENV, "").startswith("0"):
            return SM80, f"{SM90_EXT_ENV}=0 ({what})"
        if sm90_fwd_head_dim(head_dim) not in SM90_EXT_HEAD_DIMS:
            return SM80, f"sm90 forward has {what} at head_dim <= 128, not {head_dim}"
    if sm90_fwd_head_dim(head_dim) == 0:
        return SM80, f"sm90 forward has head_dim <= 256, not {head_dim}"
    if head_dim > 128 and families is not None and not families & SM90_WIDE_BIT:
        return SM80, "library built without the sm90 forward's head_dim 192/256 (rebuild)"
    if sm90_fwd_head_dim(head_dim) == 96 and families is not None and not families & SM90_D96_BIT:
        return SM80, "library built without the sm90 forward's head_dim 96 (rebuild)"
    if seqlen_k <= 0:
        return SM80, "no keys"
    return SM90, None


def backward_family(
    cc: tuple[int, int] | None,
    *,
    families: int | None,
    varlen: bool,
    softcap: float | None,
    head_dim: int,
    seqlen_k: int,
    deterministic: bool,
    env: str | None = None,
    bwd_env: str | None = None,
    alibi: bool = False,
    block_mask: bool = False,
    head_dim_v: int | None = None,
) -> tuple[str, str | None]:
    """(family, why the sm90 backward is not used or None), as the API file's use_sm90_bwd:
    the forward's conditions, then the library's sm90-backward bit, $FLASHMUX_CUDA_BWD_FAMILY
    (`bwd_env`) and deterministic mode; Dv != D by the larger head dim."""
    fam, why = forward_family(
        cc,
        families=families,
        varlen=varlen,
        softcap=softcap,
        head_dim=head_dim,
        seqlen_k=seqlen_k,
        env=env,
        alibi=alibi,
        block_mask=block_mask,
        head_dim_v=head_dim_v,
    )
    if alibi or block_mask:  # the sm90 forward runs them (session 11), the sm80 backward follows
        what = " and ".join(n for n, on in (("ALiBi", alibi), ("block masks", block_mask)) if on)
        if fam == SM90 or (why and what in why):
            return SM80, f"sm90 backward lacks {what} (the sm80 backward runs it)"
    if fam != SM90:
        return SM80, (why or "").replace("sm90 forward", "sm90 backward") or None
    if families is not None and not families & SM90_BWD_BIT:
        return SM80, "library built without the sm90 backward (rebuild)"
    kd = head_dim if head_dim_v is None else max(head_dim, head_dim_v)  # Dv != D: the larger
    if sm90_bwd_head_dim(kd) == 0:
        return SM80, f"sm90 backward has head_dim <= 64 and 97..128, not {kd}"
    bwd_env = os.environ.get(BWD_FAMILY_ENV) if bwd_env is None else bwd_env
    if bwd_env == SM80:
        return SM80, f"{BWD_FAMILY_ENV}=sm80"
    if deterministic and families is not None and not families & SM90_DET_BIT:
        return SM80, "library built without the sm90 deterministic backward (rebuild)"
    return SM90, None


def describe(family: str, why: str | None) -> str:
    if family == SM90:
        return "sm90 (wgmma/TMA, warp-specialized)"
    return "sm80 (mma.sync/cp.async)" + (f"; {why}" if why else "")


def device_capability(x) -> tuple[int, int] | None:
    """Compute capability of the device holding a torch tensor or a JAX array, None if unknown."""
    try:
        mod = type(x).__module__ or ""
        if mod.startswith("torch"):
            import torch

            if x.is_cuda:
                major, minor = torch.cuda.get_device_capability(x.device)
                return int(major), int(minor)
            return None
        devs = x.devices() if hasattr(x, "devices") else ()
        for dev in devs:
            cap = getattr(dev, "compute_capability", None)
            if cap:
                hi, lo = str(cap).split(".")[:2]
                return int(hi), int(lo)
    except Exception:
        return None
    return None
