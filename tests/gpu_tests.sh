#!/usr/bin/env bash
# The CUDA part of make test (called by tests/run_tests.sh with its temporary folder, which holds
# the reference states of the CPU section: NAME.state, NAME.options, dense.bin, shard.bin).
#   1. build train_moe and test_moe for sm_80 and sm_90, and the dev/cuda kernel studies for sm_90,
#      BF16 and FP32: a build error fails; every kernel of train_moe must fit its largest block in
#      the register file (tests/kernel_resources.py, from ptxas's report: what no emulation sees);
#      or, with CUDA_PREBUILT_BF16 and CUDA_PREBUILT_FP32, take the binaries in those folders;
#   2. with a GPU: test_moe against the same reference states, and its invariants, both precisions,
#      train_moe's own loop (FP32) against the twin's (tests/same_run.py), its --breakdown 1
#      (tests/breakdown.sh), and compute-sanitizer over test_moe (tests/gpu_sanitize.sh);
#      without one: train_moe's -h and its clear stop for want of a GPU, then "GPU tests skipped:
#      no GPU", nothing of the GPU suite counted.
set -u
cd "$(dirname "$0")/.." || exit 1
STATES=$1
if ! command -v "${NVCC:-nvcc}" > /dev/null 2>&1; then
    echo "FAIL cuda_build: nvcc not found (the CUDA toolkit is needed to build train_moe)"
    exit 1
fi
# build_precision PRECISION: its builds and the resource check, their lines into
# $STATES/cuda_PRECISION/results, printed afterwards in order
build_precision() {
    local precision=$1 dir=$STATES/cuda_$1 t0
    mkdir -p "$dir"
    {
        t0=$SECONDS
        if make -s -j"$(nproc)" train_moe test_moe PRECISION="$precision" GPU_ARCHS="80 90" BUILD="$dir" PTXAS_REPORT="$dir/ptx" > "$dir/build.log" 2>&1; then
            echo "PASS cuda_build[$precision]: train_moe and test_moe for sm_80 and sm_90 in $((SECONDS - t0)) s"
            python3 tests/kernel_resources.py "$precision" "$dir/build.log" "$dir/ptx"
        else
            grep -E "error|warning" "$dir/build.log" | head -n 20
            echo "FAIL cuda_build[$precision]: see the errors above"
        fi
        t0=$SECONDS
        if make -s -j"$(nproc)" -C dev/cuda PRECISION="$precision" GPU_ARCH=90 BIN="$dir/dev_cuda" > "$dir/dev_cuda_build.log" 2>&1; then
            echo "PASS dev_cuda_build[$precision]: every kernel study of dev/cuda for sm_90 in $((SECONDS - t0)) s"
        else
            grep -E "error|warning" "$dir/dev_cuda_build.log" | head -n 20
            echo "FAIL dev_cuda_build[$precision]: see the errors above"
        fi
    } > "$dir/results" 2>&1
}
# prebuilt PRECISION DIR: DIR's train_moe and test_moe (scripts/gpu_check.sh built them for this
# GPU alone, sm_90) stand in for the builds; the builds for sm_80 and the register check are CI's
prebuilt() {
    local precision=$1 from=$2 dir=$STATES/cuda_$1
    mkdir -p "$dir"
    if [ -x "$from/train_moe" ] && [ -x "$from/test_moe" ]; then
        ln -sf "$(cd "$from" && pwd)/train_moe" "$dir/train_moe"
        ln -sf "$(cd "$from" && pwd)/test_moe" "$dir/test_moe"
        echo "SKIP cuda_build[$precision]: train_moe and test_moe prebuilt in $from (the builds for sm_80 and kernel_resources: make test)" > "$dir/results"
    else
        echo "FAIL cuda_build[$precision]: no train_moe and test_moe in $from (CUDA_PREBUILT_$precision)" > "$dir/results"
    fi
}
# The two precisions build at once where there are cores for it (a GPU machine's 16: the
# section's time is then about the BF16 build's); on 2 cores that took 230 s instead of 160 s
if [ -n "${CUDA_PREBUILT_BF16:-}" ] && [ -n "${CUDA_PREBUILT_FP32:-}" ]; then
    prebuilt BF16 "$CUDA_PREBUILT_BF16"
    prebuilt FP32 "$CUDA_PREBUILT_FP32"
elif [ "$(nproc)" -ge 8 ]; then
    build_precision BF16 &
    build_precision FP32 &
    wait
else
    build_precision BF16
    build_precision FP32
fi
cat "$STATES/cuda_BF16/results" "$STATES/cuda_FP32/results"

