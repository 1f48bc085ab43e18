// The trainer's non-GEMM ops (crate::train::ops::TrainOps) in mixed
// precision: T (f32, f16 or bf16) is the compute dtype of every activation
// that feeds or leaves a GEMM; the residual stream, its gradient, LayerNorm
// statistics, parameter gradients and optimizer state are f32, and all
// arithmetic is f32. The CPU twin is src/cpu/train.rs; the wrappers are
// src/cuda/train.rs; attention has its own family (kernels/attention.cu).
// Every reduction runs in a fixed order: no float atomics, so a training
// step gives the same bits on every run. scripts/kernel-emu runs these
// kernels on the CPU (one OS thread per CUDA thread) against f64 references.
#include "common.cuh"

#define TRAIN_THREADS 256
#define WARPS_PER_BLOCK (TRAIN_THREADS / 32)

#define GRID_STRIDE(i, n)                                                    \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < (n); \
         i += (uint64_t)gridDim.x * blockDim.x)

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

// dwte[tok] += Σ dout[row] over the rows holding tok. One block per distinct
// token, rows visited in the order the host sorted them (`order`, grouped by
// `starts`), so duplicate tokens sum deterministically without atomics.
// dout is the f32 residual gradient; dwte is only wanted in full
// fine-tuning.
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

// One warp per row of the f32 residual stream: mean, then variance around
// it (two passes over a row that sits in L1), then the normalised output in
// T, which is what the next GEMM reads (no separate cast pass).
template <typename T>
__device__ void layernorm_forward_impl(const float* __restrict__ x, const T* __restrict__ gamma,
                                       const T* __restrict__ beta, float eps, uint32_t rows, uint32_t d,
                                       T* __restrict__ out, float* __restrict__ mean,
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
    T* orow = out + (uint64_t)row * d;
    for (uint32_t i = lane; i < d; i += 32)
        orow[i] = from_f32<T>((xr[i] - mu) * rs * to_f32(gamma[i]) + to_f32(beta[i]));
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = dout·γ, one warp per
// row. dx is the f32 residual gradient, accumulated in place so the
// residual branch's gradient needs no extra add pass.
template <typename T>
__device__ void layernorm_backward_dx_impl(const T* __restrict__ dout, const float* __restrict__ x,
                                           const T* __restrict__ gamma, const float* __restrict__ mean,
                                           const float* __restrict__ rstd, uint32_t rows, uint32_t d,
                                           float* __restrict__ dx) {
    const uint32_t row = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint64_t base = (uint64_t)row * d;
    const float mu = mean[row], rs = rstd[row];
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

template <typename T>
__device__ void gelu_forward_impl(const T* __restrict__ x, uint64_t n, T* __restrict__ out) {
    GRID_STRIDE(i, n) {
        float v = to_f32(x[i]);
        out[i] = from_f32<T>(0.5f * v * (1.0f + tanhf(GELU_C * (v + 0.044715f * v * v * v))));
    }
}

template <typename T>
__device__ void gelu_backward_impl(const T* __restrict__ dout, const T* __restrict__ x, uint64_t n,
                                   T* __restrict__ dx) {
    GRID_STRIDE(i, n) {
        float v = to_f32(x[i]);
        float t = tanhf(GELU_C * (v + 0.044715f * v * v * v));
        float du = GELU_C * (1.0f + 3.0f * 0.044715f * v * v);
        dx[i] = from_f32<T>(to_f32(dout[i]) * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du));
    }
}

// out = x + y: the residual add, reading the GEMM's T output and writing
// the f32 stream (x stays: the LayerNorm backward needs it).
template <typename T>
__device__ void residual_add_impl(const float* __restrict__ x, const T* __restrict__ y, uint64_t n,
                                  float* __restrict__ out) {
    GRID_STRIDE(i, n) out[i] = x[i] + to_f32(y[i]);
}

// out = (T) x: the residual gradient entering a GEMM backward, and the bf16
// working copy of the f32 master weights.
template <typename T>
__device__ void cast_from_f32_impl(const float* __restrict__ x, uint64_t n, T* __restrict__ out) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(x[i]);
}

