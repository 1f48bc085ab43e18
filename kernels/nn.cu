// The trainer's non-GEMM ops (crate::nn::NnOps) in mixed
// precision: T (f32, f16 or bf16) is the compute dtype of every activation
// that feeds or leaves a GEMM; the residual stream, its gradient, LayerNorm
// statistics, parameter gradients and optimizer state are f32, and all
// arithmetic is f32. The CPU twin is src/cpu/nn.rs; the wrappers are
// src/cuda/nn.rs; attention has its own family (kernels/attention.cu).
// Every reduction runs in a fixed order: no float atomics, so a training
// step gives the same bits on every run. scripts/kernel-emu runs these
// kernels on the CPU (one OS thread per CUDA thread) against f64 references.
//
// Nearly all of these kernels are memory-bound: each states the bytes it
// moves per element, and benches/train.rs times them against that floor at
// the copy bandwidth. They move 16-byte packs (`Pack`) where the buffers
// allow, keep a LayerNorm row in registers instead of re-reading it, fuse
// the residual add into the LayerNorm after it, read the LM head's logits
// once per pass in the cross-entropy (padded vocabulary: pad columns are
// masked), and update or norm every trainable tensor in one launch.
#include "common.cuh"

// TRAIN_THREADS, CE_THREADS and the AdamW argument structs are in abi.h.
#define WARPS_PER_BLOCK (TRAIN_THREADS / 32)

#define GRID_STRIDE(i, n)                                                    \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < (n); \
         i += (uint64_t)gridDim.x * blockDim.x)

// N elements of T loaded or stored as one access (16 bytes when N·sizeof(T)
// is 16): the memory-bound kernels move whole 16-byte sectors per
// instruction, as the LSU and DRAM want them.
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
    T v[N];
};

__device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Where element i of a rows × cols matrix lies when its rows are ld apart:
// the packed layout's x_packed / dy_packed (src/lowrank/packed.rs), whose
// spare columns a producer writing there directly must leave alone. With
// ld == cols (every unpacked caller) it is i, with no division.
__device__ __forceinline__ uint64_t strided(uint64_t i, uint64_t cols, uint64_t ld) {
    return ld == cols ? i : i / cols * ld + i % cols;
}

// The 16-byte pack path of an elementwise kernel writing rows ld apart
// holds when whole packs never straddle a row: contiguous, or cols and ld
// multiples of the pack (p a multiple of 8 gives that for 16-bit T; for
// f32 the wrapper's ld decides, else the element loop runs).
__device__ __forceinline__ bool packs_fit(uint64_t cols, uint64_t ld, uint64_t pack) {
    return ld == cols || (cols % pack == 0 && ld % pack == 0);
}

// ---- embedding -----------------------------------------------------------

// out[row, c] = wte[tokens[row], c] + wpe[row % seq, c] into the f32
// residual stream. The wrapper range-checks the tokens on the host copy;
// the guard here only keeps a mismatched device copy from reading out of
// bounds (such a row becomes NaN, which the loss then shows).
template <typename T>
__device__ void embedding_forward_impl(const uint32_t* __restrict__ tokens, const T* __restrict__ wte,
                                       const T* __restrict__ wpe, uint32_t vocab, uint32_t seq,
                                       uint32_t width, uint64_t total, float* __restrict__ out) {
    GRID_STRIDE(i, total) {
        const uint64_t row = i / width;
        const uint32_t c = (uint32_t)(i % width), tok = tokens[row];
        out[i] = tok < vocab ? to_f32(wte[(uint64_t)tok * width + c]) + to_f32(wpe[(row % seq) * width + c])
                             : __int_as_float(0x7fc00000);
    }
}

// dwte[tok] += Σ dout[row] over the rows holding tok, each token's rows
// summed in ascending row order, so duplicate tokens sum deterministically
// without float atomics. dout is the f32 residual gradient; dwte is only
// wanted in full fine-tuning.
//
// The rows are grouped by token on the device, so the step needs no host
// work and no upload per call (and can be replayed as a CUDA graph): a
// stable counting sort of the row indices by token, in four integer passes
// over scratch the wrapper carves from the Gpu's workspace, then one block
// per group sums it. With R rows (8192 at the bench's 8 × 1024), V
// vocabulary rows (50304 padded) and chunks of C = TRAIN_THREADS = 256 rows:
//
//   1. count    (R/C blocks): block k clears row k of the chunk table
//               (chunks × V u32), then each row's in-chunk rank (earlier rows
//               of the chunk with its token: C shared-memory compares, all
//               lanes reading the same word, a broadcast) and the last row of
//               each token writes the chunk's count of it. O(R·C) compares,
//               never O(R²).
//   2. prefix   (grid over V): per token, the table's column becomes the
//               exclusive prefix over chunks (rows of that token in earlier
//               chunks) and `offsets[tok]` the total. Coalesced: thread v
//               walks column v. Reads and writes the table once: 2 · R/C · V
//               · 4 bytes (12.9 MB at the bench shape, ≈ 5 µs at 3 TB/s,
//               estimate) plus the clearing pass's 6.4 MB.
//   3. scan     (one block): exclusive scan of the totals over V in place
//               (each token's group start), and the groups compacted in token
//               order: uniq[g], starts[g], starts[groups] = rows grouped,
//               groups. One 64-bit scan carries both counts (rows in the
//               high half, groups in the low half: neither overflows 32 bits).
//   4. scatter  (grid over R): order[offsets[tok] + table[chunk][tok] +
//               rank] = row. Ranks are exact integer counts, so `order` is
//               the stable sort a host would make, whatever the scheduling.
//   5. sum      (min(R, V) blocks, blocks past `groups` exit at once): the
//               grid cannot depend on the data without a read back, and
//               min(R, V) (8192 here) bounds the groups far below one block
//               per vocabulary row (50304, most of them idle).
//
// A token ≥ vocab (which the wrapper rejects on the host copy; only a device
// copy that differs from it gets here) is left out of every pass: its row
// adds to nothing, and no index is formed from it.

