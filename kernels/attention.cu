// Causal multi-head attention in the memory-saving ("flash") form, with
// f32, f16 or bf16 storage and f32 accumulation. Launched by
// src/cuda/attention.rs; the f64 twin is src/cpu/attention.rs.
//
// The forward never writes the batch·heads·seq·seq probabilities: it keeps a
// running max and sum per query (online softmax) and stores only the output
// and one log-sum-exp per query. The backward recomputes each probability as
// exp(s − lse) from the same q·k products, so its memory traffic is qkv, out,
// dout and lse, never seq² per head.
//
// Layouts: qkv rows are [q | k | v] (3·W wide, W = heads·hd), head h in
// columns h·hd..(h+1)·hd of each third; dout rows are W wide, out rows
// out_ld ≥ W apart (a packed attn.c_proj's x_packed, whose spare columns
// the forward leaves alone; W otherwise); dqkv rows dqkv_ld ≥ 3·W apart (a
// packed c_attn's dy_packed, so its backward reads the gradient where the
// attention writes it instead of after a copy; the spare columns are left
// alone; 3·W otherwise); lse and the backward's delta are [batch][head][query].
// Every dqkv store is one element wide, so any dqkv_ld is aligned.
//
// Two kernel sets with the same work split and arguments:
//   f16, bf16: tensor-core kernels (mma.sync m16n8k16, ldmatrix, cp.async;
//              "tensor-core kernels" below), hd buckets 64 and 128;
//   f32:       CUDA-core kernels (f32 FMAs, next section), hd buckets 32,
//              64 and 128.
// Work split (every output element has exactly one writer, and every sum runs
// in a fixed order: no float atomics, so two runs give the same bits):
//   attention_forward[_tc]_hdD_T       block = (batch·head, query tile)
//   attention_backward_delta_T         one warp per query: delta_i = dO_i·O_i
//   attention_backward_dq[_tc]_hdD_T   block = (batch·head, query tile): dQ
//   attention_backward_dkv[_tc]_hdD_T  block = (batch·head, key tile): dK, dV
// D is hd rounded up to a bucket: register tiles need compile-time sizes,
// and padding to the next bucket wastes at most half the work where a single
// 128 instantiation would waste 2× at GPT-2's hd = 64. The dQ pass
// recomputes the scores and dP that the dK/dV pass also computes; the
// alternative, adding dQ partials from every key tile, needs float atomics
// and would make training steps irreproducible.
//
// scripts/kernel-emu runs both sets on the CPU (one OS thread per CUDA
// thread; mma, ldmatrix and cp.async emulated per the PTX ISA's fragment
// layouts) against an f64 reference.
#include "common.cuh"

// ---- CUDA-core kernels (f32) -------------------------------------------------
// Thread layout (all tiled kernels, 128 threads): each warp owns 4·R "rows"
// of the block's tile (queries, or keys in the dK/dV kernel) and splits into
// four groups of 8 lanes; a group owns R consecutive rows, and its 8 lanes
// split the other axis with stride 8 (lane c takes columns c, c+8, ...). Row
// reductions are three xor-shuffles inside the group. Shared tiles are f32
// with a row pitch of D+1 (or C + 8/R for score tiles): the 4 groups read 4
// different rows and the 8 lanes 8 different rows or consecutive columns, and
// these pitches put all of them in different banks.
// ATTN_THREADS is in abi.h.
// Shared memory allows three blocks per SM on H100 (two on A100) at every
// tile size below; asking ptxas for three caps registers at 168, which every
// kernel meets without spilling, instead of its default guess (which spilled
// the hd32 forward at 80 registers).
#define ATTN_MIN_BLOCKS 3
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// AttnArgs, the tile sizes per head-dim bucket (ATTN_HD<D>_*: R rows per
// lane group, so 16·R rows a block, and C columns per streamed tile) and the
// shared-memory formulas are in abi.h; the host reads the launch sizes from
// there too (src/cuda/attention.rs).
template <int D> struct AttnTiles;
#define ATTN_TILES(D)                                                                                  \
    template <> struct AttnTiles<D> {                                                                  \
        enum {                                                                                         \
            FWD_R = ATTN_HD##D##_FWD_R, FWD_C = ATTN_HD##D##_FWD_C, DQ_R = ATTN_HD##D##_DQ_R,          \
            DQ_C = ATTN_HD##D##_DQ_C, DKV_R = ATTN_HD##D##_DKV_R, DKV_C = ATTN_HD##D##_DKV_C           \
        };                                                                                             \
    };
ATTN_TILES(32)
ATTN_TILES(64)
ATTN_TILES(128)

// Dynamic shared memory (in floats) each kernel carves up; the kernels trap
// if launched with less.
template <int D, int R, int C> constexpr uint32_t fwd_smem_floats() { return ATTN_FWD_SMEM_FLOATS(D, R, C); }
template <int D, int R, int C> constexpr uint32_t dq_smem_floats() { return ATTN_DQ_SMEM_FLOATS(D, R, C); }
template <int D, int R, int C> constexpr uint32_t dkv_smem_floats() { return ATTN_DKV_SMEM_FLOATS(D, R, C); }

__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
#ifdef __CUDA_ARCH__
    uint32_t r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#else
    return 0xffffffffu;
#endif
}

// A launch with too little shared memory would read and write past the
// carve-up silently; stop it loudly instead.
__device__ __forceinline__ void require_smem(uint32_t floats) {
    if (dynamic_smem_bytes() < floats * 4u) __trap();
}

// Reductions over the 8 lanes of a group (lanes differ in their low 3 bits).
__device__ __forceinline__ float group_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
}
__device__ __forceinline__ float group_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v + __shfl_xor_sync(0xffffffffu, v, 1);
}

