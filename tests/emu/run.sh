#!/usr/bin/env bash
# The GPU engine's own kernels, run on the CPU through the CUDA emulation (tests/emu/cuda_emu.h):
# test_moe, built in FP32 and BF16 from the translated sources (BF16 with the CUDA-core attention:
# the tensor-core one is inline PTX), against the same PyTorch reference states and invariants
# that tests/gpu_tests.sh runs on a GPU. Called by tests/run_tests.sh with its
# temporary folder (NAME.state, NAME.options, dense.bin, shard.bin). Every check is prefixed
# "emu." so that it is never mistaken for a check on a GPU.
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
for precision in FP32 BF16; do
    flags=$([ $precision = FP32 ] && echo "-DENABLE_FP32" || echo "-DATTENTION_TILED_ONLY")
    bin=$OUT/test_moe_$precision
    # shellcheck disable=SC2086
    if ! $CXX -x c++ -std=c++17 -O2 -w -fopenmp $flags -include "$PWD/tests/emu/cuda_emu.h" -o "$bin" "$OUT/src/test_moe.cu" >> "$OUT/build.log" 2>&1; then
        head -n 20 "$OUT/build.log"
        echo "FAIL emu.build[$precision]: the translated GPU sources did not build"
        continue
    fi
    echo "PASS emu.build[$precision]: test_moe for the CPU emulation of CUDA"
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
done
exit 0
