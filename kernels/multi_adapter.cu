// Many adapters in one batch (src/multi_adapter.rs has the math and the
// pool; src/cpu/multi_adapter.rs is the oracle with the same step names).
//
//   y[i] += s_a · (((x[i]·A_aᵀ) ⊙ u_a)·B_aᵀ) ⊙ v_a,   a = ids[i]  (−1: none)
//
// x, y and the pool's factors are stored as T (f32/f16/bf16); u, v, θ_d and
// the projection's column scales are f32; all arithmetic is f32.
//
// The host turns the ids into tiles: at most MA_TILE_ROWS consecutive rows
// of one adapter (a prefill segment becomes ⌈len/8⌉ tiles, a decode row one
// tile), and each tile into work items of four u32 {row0, rows, entry, c0}:
//   multi_adapter_shrink  one block per (tile, 8 ranks): warp w computes
//                         t'[row][q0+w] = s·u·(x[row]·A[q0+w]) for the
//                         tile's rows; lanes stride K by 8 elements (16-byte
//                         loads), each A chunk is loaded once and used for
//                         every row of the tile (x rows come from L1/L2).
//   multi_adapter_expand  one block per (tile, 2048 columns): the tile's t'
//                         (≤ 8 × 128 f32, 4 KiB) is staged in shared memory;
//                         each thread owns 8 consecutive columns for all
//                         rows (64 f32 accumulators), walks the adapter's
//                         ranks reading one 16-byte row piece of Bᵀ per
//                         rank, then reads, adds v⊙acc and writes y once.
// One launch each for every segment of the batch, as Punica's SGMV /
// vLLM's lora_shrink + lora_expand: the work-item list, not a padded
// (adapters × max rank) grid, carries the mixed ranks, so a rank-4 adapter
// costs rank-4 work next to a rank-128 one.
//
// Memory passes: x is read once per (tile, 8 ranks) (once per tile at
// r ≤ 8; repeated reads of a tile's x by its rank groups hit L2), A and Bᵀ
// once per tile, y read and written once, t' (M × r f32) written and read
// once. At decode (64 rows, 64 adapters, r = 16, K = N = 4096, bf16) that is
// the 16.8 MB of factors plus 1 MB of x and y: the issue's read floor.
//
// Descriptors (24 u32 per (slot, layer), word names as in src/multi_adapter.rs
// `desc`): kind (0 empty, 1 factors, 2 θ), rank, scale bits, u/v offsets
// into the float arena (0xFFFFFFFF: ones), base (first rank row of the
// factor arena, or θ_d's offset), and for θ entries the projection
// (column-scale offset, d, key, D, mode, Feistel half width) and where the
// layer's A and B start in θ_D. A θ entry gathers
//   A[q][k] = θ_d[j(a_start + q·K + k)] · scale_j,
//   B[n][q] = θ_d[j(b_start + n·r + q)] · scale_j
// with j(i) the projection's column (common.cuh's splitmix_at, the same
// integer arithmetic as src/projection.rs): the factors are never written
// to memory; one adapter is d floats for the whole model.
//
// Design point: 256 threads, no float atomics, every output element written
// by one thread and every sum in a fixed order that depends only on the
// row's own adapter (so results do not depend on the rest of the batch).
// shrink: static smem 0, expand: 4 KiB static smem; both are sized for 2+
// blocks per SM on sm_80/sm_90 (see scripts/check-kernels.sh for the
// registers). The vector paths need K (shrink) / N (expand) to be a
// multiple of 8 and 16-byte aligned x, y; anything else takes the scalar
// path of the same kernel.
#include "common.cuh"

// MA_* sizes, the descriptor word offsets (MA_D_*), MA_KIND_* and
// MA_OFF_NONE are in abi.h, shared with src/multi_adapter.rs.
// Blocks per SM the register budget is set for (128 registers per thread):
// without it ptxas aims for 4 and spills the shrink's 8 accumulators.
#define MA_MIN_BLOCKS 2

__device__ __forceinline__ uint64_t desc_u64(const uint32_t* d, int w) {
    return (uint64_t)d[w] | ((uint64_t)d[w + 1] << 32);
}

