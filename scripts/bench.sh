#!/usr/bin/env bash
# The benchmark of design.md: GPT-2 124M shapes (d12), T=1024, bf16, on one GPU: dense (-e 1) and
# MoE (8 experts, top-2, every other layer) side by side, tokens/s, MFU, ms per step (median of
# the steps after warm-up) and peak memory, the MoE also with --recompute 0 and, on an sm_90 GPU,
# with version 3 of the expert GEMMs (--expert-gemm 3, Hopper's wgmma); then the PyTorch
# reference on the same GPU; then each train_moe run's --breakdown table (the time of each part
# of a step: the design's budget of 5% for routing, permutation and un-permutation is the sum of
# the MoE router, permute and unpermute rows).
# With LLMC=path/to/llm.c (a checkout of karpathy/llm.c, not part of this project), it also
# builds llm.c's train_gpt2cu for this GPU and times it at the same shape, batch and data:
# design.md's first target is a dense train_moe at least as fast. llm.c is built with nvcc
# directly (bf16, no cuDNN, no MPI or NCCL), with scripts/llmc_cuda13.h for CUDA 13.
# Exit status 1 when a train_moe run stops before its first step (its row says why); llm.c's and
# the reference's rows only report.
# Usage: scripts/bench.sh [OUTFILE]   (B=8 STEPS=30 by default; needs the Tiny Shakespeare shards)
#        LLMC=path/to/llm.c scripts/bench.sh --build-llmc   (only builds llm.c's train_gpt2cu, for
#        sm_90 where there is no GPU to ask: scripts/gpu_prebuild.sh)
set -u
cd "$(dirname "$0")/.." || exit 1
# median of a column over the step lines after the first 5
median() { grep -E '^step +[0-9]+/' | awk -v col="$1" 'NR > 5 { for (i = 1; i <= NF; i++) if ($i == col) print $(i - 1) }' | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "n/a" }'; }
# median MFU over the same steps: the field AT fields after "MFU" (train_moe: "MFU 45.6%", AT=1;
# llm.c: "45.6% bf16 MFU", AT=-2)
mfu() { grep -E '^step +[0-9]+/' | awk -v at="${1:-1}" 'NR > 5 { for (i = 1; i <= NF; i++) if ($i == "MFU") print $(i + at) }' | tr -d '%' | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] "%"; else print "n/a" }'; }

# llm.c's train_gpt2cu (LLMC), built once into $LLMC/train_gpt2cu_bench for this GPU (sm_90 where
# there is none to ask), its log in $1
llmc_build() {
    local arch nvml here=$PWD log=$1
    [ -x "$LLMC/train_gpt2cu_bench" ] && return 0
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.')
    nvml=$(ldconfig -p 2> /dev/null | awk '/libnvidia-ml\.so\.1 / { print $NF; exit }')
    # NVML (llm.c's mfu.h uses it where nvml.h exists): none, the toolkit's link library, else the driver's own
    local build=(nvcc -O3 --use_fast_math -std=c++17 -arch="sm_${arch:-90}" -DENABLE_BF16 -include "$here/scripts/llmc_cuda13.h"
                 train_gpt2.cu -lcublas -lcublasLt -o train_gpt2cu_bench)
    (cd "$LLMC" && { "${build[@]}" || "${build[@]}" -lnvidia-ml || { [ -n "$nvml" ] && "${build[@]}" "$nvml"; }; }) > "$log" 2>&1
}
if [ "${1:-}" = "--build-llmc" ]; then
    [ -n "${LLMC:-}" ] || { echo "bench: --build-llmc needs LLMC=path/to/llm.c"; exit 2; }
    llmc_build /dev/stdout && echo "bench: built $LLMC/train_gpt2cu_bench"
    exit
fi
OUTFILE=${1:-/dev/stdout}
B=${B:-8}
STEPS=${STEPS:-30}
DATA=dev/data/tinyshakespeare/tiny_shakespeare_train.bin
[ -f "$DATA" ] || { echo "bench: no $DATA (run dev/data/prepare.py)"; exit 1; }
[ -x ./train_moe ] || make -s train_moe || exit 1
PYTHON=${PYTHON:-python3}
rm -f /tmp/bench_*.log  # each train_moe run's log, from this run only
status=0                # 1 when a train_moe run did not train (its row says why)