// Pass 1: one row per thread, blockDim.x == TRAIN_THREADS.
extern "C" __global__ void __launch_bounds__(TRAIN_THREADS)
    embedding_group_count_u32(const uint32_t* __restrict__ tokens, uint32_t rows, uint32_t vocab,
                              uint32_t* __restrict__ table, uint32_t* __restrict__ rank) {
    __shared__ uint32_t s_tok[TRAIN_THREADS];
    const uint32_t t = threadIdx.x;
    const uint64_t first = (uint64_t)blockIdx.x * TRAIN_THREADS;
    const uint32_t n = (uint32_t)min((uint64_t)TRAIN_THREADS, rows - first);
    uint32_t* __restrict__ mine = table + (uint64_t)blockIdx.x * vocab;
    for (uint32_t v = t; v < vocab; v += TRAIN_THREADS) mine[v] = 0;
    if (t < n) s_tok[t] = tokens[first + t];
    // Also orders the clearing before the counts below (same block).
    __syncthreads();
    if (t >= n) return;
    const uint32_t tok = s_tok[t];
    uint32_t before = 0;
    for (uint32_t j = 0; j < t; ++j) before += s_tok[j] == tok;
    bool last = true;
    for (uint32_t j = t + 1; j < n; ++j) last &= s_tok[j] != tok;
    rank[first + t] = before;
    if (last && tok < vocab) mine[tok] = before + 1;
}

// Pass 2: the table's columns to exclusive prefixes over chunks; offsets[v]
// the token's total (pass 3 turns it into the group's start).
extern "C" __global__ void embedding_group_prefix_u32(uint32_t chunks, uint32_t vocab, uint32_t* __restrict__ table,
                                                      uint32_t* __restrict__ offsets) {
    GRID_STRIDE(v, vocab) {
        uint32_t run = 0;
        for (uint32_t k = 0; k < chunks; ++k) {
            const uint64_t i = (uint64_t)k * vocab + v;
            const uint32_t c = table[i];
            table[i] = run;
            run += c;
        }
        offsets[v] = run;
    }
}

// Exclusive scan of one 64-bit value per thread over the block, and the
// block's total (Hillis–Steele over shared memory, double-buffered: one
// barrier per step). Every thread must call it.
__device__ __forceinline__ uint64_t block_exclusive_scan_u64(uint64_t x, uint64_t& total) {
    __shared__ uint64_t s_scan[2][TRAIN_THREADS];
    const uint32_t t = threadIdx.x;
    int buf = 0;
    s_scan[0][t] = x;
    __syncthreads();
    for (uint32_t d = 1; d < TRAIN_THREADS; d <<= 1) {
        const uint64_t v = s_scan[buf][t] + (t >= d ? s_scan[buf][t - d] : 0);
        buf ^= 1;
        s_scan[buf][t] = v;
        __syncthreads();
    }
    total = s_scan[buf][TRAIN_THREADS - 1];
    const uint64_t inclusive = s_scan[buf][t];
    // The next call writes s_scan[0] again: let every thread read first.
    __syncthreads();
    return inclusive - x;
}

// Pass 3, one block of TRAIN_THREADS: thread t owns the contiguous slice
// [t·per, (t+1)·per) of the vocabulary (per = ⌈V / TRAIN_THREADS⌉, 197 at
// V = 50304), sums it, takes its place from the block scan, then walks it
// again writing starts. Both walks read offsets[] from L2 (200 KB).
extern "C" __global__ void __launch_bounds__(TRAIN_THREADS)
    embedding_group_scan_u32(uint32_t vocab, uint32_t* __restrict__ offsets, uint32_t* __restrict__ uniq,
                             uint32_t* __restrict__ starts, uint32_t* __restrict__ groups) {
    const uint32_t per = (vocab + TRAIN_THREADS - 1) / TRAIN_THREADS;
    const uint32_t lo = min(vocab, threadIdx.x * per), hi = min(vocab, lo + per);
    uint64_t mine = 0;  // (rows << 32) | groups in this slice
    for (uint32_t v = lo; v < hi; ++v) {
        const uint32_t c = offsets[v];
        mine += ((uint64_t)c << 32) | (c != 0);
    }
    uint64_t total;
    const uint64_t before = block_exclusive_scan_u64(mine, total);
    uint32_t start = (uint32_t)(before >> 32), g = (uint32_t)before;
    for (uint32_t v = lo; v < hi; ++v) {
        const uint32_t c = offsets[v];
        offsets[v] = start;
        if (c != 0) {
            uniq[g] = v;
            starts[g] = start;
            ++g;
        }
        start += c;
    }
    if (threadIdx.x == 0) {
        starts[(uint32_t)total] = (uint32_t)(total >> 32);
        *groups = (uint32_t)total;
    }
}

// Pass 4: every row with a valid token to its place in `order`.
extern "C" __global__ void embedding_group_scatter_u32(const uint32_t* __restrict__ tokens, uint32_t rows,
                                                       uint32_t vocab, const uint32_t* __restrict__ table,
                                                       const uint32_t* __restrict__ rank,
                                                       const uint32_t* __restrict__ offsets,
                                                       uint32_t* __restrict__ order) {
    GRID_STRIDE(row, rows) {
        const uint32_t tok = tokens[row];
        if (tok < vocab) order[offsets[tok] + table[row / TRAIN_THREADS * vocab + tok] + rank[row]] = (uint32_t)row;
    }
}

// Pass 5: block u sums group u (rows order[starts[u] .. starts[u + 1]), in
// ascending row order) into dwte[uniq[u]].
extern "C" __global__ void embedding_backward_wte_f32(const uint32_t* __restrict__ order,
                                                      const uint32_t* __restrict__ uniq,
                                                      const uint32_t* __restrict__ starts,
                                                      const uint32_t* __restrict__ groups, uint32_t width,
                                                      const float* __restrict__ dout, float* __restrict__ dwte) {
    const uint32_t u = blockIdx.x;
    if (u >= *groups) return;
    const uint64_t tok = uniq[u];
    const uint32_t begin = starts[u], end = starts[u + 1];
    for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
        float sum = 0.0f;
        for (uint32_t k = begin; k < end; ++k) sum += dout[(uint64_t)order[k] * width + c];
        dwte[tok * width + c] += sum;
    }
}

// dwpe[t] += Σ_b dout[b, t].
extern "C" __global__ void embedding_backward_wpe_f32(const float* __restrict__ dout, uint32_t batch,
                                                      uint32_t seq, uint32_t width,
                                                      float* __restrict__ dwpe) {
    uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    if (i >= (uint64_t)seq * width) return;
    uint64_t t = i / width, c = i % width;
    float sum = 0.0f;
    for (uint32_t b = 0; b < batch; ++b) sum += dout[((uint64_t)b * seq + t) * width + c];
    dwpe[i] += sum;
}

