#!/usr/bin/env bash
# The upcycling ablation of Sparse Upcycling (Komatsuzaki et al., 2023) and Drop-Upcycling
# (Nakamura et al., 2025) on one GPU (or the CPU twin): from ONE dense checkpoint, with the same
# data in the same order, the same steps and learning rate, train one branch per arm:
#   dense      the dense model, continued (-e 1): what the extra steps buy without experts
#   copy       naive copy of the MLP into every expert (Sparse Upcycling)
#   drop       Drop-Upcycling: a fraction DROP_RATIO of each expert's hidden units re-drawn
#   noise      noise upcycling: the copies perturbed
#   scratch    the same MoE, every weight from scratch (the lower baseline)
# then write OUT/summary.md (a table: first and last training loss, last validation loss,
# tokens/s, per arm) and OUT/val_loss.csv (validation loss per step, a column per arm), and,
# where Python's matplotlib is installed, OUT/val_loss.png (scripts/plot_logs.py).
#
# Usage: scripts/ablate.sh DENSE_CHECKPOINT [ARM...]   (default arms: dense copy drop noise scratch)
# Settings, from the environment: OUT (out/ablate), STEPS (200), LR (1e-3), E (8), K (2),
# LAYERS (every2), DROP_RATIO (0.5), B (8), T (128), VAL_EVERY (20), VAL_STEPS (16), SEED
# (1337), TRAIN and VAL (Tiny Shakespeare, prepared by dev/data/prepare.py), ENGINE
# (./train_moe where a GPU is present, else ./train_moe_cpu), EXTRA (more options for every
# arm, e.g. "--aux-loss 0.01 --z-loss 0.001").
# The dense checkpoint: llm.c's GPT-2 124M (gpt2_124M.bin, from llm.c's train_gpt2.py), or any
# dense run's model_*.bin (make demo leaves one in out/demo/dense).
#
# One check is built in: copy upcycling computes the dense model's function (methods.md 4.1),
# so the copy arm's first loss, measured before any update, must equal the dense arm's; the
# summary prints both and their relative difference (exact up to rounding).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DENSE=${1:-}
if [ -z "$DENSE" ] || [ ! -f "$DENSE" ]; then
    echo "usage: scripts/ablate.sh DENSE_CHECKPOINT [dense] [copy] [drop] [noise] [scratch]" >&2
    echo "error: ${DENSE:-no checkpoint given}: not a file (make demo writes one to out/demo/dense)" >&2
    exit 1
fi
shift
ARMS=${*:-dense copy drop noise scratch}
for arm in $ARMS; do
    case $arm in dense | copy | drop | noise | scratch) ;; *) echo "error: unknown arm '$arm' (dense, copy, drop, noise, scratch)" >&2; exit 1 ;; esac
done
OUT=${OUT:-out/ablate}
STEPS=${STEPS:-200}
LR=${LR:-1e-3}
E=${E:-8}
K=${K:-2}
LAYERS=${LAYERS:-every2}
DROP_RATIO=${DROP_RATIO:-0.5}
B=${B:-8}
T=${T:-128}
VAL_EVERY=${VAL_EVERY:-20}
VAL_STEPS=${VAL_STEPS:-16}
SEED=${SEED:-1337}
TRAIN=${TRAIN:-dev/data/tinyshakespeare/tiny_shakespeare_train.bin}
VAL=${VAL:-dev/data/tinyshakespeare/tiny_shakespeare_val.bin}
EXTRA=${EXTRA:-}
if [ ! -f "$TRAIN" ]; then
    echo "error: no training data at $TRAIN: python3 dev/data/prepare.py prepares Tiny Shakespeare (or set TRAIN and VAL)" >&2
    exit 1
fi
if [ -z "${ENGINE:-}" ]; then
    ENGINE=./train_moe_cpu
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1 && make -s train_moe; then
        ENGINE=./train_moe
    else
        make -s train_moe_cpu || exit 1
    fi
