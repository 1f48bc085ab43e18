// The fused low-rank update of LoRA / Tied-LoRA / VeRA (src/lowrank.rs has
// the math; src/cpu/lowrank.rs is the oracle with the same step names).
//
//   y = x·Wᵀ + bias + s·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v
//
// x, W, bias, y, dy, dx are stored as T (f32/f16/bf16); A, B, u, v, t and
// every parameter gradient are f32; all arithmetic accumulates in f32. The
// two large GEMMs (x·Wᵀ, dy·W) and the rank-r GEMMs whose operands are
// already in T run on cuBLAS (src/cuda/lowrank.rs); these kernels do the
// rest. Nothing here uses float atomics: every reduction writes per-block
// partials that a later step sums in a fixed order, so results are the same
// bits on every run.
//
// Forward, large M (prefill / training), option (a) of the issue:
//   lowrank_shrink        t partials = x·Aᵀ per K-split (f32 x: CUDA cores;
//                         f16/bf16 x: lowrank_shrink_tc, tensor cores)
//   lowrank_shrink_finish t = Σ partials (saved for the backward) and
//                         t' = [s·t⊙u | 1 | 0…] in T, rank padded to ld
//   lowrank_prep_expand   B' = [B⊙v | bias | 0…] in T (N×ld)
//   cuBLAS                y  = t'·B'ᵀ        (β = 0: y written once)
//   cuBLAS                y += x·Wᵀ          (β = 1, in the GEMM epilogue)
// The expand term (and the bias, through the ones column) lands in y before
// the base GEMM, whose epilogue adds it while writing y: this avoids the
// separate read-modify-write pass over y (M×N read + M×N write) that an
// "add the LoRA term afterwards" step costs, and the bias pass too.
// Option (b), one GEMM over an extended K ([x | t']·[W | B']ᵀ), would also
// drop the y write of the expand GEMM, but needs x in a buffer with r spare
// columns per row (a copy of x, 2·M·K elements of traffic, unless the caller
// produces x in that layout) and an op-owned W with spare columns; the
// drop-in API here takes caller buffers as they are, so (a) was chosen.
// What (a) still costs over the base GEMM at large M: one read of x (the
// shrink), one write of y (the expand GEMM) and the β = 1 read of y in the
// base GEMM's epilogue. At M = 8192, K = N = 4096, bf16 that is ~200 MB,
// ~60 µs at 3.35 TB/s against a ~420 µs GEMM: about 1.1–1.15× base, not the
// issue's 1.03× (which needs the shrink inside the GEMM main loop, where x
// tiles already sit in shared memory: a custom GEMM, not cuBLAS). Against
// the unfused sequence (same x read, y read + written by the β = 1 expand)
// (a) saves only the y read the epilogue hides. Estimates, not measured:
// no GPU was available when this was written.
//
// Decode (M ≤ 32): lowrank_decode, one cooperative launch: split-K shrink,
// grid sync, fixed-order reduction, grid sync, expand-and-add in place on y
// (which the base GEMM has written). Two kernel launches fewer than the
// prefill path, which at M ≤ 32 is all latency.
//
// Backward:
//   lowrank_backward_dy   ONE read of dy gives, per tile, the partials of
//                         gB = (dy⊙v)·B (row reductions) and
//                         P = dyᵀ·(t⊙u) (column reductions)
//                         (f32 dy: CUDA cores; f16/bf16 dy:
//                         lowrank_backward_dy_tc, tensor cores)
//   lowrank_backward_rows dS = s·gB⊙u (in T, for the cuBLAS GEMMs) and du
//                         partials Σ t⊙gB: du costs one multiply-add per
//                         element gB already needs
//   lowrank_backward_cols dB += s·v⊙P, dv += s·rowsum(P⊙B): dv reuses the
//                         product dB forms, never the M×N (t⊙u)·Bᵀ
//   cuBLAS                dA += dSᵀ·x, dx = dS·A then dx += dy·W (β = 1,
//                         as in the forward), dW += dyᵀ·x,
//                         dbias += dyᵀ·1
#include <cooperative_groups.h>
#include <mma.h>

#include "common.cuh"

namespace cg = cooperative_groups;

#define LR_THREADS 256

// ---- small elementwise helpers -------------------------------------------

// dst = (T) src: A in T for the dx = dS·A GEMM.
template <typename T>
__device__ void cast_impl(const float* __restrict__ src, T* __restrict__ dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<T>(src[i]);
}

