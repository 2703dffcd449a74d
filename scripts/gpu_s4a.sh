# Session 4, run 1: D=64 forward lowerings (Triton, Mosaic configs, attention_mgpu), fwd+bwd per
# forward lowering; then the Pallas full-tier conformance alone with what time is left.
set -u
T0=$(date +%s)
source scripts/gpu_setup.sh
echo "setup $(( $(date +%s) - T0 )) s"
GPU_CHECK_TAG=fwd64 timeout -s INT ${FS:-300} python3 packages/backend_pallas/gpu_check.py --deadline ${FD:-270} \
  --fwd64 ${PTS:-64c2048,64c8192,64n2048,64n8192,64c16384,64n16384,64c4096,64n4096} 2>&1 | grep -v -i warning | tail -40
t=$(date +%s)
left=$(( ${TOTAL:-580} - (t - T0) ))
if [ "$left" -gt 60 ]; then
  FLASHMUX_TEST_SIZE=full FLASHMUX_HYPOTHESIS_EXAMPLES=${HYP:-20} FLASHMUX_TEST_BACKEND=pallas \
    timeout -s INT "$left" python3 -m pytest tests/conformance -q -rfs -p no:cacheprovider -p no:benchmark -n 8 \
    > "$OUT/conformance_pallas.log" 2>&1
  echo "conformance(pallas): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/conformance_pallas.log" | tail -1)"
  grep -E "^FAILED|failed on" "$OUT/conformance_pallas.log" | head -10
fi
echo "total $(( $(date +%s) - T0 )) s"