// Uni-LoRA's projection as one descriptor carries it.
struct ThetaSource {
    const float* theta;     // θ_d
    const float* colscale;  // 1/√n_j
    uint64_t key, rows;
    uint32_t cols, mode, half_bits;
};

__device__ __forceinline__ ThetaSource theta_source(const uint32_t* d, const float* floats) {
    ThetaSource s;
    s.theta = floats + d[MA_D_BASE];
    s.colscale = floats + d[MA_D_COLSCALE_OFF];
    s.key = desc_u64(d, MA_D_KEY);
    s.rows = desc_u64(d, MA_D_ROWS);
    s.cols = d[MA_D_COLS];
    s.mode = d[MA_D_MODE];
    s.half_bits = d[MA_D_HALF_BITS];
    return s;
}

// θ_D[i] = θ_d[j(i)]·scale_j (mode 0: hash, 1: balanced; common.cuh).
__device__ __forceinline__ float theta_at(const ThetaSource& s, uint64_t i) {
    const uint32_t j = projection_column(s.key, s.rows, s.cols, s.mode, s.half_bits, i);
    return s.theta[j] * s.colscale[j];
}

// Eight 16-bit values as one 16-byte word: a union, so the halves written
// are the bytes stored (a cast pointer into a uint4 is an aliasing violation
// the host compiler of the emulator does exploit).
template <typename T> union HalfPack {
    uint4 raw;
    T h[8];
    __device__ HalfPack() {}
};

// V consecutive elements as f32: one 16-byte load for 8 halves, two for 8
// floats, or a scalar.
template <typename T, int V> __device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
    if constexpr (V == 8 && sizeof(T) == 2) {
        HalfPack<T> pack;
        pack.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int c = 0; c < 8; ++c) out[c] = to_f32(pack.h[c]);
    } else if constexpr (V == 8) {
        const float4 lo = *reinterpret_cast<const float4*>(p);
        const float4 hi = *reinterpret_cast<const float4*>(p + 4);
        out[0] = to_f32(lo.x), out[1] = to_f32(lo.y), out[2] = to_f32(lo.z), out[3] = to_f32(lo.w);
        out[4] = to_f32(hi.x), out[5] = to_f32(hi.y), out[6] = to_f32(hi.z), out[7] = to_f32(hi.w);
    } else {
#pragma unroll
        for (int c = 0; c < V; ++c) out[c] = to_f32(p[c]);
    }
}

template <typename T, int V> __device__ __forceinline__ void store_from_f32(T* p, const float (&v)[V]) {
    if constexpr (V == 8 && sizeof(T) == 2) {
        HalfPack<T> pack;
#pragma unroll
        for (int c = 0; c < 8; ++c) pack.h[c] = from_f32<T>(v[c]);
        *reinterpret_cast<uint4*>(p) = pack.raw;
    } else if constexpr (V == 8) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int c = 0; c < V; ++c) p[c] = from_f32<T>(v[c]);
    }
}

// ---- shrink: t'[row][q] = s·u_q·(x[row]·A[q]) ------------------------------

// One warp, rank q, the tile's rows. V = 8: lane covers k = 8·lane + 256·i.
// THETA: A gathered from θ_d (th, a_first) instead of read from arow.
template <typename T, int V, bool THETA>
__device__ __forceinline__ void shrink_rank(const T* __restrict__ x, const T* __restrict__ arow,
                                            const ThetaSource& th, uint64_t a_first, int row0, int rows, int K,
                                            float (&acc)[MA_TILE_ROWS]) {
    const int lane = threadIdx.x % 32;
    for (int k = lane * V; k < K; k += 32 * V) {
        float a[V];
        if constexpr (THETA) {
#pragma unroll
            for (int c = 0; c < V; ++c) a[c] = theta_at(th, a_first + (uint64_t)(k + c));
        } else {
            load_f32<T, V>(arow + k, a);
        }
#pragma unroll
        for (int m = 0; m < MA_TILE_ROWS; ++m) {
            if (m < rows) {
                float xv[V];
                load_f32<T, V>(x + (size_t)(row0 + m) * K + k, xv);
#pragma unroll
                for (int c = 0; c < V; ++c) acc[m] = fmaf(xv[c], a[c], acc[m]);
            }
        }
    }
}

