#!/usr/bin/env bash
# Builds, on a machine with nvcc and no GPU, everything scripts/gpu_check.sh would build on the GPU
# machine, so that the GPU's short lease goes to running, not compiling: train_moe and test_moe
# for sm_90 in both precisions and every dev/cuda kernel study, packed in one archive (about 14 MB;
# the binaries are 53 MB unpacked, most of the 64 MiB a device call may carry); with
# LLMC=path/to/llm.c, llm.c's train_gpt2cu for sm_90 too (into that checkout, where
# scripts/bench.sh looks for it). Then, on the GPU machine:
#     GPU_PREBUILT=ARCHIVE scripts/gpu_check.sh OUTDIR
# takes these binaries where they were built from the same sources and start there (their
# libraries found: cuBLAS, cuBLASLt, glibc), and builds as usual where not. The archive records
# a checksum of the sources, so an edit after the prebuild means a build there.
# Usage: scripts/gpu_prebuild.sh [ARCHIVE]   (default .gpu_build.tar.gz, which .gitignore ignores)
#        scripts/gpu_prebuild.sh --sources-checksum   (prints the checksum of the sources now)
#        scripts/gpu_prebuild.sh --pack DIR ARCHIVE   (packs binaries built elsewhere, laid out as
#        below: FP32/ and BF16/ with train_moe and test_moe, dev_cuda/FP32/ and dev_cuda/BF16/)
set -u
cd "$(dirname "$0")/.." || exit 1
# every file the CUDA builds read (not git's list: the GPU machine's copy has no .git)
sources_checksum() {
    cat Makefile train_moe.cu test_moe.cu train_moe_cpu.cpp tests/test_common.h common/*.h kernels/*.cuh \
        dev/cuda/Makefile dev/cuda/*.cu dev/cuda/*.cuh | sha256sum | cut -c1-16
}
# pack DIR ARCHIVE: DIR's binaries and the checksum of the sources they were built from
pack() { sources_checksum > "$1/sources" && tar -czf "$2" -C "$1" .; }
if [ "${1:-}" = "--sources-checksum" ]; then sources_checksum; exit 0; fi
if [ "${1:-}" = "--pack" ]; then pack "${2:?--pack DIR ARCHIVE}" "${3:?--pack DIR ARCHIVE}"; exit; fi
ARCHIVE=${1:-.gpu_build.tar.gz}
DIR=/tmp/gpu_prebuild
rm -rf "$DIR"
mkdir -p "$DIR/FP32" "$DIR/BF16" "$DIR/dev_cuda"
t0=$SECONDS
pids=()
for precision in FP32 BF16; do
    make -s train_moe test_moe PRECISION=$precision GPU_ARCHS=90 BUILD="$DIR/$precision" > "$DIR/build_$precision.log" 2>&1 & pids+=($!)
    make -s -j2 -C dev/cuda PRECISION=$precision GPU_ARCH=90 BIN="$DIR/dev_cuda/$precision" > "$DIR/build_dev_cuda_$precision.log" 2>&1 & pids+=($!)
done
if [ -n "${LLMC:-}" ]; then
    bash scripts/bench.sh --build-llmc > "$DIR/build_llmc.log" 2>&1 & pids+=($!)
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ $status -ne 0 ]; then
    grep -h -E "error|FAIL|not built" "$DIR"/build_*.log | head -n 20
    echo "gpu_prebuild: a build failed (logs in $DIR/build_*.log)"
    exit 1
fi
rm -f "$DIR"/build_*.log
pack "$DIR" "$ARCHIVE" || exit 1
echo "gpu_prebuild: built in $((SECONDS - t0)) s, $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)), sources $(cat "$DIR/sources")"
