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
// partials that a small finish kernel sums in a fixed order, so results are
// the same bits on every run.
//
// Forward, caller buffers, M > 32 (prefill / training):
//   lowrank_split         A → A_hi, A_lo in T (r_pad × K_pad, tiny)
//   lowrank_shrink_rRB    t partials = x·Aᵀ per K-split, tensor cores
//                         (f32 x: lowrank_shrink_f32 on CUDA cores)
//   lowrank_shrink_finish t = Σ partials (saved for the backward) and
//                         t' = [s·t⊙u | 1 | 0…] in T, rank padded to ld
//   lowrank_prep_expand   B' = [B⊙v | bias | 0…] in T (N×ld)
//   cuBLAS                y  = t'·B'ᵀ        (β = 0: y written once)
//   cuBLAS                y += x·Wᵀ          (β = 1, in the GEMM epilogue)
// The expand term (and the bias, through the ones column) lands in y before
// the base GEMM, whose epilogue adds it while writing y: no separate
// read-modify-write pass over y for the low-rank term or the bias. What it
// still costs over the base GEMM: one read of x (the shrink), one write of
// y (the expand GEMM) and the β = 1 read of y. The packed layout
// (src/lowrank/packed.rs) removes all three: x and W carry t' and B' in
// spare columns and one GEMM over K + r_pad does everything.
//
// Decode, M ≤ 16: lowrank_decode_fused, one cooperative launch that reads W
// once and writes y once, the low-rank term and the bias riding along (design
// at the kernel). In place of cuBLAS's GEMV plus a second launch.
// Engine add (y already holds x·Wᵀ) and 16 < M ≤ 32: lowrank_decode, one
// cooperative launch: split-K shrink, grid sync, fixed-order reduction, grid
// sync, expand-and-add in place on y (which the base GEMM has written).
//
// Backward, 16-bit dy (f32 dy: lowrank_backward_dy_f32 does both products
// in one CUDA-core pass):
//   lowrank_split         (B⊙v)ᵀ → hi, lo (r_pad × N_pad) and
//                         t⊙u → hi, lo (M_pad × r_pad), tiny
//   lowrank_shrink_rRB    gB partials = dy·(B⊙v) per N-split: the same
//                         kernel as the forward shrink, dy in the role of x
//   lowrank_dy_p_rRB      P partials = dyᵀ·(t⊙u) per row stripe
//   lowrank_backward_rows dS = s·gB⊙u (in T, for the cuBLAS GEMMs) and du
//                         partials Σ t⊙gB: du costs one multiply-add per
//                         element gB already needs
//   lowrank_backward_cols dB += s·v⊙P, dv += s·rowsum(P⊙B): dv reuses the
//                         product dB forms, never the M×N (t⊙u)·Bᵀ
//   cuBLAS                dA += dSᵀ·x, dx = dS·A then dx += dy·W (β = 1,
//                         as in the forward), dW += dyᵀ·x,
//                         dbias += dyᵀ·1
// dy is read twice in the 16-bit backward (gB, then P), each read at
// bandwidth: one fused pass would need either gB or P reduced across warps
// per tile, and the rank-r GEMMs stay on the tensor cores this way for
// every rank (VeRA's r = 256 included: rank blocks of 64 in grid.z).
#include <cooperative_groups.h>
#include <mma.h>

#include "common.cuh"

namespace cg = cooperative_groups;

// LR_THREADS, TC_WARPS, TC_KT, SH_ROWS/RANKS/KT, BD_ROWS/COLS/TILES/RANKS and
// COLS_W, which the launchers size grids with, are in abi.h.

// The block's dynamic shared memory (f32 view). The kernel emulator runs the
// blocks of a cooperative launch at the same time and defines this to give
// each block its own buffer.
#ifndef LOWRANK_DYN_SMEM
#define LOWRANK_DYN_SMEM(name) extern __shared__ __align__(16) float name[]
#endif

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

#define SH_PAD 4     // keeps float4 alignment, spreads rows over banks