// Copies rows row0..row0+ROWS of one head (hd contiguous elements per row,
// rows `stride` elements apart) into shared memory as f32 with pitch LD.
// Dims ≥ hd and rows ≥ seq become 0: the dot products then run over the
// padded D without a bound check, and masked probabilities (exactly 0) never
// meet an uninitialised NaN. Consecutive threads take consecutive dims, so a
// warp reads whole row segments.
template <int ROWS, int D, int LD, typename T>
__device__ __forceinline__ void stage(float* __restrict__ dst, const T* __restrict__ src, uint64_t stride,
                                      int row0, int seq, int hd) {
    static_assert(ROWS * D % ATTN_THREADS == 0, "tile must split evenly over the block");
#pragma unroll 4
    for (int it = 0; it < ROWS * D / ATTN_THREADS; ++it) {
        const int idx = it * ATTN_THREADS + threadIdx.x;
        const int r = idx / D, d = idx % D, t = row0 + r;
        float v = 0.0f;
        if (t < seq && d < hd) v = to_f32(src[(uint64_t)t * stride + d]);
        dst[r * LD + d] = v;
    }
}

// The reverse of `stage`: rows < seq and dims < hd of a shared f32 tile go
// to global memory as T. Staging the results through shared memory makes
// these stores whole row segments instead of 8-element pieces of 4 rows.
template <int ROWS, int D, int LD, typename T>
__device__ __forceinline__ void unstage(T* __restrict__ dst, const float* __restrict__ src, uint64_t stride,
                                        int row0, int seq, int hd) {
#pragma unroll 4
    for (int it = 0; it < ROWS * D / ATTN_THREADS; ++it) {
        const int idx = it * ATTN_THREADS + threadIdx.x;
        const int r = idx / D, d = idx % D, t = row0 + r;
        if (t < seq && d < hd) dst[(uint64_t)t * stride + d] = from_f32<T>(src[r * LD + d]);
    }
}

// ---- forward ---------------------------------------------------------------
// One block per (batch·head, query tile). Q stays in shared memory; K and V
// tiles stream through it up to the diagonal. Each query's running max m
// (log2 units), sum l and output row live in registers, so scores exist only
// one C-wide tile at a time and the softmax never takes a second pass.
template <typename T, int D, int R, int C>
__device__ __forceinline__ void attn_forward(const T* __restrict__ qkv, const AttnArgs a, T* __restrict__ out,
                                             uint32_t out_ld, float* __restrict__ lse) {
    constexpr int BR = 16 * R, DL = D / 8, CL = C / 8;
    constexpr int LDQ = D + 1, LDK = D + 1, LDV = D, LDP = C + 8 / R;
    extern __shared__ float attn_smem[];
    require_smem(fwd_smem_floats<D, R, C>());
    float* Qs = attn_smem;
    float* Ks = Qs + BR * LDQ;
    float* Vs = Ks + C * LDK;
    float* Ps = Vs + C * LDV;

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    // Query tile t costs t+1 key tiles: launch the longest ones first so the
    // short ones fill the tail of the grid.
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BR;
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + (uint64_t)h * hd;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;

    const int lane = threadIdx.x % 32, cg = lane % 8;
    const int r0 = (threadIdx.x / 32) * 4 * R + (lane / 8) * R;

    stage<BR, D, LDQ>(Qs, q_src, w3, q0, seq, hd);

    float m[R], l[R], o[R][DL];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < DL; ++e) o[i][e] = 0.0f;
    }

    const int hd4 = (hd + 3) & ~3;
    const int n_kt = (min(q0 + BR, seq) - 1) / C + 1;  // key tiles up to the tile's last query
    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * C;
        __syncthreads();  // the previous tile's K/V/P reads are done
        stage<C, D, LDK>(Ks, k_src, w3, k0, seq, hd);
        stage<C, D, LDV>(Vs, v_src, w3, k0, seq, hd);
        __syncthreads();

        float s[R][CL];
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int k = 0; k < CL; ++k) s[i][k] = 0.0f;
        for (int d0 = 0; d0 < hd4; d0 += 4) {
#pragma unroll
            for (int dd = 0; dd < 4; ++dd) {
                const int d = d0 + dd;
                float qv[R], kv[CL];
#pragma unroll
                for (int i = 0; i < R; ++i) qv[i] = Qs[(r0 + i) * LDQ + d];
#pragma unroll
                for (int k = 0; k < CL; ++k) kv[k] = Ks[(cg + 8 * k) * LDK + d];
#pragma unroll
                for (int i = 0; i < R; ++i)
#pragma unroll
                    for (int k = 0; k < CL; ++k) s[i][k] = fmaf(qv[i], kv[k], s[i][k]);
            }
        }

        // Online softmax. Tile 0 holds key 0 ≤ every query, so after it each
        // row max is finite and exp2(m_old − m_new) never sees −inf − (−inf).
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int qi = q0 + r0 + i;
            float mx = -INFINITY;
#pragma unroll
            for (int k = 0; k < CL; ++k) {
                s[i][k] = k0 + cg + 8 * k <= qi ? s[i][k] * a.scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[i][k]);
            }
            const float m_new = fmaxf(m[i], group_max(mx));
            const float alpha = exp2f(m[i] - m_new);
            m[i] = m_new;
            l[i] *= alpha;  // per-lane partial sums: reduced once, after the loop
#pragma unroll
            for (int e = 0; e < DL; ++e) o[i][e] *= alpha;
#pragma unroll
            for (int k = 0; k < CL; ++k) {
                const float p = exp2f(s[i][k] - m_new);
                l[i] += p;
                Ps[(r0 + i) * LDP + cg + 8 * k] = p;
            }
        }
        __syncwarp();  // a group reads back only its own rows of Ps

#pragma unroll 4
        for (int j = 0; j < C; ++j) {
            float pv[R], vv[DL];
#pragma unroll
            for (int i = 0; i < R; ++i) pv[i] = Ps[(r0 + i) * LDP + j];
#pragma unroll
            for (int e = 0; e < DL; ++e) vv[e] = Vs[j * LDV + cg + 8 * e];
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int e = 0; e < DL; ++e) o[i][e] = fmaf(pv[i], vv[e], o[i][e]);
        }
    }

    __syncthreads();  // every warp is done with Qs: reuse it for the output
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const float sum = group_sum(l[i]);
        const float inv = 1.0f / sum;
