# The sections of make test that need no GPU and that scripts/gpu_check.sh leaves to CI (GPU_ONLY=1):
# the reference under NumPy 2's promotion rules, the invariants, whole runs (same seed, resume,
# stop by a signal, checkpoints through the reference) and bad input. Sourced by
# tests/run_tests.sh after the twin's comparison with PyTorch, with its variables (TMP, DENSE,
# SHARD, GEOMETRY, REF, OPTIM, PYTHON) and its pass, fail and run_checks.
# shellcheck shell=bash disable=SC2154

# NumPy 2 changed how a numpy scalar and a Python number combine (NEP 50: np.uint64(5) + 1 is now
# a uint64, not a float64), which could move the reference's random numbers or sums. NumPy 1.24
# to 1.26 (Debian's is 1.24) can apply the new rules and warn where a result changes
# (NPY_PROMOTION_STATE=weak_and_warn): the test model and the states of the configs that draw
# random numbers (jitter, Drop-Upcycling in both modes, noise, scratch) and rank by score must be
# the same bytes under them, without a warning. With NumPy 2 the suite already runs under them.
if "$PYTHON" -c "import numpy, sys; sys.exit(not hasattr(numpy, '_set_promotion_state'))" 2>/dev/null; then
    NEP50=$TMP/nep50
    mkdir -p "$NEP50"
    export NPY_PROMOTION_STATE=weak_and_warn
    differ=""
    $REF make-dense --model 4:32:4:16 --vocab 100 --seed 7 --jitter 0.05 -o "$NEP50/dense.bin" > "$NEP50/make.out" 2>&1
    cmp -s "$DENSE" "$NEP50/dense.bin" || differ="$differ dense.bin"
    for name in e4_k2_drop_r0.5 e4_k2_drop_r0.25_independent e4_k2_noise e4_k2_scratch_wsd e8_k2_capacity0.75_score; do
        # shellcheck disable=SC2046
        $REF debug -m "$DENSE" -i "$SHARD" $GEOMETRY --steps 10 --state "$NEP50/$name.state" --write-model "$NEP50/$name.ref.bin" \
            $(cat "$TMP/$name.options") > "$NEP50/$name.out" 2>&1
        { cmp -s "$TMP/$name.state" "$NEP50/$name.state" && cmp -s "$TMP/$name.ref.bin" "$NEP50/$name.ref.bin"; } || differ="$differ $name"
    done
    unset NPY_PROMOTION_STATE
    warnings=$(grep -h -m 1 -i 'warning' "$NEP50"/*.out | head -n 1 | cut -c1-200)
    if [ -z "$differ" ] && [ -z "$warnings" ]; then
        pass reference_under_numpy2_promotion "the test model and 5 configs' states and models byte-identical under NEP 50 (NPY_PROMOTION_STATE=weak_and_warn), no warning"
    else
        fail reference_under_numpy2_promotion "under NEP 50, different:${differ:- none}; ${warnings:-no warning}"
    fi
else
    echo "SKIP reference_under_numpy2_promotion: this NumPy has no NPY_PROMOTION_STATE (NumPy 2 applies NEP 50 throughout)"
fi

echo "== invariants"
run_checks invariants ./test_moe_cpu invariants "$DENSE" "$SHARD" "$TMP"

echo "== whole runs"
TRAIN="./train_moe_cpu -m $DENSE -i $SHARD -j $SHARD $GEOMETRY -s 0 -v 4 --val-steps 2 --stats-every 4 -l 1e-3"
MOE="-e 8 -k 2 --init drop --capacity-factor 1.25 --z-loss 0.001"
# shellcheck disable=SC2086
$TRAIN $MOE -x 8 -o "$TMP/run_a" > "$TMP/run_a.out" 2>&1
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 $TRAIN $MOE -x 8 -o "$TMP/run_b" > "$TMP/run_b.out" 2>&1
if cmp -s "$TMP/run_a/model_00000008.bin" "$TMP/run_b/model_00000008.bin" &&
   cmp -s "$TMP/run_a/state_00000008.bin" "$TMP/run_b/state_00000008.bin" &&
   cmp -s "$TMP/run_a/main.log" "$TMP/run_b/main.log"; then
    pass same_seed_runs_are_bit_identical "8 MoE steps, 2 threads vs 1 thread: model, optimizer state and main.log identical"
else
    fail same_seed_runs_are_bit_identical "the two runs differ (or did not finish: $(tail -n 2 "$TMP/run_a.out" | tr '\n' ' '))"
fi
# shellcheck disable=SC2086
$TRAIN $MOE -x 8 --seed 1338 -o "$TMP/run_c" > "$TMP/run_c.out" 2>&1
if [ -f "$TMP/run_c/model_00000008.bin" ] && ! cmp -s "$TMP/run_a/model_00000008.bin" "$TMP/run_c/model_00000008.bin"; then
    pass another_seed_gives_another_model "--seed 1338 re-draws the dropped units and the router"
else
    fail another_seed_gives_another_model "a different seed gave the same model (or the run failed)"
fi

# resume: stop at step 4, continue to 8, compare with the straight run. The logs are the straight
# run's to step 8, as a run that crashed after step 8 leaves them next to the checkpoint of step 4:
# the resumed run drops the lines after step 4 and the validation of step 4, which it does again.
# Routing reports every 3 steps: the one of step 6 covers steps 4 to 6, across the checkpoint,
# whose resume state holds step 4's routing sums.
TRAIN_RESUME="$TRAIN --stats-every 3"
# shellcheck disable=SC2086
$TRAIN_RESUME $MOE -x 8 -n 4 -o "$TMP/run_full" > "$TMP/run_full.out" 2>&1
mkdir -p "$TMP/run_resumed"
for file in model_00000004.bin state_00000004.bin DONE_00000004 main.log moe.log; do
    cp "$TMP/run_full/$file" "$TMP/run_resumed/" 2>/dev/null
done
# shellcheck disable=SC2086
$TRAIN_RESUME $MOE -x 8 -n 4 -y 1 -o "$TMP/run_resumed" > "$TMP/run_resumed.out" 2>&1
# the step lines of steps 5-8 without their times, and the routing report of step 6
after_step_4() { sed -n -E '/^step +5\//,$p' "$1" | grep -E '^(step +[5-8]/|routing, steps|  layer)' | sed 's/| [0-9.]* ms.*//'; }
after_step_4 "$TMP/run_full.out" > "$TMP/full_steps"
after_step_4 "$TMP/run_resumed.out" > "$TMP/resumed_steps"
if cmp -s "$TMP/run_full/model_00000008.bin" "$TMP/run_resumed/model_00000008.bin" &&
   cmp -s "$TMP/run_full/state_00000008.bin" "$TMP/run_resumed/state_00000008.bin" &&
   cmp -s "$TMP/run_full/main.log" "$TMP/run_resumed/main.log" && cmp -s "$TMP/run_full/moe.log" "$TMP/run_resumed/moe.log" &&
   grep -q '^s:8 tel' "$TMP/run_full/main.log" && grep -q '^s:6 layer' "$TMP/run_full/moe.log" &&
   grep -q '^routing, steps 4..6:' "$TMP/full_steps" && cmp -s "$TMP/full_steps" "$TMP/resumed_steps"; then
    pass resume_is_bit_identical "resumed at step 4 next to the logs of a run that went on to step 8: model, optimizer state, the printed losses of steps 5-8 and the routing report of steps 4-6, main.log and moe.log identical"
else
    fail resume_is_bit_identical "resumed run differs (or failed: $(tail -n 2 "$TMP/run_resumed.out" | tr '\n' ' '))"
fi

# A version 1 resume state (before 2026-12-07: no routing sums) still resumes, to the same model
# and optimizer state; its first routing report covers the steps after the checkpoint only.
mkdir -p "$TMP/run_v1"
cp "$TMP/run_full/model_00000004.bin" "$TMP/run_full/DONE_00000004" "$TMP/run_v1/"
"$PYTHON" - "$TMP/run_full/state_00000004.bin" "$TMP/run_v1/state_00000004.bin" << 'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
header = list(struct.unpack("<256i", data[:1024]))
window = header[17]  # the routing sums (doubles) after the moments
header[1] = 1
header[17:21] = [0, 0, 0, 0]
open(sys.argv[2], "wb").write(struct.pack("<256i", *header) + data[1024:len(data) - 8 * window])
EOF
# shellcheck disable=SC2086
$TRAIN_RESUME $MOE -x 8 -n 4 -y 1 -o "$TMP/run_v1" > "$TMP/run_v1.out" 2>&1
if cmp -s "$TMP/run_full/model_00000008.bin" "$TMP/run_v1/model_00000008.bin" &&
   cmp -s "$TMP/run_full/state_00000008.bin" "$TMP/run_v1/state_00000008.bin" && grep -q '^routing, steps 5..6:' "$TMP/run_v1.out"; then
    pass resume_from_version1_state "a state without routing sums resumes at step 4: model and optimizer state at step 8 identical, the first routing report from step 5"
else
    fail resume_from_version1_state "$(grep -m 1 '^routing, steps' "$TMP/run_v1.out"): $(tail -n 2 "$TMP/run_v1.out" | tr '\n' ' ')"
fi

# SIGTERM stops a run at the next step with a checkpoint there, which -y 1 continues
# bit-identically; a second signal stops at once (tests/stop_run.sh). A model wide enough for
# steps of about 0.1 s, so that the signal lands before the run ends; one routing report, at the
# last step, so that it spans the stop.
$REF make-dense --model 4:128:4:64 --vocab 100 --seed 7 --jitter 0.05 -o "$TMP/dense_c128.bin" > "$TMP/make_c128.out" 2>&1
# shellcheck disable=SC2086
run_checks stop tests/stop_run.sh train_moe_cpu "$TMP/stop" 20 double -- ./train_moe_cpu -m "$TMP/dense_c128.bin" -i "$SHARD" \
    -j "$SHARD" -b 8 -t 64 -s 0 -v 0 --stats-every 20 $MOE

# --breakdown 1 times each part of a step and changes nothing (tests/breakdown.sh): an MoE run with
# dense layers too (every2), so that every part of the table has work
run_checks breakdown tests/breakdown.sh train_moe_cpu "$TMP/breakdown" -- ./train_moe_cpu -m "$DENSE" -i "$SHARD" -j "$SHARD" \
    $GEOMETRY -s 0 -v 0 --stats-every 0 -e 4 -k 2

# -e 1 writes llm.c's model file; the engine's MoE checkpoint is read by the reference
# shellcheck disable=SC2086
./train_moe_cpu -m "$DENSE" -i "$SHARD" -j "$SHARD" $GEOMETRY -s 0 -e 1 -x 2 -o "$TMP/run_dense" > "$TMP/run_dense.out" 2>&1
magic=$(od -An -t d4 -N 8 "$TMP/run_dense/model_00000002.bin" 2>/dev/null | tr -s ' ')
if [ "$magic" = " 20240326 3" ]; then
    pass dense_run_writes_llmc_checkpoint "model_00000002.bin: magic 20240326, version 3"
else
    fail dense_run_writes_llmc_checkpoint "header starts with '$magic'"
fi
for pair in "dense_checkpoint_roundtrip|$TMP/run_dense/model_00000002.bin|-e 1" "moe_checkpoint_roundtrip|$TMP/run_a/model_00000008.bin|"; do
    IFS='|' read -r name model options <<< "$pair"
    # shellcheck disable=SC2086
    if $REF debug -m "$model" -i "$SHARD" $GEOMETRY --steps 2 --state "$TMP/$name.state" --write-model "$TMP/$name.ref.bin" $options $OPTIM > "$TMP/$name.ref.out" 2>&1; then
        # shellcheck disable=SC2086
        run_checks "$name" ./test_moe_cpu reference "$name" "$TMP/$name.state" "$TMP/$name.ref.bin" -- -m "$model" -i "$SHARD" $GEOMETRY $options $OPTIM
    else
        fail "$name" "the reference could not read the engine's checkpoint: $(tail -n 2 "$TMP/$name.ref.out" | tr '\n' ' ')"
    fi
done

echo "== bad input"
BAD=$TMP/bad
mkdir -p "$BAD" "$BAD/out"
# expect_error NAME PATTERN command...: exit status 1, exactly one "error:" line matching PATTERN
expect_error() {
    local name=$1 pattern=$2; shift 2
    timeout 60 "$@" > "$BAD/stdout" 2> "$BAD/stderr"
    local rc=$?
    local line
    line=$(grep '^error: ' "$BAD/stderr" | head -n 1)
    if [ "$rc" -eq 1 ] && [ "$(grep -c '^error: ' "$BAD/stderr")" -eq 1 ] && grep -qi -- "$pattern" <<< "$line"; then
        pass "$name" "exit 1, ${line:0:160}"
    else
        fail "$name" "exit status $rc (want 1 and an error matching '$pattern'): $(tail -c 300 "$BAD/stderr" | tr '\n' ' ')"
    fi
}
# corrupt copies of the test model: put_int FILE SLOT VALUE overwrites one header slot
put_int() { printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($3 & 255)) $((($3 >> 8) & 255)) $((($3 >> 16) & 255)) $((($3 >> 24) & 255)))" | dd of="$1" bs=4 seek="$2" conv=notrunc status=none; }
RUN="./train_moe_cpu -i $SHARD -j $SHARD $GEOMETRY -x 1 -s 0 -o $BAD/out"
head -c 5000 "$DENSE" > "$BAD/truncated.bin"
head -c 100 "$DENSE" > "$BAD/tiny.bin"
: > "$BAD/empty.bin"
cp "$DENSE" "$BAD/magic.bin"; put_int "$BAD/magic.bin" 0 12345
cp "$DENSE" "$BAD/version.bin"; put_int "$BAD/version.bin" 1 4
cp "$DENSE" "$BAD/layers.bin"; put_int "$BAD/layers.bin" 4 5
cp "$DENSE" "$BAD/huge.bin"; put_int "$BAD/huge.bin" 6 1000000000
cp "$DENSE" "$BAD/heads.bin"; put_int "$BAD/heads.bin" 5 3
cp "$DENSE" "$BAD/nan.bin"; printf '\x00\x00\xc0\x7f' | dd of="$BAD/nan.bin" bs=1 seek=2000 conv=notrunc status=none
# finite values whose sums overflow (3e38 in wte and wpe): the first step's loss is NaN
cp "$DENSE" "$BAD/overflow.bin"
for _ in $(seq 4608); do printf '\xe6\xb1\x61\x7f'; done | dd of="$BAD/overflow.bin" bs=1024 seek=1 conv=notrunc status=none
cp "$TMP/run_a/model_00000008.bin" "$BAD/moe_flip.bin"; printf '\x55' | dd of="$BAD/moe_flip.bin" bs=1 seek=4000 conv=notrunc status=none
cp "$TMP/run_a/model_00000008.bin" "$BAD/moe_trailing.bin"; printf 'xxxx' >> "$BAD/moe_trailing.bin"
cp "$TMP/run_a/model_00000008.bin" "$BAD/moe_experts.bin"; put_int "$BAD/moe_experts.bin" 8 6
expect_error checkpoint_truncated "truncated" $RUN -m "$BAD/truncated.bin"
expect_error checkpoint_smaller_than_header "truncated" $RUN -m "$BAD/tiny.bin"
expect_error checkpoint_empty "truncated" $RUN -m "$BAD/empty.bin"
expect_error checkpoint_wrong_magic "bad magic" $RUN -m "$BAD/magic.bin"
expect_error checkpoint_wrong_version "version 4" $RUN -m "$BAD/version.bin"
expect_error checkpoint_header_disagrees_with_size "header says L=5" $RUN -m "$BAD/layers.bin"
expect_error checkpoint_absurd_dimensions "C=1000000000" $RUN -m "$BAD/huge.bin"
expect_error checkpoint_heads_do_not_divide "NH=3" $RUN -m "$BAD/heads.bin"
expect_error checkpoint_corrupt_nan "non-finite" $RUN -m "$BAD/nan.bin"
expect_error moe_checkpoint_corrupt_byte "checksum" $RUN -m "$BAD/moe_flip.bin"
expect_error moe_checkpoint_trailing_bytes "trailing bytes" $RUN -m "$BAD/moe_trailing.bin"
expect_error moe_checkpoint_experts_disagree "header says" $RUN -m "$BAD/moe_experts.bin"
expect_error model_file_missing "not found" $RUN -m "$BAD/nothing.bin"
# bad inputs found only once training has started (into $BAD/started): logs, but no checkpoint
expect_error training_diverges "diverged" $RUN -m "$BAD/overflow.bin" -e 4 -k 2 -o "$BAD/started"