// One block: 64 rows × 16 ranks over one K-split. Each thread owns 4 rows ×
// 1 rank and reads float4s along K, so shared-memory loads keep up with the
// FMAs (9 loads per 16 FMAs). Partials go to part[split][row][rank]; with
// one split that is t itself.
template <typename T>
__device__ void shrink_impl(const T* __restrict__ x, int ldx, const float* __restrict__ A,
                            float* __restrict__ part, int M, int K, int r, int k_per_split) {
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
            xs[rr][kk] = (row < M && k < k_end) ? to_f32(x[(size_t)row * ldx + k]) : 0.f;
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

// ---- 16-bit operands on tensor cores --------------------------------------
//
// The f32 factors (A, B⊙v, t⊙u) are split into hi = T(a) and lo = T(a − hi)
// by lowrank_split, and every tile is multiplied by both: products of two
// 16-bit values are exact in f32, so the result keeps ~16 (bf16) or ~22
// (f16) bits of the factor instead of 8 or 11. The doubled tensor-core work
// is free here: these kernels are bound by the read of x or dy.
//
// lowrank_split: out[i][j] = (i < rows && j < cols) ? src(i, j)·cs[j] : 0,
// hi and lo, `ld` wide, `rows_pad` rows; src(i, j) = src[i·cols + j], or
// src[j·rows + i] when `trans` (B is N×r; the shrink wants (B⊙v)ᵀ, r×N).
// The zero padding lets the tensor-core kernels load whole 16×16 fragments
// of the factor straight from global memory (L1/L2-resident: r×K, tiny
// next to x) with no bounds checks.
template <typename T>
__device__ void split_impl(const float* __restrict__ src, int trans, const float* __restrict__ cs,
                           T* __restrict__ hi, T* __restrict__ lo, int rows, int cols, int rows_pad, int ld) {
    const size_t total = (size_t)rows_pad * ld;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(e / ld), j = (int)(e % ld);
        float a = 0.f;
        if (i < rows && j < cols) {
            a = trans ? src[(size_t)j * rows + i] : src[(size_t)i * cols + j];
            if (cs) a *= cs[j];
        }
        const T h = from_f32<T>(a);
        hi[e] = h;
        lo[e] = from_f32<T>(a - to_f32(h));
    }
}

#define TC_THREADS (TC_WARPS * 32)
#define TC_LD (TC_KT + 8)      // x/dy stage row stride: 144 B, a multiple of 16 B

// One 16-byte chunk (8 elements) of row `row_off` at column `col`: a
// single 16-byte load when the chunk is inside [0, col_end) and rows are
// 16-byte aligned (`vec`), element loads zero-filled past the edge
// otherwise, zeros for a row outside the tile (`in_row` false).
template <typename T>
__device__ __forceinline__ uint4 load8(const T* __restrict__ p, size_t row_off, int col, int col_end, bool in_row,
                                       bool vec) {
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (!in_row) return out;
    if (vec && col + 8 <= col_end) return *reinterpret_cast<const uint4*>(p + row_off + col);
    T tmp[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) tmp[e] = (col + e < col_end) ? p[row_off + col + e] : from_f32<T>(0.f);
    memcpy(&out, tmp, sizeof(out));
    return out;
}

// lowrank_shrink_rRB: part[split][row][q] = Σ_{k in split} x[row][k]·A[q][k]
// for RB ranks per block (grid.z walks r in blocks of RB ∈ {16, 32, 64}).
// Also the backward's gB = dy·(B⊙v): dy as x, (B⊙v)ᵀ as A.
//
// Design (H100, 132 SMs): block = 4 independent warps, each owning 16 rows
// of x and the block's K-split; grid = (M/64) × splits × r/RB, with splits
// chosen by the host so that the grid is ≥ 2 waves of resident blocks
// (about 8 per SM) while the partials stay ≤ 1/4 of the bytes of x. Per
// 64-wide step a lane loads four 16-byte chunks of its warp's 16×64 tile
// (2 KiB per warp) into registers for the NEXT step, while the tensor
// cores work on the current one from shared memory: one tile in flight per
// warp, ~16 warps per SM, ~32 KiB of loads in flight per SM. The factor's
// fragments come from the padded hi/lo arrays in global memory (L1 hits:
// the 4 warps of a block read the same ones). Accumulators: RB/16 WMMA
// fragments (8 floats each) per warp: the rank stays in registers.
// Shared memory: 9.2 KiB of x stage + 16×(RB+4) f32 per warp for the
// epilogue: 14 / 18 / 26 KiB for RB = 16 / 32 / 64. ptxas (sm_90a, bf16):
// 64 / 78 / 136 registers, so 8 / 6 / 3 resident blocks per SM (the grid
// is sized for 8; RB = 64 only serves r > 32). No spills.
template <typename T, int RB>
__device__ void shrink_tc_impl(const T* __restrict__ x, int ldx, const T* __restrict__ a_hi,
                               const T* __restrict__ a_lo, int lda, float* __restrict__ part, int M, int K, int r,
                               int k_per_split) {
    using namespace nvcuda;
    __shared__ __align__(32) T xs[TC_WARPS][16][TC_LD];
    __shared__ __align__(32) float stage[TC_WARPS][16][RB + 4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * TC_WARPS + warp) * 16;
    if (row0 >= M) return;  // warps are independent: no block barrier below
    const int q0 = blockIdx.z * RB;
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    const int steps = (k_end - k_begin + TC_KT - 1) / TC_KT;
    const bool vec = (ldx % 8 == 0) && ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
    // Chunk i of this lane: row (lane + 32 i) / 8, columns 8·((lane + 32 i) % 8)..+8.
    uint4 buf[4];
    auto load_step = [&](int s) {
        const int k0 = k_begin + s * TC_KT;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = lane + 32 * i, rr = c / 8, row = row0 + rr;
            buf[i] = load8(x, (size_t)row * ldx, k0 + (c % 8) * 8, k_end, row < M, vec);
        }
    };
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RB / 16];
#pragma unroll
    for (int f = 0; f < RB / 16; ++f) wmma::fill_fragment(acc[f], 0.f);
    load_step(0);
    for (int s = 0; s < steps; ++s) {
        __syncwarp();  // the previous step's fragment loads from xs are done
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = lane + 32 * i;
            *reinterpret_cast<uint4*>(&xs[warp][c / 8][(c % 8) * 8]) = buf[i];
        }
        __syncwarp();
        if (s + 1 < steps) load_step(s + 1);
        const int k0 = k_begin + s * TC_KT;