#pragma unroll
        for (int e = 0; e < DL; ++e) Qs[(r0 + i) * LDQ + cg + 8 * e] = o[i][e] * inv;
        const int qi = q0 + r0 + i;
        if (cg == 0 && qi < seq) lse[(uint64_t)bh * seq + qi] = (m[i] + log2f(sum)) * ATTN_LN2;
    }
    __syncthreads();
    unstage<BR, D, LDQ>(out + (uint64_t)b * seq * out_ld + (uint64_t)h * hd, Qs, out_ld, q0, seq, hd);
}

// ---- backward --------------------------------------------------------------
// With P = exp(s − lse), dP = dO·Vᵀ and delta_i = dO_i·O_i (= Σ_j P_ij·dP_ij):
// dS = P ⊙ (dP − delta), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.

// delta_i once per query, so neither tiled kernel re-reads O. O's rows lie
// out_ld ≥ W apart: a packed attn.c_proj keeps the attention output only in
// its x_packed (src/train/model.rs), so the backward reads it there.
template <typename T>
__device__ __forceinline__ void attn_backward_delta(const T* __restrict__ dout, const T* __restrict__ out,
                                                    uint32_t out_ld, const AttnArgs a, float* __restrict__ delta) {
    const uint64_t rows = (uint64_t)a.batch * a.heads * a.seq;
    const uint64_t row = blockIdx.x * (uint64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;  // uniform per warp: the shuffles below stay converged
    const uint64_t i = row % a.seq, bh = row / a.seq, b = bh / a.heads, h = bh % a.heads;
    const uint64_t off = (b * a.seq + i) * a.heads * a.hd + h * a.hd;
    const uint64_t o_off = (b * a.seq + i) * out_ld + h * a.hd;
    float sum = 0.0f;
    for (uint32_t d = lane; d < a.hd; d += 32) sum = fmaf(to_f32(dout[off + d]), to_f32(out[o_off + d]), sum);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

// dQ: one block per (batch·head, query tile), the key tiles up to the
// diagonal summed in order inside the block. This recomputes P and dP that
// the dK/dV kernel also computes; the alternative, accumulating dQ across
// key-tile blocks, needs float atomics and would make steps irreproducible.
// Both backward kernels recompute, for this lane's R rows (r0 + i) and CL
// columns (cg + 8k) of the tile, the scores s = a_row · b_col and the
// softmax-input gradients dp = c_row · e_col over the head dimension: the
// dQ kernel with rows = queries (a = Q, c = dO, b = K, e = V), the dK/dV
// kernel transposed (rows = keys). One loop over d feeds both products, so
// each shared-memory load is used R or CL times.
template <int R, int CL, int LD>
__device__ __forceinline__ void score_and_dp(const float* __restrict__ a, const float* __restrict__ c,
                                             const float* __restrict__ b, const float* __restrict__ e, int r0,
                                             int cg, int hd4, float (&s)[R][CL], float (&dp)[R][CL]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int k = 0; k < CL; ++k) s[i][k] = dp[i][k] = 0.0f;
    for (int d0 = 0; d0 < hd4; d0 += 4) {
#pragma unroll
        for (int dd = 0; dd < 4; ++dd) {
            const int d = d0 + dd;
            float av[R], cv[R], bv[CL], ev[CL];
#pragma unroll
            for (int i = 0; i < R; ++i) {
                av[i] = a[(r0 + i) * LD + d];
                cv[i] = c[(r0 + i) * LD + d];
            }
#pragma unroll
            for (int k = 0; k < CL; ++k) {
                bv[k] = b[(cg + 8 * k) * LD + d];
                ev[k] = e[(cg + 8 * k) * LD + d];
            }
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int k = 0; k < CL; ++k) {
                    s[i][k] = fmaf(av[i], bv[k], s[i][k]);
                    dp[i][k] = fmaf(cv[i], ev[k], dp[i][k]);
                }
        }
    }
}

template <typename T, int D, int R, int C>
__device__ __forceinline__ void attn_backward_dq(const T* __restrict__ dout, const T* __restrict__ qkv,
                                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                                 const AttnArgs a, T* __restrict__ dqkv, uint32_t dqkv_ld) {
    constexpr int BR = 16 * R, DL = D / 8, CL = C / 8;
    constexpr int LD = D + 1, LDS = C + 8 / R;
    extern __shared__ float attn_smem[];
    require_smem(dq_smem_floats<D, R, C>());
    float* Qs = attn_smem;
    float* dOs = Qs + BR * LD;
    float* Ks = dOs + BR * LD;
    float* Vs = Ks + C * LD;
    float* dSs = Vs + C * LD;

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BR;  // longest tiles first
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w;
    const uint64_t head_off = (uint64_t)h * hd;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + head_off;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;

    const int lane = threadIdx.x % 32, cg = lane % 8;
    const int r0 = (threadIdx.x / 32) * 4 * R + (lane / 8) * R;

    stage<BR, D, LD>(Qs, q_src, w3, q0, seq, hd);
    stage<BR, D, LD>(dOs, dout + (uint64_t)b * seq * w + head_off, w, q0, seq, hd);

    float lse2[R], dl[R], acc[R][DL];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int qi = q0 + r0 + i;
        lse2[i] = qi < seq ? lse[(uint64_t)bh * seq + qi] * ATTN_LOG2E : 0.0f;
        dl[i] = qi < seq ? delta[(uint64_t)bh * seq + qi] : 0.0f;
#pragma unroll
        for (int e = 0; e < DL; ++e) acc[i][e] = 0.0f;
    }

    const int hd4 = (hd + 3) & ~3;
    const int n_kt = (min(q0 + BR, seq) - 1) / C + 1;
    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * C;
        __syncthreads();
        stage<C, D, LD>(Ks, k_src, w3, k0, seq, hd);
        stage<C, D, LD>(Vs, v_src, w3, k0, seq, hd);
        __syncthreads();

        float s[R][CL], dp[R][CL];
        score_and_dp<R, CL, LD>(Qs, dOs, Ks, Vs, r0, cg, hd4, s, dp);

#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int qi = q0 + r0 + i;
#pragma unroll
            for (int k = 0; k < CL; ++k) {
                // A select, not a multiply by a 0/1 mask: exp2 of a masked
                // score may overflow, and inf·0 would be NaN.
                const float p = k0 + cg + 8 * k <= qi ? exp2f(fmaf(s[i][k], a.scale_log2, -lse2[i])) : 0.0f;
                dSs[(r0 + i) * LDS + cg + 8 * k] = p * (dp[i][k] - dl[i]);
            }
        }
        __syncwarp();