// ---- LayerNorm -----------------------------------------------------------

// One warp per row of the f32 residual stream: mean, then variance around
// it, then the normalised output in T, which is what the next GEMM reads
// (no separate cast pass). With `y` given it is the residual add fused in
// front: the row is r = x + y, written to `resid` (the new residual stream)
// and normalised, which saves the separate residual kernel's write and this
// kernel's re-read of r (f32: 8 of the 20 bytes per element the two moved).
// Bytes per element: 4 (x) + sizeof(T) (y) + 4 (resid) + sizeof(T) (out).
//
// Fast path (d a multiple of 4, d ≤ 32·4·LN_PACKS = 1024, 16-byte aligned
// rows): each lane loads its 4-float packs once into registers (LN_PACKS
// float4s: 32 registers at most), so x is read from memory once, not three
// times. Other widths take the plain loop, which re-reads the row from L1.
// The output's rows lie out_ld apart (≥ d): ln_1 and ln_2 write straight
// into c_attn's and c_fc's x_packed, whose spare columns stay untouched;
// out_ld a multiple of 4 keeps the 16-byte path.
#define LN_PACKS 8

template <typename T>
__device__ __forceinline__ void ln_load4(const float* __restrict__ x, const T* __restrict__ y, uint32_t k,
                                         float* __restrict__ resid, Pack<float, 4>& v) {
    v = reinterpret_cast<const Pack<float, 4>*>(x)[k];
    if (y) {
        const Pack<T, 4> b = reinterpret_cast<const Pack<T, 4>*>(y)[k];
#pragma unroll
        for (int j = 0; j < 4; ++j) v.v[j] += to_f32(b.v[j]);
        reinterpret_cast<Pack<float, 4>*>(resid)[k] = v;
    }
}

template <typename T>
__device__ void layernorm_forward_impl(const float* __restrict__ x, const T* __restrict__ y,
                                       const T* __restrict__ gamma, const T* __restrict__ beta, float eps,
                                       uint32_t rows, uint32_t d, float* __restrict__ resid, T* __restrict__ out,
                                       uint32_t out_ld, float* __restrict__ mean, float* __restrict__ rstd) {
    const uint32_t row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint64_t base = (uint64_t)row * d;
    const float* xr = x + base;
    const T* yr = y ? y + base : nullptr;
    float* rr = y ? resid + base : nullptr;
    T* orow = out + (uint64_t)row * out_ld;
    float mu, rs;
    const bool fast = d % 4 == 0 && out_ld % 4 == 0 && d <= 128 * LN_PACKS && aligned_to(x, 16) &&
                      aligned_to(out, 4 * sizeof(T)) &&
                      aligned_to(gamma, 4 * sizeof(T)) && aligned_to(beta, 4 * sizeof(T)) &&
                      (!y || (aligned_to(y, 4 * sizeof(T)) && aligned_to(resid, 16)));
    if (fast) {
        const uint32_t packs = d / 4;
        Pack<float, 4> v[LN_PACKS];
        float s = 0.0f;
#pragma unroll
        for (int p = 0; p < LN_PACKS; ++p) {
            const uint32_t k = lane + 32 * p;
            if (k < packs) {
                ln_load4(xr, yr, k, rr, v[p]);
                s += (v[p].v[0] + v[p].v[1]) + (v[p].v[2] + v[p].v[3]);
            }
        }
        mu = warp_sum(s) / d;
        float q = 0.0f;
#pragma unroll
        for (int p = 0; p < LN_PACKS; ++p)
            if (lane + 32 * p < packs)
#pragma unroll
                for (int j = 0; j < 4; ++j) q += (v[p].v[j] - mu) * (v[p].v[j] - mu);
        rs = 1.0f / sqrtf(warp_sum(q) / d + eps);
#pragma unroll
        for (int p = 0; p < LN_PACKS; ++p) {
            const uint32_t k = lane + 32 * p;
            if (k < packs) {
                const Pack<T, 4> g = reinterpret_cast<const Pack<T, 4>*>(gamma)[k];
                const Pack<T, 4> b = reinterpret_cast<const Pack<T, 4>*>(beta)[k];
                Pack<T, 4> o;
#pragma unroll
                for (int j = 0; j < 4; ++j) o.v[j] = from_f32<T>((v[p].v[j] - mu) * rs * to_f32(g.v[j]) + to_f32(b.v[j]));
                reinterpret_cast<Pack<T, 4>*>(orow)[k] = o;
            }
        }
    } else {
        // Each lane re-reads only the elements it wrote to `resid` itself.
        const float* src = y ? rr : xr;
        float s = 0.0f;
        for (uint32_t i = lane; i < d; i += 32) {
            float r = xr[i];
            if (y) { r += to_f32(yr[i]); rr[i] = r; }
            s += r;
        }
        mu = warp_sum(s) / d;
        float q = 0.0f;
        for (uint32_t i = lane; i < d; i += 32) q += (src[i] - mu) * (src[i] - mu);
        rs = 1.0f / sqrtf(warp_sum(q) / d + eps);
        for (uint32_t i = lane; i < d; i += 32)
            orow[i] = from_f32<T>((src[i] - mu) * rs * to_f32(gamma[i]) + to_f32(beta[i]));
    }
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = dout·γ, one warp per
// row. dx is the f32 residual gradient, accumulated in place so the
// residual branch's gradient needs no extra add pass. Bytes per element:
// sizeof(T) (dout) + 4 (x) + 8 (dx read and written); γ stays in L1.
//
// Fast path (the forward's conditions: d a multiple of 4, d ≤ 1024, 16-byte
// aligned rows): each lane loads its packs of dout (as T, 2 registers per
// bf16 pack) and x (4 registers per pack) once with 16-byte loads and keeps
// them for the second pass: LN_PACKS·(4 + 4·sizeof(T)/4) registers at most
// (48 for bf16, 64 for f32), and dx moves as float4. ptxas: 71–89 registers,
// 2 blocks (16 warps) per SM; each warp has up to 24 bytes × 8 packs × 32
// lanes = 6 KB of loads in flight, ~100 KB per SM, several times what
// Little's law asks at H100's bandwidth and latency (≈ 15 KB per SM,
// estimate), so the occupancy costs no bandwidth. (A cap of 3 blocks per SM
// spills.) The plain loop reads dout and x twice (the second time from L1).
template <typename T>
__device__ void layernorm_backward_dx_impl(const T* __restrict__ dout, const float* __restrict__ x,
                                           const T* __restrict__ gamma, const float* __restrict__ mean,
                                           const float* __restrict__ rstd, uint32_t rows, uint32_t d,
                                           float* __restrict__ dx) {
    const uint32_t row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint64_t base = (uint64_t)row * d;
    const float mu = mean[row], rs = rstd[row];
    const bool fast = d % 4 == 0 && d <= 128 * LN_PACKS && aligned_to(x, 16) && aligned_to(dx, 16) &&
                      aligned_to(dout, 4 * sizeof(T)) && aligned_to(gamma, 4 * sizeof(T));
    if (fast) {
        const uint32_t packs = d / 4;
        const Pack<float, 4>* xr = reinterpret_cast<const Pack<float, 4>*>(x + base);
        const Pack<T, 4>* gr = reinterpret_cast<const Pack<T, 4>*>(dout + base);
        const Pack<T, 4>* gam = reinterpret_cast<const Pack<T, 4>*>(gamma);
        Pack<float, 4> xv[LN_PACKS];
        Pack<T, 4> gv[LN_PACKS];
        float m1 = 0.0f, m2 = 0.0f;
#pragma unroll
        for (int p = 0; p < LN_PACKS; ++p) {
            const uint32_t k = lane + 32 * p;
            if (k < packs) {
                xv[p] = xr[k];
                gv[p] = gr[k];
                const Pack<T, 4> g = gam[k];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float dxhat = to_f32(gv[p].v[j]) * to_f32(g.v[j]);
                    m1 += dxhat;
                    m2 += dxhat * (xv[p].v[j] - mu) * rs;
                }
            }
        }
        m1 = warp_sum(m1) / d;
        m2 = warp_sum(m2) / d;
        Pack<float, 4>* dr = reinterpret_cast<Pack<float, 4>*>(dx + base);
#pragma unroll
        for (int p = 0; p < LN_PACKS; ++p) {
            const uint32_t k = lane + 32 * p;
            if (k < packs) {
                const Pack<T, 4> g = gam[k];
                Pack<float, 4> o = dr[k];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float xhat = (xv[p].v[j] - mu) * rs;
                    o.v[j] += rs * (to_f32(gv[p].v[j]) * to_f32(g.v[j]) - m1 - xhat * m2);
                }
                dr[k] = o;
            }
        }
        return;
    }
    float m1 = 0.0f, m2 = 0.0f;
    for (uint32_t i = lane; i < d; i += 32) {
        float dxhat = to_f32(dout[base + i]) * to_f32(gamma[i]);
        m1 += dxhat;
        m2 += dxhat * (x[base + i] - mu) * rs;
    }
    m1 = warp_sum(m1) / d;
    m2 = warp_sum(m2) / d;
    for (uint32_t i = lane; i < d; i += 32) {
        float xhat = (x[base + i] - mu) * rs;
        dx[base + i] += rs * (to_f32(dout[base + i]) * to_f32(gamma[i]) - m1 - xhat * m2);
    }
}

