// The trainer's non-GEMM ops (crate::train::ops::TrainOps), f32 storage and
// arithmetic. The CPU twin is src/cpu/train.rs; the wrappers are
// src/cuda/train.rs. Every reduction runs in a fixed order: no float atomics,
// so a training step gives the same bits on every run.
//
// This is the correct-first version: attention is one warp per query (or key)
// row, O(T²·hd) per head without tiling; a flash-style tiled kernel is the
// next step once this one has been measured.
#include "common.cuh"

#define TRAIN_THREADS 256
#define WARPS_PER_BLOCK (TRAIN_THREADS / 32)

// ---- embedding -----------------------------------------------------------

// out[row, c] = wte[tokens[row], c] + wpe[row % seq, c]. Tokens are checked
// against the vocabulary by the wrapper before launch.
extern "C" __global__ void embedding_forward_f32(const uint32_t* __restrict__ tokens,
                                                 const float* __restrict__ wte,
                                                 const float* __restrict__ wpe, uint32_t seq,
                                                 uint32_t width, uint64_t total,
                                                 float* __restrict__ out) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
         i += (uint64_t)gridDim.x * blockDim.x) {
        uint64_t row = i / width;
        uint32_t c = (uint32_t)(i % width);
        out[i] = wte[(uint64_t)tokens[row] * width + c] + wpe[(row % seq) * width + c];
    }
}