#pragma unroll 4
        for (int j = 0; j < C; ++j) {
            float dsv[R], kv[DL];
#pragma unroll
            for (int i = 0; i < R; ++i) dsv[i] = dSs[(r0 + i) * LDS + j];
#pragma unroll
            for (int e = 0; e < DL; ++e) kv[e] = Ks[j * LD + cg + 8 * e];
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int e = 0; e < DL; ++e) acc[i][e] = fmaf(dsv[i], kv[e], acc[i][e]);
        }
    }

    __syncthreads();
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < DL; ++e) Qs[(r0 + i) * LD + cg + 8 * e] = acc[i][e] * a.scale;
    __syncthreads();
    unstage<BR, D, LD>(dqkv + (uint64_t)b * seq * dqkv_ld + head_off, Qs, dqkv_ld, q0, seq, hd);
}

// dK and dV: one block per (batch·head, key tile). K_j and V_j stay in shared
// memory while every query tile from the diagonal on streams past; P and dS
// are recomputed per tile and consumed at once, so dK and dV accumulate in
// registers and are written once.
template <typename T, int D, int R, int C>
__device__ __forceinline__ void attn_backward_dkv(const T* __restrict__ dout, const T* __restrict__ qkv,
                                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                                  const AttnArgs a, T* __restrict__ dqkv, uint32_t dqkv_ld) {
    constexpr int BK = 16 * R, DL = D / 8, CL = C / 8;
    constexpr int LD = D + 1, LDS = C + 8 / R;
    extern __shared__ float attn_smem[];
    require_smem(dkv_smem_floats<D, R, C>());
    float* Ks = attn_smem;
    float* Vs = Ks + BK * LD;
    float* Qs = Vs + BK * LD;
    float* dOs = Qs + C * LD;
    float* Ls = dOs + C * LD;  // lse·log2(e) of the tile's queries
    float* Dls = Ls + C;       // delta of the tile's queries
    float* Ps = Dls + C;
    float* dSs = Ps + BK * LDS;

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    // Key tile j sees every query tile from j on: the first ones are the
    // longest and are launched first.
    const int k0 = (int)blockIdx.y * BK;
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w;
    const uint64_t head_off = (uint64_t)h * hd;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + head_off;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;
    const T* do_src = dout + (uint64_t)b * seq * w + head_off;
    const uint64_t lse_off = (uint64_t)bh * seq;

    const int lane = threadIdx.x % 32, cg = lane % 8;
    const int r0 = (threadIdx.x / 32) * 4 * R + (lane / 8) * R;

    stage<BK, D, LD>(Ks, k_src, w3, k0, seq, hd);
    stage<BK, D, LD>(Vs, v_src, w3, k0, seq, hd);

    float dk[R][DL], dv[R][DL];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < DL; ++e) dk[i][e] = dv[i][e] = 0.0f;

    const int hd4 = (hd + 3) & ~3;
    const int n_qt = (seq + C - 1) / C;
    for (int qt = k0 / C; qt < n_qt; ++qt) {
        const int qs0 = qt * C;
        __syncthreads();
        stage<C, D, LD>(Qs, q_src, w3, qs0, seq, hd);
        stage<C, D, LD>(dOs, do_src, w, qs0, seq, hd);
        if (threadIdx.x < C) {
            const int q = qs0 + threadIdx.x;
            Ls[threadIdx.x] = q < seq ? lse[lse_off + q] * ATTN_LOG2E : 0.0f;
            Dls[threadIdx.x] = q < seq ? delta[lse_off + q] : 0.0f;
        }
        __syncthreads();

        // Sᵀ and dPᵀ for this lane's R keys × C/8 queries.
        float s[R][CL], dp[R][CL];
        score_and_dp<R, CL, LD>(Ks, Vs, Qs, dOs, r0, cg, hd4, s, dp);

#pragma unroll
        for (int k = 0; k < CL; ++k) {
            const int c = cg + 8 * k, q = qs0 + c;
            const float l2 = Ls[c], dl = Dls[c];
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const int key = k0 + r0 + i;
                // Queries past seq are zero-padded rows: mask them, don't
                // trust their (zero) lse.
                const float p = (key <= q && q < seq) ? exp2f(fmaf(s[i][k], a.scale_log2, -l2)) : 0.0f;
                Ps[(r0 + i) * LDS + c] = p;
                dSs[(r0 + i) * LDS + c] = p * (dp[i][k] - dl);
            }
        }
        __syncwarp();

#pragma unroll 2
        for (int c = 0; c < C; ++c) {
            float pv[R], dsv[R], ov[DL], qv[DL];
#pragma unroll
            for (int i = 0; i < R; ++i) {
                pv[i] = Ps[(r0 + i) * LDS + c];
                dsv[i] = dSs[(r0 + i) * LDS + c];
            }
#pragma unroll
            for (int e = 0; e < DL; ++e) {
                ov[e] = dOs[c * LD + cg + 8 * e];
                qv[e] = Qs[c * LD + cg + 8 * e];
            }
#pragma unroll
            for (int i = 0; i < R; ++i)
#pragma unroll
                for (int e = 0; e < DL; ++e) {
                    dv[i][e] = fmaf(pv[i], ov[e], dv[i][e]);
                    dk[i][e] = fmaf(dsv[i], qv[e], dk[i][e]);
                }
        }
    }

    __syncthreads();
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < DL; ++e) {
            Ks[(r0 + i) * LD + cg + 8 * e] = dk[i][e] * a.scale;
            Vs[(r0 + i) * LD + cg + 8 * e] = dv[i][e];
        }
    __syncthreads();
    T* dst = dqkv + (uint64_t)b * seq * dqkv_ld + head_off;
    unstage<BK, D, LD>(dst + w, Ks, dqkv_ld, k0, seq, hd);
    unstage<BK, D, LD>(dst + 2 * w, Vs, dqkv_ld, k0, seq, hd);
}

