#!/usr/bin/env bash
# Gets a GPU lent for a few minutes ready, on a machine with nvcc and no GPU: everything that
# scripts/gpu_check.sh needs beside the tracked sources, made here, inside this checkout, so that
# one call of the device tool carries it all and the lease goes to running, not to compiling or
# tokenizing:
#   .shared_data/               Tiny Shakespeare and the GPT-2 BPE files, from $SHARED_DATA (the
#                               GPU machine has no ../shared beside the copy it gets)
#   dev/data/tinyshakespeare/   its token shards (dev/data/prepare.py), for the trainings and bench
#   .gpu_build.tar.gz           every binary for sm_90 (scripts/gpu_prebuild.sh); one built from
#                               the sources as they are now is kept, not built again
#   $LLMC (optional)            a copy of karpathy/llm.c inside this checkout, its train_gpt2cu
#                               built for sm_90: the benchmark's baseline row
# It then checks that these fit in what one call may carry (64 MiB) and prints that call. An edit
# to a source after this makes gpu_check.sh build on the GPU instead (the archive records the
# sources' checksum), so run it last, after the edits.
# Usage: [SHARED_DATA=../shared/data] [LLMC=.llmc] [DEADLINE_S=540] scripts/gpu_prepare.sh
set -u
cd "$(dirname "$0")/.." || exit 1
SHARED_DATA=${SHARED_DATA:-../shared/data}
DEADLINE_S=${DEADLINE_S:-540}
ARCHIVE=.gpu_build.tar.gz
SHARDS=dev/data/tinyshakespeare
CARRY_LIMIT=$((64 * 1024 * 1024))
die() { echo "gpu_prepare: $*"; exit 1; }

# llm.c must lie inside this checkout: a device call carries paths under the repository root only
if [ -n "${LLMC:-}" ]; then
    LLMC=${LLMC%/}
    case $LLMC in
        /* | .. | ../* | */../* | */..) die "LLMC=$LLMC: give a folder inside this checkout, as a relative path (a device call carries nothing outside it), e.g. LLMC=.llmc" ;;
    esac
    [ -f "$LLMC/train_gpt2.cu" ] || die "LLMC=$LLMC holds no train_gpt2.cu: not a copy of karpathy/llm.c"
fi

# 1. the data files, copied in
for file in tinyshakespeare.txt gpt2/encoder.json gpt2/vocab.bpe; do
    [ -f "$SHARED_DATA/$file" ] || die "$SHARED_DATA has no $file (SHARED_DATA=path names the folder with tinyshakespeare.txt and gpt2/)"
done
mkdir -p .shared_data/gpt2 || exit 1
if ! cp "$SHARED_DATA/tinyshakespeare.txt" .shared_data/ || ! cp "$SHARED_DATA"/gpt2/* .shared_data/gpt2/; then die "copying $SHARED_DATA failed"; fi
echo "gpu_prepare: .shared_data/ holds Tiny Shakespeare and the GPT-2 BPE files"

# 2. the token shards
if [ -f "$SHARDS/tiny_shakespeare_train.bin" ] && [ -f "$SHARDS/tiny_shakespeare_val.bin" ]; then
    echo "gpu_prepare: $SHARDS/ already holds the shards"
else
    python3 dev/data/prepare.py --input .shared_data/tinyshakespeare.txt --bpe-dir .shared_data/gpt2 > /tmp/gpu_prepare_data.log 2>&1 ||
        { tail -n 5 /tmp/gpu_prepare_data.log; die "dev/data/prepare.py failed"; }
    echo "gpu_prepare: $SHARDS/ prepared"
fi

# 3. the binaries, unless an archive built from these very sources is here already
now=$(bash scripts/gpu_prebuild.sh --sources-checksum)
built_from=$(tar -xzOf "$ARCHIVE" ./sources 2>/dev/null)
if [ "$built_from" = "$now" ]; then
    echo "gpu_prepare: $ARCHIVE was built from these sources ($now): kept"
    if [ -n "${LLMC:-}" ] && [ ! -x "$LLMC/train_gpt2cu_bench" ]; then
        LLMC=$LLMC bash scripts/bench.sh --build-llmc || die "building llm.c's train_gpt2cu in $LLMC failed"
    fi
else
    LLMC=${LLMC:-} bash scripts/gpu_prebuild.sh "$ARCHIVE" || die "scripts/gpu_prebuild.sh failed"
fi

# 4. what one call carries: the paths git ignores (the tracked sources travel anyway)
carry=(.shared_data "$SHARDS" "$ARCHIVE")
[ -n "${LLMC:-}" ] && carry+=("$LLMC")
bytes=$(du -scb --apparent-size "${carry[@]}" | tail -n 1 | cut -f1)
mib=$(((bytes + 1048575) / 1048576))
[ "$bytes" -le "$CARRY_LIMIT" ] ||
    die "the paths to carry (${carry[*]}) hold $mib MiB, more than the 64 MiB one device call carries (du -sh them; llm.c's dev/ and doc/ can go)"
json=$(printf '"%s", ' "${carry[@]}")
echo "gpu_prepare: ready, $mib MiB to carry. On the GPU, one call of the device tool's run:"
echo "  carry:     [${json%, }]"
echo "  command:   DEADLINE_S=$DEADLINE_S GPU_PREBUILT=$ARCHIVE SHARED_DATA=.shared_data${LLMC:+ LLMC=$LLMC} bash scripts/gpu_check.sh \$OUT"
echo "  timeout_s: $((DEADLINE_S + 40))"
