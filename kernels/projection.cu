// Uni-LoRA's shared projection: θ_D = P·θ_d (gather) and g_d = Pᵀ·g_D (scatter).
//
// P has one nonzero per row: row i of θ_D takes column j(i) of θ_d, scaled by
// 1/sqrt(n_j) where n_j counts the rows that chose j. j(i) is a function of
// (seed, i) (src/projection.rs documents it and holds the CPU twin), so no
// index buffer is read; an explicit user index array is supported too.
//
// Memory plan (D rows, d columns, T the segment dtype):
//   gather : write D·sizeof(T) once; read θ_d·scale once per column
//            (projection_prescale folds 1/sqrt(n_j) into θ so the hot loop does
//            one random read per row, served from shared memory when d fits).
//   scatter: read g_D twice (absmax pass, then accumulate), d int64 atomics
//            targets. The absmax pass is the price of determinism: it fixes the
//            fixed-point scale so that integer (associative) atomics give the
//            same bits in any order, with no float atomics.
#include "common.cuh"

#define PROJ_MAX_SEGMENTS 128
#define PROJ_THREADS 256
#define PROJ_VEC 8
#define PROJ_TILE (PROJ_THREADS * PROJ_VEC * 4)  // elements per tile

enum ProjMode : uint32_t { PROJ_HASH = 0, PROJ_BALANCED = 1, PROJ_EXPLICIT = 2 };

// Where θ_D's rows land: one entry per destination buffer (a layer's A or B).
// Passed by value in kernel parameter space (__grid_constant__, so indexing
// it never copies it to local memory): no host-to-device copy per call.
// Layout must match `SegmentTable` in src/cuda/projection.rs.
struct SegmentTable {
    uint64_t dst[PROJ_MAX_SEGMENTS];         // device pointer of the segment
    uint64_t start[PROJ_MAX_SEGMENTS];       // first row of θ_D it holds
    uint32_t len[PROJ_MAX_SEGMENTS];         // rows it holds
    uint32_t tile_start[PROJ_MAX_SEGMENTS + 1];  // prefix sum of tiles per segment
    uint32_t count;
};

// How j(i) is drawn; mirrors `ColumnMap` on the CPU.
struct ColumnMap {
    uint64_t key;       // derived from the seed
    uint64_t rows;      // D
    const uint32_t* index;  // PROJ_EXPLICIT only
    uint32_t cols;      // d
    uint32_t mode;      // ProjMode
    uint32_t half_bits; // PROJ_BALANCED: Feistel half width
    uint32_t pad;
};

// A 4-round Feistel network over 2·half_bits bits: a bijection, so with cycle
// walking it permutes [0, rows). Balanced assignment is j = π(i) mod d, which
// gives every column ⌊D/d⌋ or ⌈D/d⌉ rows.
__device__ __forceinline__ uint64_t feistel(uint64_t x, uint64_t key, uint32_t h) {
    const uint64_t mask = (1ull << h) - 1;
    uint64_t l = x >> h, r = x & mask;
#pragma unroll
    for (uint32_t round = 0; round < 4; ++round) {
        uint64_t f = splitmix_at(key ^ (0xA5A5A5A5ull * (round + 1)), r) & mask;
        uint64_t nl = r;
        r = l ^ f;
        l = nl;
    }
    return (l << h) | r;
}

__device__ __forceinline__ uint32_t column_of(const ColumnMap& m, uint64_t i) {
    if (m.mode == PROJ_HASH) return reduce_range(splitmix_at(m.key, i), m.cols);
    if (m.mode == PROJ_EXPLICIT) return m.index[i];
    uint64_t x = i;
    do { x = feistel(x, m.key, m.half_bits); } while (x >= m.rows);
    return (uint32_t)(x % m.cols);
}

// Finds the segment holding `tile` (binary search over the prefix sums).
__device__ __forceinline__ uint32_t segment_of_tile(const SegmentTable& t, uint32_t tile) {
    uint32_t lo = 0, hi = t.count;  // tile_start[lo] <= tile < tile_start[hi]
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) >> 1;
        if (t.tile_start[mid] <= tile) lo = mid; else hi = mid;
    }
    return lo;
}

// ---- once per projection -------------------------------------------------

// n_j: how many rows chose each column. Integer atomics: order-independent.
extern "C" __global__ void projection_counts(ColumnMap map, uint32_t* __restrict__ counts) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < map.rows;
         i += (uint64_t)gridDim.x * blockDim.x)
        atomicAdd(&counts[column_of(map, i)], 1u);
}

// scale_j = 1/sqrt(n_j) (0 for unused columns), in double then rounded, so it
// matches the CPU's `(1.0 / (n as f64).sqrt()) as f32` bit for bit.
extern "C" __global__ void projection_scale(const uint32_t* __restrict__ counts, uint32_t cols,
                                            float* __restrict__ scale) {
    uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) scale[j] = counts[j] ? (float)(1.0 / sqrt((double)counts[j])) : 0.0f;
}