head -c 3000 "$SHARD" > "$BAD/shard_truncated.bin"
cp "$SHARD" "$BAD/shard_magic.bin"; put_int "$BAD/shard_magic.bin" 0 7
"$PYTHON" dev/train_moe.py make-shard --vocab 100 --tokens 40 --seed 1 -o "$BAD/shard_small.bin" > /dev/null 2>&1
"$PYTHON" dev/train_moe.py make-shard --vocab 500 --tokens 4096 --seed 1 -o "$BAD/shard_vocab.bin" > /dev/null 2>&1
RUNM="./train_moe_cpu -m $DENSE $GEOMETRY -x 1 -s 0 -o $BAD/out"
expect_error shard_truncated "header says" $RUNM -i "$BAD/shard_truncated.bin" -j "$SHARD"
expect_error shard_wrong_magic "bad magic" $RUNM -i "$BAD/shard_magic.bin" -j "$SHARD"
expect_error shard_smaller_than_one_batch "fewer than one batch" $RUNM -i "$BAD/shard_small.bin" -j "$SHARD"
expect_error shard_token_outside_vocabulary "not below" $RUNM -i "$BAD/shard_vocab.bin" -j "$SHARD" -o "$BAD/started"
expect_error shard_missing "no data file matches" $RUNM -i "$BAD/none_*.bin" -j "$SHARD"