#pragma unroll
        for (int kk = 0; kk < TC_KT; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fx;
            wmma::load_matrix_sync(fx, &xs[warp][0][kk], TC_LD);
#pragma unroll
            for (int f = 0; f < RB / 16; ++f) {
                // (k, q) lives at a_*[q·lda + k]: column-major K×16.
                const size_t off = (size_t)(q0 + 16 * f) * lda + k0 + kk;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fh, fl;
                wmma::load_matrix_sync(fh, a_hi + off, lda);
                wmma::load_matrix_sync(fl, a_lo + off, lda);
                wmma::mma_sync(acc[f], fx, fh, acc[f]);
                wmma::mma_sync(acc[f], fx, fl, acc[f]);
            }
        }
    }
#pragma unroll
    for (int f = 0; f < RB / 16; ++f)
        wmma::store_matrix_sync(&stage[warp][0][16 * f], acc[f], RB + 4, wmma::mem_row_major);
    __syncwarp();
    const int rq = min(RB, r - q0);
    for (int e = lane; e < 16 * RB; e += 32) {
        const int rr = e / RB, qq = e % RB, row = row0 + rr;
        if (row < M && qq < rq) part[((size_t)blockIdx.y * M + row) * r + q0 + qq] = stage[warp][rr][qq];
    }
}

#define LOWRANK_SHRINK_TC(SUFFIX, T, RB)                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) lowrank_shrink_r##RB##_##SUFFIX(          \
        const T* __restrict__ x, int ldx, const T* __restrict__ a_hi, const T* __restrict__ a_lo,      \
        int lda, float* __restrict__ part, int M, int K, int r, int k_per_split) {                      \
        shrink_tc_impl<T, RB>(x, ldx, a_hi, a_lo, lda, part, M, K, r, k_per_split);                      \
    }

// lowrank_dy_p_rRB: ppart[stripe][q][col] = Σ_{row in stripe} dy[row][col]·tu[row][q],
// tu = t⊙u (hi/lo, M_pad × ld_tu). Design: block = 4 independent warps,
// warp w owns 16·CT columns (CT = 64/RB: 64, 32 or 16 columns, so the
// accumulators are always 4 WMMA fragments = 32 registers) and walks the
// block's row stripe 16 rows at a time, the next 16-row tile loading into
// registers (16-byte chunks) while the current one is multiplied
// (dyᵀ fragments read column-major from the stage: the transpose is free).
// grid = N/(4·16·CT) × stripes × r/RB; the host picks stripes for ≥ 2 waves
// with the partials ≤ 1/4 of the bytes of dy. ptxas (sm_90a, bf16): 96 /
// 95 / 72 registers for RB = 16 / 32 / 64 (the two hi/lo rank fragments
// and CT 16-byte chunks in flight per lane): 5 / 5 / 7 blocks per SM;
// shared memory 14 / 14 / 20 KiB. No spills.
template <typename T, int RB>
__device__ void dy_p_impl(const T* __restrict__ dy, int lddy, const T* __restrict__ tu_hi,
                          const T* __restrict__ tu_lo, int ldt, float* __restrict__ ppart, int M, int N, int r,
                          int rows_per_block) {
    using namespace nvcuda;
    constexpr int CT = 64 / RB;        // 16-column tiles per warp
    constexpr int WC = 16 * CT;        // columns per warp
    constexpr int LD = WC + 8;         // stage row stride (elements)
    constexpr int CHUNKS = CT;         // 16-byte chunks per lane: 16 rows × WC columns = 32·CT chunks
    __shared__ __align__(32) T dys[TC_WARPS][16][LD];
    __shared__ __align__(32) float stage[TC_WARPS][16][RB + 4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col0 = (blockIdx.x * TC_WARPS + warp) * WC;
    if (col0 >= N) return;
    const int q0 = blockIdx.z * RB;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(M, row_begin + rows_per_block);
    const int steps = (row_end - row_begin + 15) / 16;
    const bool vec = (lddy % 8 == 0) && ((reinterpret_cast<uintptr_t>(dy) & 15) == 0);
    // Chunk i of this lane: row (lane + 32 i) / (WC/8), columns 8·((lane + 32 i) % (WC/8))..+8.
    uint4 buf[CHUNKS];
    auto load_step = [&](int s) {
        const int r0 = row_begin + s * 16;
#pragma unroll
        for (int i = 0; i < CHUNKS; ++i) {
            const int c = lane + 32 * i, rr = c / (WC / 8), row = r0 + rr;
            buf[i] = load8(dy, (size_t)row * lddy, col0 + (c % (WC / 8)) * 8, N, row < row_end, vec);
        }
    };
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[CT][RB / 16];
#pragma unroll
    for (int ct = 0; ct < CT; ++ct)
#pragma unroll
        for (int f = 0; f < RB / 16; ++f) wmma::fill_fragment(acc[ct][f], 0.f);
    load_step(0);
    for (int s = 0; s < steps; ++s) {
        __syncwarp();
#pragma unroll
        for (int i = 0; i < CHUNKS; ++i) {
            const int c = lane + 32 * i;
            *reinterpret_cast<uint4*>(&dys[warp][c / (WC / 8)][(c % (WC / 8)) * 8]) = buf[i];
        }
        __syncwarp();
        if (s + 1 < steps) load_step(s + 1);
        const int r0 = row_begin + s * 16;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> th[RB / 16], tl[RB / 16];
#pragma unroll
        for (int f = 0; f < RB / 16; ++f) {
            // (row, q) lives at tu_*[row·ldt + q]: row-major 16×16.
            const size_t off = (size_t)r0 * ldt + q0 + 16 * f;
            wmma::load_matrix_sync(th[f], tu_hi + off, ldt);
            wmma::load_matrix_sync(tl[f], tu_lo + off, ldt);
        }
#pragma unroll
        for (int ct = 0; ct < CT; ++ct) {
            // dyᵀ: (col, row) lives at dys[row][col]: column-major.
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
            wmma::load_matrix_sync(fa, &dys[warp][0][16 * ct], LD);
#pragma unroll
            for (int f = 0; f < RB / 16; ++f) {
                wmma::mma_sync(acc[ct][f], fa, th[f], acc[ct][f]);
                wmma::mma_sync(acc[ct][f], fa, tl[f], acc[ct][f]);
            }
        }
    }
    const int rq = min(RB, r - q0);
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) {
#pragma unroll
        for (int f = 0; f < RB / 16; ++f)
            wmma::store_matrix_sync(&stage[warp][0][16 * f], acc[ct][f], RB + 4, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 16 * RB; e += 32) {
            const int i = e % 16, qq = e / 16;  // columns fastest: coalesced rows of ppart
            const int col = col0 + 16 * ct + i;
            if (col < N && qq < rq) ppart[((size_t)blockIdx.y * r + q0 + qq) * N + col] = stage[warp][i][qq];
        }
        __syncwarp();
    }
}