// dst = 1: the ones vector that turns dbias += colsum(dy) into a GEMV.
template <typename T>
__device__ void fill_one_impl(T* __restrict__ dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<T>(1.0f);
}

// y[m][j] = bias[j]: written before the base GEMM (β = 1) when there is no
// adapter, so the bias costs no extra pass over y.
template <typename T>
__device__ void fill_bias_impl(const T* __restrict__ bias, T* __restrict__ y, int M, int N) {
    const size_t total = (size_t)M * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] = bias[i % N];
}

// ---- shrink: t = x·Aᵀ ----------------------------------------------------

#define SH_ROWS 64   // rows of x per block
#define SH_RANKS 16  // ranks per block (grid.z walks the rest)
#define SH_KT 32     // K per shared-memory tile
#define SH_PAD 4     // keeps float4 alignment, spreads rows over banks

// One block: 64 rows × 16 ranks over one K-split. Each thread owns 4 rows ×
// 1 rank and reads float4s along K, so shared-memory loads keep up with the
// FMAs (9 loads per 16 FMAs). Partials go to part[split][row][rank]; with
// one split that is t itself.
template <typename T>
__device__ void shrink_impl(const T* __restrict__ x, const float* __restrict__ A, float* __restrict__ part,
                            int M, int K, int r, int k_per_split) {
    __shared__ __align__(16) float xs[SH_ROWS][SH_KT + SH_PAD];
    __shared__ __align__(16) float as[SH_RANKS][SH_KT + SH_PAD];
    const int tid = threadIdx.x, tx = tid % SH_RANKS, ty = tid / SH_RANKS;
    const int row0 = blockIdx.x * SH_ROWS, q0 = blockIdx.z * SH_RANKS;
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = k_begin; k0 < k_end; k0 += SH_KT) {
        for (int e = tid; e < SH_ROWS * SH_KT; e += LR_THREADS) {
            const int rr = e / SH_KT, kk = e % SH_KT, row = row0 + rr, k = k0 + kk;
            xs[rr][kk] = (row < M && k < k_end) ? to_f32(x[(size_t)row * K + k]) : 0.f;
        }
        for (int e = tid; e < SH_RANKS * SH_KT; e += LR_THREADS) {
            const int qq = e / SH_KT, kk = e % SH_KT, q = q0 + qq, k = k0 + kk;
            as[qq][kk] = (q < r && k < k_end) ? A[(size_t)q * K + k] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < SH_KT; kk += 4) {
            const float4 a4 = *reinterpret_cast<const float4*>(&as[tx][kk]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float4 x4 = *reinterpret_cast<const float4*>(&xs[ty * 4 + i][kk]);
                acc[i] += x4.x * a4.x + x4.y * a4.y + x4.z * a4.z + x4.w * a4.w;
            }
        }
        __syncthreads();
    }
    const int q = q0 + tx;
    if (q >= r) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty * 4 + i;
        if (row < M) part[((size_t)blockIdx.y * M + row) * r + q] = acc[i];
    }
}

// The same shrink on tensor cores for f16/bf16 x (lowrank_shrink_tc_*; the
// CPU twin is lowrank_shrink). A is f32, so each A tile is split into
// A_hi = T(A) and A_lo = T(A − A_hi) and both are multiplied: products of
// two 16-bit values are exact in f32, so t keeps ~16 (bf16) or ~22 (f16)
// bits of A instead of 8 or 11, at no visible cost (the shrink is bound by
// the read of x, not by tensor-core FLOPs). Block: 4 warps × 16 rows, 16
// ranks; partials as in shrink_impl.
#define TC_THREADS 128
#define TC_ROWS 64
#define TC_KT 32
#define TC_LD (TC_KT + 8)  // 16-bit elements: a multiple of 8, 32-byte rows tiles