// ---- tensor-core kernels (f16, bf16) ----------------------------------------
// FlashAttention-2's design on mma.sync m16n8k16 (f32 accumulate). A block
// is 4 warps; each warp owns 16 rows of the block's 64-row tile (queries, or
// keys in the dK/dV kernel), so its products are 16 × n strips whose
// accumulators stay in registers: the online softmax of the forward works
// on S in place, and P (or dS), packed to 16 bits, is the A fragment of
// the next product as it stands (see the layouts in common.cuh). Operands
// come from shared memory through ldmatrix; the streamed tiles are double
// buffered with cp.async, so the next tile loads while this one computes.
//
// Shared tiles are 16-bit, row pitch D + 8 elements: 16 bytes per row of
// padding move each of ldmatrix's 8 row addresses to a different group of
// 4 banks, so every ldmatrix phase is conflict free. D is the head-dim
// bucket (64 for hd ≤ 64, else 128); dims hd..D are zero-filled, so the
// padded products add exact zeros. Rows past seq are zero-filled too, and
// are masked (keys) or never stored (queries).
//
// Tiles (rows per block × streamed columns), chosen per bucket so the
// accumulators fit in registers without spills; the streamed tile shrinks
// at D = 128, where each 16 × D accumulator takes 64 registers per lane:
//                                 shared memory    registers (sm_80 / sm_90a)
//   forward  64 queries × 64 keys      46 / 87 KB   165 / 162 (D 64)  234 / 241 (D 128)
//   dQ       64 queries × 64|32 keys   55 / 70 KB   167 / 167         208 / 234
//   dK, dV   64 keys × 64|32 queries   56 / 70 KB   222 / 224         244 / 255
// Designed occupancy on H100 (64K registers, 227 KB shared memory per SM):
// 3 blocks (12 warps) per SM for the D = 64 forward and dQ (registers capped
// at 168 by __launch_bounds__), 2 blocks (8 warps) for the rest. On A100
// (164 KB) shared memory allows 2 blocks for the D = 64 dQ and 1 for the
// D = 128 forward. No spills and no stack frame (scripts/check-kernels.sh;
// its report is in target/ptxas/). FlashAttention-2 runs 4-8 warps per SM
// at these shapes: each warp's mma chain has enough independent
// accumulators to keep the tensor cores busy without more.
//
// Causality: a query tile stops at the diagonal key tile (forward, dQ); a
// key tile starts at the diagonal query tile (dK/dV); only tiles that
// straddle the diagonal or the sequence end evaluate the mask.
// ATTN_TC_THREADS and ATTN_TC_ROWS are in abi.h.
// Blocks per SM the forward and dQ kernels are compiled for (caps registers
// at 65536 / (128 · blocks), rounded down to 8): 3 at D = 64 (≤ 168), 2 at
// D = 128 (≤ 255). The dK/dV kernel holds two D-wide accumulators and is
// compiled for 2 at both (at 168 it spills on sm_80).
#define ATTN_TC_MIN_BLOCKS(D) ((D) == 64 ? 3 : 2)

template <int D> struct AttnTcTiles {
    enum { FWD_C = ATTN_TC_FWD_C(D), DQ_C = ATTN_TC_DQ_C(D), DKV_C = ATTN_TC_DKV_C(D) };
};

// Shared memory in bytes (abi.h; the host launches with the same sizes).
template <int D> constexpr uint32_t tc_fwd_smem() { return ATTN_TC_FWD_SMEM(D); }
template <int D> constexpr uint32_t tc_dq_smem() { return ATTN_TC_DQ_SMEM(D); }
template <int D> constexpr uint32_t tc_dkv_smem() { return ATTN_TC_DKV_SMEM(D); }

// Loads rows row0..row0+ROWS of one head (hd elements per row, rows
// `stride` apart) into a shared tile with pitch D + 8, zero-filling dims
// ≥ hd and rows ≥ seq. `vec`: 16-byte cp.async copies (needs hd % 8 == 0
// and a 16-byte aligned base, checked by the caller); otherwise element by
// element through registers (synchronous). Consecutive threads take
// consecutive 16-byte chunks of a row, so a warp reads whole row segments.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void tc_load_tile(T* __restrict__ dst, const T* __restrict__ src, uint64_t stride,
                                             int row0, int seq, int hd, bool vec) {
    constexpr int LD = D + 8, CH = D / 8;
    static_assert(ROWS * CH % ATTN_TC_THREADS == 0, "tile must split evenly over the block");
    if (vec) {
#pragma unroll
        for (int it = 0; it < ROWS * CH / ATTN_TC_THREADS; ++it) {
            const int idx = it * ATTN_TC_THREADS + threadIdx.x;
            const int r = idx / CH, c = idx % CH, t = row0 + r;
            const bool in = t < seq && c * 8 < hd;
            // A skipped copy reads nothing; keep its address in bounds anyway.
            cp_async_16(dst + r * LD + c * 8, in ? src + (uint64_t)t * stride + c * 8 : src, in);
        }
    } else {
        const T zero = from_f32<T>(0.0f);
        for (int idx = threadIdx.x; idx < ROWS * D; idx += ATTN_TC_THREADS) {
            const int r = idx / D, d = idx % D, t = row0 + r;
            dst[r * LD + d] = t < seq && d < hd ? src[(uint64_t)t * stride + d] : zero;
        }
    }
}