template <typename T>
__device__ void shrink_impl(const T* __restrict__ x, const T* __restrict__ a_rows, const float* __restrict__ floats,
                            const uint32_t* __restrict__ descs, const uint4* __restrict__ items,
                            float* __restrict__ t, int K, int ld_t) {
    const uint4 item = items[blockIdx.x];
    const int row0 = (int)item.x, rows = (int)item.y;
    const uint32_t* d = descs + (size_t)item.z * MA_DESC_WORDS;
    const int q = (int)item.w + (int)(threadIdx.x / 32);
    const int rank = (int)d[MA_D_RANK];
    if (q >= rank) return;  // warp-uniform; no block barrier follows
    float acc[MA_TILE_ROWS];
#pragma unroll
    for (int m = 0; m < MA_TILE_ROWS; ++m) acc[m] = 0.f;
    const bool vec = K % 8 == 0 && ((uintptr_t)x % 16) == 0 && ((uintptr_t)a_rows % 16) == 0;
    if (d[MA_D_KIND] == MA_KIND_THETA) {
        const ThetaSource th = theta_source(d, floats);
        const uint64_t a_first = desc_u64(d, MA_D_A_START) + (uint64_t)q * K;
        if (vec) shrink_rank<T, 8, true>(x, nullptr, th, a_first, row0, rows, K, acc);
        else shrink_rank<T, 1, true>(x, nullptr, th, a_first, row0, rows, K, acc);
    } else {
        const T* arow = a_rows + (size_t)(d[MA_D_BASE] + q) * K;
        const ThetaSource none{};
        if (vec) shrink_rank<T, 8, false>(x, arow, none, 0, row0, rows, K, acc);
        else shrink_rank<T, 1, false>(x, arow, none, 0, row0, rows, K, acc);
    }
    const float su = __uint_as_float(d[MA_D_SCALE]) * (d[MA_D_U_OFF] == MA_OFF_NONE ? 1.f : floats[d[MA_D_U_OFF] + q]);
#pragma unroll
    for (int m = 0; m < MA_TILE_ROWS; ++m) {
        const float s = warp_sum(acc[m]);
        if (m < rows && threadIdx.x % 32 == 0) t[(size_t)(row0 + m) * ld_t + q] = su * s;
    }
}

// ---- expand: y[row][n] += v_n·Σ_q t'[row][q]·B[n][q] -----------------------

// One thread, V columns from n (V = 8: consecutive; V = 1: one column).
// THETA: B gathered from θ_d (th, b_first) instead of read from bt.
template <typename T, int V, bool THETA>
__device__ __forceinline__ void expand_cols(const T* __restrict__ bt, const ThetaSource& th, uint64_t b_first,
                                            const float* __restrict__ v, const float (*ts)[MA_MAX_RANK],
                                            T* __restrict__ y, int row0, int rows, int n, int N, int rank) {
    float acc[MA_TILE_ROWS][V];
#pragma unroll
    for (int m = 0; m < MA_TILE_ROWS; ++m)
#pragma unroll
        for (int c = 0; c < V; ++c) acc[m][c] = 0.f;
    for (int q = 0; q < rank; ++q) {
        float b[V];
        if constexpr (THETA) {
#pragma unroll
            for (int c = 0; c < V; ++c) b[c] = theta_at(th, b_first + (uint64_t)(n + c) * rank + q);
        } else {
            load_f32<T, V>(bt + (size_t)q * N + n, b);
        }
#pragma unroll
        for (int m = 0; m < MA_TILE_ROWS; ++m) {
            if (m < rows) {
                const float tq = ts[m][q];
#pragma unroll
                for (int c = 0; c < V; ++c) acc[m][c] = fmaf(tq, b[c], acc[m][c]);
            }
        }
    }
    float vv[V];
#pragma unroll
    for (int c = 0; c < V; ++c) vv[c] = v ? v[n + c] : 1.f;
#pragma unroll
    for (int m = 0; m < MA_TILE_ROWS; ++m) {
        if (m < rows) {
            T* yp = y + (size_t)(row0 + m) * N + n;
            float out[V];
            load_f32<T, V>(yp, out);
#pragma unroll
            for (int c = 0; c < V; ++c) out[c] = fmaf(vv[c], acc[m][c], out[c]);
            store_from_f32<T, V>(yp, out);
        }
    }
}

