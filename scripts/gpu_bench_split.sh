# One framework's half of the papers benchmark in one device call (a full run with every anchor
# needs more than one call's 10 minutes): SIDE=jax or SIDE=torch; merge the two results.json with
#   python -m flashmux bench --report-from A/results.json,B/results.json --docs docs
set -u
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-585}
source scripts/gpu_setup.sh
python3 -m flashmux info > "$OUT/info.txt" 2>&1   # also builds the CUDA library (JIT, ~70 s)
echo "info + CUDA build: $(( $(date +%s) - T0 )) s"
if [ -n "${PRE:-}" ]; then bash -c "$PRE"; fi
if [ "$SIDE" = jax ]; then
  BK=pallas,cuda,auto; AN=jax-xla,jax-cudnn,pallas-mha,pallas-mgpu
else
  BK=triton,cuda,auto; AN=sdpa-flash,sdpa-cudnn,sdpa-efficient,sdpa-math,flex,standard
fi
B=$(( TOTAL_S - ($(date +%s) - T0) - 20 ))
echo "bench budget: $B s"
python3 -m flashmux bench --sweep papers --head-dims 64,128 --seqlens 2k,4k,8k,16k --modes fwd,fwd_bwd \
  --dtype bf16 --target-ms ${TARGET_MS:-30} --time-budget "$B" --frameworks "$SIDE" --backends "$BK" \
  --anchors "$AN" --no-progress --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -25 "$OUT/bench.log"
echo "total $(( $(date +%s) - T0 )) s"