// dγ and dβ are column sums over all rows: each (column block, row chunk)
// writes a partial, and layernorm_backward_params_final_f32 adds the chunks
// in order. Coalesced across columns, deterministic, no atomics.
template <typename T>
__device__ void layernorm_backward_params_partial_impl(const T* __restrict__ dout, const float* __restrict__ x,
                                                       const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, uint32_t rows,
                                                       uint32_t d, uint32_t rows_per_chunk,
                                                       float* __restrict__ partial_g,
                                                       float* __restrict__ partial_b) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (i >= d) return;
    float g = 0.0f, b = 0.0f;
    const uint32_t end = min(rows, (chunk + 1) * rows_per_chunk);
    for (uint32_t r = chunk * rows_per_chunk; r < end; ++r) {
        float dy = to_f32(dout[(uint64_t)r * d + i]);
        g += dy * (x[(uint64_t)r * d + i] - mean[r]) * rstd[r];
        b += dy;
    }
    partial_g[(uint64_t)chunk * d + i] = g;
    partial_b[(uint64_t)chunk * d + i] = b;
}

extern "C" __global__ void layernorm_backward_params_final_f32(
    const float* __restrict__ partial_g, const float* __restrict__ partial_b, uint32_t chunks,
    uint32_t d, float* __restrict__ dgamma, float* __restrict__ dbeta) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float g = 0.0f, b = 0.0f;
    for (uint32_t c = 0; c < chunks; ++c) {
        g += partial_g[(uint64_t)c * d + i];
        b += partial_b[(uint64_t)c * d + i];
    }
    if (dgamma) dgamma[i] += g;
    if (dbeta) dbeta[i] += b;
}

// ---- elementwise ---------------------------------------------------------

#define GELU_C 0.7978845608028654f  // sqrt(2/pi)

__device__ __forceinline__ float gelu_f32(float v) {
    return 0.5f * v * (1.0f + tanhf(GELU_C * (v + 0.044715f * v * v * v)));
}