template <typename T>
__device__ void expand_impl(const T* __restrict__ bt_rows, const float* __restrict__ floats,
                            const uint32_t* __restrict__ descs, const uint4* __restrict__ items,
                            const float* __restrict__ t, T* __restrict__ y, int N, int ld_t) {
    __shared__ float ts[MA_TILE_ROWS][MA_MAX_RANK];
    const uint4 item = items[blockIdx.x];
    const int row0 = (int)item.x, rows = (int)item.y, n0 = (int)item.w;
    const uint32_t* d = descs + (size_t)item.z * MA_DESC_WORDS;
    const int rank = (int)d[MA_D_RANK];
    for (int e = threadIdx.x; e < MA_TILE_ROWS * MA_MAX_RANK; e += MA_THREADS) {
        const int m = e / MA_MAX_RANK, q = e % MA_MAX_RANK;
        if (m < rows && q < rank) ts[m][q] = t[(size_t)(row0 + m) * ld_t + q];
    }
    __syncthreads();
    const float* v = d[MA_D_V_OFF] == MA_OFF_NONE ? nullptr : floats + d[MA_D_V_OFF];
    const bool theta = d[MA_D_KIND] == MA_KIND_THETA;
    const ThetaSource th = theta ? theta_source(d, floats) : ThetaSource{};
    const uint64_t b_first = theta ? desc_u64(d, MA_D_B_START) : 0;
    const T* bt = theta ? nullptr : bt_rows + (size_t)d[MA_D_BASE] * N;
    const bool vec = N % 8 == 0 && ((uintptr_t)y % 16) == 0 && ((uintptr_t)bt_rows % 16) == 0;
    if (vec) {
        const int n = n0 + (int)threadIdx.x * 8;
        if (n >= N) return;
        if (theta) expand_cols<T, 8, true>(bt, th, b_first, v, ts, y, row0, rows, n, N, rank);
        else expand_cols<T, 8, false>(bt, th, b_first, v, ts, y, row0, rows, n, N, rank);
    } else {
        // Scalar path: 8 columns strided by the block width (coalesced).
        for (int c = 0; c < 8; ++c) {
            const int n = n0 + c * MA_THREADS + (int)threadIdx.x;
            if (n >= N) break;
            if (theta) expand_cols<T, 1, true>(bt, th, b_first, v, ts, y, row0, rows, n, N, rank);
            else expand_cols<T, 1, false>(bt, th, b_first, v, ts, y, row0, rows, n, N, rank);
        }
    }
}

#define MULTI_ADAPTER_KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(MA_THREADS, MA_MIN_BLOCKS) multi_adapter_shrink_##SUFFIX(                 \
        const T* __restrict__ x, const T* __restrict__ a_rows, const float* __restrict__ floats,             \
        const uint32_t* __restrict__ descs, const uint4* __restrict__ items, float* __restrict__ t, int K,   \
        int ld_t) {                                                                                          \
        shrink_impl<T>(x, a_rows, floats, descs, items, t, K, ld_t);                                         \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MA_THREADS, MA_MIN_BLOCKS) multi_adapter_expand_##SUFFIX(                 \
        const T* __restrict__ bt_rows, const float* __restrict__ floats, const uint32_t* __restrict__ descs, \
        const uint4* __restrict__ items, const float* __restrict__ t, T* __restrict__ y, int N, int ld_t) {  \
        expand_impl<T>(bt_rows, floats, descs, items, t, y, N, ld_t);                                        \
    }

LORAFUSE_FOR_EACH_DTYPE(MULTI_ADAPTER_KERNELS)
