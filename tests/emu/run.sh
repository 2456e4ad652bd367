#!/usr/bin/env bash
# The GPU engine's own kernels, run on the CPU through the CUDA emulation (tests/emu/cuda_emu.h),
# in FP32 and BF16 (BF16 with the tensor-core kernels: their inline PTX is emulated):
#   - test_moe, built from the translated sources, against the same PyTorch reference states and
#     invariants that tests/gpu_tests.sh runs on a GPU;
#   - every kernel study of dev/cuda with `0 --quick` (all versions, the small shapes, no timing).
# Everything runs twice: with the threads and blocks in ascending order, then in descending order
# (EMU_ORDER=reverse, checks prefixed "emu.reverse."), so that a race (a missing __syncthreads or
# __syncwarp) that changes a result fails in one of the two orders (see tests/emu/cuda_emu.h),
# and each run's check lines, the errors they print included, must be equal in both orders.
# The forward-order runs use builds with AddressSanitizer and -fsanitize=undefined's alignment
# and bounds checks (NAME_PRECISION.memcheck), the CPU's counterpart of compute-sanitizer's
# memcheck: a kernel that reads or writes past a cudaMalloc, its shared memory or a freed buffer,
# or loads a vector from a misaligned address, stops with the sanitizer's report, which fails
# its check (tests/emu/sanitize.cu checks that each kind is caught). The reverse-order runs use
# plain builds, about twice as fast; the memory accesses are the same in both orders.
# EMU_SANITIZE=0 skips the sanitized builds (both orders plain: faster, for a quick look).
# train_moe's own loop, at the test model's size: against the twin's in FP32 (tests/same_run.py),
# and again with no cuBLASLt algorithm for the bias epilogue (the same bytes, the biases added by a kernel),
# stopped by SIGTERM and resumed (tests/stop_run.sh), and timed by --breakdown 1 (tests/breakdown.sh).
# Then train_moe itself, sampled (EMU_SAMPLE=1: a launch of more than 64 blocks runs only its
# last block, see tests/emu/cuda_emu.h), trains one step at full width and length (T=1024, B up
# to 64, GPT-2 small and XL widths, several routers): "emu.scale" checks that every launch keeps
# to the CUDA limits, that no index overflows an int in the blocks with the largest indices,
# that copies and cuBLASLt operands stay inside their allocations, and that the device memory
# allocated is what train_moe planned before allocating; on a 4 GiB device the same run must stop
# with one out-of-memory line whose advice (the largest batch that fits) is right; the kernels
# with the most shared memory per block must fit the 99 KiB of sm_86 and sm_89 GPUs, and with
# 64 KiB the run must stop with one line that says which kernel needs more.
# Called by tests/run_tests.sh with its temporary folder (NAME.state, NAME.options, dense.bin,
# shard.bin). Every check is prefixed "emu." so that it is never mistaken for a check on a GPU.
set -u
cd "$(dirname "$0")/../.." || exit 1
STATES=$1
OUT=$STATES/emu
mkdir -p "$OUT"
CXX=${CXX:-g++}
SANITIZE_FLAGS=""
if [ "${EMU_SANITIZE:-1}" = 1 ]; then
    SANITIZE_FLAGS="-fsanitize=address,alignment,bounds,shift,signed-integer-overflow,integer-divide-by-zero,vla-bound,return,bool,enum"
    SANITIZE_FLAGS="$SANITIZE_FLAGS -fno-sanitize-recover=all -fno-omit-frame-pointer -g1"
    # leaks are not kernel errors (the test programs exit with buffers allocated)
    export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1
fi
if ! ${PYTHON_ANY:-python3} tests/emu/translate.py . "$OUT/src" > "$OUT/build.log" 2>&1; then
    cat "$OUT/build.log"
    echo "FAIL emu.build: tests/emu/translate.py failed"
    exit 1
fi
GEOMETRY="-b 4 -t 16"
# The builds and runs are independent single-threaded programs: JOBS of them at once (default
# one per core), each into its own log; the results are printed afterwards in a fixed order.
JOBS=${JOBS:-$(nproc)}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