// acc[n] (16 × 8 tiles n = 0..N8-1) += A · Bᵀ over K = D, where A is the
// warp's 16 rows of a shared tile (pitch LD) and B the N8·8 rows of another:
// S = Q·Kᵀ, dP = dO·Vᵀ and their transposes. The B rows are the n index,
// so a plain ldmatrix of B's rows gives the col-major B fragment.
template <typename T, int D, int N8>
__device__ __forceinline__ void tc_mma_abt(float (&acc)[N8][4], const T* a_rows, const T* b_rows, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, a_rows + (lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int j = 0; j < N8 / 2; ++j) {
            uint32_t b[4];
            ldmatrix_x4(b, b_rows + (j * 16 + lane % 8 + (lane / 16) * 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
            mma_16816<T>(acc[2 * j], a, b[0], b[1]);
            mma_16816<T>(acc[2 * j + 1], a, b[2], b[3]);
        }
    }
}

// acc[n] (16 × D) += P · B where P is a 16 × K accumulator tile set (K8
// tiles of 8 columns, f32, packed to T here) and B a K × D shared tile
// (pitch LD), row-major: O += P·V, dQ += dS·K, dV += Pᵀ·dO, dK += dSᵀ·Q.
// ldmatrix.trans turns B's rows into the col-major B fragment.
template <typename T, int D, int K8>
__device__ __forceinline__ void tc_mma_pb(float (&acc)[D / 8][4], const float (&p)[K8][4], const T* b, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int kk = 0; kk < K8 / 2; ++kk) {
        const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                               pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, b + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LD + n * 16 + (lane / 16) * 8);
            mma_16816<T>(acc[2 * n], a, bf[0], bf[1]);
            mma_16816<T>(acc[2 * n + 1], a, bf[2], bf[3]);
        }
    }
}

// Writes a warp's 16 × D accumulator tile (times `mul`) as rows row0.. of
// `dst` (rows `stride` apart), dims < hd and rows < seq only.
template <typename T, int D>
__device__ __forceinline__ void tc_store_rows(T* __restrict__ dst, const float (&acc)[D / 8][4], float mul_lo,
                                              float mul_hi, uint64_t stride, int row0, int seq, int hd, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + g + 8 * (i / 2), d = n * 8 + 2 * t + i % 2;
            if (r < seq && d < hd) dst[(uint64_t)r * stride + d] = from_f32<T>(acc[n][i] * (i < 2 ? mul_lo : mul_hi));
        }
    }
}

// Whether global tiles of this head can move by 16-byte cp.async: every row
// start is then 16-byte aligned.
template <typename T> __device__ __forceinline__ bool tc_vec_ok(const void* p, const void* q, int hd) {
    return hd % (16 / sizeof(T)) == 0 && ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(q)) % 16) == 0;
}

// Forward: block = (batch·head, 64-query tile), K/V tiles of 64 keys
// streamed through two buffers. Per warp and row: running max m (log2
// units), per-lane partial sum l, and the 16 × D output in registers.
template <typename T, int D>
__device__ __forceinline__ void attn_forward_tc(const T* __restrict__ qkv, const AttnArgs a, T* __restrict__ out,
                                                uint32_t out_ld, float* __restrict__ lse) {
    constexpr int BR = ATTN_TC_ROWS, BC = AttnTcTiles<D>::FWD_C, LD = D + 8, N8 = BC / 8;
    extern __shared__ float attn_smem[];
    require_smem(tc_fwd_smem<D>() / 4);
    T* Qs = reinterpret_cast<T*>(attn_smem);
    T* Ks = Qs + BR * LD;     // two buffers of BC rows
    T* Vs = Ks + 2 * BC * LD; // two buffers of BC rows

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BR;  // longest tiles first
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + (uint64_t)h * hd;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;
    const bool vec = tc_vec_ok<T>(qkv, qkv, hd);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;

    const int n_kt = (min(q0 + BR, seq) - 1) / BC + 1;
    tc_load_tile<BR, D>(Qs, q_src, w3, q0, seq, hd, vec);
    tc_load_tile<BC, D>(Ks, k_src, w3, 0, seq, hd, vec);
    tc_load_tile<BC, D>(Vs, v_src, w3, 0, seq, hd, vec);
    cp_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC, buf = kt & 1;
        if (kt + 1 < n_kt) {
            tc_load_tile<BC, D>(Ks + (buf ^ 1) * BC * LD, k_src, w3, k0 + BC, seq, hd, vec);
            tc_load_tile<BC, D>(Vs + (buf ^ 1) * BC * LD, v_src, w3, k0 + BC, seq, hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[N8][4];
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
        tc_mma_abt<T, D, N8>(s, Qs + warp * 16 * LD, Ks + buf * BC * LD, lane);

        // Scores to log2 units; keys after the query (which covers keys
        // past seq for every stored query) get -inf. Tile 0 holds key 0 ≤
        // every query, so m is finite from then on and exp2(m_old − m_new)
        // never meets −inf − (−inf).
        const bool diag = k0 + BC - 1 > q0 + warp * 16;
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + j * 8 + 2 * (lane % 4) + i % 2, row = i < 2 ? row_lo : row_hi;
                s[j][i] = diag && key > row ? -INFINITY : s[j][i] * a.scale_log2;
                if (i < 2) mx_lo = fmaxf(mx_lo, s[j][i]);
                else mx_hi = fmaxf(mx_hi, s[j][i]);
            }
        // A row's 8·N8 scores are spread over the 4 lanes of a quad.
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float al_lo = exp2f(m_lo - mn_lo), al_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= al_lo;
        l_hi *= al_hi;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= al_lo;
            o[n][1] *= al_lo;
            o[n][2] *= al_hi;
            o[n][3] *= al_hi;
        }
#pragma unroll
        for (int j = 0; j < N8; ++j) {
            s[j][0] = exp2f(s[j][0] - mn_lo);
            s[j][1] = exp2f(s[j][1] - mn_lo);
            s[j][2] = exp2f(s[j][2] - mn_hi);
            s[j][3] = exp2f(s[j][3] - mn_hi);
            l_lo += s[j][0] + s[j][1];
            l_hi += s[j][2] + s[j][3];
        }
        tc_mma_pb<T, D, N8>(o, s, Vs + buf * BC * LD, lane);
        __syncthreads();  // the next iteration refills this buffer
    }

    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    T* o_dst = out + (uint64_t)b * seq * out_ld + (uint64_t)h * hd;
    tc_store_rows<T, D>(o_dst, o, 1.0f / l_lo, 1.0f / l_hi, out_ld, q0 + warp * 16, seq, hd, lane);
    if (lane % 4 == 0) {
        if (row_lo < seq) lse[(uint64_t)bh * seq + row_lo] = (m_lo + log2f(l_lo)) * ATTN_LN2;
        if (row_hi < seq) lse[(uint64_t)bh * seq + row_hi] = (m_hi + log2f(l_hi)) * ATTN_LN2;
    }
}