__device__ __forceinline__ float gelu_grad_f32(float v) {
    const float t = tanhf(GELU_C * (v + 0.044715f * v * v * v));
    const float du = GELU_C * (1.0f + 3.0f * 0.044715f * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du;
}

// GELU forward and backward move 2 (forward) or 3 (backward) streams of T
// and nothing else, so they run on 16-byte packs (8 bf16 per load) when
// every pointer is 16-byte aligned, the last n mod N elements one by one.
// Bytes per element: 2·sizeof(T) forward, 3·sizeof(T) backward.
// The output's rows (cols wide) lie ld apart (strided() above): the GELU
// writes c_proj's input straight into x_packed, its backward c_fc's dy
// into dy_packed. Inputs are contiguous.
template <typename T>
__device__ void gelu_forward_impl(const T* __restrict__ x, uint64_t n, uint64_t cols, uint64_t ld,
                                  T* __restrict__ out) {
    constexpr int N = 16 / sizeof(T);
    uint64_t done = 0;
    if (aligned_to(x, 16) && aligned_to(out, 16) && packs_fit(cols, ld, N)) {
        done = n / N * N;
        GRID_STRIDE(i, n / N) {
            Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[i];
#pragma unroll
            for (int j = 0; j < N; ++j) p.v[j] = from_f32<T>(gelu_f32(to_f32(p.v[j])));
            *reinterpret_cast<Pack<T, N>*>(out + strided(i * N, cols, ld)) = p;
        }
    }
    GRID_STRIDE(i, n - done) out[strided(done + i, cols, ld)] = from_f32<T>(gelu_f32(to_f32(x[done + i])));
}

template <typename T>
__device__ void gelu_backward_impl(const T* __restrict__ dout, const T* __restrict__ x, uint64_t n, uint64_t cols,
                                   uint64_t ld, T* __restrict__ dx) {
    constexpr int N = 16 / sizeof(T);
    uint64_t done = 0;
    if (aligned_to(dout, 16) && aligned_to(x, 16) && aligned_to(dx, 16) && packs_fit(cols, ld, N)) {
        done = n / N * N;
        GRID_STRIDE(i, n / N) {
            const Pack<T, N> g = reinterpret_cast<const Pack<T, N>*>(dout)[i];
            Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[i];
#pragma unroll
            for (int j = 0; j < N; ++j) p.v[j] = from_f32<T>(to_f32(g.v[j]) * gelu_grad_f32(to_f32(p.v[j])));
            *reinterpret_cast<Pack<T, N>*>(dx + strided(i * N, cols, ld)) = p;
        }
    }
    GRID_STRIDE(i, n - done)
    dx[strided(done + i, cols, ld)] = from_f32<T>(to_f32(dout[done + i]) * gelu_grad_f32(to_f32(x[done + i])));
}

// out = x + y: the residual add, reading the GEMM's T output and writing
// the f32 stream (x stays: the LayerNorm backward needs it).
// Bytes per element: 8 + sizeof(T). Packs of 4: the f32 streams move 16
// bytes per access, y 4·sizeof(T) (8 for bf16), when all three are aligned
// to that; the last n mod 4 elements one by one.
template <typename T>
__device__ void residual_add_impl(const float* __restrict__ x, const T* __restrict__ y, uint64_t n,
                                  float* __restrict__ out) {
    uint64_t done = 0;
    if (aligned_to(x, 16) && aligned_to(out, 16) && aligned_to(y, 4 * sizeof(T))) {
        done = n / 4 * 4;
        GRID_STRIDE(i, n / 4) {
            Pack<float, 4> a = reinterpret_cast<const Pack<float, 4>*>(x)[i];
            const Pack<T, 4> b = reinterpret_cast<const Pack<T, 4>*>(y)[i];
#pragma unroll
            for (int j = 0; j < 4; ++j) a.v[j] += to_f32(b.v[j]);
            reinterpret_cast<Pack<float, 4>*>(out)[i] = a;
        }
    }
    GRID_STRIDE(i, n - done) out[done + i] = x[done + i] + to_f32(y[done + i]);
}

// out = (T) x: the residual gradient entering a GEMM backward, and the bf16
// working copy of the f32 master weights. Bytes per element: 4 + sizeof(T),
// in packs of 4 as residual_add moves them. The output's rows (cols wide)
// lie ld apart: the residual gradient goes straight into a projection's
// dy_packed.
template <typename T>
__device__ void cast_from_f32_impl(const float* __restrict__ x, uint64_t n, uint64_t cols, uint64_t ld,
                                   T* __restrict__ out) {
    uint64_t done = 0;
    if (aligned_to(x, 16) && aligned_to(out, 4 * sizeof(T)) && packs_fit(cols, ld, 4)) {
        done = n / 4 * 4;
        GRID_STRIDE(i, n / 4) {
            const Pack<float, 4> a = reinterpret_cast<const Pack<float, 4>*>(x)[i];
            Pack<T, 4> o;
#pragma unroll
            for (int j = 0; j < 4; ++j) o.v[j] = from_f32<T>(a.v[j]);
            *reinterpret_cast<Pack<T, 4>*>(out + strided(i * 4, cols, ld)) = o;
        }
    }
    GRID_STRIDE(i, n - done) out[strided(done + i, cols, ld)] = from_f32<T>(x[done + i]);
}

// ---- softmax cross-entropy -----------------------------------------------

// One block of CE_THREADS per row of `padded` logits, of which the first
// `vocab` are real and the rest padding (the LM head's padded vocabulary).
// Pass 1 reads the row once with 16-byte loads and keeps, per thread, an
// online (max, Σexp, argmax) over its columns; the block merges them in a
// fixed order. Pass 2 reads the row again and overwrites it with the
// gradient scale·(softmax − onehot), zero on the pad columns. Bytes moved
// per row: 2 reads + 1 write of padded·sizeof(T); the second read is meant
// to hit L2 (CE_THREADS = 1024 keeps few rows in flight: 2 blocks per SM ×
// 132 SMs × 100 KB bf16 rows ≈ 26 MB of H100's 50 MB), so DRAM sees one read
// and one write, the floor. Ties in argmax go to the lowest index, as on the
// CPU. Targets were range-checked on the host; a target that is out of
// range on the device anyway gets a NaN loss, never a stray read.
// Registers: 1024 threads allow 64 per thread; no shared memory beyond the
// 32-entry merge arrays.
#define CE_WARPS (CE_THREADS / 32)
#define CE_LOG2E 1.4426950408889634f
#define CE_NEG_MAX (-3.402823466e38f)  // −FLT_MAX


// Adds logit v at column c to a running (max, Σexp(· − max), argmax). The
// max starts at CE_NEG_MAX (−FLT_MAX), not −∞, so a −∞ logit adds exp2f(−∞) = 0 instead
// of ∞ − ∞; a NaN logit fails `v > mx` and makes the sum NaN, as it should.
__device__ __forceinline__ void ce_add(float v, uint32_t c, float& mx, float& sum, uint32_t& arg) {
    if (v > mx) {
        sum = sum * exp2f((mx - v) * CE_LOG2E) + 1.0f;
        mx = v;
        arg = c;
    } else {
        sum += exp2f((v - mx) * CE_LOG2E);
    }
}

// Merges another thread's (max, sum, argmax) into this one's.
__device__ __forceinline__ void ce_merge(float omx, float osum, uint32_t oarg, float& mx, float& sum,
                                         uint32_t& arg) {
    const float m = fmaxf(mx, omx);
    sum = sum * exp2f((mx - m) * CE_LOG2E) + osum * exp2f((omx - m) * CE_LOG2E);
    if (omx > mx || (omx == mx && oarg < arg)) arg = oarg;
    mx = m;
}

template <typename T, int N>
__device__ void cross_entropy_row(T* __restrict__ l, uint32_t target, uint32_t vocab, uint32_t padded,
                                  uint32_t write_grad, float grad_scale, float* __restrict__ loss,
                                  uint32_t* __restrict__ correct) {
    __shared__ float s_max[CE_WARPS], s_sum[CE_WARPS];
    __shared__ uint32_t s_arg[CE_WARPS];
    Pack<T, N>* row = reinterpret_cast<Pack<T, N>*>(l);
    const uint32_t packs = padded / N, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (target >= vocab) {  // IGNORE (or a corrupt target): no loss, no gradient
        if (write_grad) {
            Pack<T, N> zero;
#pragma unroll
            for (int j = 0; j < N; ++j) zero.v[j] = from_f32<T>(0.0f);
            for (uint32_t k = threadIdx.x; k < packs; k += blockDim.x) row[k] = zero;
        }
        if (threadIdx.x == 0) {
            *loss = target == 0xffffffffu ? 0.0f : __int_as_float(0x7fc00000);
            *correct = 0;
        }
        return;
    }
    float mx = CE_NEG_MAX, sum = 0.0f;
    uint32_t arg = 0xffffffffu;
    for (uint32_t k = threadIdx.x; k < packs; k += blockDim.x) {
        const Pack<T, N> p = row[k];
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (k * N + j < vocab) ce_add(to_f32(p.v[j]), k * N + j, mx, sum, arg);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float omx = __shfl_xor_sync(0xffffffffu, mx, o), osum = __shfl_xor_sync(0xffffffffu, sum, o);
        const uint32_t oarg = __shfl_xor_sync(0xffffffffu, arg, o);
        ce_merge(omx, osum, oarg, mx, sum, arg);
    }
    if (lane == 0) { s_max[warp] = mx; s_sum[warp] = sum; s_arg[warp] = arg; }
    __syncthreads();
    // Every thread merges the warps' results in the same order, so all
    // agree on lse bit for bit.
    mx = s_max[0], sum = s_sum[0], arg = s_arg[0];
    for (uint32_t w = 1; w < blockDim.x / 32; ++w) ce_merge(s_max[w], s_sum[w], s_arg[w], mx, sum, arg);
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        *loss = lse - to_f32(l[target]);
        *correct = arg == target;
    }
    if (!write_grad) return;
    // Thread 0 read l[target] above; no other thread writes that pack
    // before the barrier.
    __syncthreads();
    for (uint32_t k = threadIdx.x; k < packs; k += blockDim.x) {
        Pack<T, N> p = row[k];
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const uint32_t c = k * N + j;
            const float g = c < vocab ? exp2f((to_f32(p.v[j]) - lse) * CE_LOG2E) - (c == target ? 1.0f : 0.0f) : 0.0f;
            p.v[j] = from_f32<T>(grad_scale * g);
        }
        row[k] = p;
    }
}

