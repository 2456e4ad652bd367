#!/usr/bin/env bash
# The GPU engine's own kernels, run on the CPU through the CUDA emulation (tests/emu/cuda_emu.h),
# in FP32 and BF16 (BF16 with the tensor-core kernels: their inline PTX is emulated):
#   - test_moe, built from the translated sources, against the same PyTorch reference states and
#     invariants that tests/gpu_tests.sh runs on a GPU;
#   - every kernel study of dev/cuda with `0 --quick` (all versions, the small shapes, no timing).
# Called by tests/run_tests.sh with its temporary folder (NAME.state, NAME.options, dense.bin,
# shard.bin). Every check is prefixed "emu." so that it is never mistaken for a check on a GPU.
set -u
cd "$(dirname "$0")/../.."
STATES=$1
OUT=$STATES/emu
mkdir -p "$OUT"
CXX=${CXX:-g++}
if ! ${PYTHON_ANY:-python3} tests/emu/translate.py . "$OUT/src" > "$OUT/build.log" 2>&1; then
    cat "$OUT/build.log"
    echo "FAIL emu.build: tests/emu/translate.py failed"
    exit 1
fi
GEOMETRY="-b 4 -t 16"
# The builds and runs are independent single-threaded programs: JOBS of them at once (default
# one per core), each into its own log; the results are printed afterwards in a fixed order.
JOBS=${JOBS:-$(nproc)}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

# build NAME SOURCE PRECISION: the translated SOURCE into $OUT/NAME_PRECISION, log in
# $OUT/NAME_PRECISION.build. CUDA code reads bf16 pairs through uint32_t pointers, which nvcc
# allows: no strict aliasing for g++ either.
build() {
    local name=$1 source=$2 precision=$3
    local flags
    flags=$([ "$precision" = FP32 ] && echo "-DENABLE_FP32" || echo "")
    # shellcheck disable=SC2086
    $CXX -x c++ -std=c++17 -O2 -fno-strict-aliasing -w -fopenmp $flags -include "$PWD/tests/emu/cuda_emu.h" -o "$OUT/${name}_$precision" \
        "$OUT/src/$source" > "$OUT/${name}_$precision.build" 2>&1
}
# report_build NAME PRECISION: its PASS or FAIL line; fails (status 1) when it did not build
report_build() {
    local name=$1 precision=$2
    if [ -x "$OUT/${name}_$precision" ]; then
        echo "PASS emu.build[$name $precision]: for the CPU emulation of CUDA"
        return 0
    fi
    tail -n 20 "$OUT/${name}_$precision.build"
    echo "FAIL emu.build[$name $precision]: the translated sources did not build"
    return 1
}
# run LOG command...: runs it (one OpenMP thread: the jobs already fill the cores) with its
# output and exit status in LOG and LOG.rc
run() {
    local log=$1; shift
    OMP_NUM_THREADS=1 "$@" > "$log" 2>&1
    echo $? > "$log.rc"
}
# report LOG PREFIX NAME: LOG's check lines, prefixed; a crash without a FAIL line is a FAIL
report() {
    local log=$1 prefix=$2 name=$3
    grep -E '^(PASS|FAIL) ' "$log" | sed -E "s/^(PASS|FAIL) /\1 $prefix/"
    local rc
    rc=$(cat "$log.rc" 2>/dev/null || echo "?")
    if [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$log"; then
        echo "FAIL $name: exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
    fi
}

STUDIES=$(for study in "$OUT"/src/dev/cuda/*.cu; do basename "$study" .cu; done)
rm -f "$OUT"/*_FP32 "$OUT"/*_BF16
for precision in FP32 BF16; do
    throttle; build test_moe test_moe.cu $precision &
    for name in $STUDIES; do throttle; build "$name" "dev/cuda/$name.cu" $precision & done
done
wait

for precision in FP32 BF16; do
    bin=$OUT/test_moe_$precision
    if [ -x "$bin" ]; then
        for options_file in "$STATES"/*.options; do
            name=$(basename "$options_file" .options)
            throttle
            # shellcheck disable=SC2046
            run "$OUT/$name.$precision.out" "$bin" reference "$name" "$STATES/$name.state" "$STATES/$name.ref.bin" -- \
                -m "$STATES/dense.bin" -i "$STATES/shard.bin" $GEOMETRY $(cat "$options_file") &
        done
        throttle; run "$OUT/invariants.$precision.out" "$bin" invariants "$STATES/dense.bin" "$STATES/shard.bin" &
    fi
    for name in $STUDIES; do
        [ -x "$OUT/${name}_$precision" ] || continue
        throttle; run "$OUT/dev_cuda_$name.$precision.out" "$OUT/${name}_$precision" 0 --quick &
    done
done
wait

for precision in FP32 BF16; do
    if report_build test_moe $precision; then
        for options_file in "$STATES"/*.options; do
            name=$(basename "$options_file" .options)
            # test_moe's own SKIP lines (BF16 reports) pass through, not counted
            grep -E '^SKIP ' "$OUT/$name.$precision.out" | sed -E 's/^SKIP /SKIP emu./'
            report "$OUT/$name.$precision.out" "emu." "emu.$name.$precision"
        done
        report "$OUT/invariants.$precision.out" "emu." "emu.invariants.$precision"
    fi
    for name in $STUDIES; do
        # the study's own SKIP lines (a version not built for this precision) are not checks
        report_build "$name" $precision && report "$OUT/dev_cuda_$name.$precision.out" "emu.dev_cuda.$name.$precision: " "emu.dev_cuda.$name.$precision"
    done
done
exit 0
