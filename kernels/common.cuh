// Shared device helpers: dtype load/store, warp reductions, and the
// counter-based hash that defines Uni-LoRA's projection (src/projection.rs has
// its CPU twin; the two must agree bit for bit).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "abi.h"  // constants and argument structs shared with the Rust launchers

// ---- element types -------------------------------------------------------
// All arithmetic is f32; storage may be f16/bf16. Conversions round to
// nearest even, like half::f16::from_f32 / half::bf16::from_f32 on the CPU.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Instantiates `MACRO(suffix, type)` once per storage type, so every exported
// kernel name carries its dtype (projection_gather_bf16, ...).
#define LORAFUSE_FOR_EACH_DTYPE(MACRO) \
    MACRO(f32, float)                  \
    MACRO(f16, __half)                 \
    MACRO(bf16, __nv_bfloat16)

// ---- reductions ----------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- SplitMix64 ----------------------------------------------------------
// The i-th output of SplitMix64 started at `key`: a counter-based generator,
// so any element can be drawn without drawing the ones before it.
#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ull

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t splitmix_at(uint64_t key, uint64_t i) {
    return mix64(key + (i + 1) * SPLITMIX_GAMMA);
}

// Maps 64 random bits onto [0, n) by multiply-shift of the top 32 bits
// (Lemire): no division, bias at most n / 2^32.
__device__ __forceinline__ uint32_t reduce_range(uint64_t bits, uint32_t n) {
    return (uint32_t)(((bits >> 32) * (uint64_t)n) >> 32);
}

// ---- tensor-core and async-copy primitives (sm_80+) -----------------------
// Thin wrappers around one PTX instruction each, so kernels read as the math
// and the kernel emulator (scripts/kernel-emu/emu.h, which defines
// LORAFUSE_KERNEL_EMU) can substitute warp-collective C++ versions that
// follow the PTX ISA's fragment layouts. Fragment layouts, with
// g = lane / 4 and t = lane % 4 (each 32-bit register holds two 16-bit
// elements, the lower-indexed one in the low half):
//   A (16×16, row-major) a0: row g, cols 2t..2t+1    a1: row g+8, cols 2t..2t+1
//                        a2: row g, cols 2t+8..+9    a3: row g+8, cols 2t+8..+9
//   B (16×8, k × n)      b0: k 2t..2t+1, col g       b1: k 2t+8..+9, col g
//   C, D (16×8, f32)     c0, c1: row g, cols 2t, 2t+1;  c2, c3: row g+8, same cols
// So an accumulator tile pair (n-tiles 2j, 2j+1), packed to 16 bits, is
// exactly the A fragment of k-step j: a softmax probability tile feeds the
// next product without touching shared memory.

// The mma operand type for a 16-bit storage type.
template <typename T> struct MmaIsBf16;
template <> struct MmaIsBf16<__half> {
    static constexpr bool value = false;
};
template <> struct MmaIsBf16<__nv_bfloat16> {
    static constexpr bool value = true;
};

// Two f32 values as one register of 16-bit T (round to nearest even), lo in
// the low half: the A-fragment element order.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const T l = from_f32<T>(lo), h = from_f32<T>(hi);
    uint16_t lb, hb;
    memcpy(&lb, &l, 2);
    memcpy(&hb, &h, 2);
    return (uint32_t)lb | ((uint32_t)hb << 16);
}

// d += A·B for one 16×8×16 tile: mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
    if constexpr (MmaIsBf16<T>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_mma_16816<T>(d, a, b0, b1);
#endif
}

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
#endif

// Four 8×8 matrices of 16-bit elements from shared memory: lane l gives the
// address of row l % 8 of matrix l / 8 (16-byte aligned) and receives, in
// r[i], elements 2(l%4), 2(l%4)+1 of row l/4 of matrix i
// (ldmatrix.sync.aligned.m8n8.x4.shared.b16).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_ldmatrix_x4(r, row, false);
#endif
}

// As ldmatrix_x4, each matrix transposed: r[i] holds rows 2(l%4) and
// 2(l%4)+1 of column l/4 (ldmatrix...x4.trans): a B fragment from a
// row-major k × n tile.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_ldmatrix_x4(r, row, true);
#endif
}

// 16 bytes global → shared without passing through registers
// (cp.async.cg: cached in L2 only). With `fill` false nothing is read and
// the 16 bytes become zeros (src-size 0), which pads tails and head dims.
// Both addresses 16-byte aligned. Completes at a later cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(fill ? 16 : 0));
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_cp_async_16(dst, src, fill);
#endif
}

// Closes the group of cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;\n" ::);
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are in flight.
// Other threads' copies need a __syncthreads after this to be visible.
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#elif defined(LORAFUSE_KERNEL_EMU)
    emu_cp_async_wait(N);
#endif
}

// ---- Uni-LoRA projection column -------------------------------------------
// The column row i of P picks (src/projection.rs, Projection::column):
// mode 0 hashes, mode 1 is a balanced partition j = π(i) mod d with π a
// 4-round Feistel permutation of [0, 2^(2h)) cycle-walked into [0, rows).
// With cycle walking the 4-round Feistel bijection permutes [0, rows), so
// every column gets ⌊D/d⌋ or ⌈D/d⌉ rows. Used by projection.cu and by the
// kernels that gather θ_D entries on the fly (multi_adapter.cu).
__device__ __forceinline__ uint64_t feistel4(uint64_t x, uint64_t key, uint32_t h) {
    const uint64_t mask = (1ull << h) - 1;
    uint64_t l = x >> h, r = x & mask;
#pragma unroll
    for (uint32_t round = 0; round < 4; ++round) {
        const uint64_t f = splitmix_at(key ^ (0xA5A5A5A5ull * (round + 1)), r) & mask;
        const uint64_t nl = r;
        r = l ^ f;
        l = nl;
    }
    return (l << h) | r;
}

__device__ __forceinline__ uint32_t projection_column(uint64_t key, uint64_t rows, uint32_t cols, uint32_t mode,
                                                      uint32_t half_bits, uint64_t i) {
    if (mode == 0) return reduce_range(splitmix_at(key, i), cols);
    uint64_t x = i;
    do { x = feistel4(x, key, half_bits); } while (x >= rows);
    return (uint32_t)(x % cols);
}