// 16-byte accesses when every row starts 16-byte aligned (padded a multiple
// of 16 / sizeof(T) and an aligned buffer), else one element at a time.
// The gradient's scale is `grad_scale`, or *grad_scale_ptr when that is not
// null (ce_mean_scale's result: decided on the device, so a captured graph
// does not record it).
template <typename T>
__device__ void cross_entropy_impl(T* __restrict__ logits, const uint32_t* __restrict__ targets, uint32_t vocab,
                                   uint32_t padded, uint32_t write_grad, float grad_scale,
                                   const float* __restrict__ grad_scale_ptr, float* __restrict__ losses,
                                   uint32_t* __restrict__ correct) {
    constexpr int N = 16 / sizeof(T);
    const uint64_t row = blockIdx.x;
    T* l = logits + row * padded;
    if (write_grad && grad_scale_ptr != nullptr) grad_scale = *grad_scale_ptr;
    if (padded % N == 0 && (reinterpret_cast<uintptr_t>(logits) & 15) == 0)
        cross_entropy_row<T, N>(l, targets[row], vocab, padded, write_grad, grad_scale, losses + row, correct + row);
    else
        cross_entropy_row<T, 1>(l, targets[row], vocab, padded, write_grad, grad_scale, losses + row, correct + row);
}

// The mean loss's gradient scale, counted on the device: *scale = 1/n for
// the n of `count` targets that are not IGNORE (0 when there are none),
// divided in double and rounded to float once, exactly as the host rounds a
// scale it passes itself (so both give the same bits). It runs in stream
// order before the cross-entropy that reads *scale, and a captured graph
// recounts on every replay: batches that score different numbers of
// positions replay one graph. One block: 4 bytes per target (32 KB for 8192
// tokens) is a few microseconds; per-thread counts, then a warp shuffle
// tree and the warps' sums in a fixed order (integers: exact in any order).
// Registers: a handful; shared memory: TRAIN_THREADS / 32 words.
extern "C" __global__ void __launch_bounds__(TRAIN_THREADS)
    ce_mean_scale(const uint32_t* __restrict__ targets, uint32_t count, float* __restrict__ scale) {
    __shared__ uint32_t s_count[TRAIN_THREADS / 32];
    uint32_t n = 0;
    for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) n += targets[i] != 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
    if (threadIdx.x % 32 == 0) s_count[threadIdx.x / 32] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t total = 0;
        for (uint32_t w = 0; w < blockDim.x / 32; ++w) total += s_count[w];
        *scale = total == 0 ? 0.0f : (float)(1.0 / (double)total);
    }
}

// ---- one exported kernel per op and dtype --------------------------------

