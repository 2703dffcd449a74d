# Session 4, run 5: the Mosaic dQ kernel's O/r tiles of their own (A/B, backward alone), fwd+bwd
# against mha with the defaults, then the Pallas full-tier fixed conformance cases.
set -u
T0=$(date +%s)
source scripts/gpu_setup.sh
echo "setup $(( $(date +%s) - T0 )) s"
GPU_CHECK_TAG=or_ab timeout -s INT ${AS:-300} python3 packages/backend_pallas/gpu_check.py --deadline ${AD:-280} \
  --mbwd-ab ${AB:-64c2048,64c4096,128c2048,64n4096,128c8192} --fb-auto ${FB:-64c2048,64c4096,128c2048} 2>&1 | grep -E "MBWD|FB|error|rror" | tail -30
t=$(date +%s)
left=$(( ${TOTAL:-585} - (t - T0) ))
FLASHMUX_TEST_SIZE=full FLASHMUX_HYPOTHESIS_EXAMPLES=${HYP:-6} FLASHMUX_TEST_BACKEND=pallas \
  timeout -s INT "$left" python3 -m pytest tests/conformance -q -rfsw -p no:cacheprovider -p no:benchmark -n 8 \
  > "$OUT/conformance_pallas.log" 2>&1
echo "conformance(pallas): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/conformance_pallas.log" | tail -1)"
grep -E "^FAILED|failed on|one draw out of bound" "$OUT/conformance_pallas.log" | head -10
echo "total $(( $(date +%s) - T0 )) s"