#define LOWRANK_DY_P_TC(SUFFIX, T, RB)                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) lowrank_dy_p_r##RB##_##SUFFIX(            \
        const T* __restrict__ dy, int lddy, const T* __restrict__ tu_hi, const T* __restrict__ tu_lo,  \
        int ldt, float* __restrict__ ppart, int M, int N, int r, int rows_per_block) {                  \
        dy_p_impl<T, RB>(dy, lddy, tu_hi, tu_lo, ldt, ppart, M, N, r, rows_per_block);                   \
    }

#define LOWRANK_TC_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(LR_THREADS)                                            \
        lowrank_split_##SUFFIX(const float* __restrict__ src, int trans, const float* __restrict__ cs,  \
                               T* __restrict__ hi, T* __restrict__ lo, int rows, int cols, int rows_pad, \
                               int ld) {                                                                \
        split_impl<T>(src, trans, cs, hi, lo, rows, cols, rows_pad, ld);                                \
    }                                                                                                   \
    LOWRANK_SHRINK_TC(SUFFIX, T, 16)                                                                    \
    LOWRANK_SHRINK_TC(SUFFIX, T, 32)                                                                    \
    LOWRANK_SHRINK_TC(SUFFIX, T, 64)                                                                    \
    LOWRANK_DY_P_TC(SUFFIX, T, 16)                                                                      \
    LOWRANK_DY_P_TC(SUFFIX, T, 32)                                                                      \
    LOWRANK_DY_P_TC(SUFFIX, T, 64)
LOWRANK_TC_KERNELS(f16, __half)
LOWRANK_TC_KERNELS(bf16, __nv_bfloat16)

// The CUDA-core shrink serves f32 x only (16-bit x takes the tensor cores).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_shrink_f32(const float* __restrict__ x, int ldx, const float* __restrict__ A, float* __restrict__ part,
                       int M, int K, int r, int k_per_split) {
    shrink_impl<float>(x, ldx, A, part, M, K, r, k_per_split);
}

// t = Σ_split part (fixed order), saved when `t` is non-null; and
// t'[row] = [s·t⊙u | 1 (bias column, when bias_col) | 0…] in T, `ld` wide,
// at row stride `tx_ld` (the expand GEMM's own M×ld operand, or the spare
// columns of a packed x); `tx` null: t only, ld = r. `u` null means ones.
template <typename T>
__device__ void shrink_finish_impl(const float* __restrict__ part, int splits, const float* __restrict__ u,
                                   float scale, float* t, T* tx, int ld, int tx_ld, int bias_col, int M, int r) {
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
        if (tx) tx[(size_t)row * tx_ld + c] = from_f32<T>(out);
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

// ---- packed layout (src/lowrank/packed.rs) --------------------------------

// dst[row][c] = c < cols ? src[row][c] : 0 for c < width, dst rows `ld`
// wide: x or dy into the first columns of a packed buffer (width = cols),
// or dS into a packed dy's spare columns with the padding zeroed (the dx
// GEMM multiplies it by the packed W's zero rows: it must not be NaN).
template <typename T>
__device__ void pack_rows_impl(const T* __restrict__ src, T* __restrict__ dst, int rows, int cols, int width,
                               int ld) {
    const size_t total = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / width;
        const int c = (int)(i % width);
        dst[row * ld + c] = c < cols ? src[row * cols + c] : from_f32<T>(0.f);
    }
}