#define TRAIN_KERNELS(S, T)                                                                               \
    extern "C" __global__ void embedding_forward_##S(const uint32_t* __restrict__ tokens,                 \
                                                     const T* __restrict__ wte, const T* __restrict__ wpe, \
                                                     uint32_t vocab, uint32_t seq, uint32_t width,         \
                                                     uint64_t total, float* __restrict__ out) {            \
        embedding_forward_impl<T>(tokens, wte, wpe, vocab, seq, width, total, out);                       \
    }                                                                                                     \
    extern "C" __global__ void layernorm_forward_##S(const float* __restrict__ x, const T* __restrict__ gamma, \
                                                     const T* __restrict__ beta, float eps, uint32_t rows, \
                                                     uint32_t d, T* __restrict__ out, uint32_t out_ld,     \
                                                     float* __restrict__ mean, float* __restrict__ rstd) { \
        layernorm_forward_impl<T>(x, nullptr, gamma, beta, eps, rows, d, nullptr, out, out_ld, mean, rstd); \
    }                                                                                                     \
    extern "C" __global__ void residual_layernorm_forward_##S(                                             \
        const float* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gamma,                 \
        const T* __restrict__ beta, float eps, uint32_t rows, uint32_t d, float* __restrict__ resid,        \
        T* __restrict__ out, uint32_t out_ld, float* __restrict__ mean, float* __restrict__ rstd) {         \
        layernorm_forward_impl<T>(x, y, gamma, beta, eps, rows, d, resid, out, out_ld, mean, rstd);        \
    }                                                                                                     \
    extern "C" __global__ void layernorm_backward_dx_##S(                                                  \
        const T* __restrict__ dout, const float* __restrict__ x, const T* __restrict__ gamma,              \
        const float* __restrict__ mean, const float* __restrict__ rstd, uint32_t rows, uint32_t d,          \
        float* __restrict__ dx) {                                                                          \
        layernorm_backward_dx_impl<T>(dout, x, gamma, mean, rstd, rows, d, dx);                            \
    }                                                                                                     \
    extern "C" __global__ void layernorm_backward_params_partial_##S(                                      \
        const T* __restrict__ dout, const float* __restrict__ x, const float* __restrict__ mean,            \
        const float* __restrict__ rstd, uint32_t rows, uint32_t d, uint32_t rows_per_chunk,                 \
        float* __restrict__ partial_g, float* __restrict__ partial_b) {                                    \
        layernorm_backward_params_partial_impl<T>(dout, x, mean, rstd, rows, d, rows_per_chunk, partial_g, \
                                                  partial_b);                                              \
    }                                                                                                     \
    extern "C" __global__ void gelu_forward_##S(const T* __restrict__ x, uint64_t n, uint64_t cols,       \
                                                uint64_t ld, T* __restrict__ out) {                        \
        gelu_forward_impl<T>(x, n, cols, ld, out);                                                        \
    }                                                                                                     \
    extern "C" __global__ void gelu_backward_##S(const T* __restrict__ dout, const T* __restrict__ x,       \
                                                 uint64_t n, uint64_t cols, uint64_t ld,                   \
                                                 T* __restrict__ dx) {                                     \
        gelu_backward_impl<T>(dout, x, n, cols, ld, dx);                                                   \
    }                                                                                                     \
    extern "C" __global__ void residual_add_##S(const float* __restrict__ x, const T* __restrict__ y,      \
                                                uint64_t n, float* __restrict__ out) {                     \
        residual_add_impl<T>(x, y, n, out);                                                                \
    }                                                                                                     \
    extern "C" __global__ void cast_from_f32_##S(const float* __restrict__ x, uint64_t n, uint64_t cols,   \
                                                 uint64_t ld, T* __restrict__ out) {                       \
        cast_from_f32_impl<T>(x, n, cols, ld, out);                                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                              \
        cross_entropy_##S(T* __restrict__ logits, const uint32_t* __restrict__ targets, uint32_t vocab,       \
                          uint32_t padded, uint32_t write_grad, float grad_scale,                            \
                          const float* __restrict__ grad_scale_ptr, float* __restrict__ losses,              \
                          uint32_t* __restrict__ correct) {                                                  \
        cross_entropy_impl<T>(logits, targets, vocab, padded, write_grad, grad_scale, grad_scale_ptr, losses, \
                              correct);                                                                      \
    }

LORAFUSE_FOR_EACH_DTYPE(TRAIN_KERNELS)

// ---- optimiser and norms -------------------------------------------------

// Decoupled weight decay, then the bias-corrected Adam step, in double like
// the CPU twin (the kernel is memory-bound; the extra arithmetic is free).
// Bytes per element: param, grad, m, v read (16), param, m, v written (12).
__device__ __forceinline__ void adamw_element(float* __restrict__ param, const float* __restrict__ grad,
                                              float* __restrict__ m, float* __restrict__ v, uint64_t i, double lr,
                                              double weight_decay, const AdamWArgs& a) {
    double g = (double)grad[i] * a.grad_scale;
    double mi = a.beta1 * m[i] + (1.0 - a.beta1) * g;
    double vi = a.beta2 * v[i] + (1.0 - a.beta2) * g * g;
    double p = param[i];
    p -= lr * weight_decay * p;
    p -= lr * (mi / a.correction1) / (sqrt(vi / a.correction2) + a.eps);
    m[i] = (float)mi;
    v[i] = (float)vi;
    param[i] = (float)p;
}

extern "C" __global__ void adamw_f32(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, uint64_t n,
                                     AdamWArgs a) {
    GRID_STRIDE(i, n) adamw_element(param, grad, m, v, i, a.lr, a.weight_decay, a);
}

// Every trainable tensor in one launch: blockIdx.y picks the tensor from a
// device table, blockIdx.x strides over its elements (blocks past a short
// tensor's end exit at once). Replaces one launch per tensor (~100 for
// LoRA on GPT-2, each a few microseconds of launch gap for a few kilobytes
// of work). `a.lr` and `a.weight_decay` are unused: each entry has its own.
extern "C" __global__ void adamw_multi_f32(const AdamWEntry* __restrict__ table, AdamWArgs a) {
    const AdamWEntry t = table[blockIdx.y];
    GRID_STRIDE(i, t.n)
    adamw_element(reinterpret_cast<float*>(t.param), reinterpret_cast<const float*>(t.grad),
                  reinterpret_cast<float*>(t.m), reinterpret_cast<float*>(t.v), i, t.lr, t.weight_decay, a);
}

// Σx² in double of the elements block `block` of `blocks` strides over, into
// *out (a fixed-order tree in shared memory).
__device__ __forceinline__ void block_sum_squares(const float* __restrict__ x, uint64_t n, uint32_t block,
                                                  uint32_t blocks, double* __restrict__ out) {
    __shared__ double s[TRAIN_THREADS];
    double acc = 0.0;
    for (uint64_t i = block * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)blocks * blockDim.x)
        acc += (double)x[i] * (double)x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = s[0];
}

