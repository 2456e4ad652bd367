#!/usr/bin/env bash
# compute-sanitizer over test_moe on a GPU: the hardware's own check of what the CUDA emulation
# looks for on the CPU (tests/emu: AddressSanitizer for memory errors, two thread orders for
# races), and of what it cannot see (the real warps and their scheduling). Three tools:
#   memcheck   out-of-bounds and misaligned accesses to global, local and shared memory, and the
#              faults the GPU reports;
#   racecheck  hazards between the threads of a block on shared memory (a missing barrier);
#   synccheck  barriers used wrongly (a __syncthreads not every thread reaches, a __syncwarp whose
#              mask leaves out a lane that calls it).
# Each runs `test_moe reference` (the forward, the backward, 10 steps and the forced-routing
# pass) on the small test model, in both precisions: memcheck on two configs (top-2 with a
# capacity that drops, on every other layer; expert choice), racecheck and synccheck on the first;
# and on an sm_90 GPU memcheck on the first again with version 3 of the expert GEMMs
# (--expert-gemm 3, Hopper's wgmma; BF16 only, the precision it exists in).
# The runs go at once (tests/gpu_tests.sh starts this script beside its own runs); each takes
# seconds to a minute.
#
#   tests/gpu_sanitize.sh STATES    STATES: tests/gpu_tests.sh's folder, with NAME.state,
#                                   NAME.options, dense.bin, shard.bin and cuda_PRECISION/test_moe
#
# One line per run:
#   PASS gpu_sanitize.TOOL[CONFIG.PRECISION]  the tool found 0 errors and test_moe passed
#   FAIL ...                                  the tool's errors, or test_moe failed under it
#   SKIP ...                                  no compute-sanitizer, or it cannot run on this GPU
#                                             (seen on gVisor machines: "Device not supported"):
#                                             counted neither passed nor failed
# COMPUTE_SANITIZER=path names the tool (default: on PATH, else under /usr/local/cuda*);
# SANITIZE_LIMIT_S bounds each run (default 150 s; one that runs past it fails).
set -u
cd "$(dirname "$0")/.." || exit 1
STATES=$1
DIR=$STATES/sanitize
LIMIT=${SANITIZE_LIMIT_S:-150}
# TOOL:CONFIG, or TOOL:CONFIG:wgmma for a BF16 run with --expert-gemm 3 (an sm_90 GPU only)
RUNS="memcheck:e8_k2_capacity1_drops memcheck:e4_expert_choice racecheck:e8_k2_capacity1_drops synccheck:e8_k2_capacity1_drops"
if [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" = 9.0 ]; then
    RUNS="$RUNS memcheck:e8_k2_capacity1_drops:wgmma"
fi
# an entry's parts: its tool, its config, and the name of its logs and line (CONFIG or CONFIG.wgmma)
tool_of() { echo "${1%%:*}"; }
config_of() { local rest=${1#*:}; echo "${rest%%:*}"; }
name_of() { case $1 in *:wgmma) echo "$(config_of "$1").wgmma" ;; *) config_of "$1" ;; esac; }

find_sanitizer() {
    local candidate
    if [ -n "${COMPUTE_SANITIZER:-}" ]; then echo "$COMPUTE_SANITIZER"; return; fi
    command -v compute-sanitizer 2> /dev/null && return
    for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
                     /usr/local/cuda-*/bin/compute-sanitizer /usr/local/cuda-*/compute-sanitizer/compute-sanitizer; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
}

# run ENTRY PRECISION: test_moe under the entry's tool, into $DIR/TOOL.NAME.PRECISION.out and .rc
run() {
    local tool name config precision=$2 log extra=""
    tool=$(tool_of "$1") config=$(config_of "$1") name=$(name_of "$1")
    log=$DIR/$tool.$name.$precision
    [ "$name" != "$config" ] && extra="--expert-gemm 3"
    local t0=$SECONDS
    # shellcheck disable=SC2046,SC2086
    timeout --kill-after=10 "$LIMIT" "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$STATES/cuda_$precision/test_moe" reference "$name" "$STATES/$config.state" "$STATES/$config.ref.bin" -- \
        -m "$STATES/dense.bin" -i "$STATES/shard.bin" -b 4 -t 16 $(cat "$STATES/$config.options") $extra > "$log.out" 2>&1
    echo "$? $((SECONDS - t0))" > "$log.rc"
}

# one run's line, from its log and its exit status
report_run() {
    local log=$1 label=$2 rc seconds errors checks failed
    read -r rc seconds < "$log.rc"
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$log.out" | tail -n 1 | awk '{print $3}')
    checks=$(grep -c '^PASS ' "$log.out")
    failed=$(grep -c '^FAIL ' "$log.out")
    if grep -q -i 'device not supported\|not supported on this' "$log.out" && [ "${errors:-0}" = 0 ]; then
        echo "SKIP $label: compute-sanitizer cannot run on this GPU: $(grep -m 1 -i 'not supported' "$log.out" | sed 's/^=* *//' | cut -c1-160)"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "FAIL $label: did not finish within $LIMIT s (SANITIZE_LIMIT_S), $checks checks passed by then"
    elif [ -z "$errors" ]; then
        echo "FAIL $label: exit status $rc and no ERROR SUMMARY from compute-sanitizer: $(tail -n 3 "$log.out" | tr '\n' ' ' | cut -c1-300)"
    elif [ "$errors" != 0 ]; then
        echo "FAIL $label: $errors errors; the first: $(grep -m 3 '^========= [A-Z]' "$log.out" | sed 's/^=* *//' | tr '\n' ' ' | cut -c1-300) (all in $log.out)"
    elif [ "$rc" != 0 ] || [ "$failed" != 0 ] || [ "$checks" = 0 ]; then
        echo "FAIL $label: 0 sanitizer errors, but test_moe under it: exit status $rc, $checks passed, $failed failed: $(grep -m 1 '^FAIL ' "$log.out" | cut -c1-200)"
    else
        echo "PASS $label: 0 errors over test_moe's $checks checks (all passed) in $seconds s"
    fi
}

SANITIZER=$(find_sanitizer)
if [ -z "$SANITIZER" ] || [ ! -x "$SANITIZER" ]; then
    echo "SKIP gpu_sanitize: no compute-sanitizer found (COMPUTE_SANITIZER, PATH, /usr/local/cuda*)"
    exit 0
fi
mkdir -p "$DIR"
for precision in FP32 BF16; do
    [ -x "$STATES/cuda_$precision/test_moe" ] || continue
    for entry in $RUNS; do
        case $entry in *:wgmma) [ "$precision" = BF16 ] || continue ;; esac
        [ -f "$STATES/$(config_of "$entry").options" ] && run "$entry" "$precision" &
    done
done
wait
for precision in FP32 BF16; do
    for entry in $RUNS; do
        log=$DIR/$(tool_of "$entry").$(name_of "$entry").$precision
        [ -f "$log.rc" ] && report_run "$log" "gpu_sanitize.$(tool_of "$entry")[$(name_of "$entry").$precision]"
    done
done
