#!/usr/bin/env bash
# tests/breakdown.sh NAME DIR -- TRAIN COMMAND...
#
# --breakdown 1 (common/breakdown.h) times the parts of each step without changing them: TRAIN
# runs 4 steps into DIR/plain, then the same with --breakdown 1 into DIR/timed. The two final
# checkpoints (model and optimizer state) must be byte-identical, and the timed run must end
# with the table: a row for every part (TRAIN must be an MoE run with dense layers too, so that
# every part has work), each with two times >= 0 and a share, the shares summing to 100% (to
# the rounding of the printed figures), the total their sum and more than 0. One PASS or FAIL
# line, named NAME.breakdown.
set -u
name=$1 dir=$2
shift 2
[ "${1:-}" = -- ] && shift
rm -rf "$dir"
mkdir -p "$dir"
"$@" -x 4 -o "$dir/plain" > "$dir/plain.out" 2>&1
rc_plain=$?
"$@" -x 4 -o "$dir/timed" --breakdown 1 > "$dir/timed.out" 2>&1
rc_timed=$?
if [ "$rc_plain" -ne 0 ] || [ "$rc_timed" -ne 0 ]; then
    echo "FAIL $name.breakdown: exit status $rc_plain without --breakdown, $rc_timed with: $(tail -n 2 "$dir/timed.out" | tr '\n' ' ' | cut -c1-300)"
    exit 0
fi
differ=""
for file in model_00000004.bin state_00000004.bin; do
    cmp -s "$dir/plain/$file" "$dir/timed/$file" || differ="$differ $file"
done
# the table: the rows after its header line, up to "total"
table=$(sed -n '/^where a step.s time went/,/^  total/p' "$dir/timed.out")
verdict=$(echo "$table" | awk '
    BEGIN {
        n = split("encoder|layer norms|attention|dense MLP|MoE router|MoE permute|MoE experts|MoE unpermute|classifier|optimizer", want, "|")
    }
    /^  total/ { total = $2; next }
    /^  / && !/^  part/ {
        share = $NF; sub(/%$/, "", share); backward = $(NF - 1); forward = $(NF - 2)
        part = $0; sub(/^  /, "", part); sub(/ +[-0-9.]+ +[-0-9.]+ +[-0-9.]+%$/, "", part)
        seen[part] = 1; rows++
        if (forward < 0 || backward < 0) bad = bad " " part " negative"
        shares += share; sum += forward + backward
    }
    END {
        for (i = 1; i <= n; i++) if (!(want[i] in seen)) bad = bad " no row " want[i]
        if (rows != n) bad = bad " " rows " rows"
        if (shares < 99.4 || shares > 100.6) bad = bad " shares sum to " shares "%"
        if (!(total > 0) || total - sum > 0.01 * n || sum - total > 0.01 * n) bad = bad " total " total " for parts summing to " sum
        print bad == "" ? "ok " rows " rows, total " total " ms" : bad
    }')
if [ -z "$differ" ] && [ "${verdict%% *}" = ok ]; then
    echo "PASS $name.breakdown: the same model and optimizer state, byte for byte, with --breakdown 1; its table: ${verdict#ok }"
else
    echo "FAIL $name.breakdown: different from the run without --breakdown:${differ:- nothing}; the table:${verdict}"
fi
