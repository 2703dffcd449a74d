"""The backend object: capabilities, availability, info and the kernel entry points."""

from __future__ import annotations

from flashmux.backend import FEATURES, Backend, Capabilities


class PallasBackend(Backend):
    def availability(self):
        try:
            import jax  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            return [f"package jax not installed ({type(e).__name__})"]
        try:
            from jax.experimental import pallas  # noqa: F401
        except Exception as e:  # pragma: no cover
            return [f"jax.experimental.pallas not importable: {e}"]
        return []

    def reasons(self, spec):
        out = []
        if spec.device_type == "cuda":
            try:
                from jax.experimental.pallas import triton  # noqa: F401
            except Exception as e:  # pragma: no cover
                out.append(f"Pallas Triton lowering not importable: {e}")
        return out

    def info(self):
        facts = {
            "lowering": {
                "cpu": "interpret",
                "cuda": "triton (forward and backward, sm80+)",
                "cuda sm90": "mosaic_gpu forward for dense fp16/bf16, D 64/128, no window "
                "(causal with Sq == Sk), block-multiple lengths; mosaic_gpu backward for dense "
                "fp16/bf16, D 64/128, no window (causal with Sq == Sk), any lengths, where "
                "measured faster (FLASHMUX_PALLAS_MOSAIC_BWD); block masks (block_size 128) "
                "and ALiBi: mosaic_gpu forward (mosaic_masks.py, FLASHMUX_PALLAS_MASKS / "
                "FLASHMUX_PALLAS_ALIBI=mosaic, the default where measured faster), backward "
                "always on the triton lowering; triton otherwise",
            }
        }
        try:
            import jax

            from . import mosaic_kernels, ops

            facts["jax"] = jax.__version__
            facts["default_backend"] = jax.default_backend()
            facts["mosaic_mode"] = ops.MOSAIC_MODE
            facts["mosaic_bwd_mode"] = ops.MOSAIC_BWD_MODE
            facts["mosaic_bwd_auto"] = sorted(ops.MOSAIC_BWD_AUTO)
            facts["mosaic_gpu_available"] = mosaic_kernels.available()
            facts["masks_mode"] = ops.MASKS_MODE
            facts["alibi_mode"] = ops.ALIBI_MODE
            facts["masks_mosaic_auto"] = ops.MASKS_MOSAIC_AUTO
            facts["alibi_mosaic_auto"] = ops.ALIBI_MOSAIC_AUTO
        except Exception:  # pragma: no cover
            pass
        return facts

    def lowering(self, q, k, v, params):
        """The lowering a forward on these arrays takes (for explain and tests)."""
        from . import ops

        return ops.lowering(q, k, v, params, ops.on_cpu(q))

    def lowerings(self, q, k, v, params):
        """{"forward": ..., "backward": ...}: the lowering each pass takes on these arrays
        ("interpret", "triton" or "mosaic_gpu"), for explain and tests."""
        from . import ops

        interp = ops.on_cpu(q)
        return {
            "forward": ops.lowering(q, k, v, params, interp),
            "backward": ops.backward_lowering(q, k, v, params, interp),
        }

    def forward(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, residual=False, alibi_slopes=None,
        dropout_seed=None, block_mask=None,
    ):
        from . import ops

        return ops.forward(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            params,
            residual=residual,
            alibi_slopes=alibi_slopes,
            dropout_seed=dropout_seed,
            block_mask=block_mask,
        )

    def backward(
        self,
        do,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        params,
        out_residual=None,
        alibi_slopes=None,
        dropout_seed=None,
        block_mask=None,
    ):
        from . import ops

        return ops.backward(
            do,
            dlse,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            params,
            out_residual=out_residual,
            alibi_slopes=alibi_slopes,
            dropout_seed=dropout_seed,
            block_mask=block_mask,
        )

    # -- KV-cache decode (decode.py) --------------------------------------------------------
    def decode_reasons(self, spec) -> list[str]:
        """Why the Pallas split-KV decode kernel cannot run this decode call (DecodeSpec)."""
        from flashmux.kvcache import decode_capability_reasons

        from . import decode

        out = decode_capability_reasons(self.capabilities, spec)
        if spec.device_type == "cuda":
            out += self.reasons(spec)  # the Triton lowering must import
            out += decode.gpu_reasons(spec)
        return out

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
        from . import decode, ops

        return decode.decode(
            q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params, ops.on_cpu(q)
        )

    def decode_splits(self, spec, params) -> int:
        from . import decode

        return decode.splits_for(spec, params, spec.device_type != "cuda")

    def decode_kernel(self, spec, params) -> str:
        from . import decode

        st = decode.plan(spec, params, spec.device_type != "cuda")
        lowering = "triton" if spec.device_type == "cuda" else "interpret"
        cache = f"paged (page_size {spec.page_size})" if spec.paged else "contiguous"
        if spec.device_type == "cuda":  # Mosaic GPU kernel or Triton lowering, and why
            mosaic, why = decode.mosaic_choice_for_spec(spec, params)
            if mosaic:
                return f"pallas split-KV decode ({cache}): {why}"
            cache += f"; {why}"
        return (
            f"pallas split-KV decode ({lowering}, {cache}, {st.rows} query rows packed per KV "
            f"head in blocks of {st.block_m}, {st.block_n}-key tiles"
            + (f", {st.pages_per_step} page tiles per trip" if spec.paged else "")
            + ")"
            + (", XLA lse merge" if st.num_splits > 1 else "")
        )

    def dropout_keep_mask(self, seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like=None):
        """Bool (batch, heads, seqlen_q, seqlen_k): the mask the kernels draw for this seed."""
        import jax

        from . import dropout

        m = dropout.keep_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k)
        if like is not None:
            try:
                m = jax.device_put(m, list(like.devices())[0])
            except Exception:  # a tracer or an array without devices: leave it where it is
                pass
        return m


def make_backend() -> PallasBackend:
    return PallasBackend(
        name="pallas",
        description="JAX Pallas kernels (Triton lowering on NVIDIA sm80+, interpret mode on CPU)",
        capabilities=Capabilities(
            array_kinds=frozenset({"jax"}),
            devices=frozenset({"cuda", "cpu"}),
            dtypes=frozenset({"float16", "bfloat16", "float32"}),
            max_head_dim=256,
            min_compute_capability=(8, 0),
            # ALiBi in the Triton-lowering kernels; block masks in blocksparse.py (Triton
            # lowering / interpret); on sm90 the forward of both can take mosaic_masks.py.
            # seed_array: the dropout seed is always a kernel operand (dropout.seed_operand).
            features=frozenset(FEATURES) | {"alibi", "seed_array", "block_mask"},
            runs_under_jit=True,
            out_residual=True,
            priority=50,
        ),
    )
