#!/usr/bin/env bash
# GPU check of the sm90 forward (H100/H200), run from the repository root on the GPU machine with
# .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl: builds the library with the package's own build
# (python -m flashmux_cuda build --archs 90, the sequential variant in: -DFMX_SM90_TUNING), shows ptxas and
# SASS facts of the sm90 kernels, then runs the stages named on the command line (default:
# fwd bench correctness): fwd = tools/sm90_check.py fwd (sm90 forward vs float64, per variant),
# bench = forward TFLOP/s sm90 / sm80 / SDPA cuDNN (per variant), correctness =
# tools/kernel_check.py correctness (forward + backward, sm90 forward wherever it applies),
# sanitize / racecheck = compute-sanitizer memcheck / racecheck of small sm90 forwards.
set -u
STAGES=${*:-fwd bench correctness}
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/fmx_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/cutl/cutlass_library ]; then
  pip install -q --no-deps --target /tmp/cutl .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl 2>/dev/null || exit 1
fi
export FLASHMUX_CUTLASS_INCLUDE=/tmp/cutl/cutlass_library/source/include
export PYTHONPATH=$ROOT/packages/core/src:$ROOT/packages/backend_cuda/src
export FLASHMUX_CACHE_DIR=/tmp/fmxcache
t0=$(date +%s)
LIB=$(FLASHMUX_CUDA_NVCC_FLAGS="-DFMX_SM90_TUNING -lineinfo -Xptxas -v" \
      python3 -m flashmux_cuda build --archs 90 -j 16 -q) || {
  tail -60 $(ls -d /tmp/fmxcache/cuda/*/ | head -1)build.log; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s -> $LIB"
BD=$(dirname "$LIB")
cp "$BD/build.log" "$OUTDIR/build.log"
grep -A2 "Compiling entry function.*sm90.*fwd_kernel" "$BD/build.log" | grep -E "spill|Used" | sort | uniq -c
for o in "$BD"/obj/sm90_fwd_hdim*.o; do
  echo "$(basename $o): $(cuobjdump --dump-sass $o | grep -c HGMMA) HGMMA, $(cuobjdump --dump-sass $o | grep -c -E 'LDL|STL') LDL/STL"
done
cd packages/backend_cuda
# FMX_TUNE_SM90 values to check and time (tuning build): "-" = default, 1 = sequential
# (no ping-pong/overlap; commit cf6c85a had 2 = persistent grid).
VARIANTS=${SM90_VARIANTS:-- 1}
for s in $STAGES; do
  case $s in
    fwd)
      for v in $VARIANTS; do
        [ "$v" = "-" ] && v=""
        FMX_TUNE_SM90=$v timeout 120 python3 tools/sm90_check.py $LIB fwd 2>&1 | tee $OUTDIR/fwd$v.log | grep -v "^ok" | sed "s/^/[variant ${v:-default}] /"
      done ;;
    bench)
      for v in $VARIANTS; do
        [ "$v" = "-" ] && v=""
        FMX_TUNE_SM90=$v timeout 150 python3 tools/sm90_check.py $LIB bench 2>&1 | tee $OUTDIR/bench$v.log | sed "s/^/[variant ${v:-default}] /"
      done ;;
    correctness) timeout 200 python3 tools/kernel_check.py $LIB correctness 2>&1 | tee $OUTDIR/correctness.log | grep -v "^ok" ;;
    sanitize)
      timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool memcheck python3 tools/sm90_check.py $LIB sanitize > $OUTDIR/memcheck.log 2>&1
      grep -v "^ok" $OUTDIR/memcheck.log | tail -5 ;;
    racecheck)
      timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool racecheck python3 tools/sm90_check.py $LIB sanitize > $OUTDIR/racecheck.log 2>&1
      grep -v "^ok" $OUTDIR/racecheck.log | tail -5 ;;
  esac
done
echo "total: $(( $(date +%s) - t0 )) s"