template <typename T>
__device__ void shrink_tc_impl(const T* __restrict__ x, const float* __restrict__ A, float* __restrict__ part,
                               int M, int K, int r, int k_per_split) {
    using namespace nvcuda;
    __shared__ __align__(32) T xs[TC_ROWS][TC_LD];
    __shared__ __align__(32) T a_hi[SH_RANKS][TC_LD];
    __shared__ __align__(32) T a_lo[SH_RANKS][TC_LD];
    __shared__ __align__(32) float out[TC_THREADS / 32][16][20];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int row0 = blockIdx.x * TC_ROWS, q0 = blockIdx.z * SH_RANKS;
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    const T zero = from_f32<T>(0.f);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = k_begin; k0 < k_end; k0 += TC_KT) {
        for (int e = tid; e < TC_ROWS * TC_KT; e += TC_THREADS) {
            const int rr = e / TC_KT, kk = e % TC_KT, row = row0 + rr, k = k0 + kk;
            xs[rr][kk] = (row < M && k < k_end) ? x[(size_t)row * K + k] : zero;
        }
        for (int e = tid; e < SH_RANKS * TC_KT; e += TC_THREADS) {
            const int qq = e / TC_KT, kk = e % TC_KT, q = q0 + qq, k = k0 + kk;
            const float a = (q < r && k < k_end) ? A[(size_t)q * K + k] : 0.f;
            const T hi = from_f32<T>(a);
            a_hi[qq][kk] = hi;
            a_lo[qq][kk] = from_f32<T>(a - to_f32(hi));
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TC_KT; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fx;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fh, fl;
            wmma::load_matrix_sync(fx, &xs[warp * 16][kk], TC_LD);
            // (k, q) lives at a_*[q][k]: column-major K×16 with ld TC_LD.
            wmma::load_matrix_sync(fh, &a_hi[0][kk], TC_LD);
            wmma::load_matrix_sync(fl, &a_lo[0][kk], TC_LD);
            wmma::mma_sync(acc, fx, fh, acc);
            wmma::mma_sync(acc, fx, fl, acc);
        }
        __syncthreads();
    }
    wmma::store_matrix_sync(&out[warp][0][0], acc, 20, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * 16; e += 32) {
        const int rr = e / 16, qq = e % 16, row = row0 + warp * 16 + rr, q = q0 + qq;
        if (row < M && q < r) part[((size_t)blockIdx.y * M + row) * r + q] = out[warp][rr][qq];
    }
}

#define LOWRANK_TC_KERNEL(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                           \
        lowrank_shrink_tc_##SUFFIX(const T* __restrict__ x, const float* __restrict__ A,               \
                                   float* __restrict__ part, int M, int K, int r, int k_per_split) {   \
        shrink_tc_impl<T>(x, A, part, M, K, r, k_per_split);                                           \
    }
LOWRANK_TC_KERNEL(f16, __half)
LOWRANK_TC_KERNEL(bf16, __nv_bfloat16)

// The CUDA-core shrink serves f32 x only (16-bit x takes the tensor cores).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_shrink_f32(const float* __restrict__ x, const float* __restrict__ A, float* __restrict__ part, int M,
                       int K, int r, int k_per_split) {
    shrink_impl<float>(x, A, part, M, K, r, k_per_split);
}

// t = Σ_split part (fixed order), saved when `t` is non-null; and
// t'[row] = [s·t⊙u | 1 (bias column, when bias_col) | 0…] in T, `ld` wide,
// the left operand of the expand GEMM (`tx` null: t only, ld = r). `u`
// null means ones.
template <typename T>
__device__ void shrink_finish_impl(const float* __restrict__ part, int splits, const float* __restrict__ u,
                                   float scale, float* t, T* tx, int ld, int bias_col, int M, int r) {
    const size_t total = (size_t)M * ld;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int row = (int)(i / ld), c = (int)(i % ld);
        float out = 0.f;
        if (c < r) {
            float s = 0.f;
            for (int p = 0; p < splits; ++p) s += part[((size_t)p * M + row) * r + c];
            // `t` may alias `part` when splits == 1: same element, same thread.
            if (t) t[(size_t)row * r + c] = s;
            out = scale * s * (u ? u[c] : 1.f);
        } else if (c == r && bias_col) {
            out = 1.f;
        }
        if (tx) tx[i] = from_f32<T>(out);
    }
}

// B'[j] = [B[j]·v[j] | bias[j] | 0…] in T, `ld` wide: the right operand of
// the expand GEMM, with the bias folded in as one more rank.
template <typename T>
__device__ void prep_expand_impl(const float* __restrict__ B, const float* __restrict__ v,
                                 const T* __restrict__ bias, T* __restrict__ bx, int ld, int N, int r) {
    const size_t total = (size_t)N * ld;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(i / ld), c = (int)(i % ld);
        float out = 0.f;
        if (c < r) out = B[(size_t)j * r + c] * (v ? v[j] : 1.f);
        else if (c == r && bias) out = to_f32(bias[j]);
        bx[i] = from_f32<T>(out);
    }
}