// dwte[tok] += Σ dout[row] over the rows holding tok. One block per distinct
// token, rows visited in the order the host sorted them (`order`, grouped by
// `starts`), so duplicate tokens sum deterministically without atomics.
extern "C" __global__ void embedding_backward_wte_f32(const uint32_t* __restrict__ order,
                                                      const uint32_t* __restrict__ uniq,
                                                      const uint32_t* __restrict__ starts,
                                                      uint32_t width,
                                                      const float* __restrict__ dout,
                                                      float* __restrict__ dwte) {
    const uint32_t u = blockIdx.x;
    const uint64_t tok = uniq[u];
    for (uint32_t c = threadIdx.x; c < width; c += blockDim.x) {
        float sum = 0.0f;
        for (uint32_t k = starts[u]; k < starts[u + 1]; ++k) sum += dout[(uint64_t)order[k] * width + c];
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

// One warp per row: mean, then variance around it (two passes over a row
// that sits in L1), then the normalised output.
extern "C" __global__ void layernorm_forward_f32(const float* __restrict__ x,
                                                 const float* __restrict__ gamma,
                                                 const float* __restrict__ beta, float eps,
                                                 uint32_t rows, uint32_t d,
                                                 float* __restrict__ out, float* __restrict__ mean,
                                                 float* __restrict__ rstd) {
    const uint32_t row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (uint64_t)row * d;
    float s = 0.0f;
    for (uint32_t i = lane; i < d; i += 32) s += xr[i];
    const float mu = warp_sum(s) / d;
    float v = 0.0f;
    for (uint32_t i = lane; i < d; i += 32) v += (xr[i] - mu) * (xr[i] - mu);
    const float rs = 1.0f / sqrtf(warp_sum(v) / d + eps);
    float* orow = out + (uint64_t)row * d;
    for (uint32_t i = lane; i < d; i += 32) orow[i] = (xr[i] - mu) * rs * gamma[i] + beta[i];
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = dout·γ, one warp per row.
extern "C" __global__ void layernorm_backward_dx_f32(const float* __restrict__ dout,
                                                     const float* __restrict__ x,
                                                     const float* __restrict__ gamma,
                                                     const float* __restrict__ mean,
                                                     const float* __restrict__ rstd, uint32_t rows,
                                                     uint32_t d, float* __restrict__ dx) {
    const uint32_t row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint64_t base = (uint64_t)row * d;
    const float mu = mean[row], rs = rstd[row];
    float m1 = 0.0f, m2 = 0.0f;
    for (uint32_t i = lane; i < d; i += 32) {
        float dxhat = dout[base + i] * gamma[i];
        m1 += dxhat;
        m2 += dxhat * (x[base + i] - mu) * rs;
    }
    m1 = warp_sum(m1) / d;
    m2 = warp_sum(m2) / d;
    for (uint32_t i = lane; i < d; i += 32) {
        float xhat = (x[base + i] - mu) * rs;
        dx[base + i] += rs * (dout[base + i] * gamma[i] - m1 - xhat * m2);
    }
}

// dγ and dβ are column sums over all rows: each (column block, row chunk)
// writes a partial, and layernorm_backward_params_final_f32 adds the chunks
// in order. Coalesced across columns, deterministic, no atomics.
extern "C" __global__ void layernorm_backward_params_partial_f32(
    const float* __restrict__ dout, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, uint32_t rows, uint32_t d, uint32_t rows_per_chunk,
    float* __restrict__ partial_g, float* __restrict__ partial_b) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (i >= d) return;
    float g = 0.0f, b = 0.0f;
    const uint32_t end = min(rows, (chunk + 1) * rows_per_chunk);
    for (uint32_t r = chunk * rows_per_chunk; r < end; ++r) {
        float dy = dout[(uint64_t)r * d + i];
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

// ---- causal attention ----------------------------------------------------
// qkv rows are [q | k | v] (3·W wide, W = heads·hd), head h in columns
// h·hd..(h+1)·hd of each third, as GPT-2's c_attn writes them. probs is
// [batch][head][query][key], zero above the diagonal.

struct AttnDims {
    uint32_t batch, seq, heads, hd;
    float scale;  // 1/sqrt(hd)
};

__device__ __forceinline__ const float* qkv_row(const float* qkv, const AttnDims& a, uint32_t b,
                                                uint32_t t, uint32_t part, uint32_t h) {
    const uint64_t w = (uint64_t)a.heads * a.hd;
    return qkv + ((uint64_t)b * a.seq + t) * 3 * w + part * w + (uint64_t)h * a.hd;
}

// One warp per (batch, head, query i): scores for keys j ≤ i, softmax, then
// out_i = Σ_j p_ij·v_j. The probability row is written once and reread from
// L1 for the weighted sum.
extern "C" __global__ void attention_forward_f32(const float* __restrict__ qkv, AttnDims a,
                                                 float* __restrict__ out,
                                                 float* __restrict__ probs) {
    const uint64_t rows = (uint64_t)a.batch * a.heads * a.seq;
    const uint64_t row = blockIdx.x * (uint64_t)WARPS_PER_BLOCK + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint32_t i = row % a.seq, h = (row / a.seq) % a.heads, b = row / ((uint64_t)a.seq * a.heads);
    const float* q = qkv_row(qkv, a, b, i, 0, h);
    float* p = probs + row * a.seq;
    float mx = -INFINITY;
    for (uint32_t j = lane; j <= i; j += 32) {
        const float* k = qkv_row(qkv, a, b, j, 1, h);
        float s = 0.0f;
        for (uint32_t e = 0; e < a.hd; ++e) s += q[e] * k[e];
        s *= a.scale;
        p[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (uint32_t j = lane; j <= i; j += 32) {
        float e = expf(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    for (uint32_t j = lane; j < a.seq; j += 32) p[j] = j <= i ? p[j] * inv : 0.0f;
    __syncwarp();
    float* o = out + ((uint64_t)b * a.seq + i) * a.heads * a.hd + (uint64_t)h * a.hd;
    for (uint32_t e = lane; e < a.hd; e += 32) {
        float acc = 0.0f;
        for (uint32_t j = 0; j <= i; ++j) acc += p[j] * qkv_row(qkv, a, b, j, 2, h)[e];
        o[e] = acc;
    }
}

// Softmax backward for query row i: dp_j = dout_i·v_j, ds_j = p_ij·(dp_j − Σ_k p_ik·dp_k).
// Per-query kernel: writes dq_i = scale·Σ_j ds_j·k_j and the row's
// Σ_k p_ik·dp_k (`rowdot`) that the per-key kernel needs, so no
// batch·heads·seq² buffer of ds is ever stored. Uses seq floats of shared
// memory per warp for the ds row.
extern "C" __global__ void attention_backward_query_f32(const float* __restrict__ dout,
                                                        const float* __restrict__ qkv,
                                                        const float* __restrict__ probs, AttnDims a,
                                                        float* __restrict__ rowdot,
                                                        float* __restrict__ dqkv) {
    extern __shared__ float ds_rows[];
    // Warps per block come from the launch: long sequences get fewer warps
    // so their ds rows still fit in shared memory.
    const uint64_t rows = (uint64_t)a.batch * a.heads * a.seq;
    const uint64_t row = blockIdx.x * (uint64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    float* ds = ds_rows + (threadIdx.x / 32) * a.seq;
    const uint32_t i = row % a.seq, h = (row / a.seq) % a.heads, b = row / ((uint64_t)a.seq * a.heads);
    const float* dout_i = dout + ((uint64_t)b * a.seq + i) * a.heads * a.hd + (uint64_t)h * a.hd;
    const float* p = probs + row * a.seq;
    float dot = 0.0f;
    for (uint32_t j = lane; j <= i; j += 32) {
        const float* v = qkv_row(qkv, a, b, j, 2, h);
        float dp = 0.0f;
        for (uint32_t e = 0; e < a.hd; ++e) dp += dout_i[e] * v[e];
        ds[j] = dp;
        dot += p[j] * dp;
    }
    dot = warp_sum(dot);
    for (uint32_t j = lane; j <= i; j += 32) ds[j] = p[j] * (ds[j] - dot);
    if (lane == 0) rowdot[row] = dot;
    __syncwarp();
    float* dq = dqkv + ((uint64_t)b * a.seq + i) * 3 * a.heads * a.hd + (uint64_t)h * a.hd;
    for (uint32_t e = lane; e < a.hd; e += 32) {
        float acc = 0.0f;
        for (uint32_t j = 0; j <= i; ++j) acc += ds[j] * qkv_row(qkv, a, b, j, 1, h)[e];
        dq[e] = a.scale * acc;
    }
}

// Per-key kernel, one warp per (batch, head, key j): dk_j = scale·Σ_{i≥j} ds_ij·q_i and
// dv_j = Σ_{i≥j} p_ij·dout_i, recomputing ds_ij from p, dout, v and rowdot.
// Summing over queries inside one warp keeps it deterministic.
extern "C" __global__ void attention_backward_key_f32(const float* __restrict__ dout,
                                                      const float* __restrict__ qkv,
                                                      const float* __restrict__ probs, AttnDims a,
                                                      const float* __restrict__ rowdot,
                                                      float* __restrict__ dqkv) {
    const uint64_t rows = (uint64_t)a.batch * a.heads * a.seq;
    const uint64_t row = blockIdx.x * (uint64_t)WARPS_PER_BLOCK + threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint32_t j = row % a.seq, h = (row / a.seq) % a.heads, b = row / ((uint64_t)a.seq * a.heads);
    const uint64_t head_row0 = row - j;  // row index of (b, h, query 0)
    const float* v_j = qkv_row(qkv, a, b, j, 2, h);
    const uint64_t w = (uint64_t)a.heads * a.hd;
    // Each lane owns channels lane, lane+32, ... (hd ≤ 256 → at most 8).
    float dk[8], dv[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) { dk[r] = 0.0f; dv[r] = 0.0f; }
    for (uint32_t i = j; i < a.seq; ++i) {
        const float* dout_i = dout + ((uint64_t)b * a.seq + i) * w + (uint64_t)h * a.hd;
        const float* q_i = qkv_row(qkv, a, b, i, 0, h);
        float part = 0.0f;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            uint32_t e = lane + 32 * r;
            if (e < a.hd) part += dout_i[e] * v_j[e];
        }
        const float dp = warp_sum(part);
        const float p = probs[(head_row0 + i) * a.seq + j];
        const float ds = p * (dp - rowdot[head_row0 + i]);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            uint32_t e = lane + 32 * r;
            if (e < a.hd) { dk[r] += ds * q_i[e]; dv[r] += p * dout_i[e]; }
        }
    }
    float* dk_out = dqkv + ((uint64_t)b * a.seq + j) * 3 * w + w + (uint64_t)h * a.hd;
    float* dv_out = dk_out + w;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        uint32_t e = lane + 32 * r;
        if (e < a.hd) { dk_out[e] = a.scale * dk[r]; dv_out[e] = dv[r]; }
    }
}

// ---- elementwise ---------------------------------------------------------

#define GELU_C 0.7978845608028654f  // sqrt(2/pi)

extern "C" __global__ void gelu_forward_f32(const float* __restrict__ x, uint64_t n,
                                            float* __restrict__ out) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(GELU_C * (v + 0.044715f * v * v * v)));
    }
}

extern "C" __global__ void gelu_backward_f32(const float* __restrict__ dout,
                                             const float* __restrict__ x, uint64_t n,
                                             float* __restrict__ dx) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(GELU_C * (v + 0.044715f * v * v * v));
        float du = GELU_C * (1.0f + 3.0f * 0.044715f * v * v);
        dx[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}

extern "C" __global__ void add_assign_f32(float* __restrict__ y, const float* __restrict__ x,
                                          uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

// ---- softmax cross-entropy -----------------------------------------------

// One block per row. Reads the logits three times (max, Σexp, loss/grad) and
// overwrites them with the gradient in the last pass, so the probabilities
// never take a buffer of their own. Ties in argmax go to the lowest index,
// as on the CPU. Targets were range-checked by the wrapper.
extern "C" __global__ void cross_entropy_f32(float* __restrict__ logits,
                                             const uint32_t* __restrict__ targets, uint32_t vocab,
                                             uint32_t write_grad, float grad_scale,
                                             float* __restrict__ losses,
                                             uint32_t* __restrict__ correct) {
    __shared__ float s_val[WARPS_PER_BLOCK];
    __shared__ uint32_t s_idx[WARPS_PER_BLOCK];
    __shared__ float s_target_logit;
    const uint64_t row = blockIdx.x;
    float* l = logits + row * vocab;
    const uint32_t target = targets[row];
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (target == 0xffffffffu) {  // IGNORE
        if (write_grad)
            for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) l[c] = 0.0f;
        if (threadIdx.x == 0) { losses[row] = 0.0f; correct[row] = 0; }
        return;
    }
    float mx = -INFINITY;
    uint32_t arg = 0xffffffffu;
    for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x)
        if (l[c] > mx) { mx = l[c]; arg = c; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, mx, o);
        uint32_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (om > mx || (om == mx && oa < arg)) { mx = om; arg = oa; }
    }
    if (lane == 0) { s_val[warp] = mx; s_idx[warp] = arg; }
    if (threadIdx.x == 0) s_target_logit = l[target];
    __syncthreads();
    mx = s_val[0];
    arg = s_idx[0];
    for (int w = 1; w < WARPS_PER_BLOCK; ++w)
        if (s_val[w] > mx || (s_val[w] == mx && s_idx[w] < arg)) { mx = s_val[w]; arg = s_idx[w]; }
    __syncthreads();
    float sum = 0.0f;
    for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) sum += expf(l[c] - mx);
    sum = warp_sum(sum);
    if (lane == 0) s_val[warp] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int w = 0; w < WARPS_PER_BLOCK; ++w) sum += s_val[w];
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        losses[row] = lse - s_target_logit;
        correct[row] = arg == target;
    }
    if (write_grad)
        for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x)
            l[c] = grad_scale * (expf(l[c] - lse) - (c == target ? 1.0f : 0.0f));
}