RUNS="$RUN -m $DENSE"
expect_error unknown_flag "unknown option" $RUNS --expertz 8
expect_error unknown_short_flag "unknown option" $RUNS -Q 1
expect_error flag_without_value "needs a value" $RUNS -e
expect_error experts_not_an_integer "not an integer" $RUNS -e eight
expect_error experts_out_of_range "out of range" $RUNS -e 0
expect_error lr_not_finite "finite" $RUNS -l nan
expect_error bad_choice "not one of" $RUNS -e 4 --init dropout
expect_error topk_above_experts "top-k" $RUNS -e 4 -k 5
expect_error experts_not_multiple_of_granularity "multiple of the granularity" $RUNS -e 6 --granularity 4
expect_error k1_with_renorm1 "no gradient" $RUNS -e 4 -k 1 --renorm 1
expect_error moe_layer_out_of_range "out of range" $RUNS -e 4 --moe-layers 1,9
expect_error moe_layer_repeated "listed twice" $RUNS -e 4 --moe-layers 1,1
expect_error moe_layers_lastN_too_many "lastN" $RUNS -e 4 --moe-layers last9
expect_error moe_layers_garbage "comma-separated" $RUNS -e 4 --moe-layers 1,x
expect_error seq_len_above_maxT "exceeds" $RUNS -t 32
expect_error total_batch_not_multiple "multiple of B\*T" $RUNS -d 100
expect_error moe_checkpoint_conflicting_experts "conflicts" $RUN -m "$TMP/run_a/model_00000008.bin" -e 4
expect_error init_optimizer_needs_dense_upcycling "needs -m with a dense checkpoint" $RUN -m "$TMP/run_a/model_00000008.bin" --init-optimizer "$TMP/run_dense/state_00000002.bin"
# the moments of the 8-expert run, not of the dense model -m: the run stops as it starts, no log
expect_error init_optimizer_state_of_another_model "holds optimizer moments for" $RUN -m "$DENSE" -e 8 -k 2 --init-optimizer "$TMP/run_full/state_00000008.bin"
expect_error resume_without_output_dir "give it with -o" ./train_moe_cpu -m "$DENSE" -i "$SHARD" -y 1

