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

# build NAME SOURCE PRECISION: the translated SOURCE into $OUT/NAME_PRECISION. CUDA code reads
# bf16 pairs through uint32_t pointers, which nvcc allows: no strict aliasing for g++ either.
build() {
    local name=$1 source=$2 precision=$3
    local flags
    flags=$([ "$precision" = FP32 ] && echo "-DENABLE_FP32" || echo "")
    # shellcheck disable=SC2086
    if ! $CXX -x c++ -std=c++17 -O2 -fno-strict-aliasing -w -fopenmp $flags -include "$PWD/tests/emu/cuda_emu.h" -o "$OUT/${name}_$precision" \
        "$OUT/src/$source" >> "$OUT/build.log" 2>&1; then
        tail -n 20 "$OUT/build.log"
        echo "FAIL emu.build[$name $precision]: the translated sources did not build"
        return 1
    fi
    echo "PASS emu.build[$name $precision]: for the CPU emulation of CUDA"
}

for precision in FP32 BF16; do
    if build test_moe test_moe.cu $precision; then
        bin=$OUT/test_moe_$precision
        for options_file in "$STATES"/*.options; do
            name=$(basename "$options_file" .options)
            log=$OUT/$name.$precision.out
            # shellcheck disable=SC2046
            "$bin" reference "$name" "$STATES/$name.state" "$STATES/$name.ref.bin" -- -m "$STATES/dense.bin" -i "$STATES/shard.bin" \
                $GEOMETRY $(cat "$options_file") > "$log" 2>&1
            rc=$?
            grep -E '^(PASS|FAIL|SKIP) ' "$log" | sed -E 's/^(PASS|FAIL|SKIP) /\1 emu./'
            if [ $rc -ne 0 ] && ! grep -q '^FAIL ' "$log"; then
                echo "FAIL emu.$name.$precision: exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
            fi
        done
        log=$OUT/invariants.$precision.out
        "$bin" invariants "$STATES/dense.bin" "$STATES/shard.bin" > "$log" 2>&1
        rc=$?
        grep -E '^(PASS|FAIL) ' "$log" | sed -E 's/^(PASS|FAIL) /\1 emu./'
        if [ $rc -ne 0 ] && ! grep -q '^FAIL ' "$log"; then
            echo "FAIL emu.invariants.$precision: exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
        fi
    fi
    for study in "$OUT"/src/dev/cuda/*.cu; do
        name=$(basename "$study" .cu)
        build "$name" "dev/cuda/$name.cu" $precision || continue
        log=$OUT/dev_cuda_$name.$precision.out
        "$OUT/${name}_$precision" 0 --quick > "$log" 2>&1
        rc=$?
        # the study's own SKIP lines (a version not built for this precision) are not checks
        grep -E '^(PASS|FAIL) ' "$log" | sed -E "s/^(PASS|FAIL) /\1 emu.dev_cuda.$name.$precision: /"
        if [ $rc -ne 0 ] && ! grep -q '^FAIL ' "$log"; then
            echo "FAIL emu.dev_cuda.$name.$precision: exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
        fi
    done
done
exit 0
