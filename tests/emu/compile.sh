#!/usr/bin/env bash
# Compiles one source translated by tests/emu/translate.py for the CUDA emulation (used by
# tests/emu/run.sh and tests/fake_gpu.sh, so that both build the same way).
# Usage: tests/emu/compile.sh SOURCE PRECISION BINARY [FLAGS...]
#   PRECISION FP32 or BF16; FLAGS more g++ flags (run.sh's sanitizers); CXX overrides g++.
# CUDA code reads bf16 pairs through uint32_t pointers, which nvcc allows: no strict aliasing for
# g++ either.
set -u
source=$1 precision=$2 binary=$3
shift 3
flags=(-DENABLE_WGMMA)  # version 3 of the expert GEMMs too (the Makefiles define it for sm_90a)
if [ "$precision" = FP32 ]; then flags+=(-DENABLE_FP32); fi
exec "${CXX:-g++}" -x c++ -std=c++17 -O2 -fno-strict-aliasing -w -fopenmp "${flags[@]}" "$@" \
    -include "$(cd "$(dirname "$0")" && pwd)/cuda_emu.h" -o "$binary" "$source"