// ---- decode: shrink + expand-add in one launch (M ≤ 32) -------------------

// Cooperative launch, every block resident. `work` holds gridDim.x·M·r
// partials and then M·r final values. Phase 1: block b computes t over its
// K-slice, one warp per (row, rank), lanes striding K (coalesced x and A).
// Phase 2: fixed-order sums over blocks. Phase 3: every block stages
// s·t⊙u in shared memory and adds bias + v⊙(t'·Bᵀ) to its columns of y.
template <typename T>
__device__ void decode_impl(const T* __restrict__ x, const float* __restrict__ A, const float* __restrict__ B,
                            const float* __restrict__ u, const float* __restrict__ v, const T* __restrict__ bias,
                            float scale, T* __restrict__ y, float* __restrict__ t_out, float* __restrict__ work,
                            int M, int K, int N, int r, int k_chunk) {
    extern __shared__ float tu[];  // M·r
    cg::grid_group grid = cg::this_grid();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int mr = M * r;
    float* part = work;
    float* tfin = work + (size_t)gridDim.x * mr;
    const int k_begin = blockIdx.x * k_chunk;
    const int k_end = min(K, k_begin + k_chunk);
    for (int o = warp; o < mr; o += warps) {
        const int m = o / r, q = o % r;
        float s = 0.f;
        for (int k = k_begin + lane; k < k_end; k += 32) s += to_f32(x[(size_t)m * K + k]) * A[(size_t)q * K + k];
        s = warp_sum(s);
        if (lane == 0) part[(size_t)blockIdx.x * mr + o] = s;
    }
    grid.sync();
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < mr; o += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int b = 0; b < (int)gridDim.x; ++b) s += part[(size_t)b * mr + o];
        tfin[o] = s;
        if (t_out) t_out[o] = s;
    }
    grid.sync();
    for (int o = threadIdx.x; o < mr; o += blockDim.x) tu[o] = scale * tfin[o] * (u ? u[o % r] : 1.f);
    __syncthreads();
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < N; j += gridDim.x * blockDim.x) {
        const float vj = v ? v[j] : 1.f;
        const float bj = bias ? to_f32(bias[j]) : 0.f;
        const float* brow = B + (size_t)j * r;
        for (int m = 0; m < M; ++m) {
            float s = 0.f;
            for (int q = 0; q < r; ++q) s += tu[m * r + q] * brow[q];
            const size_t yi = (size_t)m * N + j;
            y[yi] = from_f32<T>(to_f32(y[yi]) + bj + vj * s);
        }
    }
}

// ---- backward ------------------------------------------------------------

#define BD_ROWS 64   // rows per sub-tile
#define BD_COLS 128  // columns per tile
#define BD_TILES 4   // column tiles per block (512 columns)
#define BD_RANKS 16  // ranks per block (grid.z walks the rest)