fi
mkdir -p "$OUT"
echo "engine: $ENGINE | dense checkpoint: $DENSE | $STEPS steps of B=$B T=$T at lr $LR | arms: $ARMS"

# the options of each arm beyond the common ones
arm_options() {
    local moe="-e $E -k $K --moe-layers $LAYERS"
    case $1 in
        dense) echo "-e 1" ;;
        copy) echo "$moe --init copy" ;;
        drop) echo "$moe --init drop --drop-ratio $DROP_RATIO" ;;
        noise) echo "$moe --init noise" ;;
        scratch) echo "$moe --init scratch" ;;
    esac
}

failed=0
for arm in $ARMS; do
    rm -rf "${OUT:?}/$arm"
    options="$(arm_options "$arm") $EXTRA"
    echo "== $arm: $options"
    t0=$SECONDS
    # shellcheck disable=SC2086
    "$ENGINE" -m "$DENSE" -i "$TRAIN" -j "$VAL" -b "$B" -t "$T" -x "$STEPS" -l "$LR" --seed "$SEED" -v "$VAL_EVERY" \
        --val-steps "$VAL_STEPS" -s 0 --stats-every "$VAL_EVERY" -o "$OUT/$arm" $options > "$OUT/$arm.log" 2>&1
    rc=$?
    grep -E '^step .*val loss' "$OUT/$arm.log" | tail -n 1
    if [ "$rc" -ne 0 ]; then
        echo "$arm FAILED (exit status $rc): $(tail -n 2 "$OUT/$arm.log" | tr '\n' ' ')"
        failed=1
    fi
    echo "$arm: $((SECONDS - t0)) s"
done

# the summary: numbers from each arm's printed lines
first_loss() { grep -m 1 -E '^step +1/' "$OUT/$1.log" | sed -E 's/.*\| loss ([^ ]+).*/\1/'; }
last_loss() { grep -E '^step +[0-9]+/' "$OUT/$1.log" | tail -n 1 | sed -E 's/.*\| loss ([^ ]+).*/\1/'; }
last_val() { grep -E '^step [0-9]+ \| val loss' "$OUT/$1.log" | tail -n 1 | awk '{print $NF}'; }
tokens_per_s() {  # the median of the steps' tokens/s, the first step left out
    grep -E '^step +[0-9]+/' "$OUT/$1.log" | tail -n +2 | grep -o -E '[0-9.]+ tok/s' | awk '{print $1}' | sort -g |
        awk '{v[NR] = $1} END { if (NR) print v[int((NR + 1) / 2)] }'
}
{
    echo "# upcycling ablation, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "engine \`$ENGINE\`, dense checkpoint \`$DENSE\`, $STEPS steps of B=$B T=$T, lr $LR, seed $SEED, E=$E k=$K, MoE layers $LAYERS${EXTRA:+, $EXTRA}"
    echo
    echo "| arm | options | first loss | last loss | last val loss | tokens/s |"
    echo "|---|---|---|---|---|---|"
    for arm in $ARMS; do
        echo "| $arm | \`$(arm_options "$arm")\` | $(first_loss "$arm") | $(last_loss "$arm") | $(last_val "$arm") | $(tokens_per_s "$arm") |"
    done
    if [[ " $ARMS " == *" dense "* ]] && [[ " $ARMS " == *" copy "* ]]; then
        echo
        awk -v d="$(first_loss dense)" -v c="$(first_loss copy)" 'BEGIN {
            if (d == "" || c == "") { print "copy upcycling keeps the dense function: not measured (an arm failed)"; exit }
            r = (c - d) / d; if (r < 0) r = -r
            printf "copy upcycling keeps the dense function: first loss %s (copy) against %s (dense), relative difference %.1e\n", c, d, r }'
    fi
} > "$OUT/summary.md"
PYTHON_PLOT=$(command -v python3 || true)
if [ -n "$PYTHON_PLOT" ]; then
    # shellcheck disable=SC2086
    "$PYTHON_PLOT" scripts/plot_logs.py "$OUT" $ARMS
fi
echo
cat "$OUT/summary.md"
exit $failed