// dQ: block = (batch·head, 64-query tile); Q and dO stay in shared memory,
// K/V tiles stream past up to the diagonal. Per tile: S = Q·Kᵀ and
// dP = dO·Vᵀ, P = exp2(S·scale·log2e − lse·log2e), dS = P ⊙ (dP − delta),
// dQ += dS·K; dQ is scaled once at the end.
template <typename T, int D>
__device__ __forceinline__ void attn_backward_dq_tc(const T* __restrict__ dout, const T* __restrict__ qkv,
                                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                                    const AttnArgs a, T* __restrict__ dqkv, uint32_t dqkv_ld) {
    constexpr int BR = ATTN_TC_ROWS, BC = AttnTcTiles<D>::DQ_C, LD = D + 8, N8 = BC / 8;
    extern __shared__ float attn_smem[];
    require_smem(tc_dq_smem<D>() / 4);
    T* Qs = reinterpret_cast<T*>(attn_smem);
    T* dOs = Qs + BR * LD;
    T* Ks = dOs + BR * LD;     // two buffers
    T* Vs = Ks + 2 * BC * LD;  // two buffers

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BR;
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w, head_off = (uint64_t)h * hd;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + head_off;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;
    const T* do_src = dout + (uint64_t)b * seq * w + head_off;
    const bool vec = tc_vec_ok<T>(qkv, dout, hd);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
    const float l2_lo = row_lo < seq ? lse[(uint64_t)bh * seq + row_lo] * ATTN_LOG2E : 0.0f;
    const float l2_hi = row_hi < seq ? lse[(uint64_t)bh * seq + row_hi] * ATTN_LOG2E : 0.0f;
    const float dl_lo = row_lo < seq ? delta[(uint64_t)bh * seq + row_lo] : 0.0f;
    const float dl_hi = row_hi < seq ? delta[(uint64_t)bh * seq + row_hi] : 0.0f;

    const int n_kt = (min(q0 + BR, seq) - 1) / BC + 1;
    tc_load_tile<BR, D>(Qs, q_src, w3, q0, seq, hd, vec);
    tc_load_tile<BR, D>(dOs, do_src, w, q0, seq, hd, vec);
    tc_load_tile<BC, D>(Ks, k_src, w3, 0, seq, hd, vec);
    tc_load_tile<BC, D>(Vs, v_src, w3, 0, seq, hd, vec);
    cp_async_commit();

    float dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dq[n][i] = 0.0f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC, buf = kt & 1;
        if (kt + 1 < n_kt) {
            tc_load_tile<BC, D>(Ks + (buf ^ 1) * BC * LD, k_src, w3, k0 + BC, seq, hd, vec);
            tc_load_tile<BC, D>(Vs + (buf ^ 1) * BC * LD, v_src, w3, k0 + BC, seq, hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[N8][4], dp[N8][4];
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.0f;
        tc_mma_abt<T, D, N8>(s, Qs + warp * 16 * LD, Ks + buf * BC * LD, lane);
        tc_mma_abt<T, D, N8>(dp, dOs + warp * 16 * LD, Vs + buf * BC * LD, lane);

        const bool diag = k0 + BC - 1 > q0 + warp * 16;
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + j * 8 + 2 * (lane % 4) + i % 2, row = i < 2 ? row_lo : row_hi;
                // A select, not a multiply by a 0/1 mask: exp2 of a masked
                // score may overflow, and inf·0 would be NaN.
                const float p =
                    diag && key > row ? 0.0f : exp2f(fmaf(s[j][i], a.scale_log2, -(i < 2 ? l2_lo : l2_hi)));
                s[j][i] = p * (dp[j][i] - (i < 2 ? dl_lo : dl_hi));  // dS
            }
        tc_mma_pb<T, D, N8>(dq, s, Ks + buf * BC * LD, lane);
        __syncthreads();
    }
    tc_store_rows<T, D>(dqkv + (uint64_t)b * seq * dqkv_ld + head_off, dq, a.scale, a.scale, dqkv_ld, q0 + warp * 16,
                        seq, hd, lane);
}