// One read of dy. Block (x: 512 columns, y: a stripe of rows, z: 16 ranks)
// walks its stripe 64 rows at a time; per 64×128 tile of dy it adds
//   gB[row][q] += Σ_col dy·(v⊙B)   (4 rows × 1 rank per thread, float4s)
//   P[col][q]  += Σ_row dy·(t⊙u)   (8 columns × 1 rank per thread)
// gB is complete over the block's 512 columns when a sub-tile ends and goes
// to gpart[col block][row][q]; P stays in registers over the whole stripe
// and goes to ppart[stripe][q][col]. Either output may be null (not
// wanted): its arithmetic is skipped; `t` may be null when ppart is.
template <typename T>
__device__ void backward_dy_impl(const T* __restrict__ dy, const float* __restrict__ t,
                                 const float* __restrict__ B, const float* __restrict__ u,
                                 const float* __restrict__ v, float* __restrict__ gpart, float* __restrict__ ppart,
                                 int M, int N, int r, int rows_per_block) {
    __shared__ __align__(16) float dys[BD_ROWS][BD_COLS + 4];
    __shared__ __align__(16) float bs[BD_RANKS][BD_COLS + 4];
    __shared__ float tus[BD_ROWS][BD_RANKS + 1];
    const int tid = threadIdx.x, tx = tid % BD_RANKS, ty = tid / BD_RANKS;
    const int col_block = blockIdx.x * BD_COLS * BD_TILES, q0 = blockIdx.z * BD_RANKS;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(M, row_begin + rows_per_block);
    const bool want_g = gpart != nullptr, want_p = ppart != nullptr;
    float pacc[BD_TILES][8];
#pragma unroll
    for (int ct = 0; ct < BD_TILES; ++ct)
#pragma unroll
        for (int c = 0; c < 8; ++c) pacc[ct][c] = 0.f;

    for (int r0 = row_begin; r0 < row_end; r0 += BD_ROWS) {
        __syncthreads();  // the previous sub-tile's readers of tus are done
        for (int e = tid; e < BD_ROWS * BD_RANKS; e += LR_THREADS) {
            const int rr = e / BD_RANKS, qq = e % BD_RANKS, row = r0 + rr, q = q0 + qq;
            tus[rr][qq] = (t && row < row_end && q < r) ? t[(size_t)row * r + q] * (u ? u[q] : 1.f) : 0.f;
        }
        float gacc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ct = 0; ct < BD_TILES; ++ct) {
            const int c0 = col_block + ct * BD_COLS;
            __syncthreads();
#pragma unroll 4
            for (int e = tid; e < BD_ROWS * BD_COLS; e += LR_THREADS) {
                const int rr = e / BD_COLS, cc = e % BD_COLS, row = r0 + rr, col = c0 + cc;
                dys[rr][cc] = (row < row_end && col < N) ? to_f32(dy[(size_t)row * N + col]) : 0.f;
            }
            if (want_g) {
                // Ranks fastest: B's rows are contiguous in memory.
#pragma unroll 2
                for (int e = tid; e < BD_RANKS * BD_COLS; e += LR_THREADS) {
                    const int cc = e / BD_RANKS, qq = e % BD_RANKS, q = q0 + qq, col = c0 + cc;
                    bs[qq][cc] = (q < r && col < N) ? B[(size_t)col * r + q] * (v ? v[col] : 1.f) : 0.f;
                }
            }
            __syncthreads();
            if (want_g) {
#pragma unroll 8
                for (int cc = 0; cc < BD_COLS; cc += 4) {
                    const float4 b4 = *reinterpret_cast<const float4*>(&bs[tx][cc]);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float4 d4 = *reinterpret_cast<const float4*>(&dys[ty * 4 + i][cc]);
                        gacc[i] += d4.x * b4.x + d4.y * b4.y + d4.z * b4.z + d4.w * b4.w;
                    }
                }
            }
            if (want_p) {
#pragma unroll 4
                for (int rr = 0; rr < BD_ROWS; ++rr) {
                    const float tv = tus[rr][tx];
                    const float4 d0 = *reinterpret_cast<const float4*>(&dys[rr][ty * 8]);
                    const float4 d1 = *reinterpret_cast<const float4*>(&dys[rr][ty * 8 + 4]);
                    pacc[ct][0] += d0.x * tv;
                    pacc[ct][1] += d0.y * tv;
                    pacc[ct][2] += d0.z * tv;
                    pacc[ct][3] += d0.w * tv;
                    pacc[ct][4] += d1.x * tv;
                    pacc[ct][5] += d1.y * tv;
                    pacc[ct][6] += d1.z * tv;
                    pacc[ct][7] += d1.w * tv;
                }
            }
        }
        const int q = q0 + tx;
        if (want_g && q < r) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = r0 + ty * 4 + i;
                if (row < row_end) gpart[((size_t)blockIdx.x * M + row) * r + q] = gacc[i];
            }
        }
    }
    const int q = q0 + tx;
    if (!want_p || q >= r) return;
#pragma unroll
    for (int ct = 0; ct < BD_TILES; ++ct)
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int col = col_block + ct * BD_COLS + ty * 8 + c;
            if (col < N) ppart[((size_t)blockIdx.y * r + q) * N + col] = pacc[ct][c];
        }
}

// The same one read of dy on tensor cores, for f16/bf16 dy
// (lowrank_backward_dy_tc_*): same grid, tiles and partial layouts as
// backward_dy_impl, so the rows/cols steps are shared. The f32 operands
// B⊙v and t⊙u are split into hi + lo 16-bit halves (as in the tensor-core
// shrink), so every product with dy is exact in f32. Warps: for gB, warp w
// owns rows 16·(w%4).. over half (w/4) of each 128-column tile, and the two
// halves are summed through shared memory; for P, warp w owns columns
// 16·w.. of each tile, in 4 accumulators kept over the whole row stripe.
#define TB_LD (BD_COLS + 8)     // dy tile and B tile row stride (elements)
#define TB_TLD (BD_RANKS + 8)   // t⊙u tile row stride (elements)

