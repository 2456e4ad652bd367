#!/usr/bin/env bash
# A dry run, on a machine without a GPU, of the GPU-only paths of the scripts: scripts/gpu_check.sh's
# build and tests parts with GPU_PREBUILT, which run make test's GPU share (GPU_ONLY=1) and in it
# the GPU branch of tests/gpu_tests.sh (test_moe against the reference states and its invariants
# in both precisions, train_moe against the twin, --breakdown, tests/gpu_sanitize.sh with a
# stand-in compute-sanitizer that runs test_moe as it is). The binaries are the GPU engine's
# own sources built for the CUDA emulation (tests/emu), packed by scripts/gpu_prebuild.sh --pack;
# nvidia-smi is a stand-in that reports one sm_90 GPU. What it checks is the scripts'
# plumbing, the branches that make test takes only on a GPU: the kernels' results are checked by
# make test's emulation section already. About 6 minutes on 2 cores; not part of make test.
# Usage: tests/fake_gpu.sh [OUTDIR]   (default /tmp/fake_gpu; gpu_check's report is OUTDIR/report.md)
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-/tmp/fake_gpu}
WORK=$(mktemp -d /tmp/fake_gpu_build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT" "$WORK/bin" "$WORK/prebuilt/FP32" "$WORK/prebuilt/BF16"
OUT=$(cd "$OUT" && pwd)  # gpu_check runs elsewhere
cat > "$WORK/bin/nvidia-smi" << 'EOF'
#!/bin/sh
# stand-in: one GPU of compute capability 9.0 (the CUDA emulation)
case "$*" in
    *-L*) echo "GPU 0: CUDA emulation (tests/emu), not a GPU" ;;
    *name*) echo "CUDA emulation (tests/emu), 81559 MiB, none, 9.0" ;;
    *compute_cap*) echo "9.0" ;;
    *) echo "CUDA emulation (tests/emu)" ;;
esac
EOF
# stand-in: runs the program as it is and reports no errors, so that tests/gpu_sanitize.sh's runs
# and its reading of their logs go through (the emulation's sanitized builds look for memory errors)
cat > "$WORK/bin/compute-sanitizer" << 'EOF'
#!/bin/sh
while [ "$#" -gt 0 ] && [ "${1#--}" != "$1" ]; do shift 2; done
"$@"
rc=$?
echo "========= ERROR SUMMARY: 0 errors (a stand-in, tests/fake_gpu.sh)"
exit $rc
EOF
chmod +x "$WORK/bin/nvidia-smi" "$WORK/bin/compute-sanitizer"
python3 tests/emu/translate.py . "$WORK/src" > "$WORK/translate.log" 2>&1 || { cat "$WORK/translate.log"; exit 1; }
# build SOURCE PRECISION BINARY: the translated SOURCE for the emulation
build() { mkdir -p "$(dirname "$3")" && bash tests/emu/compile.sh "$WORK/src/$1" "$2" "$3"; }
t0=$SECONDS
pids=()
for precision in FP32 BF16; do
    for name in train_moe test_moe; do build "$name.cu" $precision "$WORK/prebuilt/$precision/$name" & pids+=($!); done
    for study in dev/cuda/*.cu; do
        name=$(basename "$study" .cu)
        build "dev/cuda/$name.cu" $precision "$WORK/prebuilt/dev_cuda/$precision/$name" & pids+=($!)
        while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n; done
    done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status -eq 0 ] || { echo "fake_gpu: an emulated build failed"; exit 1; }
bash scripts/gpu_prebuild.sh --pack "$WORK/prebuilt" "$WORK/prebuilt.tar.gz" || exit 1
# gpu_check runs in a copy of the checkout (tracked and untracked files, not the ignored): it puts
# the prebuilt train_moe and test_moe in its root, where this checkout may have real ones
mkdir -p "$WORK/tree"
git ls-files -z -c -o --exclude-standard | xargs -0 cp --parents -t "$WORK/tree" || exit 1
shared=$(cd "${SHARED_DATA:-../shared/data}" 2> /dev/null && pwd)
echo "fake_gpu: emulated binaries built in $((SECONDS - t0)) s; gpu_check.sh build tests"
# the emulation is slow: every part, and every sanitizer run, may take 1200 s (the limits are set
# for a GPU)
PATH=$WORK/bin:$PATH LIMIT_S=1200 SANITIZE_LIMIT_S=1200 GPU_PREBUILT=$WORK/prebuilt.tar.gz SHARED_DATA=${shared:-../shared/data} bash "$WORK/tree/scripts/gpu_check.sh" "$OUT" build tests