// ---- gather: θ_D = P·θ_d -------------------------------------------------

// θ_d ⊙ scale, once per forward, so the per-row loop reads one value, not two.
extern "C" __global__ void projection_prescale(const float* __restrict__ theta,
                                               const float* __restrict__ scale, uint32_t cols,
                                               float* __restrict__ out) {
    uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) out[j] = theta[j] * scale[j];
}

// 16-byte aligned so the packed halves can be stored as one uint4.
template <typename T> struct alignas(16) Vec8 { T v[PROJ_VEC]; };

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&v)[PROJ_VEC]) {
    // 16-byte stores where the address allows: 8 halves, or 2 x 4 floats.
    if constexpr (sizeof(T) == 2) {
        Vec8<T> pack;
#pragma unroll
        for (int k = 0; k < PROJ_VEC; ++k) pack.v[k] = from_f32<T>(v[k]);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(&pack);
    } else {
        reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// Persistent grid: each block stages θ·scale in shared memory once (when
// `stage_cols` > 0, i.e. d fits) and then walks tiles of the segment table.
template <typename T>
__device__ void gather_impl(const SegmentTable& table, const ColumnMap& map,
                            const float* __restrict__ theta_scaled, uint32_t stage_cols) {
    extern __shared__ float staged[];
    const float* src = theta_scaled;
    if (stage_cols) {
        for (uint32_t j = threadIdx.x; j < stage_cols; j += blockDim.x) staged[j] = theta_scaled[j];
        __syncthreads();
        src = staged;
    }
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint32_t s = segment_of_tile(table, tile);
        const uint32_t first = (tile - table.tile_start[s]) * PROJ_TILE;
        const uint32_t len = table.len[s];
        T* dst = reinterpret_cast<T*>(table.dst[s]);
        const uint64_t row0 = table.start[s];
        for (uint32_t base = first + threadIdx.x * PROJ_VEC; base < min(first + PROJ_TILE, len);
             base += PROJ_THREADS * PROJ_VEC) {
            float v[PROJ_VEC];
#pragma unroll
            for (int k = 0; k < PROJ_VEC; ++k)
                v[k] = (base + k < len) ? src[column_of(map, row0 + base + k)] : 0.0f;
            T* out = dst + base;
            if (base + PROJ_VEC <= len && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
                store8<T>(out, v);
            } else {
#pragma unroll
                for (int k = 0; k < PROJ_VEC; ++k)
                    if (base + k < len) out[k] = from_f32<T>(v[k]);
            }
        }
    }
}

// ---- scatter: g_d = Pᵀ·g_D, deterministic --------------------------------

// max |g| over every segment, as float bits (non-negative floats order like
// their bit patterns, so an integer atomicMax is exact and order-free). NaN
// and ±inf are folded to +inf so they propagate to the result.
template <typename T>
__device__ void absmax_impl(const SegmentTable& table, uint32_t* __restrict__ out_bits) {
    float m = 0.0f;
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint32_t s = segment_of_tile(table, tile);
        const uint32_t first = (tile - table.tile_start[s]) * PROJ_TILE;
        const uint32_t end = min(first + PROJ_TILE, table.len[s]);
        const T* g = reinterpret_cast<const T*>(table.dst[s]);
        for (uint32_t e = first + threadIdx.x; e < end; e += PROJ_THREADS) {
            float a = fabsf(to_f32(g[e]));
            m = fmaxf(m, isfinite(a) ? a : INFINITY);
        }
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) atomicMax(out_bits, __float_as_uint(m));
}

// The fixed-point exponent: every term |g|·2^S < 2^(61 - ceil_log2(n_max)), so
// a column's sum of up to n_max terms fits an int64 with a bit to spare.
// Returns INT32_MIN when the max is zero (nothing to add) or non-finite.
__device__ __forceinline__ int fixed_point_shift(uint32_t absmax_bits, uint32_t ceil_log2_nmax) {
    float m = __uint_as_float(absmax_bits);
    if (m == 0.0f || !isfinite(m)) return INT32_MIN;
    int e;
    frexpf(m, &e);  // m < 2^e
    return 61 - (int)ceil_log2_nmax - e;
}