template <typename T>
__device__ void backward_dy_tc_impl(const T* __restrict__ dy, const float* __restrict__ t,
                                    const float* __restrict__ B, const float* __restrict__ u,
                                    const float* __restrict__ v, float* __restrict__ gpart,
                                    float* __restrict__ ppart, int M, int N, int r, int rows_per_block) {
    using namespace nvcuda;
    __shared__ __align__(32) T dys[BD_ROWS][TB_LD];
    __shared__ __align__(32) T b_hi[BD_RANKS][TB_LD];
    __shared__ __align__(32) T b_lo[BD_RANKS][TB_LD];
    __shared__ __align__(32) T t_hi[BD_ROWS][TB_TLD];
    __shared__ __align__(32) T t_lo[BD_ROWS][TB_TLD];
    __shared__ __align__(32) float stage[LR_THREADS / 32][16][20];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int col_block = blockIdx.x * BD_COLS * BD_TILES, q0 = blockIdx.z * BD_RANKS;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(M, row_begin + rows_per_block);
    const bool want_g = gpart != nullptr, want_p = ppart != nullptr;
    const T zero = from_f32<T>(0.f);
    const int g_rows = (warp % 4) * 16, g_half = (warp / 4) * (BD_COLS / 2);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> pacc[BD_TILES];
#pragma unroll
    for (int ct = 0; ct < BD_TILES; ++ct) wmma::fill_fragment(pacc[ct], 0.f);

    for (int r0 = row_begin; r0 < row_end; r0 += BD_ROWS) {
        __syncthreads();  // the previous sub-tile's readers of t_* and stage are done
        for (int e = tid; e < BD_ROWS * BD_RANKS; e += LR_THREADS) {
            const int rr = e / BD_RANKS, qq = e % BD_RANKS, row = r0 + rr, q = q0 + qq;
            const float tv = (t && row < row_end && q < r) ? t[(size_t)row * r + q] * (u ? u[q] : 1.f) : 0.f;
            const T hi = from_f32<T>(tv);
            t_hi[rr][qq] = hi;
            t_lo[rr][qq] = from_f32<T>(tv - to_f32(hi));
        }
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> gacc;
        wmma::fill_fragment(gacc, 0.f);
#pragma unroll
        for (int ct = 0; ct < BD_TILES; ++ct) {
            const int c0 = col_block + ct * BD_COLS;
            __syncthreads();
#pragma unroll 4
            for (int e = tid; e < BD_ROWS * BD_COLS; e += LR_THREADS) {
                const int rr = e / BD_COLS, cc = e % BD_COLS, row = r0 + rr, col = c0 + cc;
                dys[rr][cc] = (row < row_end && col < N) ? dy[(size_t)row * N + col] : zero;
            }
            if (want_g) {
#pragma unroll 2
                for (int e = tid; e < BD_RANKS * BD_COLS; e += LR_THREADS) {
                    const int cc = e / BD_RANKS, qq = e % BD_RANKS, q = q0 + qq, col = c0 + cc;
                    const float bv = (q < r && col < N) ? B[(size_t)col * r + q] * (v ? v[col] : 1.f) : 0.f;
                    const T hi = from_f32<T>(bv);
                    b_hi[qq][cc] = hi;
                    b_lo[qq][cc] = from_f32<T>(bv - to_f32(hi));
                }
            }
            __syncthreads();
            if (want_g) {
#pragma unroll
                for (int kk = 0; kk < BD_COLS / 2; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fh, fl;
                    wmma::load_matrix_sync(fa, &dys[g_rows][g_half + kk], TB_LD);
                    // (col, q) lives at b_*[q][col]: column-major with ld TB_LD.
                    wmma::load_matrix_sync(fh, &b_hi[0][g_half + kk], TB_LD);
                    wmma::load_matrix_sync(fl, &b_lo[0][g_half + kk], TB_LD);
                    wmma::mma_sync(gacc, fa, fh, gacc);
                    wmma::mma_sync(gacc, fa, fl, gacc);
                }
            }
            if (want_p) {
#pragma unroll
                for (int kr = 0; kr < BD_ROWS; kr += 16) {
                    // dyᵀ: (col, row) lives at dys[row][col]: column-major.
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fh, fl;
                    wmma::load_matrix_sync(fa, &dys[kr][warp * 16], TB_LD);
                    wmma::load_matrix_sync(fh, &t_hi[kr][0], TB_TLD);
                    wmma::load_matrix_sync(fl, &t_lo[kr][0], TB_TLD);
                    wmma::mma_sync(pacc[ct], fa, fh, pacc[ct]);
                    wmma::mma_sync(pacc[ct], fa, fl, pacc[ct]);
                }
            }
        }
        if (want_g) {
            wmma::store_matrix_sync(&stage[warp][0][0], gacc, 20, wmma::mem_row_major);
            __syncthreads();
            for (int e = tid; e < BD_ROWS * BD_RANKS; e += LR_THREADS) {
                const int rr = e / BD_RANKS, qq = e % BD_RANKS, row = r0 + rr, q = q0 + qq;
                const int w = rr / 16;  // rows 16w.. come from warps w and w + 4
                if (row < row_end && q < r)
                    gpart[((size_t)blockIdx.x * M + row) * r + q] = stage[w][rr % 16][qq] + stage[w + 4][rr % 16][qq];
            }
        }
    }
    if (!want_p) return;
    __syncthreads();  // stage is free
#pragma unroll
    for (int ct = 0; ct < BD_TILES; ++ct) {
        wmma::store_matrix_sync(&stage[warp][0][0], pacc[ct], 20, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 16 * 16; e += 32) {
            const int i = e % 16, j = e / 16;  // column i, rank j: columns fastest
            const int col = col_block + ct * BD_COLS + warp * 16 + i, q = q0 + j;
            if (col < N && q < r) ppart[((size_t)blockIdx.y * r + q) * N + col] = stage[warp][i][j];
        }
        __syncwarp();
    }
}

