// Causal multi-head attention in the memory-saving ("flash") form, generic
// over the storage type (f32, f16, bf16; all arithmetic f32). Launched by
// src/cuda/attention.rs; the f64 twin is src/cpu/attention.rs.
//
// The forward never writes the batch·heads·seq·seq probabilities: it keeps a
// running max and sum per query (online softmax) and stores only the output
// and one log-sum-exp per query. The backward recomputes each probability as
// exp(s − lse) from the same q·k products, so its memory traffic is qkv, out,
// dout and lse, never seq² per head.
//
// Layouts: qkv rows are [q | k | v] (3·W wide, W = heads·hd), head h in
// columns h·hd..(h+1)·hd of each third; out/dout rows are W wide; lse and the
// backward's delta are [batch][head][query].
//
// Work split (every output element has exactly one writer, and every sum runs
// in a fixed order: no float atomics, so two runs give the same bits):
//   attention_forward_hdD_T       block = (batch·head, tile of 16·R queries)
//   attention_backward_delta_T    one warp per query: delta_i = dO_i·O_i
//   attention_backward_dq_hdD_T   block = (batch·head, query tile): dQ
//   attention_backward_dkv_hdD_T  block = (batch·head, key tile): dK, dV
// D is hd rounded up to 32, 64 or 128: register tiles need compile-time
// sizes, and padding to the next bucket wastes at most half the FMAs where a
// single 128 instantiation would waste 2× at GPT-2's hd = 64.
//
// Thread layout (all tiled kernels, 128 threads): each warp owns 4·R "rows"
// of the block's tile (queries, or keys in the dK/dV kernel) and splits into
// four groups of 8 lanes; a group owns R consecutive rows, and its 8 lanes
// split the other axis with stride 8 (lane c takes columns c, c+8, ...). Row
// reductions are three xor-shuffles inside the group. Shared tiles are f32
// with a row pitch of D+1 (or C + 8/R for score tiles): the 4 groups read 4
// different rows and the 8 lanes 8 different rows or consecutive columns, and
// these pitches put all of them in different banks.
//
// scripts/kernel-emu runs these kernels on the CPU (one OS thread per CUDA
// thread) against an f64 reference, so their indexing can be checked on a
// machine without a GPU.
#include "common.cuh"

#define ATTN_THREADS 128
// Shared memory allows three blocks per SM on H100 (two on A100) at every
// tile size below; asking ptxas for three caps registers at 168, which every
// kernel meets without spilling, instead of its default guess (which spilled
// the hd32 forward at 80 registers).
#define ATTN_MIN_BLOCKS 3
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Mirrors `struct AttnArgs` in src/cuda/attention.rs.
struct AttnArgs {
    uint32_t batch, seq, heads, hd;
    float scale;       // 1/sqrt(hd)
    float scale_log2;  // scale·log2(e): scores go straight into exp2
};

// Tile sizes per head-dim bucket: R rows per lane group (tile = 16·R rows),
// C columns per streamed tile. Mirrored by `tiles()` in src/cuda/attention.rs.
// Chosen so accumulators + score tiles stay well under 255 registers and the
// shared tiles allow 2-3 blocks per SM on A100/H100.
template <int D> struct AttnTiles;
template <> struct AttnTiles<32> {
    enum { FWD_R = 4, FWD_C = 64, DQ_R = 4, DQ_C = 64, DKV_R = 4, DKV_C = 64 };
};
template <> struct AttnTiles<64> {
    enum { FWD_R = 4, FWD_C = 64, DQ_R = 4, DQ_C = 32, DKV_R = 4, DKV_C = 32 };
};
template <> struct AttnTiles<128> {
    enum { FWD_R = 4, FWD_C = 32, DQ_R = 2, DQ_C = 32, DKV_R = 2, DKV_C = 32 };
};

// Dynamic shared memory (in floats) each kernel carves up; the host mirrors
// these formulas and the kernels trap if launched with less.
template <int D, int R, int C> constexpr uint32_t fwd_smem_floats() {
    return 16 * R * (D + 1) + C * (D + 1) + C * D + 16 * R * (C + 8 / R);
}
template <int D, int R, int C> constexpr uint32_t dq_smem_floats() {
    return 2 * 16 * R * (D + 1) + 2 * C * (D + 1) + 16 * R * (C + 8 / R);
}
template <int D, int R, int C> constexpr uint32_t dkv_smem_floats() {
    return 2 * 16 * R * (D + 1) + 2 * C * (D + 1) + 2 * C + 2 * 16 * R * (C + 8 / R);
}

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
                                             float* __restrict__ lse) {
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
    unstage<BR, D, LDQ>(out + (uint64_t)b * seq * w + (uint64_t)h * hd, Qs, w, q0, seq, hd);
}