template <typename T>
__device__ void scatter_fixed_impl(const SegmentTable& table, const ColumnMap& map,
                                   const uint32_t* __restrict__ absmax_bits,
                                   uint32_t ceil_log2_nmax, unsigned long long* __restrict__ acc,
                                   uint32_t stage_cols) {
    const int shift = fixed_point_shift(*absmax_bits, ceil_log2_nmax);
    if (shift == INT32_MIN) return;
    // Small d: accumulate the block's share in shared memory first, so global
    // atomics are d per block instead of one per row.
    extern __shared__ unsigned long long local_acc[];
    if (stage_cols) {
        for (uint32_t j = threadIdx.x; j < stage_cols; j += blockDim.x) local_acc[j] = 0;
        __syncthreads();
    }
    unsigned long long* target = stage_cols ? local_acc : acc;
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint32_t s = segment_of_tile(table, tile);
        const uint32_t first = (tile - table.tile_start[s]) * PROJ_TILE;
        const uint32_t end = min(first + PROJ_TILE, table.len[s]);
        const T* g = reinterpret_cast<const T*>(table.dst[s]);
        const uint64_t row0 = table.start[s];
        for (uint32_t e = first + threadIdx.x; e < end; e += PROJ_THREADS) {
            float v = to_f32(g[e]);
            if (v == 0.0f) continue;
            long long q = __float2ll_rn(ldexpf(v, shift));
            // Two's-complement wrap-around makes unsigned adds exact for
            // signed sums.
            atomicAdd(&target[column_of(map, row0 + e)], (unsigned long long)q);
        }
    }
    if (stage_cols) {
        __syncthreads();
        for (uint32_t j = threadIdx.x; j < stage_cols; j += blockDim.x)
            if (local_acc[j]) atomicAdd(&acc[j], local_acc[j]);
    }
}

// g_d[j] = (Σ q) · 2^-S · scale_j. Non-finite input poisons every column (the
// fixed-point sum cannot carry it; the CPU twin does the same).
extern "C" __global__ void projection_scatter_finish(const unsigned long long* __restrict__ acc,
                                                     const float* __restrict__ scale,
                                                     const uint32_t* __restrict__ absmax_bits,
                                                     uint32_t ceil_log2_nmax, uint32_t cols,
                                                     float* __restrict__ out) {
    uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    const float m = __uint_as_float(*absmax_bits);
    if (!isfinite(m)) { out[j] = __int_as_float(0x7fc00000); return; }
    const int shift = fixed_point_shift(*absmax_bits, ceil_log2_nmax);
    if (shift == INT32_MIN) { out[j] = 0.0f; return; }
    double sum = ldexp((double)(long long)acc[j], -shift);
    out[j] = (float)(sum * (double)scale[j]);
}

// Opt-in fast path: float atomics straight into g_d (zeroed by the caller).
// Not deterministic: the summation order follows the hardware's.
template <typename T>
__device__ void scatter_atomic_impl(const SegmentTable& table, const ColumnMap& map,
                                    const float* __restrict__ scale, float* __restrict__ out) {
    const uint32_t tiles = table.tile_start[table.count];
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint32_t s = segment_of_tile(table, tile);
        const uint32_t first = (tile - table.tile_start[s]) * PROJ_TILE;
        const uint32_t end = min(first + PROJ_TILE, table.len[s]);
        const T* g = reinterpret_cast<const T*>(table.dst[s]);
        const uint64_t row0 = table.start[s];
        for (uint32_t e = first + threadIdx.x; e < end; e += PROJ_THREADS) {
            float v = to_f32(g[e]);
            if (v == 0.0f) continue;
            uint32_t j = column_of(map, row0 + e);
            atomicAdd(&out[j], v * scale[j]);
        }
    }
}

#define PROJECTION_KERNELS(SUFFIX, T)                                                           \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS) projection_gather_##SUFFIX(      \
        const __grid_constant__ SegmentTable table, const __grid_constant__ ColumnMap map,      \
        const float* __restrict__ theta_scaled, uint32_t stage_cols) {                          \
        gather_impl<T>(table, map, theta_scaled, stage_cols);                                   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS) projection_absmax_##SUFFIX(      \
        const __grid_constant__ SegmentTable table, uint32_t* __restrict__ out_bits) {          \
        absmax_impl<T>(table, out_bits);                                                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS) projection_scatter_##SUFFIX(     \
        const __grid_constant__ SegmentTable table, const __grid_constant__ ColumnMap map,      \
        const uint32_t* __restrict__ absmax_bits, uint32_t ceil_log2_nmax,                      \
        unsigned long long* __restrict__ acc, uint32_t stage_cols) {                            \
        scatter_fixed_impl<T>(table, map, absmax_bits, ceil_log2_nmax, acc, stage_cols);        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(PROJ_THREADS)                                  \
        projection_scatter_atomic_##SUFFIX(const __grid_constant__ SegmentTable table,          \
                                           const __grid_constant__ ColumnMap map,               \
                                           const float* __restrict__ scale,                     \
                                           float* __restrict__ out) {                           \
        scatter_atomic_impl<T>(table, map, scale, out);                                         \
    }

LORAFUSE_FOR_EACH_DTYPE(PROJECTION_KERNELS)
