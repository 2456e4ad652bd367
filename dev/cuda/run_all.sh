#!/usr/bin/env bash
# Builds every kernel study in both precisions and runs it; prints the studies' PASS/FAIL lines
# and timings. Needs a GPU. Usage: bash dev/cuda/run_all.sh [OUTDIR]
set -u
cd "$(dirname "$0")" || exit 1
out=${1:-}
status=0
for precision in FP32 BF16; do
    if ! make -s -j"$(nproc)" PRECISION=$precision > /tmp/dev_cuda_build_$precision.log 2>&1; then
        cat /tmp/dev_cuda_build_$precision.log
        echo "FAIL dev_cuda_build[$precision]: see the log above"
        status=1
        continue
    fi
    for bin in "bin/$precision"/*; do
        name=$(basename "$bin")
        echo "== $name ($precision)"
        if [ -n "$out" ]; then "$bin" | tee "$out/dev_cuda_${name}_$precision.txt"; else "$bin"; fi
        rc=${PIPESTATUS[0]}
        if [ "$rc" -ne 0 ]; then status=1; fi
    done
done
exit $status
