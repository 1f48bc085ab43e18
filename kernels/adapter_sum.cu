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
// Memory plan: W is read once and written once, with 16-byte accesses; the
// update is computed in f32 and W is rounded once. The unfused form
// (ΔW = B·A into a scratch, then W += ΔW) moves W-sized data three more
// times.
//
// Design (256 threads, __launch_bounds__(256, 3): ≤ 85 registers, 77–80
// used, 40–44 KiB static shared memory, 3 blocks = 24 warps per SM). A thread
// owns ROWS rows × N columns of W, N = 16 / sizeof(T) (one 16-byte access per
// row): 4 × 8 for f16/bf16, 8 × 4 for f32, 32 f32 accumulators either way; a
// block owns 16 × 16 threads' worth (64 × 128 half W, 128 × 64 f32 W), and a
// half-warp covers 256 contiguous bytes of a row, so every access is
// coalesced. The block's W tile is requested first with cp.async straight
// into shared memory (no registers held while in flight: 16 KiB per block
// for half W, 32 KiB for f32, so 48–96 KiB per SM), then L and R are staged
// KC = 32 (16 for f32) ranks at a time, k-major, so a thread's rows and
// columns are 16-byte shared loads (3 per 32 FMAs), and the update is
// accumulated in f32 while W is in flight. Each thread then reads back its
// own W rows, adds alpha·update, rounds once and stores 16 bytes.
// Cost per element: 2·rank FLOPs on the CUDA cores. Estimate for a 4096²
// half W on an H100 (~60 TFLOP/s f32 FMA, copy of W ~22 µs): the update hides
// under the copy up to rank ~32 and is compute-bound above (rank 64 ≈ 36 µs
// of FMA at peak; rank 512 ≈ 290 µs). So a bf16 W with total rank ≥ 64 is
// merged on tensor cores instead: the host rounds L and R to bf16
// (adapter_factor_cast_bf16) and runs cuBLAS W = alpha·Lᵀ·R + 1·W (f32
// accumulation, W still read and written once), which is what an in-place
// `addmm_` does; the factors' rounding adds up to 2^-8·Σ|L·R| relative error
// to the update.
#include "common.cuh"

// Tile geometry per storage type, from abi.h (MERGE_THREADS, MERGE_DIM and
// the MERGE_* formulas, which the launcher's grid also reads): a thread owns
// ROWS rows × N columns (32 f32 accumulators either way).
template <typename T> struct MergeTile {
    static constexpr int N = MERGE_VEC(sizeof(T));         // elements per 16-byte access
    static constexpr int ROWS = MERGE_ROWS(sizeof(T));     // rows per thread: 4 (f16/bf16) or 8 (f32)
    static constexpr int TILE_N = MERGE_TILE_N(sizeof(T));  // columns per block: 128 or 64
    static constexpr int TILE_M = MERGE_TILE_M(sizeof(T));  // rows per block: 64 or 128
    static constexpr int KC = MERGE_KC(sizeof(T));         // ranks staged per step: 32 or 16
};

