#!/usr/bin/env bash
# GPU check of the CUDA kernels through the C ABI, standalone (no glue, no ninja): builds
# libflashmux_cuda for sm_90 with nvcc, then runs the stages named on the command line
# (default: all): correctness big sanitize bench. Run from the repository root on the GPU
# machine with .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl present.
set -u
STAGES=${*:-correctness big sanitize bench}
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/fmx_out}
mkdir -p "$OUTDIR"
if [ ! -d /tmp/cutl/cutlass_library ]; then
  pip install -q --no-deps --target /tmp/cutl .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl || exit 1
fi
INC=/tmp/cutl/cutlass_library/source/include
B=/tmp/fmxb
mkdir -p $B
cd packages/backend_cuda
t0=$(date +%s)
find csrc -name '*.cu' | xargs -P 16 -I{} sh -c \
  'o='$B'/$(echo {} | tr / _).o; nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -I'$INC' -Xcompiler -fPIC -Xptxas -v -c {} -o $o > $o.log 2>&1 || { echo BUILD FAIL {}; cat $o.log; }'
nvcc -shared -o $B/libfmx.so $B/*.o || { echo LINK FAIL; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -h "spill" $B/*.log | sort | uniq -c | sort -rn | head -5
export PYTHONPATH=$ROOT/packages/core/src PYTHONUNBUFFERED=1
LIB=$B/libfmx.so
for s in $STAGES; do
  case $s in
    correctness) timeout 240 python3 tools/kernel_check.py $LIB correctness 2>&1 | tee $OUTDIR/correctness.log ;;
    big) timeout 120 python3 tools/kernel_check.py $LIB big 2>&1 | tee $OUTDIR/big.log ;;
    sanitize)
      timeout 150 compute-sanitizer --tool memcheck --kernel-name regex:fmx python3 tools/kernel_check.py $LIB sanitize 2>&1 | tail -15 | tee $OUTDIR/memcheck.log
      timeout 200 compute-sanitizer --tool racecheck --kernel-name regex:fmx python3 tools/kernel_check.py $LIB sanitize 2>&1 | tail -15 | tee $OUTDIR/racecheck.log ;;
    bench) timeout 300 python3 tools/kernel_check.py $LIB bench 2>&1 | tee $OUTDIR/bench.log ;;
  esac
done