#define LOWRANK_BWD_TC_KERNEL(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(LR_THREADS, 2) lowrank_backward_dy_tc_##SUFFIX(       \
        const T* __restrict__ dy, const float* __restrict__ t, const float* __restrict__ B,             \
        const float* __restrict__ u, const float* __restrict__ v, float* __restrict__ gpart,            \
        float* __restrict__ ppart, int M, int N, int r, int rows_per_block) {                           \
        backward_dy_tc_impl<T>(dy, t, B, u, v, gpart, ppart, M, N, r, rows_per_block);                  \
    }
LOWRANK_BWD_TC_KERNEL(f16, __half)
LOWRANK_BWD_TC_KERNEL(bf16, __nv_bfloat16)

// The CUDA-core pass serves f32 dy only (16-bit dy takes the tensor cores).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_backward_dy_f32(const float* __restrict__ dy, const float* __restrict__ t, const float* __restrict__ B,
                            const float* __restrict__ u, const float* __restrict__ v, float* __restrict__ gpart,
                            float* __restrict__ ppart, int M, int N, int r, int rows_per_block) {
    backward_dy_impl<float>(dy, t, B, u, v, gpart, ppart, M, N, r, rows_per_block);
}

// Per row: gB = Σ_part gpart (fixed order); dS = s·gB⊙u written in T for
// the cuBLAS GEMMs (null: not wanted); du partial Σ_rows t⊙gB per block
// into dupart[block][q] (null: not wanted). Thread = (rank q, row lane);
// 256/r rows in flight.
template <typename T>
__device__ void backward_rows_impl(const float* __restrict__ gpart, int nparts, const float* __restrict__ t,
                                   const float* __restrict__ u, float scale, T* __restrict__ ds,
                                   float* __restrict__ dupart, int M, int r, int rows_per_block) {
    __shared__ float red[LR_THREADS];
    const int lanes = LR_THREADS / r;
    const int q = threadIdx.x % r, lr = threadIdx.x / r;
    const int row_begin = blockIdx.x * rows_per_block;
    const int row_end = min(M, row_begin + rows_per_block);
    const float uq = u ? u[q] : 1.f;
    float du = 0.f;
    if (lr < lanes) {
        for (int row = row_begin + lr; row < row_end; row += lanes) {
            float g = 0.f;
            for (int p = 0; p < nparts; ++p) g += gpart[((size_t)p * M + row) * r + q];
            if (ds) ds[(size_t)row * r + q] = from_f32<T>(scale * g * uq);
            if (dupart) du += t[(size_t)row * r + q] * g;
        }
    }
    if (!dupart) return;
    red[threadIdx.x] = lr < lanes ? du : 0.f;
    __syncthreads();
    if ((int)threadIdx.x < r) {
        float s = 0.f;
        for (int l = 0; l < lanes; ++l) s += red[l * r + threadIdx.x];
        dupart[(size_t)blockIdx.x * r + threadIdx.x] = s;
    }
}

