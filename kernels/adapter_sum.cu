// Merge (and unmerge) a sum of adapters into base weights:
//
//     W ← W + alpha · Lᵀ·R        W: rows×cols (T = f32/f16/bf16, row-major)
//                                L: rank×rows f32, R: rank×cols f32
//
// The host folds everything into the two factors (src/adapter_sum.rs):
// L = B_catᵀ with B_cat = [w₁s₁·diag(v₁)B₁diag(u₁) | w₂s₂… | …] and
// R = A_cat = [A₁; A₂; …], so rank = Σ rᵢ and one launch merges every
// adapter of a module. With fan_in_fan_out (GPT-2 Conv1D, W stored K×N) the
// host swaps them (L = A_cat, R = B_catᵀ). Unmerge is alpha = -1.
//
// Memory plan (the point of the kernel): W is read once and written once.
// The unfused form (ΔW = B·A into a scratch N×K, then W += ΔW) moves W-sized
// data three more times (write ΔW, read ΔW, plus an f32 scratch twice the size
// of a half W). Each block owns a 64×128 tile of W: it issues the tile's loads
// first (so their latency overlaps the product), computes the tile of Lᵀ·R in
// f32 registers from 16-deep slices of L and R staged in shared memory, and
// writes the tile back. L and R are re-read by every tile row/column, but they
// are (rows+cols)·rank·4 bytes, small enough to stay in L2.
//
// Arithmetic: 2·rows·cols·rank FLOPs on the CUDA cores (f32 FMA). At small
// rank (≤ ~32 on an H100 for half W) the kernel is bound by W's bandwidth;
// beyond that it becomes compute-bound (a tensor-core variant would be the
// next step; it is not written).
#include "common.cuh"

#define MERGE_THREADS 256
#define MERGE_TILE_M 64   // rows of W per block: 16 thread rows × 4
#define MERGE_TILE_N 128  // cols of W per block: 16 thread cols × 2 groups × 4
#define MERGE_KC 16       // rank slice staged per iteration

// 4 consecutive elements of W as f32, vectorised when the address allows.
template <typename T> struct Quad;
template <> struct Quad<float> { using V = float4; };
template <> struct Quad<__half> { using V = uint2; };
template <> struct Quad<__nv_bfloat16> { using V = uint2; };

template <typename T>
__device__ __forceinline__ void load4(const T* p, bool vec, uint32_t avail, float (&out)[4]) {
    if (vec) {
        typename Quad<T>::V raw = *reinterpret_cast<const typename Quad<T>::V*>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = to_f32(e[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = k < (int)avail ? to_f32(p[k]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, bool vec, uint32_t avail, const float (&v)[4]) {
    if (vec) {
        typename Quad<T>::V raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) e[k] = from_f32<T>(v[k]);
        *reinterpret_cast<typename Quad<T>::V*>(p) = raw;
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (k < (int)avail) p[k] = from_f32<T>(v[k]);
    }
}

template <typename T>
__device__ __forceinline__ void adapter_merge(T* __restrict__ w, const float* __restrict__ left,
                                              const float* __restrict__ right, uint32_t rows, uint32_t cols,
                                              uint32_t rank, float alpha) {
    // Slices of L and R, k-major, so a thread's 4 rows (resp. 4 cols) are
    // one 16-byte shared-memory load and the global loads are coalesced.
    __shared__ __align__(16) float ls[MERGE_KC][MERGE_TILE_M];
    __shared__ __align__(16) float rs[MERGE_KC][MERGE_TILE_N];

    const uint32_t tiles_n = (cols + MERGE_TILE_N - 1) / MERGE_TILE_N;
    const uint32_t row0 = (blockIdx.x / tiles_n) * MERGE_TILE_M;
    const uint32_t col0 = (blockIdx.x % tiles_n) * MERGE_TILE_N;
    const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16;

    // This thread's 4 rows × (2 groups of 4 cols) of W: a warp covers two rows
    // of 64 contiguous elements per group, so every access is coalesced.
    float wv[4][8];
    bool vec[4][2];
    uint32_t avail[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t row = row0 + ty * 4 + i;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t col = col0 + h * 64 + tx * 4;
            avail[i][h] = (row < rows && col < cols) ? min(4u, cols - col) : 0u;
            const T* p = w + (size_t)row * cols + col;
            vec[i][h] = avail[i][h] == 4 && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
            float q[4];
            load4(p, vec[i][h], avail[i][h], q);
#pragma unroll
            for (int k = 0; k < 4; ++k) wv[i][h * 4 + k] = q[k];
        }
    }

    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    for (uint32_t k0 = 0; k0 < rank; k0 += MERGE_KC) {
        // Stage L[k0:k0+16, row0:row0+64] and R[k0:k0+16, col0:col0+128],
        // zero-filled past the edges so the inner loop needs no bounds.
#pragma unroll
        for (int e = 0; e < MERGE_KC * MERGE_TILE_M / MERGE_THREADS; ++e) {
            const uint32_t idx = threadIdx.x + e * MERGE_THREADS;
            const uint32_t kk = idx / MERGE_TILE_M, r = idx % MERGE_TILE_M;
            const uint32_t k = k0 + kk, row = row0 + r;
            ls[kk][r] = (k < rank && row < rows) ? left[(size_t)k * rows + row] : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < MERGE_KC * MERGE_TILE_N / MERGE_THREADS; ++e) {
            const uint32_t idx = threadIdx.x + e * MERGE_THREADS;
            const uint32_t kk = idx / MERGE_TILE_N, c = idx % MERGE_TILE_N;
            const uint32_t k = k0 + kk, col = col0 + c;
            rs[kk][c] = (k < rank && col < cols) ? right[(size_t)k * cols + col] : 0.0f;
        }
        __syncthreads();
        // Stop at the true rank: a rank-4 adapter costs 4 steps, not 16
        // (the bound is uniform across the block, so this never diverges).
        const uint32_t depth = min((uint32_t)MERGE_KC, rank - k0);
#pragma unroll
        for (int kk = 0; kk < MERGE_KC; ++kk) {
            if ((uint32_t)kk >= depth) break;
            const float4 a = *reinterpret_cast<const float4*>(&ls[kk][ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&rs[kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&rs[kk][64 + tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t row = row0 + ty * 4 + i;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (avail[i][h] == 0) continue;
            const uint32_t col = col0 + h * 64 + tx * 4;
            float q[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) q[k] = fmaf(alpha, acc[i][h * 4 + k], wv[i][h * 4 + k]);
            store4(w + (size_t)row * cols + col, vec[i][h], avail[i][h], q);
        }
    }
}

#define MERGE_KERNEL(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS, 2)                                       \
        adapter_merge_##SUFFIX(T* __restrict__ w, const float* __restrict__ left,                         \
                               const float* __restrict__ right, uint32_t rows, uint32_t cols, uint32_t rank, \
                               float alpha) {                                                             \
        adapter_merge<T>(w, left, right, rows, cols, rank, alpha);                                        \
    }
LORAFUSE_FOR_EACH_DTYPE(MERGE_KERNEL)
