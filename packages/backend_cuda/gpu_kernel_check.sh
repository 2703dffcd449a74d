#!/usr/bin/env bash
# GPU check of the CUDA kernels through the C ABI, standalone (no glue, no ninja): builds
# libflashmux_cuda for sm_90 with nvcc, then runs the stages named on the command line
# (default: correctness big sanitize bench). Extra stages: profile (ncu of ours and SDPA flash,
# hd128), variants (rebuilds the tuning variants listed in VARIANTS and benchmarks each).
# Run from the repository root on the GPU machine with .carry/nvidia_cutlass-4.2.0.0-*.whl.
set -u
STAGES=${*:-correctness big sanitize bench}
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/fmx_out}
mkdir -p "$OUTDIR"
if [ ! -d /tmp/cutl/cutlass_library ]; then
  pip install -q --no-deps --target /tmp/cutl .carry/nvidia_cutlass-4.2.0.0-py3-none-any.whl 2>/dev/null || exit 1
fi
INC=/tmp/cutl/cutlass_library/source/include
cd packages/backend_cuda

# build DIR [extra nvcc flags...]: every csrc/**/*.cu -> DIR/libfmx.so (sm_90)
build() {
  local B=$1; shift
  mkdir -p $B
  local t0=$(date +%s)
  find csrc -name '*.cu' | FLAGS="$*" B=$B INC=$INC xargs -P 16 -I{} sh -c \
    'o=$B/$(echo {} | tr / _).o; nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -I$INC $FLAGS -Xcompiler -fPIC -Xptxas -v -c {} -o $o > $o.log 2>&1 || { echo BUILD FAIL {}; tail -30 $o.log; }'
  nvcc -shared -o $B/libfmx.so $B/*.o || { echo LINK FAIL; return 1; }
  echo "build $B: $(( $(date +%s) - t0 )) s"
}

# TUNE="NAME:FMX_TUNE_BWD64=1,... NAME2:..." builds the tuning variants too (-DFMX_TUNING);
# stages tune (bench every spec beside SDPA flash) and tunecheck (bf16 correctness per spec).
# FMX_TUNE_SEQS=2048,4096,16384 sets the sequence lengths of the tune sweep (default 4096,16384),
# FMX_TUNE_DIMS=96 its head dims (default 64,128).
# SKIP_BUILD=1 reuses /tmp/fmxb from an earlier call of this script on the same machine.
if [ -z "${SKIP_BUILD:-}" ] || [ ! -f /tmp/fmxb/libfmx.so ]; then
  build /tmp/fmxb -lineinfo ${TUNE:+-DFMX_TUNING} || exit 1
fi
for f in /tmp/fmxb/*.log; do
  n=$(grep -c "spill stores" $f); s=$(grep -o "[0-9]* bytes spill stores" $f | sort -n | tail -1)
  [ -n "$s" ] && echo "  $(basename $f .o.log): max $s"
done
export PYTHONPATH=$ROOT/packages/core/src PYTHONUNBUFFERED=1
LIB=/tmp/fmxb/libfmx.so
for s in $STAGES; do
  case $s in
    correctness) timeout 240 python3 tools/kernel_check.py $LIB correctness 2>&1 | tee $OUTDIR/correctness.log | grep -v "^ok" ;;
    big) timeout 120 python3 tools/kernel_check.py $LIB big 2>&1 | tee $OUTDIR/big.log ;;
    sanitize)
      timeout 200 compute-sanitizer --tool memcheck python3 tools/kernel_check.py $LIB sanitize > $OUTDIR/memcheck.log 2>&1
      tail -4 $OUTDIR/memcheck.log
      timeout 240 compute-sanitizer --tool racecheck python3 tools/kernel_check.py $LIB sanitize > $OUTDIR/racecheck.log 2>&1
      tail -4 $OUTDIR/racecheck.log ;;
    profile)
      timeout 240 ncu --clock-control none -k "regex:${PROFILE_KERNELS:-fwd_kernel|bwd_kernel|dq_dk_dv}" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section InstructionStats --section SourceCounters --print-details all \
        python3 tools/kernel_check.py $LIB profile > $OUTDIR/ncu.log 2>&1
      grep -E "^  [a-z_:]+.*\(|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc A|Stall|Block Limit" $OUTDIR/ncu.log | head -80 ;;
    tune) timeout 280 python3 tools/kernel_check.py $LIB tune "default:" $TUNE 2>&1 | tee $OUTDIR/tune.log | grep -v "^\. " ;;
    tunecheck) timeout 240 python3 tools/kernel_check.py $LIB correctness_bf16 $TUNE 2>&1 | tee $OUTDIR/tunecheck.log | grep -v "^ok" ;;
    benchlite) timeout 120 python3 tools/kernel_check.py $LIB benchlite "V0 default" 2>&1 | tee -a $OUTDIR/variants.log ;;
    bench) timeout 300 python3 tools/kernel_check.py $LIB bench 2>&1 | tee $OUTDIR/bench.log ;;
    variants)
      i=0
      while IFS='|' read -r name flags; do
        [ -z "$name" ] && continue
        i=$((i+1))
        build /tmp/fmxv$i $flags > /tmp/fmxv$i.buildlog 2>&1 || { cat /tmp/fmxv$i.buildlog; continue; }
        timeout 120 python3 tools/kernel_check.py /tmp/fmxv$i/libfmx.so benchlite "$name: $flags" 2>&1 | tee -a $OUTDIR/variants.log
      done < $ROOT/${VARIANTS:-/dev/null} ;;
  esac
done