// The packed weight, (N + p) × (K + p), row stride K + p:
//   rows < N:        [ W (when non-null) | B⊙v | bias (when non-null) | 0… ]
//   rows N..N+r:     [ A                 | 0… ]
//   rows N+r..N+p:   0
// W null: only the adapter's regions are written (after an optimizer step
// the N×K block of W is not touched again). One flattened index walks the
// three regions: N·p spare columns, p·(K + p) extra rows, then N·K of W.
template <typename T>
__device__ void pack_weight_impl(const T* __restrict__ W, const T* __restrict__ bias, const float* __restrict__ A,
                                 const float* __restrict__ B, const float* __restrict__ v, T* __restrict__ out, int N,
                                 int K, int r, int p) {
    const size_t ld = (size_t)K + p;
    const size_t spare = (size_t)N * p, extra = (size_t)p * ld, base = W ? (size_t)N * K : 0;
    const size_t total = spare + extra + base;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        if (i < spare) {
            const int j = (int)(i / p), c = (int)(i % p);
            float o = 0.f;
            if (c < r) o = B[(size_t)j * r + c] * (v ? v[j] : 1.f);
            else if (c == r && bias) o = to_f32(bias[j]);
            out[j * ld + K + c] = from_f32<T>(o);
        } else if (i < spare + extra) {
            const size_t e = i - spare;
            const int q = (int)(e / ld), c = (int)(e % ld);
            const float o = (q < r && c < K) ? A[(size_t)q * K + c] : 0.f;
            out[(N + q) * ld + c] = from_f32<T>(o);
        } else {
            const size_t e = i - spare - extra;
            out[(e / K) * ld + e % K] = W[e];
        }
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
    LOWRANK_DYN_SMEM(tu);  // M·r
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

// ---- fused decode: y = x·Wᵀ + bias + v⊙(s·((x·Aᵀ)⊙u)·Bᵀ), M ≤ 16 --------
//
// Decode is a GEMV: the time is the read of W (4096² bf16 = 32 MiB, ~11 µs
// at the H100's ~3 TB/s). cuBLAS's GEMV plus a second launch for the
// low-rank term pays a launch, a read-modify-write of y and the barriers of
// its own; here the rank-r term rides along in one cooperative launch:
//
//   phase 1  split-K shrink: unit (K-slice p, rank q) per warp of the grid
//            (warp 0 of every block first), lanes stride K in 8-element chunks; part[p][m][q] (f32, fixed
//            order: lane-ordered sums then warp_sum). A is read once.
//   phase 2  each block walks its 16-column tiles of y (tile = block,
//            block + grid, …). A warp owns every 8th 32-wide K step of the
//            tile; per step a lane loads one 16-byte chunk of W (8
//            elements of one row) per 8-column half, and the x chunks of
//            rows g and g + 8 (L1/L2-resident: x is ≤ 16 rows). DEC_UNROLL
//            steps are loaded before any is used: 8 × 16 B of W in flight
//            per lane, 32 KiB per block.
//            16-bit T: mma.m16n8k16 with x as A (rows ≥ M are zeros: M = 1
//            uses 1/16 of the tensor cores, which still leaves them far
//            ahead of the memory). The lane's 16-byte chunk holds k
//            8t..8t+7 of its row; the first mma takes k 8t+{0,1,2,3} as its
//            logical k {2t, 2t+1, 2t+8, 2t+9} and the second 8t+{4..7}, for
//            A and B alike, so both mmas together sum over all 32 k of the
//            step (a permutation of the reduction index is free) and every
//            fragment register comes straight from a 16-byte load.
//            f32: CUDA cores, per lane 16 rows × 2 columns of partial dot
//            products over its chunk, summed over the 4 lanes of a row by
//            shuffles.
//   sync     at the end of the block's FIRST tile: cg grid sync, then the
//            block sums the shrink partials (fixed order over p) into
//            t' = s·t⊙u in shared memory; block 0 saves t for the backward.
//            Placed after a tile's W stream, so the barrier waits behind
//            memory traffic instead of in front of it.
//   epilogue per tile: warps' partials summed over warps in fixed order
//            (shared memory), plus bias[n] + v[n]·Σ_q t'[m][q]·B[n][q], one
//            thread per (m, n) of the 16 × 16 tile, y written once in T.
//
// Deterministic: every sum has a fixed order; no atomics.
// Block: 256 threads (8 warps), __launch_bounds__(256, 2): ≤ 128 registers
// so two blocks share an SM (16 warps, 64 KiB of W loads in flight per SM).
// ptxas (sm_90a): 104 registers for f16/bf16, 124 for f32; no spills.
// Shared memory (dynamic): 8 KiB of warp partials + M·r·4 B of t'
// (≤ 16 KiB at M = 16, r = 256). Grid: min(tiles, resident blocks) from the
// occupancy query; 4096 columns are 256 tiles: 2 blocks (16 warps) on 124
// of 132 SMs, one on the rest, all resident at once as the cooperative
// launch requires (so "waves" are the tiles a block walks: one here, 2.6
// at N = 11008). The host picks the shrink slices so that the
// partials each block sums at the sync are ≤ 4096 floats.
// Traffic (estimate): W once + x from L2 once per block (M·K·T per block:
// at M = 16, K = N = 4096 that is 256 × 128 KiB = 32 MiB of L2 reads, as
// much as W from DRAM; L2 has ~2× DRAM's bandwidth) + A, B once.
// DEC_WARPS, DEC_COLS, DEC_MAX_M and DEC_SLICE come from abi.h.
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_KSTEP 32   // k per warp step: 4 lanes × 8 elements of one W row
#define DEC_UNROLL 4   // steps whose loads are issued before the first is used

// Eight consecutive elements of T: one 16-byte chunk for 16-bit T, two for
// f32.
template <typename T> struct Chunk8 {
    uint4 q[sizeof(T) / 2];
};

// Elements k..k+7 of `row` (zeros past `k_end` or when `ok` is false): whole
// 16-byte loads when `vec` (row starts 16-byte aligned) and the chunk is
// inside, element loads at a ragged edge.
template <typename T>
__device__ __forceinline__ Chunk8<T> load_chunk8(const T* __restrict__ row, int k, int k_end, bool ok, bool vec) {
    Chunk8<T> c;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) c.q[i] = make_uint4(0u, 0u, 0u, 0u);
    if (!ok) return c;
    if (vec && k + 8 <= k_end) {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); ++i) c.q[i] = reinterpret_cast<const uint4*>(row + k)[i];
        return c;
    }
    T tmp[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) tmp[e] = (k + e < k_end) ? row[k + e] : from_f32<T>(0.f);
    memcpy(&c, tmp, sizeof(c));
    return c;
}