// ---- backward --------------------------------------------------------------
// With P = exp(s − lse), dP = dO·Vᵀ and delta_i = dO_i·O_i (= Σ_j P_ij·dP_ij):
// dS = P ⊙ (dP − delta), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.

// delta_i once per query, so neither tiled kernel re-reads O.
template <typename T>
__device__ __forceinline__ void attn_backward_delta(const T* __restrict__ dout, const T* __restrict__ out,
                                                    const AttnArgs a, float* __restrict__ delta) {
    const uint64_t rows = (uint64_t)a.batch * a.heads * a.seq;
    const uint64_t row = blockIdx.x * (uint64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;  // uniform per warp: the shuffles below stay converged
    const uint64_t i = row % a.seq, bh = row / a.seq, b = bh / a.heads, h = bh % a.heads;
    const uint64_t off = (b * a.seq + i) * a.heads * a.hd + h * a.hd;
    float sum = 0.0f;
    for (uint32_t d = lane; d < a.hd; d += 32) sum = fmaf(to_f32(dout[off + d]), to_f32(out[off + d]), sum);
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
                                                 const AttnArgs a, T* __restrict__ dqkv) {
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
    unstage<BR, D, LD>(dqkv + (uint64_t)b * seq * w3 + head_off, Qs, w3, q0, seq, hd);
}

// dK and dV: one block per (batch·head, key tile). K_j and V_j stay in shared
// memory while every query tile from the diagonal on streams past; P and dS
// are recomputed per tile and consumed at once, so dK and dV accumulate in
// registers and are written once.
template <typename T, int D, int R, int C>
__device__ __forceinline__ void attn_backward_dkv(const T* __restrict__ dout, const T* __restrict__ qkv,
                                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                                  const AttnArgs a, T* __restrict__ dqkv) {
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
    T* dst = dqkv + (uint64_t)b * seq * w3 + head_off;
    unstage<BK, D, LD>(dst + w, Ks, w3, k0, seq, hd);
    unstage<BK, D, LD>(dst + 2 * w, Vs, w3, k0, seq, hd);
}

// ---- exported kernels ------------------------------------------------------

#define ATTN_BACKWARD_ARGS(T)                                                              \
    const T *__restrict__ dout, const T *__restrict__ qkv, const float *__restrict__ lse, \
        const float *__restrict__ delta, AttnArgs a, T *__restrict__ dqkv

#define ATTN_HD_KERNELS(SUF, T, HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_forward_hd##HD##_##SUF(const T* __restrict__ qkv, AttnArgs a, T* __restrict__ out,  \
                                         float* __restrict__ lse) {                                   \
        attn_forward<T, HD, AttnTiles<HD>::FWD_R, AttnTiles<HD>::FWD_C>(qkv, a, out, lse);            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_backward_dq_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                                 \
        attn_backward_dq<T, HD, AttnTiles<HD>::DQ_R, AttnTiles<HD>::DQ_C>(dout, qkv, lse, delta, a,   \
                                                                          dqkv);                      \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_MIN_BLOCKS)                       \
        attention_backward_dkv_hd##HD##_##SUF(ATTN_BACKWARD_ARGS(T)) {                                \
        attn_backward_dkv<T, HD, AttnTiles<HD>::DKV_R, AttnTiles<HD>::DKV_C>(dout, qkv, lse, delta, a, \
                                                                             dqkv);                   \
    }

#define ATTN_KERNELS(SUF, T)                                                                         \
    extern "C" __global__ void attention_backward_delta_##SUF(const T* __restrict__ dout,           \
                                                              const T* __restrict__ out, AttnArgs a, \
                                                              float* __restrict__ delta) {           \
        attn_backward_delta<T>(dout, out, a, delta);                                                 \
    }                                                                                                \
    ATTN_HD_KERNELS(SUF, T, 32)                                                                      \
    ATTN_HD_KERNELS(SUF, T, 64)                                                                      \
    ATTN_HD_KERNELS(SUF, T, 128)

LORAFUSE_FOR_EACH_DTYPE(ATTN_KERNELS)
