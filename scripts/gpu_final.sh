#!/usr/bin/env bash
# The lead's GPU check, in one device call (each call is at most 10 minutes):
#   STAGES="conformance"  the conformance suite per backend (all four at once, each with pytest-xdist),
#                         the backends' own GPU tests and the core's GPU tests;
#   STAGES="bench"        the papers benchmark in the time left (TOTAL_S), written to $OUT.
#   OUT=/tmp/x TOTAL_S=580 STAGES="conformance bench" bash scripts/gpu_final.sh
# Knobs: SIZE (conformance tier, default full), HYP (hypothesis examples, default 25),
# CONF_S (seconds per conformance run), CONF_BACKENDS (run concurrently), BACKENDS, ANCHORS, FRAMEWORKS, HEAD_DIMS, SEQLENS, MODES.
set -u
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-580}
STAGES=${STAGES:-conformance bench}
source scripts/gpu_setup.sh
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
python3 -m flashmux info > "$OUT/info.txt" 2>&1   # also builds the CUDA library (JIT, ~45 s)
echo "info + CUDA build: $(( $(date +%s) - T0 )) s"

conf() {  # backend seconds: conformance suite for one backend, then its summary line
  local b=$1 s=$2 t=$(date +%s)
  FLASHMUX_TEST_SIZE=${SIZE:-full} FLASHMUX_HYPOTHESIS_EXAMPLES=${HYP:-25} FLASHMUX_TEST_BACKEND=$b \
    timeout -s INT "$s" python3 -m pytest tests/conformance -q -rfs -p no:cacheprovider -p no:benchmark -n ${XDIST:-3} \
    > "$OUT/conformance_$b.log" 2>&1
  echo "conformance($b): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/conformance_$b.log" | tail -1)"
}

for stage in $STAGES; do
  case $stage in
    conformance)
      S=${CONF_S:-300}
      for b in ${CONF_BACKENDS:-reference triton pallas cuda}; do conf "$b" "$S" & done
      wait
      t=$(date +%s)
      [ -n "${SKIP_UNIT:-}" ] && continue
      timeout -s INT 200 python3 -m pytest tests/backends tests/core/test_gpu_compile.py tests/core/test_crossing.py \
        -k "not real_compile" -q -rs -p no:cacheprovider -n 4 > "$OUT/gpu_unit.log" 2>&1
      echo "backend + core GPU tests: rc=$? in $(( $(date +%s) - t )) s: $(tail -1 "$OUT/gpu_unit.log")"
      ;;
    bench)
      B=$(( $(left) - 25 ))
      echo "bench budget: $B s"
      python3 -m flashmux bench --sweep papers --head-dims ${HEAD_DIMS:-64,128} --seqlens ${SEQLENS:-2k,4k,8k,16k} \
        --modes ${MODES:-fwd,fwd_bwd} --dtype bf16 --target-ms ${TARGET_MS:-30} --time-budget "$B" \
        ${BACKENDS:+--backends $BACKENDS} ${ANCHORS:+--anchors $ANCHORS} ${FRAMEWORKS:+--frameworks $FRAMEWORKS} \
        --no-progress --out "$OUT" > "$OUT/bench.log" 2>&1
      echo "bench rc=$?"; tail -40 "$OUT/bench.log"
      ;;
  esac
done
echo "total $(( $(date +%s) - T0 )) s"
