/*
 * lorafuse.h: the C ABI of lorafuse (fused LoRA linear layers and many
 * adapters in one batch), for serving engines written in C, C++ or any
 * language with a C FFI.
 *
 * Link liblorafuse.a (plus -lpthread -ldl -lm; see examples/c/Makefile) or
 * liblorafuse.so, built by `cargo build --release`. Built with NVCC set,
 * the library carries the CUDA kernels; without, the *_cuda functions
 * return LORAFUSE_ERR_KERNELS_NOT_BUILT and the *_cpu forms still work.
 *
 * Conventions for every function:
 * - The return value is a status: LORAFUSE_OK (0) or a LORAFUSE_ERR_* code.
 *   lorafuse_last_error() then returns a message saying what was wrong and
 *   how to fix it (per calling thread, valid until that thread's next
 *   lorafuse call). A failed call writes no output.
 * - Matrices are dense and row-major (C order), without padding: an M×K
 *   matrix is M·K consecutive elements, element (i, k) at index i·K + k.
 *   W and B follow PyTorch's nn.Linear layout (N×K and N×r).
 * - `dtype` is LORAFUSE_F32, LORAFUSE_F16 or LORAFUSE_BF16: the element type
 *   of the activations x, y (and W, bias). Adapter parameters (A, B, u, v,
 *   theta) are always float (f32). Arithmetic accumulates in f32 (CUDA) or
 *   f64 (CPU); outputs are rounded once to `dtype`.
 * - Pointers are host pointers in *_cpu functions and in CPU pools, device
 *   pointers in *_cuda functions and in CUDA pools, except ids, starts,
 *   a_start and b_start, and everything passed to lorafuse_pool_fill_* and
 *   lorafuse_pool_add_*, which are always host pointers (a fill copies
 *   them into the pool). Pointers must be aligned to their element size.
 *   Optional operands are NULL when absent (u, v: all ones; bias: zeros).
 * - CUDA work is ordered on the caller's `stream` (NULL: the legacy default
 *   stream) without host synchronisation; the stream must belong to the
 *   device's primary context (the CUDA runtime's context). Inputs must
 *   stay valid until that work completes on the stream.
 * - Calls on one pool must not run concurrently; different pools may.
 * - Nothing unwinds into C: an internal panic returns LORAFUSE_ERR_PANIC.
 *
 * This header is checked against src/capi.rs by tests/capi.rs.
 */
#ifndef LORAFUSE_H
#define LORAFUSE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if !defined(__cuda_cuda_h__)
/* The driver API's stream handle (cuda.h); a cudaStream_t is the same. */
typedef struct CUstream_st* CUstream;
#endif

/* Version of the library this header belongs to: compare with
 * lorafuse_version() to detect a mismatched library at run time. */
#define LORAFUSE_VERSION_MAJOR 0
#define LORAFUSE_VERSION_MINOR 1
#define LORAFUSE_VERSION_PATCH 0
#define LORAFUSE_VERSION (LORAFUSE_VERSION_MAJOR * 10000 + LORAFUSE_VERSION_MINOR * 100 + LORAFUSE_VERSION_PATCH)

/* Status codes. */
#define LORAFUSE_OK 0
#define LORAFUSE_ERR_INVALID 1            /* an argument or setting is invalid */
#define LORAFUSE_ERR_SHAPE 2              /* an operand has the wrong size */
#define LORAFUSE_ERR_DTYPE 3              /* an operand has the wrong dtype */
#define LORAFUSE_ERR_INDEX 4              /* slot, layer, id or handle out of range */
#define LORAFUSE_ERR_NON_FINITE 5         /* a NaN or infinite value where finite is required */
#define LORAFUSE_ERR_NULL_POINTER 6       /* a required pointer is NULL or misaligned */
#define LORAFUSE_ERR_NO_DEVICE 7          /* no usable CUDA device or driver */
#define LORAFUSE_ERR_KERNELS_NOT_BUILT 8  /* the library was built without nvcc */
#define LORAFUSE_ERR_CUDA 9               /* a CUDA driver or library call failed */
#define LORAFUSE_ERR_OTHER 10             /* anything else */
#define LORAFUSE_ERR_PANIC 11             /* an internal bug; please report it */

