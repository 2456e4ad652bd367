/*
Hopper's warpgroup MMA (wgmma, sm_90a) through inline PTX, for version 3 of the expert GEMMs
(kernels/expert_mlp.cuh, studied in dev/cuda/expert_mlp.cu).

A warpgroup is four consecutive warps (128 threads). wgmma.mma_async m64nNk16 computes
D (64 x N, fp32, in registers) += A (64 x 16, bf16) B (16 x N, bf16) with both operands read by
the tensor cores from shared memory, described by 64-bit matrix descriptors (PTX ISA, "Matrix
Descriptor Format"): the start address, the leading (LBO) and stride (SBO) dimension byte
offsets, each >> 4 in bits 0-13, 16-29 and 32-45, and the swizzle mode in bits 62-63 (0: none).
It runs asynchronously: issue (after wgmma.fence), commit the issued ones as a group, and
wgmma.wait_group N before reading the accumulators or overwriting the operands.

The layouts used here have no swizzling. An operand is cut in core matrices of 8 x 8 bf16, each
stored as 128 contiguous bytes, the core matrix next along k LBO bytes further, the next along
m (A) or n (B) SBO bytes further. Inside a core matrix, either
  - K-major (imm-trans 0): 8 rows of m (or n), each 8 consecutive k in 16 bytes, the way X
    (rows, K) or a weight W (N, K) lies in memory; or
  - MN-major (imm-trans 1, bf16 and f16 only): 8 rows of k, each 8 consecutive m (or n), the
    way a weight W (K, N) or, for a weight gradient, the activations (rows = k, M) lie.
(CUTLASS and the PTX ISA's "Canonical Layouts" write these as ((8,m),(T,2k)):((1T,SBO),(1,LBO))
K-major and ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) MN-major, T = 8 bf16.) Without swizzling, LBO
runs along k and SBO along m or n in both majors: the PTX ISA's worked example "MN major,
no-swizzling and bf16", ((8,1,2),(8,2)):((1,8,64),(8,128)), has LBO = 128 elements along k and
SBO = 64 along n. The swizzled MN-major layouts swap the two, a trap for the next version.

Accumulators of m64nNk16 (PTX ISA, "wgmma .m64nNk16 register fragment layout for accumulator
matrix D"): with w the warp in the warpgroup, g = lane / 4, c = lane % 4, a thread holds N/2
floats, d[4j + i] = (row 16w + g + 8 (i / 2), column 8j + 2c + i % 2) for each 8 columns j:
the m16n8 layout of mma.sync (kernels/mma.cuh) repeated across N.

Shared memory written by cp.async is seen by wgmma (the "async proxy") only after
fence.proxy.async: each thread fences its own completed copies, then the block barrier.
The CPU emulation (tests/emu) runs these instructions with the semantics written here.

Only an sm_90a target has these instructions. A binary built for several targets (GPU_ARCHS="80
90") compiles this code for each: in a device pass for another target every helper below is
__trap() instead, and the host never launches a kernel that uses them on such a GPU
(expert_wgmma_here, kernels/expert_mlp.cuh).
*/
#pragma once

#include <cstdint>
#include "common.cuh"

// whether this compilation pass has wgmma: the host pass (and the CPU emulation) and sm_90a's
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WGMMA_IN_THIS_PASS 1
#else
#define WGMMA_IN_THIS_PASS 0
#endif

// an operand without swizzling at smem (16-byte aligned), its core matrices lbo bytes apart
// along k and sbo bytes apart along m (or n)
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* smem, uint32_t lbo, uint32_t sbo) {
    uint64_t address = (uint64_t)__cvta_generic_to_shared(smem);
    return ((address >> 4) & 0x3FFF) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) | ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}

// before the first wgmma of a batch: orders the warpgroup's earlier accesses to the accumulators
__device__ __forceinline__ void wgmma_fence() {
#if WGMMA_IN_THIS_PASS
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if WGMMA_IN_THIS_PASS
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}

// wait until at most N of this warpgroup's committed groups are still running
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if WGMMA_IN_THIS_PASS
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
    __trap();
#endif
}

// cp.async's completed writes to shared memory made visible to the tensor cores' reads
__device__ __forceinline__ void fence_proxy_async() {
#if WGMMA_IN_THIS_PASS
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
    __trap();
#endif
}

// keeps the compiler from moving accesses to the 64 accumulators across this point (they are
// written by the tensor cores behind its back until wgmma_wait). The operand lists here and
// below are written out, not made by a macro: tests/emu/translate.py reads them as written.
__device__ __forceinline__ void wgmma_fence_accumulators(float d[64]) {
    asm volatile(""
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 :
                 : "memory");
}

// d (64 x 128) = A B + (scale_d ? d : 0), A and B in shared memory (wgmma_descriptor), each
// K-major (TRANS 0) or MN-major (TRANS 1)
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float d[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if WGMMA_IN_THIS_PASS
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));
#else
    __trap();
#endif
}