// ---- optimiser and norms -------------------------------------------------

struct AdamWArgs {
    double lr, beta1, beta2, eps, weight_decay, grad_scale;
    double correction1, correction2;  // 1 − β^step
};

// Decoupled weight decay, then the bias-corrected Adam step, in double like
// the CPU twin (the kernel is memory-bound; the extra arithmetic is free).
extern "C" __global__ void adamw_f32(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, uint64_t n,
                                     AdamWArgs a) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        double g = (double)grad[i] * a.grad_scale;
        double mi = a.beta1 * m[i] + (1.0 - a.beta1) * g;
        double vi = a.beta2 * v[i] + (1.0 - a.beta2) * g * g;
        double p = param[i];
        p -= a.lr * a.weight_decay * p;
        p -= a.lr * (mi / a.correction1) / (sqrt(vi / a.correction2) + a.eps);
        m[i] = (float)mi;
        v[i] = (float)vi;
        param[i] = (float)p;
    }
}

// Σx² in double: per-block partials, then one block adds them in order.
extern "C" __global__ void sum_squares_partial_f32(const float* __restrict__ x, uint64_t n,
                                                   double* __restrict__ partial) {
    __shared__ double s[TRAIN_THREADS];
    double acc = 0.0;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x)
        acc += (double)x[i] * (double)x[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

extern "C" __global__ void sum_squares_final_f32(const double* __restrict__ partial,
                                                 uint32_t blocks, double* __restrict__ out) {
    __shared__ double s[TRAIN_THREADS];
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += partial[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = s[0];
}