// Per column j: P = Σ_stripe ppart (fixed order); dB[j] += s·v_j·P[j];
// dv[j] += s·Σ_q P[j][q]·B[j][q]. Threads j < r also finish du. Any of
// dB, dv, du may be null.
__device__ void backward_cols_impl(const float* __restrict__ ppart, int nparts, const float* __restrict__ B,
                                   const float* __restrict__ v, float scale, float* __restrict__ dB,
                                   float* __restrict__ dv, const float* __restrict__ dupart, int nduparts,
                                   float* __restrict__ du, int N, int r) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < N && ppart) {
        const float vj = v ? v[j] : 1.f;
        float acc = 0.f;
        for (int q = 0; q < r; ++q) {
            float p = 0.f;
            for (int s = 0; s < nparts; ++s) p += ppart[((size_t)s * r + q) * N + j];
            if (dB) dB[(size_t)j * r + q] += scale * vj * p;
            acc += p * B[(size_t)j * r + q];
        }
        if (dv) dv[j] += scale * acc;
    }
    if (du && j < r) {
        float s = 0.f;
        for (int b = 0; b < nduparts; ++b) s += dupart[(size_t)b * r + j];
        du[j] += scale * s;
    }
}

extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_backward_cols(const float* __restrict__ ppart, int nparts, const float* __restrict__ B,
                          const float* __restrict__ v, float scale, float* __restrict__ dB, float* __restrict__ dv,
                          const float* __restrict__ dupart, int nduparts, float* __restrict__ du, int N, int r) {
    backward_cols_impl(ppart, nparts, B, v, scale, dB, dv, dupart, nduparts, du, N, r);
}

#define LOWRANK_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(LR_THREADS)                                               \
        lowrank_cast_##SUFFIX(const float* __restrict__ src, T* __restrict__ dst, size_t n) {              \
        cast_impl<T>(src, dst, n);                                                                         \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_fill_one_##SUFFIX(T* dst, size_t n) { \
        fill_one_impl<T>(dst, n);                                                                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS)                                               \
        lowrank_fill_bias_##SUFFIX(const T* __restrict__ bias, T* __restrict__ y, int M, int N) {          \
        fill_bias_impl<T>(bias, y, M, N);                                                                  \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_shrink_finish_##SUFFIX(              \
        const float* part, int splits, const float* __restrict__ u, float scale, float* t,                \
        T* tx, int ld, int bias_col, int M, int r) {                                                       \
        shrink_finish_impl<T>(part, splits, u, scale, t, tx, ld, bias_col, M, r);                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS)                                               \
        lowrank_prep_expand_##SUFFIX(const float* __restrict__ B, const float* __restrict__ v,             \
                                     const T* __restrict__ bias, T* __restrict__ bx, int ld, int N, int r) { \
        prep_expand_impl<T>(B, v, bias, bx, ld, N, r);                                                     \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_decode_##SUFFIX(                     \
        const T* __restrict__ x, const float* __restrict__ A, const float* __restrict__ B,                 \
        const float* __restrict__ u, const float* __restrict__ v, const T* __restrict__ bias, float scale, \
        T* __restrict__ y, float* __restrict__ t_out, float* __restrict__ work, int M, int K, int N, int r, \
        int k_chunk) {                                                                                     \
        decode_impl<T>(x, A, B, u, v, bias, scale, y, t_out, work, M, K, N, r, k_chunk);                   \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_backward_rows_##SUFFIX(              \
        const float* __restrict__ gpart, int nparts, const float* __restrict__ t,                          \
        const float* __restrict__ u, float scale, T* __restrict__ ds, float* __restrict__ dupart, int M,   \
        int r, int rows_per_block) {                                                                       \
        backward_rows_impl<T>(gpart, nparts, t, u, scale, ds, dupart, M, r, rows_per_block);               \
    }

LORAFUSE_FOR_EACH_DTYPE(LOWRANK_KERNELS)
