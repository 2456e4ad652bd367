/*
Tensor-core building blocks shared by the bf16 kernels (attention, the expert grouped GEMMs):
mma.sync, cp.async and ldmatrix through inline PTX (sm_80 and later), and the fragment layouts.

mma.sync m16n8k16: D (16x8, fp32) += A (16x16, bf16, row-major) B (16x8, bf16, column-major).
With g = lane/4 and c = lane%4, a thread holds (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
  A: a[0] = (g, 2c..2c+1), a[1] = (g+8, 2c..2c+1), a[2] = (g, 2c+8..2c+9), a[3] = (g+8, 2c+8..2c+9)
  B: b[0] = (k 2c..2c+1, n g), b[1] = (k 2c+8..2c+9, n g)
  D: d[0], d[1] = (g, 2c), (g, 2c+1); d[2], d[3] = (g+8, 2c), (g+8, 2c+1)
each 32-bit register holding two bf16, the lower column (or k) in the lower half.
Tiles come from global memory by cp.async (16 bytes per copy, zero-filled outside the tensor).
In shared memory a tile is row-major with its rows padded by 8 bf16, so that the 8 rows an
ldmatrix phase reads fall in 8 different 16-byte bank groups. ldmatrix gives the fragments whose
k runs along the tile's rows in memory; its .trans form those whose k runs down the tile's
columns, so neither operand ever needs a transposed copy.
The CPU emulation (tests/emu) runs these instructions with the semantics written here.
*/
#pragma once

#include <cstdint>
#include "common.cuh"

__device__ __forceinline__ void mma_bf16_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo, the lower half
    return *reinterpret_cast<uint32_t*>(&v);
}

// An A fragment (16 x 16) from the D fragments of two 16 x 8 products: columns 0..7 from lo, 8..15 from hi
__device__ __forceinline__ void pack_a_from_accumulators(uint32_t a[4], const float lo[4], const float hi[4]) {
    a[0] = pack_bf16x2(lo[0], lo[1]);
    a[1] = pack_bf16x2(lo[2], lo[3]);
    a[2] = pack_bf16x2(hi[0], hi[1]);
    a[3] = pack_bf16x2(hi[2], hi[3]);
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool fill) {
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
    int src_bytes = fill ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, bool fill) {
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
    int src_bytes = fill ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// wait until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// four 8x8 bf16 matrices; lane l gives the address of row l%8 of matrix l/8, and receives in r[i]
// matrix i's (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans its (rows 2(l%4), 2(l%4)+1, column l/4)
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const __nv_bfloat16* row) {
    unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const __nv_bfloat16* row) {
    unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// A fragment (rows row0..+15, columns col0..+15 of a row-major tile): matrices (rows +0, cols +0),
// (+8, +0), (+0, +8), (+8, +8) are a[0..3]
__device__ __forceinline__ void ldmatrix_a(uint32_t a[4], const __nv_bfloat16* tile, int ld, int row0, int col0) {
    int l = threadIdx.x % WARP_SIZE;
    ldmatrix_x4(a, tile + (row0 + ((l / 8) & 1) * 8 + l % 8) * ld + col0 + (l / 16) * 8);
}

// B fragments of two n-tiles n0..n0+7 and n0+8..n0+15, k0..k0+15, from a tile holding B^T
// row-major (row = n, column = k): matrices (n +0, k +0), (+0, +8), (+8, +0), (+8, +8)
__device__ __forceinline__ void ldmatrix_b_pair(uint32_t b_lo[2], uint32_t b_hi[2], const __nv_bfloat16* tile, int ld, int n0, int k0) {
    int l = threadIdx.x % WARP_SIZE;
    uint32_t r[4];
    ldmatrix_x4(r, tile + (n0 + (l / 16) * 8 + l % 8) * ld + k0 + ((l / 8) & 1) * 8);
    b_lo[0] = r[0]; b_lo[1] = r[1]; b_hi[0] = r[2]; b_hi[1] = r[3];
}

// the same from a tile holding B row-major (row = k, column = n), transposed by ldmatrix:
// matrices (k +0, n +0), (+8, +0), (+0, +8), (+8, +8)
__device__ __forceinline__ void ldmatrix_b_pair_trans(uint32_t b_lo[2], uint32_t b_hi[2], const __nv_bfloat16* tile, int ld, int n0,
                                                      int k0) {
    int l = threadIdx.x % WARP_SIZE;
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + (k0 + ((l / 8) & 1) * 8 + l % 8) * ld + n0 + (l / 16) * 8);
    b_lo[0] = r[0]; b_lo[1] = r[1]; b_hi[0] = r[2]; b_hi[1] = r[3];
}

// A fragment (m0..m0+15, k0..k0+15) from a tile holding A^T row-major (row = k, column = m),
// transposed by ldmatrix: matrices (k +0, m +0), (+0, +8), (+8, +0), (+8, +8) are a[0..3]
__device__ __forceinline__ void ldmatrix_a_trans(uint32_t a[4], const __nv_bfloat16* tile, int ld, int m0, int k0) {
    int l = threadIdx.x % WARP_SIZE;
    ldmatrix_x4_trans(a, tile + (k0 + (l / 16) * 8 + l % 8) * ld + m0 + ((l / 8) & 1) * 8);
}

