#!/usr/bin/env bash
# One GPU cycle for the sm90 backward (H100/H200), from the repository root on the GPU machine
# with .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl: build (the package's own build, --archs 90,
# ptxas report kept), then the stages named on the command line (default: bwd benchbwd kernels):
#   bwd       tools/sm90_check.py bwd: sm90 forward + backward vs float64 (44 cases), per variant
#   fwd       tools/sm90_check.py fwd: the sm90 forward cases
#   benchbwd  backward ms sm90 vs sm80 (same out/lse) and forward+backward vs SDPA cuDNN, bf16
#   bench     forward TFLOP/s sm90 / sm80 / cuDNN
#   kernels   tools/kernel_check.py correctness (every feature; sm90 where it applies, else sm80)
#   memcheck / racecheck   compute-sanitizer on tools/sm90_check.py sanitizebwd
# Logs go to $OUT (or /tmp/fmx_out). Each stage has its own timeout (STAGE_TIMEOUT, default 150 s;
# bwd: BWD_TIMEOUT per variant, default 150 s: 44 cases took ~63 s on the H200, 2026-11-30).
set -u
STAGES=${*:-bwd benchbwd kernels}
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/fmx_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/cutl/cutlass_library ]; then
  pip install -q --no-deps --target /tmp/cutl .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl >/dev/null 2>&1 || exit 1
fi
export FLASHMUX_CUTLASS_INCLUDE=/tmp/cutl/cutlass_library/source/include
export PYTHONPATH=$ROOT/packages/core/src:$ROOT/packages/backend_cuda/src
export FLASHMUX_CACHE_DIR=/tmp/fmxcache
t0=$(date +%s)
# -DFMX_SM90_BWD_TUNING: FMX_TUNE_SM90_BWD=1 selects the bulk reduce-add dQ variant at run time
LIB=$(FLASHMUX_CUDA_NVCC_FLAGS="${SM90_NVCC_FLAGS:--lineinfo -DFMX_SM90_BWD_TUNING} -Xptxas -v" \
      python3 -m flashmux_cuda build --archs 90 -j 16 -q) || {
  tail -60 "$(ls -d /tmp/fmxcache/cuda/*/ | head -1)build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
BD=$(dirname "$LIB")
cp "$BD/build.log" "$OUTDIR/build.log"
grep -A2 "Compiling entry function.*sm90.*_kernel" "$BD/build.log" | grep -E "spill|Used" | sort | uniq -c
cd packages/backend_cuda
T=${STAGE_TIMEOUT:-150}
# FMX_TUNE_SM90_BWD values checked by bwd, timed by benchbwd: 0 default, 1 bulk dQ, 2 flipped
# GEMM issue order (bf16), 3 per-warpgroup dQ partials (hd64 bf16; hd128 runs the default)
VARIANTS=${SM90_BWD_VARIANTS:-0 1 2 3}
export FMX_BWD_VARIANTS=$(echo $VARIANTS | tr ' ' ',')
for s in $STAGES; do
  ts=$(date +%s)
  case $s in
    bwd)
      okv=""
      for v in $VARIANTS; do
        # the default in both dtypes (~63 s on the H200), the tuning variants in bf16 only
        dts=bf16; [ "$v" = 0 ] && dts=bf16,f16
        FMX_BWD_DTYPES=$dts FMX_TUNE_SM90_BWD=$v timeout ${BWD_TIMEOUT:-150} \
          python3 tools/sm90_check.py "$LIB" bwd > "$OUTDIR/bwd$v.log" 2>&1
        echo "== bwd variant $v rc=$? $(( $(date +%s) - ts )) s"; grep -v "^ok" "$OUTDIR/bwd$v.log" | tail -30
        # time only variants without a failed case (a deadlock would also hang the benchmark:
        # the stage timeouts bound that)
        grep -q "^ok" "$OUTDIR/bwd$v.log" && ! grep -q "^FAIL" "$OUTDIR/bwd$v.log" && okv="$okv $v"
      done
      [ -z "$okv" ] && { echo "no variant passed: stopping"; break; }
      export FMX_BWD_VARIANTS=$(echo $okv | tr ' ' ',') ;;
    fwd|bench|benchbwd)
      timeout $T python3 tools/sm90_check.py "$LIB" $s > "$OUTDIR/$s.log" 2>&1
      echo "== $s rc=$? $(( $(date +%s) - ts )) s"; grep -v "^ok" "$OUTDIR/$s.log" | tail -40 ;;
    kernels)
      timeout $T python3 tools/kernel_check.py "$LIB" correctness > "$OUTDIR/kernels.log" 2>&1
      echo "== kernels rc=$? $(( $(date +%s) - ts )) s"; grep -v "^ok" "$OUTDIR/kernels.log" | tail -20 ;;
    memcheck|racecheck)
      timeout $T compute-sanitizer --tool $s python3 tools/sm90_check.py "$LIB" sanitizebwd > "$OUTDIR/$s.log" 2>&1
      echo "== $s rc=$? $(( $(date +%s) - ts )) s"; grep -v "^ok" "$OUTDIR/$s.log" | tail -8 ;;
  esac
done
echo "total: $(( $(date +%s) - t0 )) s"