/* Element types of x, y, W, bias (`dtype` arguments). */
#define LORAFUSE_F32 0
#define LORAFUSE_F16 1
#define LORAFUSE_BF16 2

/* Uni-LoRA projection assignments (lorafuse_pool_add_projection). */
#define LORAFUSE_ASSIGN_HASH 0
#define LORAFUSE_ASSIGN_BALANCED 1

/* An adapter pool: the adapters of one module type (one K×N projection,
 * e.g. every layer's q_proj) for `layers` layers, in host memory (CPU) or
 * device memory (CUDA), filled and evicted by slot. Opaque. */
typedef struct LorafusePool lorafuse_pool;

/* ---- version and errors ---------------------------------------------------- */

/* major·10000 + minor·100 + patch of the linked library. */
uint32_t lorafuse_version(void);

/* The linked library's version as a static NUL-terminated string, e.g. "0.1.0". */
const char* lorafuse_version_string(void);

/* The calling thread's last error message ("" after a successful call). */
const char* lorafuse_last_error(void);

/* ---- fused LoRA linear -------------------------------------------------------
 *
 *   y = x·Wᵀ + bias + scale·(((x·Aᵀ) ⊙ u)·Bᵀ) ⊙ v
 *
 * x: m×k (dtype), w: n×k (dtype), bias: n (dtype) or NULL,
 * a: r×k (f32), b: n×r (f32), u: r (f32) or NULL, v: n (f32) or NULL,
 * y: m×n (dtype), overwritten. 1 ≤ r ≤ 256. `scale` is α/r (or α/√r).
 * Plain LoRA passes u = v = NULL; Tied-LoRA and VeRA pass their vectors. */

/* On the CPU (f64 oracle), host pointers. */
int32_t lorafuse_lora_linear_cpu(int32_t dtype, int64_t m, int64_t k, int64_t n, int64_t r, const void* x,
                                 const void* w, const void* bias, const float* a, const float* b, const float* u,
                                 const float* v, float scale, void* y);

/* On the GPU, device pointers, ordered on `stream` (cuBLAS for x·Wᵀ, the
 * fused kernels of kernels/lowrank.cu for the low-rank term). */
int32_t lorafuse_lora_linear_cuda(CUstream stream, int32_t dtype, int64_t m, int64_t k, int64_t n, int64_t r,
                                  const void* x, const void* w, const void* bias, const float* a, const float* b,
                                  const float* u, const float* v, float scale, void* y);

/* ---- adapter pools ------------------------------------------------------------
 *
 * A pool for activations of `dtype` holds up to `slots` adapters for a K×N
 * module (k input, n output features) in `layers` layers. Storage:
 * - `rank_rows`: the factor arena, in rank rows. An adapter's A and B of
 *   rank r take r rows (r·k + r·n elements of dtype) per stored pair: per
 *   layer for LoRA, once for Tied-LoRA, once per shared set (VeRA).
 * - `floats`: the f32 arena for u (r), v (n) per layer, Uni-LoRA's theta
 *   (d per adapter) and each projection's column scales (d).
 * Ranks are 1..128 and may differ between adapters. */

/* Creates a pool in host memory; `*out` receives the handle. */
int32_t lorafuse_pool_create_cpu(int32_t dtype, int64_t k, int64_t n, int64_t layers, int64_t slots,
                                 int64_t rank_rows, int64_t floats, lorafuse_pool** out);

/* Creates a pool in the memory of CUDA device `device` (its primary context). */
int32_t lorafuse_pool_create_cuda(int32_t device, int32_t dtype, int64_t k, int64_t n, int64_t layers,
                                  int64_t slots, int64_t rank_rows, int64_t floats, lorafuse_pool** out);

/* Frees a pool and all it holds (NULL: no-op). Wait for its pending work first. */
int32_t lorafuse_pool_destroy(lorafuse_pool* pool);

/* Fills the empty `slot` with a LoRA adapter of rank `rank` and scale `scale`:
 * a: layers×rank×k, b: layers×n×rank (layer l's A and B at offsets l·rank·k
 * and l·n·rank), u: layers×rank or NULL, v: layers×n or NULL; all f32, host.
 * Factors are stored in the pool's dtype. */