// A 16-byte global-to-shared copy that occupies no registers while in
// flight (cp.async, sm_80+); a plain copy elsewhere (the CPU emulator).
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
    memcpy(smem, gmem, 16);
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ void adapter_merge_tile(T* __restrict__ w, const float* __restrict__ left,
                                                   const float* __restrict__ right, uint32_t rows, uint32_t cols,
                                                   uint32_t rank, float alpha) {
    using G = MergeTile<T>;
    constexpr int N = G::N, ROWS = G::ROWS, TILE_N = G::TILE_N, TILE_M = G::TILE_M, KC = G::KC;
    __shared__ __align__(16) float ls[KC][TILE_M];
    __shared__ __align__(16) float rs[KC][TILE_N];
    __shared__ __align__(16) T wtile[TILE_M][TILE_N];

    const uint32_t tiles_n = (cols + TILE_N - 1) / TILE_N;
    const uint32_t row0 = (blockIdx.x / tiles_n) * TILE_M;
    const uint32_t col0 = (blockIdx.x % tiles_n) * TILE_N;
    const uint32_t tx = threadIdx.x % MERGE_DIM, ty = threadIdx.x / MERGE_DIM;
    const uint32_t col = col0 + tx * N;
    const uint32_t avail_c = col < cols ? min((uint32_t)N, cols - col) : 0u;
    // 16-byte accesses need full width and rows that stay 16-byte aligned.
    const bool vec = avail_c == (uint32_t)N && ((cols * sizeof(T)) & 15) == 0 &&
                     (reinterpret_cast<uintptr_t>(w + col) & 15) == 0;

    // W first, straight into shared memory: this thread's own rows, so only
    // its own wait is needed before it reads them back.
    if (vec) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const uint32_t row = row0 + ty * ROWS + i;
            if (row < rows) copy16_async(&wtile[ty * ROWS + i][tx * N], w + (size_t)row * cols + col);
        }
    }

    float acc[ROWS][N];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int c = 0; c < N; ++c) acc[i][c] = 0.0f;

    for (uint32_t k0 = 0; k0 < rank; k0 += KC) {
        // Stage L[k0:k0+KC, row0:row0+TILE_M] and R[k0:k0+KC, col0:col0+TILE_N],
        // zero past every edge so the product loop needs no bounds.
#pragma unroll 4
        for (uint32_t e = threadIdx.x; e < KC * TILE_M; e += MERGE_THREADS) {
            const uint32_t kk = e / TILE_M, r = e % TILE_M;
            const uint32_t k = k0 + kk, row = row0 + r;
            ls[kk][r] = (k < rank && row < rows) ? left[(size_t)k * rows + row] : 0.0f;
        }
#pragma unroll 4
        for (uint32_t e = threadIdx.x; e < KC * TILE_N; e += MERGE_THREADS) {
            const uint32_t kk = e / TILE_N, c = e % TILE_N;
            const uint32_t k = k0 + kk, cc = col0 + c;
            rs[kk][c] = (k < rank && cc < cols) ? right[(size_t)k * cols + cc] : 0.0f;
        }
        __syncthreads();
        // Stop at the true rank (uniform across the block).
        const uint32_t depth = min((uint32_t)KC, rank - k0);
        for (uint32_t kk = 0; kk < depth; ++kk) {
            float av[ROWS], bv[N];
#pragma unroll
            for (int i = 0; i < ROWS; i += 4) {
                const float4 a = *reinterpret_cast<const float4*>(&ls[kk][ty * ROWS + i]);
                av[i] = a.x, av[i + 1] = a.y, av[i + 2] = a.z, av[i + 3] = a.w;
            }
#pragma unroll
            for (int c = 0; c < N; c += 4) {
                const float4 b = *reinterpret_cast<const float4*>(&rs[kk][tx * N + c]);
                bv[c] = b.x, bv[c + 1] = b.y, bv[c + 2] = b.z, bv[c + 3] = b.w;
            }
#pragma unroll
            for (int i = 0; i < ROWS; ++i)
#pragma unroll
                for (int c = 0; c < N; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
        }
        __syncthreads();
    }

    wait_async_copies();
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const uint32_t row = row0 + ty * ROWS + i;
        if (row >= rows || avail_c == 0) continue;
        T* p = w + (size_t)row * cols + col;
        if (vec) {
            const uint4 raw = *reinterpret_cast<const uint4*>(&wtile[ty * ROWS + i][tx * N]);
            const T* e = reinterpret_cast<const T*>(&raw);
            alignas(16) T out[N];
#pragma unroll
            for (int c = 0; c < N; ++c) out[c] = from_f32<T>(fmaf(alpha, acc[i][c], to_f32(e[c])));
            *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(out);
        } else {
#pragma unroll
            for (int c = 0; c < N; ++c)
                if ((uint32_t)c < avail_c) p[c] = from_f32<T>(fmaf(alpha, acc[i][c], to_f32(p[c])));
        }
    }
}

#define MERGE_KERNEL(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS, 3)                                             \
        adapter_merge_##SUFFIX(T* __restrict__ w, const float* __restrict__ left, const float* __restrict__ right, \
                               uint32_t rows, uint32_t cols, uint32_t rank, float alpha) {                      \
        adapter_merge_tile<T>(w, left, right, rows, cols, rank, alpha);                                         \
    }
LORAFUSE_FOR_EACH_DTYPE(MERGE_KERNEL)

// Rounds f32 factors to bf16 (round to nearest even) for the tensor-core
// merge of large total rank (src/cuda/adapter_sum.rs hands them to cuBLAS).
// One element per thread, grid-stride; memory-bound and tiny next to W.
extern "C" __global__ void adapter_factor_cast_bf16(const float* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                                    uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}