cp -r "$TMP/run_full" "$BAD/resume_corrupt"
head -c 2000 "$BAD/resume_corrupt/state_00000008.bin" > "$BAD/resume_corrupt/state.tmp" && mv "$BAD/resume_corrupt/state.tmp" "$BAD/resume_corrupt/state_00000008.bin"
expect_error resume_state_truncated "truncated" ./train_moe_cpu -m "$DENSE" -i "$SHARD" -j "$SHARD" $GEOMETRY $MOE -x 9 -s 0 -y 1 -o "$BAD/resume_corrupt"
# a byte of the routing sums (the file's last bytes) changed: the checksum catches it
cp -r "$TMP/run_full" "$BAD/resume_window"
printf '\x7f' | dd of="$BAD/resume_window/state_00000008.bin" bs=1 seek=$(($(stat -c %s "$BAD/resume_window/state_00000008.bin") - 3)) conv=notrunc status=none
expect_error resume_state_routing_sums_corrupt "checksum" ./train_moe_cpu -m "$DENSE" -i "$SHARD" -j "$SHARD" $GEOMETRY $MOE -x 9 -s 0 -y 1 -o "$BAD/resume_window"

leftovers=$( (find "$BAD/out" -type f; find "$BAD/started" -type f ! -name '*.log') 2>/dev/null)
if [ -z "$leftovers" ]; then
    pass bad_input_writes_nothing "no checkpoint, temporary file or log left in the output directory (the runs that started training: their logs only)"
