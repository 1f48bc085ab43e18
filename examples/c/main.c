/*
 * A serving engine's view of lorafuse through its C ABI (include/lorafuse.h):
 * one fused LoRA linear layer, then one multi-adapter decode step over a
 * pool holding a LoRA adapter, a LoRA adapter with scaling vectors, an
 * adapter over shared frozen factors (VeRA-style) and a Uni-LoRA adapter
 * served from θ, with one row that uses no adapter.
 *
 *   ./lorafuse_example          CPU backend (host pointers)
 *   ./lorafuse_example cuda     also the CUDA forms (built with -DLORAFUSE_EXAMPLE_CUDA)
 *
 * stdout: one line per output element, `<op> <index> <f32 bits in hex>`,
 * from the CPU backend; examples/c/reference.rs prints the same lines from
 * the Rust API and the Makefile diffs the two. With `cuda`, the CUDA
 * results are checked against the CPU ones within a derived bound
 * (stderr), and the program exits 1 if any element is outside it.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lorafuse.h"

#define CHECK(call)                                                                                   \
    do {                                                                                              \
        int32_t status_ = (call);                                                                     \
        if (status_ != LORAFUSE_OK) {                                                                 \
            fprintf(stderr, "%s:%d: %s failed (status %d): %s\n", __FILE__, __LINE__, #call, status_, \
                    lorafuse_last_error());                                                           \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

/* Inputs both this program and reference.rs draw: a 32-bit integer hash of
 * (stream, index) mapped exactly onto a float in [-1, 1). */
static float value(uint32_t stream, uint32_t i) {
    uint32_t h = (i * 0x9E3779B1u) ^ (stream * 0x85EBCA77u + 0x165667B1u);
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

/* n values of `stream`, or their absolute values (for error bounds). */
static float* draw(uint32_t stream, size_t n, int absolute) {
    float* v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; ++i) v[i] = absolute ? fabsf(value(stream, (uint32_t)i)) : value(stream, (uint32_t)i);
    return v;
}

/* The problem (shared with reference.rs). */
enum { LM = 4, LK = 64, LN = 48, LR = 8 };        /* fused linear */
enum { PK = 64, PN = 48, DM = 6 };                /* pool module, decode rows */
static const int32_t IDS[DM] = {1, -1, 0, 2, 3, 1};
enum { UNI_ROWS = 1024, UNI_D = 37, UNI_RANK = 4 };

struct Outputs {
    float linear[LM * LN];
    float decode[DM * PN];
};

/* Builds the pool (CPU or CUDA) and fills its four slots. */
static lorafuse_pool* make_pool(int cuda, int absolute) {
    lorafuse_pool* pool = NULL;
    if (cuda) CHECK(lorafuse_pool_create_cuda(0, LORAFUSE_F32, PK, PN, 1, 4, 256, 4096, &pool));
    else CHECK(lorafuse_pool_create_cpu(LORAFUSE_F32, PK, PN, 1, 4, 256, 4096, &pool));
    float *a0 = draw(10, 8 * PK, absolute), *b0 = draw(11, PN * 8, absolute);
    CHECK(lorafuse_pool_fill_lora(pool, 0, 8, 0.25f, a0, b0, NULL, NULL));
    float *a1 = draw(12, 16 * PK, absolute), *b1 = draw(13, PN * 16, absolute);
    float *u1 = draw(14, 16, absolute), *v1 = draw(15, PN, absolute);
    CHECK(lorafuse_pool_fill_lora(pool, 1, 16, 0.125f, a1, b1, u1, v1));
    float *as = draw(16, 32 * PK, absolute), *bs = draw(17, PN * 32, absolute);
    int64_t shared = -1;
    CHECK(lorafuse_pool_add_shared_factors(pool, 32, as, bs, &shared));
    float *u2 = draw(18, 32, absolute), *v2 = draw(19, PN, absolute);
    CHECK(lorafuse_pool_fill_shared(pool, 2, shared, 1.0f, u2, v2));
    int64_t proj = -1;
    CHECK(lorafuse_pool_add_projection(pool, UNI_ROWS, UNI_D, 42, LORAFUSE_ASSIGN_BALANCED, &proj));
    float* theta = draw(20, UNI_D, absolute);
    const uint64_t a_start[1] = {100}, b_start[1] = {600};
    CHECK(lorafuse_pool_fill_unilora(pool, 3, proj, UNI_RANK, 0.5f, theta, a_start, b_start));
    free(a0), free(b0), free(a1), free(b1), free(u1), free(v1), free(as), free(bs), free(u2), free(v2), free(theta);
    return pool;
}

