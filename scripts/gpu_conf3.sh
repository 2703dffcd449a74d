# Session-3 final conformance: pallas, cuda, triton full tier concurrently, then the Pallas kernel tests.
set -u
T0=$(date +%s)
source scripts/gpu_setup.sh
python3 -m flashmux info > "$OUT/info.txt" 2>&1
echo "setup+build $(( $(date +%s) - T0 )) s"
conf() {
  local b=$1 n=$2 s=$3 t=$(date +%s)
  FLASHMUX_TEST_SIZE=full FLASHMUX_HYPOTHESIS_EXAMPLES=${HYP:-20} FLASHMUX_TEST_BACKEND=$b \
    timeout -s INT "$s" python3 -m pytest tests/conformance -q -rfs -p no:cacheprovider -p no:benchmark -n "$n" \
    > "$OUT/conformance_$b.log" 2>&1
  echo "conformance($b): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/conformance_$b.log" | tail -1)"
  grep -E "^FAILED|failed on" "$OUT/conformance_$b.log" | head -10
}
conf pallas 8 ${CS:-320} & conf cuda 4 ${CS:-320} & conf triton 4 ${CS:-320} &
wait
t=$(date +%s)
timeout -s INT ${US:-130} python3 -m pytest tests/backends/test_pallas_kernels.py tests/core/test_gpu_compile.py -q -rfs \
  -p no:cacheprovider -p no:benchmark -n 8 > "$OUT/unit.log" 2>&1
echo "pallas kernels + core GPU: rc=$? in $(( $(date +%s) - t )) s: $(tail -1 "$OUT/unit.log")"
grep -E "^FAILED" "$OUT/unit.log" | head
python3 - <<'PY'
import jax.numpy as jnp, numpy as np, flashmux
q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1024, 16, 128)), jnp.bfloat16)
print(flashmux.explain(q, q, q, causal=True))
PY
echo "total $(( $(date +%s) - T0 )) s"