else
    fail bad_input_writes_nothing "$(echo "$leftovers" | wc -l) files left: $(echo "$leftovers" | head -n 3 | tr '\n' ' ')"
fi

echo "== documentation"
# README lists every option as -h prints it (both programs print the same list: common/args.h):
# an option added, renamed or given another default without README following fails here
./train_moe_cpu -h > "$TMP/help.txt" 2>&1
help_rc=$?
options=$(grep -c -E '^ +-' "$TMP/help.txt")
missing=$(grep -E '^ +-' "$TMP/help.txt" | while IFS= read -r line; do grep -q -x -F -- "$line" README.md || echo "$line"; done)
if [ "$help_rc" -eq 0 ] && [ "$options" -gt 20 ] && [ -z "$missing" ]; then
    pass readme_lists_every_option "the $options option lines of train_moe_cpu -h, each word for word in README.md"
else
    fail readme_lists_every_option "-h exit status $help_rc, $options option lines; not in README.md as printed: $(echo "$missing" | head -n 3 | sed 's/  */ /g' | tr '\n' '|' | cut -c1-300)"
fi

echo "== recipes"
# scripts/ablate.sh, the upcycling ablation, on the test model with the twin: five arms from one
# dense checkpoint; copy upcycling's first loss is the dense model's (the same function), drop
# and scratch start elsewhere; the summary and the curves hold every arm
ABLATE=$TMP/ablate
ENGINE=./train_moe_cpu OUT=$ABLATE STEPS=4 B=4 T=16 VAL_EVERY=2 VAL_STEPS=2 TRAIN=$SHARD VAL=$SHARD \
    bash scripts/ablate.sh "$DENSE" > "$TMP/ablate.out" 2>&1
ablate_rc=$?
rows=$(grep -c -E '^\| (dense|copy|drop|noise|scratch) \| `[^`]*` \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9]+ \|$' "$ABLATE/summary.md" 2>/dev/null)
first() { grep -E "^\| $1 \|" "$ABLATE/summary.md" | awk -F'|' '{gsub(/ /, "", $4); print $4}'; }
header=$(head -n 1 "$ABLATE/val_loss.csv" 2>/dev/null)
if [ "$ablate_rc" -eq 0 ] && [ "$rows" = 5 ] && [ "$header" = "step,dense,copy,drop,noise,scratch" ] &&
   [ "$(wc -l < "$ABLATE/val_loss.csv")" = 4 ] && [ "$(first copy)" = "$(first dense)" ] &&
   [ "$(first drop)" != "$(first dense)" ] && [ "$(first scratch)" != "$(first dense)" ]; then
    pass ablation_recipe "scripts/ablate.sh: 5 arms from one checkpoint, copy's first loss $(first copy) = dense's, drop's $(first drop) and scratch's $(first scratch) elsewhere; summary.md and val_loss.csv whole"
else
    fail ablation_recipe "exit status $ablate_rc, $rows summary rows (5 expected), csv '$header', first losses dense $(first dense) copy $(first copy) drop $(first drop): $(tail -n 2 "$TMP/ablate.out" | tr '\n' ' ')"
fi
expect_error ablation_recipe_without_checkpoint "not a file" bash scripts/ablate.sh "$BAD/nothing.bin"

# scripts/bench.sh's PyTorch rows: the reference's bench on a shape with no --vocab (bench.sh gives
# -m d12; GPT-2's vocabulary by default, as the engines), dense and MoE, each with the line that
# bench.sh reads (its "median ... ms" and "... tokens/s"); here on the CPU and a small shape
bench_lines=""
for options in "-e 1" "-e 8 -k 2"; do
    # shellcheck disable=SC2086
    line=$($REF bench -m 2:64:2:64 -i "$SHARD" -b 2 -t 32 --steps 3 --device cpu $options 2>&1 | grep '^bench:')
    ms=$(echo "$line" | grep -o 'median [0-9.]* ms' | awk '{print $2}')
    tps=$(echo "$line" | grep -o '[0-9.]* tokens/s' | awk '{print $1}')
    [ -n "$ms" ] && [ -n "$tps" ] && bench_lines="$bench_lines|$ms ms $tps tokens/s"
done
if [ "$(echo "$bench_lines" | tr -cd '|' | wc -c)" = 2 ]; then
    pass reference_bench_rows "dev/train_moe.py bench from a shape with no --vocab, dense and MoE, with the fields bench.sh reads: ${bench_lines#|}"
else
    fail reference_bench_rows "no bench line bench.sh can read: $($REF bench -m 2:64:2:64 -i "$SHARD" -b 2 -t 32 --steps 3 --device cpu 2>&1 | tail -n 1 | cut -c1-200)"
fi

