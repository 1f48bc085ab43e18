// Shared device helpers: dtype load/store, warp reductions, and the
// counter-based hash that defines Uni-LoRA's projection (src/projection.rs has
// its CPU twin; the two must agree bit for bit).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

// ---- Uni-LoRA projection column -------------------------------------------
// The column row i of P picks (src/projection.rs, Projection::column):
// mode 0 hashes, mode 1 is a balanced partition j = π(i) mod d with π a
// 4-round Feistel permutation of [0, 2^(2h)) cycle-walked into [0, rows).
// Used by kernels that gather θ_D entries on the fly (multi_adapter.cu).
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