template <typename T> __device__ __forceinline__ float chunk_elem(const Chunk8<T>& c, int e) {
    T v;
    memcpy(&v, reinterpret_cast<const unsigned char*>(c.q) + e * sizeof(T), sizeof(T));
    return to_f32(v);
}

template <typename T>
__device__ void decode_fused_impl(const T* __restrict__ x, const T* __restrict__ W, const float* __restrict__ A,
                                  const float* __restrict__ B, const float* __restrict__ u,
                                  const float* __restrict__ v, const T* __restrict__ bias, float scale,
                                  T* __restrict__ y, float* __restrict__ t_out, float* __restrict__ part, int M,
                                  int K, int N, int r, int k_slice, int slices) {
    LOWRANK_DYN_SMEM(smem);
    float* red = smem;                                   // [DEC_WARPS][DEC_MAX_M][DEC_COLS]
    float* tu = smem + DEC_WARPS * DEC_MAX_M * DEC_COLS; // [M][r]
    cg::grid_group grid = cg::this_grid();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const bool vec = (K % 8 == 0) && ((reinterpret_cast<uintptr_t>(x) & 15) == 0) &&
                     ((reinterpret_cast<uintptr_t>(W) & 15) == 0);

    // Phase 1: shrink partials, one (slice, rank) unit per warp of the grid,
    // dealt to warp 0 of every block first: a block's W stream waits on at
    // most one of its warps while units < blocks.
    for (int unit = warp * gridDim.x + blockIdx.x; unit < slices * r; unit += gridDim.x * DEC_WARPS) {
        const int p = unit / r, q = unit % r;
        const int k0 = p * k_slice, k1 = min(K, k0 + k_slice);
        float acc[DEC_MAX_M];
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; ++m) acc[m] = 0.f;
        for (int k = k0 + 8 * lane; k < k1; k += 32 * 8) {
            float a[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) a[e] = (k + e < k1) ? A[(size_t)q * K + k + e] : 0.f;
#pragma unroll
            for (int m = 0; m < DEC_MAX_M; ++m) {
                if (m >= M) break;
                const Chunk8<T> c = load_chunk8(x + (size_t)m * K, k, k1, true, vec);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[m] += chunk_elem(c, e) * a[e];
            }
        }
#pragma unroll
        for (int m = 0; m < DEC_MAX_M; ++m) {
            if (m >= M) break;
            const float s = warp_sum(acc[m]);
            if (lane == 0) part[((size_t)p * M + m) * r + q] = s;
        }
    }

    const int tiles = (N + DEC_COLS - 1) / DEC_COLS;
    const int ksteps = (K + DEC_KSTEP - 1) / DEC_KSTEP;
    bool synced = false;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int n0 = tile * DEC_COLS;
        // Phase 2: this warp's share of the 16 × 16 tile of x·Wᵀ.
        const T* wrow[2] = {W + (size_t)(n0 + g) * K, W + (size_t)(n0 + 8 + g) * K};
        const bool wok[2] = {n0 + g < N, n0 + 8 + g < N};
        if constexpr (sizeof(T) == 2) {
            const T* xrow[2] = {x + (size_t)g * K, x + (size_t)(g + 8) * K};
            const bool xok[2] = {g < M, g + 8 < M};
            float acc[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
            for (int s0 = warp; s0 < ksteps; s0 += DEC_WARPS * DEC_UNROLL) {
                Chunk8<T> wc[DEC_UNROLL][2], xc[DEC_UNROLL][2];
#pragma unroll
                for (int uu = 0; uu < DEC_UNROLL; ++uu) {
                    const int s = s0 + uu * DEC_WARPS, k = s * DEC_KSTEP + 8 * t4;
                    const bool in = s < ksteps;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        wc[uu][h] = load_chunk8(wrow[h], k, K, in && wok[h], vec);
                        xc[uu][h] = load_chunk8(xrow[h], k, K, in && xok[h], vec);
                    }
                }
#pragma unroll
                for (int uu = 0; uu < DEC_UNROLL; ++uu) {
                    const uint4 x0 = xc[uu][0].q[0], x1 = xc[uu][1].q[0];
                    const uint32_t a_lo[4] = {x0.x, x1.x, x0.y, x1.y};  // k 8t+0..3
                    const uint32_t a_hi[4] = {x0.z, x1.z, x0.w, x1.w};  // k 8t+4..7
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const uint4 w = wc[uu][j].q[0];
                        mma_16816<T>(acc[j], a_lo, w.x, w.y);
                        mma_16816<T>(acc[j], a_hi, w.z, w.w);
                    }
                }
            }
            // Accumulator: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8.
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    red[(warp * DEC_MAX_M + g + 8 * (i / 2)) * DEC_COLS + 8 * j + 2 * t4 + i % 2] = acc[j][i];
        } else {
            float acc[DEC_MAX_M][2];
#pragma unroll
            for (int m = 0; m < DEC_MAX_M; ++m) acc[m][0] = acc[m][1] = 0.f;
            for (int s = warp; s < ksteps; s += DEC_WARPS) {
                const int k = s * DEC_KSTEP + 8 * t4;
                const Chunk8<T> w0 = load_chunk8(wrow[0], k, K, wok[0], vec);
                const Chunk8<T> w1 = load_chunk8(wrow[1], k, K, wok[1], vec);
#pragma unroll
                for (int m = 0; m < DEC_MAX_M; ++m) {
                    if (m >= M) break;
                    const Chunk8<T> c = load_chunk8(x + (size_t)m * K, k, K, true, vec);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        acc[m][0] += chunk_elem(c, e) * chunk_elem(w0, e);
                        acc[m][1] += chunk_elem(c, e) * chunk_elem(w1, e);
                    }
                }
            }
            // Lanes 4g..4g+3 hold the same columns over different k: sum them.