// ---- softmax cross-entropy -----------------------------------------------

// One block per row. Reads the logits three times (max, Σexp, loss/grad) and
// overwrites them with the gradient in the last pass, so the probabilities
// never take a buffer of their own. Ties in argmax go to the lowest index,
// as on the CPU. Targets were range-checked on the host; a target that is
// out of range on the device anyway gets a NaN loss, never a stray read.
template <typename T>
__device__ void cross_entropy_impl(T* __restrict__ logits, const uint32_t* __restrict__ targets, uint32_t vocab,
                                   uint32_t write_grad, float grad_scale, float* __restrict__ losses,
                                   uint32_t* __restrict__ correct) {
    __shared__ float s_val[WARPS_PER_BLOCK];
    __shared__ uint32_t s_idx[WARPS_PER_BLOCK];
    __shared__ float s_target_logit;
    const uint64_t row = blockIdx.x;
    T* l = logits + row * vocab;
    const uint32_t target = targets[row];
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (target == 0xffffffffu || target >= vocab) {  // IGNORE (or a corrupt target)
        if (write_grad)
            for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) l[c] = from_f32<T>(0.0f);
        if (threadIdx.x == 0) {
            losses[row] = target == 0xffffffffu ? 0.0f : __int_as_float(0x7fc00000);
            correct[row] = 0;
        }
        return;
    }
    float mx = -INFINITY;
    uint32_t arg = 0xffffffffu;
    for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = to_f32(l[c]);
        if (v > mx) { mx = v; arg = c; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, mx, o);
        uint32_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (om > mx || (om == mx && oa < arg)) { mx = om; arg = oa; }
    }
    if (lane == 0) { s_val[warp] = mx; s_idx[warp] = arg; }
    if (threadIdx.x == 0) s_target_logit = to_f32(l[target]);
    __syncthreads();
    mx = s_val[0];
    arg = s_idx[0];
    for (int w = 1; w < WARPS_PER_BLOCK; ++w)
        if (s_val[w] > mx || (s_val[w] == mx && s_idx[w] < arg)) { mx = s_val[w]; arg = s_idx[w]; }
    __syncthreads();
    float sum = 0.0f;
    for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) sum += expf(to_f32(l[c]) - mx);
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
            l[c] = from_f32<T>(grad_scale * (expf(to_f32(l[c]) - lse) - (c == target ? 1.0f : 0.0f)));
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
                                                     uint32_t d, T* __restrict__ out,                      \
                                                     float* __restrict__ mean, float* __restrict__ rstd) { \
        layernorm_forward_impl<T>(x, gamma, beta, eps, rows, d, out, mean, rstd);                          \
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
    extern "C" __global__ void gelu_forward_##S(const T* __restrict__ x, uint64_t n, T* __restrict__ out) { \
        gelu_forward_impl<T>(x, n, out);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void gelu_backward_##S(const T* __restrict__ dout, const T* __restrict__ x,       \
                                                 uint64_t n, T* __restrict__ dx) {                         \
        gelu_backward_impl<T>(dout, x, n, dx);                                                             \
    }                                                                                                     \
    extern "C" __global__ void residual_add_##S(const float* __restrict__ x, const T* __restrict__ y,      \
                                                uint64_t n, float* __restrict__ out) {                     \
        residual_add_impl<T>(x, y, n, out);                                                                \
    }                                                                                                     \
    extern "C" __global__ void cast_from_f32_##S(const float* __restrict__ x, uint64_t n,                  \
                                                 T* __restrict__ out) {                                    \
        cast_from_f32_impl<T>(x, n, out);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void cross_entropy_##S(T* __restrict__ logits, const uint32_t* __restrict__ targets, \
                                                 uint32_t vocab, uint32_t write_grad, float grad_scale,    \
                                                 float* __restrict__ losses, uint32_t* __restrict__ correct) { \
        cross_entropy_impl<T>(logits, targets, vocab, write_grad, grad_scale, losses, correct);            \
    }

LORAFUSE_FOR_EACH_DTYPE(TRAIN_KERNELS)

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