# llm.c's dense GPT-2 124M from scratch (-e d12) at the same B, T and data: one table row
llmc_row() {
    local here=$PWD log=/tmp/llmc_bench.log
    if ! llmc_build "$log"; then
        echo "| llm.c train_gpt2cu dense: not built ($(grep -m 1 -i 'error' "$log" | cut -c1-120)) | | | | |"
        return
    fi
    (cd "$LLMC" && ./train_gpt2cu_bench -e d12 -i "$here/$DATA" -j "$here/$DATA" -b "$B" -t 1024 -x "$STEPS" -v 0 -s 0 -h 0) > "$log" 2>&1
    if ! grep -q -E '^step +[0-9]+/' "$log"; then
        echo "| llm.c train_gpt2cu dense: did not train ($(grep -v '^ *$' "$log" | tail -n 2 | tr '\n' ' ' | cut -c1-160)) | | | | |"
        return
    fi
    # llm.c's MFU is its own estimate against its own table of peaks
    echo "| llm.c train_gpt2cu dense (bf16, no cuDNN) | $(median ms < "$log") | $(median tok/s < "$log") | $(mfu -2 < "$log") (llm.c's own) | |"
}

{
    echo "| run | ms/step | tokens/s | MFU | peak memory |"
    echo "|---|---|---|---|---|"
    # the third row keeps the GELU outputs (--recompute 0): what the default recomputation costs;
    # on an sm_90 GPU (H100, H200) a fourth takes version 3 of the expert GEMMs (Hopper's wgmma)
    runs=("dense|-e 1" "MoE 8x top-2, every2|-e 8 -k 2" "MoE 8x top-2, every2, --recompute 0|-e 8 -k 2 -r 0")
    if [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" = 9.0 ]; then
        runs+=("MoE 8x top-2, every2, --expert-gemm 3|-e 8 -k 2 --expert-gemm 3")
    fi
    for entry in "${runs[@]}"; do
        name=${entry%%|*}
        options=${entry#*|}
        # shellcheck disable=SC2086
        log=$(./train_moe -m d12 $options -i "$DATA" -j "$DATA" -b "$B" -t 1024 -x "$STEPS" -v 0 --val-steps 1 -s 0 --stats-every 0 --breakdown 1 2>&1)
        echo "$log" > "/tmp/bench_$(echo "$name" | tr -c 'a-zA-Z0-9' _).log"
        if ! echo "$log" | grep -q -E '^step +[0-9]+/'; then  # it stopped before its first step: say why, and fail
            echo "| train_moe $name: did not train ($(echo "$log" | grep -v '^ *$' | tail -n 2 | tr '\n' ' ' | cut -c1-160 | sed 's/ *$//')) | | | | |"
            status=1
            continue
        fi
        ms=$(echo "$log" | median ms)
        tps=$(echo "$log" | median tok/s)
        peak=$(echo "$log" | grep -o 'peak memory [0-9.]* GiB' | head -n 1 | awk '{print $3 " GiB"}')
        echo "| train_moe $name | $ms | $tps | $(echo "$log" | mfu) | ${peak:-n/a} |"
    done
    if [ -n "${LLMC:-}" ]; then llmc_row; fi
    for entry in "dense|-e 1" "MoE 8x top-2, every2|-e 8 -k 2"; do
        name=${entry%%|*}
        options=${entry#*|}
        # shellcheck disable=SC2086
        line=$("$PYTHON" dev/train_moe.py bench -m d12 -i "$DATA" -b "$B" -t 1024 --steps 10 --device cuda $options 2>&1 | grep '^bench:')
        ms=$(echo "$line" | grep -o 'median [0-9.]* ms' | awk '{print $2}')
        tps=$(echo "$line" | grep -o '[0-9.]* tokens/s' | awk '{print $1}')
        echo "| PyTorch reference (fp32) $name | ${ms:-n/a} | ${tps:-n/a} | | |"
    done
    # where each train_moe run's step went (--breakdown 1: CUDA events at each part, read after the step)
    for log in /tmp/bench_*.log; do
        echo
        echo "$(basename "$log" .log):"
        echo '```'
        sed -n '/^where a step.s time went/,/^  total/p' "$log"
        echo '```'
    done
} > "$OUTFILE"
exit $status
