#!/usr/bin/env bash
# The GPU engine's own kernels, run on the CPU through the CUDA emulation (tests/emu/cuda_emu.h):
# test_moe, built in FP32 from the translated sources, against the same PyTorch reference states
# and invariants that tests/gpu_tests.sh runs on a GPU. Called by tests/run_tests.sh with its
# temporary folder (NAME.state, NAME.options, dense.bin, shard.bin). Every check is prefixed
# "emu." so that it is never mistaken for a check on a GPU.
set -u
cd "$(dirname "$0")/../.."
STATES=$1
OUT=$STATES/emu
mkdir -p "$OUT"
CXX=${CXX:-g++}
if ! ${PYTHON_ANY:-python3} tests/emu/translate.py . "$OUT/src" > "$OUT/build.log" 2>&1 ||
   ! $CXX -x c++ -std=c++17 -O2 -w -fopenmp -DENABLE_FP32 -include "$PWD/tests/emu/cuda_emu.h" \
        -o "$OUT/test_moe" "$OUT/src/test_moe.cu" >> "$OUT/build.log" 2>&1; then
    head -n 20 "$OUT/build.log"
    echo "FAIL emu.build: the translated GPU sources did not build"
    exit 1
fi
echo "PASS emu.build: test_moe (FP32) for the CPU emulation of CUDA"
GEOMETRY="-b 4 -t 16"
for options_file in "$STATES"/*.options; do
    name=$(basename "$options_file" .options)
    # shellcheck disable=SC2046
    "$OUT/test_moe" reference "$name" "$STATES/$name.state" "$STATES/$name.ref.bin" -- -m "$STATES/dense.bin" -i "$STATES/shard.bin" \
        $GEOMETRY $(cat "$options_file") > "$OUT/$name.out" 2>&1
    rc=$?
    grep -E '^(PASS|FAIL) ' "$OUT/$name.out" | sed -E 's/^(PASS|FAIL) /\1 emu./'
    if [ $rc -ne 0 ] && ! grep -q '^FAIL ' "$OUT/$name.out"; then
        echo "FAIL emu.$name: exit status $rc: $(tail -n 3 "$OUT/$name.out" | tr '\n' ' ')"
    fi
done
"$OUT/test_moe" invariants "$STATES/dense.bin" "$STATES/shard.bin" > "$OUT/invariants.out" 2>&1
rc=$?
grep -E '^(PASS|FAIL) ' "$OUT/invariants.out" | sed -E 's/^(PASS|FAIL) /\1 emu./'
if [ $rc -ne 0 ] && ! grep -q '^FAIL ' "$OUT/invariants.out"; then
    echo "FAIL emu.invariants: exit status $rc: $(tail -n 3 "$OUT/invariants.out" | tr '\n' ' ')"
fi
exit 0
