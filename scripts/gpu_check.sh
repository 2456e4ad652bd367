#!/usr/bin/env bash
# Everything that needs a GPU, in one command (design.md, "GPU verification"); under nine minutes
# on one H100. The GPU and the toolchain first, then the parts, the most telling first (a run cut
# short still says whether the engine is right):
#   build    train_moe and test_moe for sm_90, FP32 and BF16, and the dev/cuda kernel studies,
#            all at once: the parts after it build nothing more
#   tests    make test's GPU share (GPU_ONLY=1): the PyTorch reference's states, checked against
#            the CPU twin, then test_moe in both precisions against them, and its invariants,
#            and under compute-sanitizer (tests/gpu_sanitize.sh: memcheck, racecheck, synccheck),
#            with the binaries of the build part (the CPU-only checks, the builds for sm_80 and
#            the CUDA emulation are CI's: a GPU machine's time is short)
#   train    short trainings on Tiny Shakespeare: dense GPT-2 124M shape, then upcycled to 8 experts
#   studies  every dev/cuda kernel study: validation against the CPU twin and timing, both precisions
#   bench    the benchmark (scripts/bench.sh; with LLMC=path/to/llm.c, llm.c's train_gpt2cu beside it)
# With GPU_PREBUILT=ARCHIVE (scripts/gpu_prebuild.sh's, made on a machine without a GPU and
# carried here), every part takes its binaries instead of compiling, where they were built from
# these very sources and start on this machine; else the build part builds as usual.
# scripts/gpu_prepare.sh makes that archive and the data ready for a GPU machine that gets a copy
# of this checkout, and prints the one call that runs this check there.
# Each part has a time limit (LIMIT_S=N sets them all), and DEADLINE_S=N bounds the whole check
# (see part below).
# Usage: scripts/gpu_check.sh OUTDIR [PART...] (default: all five, in this order). Writes
# OUTDIR/report.md (a pass/fail table with timings, a row as each part ends) and the logs of each
# part beside it; a second call with the parts left over adds to the same report. Tiny
# Shakespeare comes from dev/data (prepared), or from $SHARED_DATA/tinyshakespeare.txt and
# $SHARED_DATA/gpt2 (default ../shared/data).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [build] [tests] [train] [studies] [bench]}
shift
PARTS=${*:-build tests train studies bench}
for p in $PARTS; do
    case $p in build | tests | train | studies | bench) ;; *) echo "gpu_check: unknown part '$p' (build, tests, train, studies, bench)"; exit 2 ;; esac
done
wants() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
REPORT=$OUT/report.md
SHARED_DATA=${SHARED_DATA:-../shared/data}
status=0
{
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'): $PARTS"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
    # which code: git's commit where there is a .git (a device call's copy has none), and always the
    # checksum of the sources the binaries are built from (scripts/gpu_prebuild.sh's)
    echo "sources: $(bash scripts/gpu_prebuild.sh --sources-checksum)$(git rev-parse --short HEAD 2>/dev/null | sed 's/^/, git commit /')"
    echo
    echo "| part | result | seconds |"
    echo "|---|---|---|"
} >> "$REPORT"

# part NAME LOG LIMIT command...: runs it (a command, or a function of this script), stopped with
# all its processes after LIMIT seconds, so that a part that hangs on the GPU (a kernel that never
# ends) costs its limit, not the lease (LIMIT_S=N: every part's limit N seconds); adds a table row.
# DEADLINE_S=N: the whole check ends within about N seconds of its start (a GPU lent for a fixed
# time, whose end would otherwise cut a part short with no row): a part gets at most the time left,
# less the 10 s its stop may take, and one that finds no time left is not started; the rows say so.
START=$SECONDS
part() {
    local name=$1 log=$2 limit=${LIMIT_S:-$3}; shift 3
    local t0=$SECONDS stop="after its limit of $limit s" left
    if [ -n "${DEADLINE_S:-}" ]; then
        left=$((DEADLINE_S - (SECONDS - START) - 10))
        if [ "$left" -lt 1 ]; then
            echo "| $name | NOT RUN (no time left before DEADLINE_S=$DEADLINE_S) | 0 |" >> "$REPORT"; status=1
            return
        fi
        [ "$left" -lt "$limit" ] && { limit=$left; stop="at DEADLINE_S=$DEADLINE_S, after $limit s"; }
    fi
    timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >> "$OUT/$log" 2>&1
    local rc=$?
    local result=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result="FAIL (stopped $stop)"; status=1
    elif [ "$rc" -ne 0 ]; then
        result="FAIL (exit $rc)"; status=1
    fi
    echo "| $name | $result | $((SECONDS - t0)) |" >> "$REPORT"
}