# build NAME SOURCE PRECISION [memcheck]: the translated SOURCE into $OUT/NAME_PRECISION (with
# "memcheck": NAME_PRECISION.memcheck, sanitized), log in the same name plus .build
build() {
    local name=$1 source=$2 precision=$3 kind=${4:-}
    local flags="" binary=$OUT/${name}_$precision
    if [ "$kind" = memcheck ]; then
        flags=$SANITIZE_FLAGS
        binary=$binary.memcheck
    fi
    # shellcheck disable=SC2086
    bash tests/emu/compile.sh "$OUT/src/$source" "$precision" "$binary" $flags > "$binary.build" 2>&1
}
# binary NAME PRECISION ORDER: the build that ORDER's runs use
binary() {
    if [ "$3" = forward ] && [ -n "$SANITIZE_FLAGS" ]; then echo "$OUT/${1}_$2.memcheck"; else echo "$OUT/${1}_$2"; fi
}
# report_build NAME PRECISION [only]: the PASS or FAIL line of each of its builds (with "only":
# of the one build the forward order uses)
report_build() {
    local name=$1 precision=$2 only=${3:-}
    local binary label builds=("$OUT/${name}_$precision" ${SANITIZE_FLAGS:+"$OUT/${name}_$precision.memcheck"})
    [ -n "$only" ] && builds=("$(binary "$name" "$precision" forward)")
    for binary in "${builds[@]}"; do
        label="$name $precision$([ "${binary%.memcheck}" != "$binary" ] && echo ", sanitized")"
        if [ -x "$binary" ]; then
            echo "PASS emu.build[$label]: for the CPU emulation of CUDA"
        else
            tail -n 20 "$binary.build"
            echo "FAIL emu.build[$label]: the translated sources did not build"
        fi
    done
}
# run ORDER LOG command...: runs it with the threads in ORDER (forward or reverse) and one OpenMP
# thread (the jobs already fill the cores), its output and exit status in LOG and LOG.rc
run() {
    local order=$1 log=$2; shift 2
    EMU_ORDER=$order OMP_NUM_THREADS=1 "$@" > "$log" 2>&1
    echo $? > "$log.rc"
}
# sanitizer_report LOG: the first line of a sanitizer's report in LOG, if any
sanitizer_report() { grep -m 1 -E 'ERROR: AddressSanitizer|runtime error:' "$1" | cut -c1-300; }
# report LOG PREFIX NAME: LOG's check lines, prefixed; a crash without a FAIL line, or a
# sanitizer's report, is a FAIL
report() {
    local log=$1 prefix=$2 name=$3
    grep -E '^(PASS|FAIL) ' "$log" | sed -E "s/^(PASS|FAIL) /\1 $prefix/"
    local rc sanitizer
    rc=$(cat "$log.rc" 2>/dev/null || echo "?")
    sanitizer=$(sanitizer_report "$log")
    if [ -n "$sanitizer" ]; then
        echo "FAIL $name: stopped by the sanitizer (exit status $rc): $sanitizer"
    elif [ "$rc" != 0 ] && ! grep -q '^FAIL ' "$log"; then
        echo "FAIL $name: exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
    fi
}

