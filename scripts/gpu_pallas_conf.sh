# Pallas on the GPU: explain() per head_dim, the full-tier fixed conformance cases, the hypothesis
# test, then the kernel unit tests (FLASHMUX_PALLAS_MOSAIC[_BWD]=off in the environment: Triton lowering).
set -u
T0=$(date +%s)
source scripts/gpu_setup.sh
echo "setup $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
import jax.numpy as jnp, numpy as np, flashmux
for d in (64, 128):
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1024, 16, d)), jnp.bfloat16)
    print(d, [l for l in str(flashmux.explain(q, q, q, causal=True)).splitlines() if "lowering" in l])
PY
conf() {  # name, pytest -k expression, seconds, hypothesis examples
  local t=$(date +%s)
  FLASHMUX_TEST_SIZE=full FLASHMUX_HYPOTHESIS_EXAMPLES=$4 FLASHMUX_TEST_BACKEND=pallas \
    timeout -s INT "$3" python3 -m pytest tests/conformance -q -rfsw -p no:cacheprovider -p no:benchmark -n 8 -k "$2" \
    > "$OUT/conformance_$1.log" 2>&1
  echo "conformance($1): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/conformance_$1.log" | tail -1)"
  grep -E "^FAILED|failed on|one draw out of bound" "$OUT/conformance_$1.log" | head -10
}
conf fixed "not generated" ${CS:-330} 0
conf hypothesis "generated" ${HS:-150} ${HYP:-10}
t=$(date +%s)
left=$(( ${TOTAL:-585} - (t - T0) ))
timeout -s INT $left python3 -m pytest tests/backends/test_pallas_kernels.py tests/core/test_gpu_compile.py -q -rfs \
  -p no:cacheprovider -p no:benchmark -n 8 > "$OUT/unit.log" 2>&1
echo "pallas kernels + core GPU: rc=$? in $(( $(date +%s) - t )) s: $(tail -1 "$OUT/unit.log")"
grep -E "^FAILED" "$OUT/unit.log" | head
echo "total $(( $(date +%s) - T0 )) s"