int32_t lorafuse_pool_fill_lora(lorafuse_pool* pool, int64_t slot, int64_t rank, float scale, const float* a,
                                const float* b, const float* u, const float* v);

/* Fills `slot` with a Tied-LoRA adapter (trained A, B shared by all layers):
 * a: rank×k, b: n×rank, u: layers×rank or NULL, v: layers×n or NULL. */
int32_t lorafuse_pool_fill_tied(lorafuse_pool* pool, int64_t slot, int64_t rank, float scale, const float* a,
                                const float* b, const float* u, const float* v);

/* Stores VeRA's frozen A (rank×k) and B (n×rank) drawn from `seed` as
 * lorafuse's VeRA initialisation draws them (LowRankConfig::init_factors),
 * once for every adapter trained from that seed; `*out_id` receives their id. */
int32_t lorafuse_pool_add_vera_factors(lorafuse_pool* pool, int64_t rank, uint64_t seed, int64_t* out_id);

/* Stores given frozen factors once (a: rank×k, b: n×rank, f32, host) for
 * many adapters (VeRA, Tied-LoRA with frozen A, B); `*out_id` receives their id. */
int32_t lorafuse_pool_add_shared_factors(lorafuse_pool* pool, int64_t rank, const float* a, const float* b,
                                         int64_t* out_id);

/* Fills `slot` with an adapter over shared factors `factors`: it stores only
 * u (layers×rank or NULL) and v (layers×n or NULL), rank of the factors. */
int32_t lorafuse_pool_fill_shared(lorafuse_pool* pool, int64_t slot, int64_t factors, float scale, const float* u,
                                  const float* v);

/* Registers Uni-LoRA's projection P (D = rows, d = cols, drawn from `seed`
 * with LORAFUSE_ASSIGN_HASH or LORAFUSE_ASSIGN_BALANCED, as lorafuse's
 * Projection::new draws it); `*out_id` receives its id. */
int32_t lorafuse_pool_add_projection(lorafuse_pool* pool, uint64_t rows, uint32_t cols, uint64_t seed,
                                     int32_t assignment, int64_t* out_id);

/* Fills `slot` with a Uni-LoRA adapter served from theta alone: theta is
 * θ_d (d f32, host); layer l's A (rank×k) starts at row a_start[l] of
 * θ_D = P·θ_d and its B (n×rank) at row b_start[l] (both arrays: layers
 * entries, host). A and B are gathered inside the kernels, never stored. */
int32_t lorafuse_pool_fill_unilora(lorafuse_pool* pool, int64_t slot, int64_t projection, int64_t rank, float scale,
                                   const float* theta, const uint64_t* a_start, const uint64_t* b_start);

/* Empties `slot`; its storage returns to the pool. */
int32_t lorafuse_pool_evict(lorafuse_pool* pool, int64_t slot);

/* ---- many adapters in one batch -------------------------------------------------
 *
 *   y[i] += s_a · (((x[i]·A_aᵀ) ⊙ u_a)·B_aᵀ) ⊙ v_a,   a = the slot row i uses
 *
 * in layer `layer` of the pool; slot −1 leaves the row unchanged. x: m×k,
 * y: m×n (m rows), the pool's dtype; host pointers for a CPU pool (stream
 * must be NULL), device pointers for a CUDA pool. ids and starts are host
 * pointers. Results are deterministic and a row's result does not depend
 * on the other rows of the batch. */

/* Decode form (one id per row): ids has m entries. */
int32_t lorafuse_multi_adapter_add(lorafuse_pool* pool, CUstream stream, int64_t layer, int64_t m,
                                   const int32_t* ids, const void* x, void* y);

/* Prefill form: segment s is rows starts[s]..starts[s+1]-1 and uses ids[s];
 * starts has segments+1 non-decreasing entries from 0 (its last is m), ids
 * has `segments` entries. */
int32_t lorafuse_multi_adapter_add_segments(lorafuse_pool* pool, CUstream stream, int64_t layer, int64_t segments,
                                            const int64_t* starts, const int32_t* ids, const void* x, void* y);

#ifdef __cplusplus
}
#endif

#endif /* LORAFUSE_H */