#pragma unroll
            for (int m = 0; m < DEC_MAX_M; ++m)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    float s = acc[m][j];
                    s += __shfl_xor_sync(0xffffffffu, s, 1);
                    s += __shfl_xor_sync(0xffffffffu, s, 2);
                    if (t4 == 0) red[(warp * DEC_MAX_M + m) * DEC_COLS + 8 * j + g] = s;
                }
        }
        if (!synced) {
            grid.sync();  // every shrink partial is written
            for (int o = threadIdx.x; o < M * r; o += DEC_THREADS) {
                float s = 0.f;
                for (int p = 0; p < slices; ++p) s += part[(size_t)p * M * r + o];
                if (t_out && blockIdx.x == 0) t_out[o] = s;
                tu[o] = scale * s * (u ? u[o % r] : 1.f);
            }
            synced = true;
        }
        __syncthreads();
        // Epilogue: thread (m, c) of the tile.
        const int m = threadIdx.x / DEC_COLS, n = n0 + threadIdx.x % DEC_COLS;
        if (m < M && n < N) {
            float base = 0.f;
#pragma unroll
            for (int w = 0; w < DEC_WARPS; ++w) base += red[(w * DEC_MAX_M + m) * DEC_COLS + threadIdx.x % DEC_COLS];
            float lr = 0.f;
            const float* brow = B + (size_t)n * r;
            for (int q = 0; q < r; ++q) lr += tu[m * r + q] * brow[q];
            const float out = base + (bias ? to_f32(bias[n]) : 0.f) + (v ? v[n] : 1.f) * lr;
            y[(size_t)m * N + n] = from_f32<T>(out);
        }
        __syncthreads();  // red is rewritten by the next tile
    }
    if (!synced) grid.sync();  // a block without a tile still meets the others
}