# The GPU engine where there is no GPU: -h works, and a run stops with one clear line before it
# reads or writes anything (no output directory appears).
without_gpu() {
    local bin=$STATES/cuda_BF16/train_moe dir=$STATES/without_gpu rc
    [ -x "$bin" ] || return 0
    mkdir -p "$dir"
    "$bin" -h > "$dir/help.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && grep -q -- "--experts" "$dir/help.log"; then
        echo "PASS train_moe_help_without_gpu: exit 0, the options listed"
    else
        echo "FAIL train_moe_help_without_gpu: exit $rc: $(head -n 3 "$dir/help.log")"
    fi
    "$bin" -m "$STATES/dense.bin" -i "$STATES/shard.bin" -o "$dir/out" > "$dir/run.log" 2>&1
    rc=$?
    if [ $rc -eq 1 ] && [ "$(wc -l < "$dir/run.log")" -eq 1 ] && grep -q "no CUDA GPU found" "$dir/run.log" && [ ! -e "$dir/out" ]; then
        echo "PASS train_moe_without_gpu: exit 1, $(cat "$dir/run.log")"
    else
        echo "FAIL train_moe_without_gpu: exit $rc (expected 1, one line, no output directory): $(head -n 3 "$dir/run.log")"
    fi
}

if ! nvidia-smi -L > /dev/null 2>&1; then
    without_gpu
    echo "GPU tests skipped: no GPU"
    exit 0
fi
# compute-sanitizer's memcheck, racecheck and synccheck over test_moe (tests/gpu_sanitize.sh), beside
# the runs below: the GPU is shared, and a GPU machine has the cores; GPU_SANITIZE=0 leaves them out
sanitize_pid=""
if [ "${GPU_SANITIZE:-1}" = 1 ]; then
    bash tests/gpu_sanitize.sh "$STATES" > "$STATES/sanitize.results" 2>&1 &
    sanitize_pid=$!
fi
GEOMETRY="-b 4 -t 16"
# checks LABEL COMMAND...: the command's check lines; one that stops (a die, a fault) without a
# FAIL line of its own is a FAIL here, so that a crash is never a silent pass
checks() {
    local label=$1 out rc; shift
    out=$("$@" 2>&1)
    rc=$?
    grep -E '^(PASS|FAIL|SKIP) ' <<< "$out"
    if [ $rc -ne 0 ] && ! grep -q '^FAIL ' <<< "$out"; then
        echo "FAIL $label: exit status $rc: $(tail -n 3 <<< "$out" | tr '\n' ' ' | cut -c1-300)"
    fi
}
for precision in FP32 BF16; do
    bin=$STATES/cuda_$precision/test_moe
    [ -x "$bin" ] || continue
    for options_file in "$STATES"/*.options; do
        name=$(basename "$options_file" .options)
        # shellcheck disable=SC2046,SC2086
        checks "test_moe.$name.$precision" "$bin" reference "$name" "$STATES/$name.state" "$STATES/$name.ref.bin" -- -m "$STATES/dense.bin" \
            -i "$STATES/shard.bin" $GEOMETRY $(cat "$options_file")
    done
    checks "test_moe.invariants.$precision" "$bin" invariants "$STATES/dense.bin" "$STATES/shard.bin"
done
# version 3 of the expert GEMMs (Hopper's wgmma), which train_moe takes only when asked
# (--expert-gemm 3): every config again with it, BF16, on an sm_90 GPU (the builds above have it)
bin=$STATES/cuda_BF16/test_moe
if [ -x "$bin" ]; then
    if [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" = 9.0 ]; then
        for options_file in "$STATES"/*.options; do
            name=$(basename "$options_file" .options)
            # shellcheck disable=SC2046,SC2086
            checks "test_moe.$name.wgmma.BF16" "$bin" reference "$name.wgmma" "$STATES/$name.state" "$STATES/$name.ref.bin" -- \
                -m "$STATES/dense.bin" -i "$STATES/shard.bin" $GEOMETRY $(cat "$options_file") --expert-gemm 3
        done
    else
        echo "SKIP test_moe.wgmma: not an sm_90 GPU (version 3 of the expert GEMMs is Hopper's)"
    fi
fi
# train_moe's own loop on the GPU against the twin's, FP32: the same printed losses (tests/same_run.py)
bin=$STATES/cuda_FP32/train_moe
if [ -x "$bin" ] && [ -x ./train_moe_cpu ]; then
    same_run=$(python3 tests/same_run.py --options "$STATES")
    # shellcheck disable=SC2086
    "$bin" $same_run > "$STATES/same_run.gpu.out" 2>&1
    # shellcheck disable=SC2086
    ./train_moe_cpu $same_run > "$STATES/same_run.twin.out" 2>&1
    python3 tests/same_run.py train_moe.FP32.same_run_as_twin "$STATES/same_run.gpu.out" "$STATES/same_run.twin.out"
fi
# --breakdown 1 on the GPU: its events change nothing, and its table is whole (tests/breakdown.sh)
bin=$STATES/cuda_BF16/train_moe
if [ -x "$bin" ]; then
    bash tests/breakdown.sh train_moe.BF16 "$STATES/breakdown_gpu" -- "$bin" -m "$STATES/dense.bin" -i "$STATES/shard.bin" \
        -j "$STATES/shard.bin" -b 4 -t 16 -s 0 -v 0 --stats-every 0 -e 4 -k 2
fi
if [ -n "$sanitize_pid" ]; then
    wait "$sanitize_pid"
    cat "$STATES/sanitize.results"
fi