# scripts/gpu_check.sh with GPU_PREBUILT (binaries of scripts/gpu_prebuild.sh, built where there is
# no GPU): in a copy of the sources, an archive of stand-ins (scripts that print a line) with the
# sources' checksum is taken, and the studies run from it with no build (NVCC=false: any build
# would fail); once a source changes, the archive is refused and the build part builds
GPUC=$TMP/gpu_check_prebuilt
# gpu_scripts_tree DIR: a copy of what the GPU scripts read (the sources whose checksum
# scripts/gpu_prebuild.sh records, the studies' runner, the data script, the scripts themselves)
gpu_scripts_tree() {
    mkdir -p "$1/tests" "$1/dev/cuda" "$1/dev/data" "$1/scripts"
    cp -r Makefile train_moe.cu test_moe.cu train_moe_cpu.cpp common kernels "$1/"
    cp tests/test_common.h "$1/tests/"
    cp dev/cuda/Makefile dev/cuda/*.cu dev/cuda/*.cuh dev/cuda/run_all.sh "$1/dev/cuda/"
    cp dev/data/prepare.py "$1/dev/data/"
    cp scripts/gpu_prepare.sh scripts/gpu_check.sh scripts/gpu_prebuild.sh "$1/scripts/"
}
gpu_scripts_tree "$GPUC/tree"
mkdir -p "$GPUC/stubs/FP32" "$GPUC/stubs/BF16"
for path in FP32/train_moe FP32/test_moe BF16/train_moe BF16/test_moe $(cd dev/cuda && for f in *.cu; do echo "dev_cuda/FP32/${f%.cu} dev_cuda/BF16/${f%.cu}"; done); do
    mkdir -p "$(dirname "$GPUC/stubs/$path")"
    printf '#!/bin/sh\necho "PASS stand-in %s"\n' "$path" > "$GPUC/stubs/$path"
    chmod +x "$GPUC/stubs/$path"
done
bash scripts/gpu_prebuild.sh --pack "$GPUC/stubs" "$GPUC/prebuilt.tar.gz"
NVCC=false GPU_PREBUILT=$GPUC/prebuilt.tar.gz bash "$GPUC/tree/scripts/gpu_check.sh" "$GPUC/taken" build studies > /dev/null 2>&1
taken_rc=$?
studies_ran=$(grep -c '^PASS stand-in dev_cuda/' "$GPUC/taken/dev_cuda.log" 2>/dev/null)
echo "// an edit after the prebuild" >> "$GPUC/tree/kernels/gelu.cuh"
NVCC=false GPU_PREBUILT=$GPUC/prebuilt.tar.gz bash "$GPUC/tree/scripts/gpu_check.sh" "$GPUC/refused" build > /dev/null 2>&1
refused_rc=$?
if [ "$taken_rc" -eq 0 ] && grep -q '^| prebuilt .* | PASS |' "$GPUC/taken/report.md" && cmp -s "$GPUC/stubs/BF16/test_moe" "$GPUC/tree/test_moe" &&
   [ "$studies_ran" = $((2 * $(ls dev/cuda/*.cu | wc -l))) ] && [ "$refused_rc" -ne 0 ] &&
   grep -q '^| build .*not used.* | FAIL' "$GPUC/refused/report.md" && grep -q 'built from other sources' "$GPUC/refused/build.log"; then
    pass gpu_check_prebuilt "GPU_PREBUILT: the archive of the same sources taken, its $studies_ran study binaries run with no build; after an edit, refused and built anew"
else
    fail gpu_check_prebuilt "taken: exit $taken_rc, $studies_ran studies run, report: $(grep -E '^\| (prebuilt|build) ' "$GPUC/taken/report.md" | head -n 1 | cut -c1-120); after an edit: exit $refused_rc, $(head -n 1 "$GPUC/refused/build.log" 2>/dev/null)"
fi
# a part that hangs (a kernel that never ends, on a GPU) is stopped at its limit, with all its
# processes, and the report says so: here a train_moe that sleeps, with every limit 2 s (LIMIT_S)
printf '#!/bin/sh\nsleep 97\n' > "$GPUC/tree/train_moe"
chmod +x "$GPUC/tree/train_moe"
mkdir -p "$GPUC/tree/dev/data/tinyshakespeare" && touch "$GPUC/tree/dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
t0=$SECONDS
LIMIT_S=2 bash "$GPUC/tree/scripts/gpu_check.sh" "$GPUC/hang" train > /dev/null 2>&1
hang_rc=$? hang_s=$((SECONDS - t0))
left=$(pgrep -f "sleep 97" | wc -l)
if [ "$hang_rc" -ne 0 ] && [ "$(grep -c '| FAIL (stopped after its limit of 2 s) |' "$GPUC/hang/report.md")" = 2 ] && [ "$hang_s" -lt 20 ] && [ "$left" = 0 ]; then
    pass gpu_check_part_limit "a hanging part stopped at its limit (2 trainings, ${hang_s} s in all), no process left, the report says so"
else
    fail gpu_check_part_limit "exit $hang_rc after $hang_s s, $left processes left, rows: $(grep '^| train\|^| upcycle' "$GPUC/hang/report.md" | tr '\n' ' ' | cut -c1-200)"
fi
# DEADLINE_S (a GPU lent for a fixed time): the first training gets what is left of 13 s less the 10 s
# its stop may take, and is stopped there; the second finds no time left and is not started
t0=$SECONDS
DEADLINE_S=13 bash "$GPUC/tree/scripts/gpu_check.sh" "$GPUC/deadline" train > /dev/null 2>&1
deadline_rc=$? deadline_s=$((SECONDS - t0))
rows=$(grep -E '^\| (train|upcycle)' "$GPUC/deadline/report.md" | sed -E 's/^\| [^|]* \| ([^|]*) \|.*/\1/' | tr '\n' '|')
if [ "$deadline_rc" -ne 0 ] && [ "$deadline_s" -le 13 ] && [ -z "$(pgrep -f "sleep 97")" ] &&
   [[ "$rows" =~ ^FAIL\ \(stopped\ at\ DEADLINE_S=13,\ after\ [23]\ s\)\|NOT\ RUN\ \(no\ time\ left\ before\ DEADLINE_S=13\)\|$ ]]; then
    pass gpu_check_deadline "DEADLINE_S=13: the first training stopped at the deadline, the second not started, ${deadline_s} s in all; the rows say so"
else
    fail gpu_check_deadline "exit $deadline_rc after $deadline_s s, rows: $rows"
fi

# scripts/gpu_prepare.sh (what one device call carries, made where there is no GPU), in a copy of
# the sources holding an archive of stand-ins packed from them (so nothing is built: NVCC=false
# fails any build) and a stand-in llm.c: it copies the data in, prepares the shards, keeps the
# archive, and prints a call whose carry paths all exist and whose command, run here on its build
# and studies parts, takes the archive; llm.c outside the checkout, and more than 64 MiB to
# carry, are refused
PREP=$TMP/gpu_prepare
shared=$(cd "${SHARED_DATA:-../shared/data}" 2>/dev/null && pwd)
if [ -z "$shared" ] || [ ! -f "$shared/tinyshakespeare.txt" ] || [ ! -f "$shared/gpt2/vocab.bpe" ]; then
    echo "SKIP gpu_prepare: no Tiny Shakespeare and GPT-2 BPE files in ${SHARED_DATA:-../shared/data} (SHARED_DATA)"
else
    gpu_scripts_tree "$PREP/tree"
    mkdir -p "$PREP/tree/.llmc"
    touch "$PREP/tree/.llmc/train_gpt2.cu"
    printf '#!/bin/sh\necho "stand-in llm.c"\n' > "$PREP/tree/.llmc/train_gpt2cu_bench"
    chmod +x "$PREP/tree/.llmc/train_gpt2cu_bench"
    (cd "$PREP/tree" && bash scripts/gpu_prebuild.sh --pack "$GPUC/stubs" .gpu_build.tar.gz)
    prep_out=$(cd "$PREP/tree" && NVCC=false SHARED_DATA=$shared LLMC=.llmc bash scripts/gpu_prepare.sh 2>&1)
    prep_rc=$?
    carried=$(echo "$prep_out" | sed -n 's/^  carry: *\[\(.*\)\]$/\1/p' | tr -d '",')
    missing=""
    for path in $carried; do [ -e "$PREP/tree/$path" ] || missing="$missing $path"; done
    command=$(echo "$prep_out" | sed -n 's/^  command: *//p')
    (cd "$PREP/tree" && OUT=$PREP/check NVCC=false eval "$command build studies") > /dev/null 2>&1
    command_rc=$?
    prep_studies=$(grep -c '^PASS stand-in dev_cuda/' "$PREP/check/dev_cuda.log" 2>/dev/null)
    outside=$(cd "$PREP/tree" && NVCC=false SHARED_DATA=$shared LLMC=/tmp/llm.c bash scripts/gpu_prepare.sh 2>&1)
    outside_rc=$?
    truncate -s 65M "$PREP/tree/.llmc/big"  # sparse: 65 MiB long, no disk
    big=$(cd "$PREP/tree" && NVCC=false SHARED_DATA=$shared LLMC=.llmc bash scripts/gpu_prepare.sh 2>&1)
    big_rc=$?
    if [ "$prep_rc" -eq 0 ] && echo "$prep_out" | grep -q 'was built from these sources .*: kept' && [ "$(echo "$carried" | wc -w)" = 4 ] && [ -z "$missing" ] &&
       [ -s "$PREP/tree/dev/data/tinyshakespeare/tiny_shakespeare_train.bin" ] && [ -f "$PREP/tree/.shared_data/gpt2/encoder.json" ] &&
       [ "$command_rc" -eq 0 ] && grep -q '^| prebuilt .* | PASS |' "$PREP/check/report.md" && [ "$prep_studies" = $((2 * $(ls dev/cuda/*.cu | wc -l))) ] &&
       [ "$outside_rc" -eq 1 ] && [[ "$outside" == *"give a folder inside this checkout"* ]] &&
       [ "$big_rc" -eq 1 ] && [[ "$big" == *"more than the 64 MiB one device call carries"* ]]; then
        pass gpu_prepare "the carry list ($carried) made and all there, the archive of these sources kept; the printed command took it and ran its $prep_studies studies; llm.c outside the checkout refused, and $(echo "$big" | grep -o '[0-9]* MiB, more than' | cut -d, -f1) to carry"
    else
        fail gpu_prepare "exit $prep_rc, carry: $carried (missing:${missing:- none}); the command: exit $command_rc, $prep_studies studies; outside: exit $outside_rc; 66 MiB: exit $big_rc; $(echo "$prep_out" | tail -n 2 | tr '\n' ' ' | cut -c1-200)"
    fi
fi

# scripts/bench.sh fails when a train_moe run stops before its first step (on a GPU: a launch error,
# too little memory) and says why in that run's row; one that trains gives its figures and passes.
# Here a stand-in train_moe that stops, then one that prints 8 step lines as the engine does
BENCH=$TMP/bench
mkdir -p "$BENCH/scripts" "$BENCH/dev/data/tinyshakespeare"
cp scripts/bench.sh "$BENCH/scripts/"
touch "$BENCH/dev/data/tinyshakespeare/tiny_shakespeare_train.bin"
printf '#!/bin/sh\necho "error: out of GPU memory (stand-in)"\nexit 1\n' > "$BENCH/train_moe"
chmod +x "$BENCH/train_moe"
(cd "$BENCH" && PYTHON=false bash scripts/bench.sh "$BENCH/stopped.md" > /dev/null 2>&1)
stopped_rc=$?
printf '#!/bin/sh\nfor i in 1 2 3 4 5 6 7 8; do echo "step    $i/8 | loss 10.8 | norm 1.5000 | lr 3.00e-04 | 12$i.0 ms | 6553$i tok/s | 5000.0 GFLOP/s | MFU 40.$i%%"; done\n' > "$BENCH/train_moe"
(cd "$BENCH" && PYTHON=false bash scripts/bench.sh "$BENCH/trained.md" > /dev/null 2>&1)
trained_rc=$?
if [ "$stopped_rc" -eq 1 ] && [ "$(grep -c '^| train_moe .*: did not train (error: out of GPU memory (stand-in)) |' "$BENCH/stopped.md")" -ge 3 ] &&
   [ "$trained_rc" -eq 0 ] && [ "$(grep -c '^| train_moe .* | 127.0 | 65537 | 40.7% |' "$BENCH/trained.md")" -ge 3 ]; then
    pass bench_exit_status "a train_moe that stops fails the benchmark, each row saying why; one that trains passes, with its medians over the steps after the first 5 (steps 6 to 8 of a stand-in: step 7's 127.0 ms, 65537 tok/s, MFU 40.7%)"
else
    fail bench_exit_status "stopped: exit $stopped_rc, $(grep -m 1 '^| train_moe' "$BENCH/stopped.md" | cut -c1-120); trained: exit $trained_rc, $(grep -m 1 '^| train_moe' "$BENCH/trained.md" | cut -c1-120)"
fi

# tests/gpu_sanitize.sh (compute-sanitizer over test_moe, on a GPU machine) reads the tool's verdicts
# right: here stand-ins for the tool and for test_moe. memcheck finds nothing (PASS, except where the
# stand-in test_moe fails a check under it), racecheck reports a hazard, synccheck hangs past the
# limit (each FAIL); a tool that cannot run on the GPU, or none at all, SKIPs
SAN=$TMP/sanitize
mkdir -p "$SAN/states/cuda_FP32" "$SAN/states/cuda_BF16"
for name in e8_k2_capacity1_drops e4_expert_choice; do echo "-e 4 -k 2" > "$SAN/states/$name.options"; done
printf '#!/bin/sh\necho "PASS $2.logits: fine"\n[ "$2" = e4_expert_choice ] && { echo "FAIL $2.loss: off"; exit 1; }\nexit 0\n' > "$SAN/states/cuda_FP32/test_moe"
cp "$SAN/states/cuda_FP32/test_moe" "$SAN/states/cuda_BF16/test_moe"
cat > "$SAN/verdicts" <<'STUB'
#!/bin/sh
tool=$2; shift 6
case $tool in
    memcheck) "$@"; rc=$?; echo "========= ERROR SUMMARY: 0 errors"; exit $rc ;;
    racecheck) "$@"; echo "========= Error: Race reported between Write access at f+0x10 and Read access at f+0x20"
               echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"; echo "========= ERROR SUMMARY: 1 error"; exit 99 ;;
    synccheck) exec sleep 61 ;;
esac
STUB
printf '#!/bin/sh\necho "========= Error: Device not supported"\necho "error: CUDA error 999"\necho "========= ERROR SUMMARY: 0 errors"\nexit 1\n' > "$SAN/unsupported"
chmod +x "$SAN/states/cuda_FP32/test_moe" "$SAN/states/cuda_BF16/test_moe" "$SAN/verdicts" "$SAN/unsupported"
verdicts=$(COMPUTE_SANITIZER=$SAN/verdicts SANITIZE_LIMIT_S=2 bash tests/gpu_sanitize.sh "$SAN/states" 2>&1)
unsupported=$(COMPUTE_SANITIZER=$SAN/unsupported bash tests/gpu_sanitize.sh "$SAN/states" 2>&1)
none=$(COMPUTE_SANITIZER=$SAN/nothing bash tests/gpu_sanitize.sh "$SAN/states" 2>&1)
got=$(echo "$verdicts" | sed -E 's/^(PASS|FAIL|SKIP) gpu_sanitize\.([a-z]+)\[([a-zA-Z0-9_.]+)\]: ([a-z0-9 ]*[a-z0-9]).*/\1 \2 \3 \4/' | tr '\n' '|')
want="PASS memcheck e8_k2_capacity1_drops.FP32 0 errors over test|FAIL memcheck e4_expert_choice.FP32 0 sanitizer errors|FAIL racecheck e8_k2_capacity1_drops.FP32 1 errors|FAIL synccheck e8_k2_capacity1_drops.FP32 did not finish within 2 s|"
want="$want${want//FP32/BF16}"
if [ "$got" = "$want" ] && [ "$(echo "$unsupported" | grep -c '^SKIP gpu_sanitize\..*cannot run on this GPU: Error: Device not supported')" = 8 ] &&
   [ "$none" = "SKIP gpu_sanitize: no compute-sanitizer found (COMPUTE_SANITIZER, PATH, /usr/local/cuda*)" ] && [ -z "$(pgrep -f 'sleep 61')" ]; then
    pass gpu_sanitize_verdicts "tests/gpu_sanitize.sh with a stand-in compute-sanitizer: 0 errors PASS, a test_moe FAIL under it, a reported race and a run past the limit FAIL, an unsupported device and no tool SKIP"
else
    fail gpu_sanitize_verdicts "got '$(echo "$got" | cut -c1-400)'; unsupported: $(echo "$unsupported" | head -n 1 | cut -c1-150); none: $none"
fi