export FP32_BUILD=/tmp/gpu_check_fp32  # the FP32 train_moe and test_moe; the BF16 ones go here (./train_moe)
DEV_CUDA_PREBUILT=               # the kernel studies' folder where they were prebuilt (dev/cuda/run_all.sh)
# shellcheck disable=SC2317  # called through part
build_all() {  # everything at once (nvcc uses one core a file): train_moe and test_moe in both precisions, the studies
    local pids=() rc=0
    make -s -j2 train_moe test_moe PRECISION=FP32 GPU_ARCHS=90 BUILD="$FP32_BUILD" & pids+=($!)
    make -s -j2 train_moe test_moe PRECISION=BF16 GPU_ARCHS=90 & pids+=($!)
    make -s -j4 -C dev/cuda PRECISION=FP32 GPU_ARCH=90 & pids+=($!)
    make -s -j4 -C dev/cuda PRECISION=BF16 GPU_ARCH=90 & pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return "$rc"
}
export -f build_all  # part runs it in a bash of its own
# prebuilt_usable DIR: whether DIR (scripts/gpu_prebuild.sh) holds every binary, built from the
# sources here, for this GPU (sm_90), each finding its libraries here (a build machine's newer
# glibc or another CUDA would not); says why not
prebuilt_usable() {
    local dir=$1 bin missing arch
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.')
    [ -z "$arch" ] || [ "$arch" = 90 ] || { echo "prebuilt: built for sm_90, this GPU is sm_$arch: building here"; return 1; }
    [ "$(cat "$dir/sources" 2>/dev/null)" = "$(bash scripts/gpu_prebuild.sh --sources-checksum)" ] ||
        { echo "prebuilt: $dir was built from other sources (or not at all): building here"; return 1; }
    for bin in "$dir"/FP32/train_moe "$dir"/FP32/test_moe "$dir"/BF16/train_moe "$dir"/BF16/test_moe "$dir"/dev_cuda/*/*; do
        [ -x "$bin" ] || { echo "prebuilt: no $bin: building here"; return 1; }
        missing=$(ldd "$bin" 2>&1 | grep "not found")
        [ -z "$missing" ] || { echo "prebuilt: $bin does not start here ($missing): building here"; return 1; }
    done
    "$dir/BF16/train_moe" -h > /dev/null 2>&1 || { echo "prebuilt: $dir/BF16/train_moe -h failed: building here"; return 1; }
}
use_prebuilt=false
PREBUILT_DIR=/tmp/gpu_check_prebuilt
if [ -n "${GPU_PREBUILT:-}" ] && rm -rf "$PREBUILT_DIR" && mkdir -p "$PREBUILT_DIR" &&
    tar -xzf "$GPU_PREBUILT" -C "$PREBUILT_DIR" >> "$OUT/build.log" 2>&1 && prebuilt_usable "$PREBUILT_DIR" >> "$OUT/build.log" 2>&1; then
    use_prebuilt=true  # for every part, also in a later call that does not name the build part
    FP32_BUILD=$PREBUILT_DIR/FP32
    DEV_CUDA_PREBUILT=$PREBUILT_DIR/dev_cuda
    cp "$PREBUILT_DIR/BF16/train_moe" "$PREBUILT_DIR/BF16/test_moe" .
    if [ -x "${LLMC:-/nonexistent}/train_gpt2cu_bench" ] && ldd "$LLMC/train_gpt2cu_bench" 2>&1 | grep -q "not found"; then
        rm -f "$LLMC/train_gpt2cu_bench"  # it does not start here: scripts/bench.sh builds it
    fi
fi
if wants build; then
    if $use_prebuilt; then
        part "prebuilt train_moe, test_moe and dev/cuda studies of $GPU_PREBUILT taken (sm_90, from these sources)" build.log 10 true
    else
        mkdir -p "$FP32_BUILD"
        part "build train_moe, test_moe and the dev/cuda studies (sm_90, FP32 and BF16; the trainings use BF16)${GPU_PREBUILT:+; $GPU_PREBUILT not used, build.log says why}" build.log 600 build_all
    fi
fi
export SHARED_DATA
if wants tests; then
    prebuilt=()  # the build part's binaries, where it ran (else make test builds its own)
    [ -x ./test_moe ] && [ -x "$FP32_BUILD/test_moe" ] && prebuilt=(CUDA_PREBUILT_BF16=. "CUDA_PREBUILT_FP32=$FP32_BUILD")
    part "make test, GPU share (reference states vs the CPU twin, test_moe FP32 and BF16)" tests.log 300 \
        env GPU_ONLY=1 "${prebuilt[@]}" make --no-print-directory test
fi
if { wants train || wants bench; } && [ ! -f dev/data/tinyshakespeare/tiny_shakespeare_train.bin ]; then
    part "prepare Tiny Shakespeare" train.log 120 python3 dev/data/prepare.py --input "$SHARED_DATA/tinyshakespeare.txt" --bpe-dir "$SHARED_DATA/gpt2"
fi
if wants train && [ ! -x ./train_moe ]; then  # bench.sh builds it itself
    part "build train_moe (sm_90, BF16)" build.log 600 make -s train_moe PRECISION=BF16 GPU_ARCHS=90
fi
# shellcheck disable=SC2317  # called through part
train_check() {  # trains (exit status 0: it stops with an error if a loss is not finite), then checks that the loss fell
    ./train_moe "$@" 2>&1 | tee -a "$OUT/train.log" | grep -E '^step +[0-9]+/' > /tmp/gpu_check_steps.txt
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "train_moe exited with status $rc"; return 1; }
    local first last
    first=$(head -n 1 /tmp/gpu_check_steps.txt | awk '{print $5}')
    last=$(tail -n 1 /tmp/gpu_check_steps.txt | awk '{print $5}')
    echo "loss $first -> $last"
    awk -v a="$first" -v b="$last" 'BEGIN { exit !(b == b + 0 && b < a) }'
}
export -f train_check  # part runs it in a bash of its own
export OUT
DATA="-i dev/data/tinyshakespeare/tiny_shakespeare_train.bin -j dev/data/tinyshakespeare/tiny_shakespeare_val.bin"
if wants train; then
    # shellcheck disable=SC2086
    part "train dense d12 from scratch, 60 steps (loss falls)" train.log 150 train_check -m d12 -e 1 $DATA -b 8 -t 1024 -x 60 -l 6e-4 -u 10 -v 30 -s 60 -o /tmp/gpu_check_dense
    # shellcheck disable=SC2086
    part "upcycle to 8 experts top-2, 30 steps (loss falls)" train.log 150 train_check -m /tmp/gpu_check_dense/model_00000060.bin -e 8 -k 2 --init drop $DATA -b 8 -t 1024 -x 30 -l 3e-4 -v 15 -s 30 --stats-every 10
fi
if wants studies; then
    part "dev/cuda kernel studies (FP32 and BF16)" dev_cuda.log 240 env DEV_CUDA_PREBUILT="$DEV_CUDA_PREBUILT" bash dev/cuda/run_all.sh
fi
if wants bench; then
    part "benchmark (scripts/bench.sh)" bench.log 300 bash scripts/bench.sh "$OUT/bench.md"
fi

{
    if wants tests || wants studies; then
        echo
        echo "## test results"
        echo
        echo '```'
        if wants tests; then grep -E 'passed, .* failed|^FAIL|^GPU tests skipped' "$OUT/tests.log"; fi
        if wants studies; then
            grep -c '^PASS' "$OUT/dev_cuda.log" | sed 's/^/dev\/cuda checks passed: /'
            grep -E '^FAIL' "$OUT/dev_cuda.log"
        fi
        echo '```'
    fi
    if wants bench; then
        echo
        echo "## benchmark"
        echo
        cat "$OUT/bench.md" 2>/dev/null
    fi
    echo
} >> "$REPORT"
cat "$REPORT"
exit $status
