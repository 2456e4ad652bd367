#!/usr/bin/env bash
# Builds every kernel study in both precisions and runs it; prints the studies' PASS/FAIL lines
# and timings. Needs a GPU. Usage: bash dev/cuda/run_all.sh [OUTDIR]
# DEV_CUDA_PREBUILT=DIR: runs the binaries in DIR/FP32 and DIR/BF16 instead of building (those of
# scripts/gpu_prebuild.sh, which scripts/gpu_check.sh has checked were built from these sources)
set -u
cd "$(dirname "$0")" || exit 1
out=${1:-}
bin_root=${DEV_CUDA_PREBUILT:-bin}
status=0
for precision in FP32 BF16; do
    if [ -z "${DEV_CUDA_PREBUILT:-}" ] && ! make -s -j"$(nproc)" PRECISION=$precision > /tmp/dev_cuda_build_$precision.log 2>&1; then
        cat /tmp/dev_cuda_build_$precision.log
        echo "FAIL dev_cuda_build[$precision]: see the log above"
        status=1
        continue
    fi
    for bin in "$bin_root/$precision"/*; do
        name=$(basename "$bin")
        echo "== $name ($precision)"
        if [ -n "$out" ]; then "$bin" | tee "$out/dev_cuda_${name}_$precision.txt"; else "$bin"; fi
        rc=${PIPESTATUS[0]}
        if [ "$rc" -ne 0 ]; then status=1; fi
    done
done
exit $status