STUDIES=$(for study in "$OUT"/src/dev/cuda/*.cu; do basename "$study" .cu; done)
rm -f "$OUT"/*_FP32 "$OUT"/*_BF16 "$OUT"/*.memcheck "$OUT"/*.out "$OUT"/*.out.rc "$OUT"/races "$OUT"/sanitize
$CXX -x c++ -std=c++17 -O2 -w -include "$PWD/tests/emu/cuda_emu.h" -o "$OUT/races" "$OUT/src/tests/emu/races.cu" > "$OUT/races.build" 2>&1 &
if [ -n "$SANITIZE_FLAGS" ]; then
    # shellcheck disable=SC2086
    $CXX -x c++ -std=c++17 -O2 -w $SANITIZE_FLAGS -include "$PWD/tests/emu/cuda_emu.h" -o "$OUT/sanitize" "$OUT/src/tests/emu/sanitize.cu" \
        > "$OUT/sanitize.build" 2>&1 &
fi
# the longest builds first
for kind in ${SANITIZE_FLAGS:+memcheck} plain; do
    for precision in FP32 BF16; do
        throttle; build test_moe test_moe.cu $precision "$kind" &
    done
done
for precision in FP32 BF16; do
    throttle; build train_moe train_moe.cu $precision ${SANITIZE_FLAGS:+memcheck} &
done
for kind in ${SANITIZE_FLAGS:+memcheck} plain; do
    for precision in FP32 BF16; do
        for name in $STUDIES; do throttle; build "$name" "dev/cuda/$name.cu" $precision "$kind" & done
    done
done
wait

# same FORWARD_LOG REVERSE_LOG NAME: a run's check lines, errors and values printed in them
# included, must be the same in both orders: the kernels are deterministic whatever order their
# threads run in, so any difference, even one within the tolerances, is a race
same() {
    local forward=$1 reverse=$2 name=$3
    [ -f "$forward" ] && [ -f "$reverse" ] || return 0
    local difference
    difference=$(diff <(grep -E '^(PASS|FAIL|SKIP) ' "$forward") <(grep -E '^(PASS|FAIL|SKIP) ' "$reverse") | grep -E '^[<>]' | head -n 2 | cut -c1-200 | tr '\n' ' ')
    if [ -z "$difference" ]; then
        echo "PASS emu.reverse.same[$name]: every check line, with its errors, equal in both orders"
    else
        echo "FAIL emu.reverse.same[$name]: the two orders differ (a race): $difference"
    fi
}

# races_found: the emulation's own check (tests/emu/races.cu) that the two orders expose races:
# each racy kernel's outputs differ between the orders, the race-free kernel's are equal
races_found() {
    if [ ! -x "$OUT/races" ]; then
        tail -n 20 "$OUT/races.build"
        echo "FAIL emu.races: tests/emu/races.cu did not build"
        return
    fi
    EMU_ORDER=forward "$OUT/races" > "$OUT/races.forward" 2>&1
    EMU_ORDER=reverse "$OUT/races" > "$OUT/races.reverse" 2>&1
    local label kind name forward reverse
    while IFS=: read -r label forward; do
        kind=${label%% *}
        name=${label#* }
        reverse=$(grep -F "$label:" "$OUT/races.reverse" | cut -d: -f2-)
        if [ "$kind" = racy ] && [ "$forward" != "$reverse" ]; then
            echo "PASS emu.races[$name]: the race gives different results in the two orders"
        elif [ "$kind" = safe ] && [ "$forward" = "$reverse" ] && [ -n "$forward" ]; then
            echo "PASS emu.races[$name]: without a race, the same results in both orders"
        else
            echo "FAIL emu.races[$name]: $kind kernel, forward:$(echo "$forward" | cut -c1-60) reverse:$(echo "$reverse" | cut -c1-60)"
        fi
    done < "$OUT/races.forward"
    [ -s "$OUT/races.forward" ] || echo "FAIL emu.races: no output: $(tail -n 3 "$OUT/races.reverse")"
}

# sanitizer_found: the emulation's own check (tests/emu/sanitize.cu) that the sanitized builds
# report each kind of memory error, and nothing where there is none
sanitizer_found() {
    if [ -z "$SANITIZE_FLAGS" ]; then
        echo "SKIP emu.sanitize: EMU_SANITIZE=0, the emulated kernels were not checked for memory errors"
        return
    fi
    if [ ! -x "$OUT/sanitize" ]; then
        tail -n 20 "$OUT/sanitize.build"
        echo "FAIL emu.sanitize: tests/emu/sanitize.cu did not build"
        return
    fi
    local name words log rc found cases=0
    while IFS=: read -r name words; do
        cases=$((cases + 1))
        log=$OUT/sanitize.$name
        "$OUT/sanitize" "$name" > "$log" 2>&1
        rc=$?
        found=$(sanitizer_report "$log")
        if [ -z "$words" ] && [ "$rc" = 0 ] && [ -z "$found" ]; then
            echo "PASS emu.sanitize[$name]: no error, no report"
        elif [ -n "$words" ] && [ "$rc" != 0 ] && grep -q -F "$words" "$log"; then
            echo "PASS emu.sanitize[$name]: stopped with \"$words\" in the report"
        else
            echo "FAIL emu.sanitize[$name]: exit status $rc, expected ${words:-no report}: ${found:-$(tail -n 2 "$log" | tr '\n' ' ')}"
        fi
    done < <("$OUT/sanitize" list)
    [ "$cases" -gt 0 ] || echo "FAIL emu.sanitize: no cases listed"
}

# The sampled full-size runs: NAME|PRECISIONS|OPTIONS[|ENVIRONMENT]. L=2 models keep the host's
# share small (upcycling, uploads); every size a kernel or an index depends on is the real one:
# T=1024, B*T = 65536 rows (B*T*Vp = 3.3e9 logits, past 2^31), C = 768 and 1600 (GPT-2 XL, not
# a multiple of 128), 8 to 64 experts; the dense run keeps the GELU outputs (-r 0), the others
# recompute them (the default). head128_99KiB: the largest head size the attention kernels
# take (C/NH = 128, their most shared memory per block) on a device with the 99 KiB per block of
# sm_86 and sm_89 (RTX 30 and 40 series, A10, L4, L40), the least of the GPUs train_moe runs on.
# top2_wgmma: top2 with version 3 of the expert GEMMs (--expert-gemm 3; 128 KiB of shared memory
# per block).
SCALE_CONFIGS="dense|FP32 BF16|-m 2:768:12:1024 -e 1 -b 64 -s 1 -g 3 -r 0
top2|FP32 BF16|-m 2:768:12:1024 -e 8 -k 2 -b 64
top2_wgmma|BF16|-m 2:768:12:1024 -e 8 -k 2 -b 64 --expert-gemm 3
capacity|BF16|-m 2:768:12:1024 -e 8 -k 2 -b 16 -d 32768 --capacity-factor 1.25 --capacity-priority score --z-loss 0.001
expert_choice|BF16|-m 2:768:12:1024 -e 8 -k 2 -b 16 --router expert --capacity-factor 1
fine|BF16|-m 2:768:12:1024 -e 64 -k 8 --granularity 8 --moe-layers all -b 16
xl|BF16|-m 2:1600:25:1024 -e 8 -k 2 -b 16
head128_99KiB|FP32 BF16|-m 2:1024:8:1024 -e 4 -k 2 -b 1|EMU_SMEM_OPTIN_KIB=99"
SCALE_COMMON="-t 1024 -x 1 -v 0 --val-steps 1 -s 0 --stats-every 1 -i $OUT/scale_shard.bin -j $OUT/scale_shard.bin"
# a shard for them: 2 * 65536 + 1 random tokens below GPT-2's V
${PYTHON_ANY:-python3} -c '
import random, struct, sys
random.seed(1337)
n = 2 * 65536 + 1
header = [20240520, 1, n] + [0] * 253
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", *header))
    f.write(struct.pack("<%dH" % n, *[random.randrange(50257) for _ in range(n)]))
' "$OUT/scale_shard.bin"
# scale_report NAME PRECISION OPTIONS [ENVIRONMENT]: the run's PASS or FAIL line
scale_report() {
    local name=$1 precision=$2 options=$3 environment=${4:-}
    local log=$OUT/scale_$name.$precision.out label="emu.scale[$name.$precision]"
    local failed launches memory planned
    failed=$(report "$log" "" "$label")  # a sanitizer's report or a non-zero exit status
    launches=$(grep -m 1 -o 'sampled: [0-9]* launches' "$log" | grep -o '[0-9]*')
    memory=$(grep -m 1 -o 'peak memory [0-9.]* GiB' "$log" | grep -o '[0-9.]*')
    planned=$(grep -m 1 -o '^GPU memory: [0-9.]* GiB' "$log" | grep -o '[0-9.]*')
    if [ -n "$failed" ]; then
        echo "$failed"
    elif ! grep -q -E '^step +1/1 \|' "$log" || [ -z "$launches" ] || [ -z "$memory" ] || [ -z "$planned" ]; then
        echo "FAIL $label: expected a step, its launch count, the planned and the allocated memory: $(grep -v '^ ' "$log" | tail -n 2 | tr '\n' ' ' | cut -c1-300)"
    elif ! awk -v p="$planned" -v m="$memory" 'BEGIN { d = m - p; exit !(d >= 0.015 && d <= 0.045) }'; then
        # the model's list of buffers holds every cudaMalloc but cuBLASLt's 32 MiB workspace
        echo "FAIL $label: $planned GiB planned, $memory GiB allocated: expected the plan plus the 0.03 GiB cuBLASLt workspace"
    else
        echo "PASS $label: a training step and validation at $options -t 1024${environment:+ ($environment)}, sampled: $launches launches in the CUDA limits, no overflow or out-of-bounds report; $memory GiB allocated: the $planned GiB planned and cuBLASLt's workspace"
    fi
}

# advised_batch LOG: the largest batch an out-of-memory line in LOG says fits, if any
advised_batch() { grep -m 1 -o -E 'the largest batch that fits is -b [0-9]+' "$1" | grep -o -E '[0-9]+$'; }
# scale_oom_report: the out-of-memory runs' PASS or FAIL lines. The top2 run on a 4 GiB device:
# exit 1, one error line that says what the run needs, what is free and the largest batch that
# fits, nothing written (no checkpoint, no log); then that batch must start (a validation pass)
# and one more must not.
scale_oom_report() {
    local log=$OUT/scale_oom.BF16.out label="emu.scale[out_of_memory.BF16]"
    local rc errors fits
    rc=$(cat "$log.rc" 2>/dev/null || echo "?")
    errors=$(grep -c '^error: ' "$log")
    fits=$(advised_batch "$log")
    if [ "$rc" = 1 ] && [ "$errors" = 1 ] && [ -n "$fits" ] && [ -z "$(find "$OUT/scale_oom" -type f 2>/dev/null)" ] \
        && grep -q -E '^error: out of GPU memory: this run needs [0-9.]+ GiB, [0-9.]+ of 4.00 GiB free; at -t 1024 the largest batch' "$log"; then
        echo "PASS $label: the top2 run (-b 64) on a 4 GiB device stops before allocating, with one line: $(grep '^error: ' "$log" | cut -c1-220)"
    else
        echo "FAIL $label: exit status $rc, $errors error lines, expected 1, one 'error: out of GPU memory: this run needs' line with the largest batch that fits, and no file in $OUT/scale_oom: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
        return
    fi
    log=$OUT/scale_oom_fits.BF16.out
    if [ "$(cat "$log.rc" 2>/dev/null)" = 0 ] && grep -q '^step 0 | val loss' "$log"; then
        echo "PASS emu.scale[out_of_memory_advice.BF16]: -b $fits, as advised, fits the 4 GiB device: $(grep -m 1 '^GPU memory:' "$log" | cut -c1-60)"
    else
        echo "FAIL emu.scale[out_of_memory_advice.BF16]: -b $fits, as advised, did not run on the 4 GiB device: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
    fi
    log=$OUT/scale_oom_over.BF16.out
    if [ "$(cat "$log.rc" 2>/dev/null)" = 1 ] && grep -q '^error: out of GPU memory: this run needs' "$log"; then
        echo "PASS emu.scale[out_of_memory_largest.BF16]: -b $((fits + 1)) does not fit: the advice is the largest batch"
    else
        echo "FAIL emu.scale[out_of_memory_largest.BF16]: -b $((fits + 1)) was expected not to fit the 4 GiB device: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
    fi
}

# scale_short_shared_report PRECISION: the head size 128 run on a device with 64 KiB of shared
# memory per block, less than the attention kernels need: exit 1 with one line that names the
# kernel, what it needs and what the device gives (allow_dynamic_smem), not a CUDA error code
scale_short_shared_report() {
    local log=$OUT/scale_head128_64KiB.$1.out label="emu.scale[head128_64KiB.$1]"
    local rc errors
    rc=$(cat "$log.rc" 2>/dev/null || echo "?")
    errors=$(grep -c '^error: ' "$log")
    if [ "$rc" = 1 ] && [ "$errors" = 1 ] \
        && grep -q -E '^error: the attention .* kernel \(.*head size C/NH\) needs [0-9]+ bytes of shared memory per block; this GPU gives at most 65536$' "$log"; then
        echo "PASS $label: on a device with 64 KiB of shared memory per block, one line: $(grep '^error: ' "$log" | cut -c1-200)"
    else
        echo "FAIL $label: exit status $rc, $errors error lines, expected 1 that names the attention kernel short of shared memory: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
    fi
}

# bias_kernel_report: the run without cuBLASLt's bias epilogue against the same run with it
bias_kernel_report() {
    local label=emu.train_moe.FP32.bias_without_epilogue note='^note: cuBLASLt has no algorithm with the bias epilogue'
    local failed notes differ="" file
    failed=$(report "$OUT/bias_kernel.FP32.out" "" "$label")
    notes=$(grep -c "$note" "$OUT/bias_kernel.FP32.out")
    for file in model_00000004.bin state_00000004.bin; do
        cmp -s "$OUT/same_run.FP32/$file" "$OUT/bias_kernel.FP32/$file" || differ="$differ $file"
    done
    if [ -n "$failed" ]; then
        echo "$failed"
    elif [ "$notes" -eq 0 ] || grep -q "$note" "$OUT/same_run.FP32.out"; then
        echo "FAIL $label: expected a note for each matmul without the epilogue in that run only: $notes notes, $(grep -c "$note" "$OUT/same_run.FP32.out") in the run with it"
    elif [ -n "$differ" ]; then
        echo "FAIL $label: not the same as the run with the epilogue:$differ"
    else
        echo "PASS $label: with no cuBLASLt algorithm for the bias epilogue, $notes matmul shapes add their biases in add_bias_kernel: the same model and optimizer state after 4 steps, byte for byte"
    fi
}

ORDERS="forward reverse"
# version 3 of the expert GEMMs (wgmma), which the engine takes only when asked (--expert-gemm 3):
# two of the configs again with it, BF16, in the forward order (dropless top-2 with the aux and z
# losses; a capacity that drops, so that experts hold few rows or none). The kernels' own races
# are looked for in both orders by the study (dev/cuda/expert_mlp.cu), and a sampled full-size
# run (SCALE_CONFIGS, top2_wgmma) checks their launches at GPT-2's shapes.
WGMMA_CONFIGS="e8_k2_renorm0_aux_z e8_k2_capacity1_drops"
# the log and check prefix of each order's runs
tag() { [ "$1" = forward ] && echo "" || echo ".$1"; }
prefix() { [ "$1" = forward ] && echo "emu." || echo "emu.$1."; }
for order in $ORDERS; do
    for precision in FP32 BF16; do
        bin=$(binary test_moe "$precision" "$order")
        t=$(tag "$order")
        if [ -x "$bin" ]; then
            for options_file in "$STATES"/*.options; do
                name=$(basename "$options_file" .options)
                throttle
                # shellcheck disable=SC2046,SC2086
                run "$order" "$OUT/$name.$precision$t.out" "$bin" reference "$name" "$STATES/$name.state" "$STATES/$name.ref.bin" -- \
                    -m "$STATES/dense.bin" -i "$STATES/shard.bin" $GEOMETRY $(cat "$options_file") &
            done
            throttle; run "$order" "$OUT/invariants.$precision$t.out" "$bin" invariants "$STATES/dense.bin" "$STATES/shard.bin" &
            if [ "$precision" = BF16 ] && [ "$order" = forward ]; then
                for name in $WGMMA_CONFIGS; do
                    throttle
                    # shellcheck disable=SC2046,SC2086
                    run "$order" "$OUT/$name.wgmma.$precision$t.out" "$bin" reference "$name.wgmma" "$STATES/$name.state" "$STATES/$name.ref.bin" -- \
                        -m "$STATES/dense.bin" -i "$STATES/shard.bin" $GEOMETRY $(cat "$STATES/$name.options") --expert-gemm 3 &
                done
            fi
        fi
        for name in $STUDIES; do
            study=$(binary "$name" "$precision" "$order")
            [ -x "$study" ] || continue
            throttle; run "$order" "$OUT/dev_cuda_$name.$precision$t.out" "$study" 0 --quick &
        done
    done
done
while IFS='|' read -r name precisions options environment; do
    for precision in $precisions; do
        bin=$(binary train_moe "$precision" forward)
        [ -x "$bin" ] || continue
        throttle
        # shellcheck disable=SC2086
        run forward "$OUT/scale_$name.$precision.out" env EMU_SAMPLE=1 $environment "$bin" $SCALE_COMMON $options &
        if [ "$name" = head128_99KiB ]; then
            # the same on a device with 64 KiB per block, short for both precisions' kernels
            throttle
            # shellcheck disable=SC2086
            run forward "$OUT/scale_head128_64KiB.$precision.out" env EMU_SAMPLE=1 EMU_SMEM_OPTIN_KIB=64 "$bin" $SCALE_COMMON $options &
        fi
    done
done <<< "$SCALE_CONFIGS"
# the top2 run on a 4 GiB device: out of memory, which must say so in one line with the largest
# batch that fits; then that batch (no step, the validation pass only) and one more
bin=$(binary train_moe BF16 forward)
if [ -x "$bin" ]; then
    throttle
    rm -rf "$OUT/scale_oom"
    # shellcheck disable=SC2086
    (
        oom() { run forward "$OUT/scale_oom$1.BF16.out" env EMU_SAMPLE=1 EMU_DEVICE_GIB=4 "$bin" $SCALE_COMMON -m 2:768:12:1024 -e 8 -k 2 "${@:2}"; }
        oom "" -b 64 -o "$OUT/scale_oom"
        fits=$(advised_batch "$OUT/scale_oom.BF16.out")
        if [ -n "$fits" ]; then
            oom _fits -b "$fits" -x 0
            oom _over -b $((fits + 1)) -x 0
        fi
    ) &
fi
# train_moe's own loop (its main: uploads, accumulation, validation, updates) against the twin's, in
# FP32: the same command, 4 steps of 2 micro-batches each, Drop-Upcycling, aux and z losses
SAME_RUN=$(${PYTHON_ANY:-python3} tests/same_run.py --options "$STATES")
bin=$(binary train_moe FP32 forward)
if [ -x "$bin" ] && [ -x ./train_moe_cpu ]; then
    throttle
    # shellcheck disable=SC2086
    (
        rm -rf "$OUT/same_run.FP32"
        run forward "$OUT/same_run.FP32.out" "$bin" $SAME_RUN -o "$OUT/same_run.FP32"
        OMP_NUM_THREADS=1 ./train_moe_cpu $SAME_RUN > "$OUT/same_run.twin.out" 2>&1
    ) &
fi
# the same run where cuBLASLt has no algorithm with the bias epilogue (EMU_LT_NO_BIAS_EPILOGUE=1,
# as a real cuBLASLt may answer for some problems): matmul_forward must add the biases in a
# kernel of its own, and in FP32 that is the same model and optimizer state, byte for byte
if [ -x "$bin" ]; then
    throttle
    rm -rf "$OUT/bias_kernel.FP32"
    # shellcheck disable=SC2086
    run forward "$OUT/bias_kernel.FP32.out" env EMU_LT_NO_BIAS_EPILOGUE=1 "$bin" $SAME_RUN -o "$OUT/bias_kernel.FP32" &
fi
bin=$(binary train_moe BF16 forward)
# train_moe's own loop stopped by signals (tests/stop_run.sh): SIGTERM, then -y 1 to the end,
# byte-identical to the run never stopped, moe.log included (its one routing report, of step 5,
# spans the stop); a second SIGINT stops at once. An emulated step takes about a second, time
# enough for the signals.
if [ -x "$bin" ]; then
    throttle
    # shellcheck disable=SC2086
    EMU_ORDER=forward OMP_NUM_THREADS=1 bash tests/stop_run.sh emu.train_moe.BF16 "$OUT/stop" 5 double -- "$bin" \
        -m "$STATES/dense.bin" -i "$STATES/shard.bin" -j "$STATES/shard.bin" $GEOMETRY -s 0 -v 0 --val-steps 1 --stats-every 5 \
        -e 8 -k 2 --z-loss 0.001 > "$OUT/stop.out" 2>&1 &
    # --breakdown 1: the events at each part of a step change nothing, and the table is whole
    # (tests/breakdown.sh; the emulation's events hold the host clock, so the times are its own)
    throttle
    # shellcheck disable=SC2086
    EMU_ORDER=forward OMP_NUM_THREADS=1 bash tests/breakdown.sh emu.train_moe.BF16 "$OUT/breakdown" -- "$bin" \
        -m "$STATES/dense.bin" -i "$STATES/shard.bin" -j "$STATES/shard.bin" $GEOMETRY -s 0 -v 0 --stats-every 0 \
        -e 4 -k 2 > "$OUT/breakdown.out" 2>&1 &
fi
wait

races_found
sanitizer_found
for precision in FP32 BF16; do
    report_build train_moe $precision only
    report_build test_moe $precision
    for name in $STUDIES; do report_build "$name" $precision; done
done
for order in $ORDERS; do
    t=$(tag "$order")
    p=$(prefix "$order")
    for precision in FP32 BF16; do
        if [ -x "$(binary test_moe "$precision" "$order")" ]; then
            for options_file in "$STATES"/*.options; do
                name=$(basename "$options_file" .options)
                # test_moe's own SKIP lines (BF16 reports) pass through, not counted
                grep -E '^SKIP ' "$OUT/$name.$precision$t.out" | sed -E "s/^SKIP /SKIP $p/"
                report "$OUT/$name.$precision$t.out" "$p" "$p$name.$precision"
            done
            report "$OUT/invariants.$precision$t.out" "$p" "${p}invariants.$precision"
            if [ "$precision" = BF16 ] && [ "$order" = forward ]; then
                for name in $WGMMA_CONFIGS; do
                    grep -E '^SKIP ' "$OUT/$name.wgmma.$precision$t.out" | sed -E "s/^SKIP /SKIP $p/"
                    report "$OUT/$name.wgmma.$precision$t.out" "$p" "$p$name.wgmma.$precision"
                done
            fi
        fi
        if [ "$order" = reverse ]; then
            for log in "$OUT"/*."$precision".out; do
                same "$log" "${log%.out}.reverse.out" "$(basename "$log" .out)"
            done
        fi
        for name in $STUDIES; do
            # the study's own SKIP lines (a version not built for this precision) are not checks
            [ -x "$(binary "$name" "$precision" "$order")" ] && report "$OUT/dev_cuda_$name.$precision$t.out" "${p}dev_cuda.$name.$precision: " "${p}dev_cuda.$name.$precision"
        done
    done
done
while IFS='|' read -r name precisions options environment; do
    for precision in $precisions; do
        [ -x "$(binary train_moe "$precision" forward)" ] || continue
        scale_report "$name" "$precision" "$options" "$environment"
        [ "$name" = head128_99KiB ] && scale_short_shared_report "$precision"
    done
done <<< "$SCALE_CONFIGS"
[ -x "$(binary train_moe BF16 forward)" ] && scale_oom_report
# --expert-gemm 3 where version 3 cannot run (an FP32 build): one clear line, exit status 1,
# before the first step, nothing in the output directory
bin=$(binary train_moe FP32 forward)
if [ -x "$bin" ]; then
    rm -rf "$OUT/expert_gemm_fp32"
    # shellcheck disable=SC2086
    EMU_ORDER=forward "$bin" -m "$STATES/dense.bin" -i "$STATES/shard.bin" $GEOMETRY -e 4 -k 2 --expert-gemm 3 -o "$OUT/expert_gemm_fp32" \
        > "$OUT/expert_gemm_fp32.out" 2>&1
    rc=$?
    stop=$(grep -c 'expert_mlp: version 3 (tensor cores) needs a BF16 build' "$OUT/expert_gemm_fp32.out")
    if [ $rc -eq 1 ] && [ "$stop" -eq 1 ] && [ -z "$(ls -A "$OUT/expert_gemm_fp32" 2>/dev/null)" ] && ! grep -q -E '^step ' "$OUT/expert_gemm_fp32.out"; then
        echo "PASS emu.train_moe.FP32.expert_gemm_3_refused: exit 1 before any step, nothing written: $(grep 'expert_mlp:' "$OUT/expert_gemm_fp32.out" | cut -c1-160)"
    else
        echo "FAIL emu.train_moe.FP32.expert_gemm_3_refused: exit $rc (expected 1, one line saying version 3 needs a BF16 build, nothing written): $(tail -n 2 "$OUT/expert_gemm_fp32.out" | tr '\n' ' ' | cut -c1-200)"
    fi
fi
if [ -x "$(binary train_moe FP32 forward)" ] && [ -x ./train_moe_cpu ]; then
    failed=$(report "$OUT/same_run.FP32.out" "" "emu.train_moe.FP32.same_run_as_twin")
    if [ -n "$failed" ]; then
        echo "$failed"
    else
        ${PYTHON_ANY:-python3} tests/same_run.py emu.train_moe.FP32.same_run_as_twin "$OUT/same_run.FP32.out" "$OUT/same_run.twin.out"
    fi
    bias_kernel_report
fi
if [ -x "$(binary train_moe BF16 forward)" ]; then
    grep -E '^(PASS|FAIL) ' "$OUT/stop.out"
    grep -q -E '^(PASS|FAIL) ' "$OUT/stop.out" || echo "FAIL emu.train_moe.BF16.stop_and_resume: tests/stop_run.sh said nothing: $(tail -n 2 "$OUT/stop.out" | tr '\n' ' ')"
    grep -E '^(PASS|FAIL) ' "$OUT/breakdown.out"
    grep -q -E '^(PASS|FAIL) ' "$OUT/breakdown.out" || echo "FAIL emu.train_moe.BF16.breakdown: tests/breakdown.sh said nothing: $(tail -n 2 "$OUT/breakdown.out" | tr '\n' ' ')"
fi
exit 0