#define LOWRANK_DECODE_FUSED(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 2) lowrank_decode_fused_##SUFFIX(            \
        const T* __restrict__ x, const T* __restrict__ W, const float* __restrict__ A,                       \
        const float* __restrict__ B, const float* __restrict__ u, const float* __restrict__ v,               \
        const T* __restrict__ bias, float scale, T* __restrict__ y, float* __restrict__ t_out,               \
        float* __restrict__ part, int M, int K, int N, int r, int k_slice, int slices) {                     \
        decode_fused_impl<T>(x, W, A, B, u, v, bias, scale, y, t_out, part, M, K, N, r, k_slice, slices);   \
    }
LORAFUSE_FOR_EACH_DTYPE(LOWRANK_DECODE_FUSED)

// ---- backward ------------------------------------------------------------

// f32 dy only (16-bit dy takes lowrank_shrink_rRB + lowrank_dy_p_rRB).
// One read of dy. Block (x: 512 columns, y: a stripe of rows, z: 16 ranks)
// walks its stripe 64 rows at a time; per 64×128 tile of dy it adds
//   gB[row][q] += Σ_col dy·(v⊙B)   (4 rows × 1 rank per thread, float4s)
//   P[col][q]  += Σ_row dy·(t⊙u)   (8 columns × 1 rank per thread)
// gB is complete over the block's 512 columns when a sub-tile ends and goes
// to gpart[col block][row][q]; P stays in registers over the whole stripe
// and goes to ppart[stripe][q][col]. Either output may be null (not
// wanted): its arithmetic is skipped; `t` may be null when ppart is.
template <typename T>
__device__ void backward_dy_impl(const T* __restrict__ dy, int lddy, const float* __restrict__ t,
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
                dys[rr][cc] = (row < row_end && col < N) ? to_f32(dy[(size_t)row * lddy + col]) : 0.f;
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


// The CUDA-core pass serves f32 dy only (16-bit dy takes the tensor cores).
extern "C" __global__ void __launch_bounds__(LR_THREADS)
    lowrank_backward_dy_f32(const float* __restrict__ dy, int lddy, const float* __restrict__ t,
                            const float* __restrict__ B, const float* __restrict__ u, const float* __restrict__ v,
                            float* __restrict__ gpart, float* __restrict__ ppart, int M, int N, int r,
                            int rows_per_block) {
    backward_dy_impl<float>(dy, lddy, t, B, u, v, gpart, ppart, M, N, r, rows_per_block);
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
// dv[j] += s·Σ_q P[j][q]·B[j][q]. Block = 32 columns × 8 rank groups, so
// the ppart reads are coalesced along columns and r = 256 keeps 256
// threads busy per 32 columns (one thread per column walked all r ranks
// before); dv sums the 8 groups in a fixed order. Block 0 also finishes
// du. Any of dB, dv, du may be null.
#define COLS_G (LR_THREADS / COLS_W)
__device__ void backward_cols_impl(const float* __restrict__ ppart, int nparts, const float* __restrict__ B,
                                   const float* __restrict__ v, float scale, float* __restrict__ dB,
                                   float* __restrict__ dv, const float* __restrict__ dupart, int nduparts,
                                   float* __restrict__ du, int N, int r) {
    __shared__ float red[COLS_G][COLS_W + 1];
    const int cl = threadIdx.x % COLS_W, g = threadIdx.x / COLS_W;
    const int j = blockIdx.x * COLS_W + cl;
    float acc = 0.f;
    if (j < N && ppart) {
        const float vj = v ? v[j] : 1.f;
        for (int q = g; q < r; q += COLS_G) {
            float p = 0.f;
            for (int s = 0; s < nparts; ++s) p += ppart[((size_t)s * r + q) * N + j];
            if (dB) dB[(size_t)j * r + q] += scale * vj * p;
            acc += p * B[(size_t)j * r + q];
        }
    }
    red[g][cl] = acc;
    __syncthreads();
    if (dv && g == 0 && j < N && ppart) {
        float s = 0.f;
#pragma unroll
        for (int h = 0; h < COLS_G; ++h) s += red[h][cl];
        dv[j] += scale * s;
    }
    if (du && blockIdx.x == 0) {
        for (int q = threadIdx.x; q < r; q += blockDim.x) {
            float s = 0.f;
            for (int b = 0; b < nduparts; ++b) s += dupart[(size_t)b * r + q];
            du[q] += scale * s;
        }
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
        T* tx, int ld, int tx_ld, int bias_col, int M, int r) {                                            \
        shrink_finish_impl<T>(part, splits, u, scale, t, tx, ld, tx_ld, bias_col, M, r);                   \
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
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_pack_rows_##SUFFIX(                  \
        const T* __restrict__ src, T* __restrict__ dst, int rows, int cols, int width, int ld) {           \
        pack_rows_impl<T>(src, dst, rows, cols, width, ld);                                                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lowrank_pack_weight_##SUFFIX(                \
        const T* __restrict__ W, const T* __restrict__ bias, const float* __restrict__ A,                  \
        const float* __restrict__ B, const float* __restrict__ v, T* __restrict__ out, int N, int K, int r, \
        int p) {                                                                                           \
        pack_weight_impl<T>(W, bias, A, B, v, out, N, K, r, p);                                            \
    }

LORAFUSE_FOR_EACH_DTYPE(LOWRANK_KERNELS)
