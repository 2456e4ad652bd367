#!/usr/bin/env bash
# make demo: the whole story in a few minutes.
#   1. Tiny Shakespeare -> GPT-2 tokens (dev/data/prepare.py; ../shared/data when present, else download)
#   2. pre-train a small dense GPT-2 from scratch (-e 1)
#   3. branch from that one checkpoint, with the same data order, into
#        dense continuation (-e 1)  and  an upcycled MoE (-e 8 -k 2, every other layer)
#   4. print the validation losses side by side
# Uses the GPU engine (train_moe) when a GPU is present, else the CPU twin (train_moe_cpu).
# Overridable: OUT (out/demo), DENSE_STEPS (200), BRANCH_STEPS (60), MODEL (4:128:4:128), B, T.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-out/demo}
DENSE_STEPS=${DENSE_STEPS:-200}
BRANCH_STEPS=${BRANCH_STEPS:-60}
MODEL=${MODEL:-4:128:4:128}
B=${B:-8}
T=${T:-128}

echo "== 1. data"
if [ ! -f dev/data/tinyshakespeare/tiny_shakespeare_train.bin ]; then
    args=()
    if [ -f ../shared/data/tinyshakespeare.txt ]; then args+=(--input ../shared/data/tinyshakespeare.txt); fi
    if [ -f ../shared/data/gpt2/encoder.json ]; then args+=(--bpe-dir ../shared/data/gpt2); fi
    python3 dev/data/prepare.py "${args[@]}"
else
    echo "dev/data/tinyshakespeare already prepared"
fi

ENGINE=./train_moe_cpu
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1 && [ -f train_moe.cu ] && make -s train_moe; then
    ENGINE=./train_moe
else
    make -s train_moe_cpu
fi
echo "engine: $ENGINE"
COMMON="-b $B -t $T -v 50 --val-steps 16 -s 0 --stats-every 20"
mkdir -p "$OUT"

run() {  # run NAME options...: trains, keeps the log, prints the progress lines
    local name=$1; shift
    local t0=$SECONDS
    # shellcheck disable=SC2086
    "$ENGINE" $COMMON -o "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E "^(model|moe|step .*(val|/)|  layer)" | awk 'NR % 5 == 1 || /val|model|moe|layer/'
    echo "$name: $((SECONDS - t0)) s"
}
final_val() { grep 'val loss' "$OUT/$1.log" | tail -n 1 | awk '{print $NF}'; }

echo "== 2. pre-train a dense GPT-2 ($MODEL, $DENSE_STEPS steps of $((B * T)) tokens)"
run dense -m "$MODEL" -e 1 -x "$DENSE_STEPS" -l 2e-3 -u 20 -q 0.1
DENSE_CKPT=$OUT/dense/model_$(printf '%08d' "$DENSE_STEPS").bin

echo "== 3a. dense continuation ($BRANCH_STEPS steps)"
run dense_continued -m "$DENSE_CKPT" -e 1 -x "$BRANCH_STEPS" -l 1e-3 -q 0.1
echo "== 3b. upcycled MoE: 8 experts, top-2, every other layer ($BRANCH_STEPS steps)"
run moe_e8_k2 -m "$DENSE_CKPT" -e 8 -k 2 -x "$BRANCH_STEPS" -l 1e-3 -q 0.1

echo "== 4. validation loss after $BRANCH_STEPS more steps (same data, same order)"
printf "  %-34s %s\n" "dense, after pre-training" "$(final_val dense)"
printf "  %-34s %s\n" "dense, continued" "$(final_val dense_continued)"
printf "  %-34s %s\n" "MoE 8 experts top-2, upcycled" "$(final_val moe_e8_k2)"
echo "logs and checkpoints: $OUT"