// Every tensor of the gradient norm in one launch: blockIdx.y picks the
// tensor (`xs[y]`, `ns[y]` elements), and partial[y·gridDim.x + x] gets
// block x's share; sum_squares_final_f32 with gridDim.x = tensors then adds
// each tensor's partials in order. Deterministic, no atomics.
extern "C" __global__ void sum_squares_multi_partial_f32(const float* const* __restrict__ xs,
                                                         const uint64_t* __restrict__ ns,
                                                         double* __restrict__ partial) {
    block_sum_squares(xs[blockIdx.y], ns[blockIdx.y], blockIdx.x, gridDim.x,
                      partial + (uint64_t)blockIdx.y * gridDim.x + blockIdx.x);
}

// out[b] = Σ partial[b·blocks .. (b+1)·blocks], one block b per tensor.
extern "C" __global__ void sum_squares_final_f32(const double* __restrict__ partial,
                                                 uint32_t blocks, double* __restrict__ out) {
    __shared__ double s[TRAIN_THREADS];
    const double* p = partial + (uint64_t)blockIdx.x * blocks;
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += p[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// ---- the optimizer step without a host round trip -------------------------
//
// The gradient norm, the clip factor, the schedule's rate, the step count and
// the decision to refuse a non-finite step all live in one f64 state buffer
// on the device (`optim_state` in src/nn.rs): sum_squares_* write each
// tensor's Σx² into it, optimizer_decide_f32 turns those into the header, and
// adamw_multi_state_f32 reads the header. The host launches the same three
// kernels with the same arguments every step (a CUDA graph can replay them)
// and reads the header only when it wants the step's report.

// OPTIM_* state offsets and OptimArgs (the run's constants) come from abi.h.

// Finite: NaN fails the comparison, ±∞ exceed the largest double.
__device__ __forceinline__ bool optim_finite(double x) { return fabs(x) <= 1.7976931348623157e308; }

// cos(π·x): cospi needs no Payne–Hanek argument reduction, whose local
// array would give the kernel a stack frame (cos does). The emulator has no
// cospi and uses the host's cos.
__device__ __forceinline__ double optim_cos_pi(double x) {
#ifdef __CUDACC__
    return cospi(x);
#else
    return std::cos(3.14159265358979323846 * x);
#endif
}

// `OptimConsts::lr_factor` in src/nn.rs, in the same double
// arithmetic.
__device__ __forceinline__ double optim_lr_factor(const OptimArgs& c, uint64_t step) {
    if (c.warmup > 0 && step <= c.warmup) return (double)step / (double)c.warmup;
    const uint64_t span_steps = c.total > c.warmup ? c.total - c.warmup : 0;
    const double span = (double)(span_steps > 0 ? span_steps : 1);
    const uint64_t past = step > c.warmup ? step - c.warmup : 0;
    const double progress = fmin((double)past / span, 1.0);
    const double m = c.min_lr_ratio;
    if (c.decay == 2) return 1.0;
    if (c.decay == 1) return m + (1.0 - m) * (1.0 - progress);
    return m + (1.0 - m) * 0.5 * (1.0 + optim_cos_pi(progress));
}

// One block of TRAIN_THREADS: the norm from sums[0..norm_tensors) (a
// fixed-order tree), every sum (norm tensors and guards) checked for a
// non-finite value, then the header as `OptimConsts::decide` writes it. The
// step count it reads is the one it wrote on the last step.
extern "C" __global__ void optimizer_decide_f32(double* __restrict__ state, uint32_t tensors,
                                                uint32_t norm_tensors, OptimArgs c) {
    __shared__ double s[TRAIN_THREADS];
    const double* sums = state + OPTIM_HEADER;
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < norm_tensors; i += blockDim.x) acc += sums[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    double first_bad = -1.0;
    for (uint32_t i = 0; i < tensors; ++i)
        if (!optim_finite(sums[i])) {
            first_bad = (double)i;
            break;
        }
    const double norm = sqrt(s[0]);
    const bool accepted = first_bad < 0.0 && optim_finite(norm);
    const double step = state[OPTIM_STEP] + (accepted ? 1.0 : 0.0);
    const double t = fmax(step, 1.0);
    state[OPTIM_NORM] = norm;
    state[OPTIM_SCALE] = c.clip_norm > 0.0 && norm > c.clip_norm ? c.clip_norm / norm : 1.0;
    state[OPTIM_ACCEPTED] = accepted ? 1.0 : 0.0;
    state[OPTIM_STEP] = step;
    state[OPTIM_LR_FACTOR] = optim_lr_factor(c, (uint64_t)t);
    state[OPTIM_CORRECTION1] = 1.0 - pow(c.beta1, t);
    state[OPTIM_CORRECTION2] = 1.0 - pow(c.beta2, t);
    state[OPTIM_FIRST_BAD] = first_bad;
}

// adamw_multi_f32 with the step's values from the state header: a refused
// step returns at once (no parameter or moment changes), an accepted one
// scales each entry's peak rate by the schedule and every gradient by the
// clip factor. Same bytes per element as adamw_multi_f32; the header is one
// 64-byte line every thread reads from L1.
extern "C" __global__ void adamw_multi_state_f32(const AdamWEntry* __restrict__ table,
                                                 const double* __restrict__ state, OptimArgs c) {
    if (state[OPTIM_ACCEPTED] == 0.0) return;
    AdamWArgs a;
    a.lr = 0.0;
    a.weight_decay = 0.0;
    a.beta1 = c.beta1;
    a.beta2 = c.beta2;
    a.eps = c.eps;
    a.grad_scale = state[OPTIM_SCALE];
    a.correction1 = state[OPTIM_CORRECTION1];
    a.correction2 = state[OPTIM_CORRECTION2];
    const double factor = state[OPTIM_LR_FACTOR];
    const AdamWEntry t = table[blockIdx.y];
    GRID_STRIDE(i, t.n)
    adamw_element(reinterpret_cast<float*>(t.param), reinterpret_cast<const float*>(t.grad),
                  reinterpret_cast<float*>(t.m), reinterpret_cast<float*>(t.v), i, t.lr * factor, t.weight_decay, a);
}