static void run_cpu(struct Outputs* out, int absolute) {
    float *x = draw(1, LM * LK, absolute), *w = draw(2, LN * LK, absolute), *bias = draw(3, LN, absolute);
    float *a = draw(4, LR * LK, absolute), *b = draw(5, LN * LR, absolute);
    CHECK(lorafuse_lora_linear_cpu(LORAFUSE_F32, LM, LK, LN, LR, x, w, bias, a, b, NULL, NULL, 0.5f, out->linear));
    lorafuse_pool* pool = make_pool(0, absolute);
    float *xd = draw(30, DM * PK, absolute), *y0 = draw(31, DM * PN, absolute);
    memcpy(out->decode, y0, sizeof out->decode);
    CHECK(lorafuse_multi_adapter_add(pool, NULL, 0, DM, IDS, xd, out->decode));
    CHECK(lorafuse_pool_destroy(pool));
    free(x), free(w), free(bias), free(a), free(b), free(xd), free(y0);
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

#ifdef LORAFUSE_EXAMPLE_CUDA
#include <cuda.h>

#define CU(call)                                                                   \
    do {                                                                           \
        CUresult r_ = (call);                                                      \
        if (r_ != CUDA_SUCCESS) {                                                  \
            fprintf(stderr, "%s:%d: %s failed (CUresult %d)\n", __FILE__, __LINE__, #call, (int)r_); \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

static CUdeviceptr upload(const float* host, size_t n) {
    CUdeviceptr d;
    CU(cuMemAlloc(&d, n * sizeof(float)));
    CU(cuMemcpyHtoD(d, host, n * sizeof(float)));
    return d;
}

static void run_cuda(struct Outputs* out) {
    CUdevice dev;
    CUcontext ctx;
    CUstream stream;
    CU(cuInit(0));
    CU(cuDeviceGet(&dev, 0));
    CU(cuDevicePrimaryCtxRetain(&ctx, dev));
    CU(cuCtxSetCurrent(ctx));
    CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    float *x = draw(1, LM * LK, 0), *w = draw(2, LN * LK, 0), *bias = draw(3, LN, 0);
    float *a = draw(4, LR * LK, 0), *b = draw(5, LN * LR, 0);
    CUdeviceptr dx = upload(x, LM * LK), dw = upload(w, LN * LK), dbias = upload(bias, LN);
    CUdeviceptr da = upload(a, LR * LK), db = upload(b, LN * LR), dy;
    CU(cuMemAlloc(&dy, sizeof out->linear));
    CHECK(lorafuse_lora_linear_cuda(stream, LORAFUSE_F32, LM, LK, LN, LR, (const void*)dx, (const void*)dw,
                                    (const void*)dbias, (const float*)da, (const float*)db, NULL, NULL, 0.5f,
                                    (void*)dy));
    CU(cuMemcpyDtoHAsync(out->linear, dy, sizeof out->linear, stream));
    lorafuse_pool* pool = make_pool(1, 0);
    float *xd = draw(30, DM * PK, 0), *y0 = draw(31, DM * PN, 0);
    CUdeviceptr dxd = upload(xd, DM * PK), dyd = upload(y0, DM * PN);
    CHECK(lorafuse_multi_adapter_add(pool, stream, 0, DM, IDS, (const void*)dxd, (void*)dyd));
    CU(cuMemcpyDtoHAsync(out->decode, dyd, sizeof out->decode, stream));
    CU(cuStreamSynchronize(stream));
    CHECK(lorafuse_pool_destroy(pool));
    const CUdeviceptr buffers[] = {dx, dw, dbias, da, db, dy, dxd, dyd};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i) CU(cuMemFree(buffers[i]));
    free(x), free(w), free(bias), free(a), free(b), free(xd), free(y0);
}

/* |cuda − cpu| ≤ (terms + 1)·2⁻²⁴·mag + 2⁻²⁴·|cpu|: f32 dot products of
 * length `terms` (K + r + 4) against the CPU's f64 result, with mag the
 * same computation on absolute values (the sum of term magnitudes). */
static int compare(const char* op, const float* got, const float* cpu, const float* mag, size_t n, int terms) {
    double worst = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double bound = (terms + 1) * ldexp(1.0, -24) * mag[i] + ldexp(1.0, -24) * fabs(cpu[i]);
        double ratio = fabs((double)got[i] - cpu[i]) / bound;
        if (!(ratio <= worst)) worst = ratio;
    }
    fprintf(stderr, "cuda %s: worst error / derived bound = %.3f%s\n", op, worst, worst <= 1.0 ? "" : "  FAILED");
    return worst <= 1.0;
}
#endif

int main(int argc, char** argv) {
    if (lorafuse_version() != LORAFUSE_VERSION) {
        fprintf(stderr, "header %d and library %u versions differ\n", LORAFUSE_VERSION, lorafuse_version());
        return 1;
    }
    fprintf(stderr, "lorafuse %s\n", lorafuse_version_string());
    static struct Outputs cpu;
    run_cpu(&cpu, 0);
    for (int i = 0; i < LM * LN; ++i) printf("linear %d %08x\n", i, bits(cpu.linear[i]));
    for (int i = 0; i < DM * PN; ++i) printf("decode %d %08x\n", i, bits(cpu.decode[i]));
    /* The row with id −1 must be untouched. */
    for (int j = 0; j < PN; ++j) {
        if (cpu.decode[1 * PN + j] != value(31, (uint32_t)(1 * PN + j))) {
            fprintf(stderr, "decode row 1 has no adapter but changed\n");
            return 1;
        }
    }
    if (argc > 1 && strcmp(argv[1], "cuda") == 0) {
#ifdef LORAFUSE_EXAMPLE_CUDA
        static struct Outputs gpu, mag;
        run_cuda(&gpu);
        run_cpu(&mag, 1);
        int ok = compare("linear", gpu.linear, cpu.linear, mag.linear, LM * LN, LK + LR + 4);
        ok &= compare("decode", gpu.decode, cpu.decode, mag.decode, DM * PN, PK + 32 + 4);
        return ok ? 0 : 1;
#else
        fprintf(stderr, "built without -DLORAFUSE_EXAMPLE_CUDA: `make run-cuda` builds the CUDA part\n");
        return 1;
#endif
    }
    return 0;
}
