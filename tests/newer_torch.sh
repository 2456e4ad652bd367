#!/usr/bin/env bash
# make test with the PyTorch reference under a newer stack than CI's (Debian bookworm: Python 3.11,
# torch 1.13, NumPy 1.24): Debian trixie's Python 3.13, torch 2.6 and NumPy 2.2, in a chroot that
# debootstrap makes once (about 1.5 GB, two minutes from deb.debian.org). A GPU machine's Python
# is newer still (torch 2.11, NumPy 2.5 in 2026-11), and its `make test` share runs the reference
# there: this is the nearest check a machine without a GPU can make. Needs root (debootstrap,
# chroot, mount) and the Debian mirror; not part of make test. The chroot sees /tmp and /work
# (where the checkouts live) at the same paths, so the suite's files are the same there.
# Usage: tests/newer_torch.sh [ROOT]   (default /tmp/trixie; other make test variables pass through,
#        e.g. SKIP_EMULATION=1, which leaves out the CUDA emulation, where Python takes no part)
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=${1:-/tmp/trixie}
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    command -v debootstrap > /dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap > /dev/null; } || exit 1
    echo "newer_torch: debootstrap trixie into $ROOT"
    debootstrap --variant=minbase --include=python3-torch,python3-numpy trixie "$ROOT" http://deb.debian.org/debian > /tmp/newer_torch_debootstrap.log 2>&1 ||
        { tail -n 5 /tmp/newer_torch_debootstrap.log; exit 1; }
fi
mounted=()
# shellcheck disable=SC2317  # called by the trap
cleanup() { for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}"; done; }
trap cleanup EXIT
mount -t proc proc "$ROOT/proc" && mounted+=("$ROOT/proc") || exit 1
for dir in /tmp /work; do
    [ -d "$dir" ] || continue
    mkdir -p "$ROOT$dir" && mount --bind "$dir" "$ROOT$dir" && mounted+=("$ROOT$dir") || exit 1
done
case $PWD in /tmp/* | /work/*) ;; *) echo "newer_torch: the checkout must be under /tmp or /work (the chroot sees those)"; exit 1 ;; esac
wrapper=$(mktemp /tmp/newer_torch_python.XXXXXX)
cat > "$wrapper" << EOF
#!/bin/sh
exec chroot "$ROOT" /bin/sh -c 'cd "\$0" && exec /usr/bin/python3 "\$@"' "\$PWD" "\$@"
EOF
chmod +x "$wrapper"
echo "newer_torch: $("$wrapper" -c 'import sys, torch, numpy; print("Python", sys.version.split()[0], "torch", torch.__version__, "NumPy", numpy.__version__)' 2>/dev/null)"
PYTHON=$wrapper make --no-print-directory test
status=$?
rm -f "$wrapper"
exit $status
