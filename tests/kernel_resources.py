#!/usr/bin/env python3
"""
Checks that every kernel of train_moe can be launched on the GPU, from what the compiler says of
it: the one failure the CUDA emulation cannot see, since a CPU has no register file.

    python3 tests/kernel_resources.py PRECISION BUILD_LOG KEEP_DIR

BUILD_LOG holds ptxas's report of each kernel (nvcc -Xptxas -v: registers per thread, stack frame,
spills), KEEP_DIR the PTX nvcc kept (--keep), whose .maxntid is a kernel's __launch_bounds__
(make train_moe PTXAS_REPORT=KEEP_DIR does both). A block of a kernel is given its registers
warp by warp, 256 at a time (so a thread's count is rounded up to a multiple of 8), from a
register file of 65536 per multiprocessor on sm_80 and sm_90; a launch that needs more fails
with "too many resources requested for launch". The rule it checks:

  - a kernel with __launch_bounds__(N) fits N threads (ptxas keeps it so; checked anyway);
  - a kernel without it fits 1024 threads, the largest block, i.e. it uses at most 64
    registers: a heavier kernel must declare the block size it is launched with (and the
    emulation checks that no launch exceeds a declared bound).

It also reports, without failing, any local memory, a stack frame or spills (a slow kernel, not
a wrong one).
Prints "PASS kernel_resources[PRECISION]: ..." or one FAIL line per kernel that cannot launch.
"""

import glob
import os
import re
import subprocess
import sys

REGISTER_FILE = 65536     # registers per multiprocessor (and per block) on sm_80 and sm_90
WARP_ALLOCATION = 256     # registers are given to a warp in units of this many
MAX_THREADS = 1024


def block_registers(registers, threads):
    """registers a block of `threads` threads takes, each using `registers`"""
    per_warp = -(-registers * 32 // WARP_ALLOCATION) * WARP_ALLOCATION
    return -(-threads // 32) * per_warp


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        # the name and template arguments, without "void " and the parameter list
        return {n: re.sub(r"^void |\(.*$", "", d) for n, d in zip(names, out.split("\n"))}
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def ptxas_report(path):
    """(kernel, arch) -> {registers, stack, spill_stores, spill_loads} from nvcc -Xptxas -v"""
    kernels, current, properties = {}, None, None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = {"registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if current is None:
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:  # the kernel's own, or a called function's (not inlined), whose figures are not its
            properties = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and properties == current[0]:
            k = kernels[current]
            k["stack"], k["spill_stores"], k["spill_loads"] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            current = None
    return kernels


def launch_bounds(keep_dir):
    """(kernel, arch) -> the threads of its .maxntid (None: not declared), from the kept PTX"""
    bounds = {}
    for path in glob.glob(os.path.join(keep_dir, "*.ptx")):
        text = open(path, errors="replace").read()
        target = re.search(r"^\.target\s+(sm_\d+a?)", text, re.M)
        if not target:
            continue
        arch = target.group(1)
        # an entry's directives sit between its parameter list and its body
        for m in re.finditer(r"\.entry\s+(\S+)\s*\((.*?)\)\s*(.*?)\{", text, re.S):
            nt = re.search(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", m.group(3))
            bounds[(m.group(1), arch)] = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3)) if nt else None
    return bounds


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: tests/kernel_resources.py PRECISION BUILD_LOG KEEP_DIR")
    precision, log, keep = sys.argv[1:]
    name = "kernel_resources[%s]" % precision
    kernels = ptxas_report(log)
    bounds = launch_bounds(keep)
    if not kernels or not bounds:
        print("FAIL %s: no ptxas report in %s or no PTX in %s (build with PTXAS_REPORT=DIR)" % (name, log, keep))
        return 1
    names = demangle(sorted({k for k, _ in kernels}))
    failures, local, heaviest = [], [], None
    for (kernel, arch), k in sorted(kernels.items()):
        pretty = names.get(kernel, kernel)
        if k["registers"] is None or (kernel, arch) not in bounds:
            failures.append("%s (%s): %s" % (pretty, arch, "no register count" if k["registers"] is None else "not in the PTX"))
            continue
        declared = bounds[(kernel, arch)]
        threads = declared or MAX_THREADS
        need = block_registers(k["registers"], threads)
        if need > REGISTER_FILE:
            failures.append("%s (%s): %d registers x %d threads%s need %d of %d registers%s" % (
                pretty, arch, k["registers"], threads, "" if declared else " (no __launch_bounds__: any block size)", need,
                REGISTER_FILE, "" if declared else "; declare the block size it is launched with"))
        if k["stack"] or k["spill_stores"] or k["spill_loads"]:
            local.append("%s (%s) %d-byte stack, %d/%d bytes spilled/reloaded" % (pretty, arch, k["stack"], k["spill_stores"], k["spill_loads"]))
        if heaviest is None or need > heaviest[0]:
            heaviest = (need, pretty, arch, k["registers"], threads)
    for f in failures:
        print("FAIL %s: %s" % (name, f))
    if failures:
        return 1
    arches = sorted({a for _, a in kernels})
    print("PASS %s: %d kernels x %s, every one launches at its largest block (registers <= %d); the fullest: %s (%s), "
          "%d registers x %d threads = %d; %s" % (
              name, len(names), ", ".join(arches), REGISTER_FILE, heaviest[1], heaviest[2], heaviest[3], heaviest[4], heaviest[0],
              "local memory: " + "; ".join(local) if local else "no local memory (stack frames, spills)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
