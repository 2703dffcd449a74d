#!/usr/bin/env bash
# One device call that checks and measures everything (for a lease of ~10 minutes):
# small-tier conformance per backend on the GPU, then the papers benchmark in the time left.
#   OUT=/tmp/x TOTAL_S=580 bash scripts/gpu_final.sh
set -u
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-580}
source scripts/gpu_setup.sh
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
python3 -m flashmux info > "$OUT/info.txt" 2>&1
(FLASHMUX_CUDA_ARCHS=90 python3 -m flashmux_cuda build --jax > /tmp/cuda_build.log 2>&1; echo "rc=$?" >> /tmp/cuda_build.log) &
BUILD=$!
conf() {  # backend, seconds
  local b=$1 s=$2 t=$(date +%s)
  FLASHMUX_TEST_SIZE=small FLASHMUX_HYPOTHESIS_EXAMPLES=${HYP:-3} timeout "$s" python3 -m nox --no-venv \
    -s "conformance(backend='$b')" -- -q -rs -p no:cacheprovider >> "$OUT/conformance_$b.log" 2>&1
  echo "conformance($b): rc=$? in $(( $(date +%s) - t )) s: $(grep -E '[0-9]+ (passed|failed)' "$OUT/conformance_$b.log" | tail -1)"
}
conf reference ${REF_S:-60}
conf triton ${TRITON_S:-90}
conf pallas ${PALLAS_S:-80}
wait $BUILD; cat /tmp/cuda_build.log | tail -3 > "$OUT/conformance_cuda.log"; echo "cuda build at $(( $(date +%s) - T0 )) s: $(tail -1 /tmp/cuda_build.log)"
conf cuda ${CUDA_S:-70}
B=$(( $(left) - 25 ))
echo "bench budget: $B s"
python3 -m flashmux bench --sweep papers --head-dims ${HEAD_DIMS:-64,128} --seqlens 2k,4k,8k,16k \
  --modes fwd,fwd_bwd --dtype bf16 --target-ms 30 --time-budget "$B" --no-progress --out "$OUT" > /tmp/bench.log 2>&1
echo "bench rc=$?"; tail -40 /tmp/bench.log