// dK and dV: block = (batch·head, 64-key tile); K and V stay in shared
// memory, query tiles stream past from the diagonal on, each with its lse
// and delta. The warp computes the transposed products (rows = its 16
// keys): Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, then dV += Pᵀ·dO and dK += dSᵀ·Q.
template <typename T, int D>
__device__ __forceinline__ void attn_backward_dkv_tc(const T* __restrict__ dout, const T* __restrict__ qkv,
                                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                                     const AttnArgs a, T* __restrict__ dqkv, uint32_t dqkv_ld) {
    constexpr int BK = ATTN_TC_ROWS, BQ = AttnTcTiles<D>::DKV_C, LD = D + 8, N8 = BQ / 8;
    extern __shared__ float attn_smem[];
    require_smem(tc_dkv_smem<D>() / 4);
    T* Ks = reinterpret_cast<T*>(attn_smem);
    T* Vs = Ks + BK * LD;
    T* Qs = Vs + BK * LD;        // two buffers
    T* dOs = Qs + 2 * BQ * LD;   // two buffers
    float* Ls = reinterpret_cast<float*>(dOs + 2 * BQ * LD);  // two buffers of lse·log2(e)
    float* Dls = Ls + 2 * BQ;                                 // two buffers of delta

    const int seq = (int)a.seq, hd = (int)a.hd;
    const uint32_t bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
    const int k0 = (int)blockIdx.y * BK;  // the first key tiles see the most queries: launched first
    const uint64_t w = (uint64_t)a.heads * hd, w3 = 3 * w, head_off = (uint64_t)h * hd;
    const T* q_src = qkv + (uint64_t)b * seq * w3 + head_off;
    const T* k_src = q_src + w;
    const T* v_src = q_src + 2 * w;
    const T* do_src = dout + (uint64_t)b * seq * w + head_off;
    const uint64_t lse_off = (uint64_t)bh * seq;
    const bool vec = tc_vec_ok<T>(qkv, dout, hd);

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int key_lo = k0 + warp * 16 + g, key_hi = key_lo + 8;

    // Query rows past seq get lse = +inf, so P = exp2(−inf) = 0 there.
    auto load_q_tile = [&](int qs0, int buf) {
        tc_load_tile<BQ, D>(Qs + buf * BQ * LD, q_src, w3, qs0, seq, hd, vec);
        tc_load_tile<BQ, D>(dOs + buf * BQ * LD, do_src, w, qs0, seq, hd, vec);
        if (threadIdx.x < BQ) {
            const int q = qs0 + threadIdx.x;
            Ls[buf * BQ + threadIdx.x] = q < seq ? lse[lse_off + q] * ATTN_LOG2E : INFINITY;
            Dls[buf * BQ + threadIdx.x] = q < seq ? delta[lse_off + q] : 0.0f;
        }
    };

    const int qt0 = k0 / BQ, n_qt = (seq + BQ - 1) / BQ;
    tc_load_tile<BK, D>(Ks, k_src, w3, k0, seq, hd, vec);
    tc_load_tile<BK, D>(Vs, v_src, w3, k0, seq, hd, vec);
    load_q_tile(qt0 * BQ, 0);
    cp_async_commit();

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.0f;

    for (int qt = qt0; qt < n_qt; ++qt) {
        const int qs0 = qt * BQ, buf = (qt - qt0) & 1;
        if (qt + 1 < n_qt) {
            load_q_tile(qs0 + BQ, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[N8][4], dp[N8][4];
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.0f;
        tc_mma_abt<T, D, N8>(s, Ks + warp * 16 * LD, Qs + buf * BQ * LD, lane);
        tc_mma_abt<T, D, N8>(dp, Vs + warp * 16 * LD, dOs + buf * BQ * LD, lane);

        const bool diag = qs0 < k0 + warp * 16 + 15;
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = j * 8 + 2 * (lane % 4) + i % 2, key = i < 2 ? key_lo : key_hi;
                const float p =
                    diag && key > qs0 + c ? 0.0f : exp2f(fmaf(s[j][i], a.scale_log2, -Ls[buf * BQ + c]));
                s[j][i] = p;                                     // Pᵀ
                dp[j][i] = p * (dp[j][i] - Dls[buf * BQ + c]);  // dSᵀ
            }
        tc_mma_pb<T, D, N8>(dv, s, dOs + buf * BQ * LD, lane);
        tc_mma_pb<T, D, N8>(dk, dp, Qs + buf * BQ * LD, lane);
        __syncthreads();
    }
    T* dst = dqkv + (uint64_t)b * seq * dqkv_ld + head_off;
    tc_store_rows<T, D>(dst + w, dk, a.scale, a.scale, dqkv_ld, k0 + warp * 16, seq, hd, lane);
    tc_store_rows<T, D>(dst + 2 * w, dv, 1.0f, 1.0f, dqkv_ld, k0 + warp * 16, seq, hd, lane);
}

// ---- exported kernels ------------------------------------------------------

#define ATTN_BACKWARD_ARGS(T)                                                              \
    const T *__restrict__ dout, const T *__restrict__ qkv, const float *__restrict__ lse, \
        const float *__restrict__ delta, AttnArgs a, T *__restrict__ dqkv, uint32_t dqkv_ld

#define ATTN_HD_KERNELS(SUF, T, HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_forward_hd##HD##_##SUF(const T* __restrict__ qkv, AttnArgs a, T* __restrict__ out,  \
                                         uint32_t out_ld, float* __restrict__ lse) {                  \
        attn_forward<T, HD, AttnTiles<HD>::FWD_R, AttnTiles<HD>::FWD_C>(qkv, a, out, out_ld, lse);    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_backward_dq_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                                 \
        attn_backward_dq<T, HD, AttnTiles<HD>::DQ_R, AttnTiles<HD>::DQ_C>(dout, qkv, lse, delta, a,   \
                                                                          dqkv, dqkv_ld);             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_backward_dkv_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                                \
        attn_backward_dkv<T, HD, AttnTiles<HD>::DKV_R, AttnTiles<HD>::DKV_C>(dout, qkv, lse, delta, a, \
                                                                             dqkv, dqkv_ld);          \
    }

#define ATTN_TC_HD_KERNELS(SUF, T, HD)                                                                \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS, ATTN_TC_MIN_BLOCKS(HD))                                     \
        attention_forward_tc_hd##HD##_##SUF(const T* __restrict__ qkv, AttnArgs a, T* __restrict__ out, \
                                            uint32_t out_ld, float* __restrict__ lse) {               \
        attn_forward_tc<T, HD>(qkv, a, out, out_ld, lse);                                             \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS, ATTN_TC_MIN_BLOCKS(HD))                                     \
        attention_backward_dq_tc_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                              \
        attn_backward_dq_tc<T, HD>(dout, qkv, lse, delta, a, dqkv, dqkv_ld);                          \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_TC_THREADS, 2)                                                              \
        attention_backward_dkv_tc_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                             \
        attn_backward_dkv_tc<T, HD>(dout, qkv, lse, delta, a, dqkv, dqkv_ld);                         \
    }

// Every dtype: the delta pre-pass. f32: the CUDA-core kernels (hd buckets
// 32/64/128). f16, bf16: the tensor-core kernels (buckets 64/128).
#define ATTN_DELTA_KERNEL(SUF, T)                                                                    \
    extern "C" __global__ void attention_backward_delta_##SUF(const T* __restrict__ dout,           \
                                                              const T* __restrict__ out,            \
                                                              uint32_t out_ld, AttnArgs a,          \
                                                              float* __restrict__ delta) {           \
        attn_backward_delta<T>(dout, out, out_ld, a, delta);                                         \
    }
LORAFUSE_FOR_EACH_DTYPE(ATTN_DELTA_KERNEL)

ATTN_HD_KERNELS(f32, float, 32)
ATTN_HD_KERNELS(f32, float, 64)
ATTN_HD_KERNELS(f32, float, 128)

ATTN_TC_HD_KERNELS(f16, __half, 64)
ATTN_TC_HD_KERNELS(f16, __half, 128)
ATTN_TC_HD_KERNELS(bf16, __nv_bfloat16, 64)
ATTN_TC_HD_KERNELS(bf16, __nv_bfloat16, 128)
