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
# "memcheck": NAME_PRECISION.memcheck, sanitized), log in the same name plus .build. CUDA code
# reads bf16 pairs through uint32_t pointers, which nvcc allows: no strict aliasing for g++ either.
build() {
    local name=$1 source=$2 precision=$3 kind=${4:-}
    local flags binary=$OUT/${name}_$precision
    flags=$([ "$precision" = FP32 ] && echo "-DENABLE_FP32" || echo "")
    if [ "$kind" = memcheck ]; then
        flags="$flags $SANITIZE_FLAGS"
        binary=$binary.memcheck
    fi
    # shellcheck disable=SC2086
    $CXX -x c++ -std=c++17 -O2 -fno-strict-aliasing -w -fopenmp $flags -include "$PWD/tests/emu/cuda_emu.h" \
        -o "$binary" "$OUT/src/$source" > "$binary.build" 2>&1
}
# binary NAME PRECISION ORDER: the build that ORDER's runs use
binary() {
    if [ "$3" = forward ] && [ -n "$SANITIZE_FLAGS" ]; then echo "$OUT/${1}_$2.memcheck"; else echo "$OUT/${1}_$2"; fi
}
# report_build NAME PRECISION: the PASS or FAIL line of each of its builds
report_build() {
    local name=$1 precision=$2
    local binary label
    for binary in "$OUT/${name}_$precision" ${SANITIZE_FLAGS:+"$OUT/${name}_$precision.memcheck"}; do
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
        if [ "$name" = clean ] && [ "$rc" = 0 ] && [ -z "$found" ]; then
            echo "PASS emu.sanitize[clean]: in-bounds, aligned accesses run without a report"
        elif [ "$name" != clean ] && [ "$rc" != 0 ] && grep -q -F "$words" "$log"; then
            echo "PASS emu.sanitize[$name]: stopped with \"$words\" in the report"
        else
            echo "FAIL emu.sanitize[$name]: exit status $rc, expected ${words:-no report}: ${found:-$(tail -n 2 "$log" | tr '\n' ' ')}"
        fi
    done < <("$OUT/sanitize" list)
    [ "$cases" -gt 0 ] || echo "FAIL emu.sanitize: no cases listed"
}

ORDERS="forward reverse"
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
        fi
        for name in $STUDIES; do
            study=$(binary "$name" "$precision" "$order")
            [ -x "$study" ] || continue
            throttle; run "$order" "$OUT/dev_cuda_$name.$precision$t.out" "$study" 0 --quick &
        done
    done
done
wait

races_found
sanitizer_found
for precision in FP32 BF16; do
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
exit 0
