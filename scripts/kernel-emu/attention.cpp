// Emulated run of kernels/attention.cu against a direct f64 reference (the
// textbook loops, written independently of src/cpu/attention.rs), for
// checking the kernels' indexing on a machine without a GPU. Same shapes,
// input rounding and NaN-poisoned outputs as the GPU tests in
// tests/attention.rs: f32 runs the CUDA-core kernels, f16 and bf16 the
// tensor-core ones, whose mma/ldmatrix/cp.async primitives emu.h emulates
// and this file first checks against plain matrix products and copies.
// Build and run with scripts/kernel-emu/run.sh attention [dtype].
#include "emu.h"

// Every block's dynamic shared memory (blocks run one at a time).
alignas(128) float attn_smem[1 << 16];

// attention.cu declares only `extern __shared__ float attn_smem[]`, which
// must name the array above, not a static.
#undef __shared__
#define __shared__

#include "attention.cu"

#include <random>
#include <string>

struct Shape {
    int batch, seq, heads, hd;
    int w() const { return heads * hd; }
    size_t tokens() const { return (size_t)batch * seq; }
};

// out, lse from qkv: P = softmax over keys j ≤ i of q_i·k_j/√hd.
static void ref_forward(const std::vector<double>& qkv, Shape s, std::vector<double>& out, std::vector<double>& lse) {
    const int w = s.w();
    const double scale = 1.0 / std::sqrt((double)s.hd);
    out.assign(s.tokens() * w, 0.0);
    lse.assign((size_t)s.batch * s.heads * s.seq, 0.0);
    std::vector<double> sc(s.seq);
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads; ++h)
            for (int i = 0; i < s.seq; ++i) {
                const double* q = &qkv[((size_t)b * s.seq + i) * 3 * w + h * s.hd];
                double mx = -INFINITY;
                for (int j = 0; j <= i; ++j) {
                    const double* k = &qkv[((size_t)b * s.seq + j) * 3 * w + w + h * s.hd];
                    double dot = 0;
                    for (int d = 0; d < s.hd; ++d) dot += q[d] * k[d];
                    sc[j] = dot * scale;
                    mx = std::max(mx, sc[j]);
                }
                double l = 0;
                for (int j = 0; j <= i; ++j) l += std::exp(sc[j] - mx);
                const double ls = mx + std::log(l);
                lse[((size_t)b * s.heads + h) * s.seq + i] = ls;
                double* o = &out[((size_t)b * s.seq + i) * w + h * s.hd];
                for (int j = 0; j <= i; ++j) {
                    const double p = std::exp(sc[j] - ls);
                    const double* v = &qkv[((size_t)b * s.seq + j) * 3 * w + 2 * w + h * s.hd];
                    for (int d = 0; d < s.hd; ++d) o[d] += p * v[d];
                }
            }
}

// dqkv from dout and the forward's out and lse (probabilities recomputed).
static void ref_backward(const std::vector<double>& dout, const std::vector<double>& qkv,
                         const std::vector<double>& out, const std::vector<double>& lse, Shape s,
                         std::vector<double>& dqkv) {
    const int w = s.w();
    const double scale = 1.0 / std::sqrt((double)s.hd);
    dqkv.assign(qkv.size(), 0.0);
    auto row = [&](int b, int t) { return ((size_t)b * s.seq + t) * 3 * w; };
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads; ++h)
            for (int i = 0; i < s.seq; ++i) {
                const size_t oi = ((size_t)b * s.seq + i) * w + h * s.hd;
                double delta = 0;
                for (int d = 0; d < s.hd; ++d) delta += dout[oi + d] * out[oi + d];
                const double ls = lse[((size_t)b * s.heads + h) * s.seq + i];
                const double* q = &qkv[row(b, i) + h * s.hd];
                for (int j = 0; j <= i; ++j) {
                    const double* k = &qkv[row(b, j) + w + h * s.hd];
                    const double* v = &qkv[row(b, j) + 2 * w + h * s.hd];
                    double dot = 0, dp = 0;
                    for (int d = 0; d < s.hd; ++d) {
                        dot += q[d] * k[d];
                        dp += dout[oi + d] * v[d];
                    }
                    const double p = std::exp(dot * scale - ls);
                    const double ds = p * (dp - delta);
                    for (int d = 0; d < s.hd; ++d) {
                        dqkv[row(b, i) + h * s.hd + d] += scale * ds * k[d];
                        dqkv[row(b, j) + w + h * s.hd + d] += scale * ds * q[d];
                        dqkv[row(b, j) + 2 * w + h * s.hd + d] += p * dout[oi + d];
                    }
                }
            }
}

template <typename T> static double rel_err(const std::vector<T>& got, const std::vector<double>& want, size_t* bad) {
    double d2 = 0, w2 = 0;
    *bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = to_f32(got[i]);
        if (!std::isfinite(g)) {
            ++*bad;
            continue;
        }
        d2 += (g - want[i]) * (g - want[i]);
        w2 += want[i] * want[i];
    }
    return w2 > 0 ? std::sqrt(d2 / w2) : std::sqrt(d2);
}

// Each kernel set with its rows per block (gridDim.y = seq / rows).
template <typename T, int D> struct Kernels;
#define EMU_KERNELS(SUF, T, D)                                                                         \
    template <> struct Kernels<T, D> {                                                                 \
        static constexpr auto fwd = attention_forward_hd##D##_##SUF;                                   \
        static constexpr auto dq = attention_backward_dq_hd##D##_##SUF;                                \
        static constexpr auto dkv = attention_backward_dkv_hd##D##_##SUF;                              \
        static constexpr auto delta = attention_backward_delta_##SUF;                                  \
        static constexpr unsigned fwd_rows = 16 * AttnTiles<D>::FWD_R, dq_rows = 16 * AttnTiles<D>::DQ_R, \
                                  dkv_rows = 16 * AttnTiles<D>::DKV_R;                                 \
    };
#define EMU_TC_KERNELS(SUF, T, D)                                                      \
    template <> struct Kernels<T, D> {                                                 \
        static constexpr auto fwd = attention_forward_tc_hd##D##_##SUF;                \
        static constexpr auto dq = attention_backward_dq_tc_hd##D##_##SUF;             \
        static constexpr auto dkv = attention_backward_dkv_tc_hd##D##_##SUF;           \
        static constexpr auto delta = attention_backward_delta_##SUF;                  \
        static constexpr unsigned fwd_rows = ATTN_TC_ROWS, dq_rows = ATTN_TC_ROWS, dkv_rows = ATTN_TC_ROWS; \
    };
EMU_KERNELS(f32, float, 32)
EMU_KERNELS(f32, float, 64)
EMU_KERNELS(f32, float, 128)
EMU_TC_KERNELS(f16, __half, 64)
EMU_TC_KERNELS(f16, __half, 128)
EMU_TC_KERNELS(bf16, __nv_bfloat16, 64)
EMU_TC_KERNELS(bf16, __nv_bfloat16, 128)

static unsigned cdiv(unsigned a, unsigned b) { return (a + b - 1) / b; }

template <typename T, int D>
static bool run(Shape s, uint64_t seed, const char* dtype, double tol) {
    using K = Kernels<T, D>;
    constexpr unsigned threads = std::is_same_v<T, float> ? ATTN_THREADS : ATTN_TC_THREADS;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    const size_t nqkv = s.tokens() * 3 * s.w(), nout = s.tokens() * s.w(), nlse = (size_t)s.batch * s.heads * s.seq;
    // ×2.5: scores spread over a few units, so the running max really moves.
    std::vector<T> qkv(nqkv), dout(nout);
    for (auto& v : qkv) v = from_f32<T>(2.5f * uni(rng));
    for (auto& v : dout) v = from_f32<T>(uni(rng));
    std::vector<double> qkv64(nqkv), dout64(nout);
    for (size_t i = 0; i < nqkv; ++i) qkv64[i] = to_f32(qkv[i]);
    for (size_t i = 0; i < nout; ++i) dout64[i] = to_f32(dout[i]);

    AttnArgs a{(uint32_t)s.batch, (uint32_t)s.seq, (uint32_t)s.heads, (uint32_t)s.hd,
               (float)(1.0 / std::sqrt((double)s.hd)), (float)(1.4426950408889634 / std::sqrt((double)s.hd))};
    const unsigned bh = s.batch * s.heads;

    std::vector<double> out_ref, lse_ref, dqkv_ref;
    ref_forward(qkv64, s, out_ref, lse_ref);
    // Every other case writes out's rows ld = W + 8 apart (a packed
    // attn.c_proj's x_packed) and reads them back there in the backward's
    // delta pass: the pad columns start NaN and must stay NaN, and a read of
    // them would carry NaN into dqkv.
    const size_t ld = s.w() + ((seed & 1) ? 8 : 0);
    std::vector<T> out_s(s.tokens() * ld, from_f32<T>(NAN));
    std::vector<float> lse(nlse, NAN);
    emu_launch(Dim3{bh, cdiv(s.seq, K::fwd_rows), 1}, threads,
               [&] { K::fwd(qkv.data(), a, out_s.data(), (uint32_t)ld, lse.data()); });
    std::vector<T> out(nout);
    size_t pad_written = 0;
    for (size_t t = 0; t < s.tokens(); ++t) {
        for (size_t c = 0; c < (size_t)s.w(); ++c) out[t * s.w() + c] = out_s[t * ld + c];
        for (size_t c = s.w(); c < ld; ++c) pad_written += !std::isnan(to_f32(out_s[t * ld + c]));
    }

    // The backward sees the reference's out (rounded to T) and lse (to f32),
    // and so does its reference: only the backward kernels' error is measured.
    std::vector<T> out_t(nout);
    std::vector<float> lse_f(nlse);
    std::vector<double> out_t64(nout), lse_f64(nlse);
    for (size_t i = 0; i < nout; ++i) out_t64[i] = to_f32(out_t[i] = from_f32<T>((float)out_ref[i]));
    for (size_t i = 0; i < nlse; ++i) lse_f64[i] = lse_f[i] = (float)lse_ref[i];
    ref_backward(dout64, qkv64, out_t64, lse_f64, s, dqkv_ref);
    std::vector<float> delta(nlse, NAN);
    // dqkv's rows go dld = 3W + {0, 8, 3} apart by seed: 8 is a packed
    // c_attn's dy_packed (spare columns a multiple of 8), 3 an odd pitch that
    // no 16-byte store could meet. The whole buffer starts NaN: the pad
    // columns must still be NaN afterwards (only the kernels' own columns are
    // written), and every gradient element must be finite (all written).
    const size_t dld = 3 * (size_t)s.w() + (seed % 3 == 1 ? 8 : seed % 3 == 2 ? 3 : 0);
    std::vector<T> dqkv_s(s.tokens() * dld, from_f32<T>(NAN));
    const uint64_t rows = nlse;
    for (size_t t = 0; t < s.tokens(); ++t)
        for (size_t c = 0; c < (size_t)s.w(); ++c) out_s[t * ld + c] = out_t[t * s.w() + c];
    emu_launch(Dim3{(unsigned)cdiv(rows, 8), 1, 1}, 256,
               [&] { K::delta(dout.data(), out_s.data(), (uint32_t)ld, a, delta.data()); });
    emu_launch(Dim3{bh, cdiv(s.seq, K::dq_rows), 1}, threads,
               [&] { K::dq(dout.data(), qkv.data(), lse_f.data(), delta.data(), a, dqkv_s.data(), (uint32_t)dld); });
    emu_launch(Dim3{bh, cdiv(s.seq, K::dkv_rows), 1}, threads,
               [&] { K::dkv(dout.data(), qkv.data(), lse_f.data(), delta.data(), a, dqkv_s.data(), (uint32_t)dld); });
    std::vector<T> dqkv(nqkv);
    for (size_t t = 0; t < s.tokens(); ++t) {
        for (size_t c = 0; c < 3 * (size_t)s.w(); ++c) dqkv[t * 3 * s.w() + c] = dqkv_s[t * dld + c];
        for (size_t c = 3 * (size_t)s.w(); c < dld; ++c) pad_written += !std::isnan(to_f32(dqkv_s[t * dld + c]));
    }

    size_t bad_o, bad_l, bad_d;
    const double eo = rel_err(out, out_ref, &bad_o), el = rel_err(lse, lse_ref, &bad_l);
    const double ed = rel_err(dqkv, dqkv_ref, &bad_d);
    const bool ok = bad_o + bad_l + bad_d + pad_written == 0 && eo <= tol && el <= 1e-5 && ed <= tol;
    std::printf("%-4s batch=%d seq=%-3d heads=%d hd=%-3d (D=%-3d) out_ld=%-4zu dqkv_ld=%-4zu seed=%-4llu out %.2e "
                "lse %.2e dqkv %.2e non-finite %zu/%zu/%zu pad written %zu %s\n",
                dtype, s.batch, s.seq, s.heads, s.hd, D, ld, dld, (unsigned long long)seed, eo, el, ed, bad_o, bad_l,
                bad_d, pad_written, ok ? "ok" : "FAIL");
    return ok;
}

template <typename T> static bool run_any(Shape s, uint64_t seed, const char* dtype, double tol) {
    if constexpr (std::is_same_v<T, float>) {
        if (s.hd <= 32) return run<T, 32>(s, seed, dtype, tol);
    }
    if (s.hd <= 64) return run<T, 64>(s, seed, dtype, tol);
    return run<T, 128>(s, seed, dtype, tol);
}

// ---- the tensor-core primitives against plain products and copies ----------

template <typename T> static T rnd_t(std::mt19937_64& rng) {
    // Awkward values: both signs, magnitudes over several binades, exact in T.
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    const float e = std::ldexp(1.0f, (int)(rng() % 7) - 3);
    return from_f32<T>(uni(rng) * e);
}

// One mma_16816 with fragments built from the PTX ISA's layout tables,
// against D = A·B + C in f64.
template <typename T> static bool check_mma(const char* dtype) {
    std::mt19937_64 rng(7);
    T A[16][16], B[16][8];
    float C[16][8], D[16][8];
    for (auto& r : A)
        for (auto& v : r) v = rnd_t<T>(rng);
    for (auto& r : B)
        for (auto& v : r) v = rnd_t<T>(rng);
    for (auto& r : C)
        for (auto& v : r) v = to_f32(rnd_t<T>(rng));
    auto pk = [](T lo, T hi) { return pack2<T>(to_f32(lo), to_f32(hi)); };
    emu_launch(Dim3{1, 1, 1}, 32, [&] {
        const int l = threadIdx.x, g = l / 4, t = l % 4;
        const uint32_t a[4] = {pk(A[g][2 * t], A[g][2 * t + 1]), pk(A[g + 8][2 * t], A[g + 8][2 * t + 1]),
                               pk(A[g][2 * t + 8], A[g][2 * t + 9]), pk(A[g + 8][2 * t + 8], A[g + 8][2 * t + 9])};
        float d[4] = {C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]};
        mma_16816<T>(d, a, pk(B[2 * t][g], B[2 * t + 1][g]), pk(B[2 * t + 8][g], B[2 * t + 9][g]));
        D[g][2 * t] = d[0];
        D[g][2 * t + 1] = d[1];
        D[g + 8][2 * t] = d[2];
        D[g + 8][2 * t + 1] = d[3];
    });
    double worst = 0;
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 8; ++n) {
            double want = C[r][n], mag = std::fabs(C[r][n]);
            for (int k = 0; k < 16; ++k) {
                want += (double)to_f32(A[r][k]) * to_f32(B[k][n]);
                mag += std::fabs((double)to_f32(A[r][k]) * to_f32(B[k][n]));
            }
            worst = std::max(worst, std::fabs(D[r][n] - want) / mag);
        }
    // 17 f32 additions of exact products: ≤ 17·2⁻²⁴ of the magnitude sum.
    const bool ok = worst <= 17 * std::ldexp(1.0, -24);
    std::printf("primitive mma_16816<%s> vs f64 A·B+C: worst %.2e of the magnitude %s\n", dtype, worst,
                ok ? "ok" : "FAIL");
    return ok;
}

// The kernels' two product helpers, whose ldmatrix addressing and fragment
// reuse are what the attention kernels rely on, against plain products:
// tc_mma_abt (S = A·Bᵀ, 16×64 from two 16-bit shared tiles) and tc_mma_pb
// (O = P·V, P an f32 accumulator tile rounded to T, V a 64×D shared tile).
template <typename T, int D> static bool check_products(const char* dtype) {
    constexpr int LD = D + 8, N = 64;
    std::mt19937_64 rng(11 + D);
    T* sm = reinterpret_cast<T*>(attn_smem);
    T *As = sm, *Bs = sm + 16 * LD;  // 16×D and N×D (rows of B = columns of S)
    T* Vs = Bs + N * LD;             // N×D
    for (int i = 0; i < (16 + 2 * N) * LD; ++i) sm[i] = rnd_t<T>(rng);
    float S[16][N], O[16][D];
    emu_launch(Dim3{1, 1, 1}, 32, [&] {
        const int l = threadIdx.x, g = l / 4, t = l % 4;
        float s[N / 8][4] = {}, o[D / 8][4] = {};
        tc_mma_abt<T, D, N / 8>(s, As, Bs, l);
        tc_mma_pb<T, D, N / 8>(o, s, Vs, l);
        for (int j = 0; j < N / 8; ++j)
            for (int i = 0; i < 4; ++i) S[g + 8 * (i / 2)][8 * j + 2 * t + i % 2] = s[j][i];
        for (int j = 0; j < D / 8; ++j)
            for (int i = 0; i < 4; ++i) O[g + 8 * (i / 2)][8 * j + 2 * t + i % 2] = o[j][i];
    });
    double ws = 0, wo = 0;
    for (int r = 0; r < 16; ++r) {
        for (int n = 0; n < N; ++n) {
            double want = 0, mag = 0;
            for (int k = 0; k < D; ++k) {
                const double pr = (double)to_f32(As[r * LD + k]) * to_f32(Bs[n * LD + k]);
                want += pr;
                mag += std::fabs(pr);
            }
            ws = std::max(ws, std::fabs(S[r][n] - want) / mag);
        }
        // O from S as the kernel rounds it (to T), so only the product is measured.
        for (int d = 0; d < D; ++d) {
            double want = 0, mag = 0;
            for (int k = 0; k < N; ++k) {
                const double pr = (double)to_f32(from_f32<T>(S[r][k])) * to_f32(Vs[k * LD + d]);
                want += pr;
                mag += std::fabs(pr);
            }
            wo = std::max(wo, std::fabs(O[r][d] - want) / mag);
        }
    }
    const double bound_s = (D + 1) * std::ldexp(1.0, -24), bound_o = (N + 1) * std::ldexp(1.0, -24);
    const bool ok = ws <= bound_s && wo <= bound_o;
    std::printf("primitive ldmatrix+mma products <%s, D=%d> vs f64: Q·Kt %.2e (bound %.1e), P·V %.2e (bound %.1e) %s\n",
                dtype, D, ws, bound_s, wo, bound_o, ok ? "ok" : "FAIL");
    return ok;
}

// tc_load_tile's cp.async path: nothing lands before cp_async_wait, then the
// tile equals the element-by-element path (rows past seq and dims past hd
// zero) on an awkward window of a strided source.
template <typename T> static bool check_copies(const char* dtype) {
    constexpr int D = 64, LD = D + 8, ROWS = 64;
    const int seq = 45, hd = 40, row0 = 8, stride = 3 * 56;  // 16-byte aligned rows: hd, stride multiples of 8
    std::mt19937_64 rng(5);
    std::vector<T> src((size_t)seq * stride);
    for (auto& v : src) v = rnd_t<T>(rng);
    T* sm = reinterpret_cast<T*>(attn_smem);
    T *vec_tile = sm, *ref_tile = sm + ROWS * LD;
    const T poison = from_f32<T>(NAN);
    for (int i = 0; i < 2 * ROWS * LD; ++i) sm[i] = poison;
    bool early = false;
    emu_launch(Dim3{1, 1, 1}, ATTN_TC_THREADS, [&] {
        tc_load_tile<ROWS, D>(vec_tile, src.data(), stride, row0, seq, hd, true);
        cp_async_commit();
        tc_load_tile<ROWS, D>(ref_tile, src.data(), stride, row0, seq, hd, false);
        __syncthreads();
        if (threadIdx.x == 0)
            for (int i = 0; i < ROWS * LD; ++i)
                if (!std::isnan(to_f32(vec_tile[i]))) early = true;
        __syncthreads();
        cp_async_wait<0>();
        __syncthreads();
    });
    size_t bad = 0;
    for (int r = 0; r < ROWS; ++r)
        for (int d = 0; d < D; ++d) {
            const int t = row0 + r;
            const float want = t < seq && d < hd ? to_f32(src[(size_t)t * stride + d]) : 0.0f;
            bad += to_f32(vec_tile[r * LD + d]) != want || to_f32(ref_tile[r * LD + d]) != want;
        }
    const bool ok = !early && bad == 0;
    std::printf("primitive cp.async tile <%s>: landed before wait: %s, wrong elements %zu %s\n", dtype,
                early ? "yes" : "no", bad, ok ? "ok" : "FAIL");
    return ok;
}

template <typename T> static bool check_primitives(const char* dtype) {
    bool ok = check_mma<T>(dtype);
    ok &= check_products<T, 64>(dtype);
    ok &= check_products<T, 128>(dtype);
    ok &= check_copies<T>(dtype);
    return ok;
}

// The tensor-core kernels' cases. Each mma, ldmatrix and shuffle is a
// barrier over 32 OS threads here, so these are chosen for coverage per
// case rather than swept: seq 1, under one tile, exactly one tile, across
// 2-4 tiles with ragged tails (double buffering over ≥ 3 tiles, the
// diagonal in the middle of a streamed tile where it is 32 wide); head dims
// 5, 33, 100 (padded, element-wise loads), 64, 128 (native, cp.async);
// batch·heads up to 3.
static const Shape kTcShapes[] = {
    {1, 1, 2, 64}, {2, 7, 1, 5}, {1, 64, 1, 64}, {1, 65, 2, 33}, {1, 65, 1, 100},
    {2, 130, 1, 64}, {1, 130, 2, 128}, {1, 96, 1, 128}, {1, 200, 1, 5}, {3, 70, 1, 128},
};

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    const std::string which = argc > 1 ? argv[1] : "all";
    std::printf("dynamic shared memory (bytes) fwd/dq/dkv: hd32 %u/%u/%u hd64 %u/%u/%u hd128 %u/%u/%u\n",
                4 * fwd_smem_floats<32, 4, 64>(), 4 * dq_smem_floats<32, 4, 64>(), 4 * dkv_smem_floats<32, 4, 64>(),
                4 * fwd_smem_floats<64, 4, 64>(), 4 * dq_smem_floats<64, 4, 32>(), 4 * dkv_smem_floats<64, 4, 32>(),
                4 * fwd_smem_floats<128, 4, 32>(), 4 * dq_smem_floats<128, 2, 32>(),
                4 * dkv_smem_floats<128, 2, 32>());
    std::printf("tensor-core kernels (bytes) fwd/dq/dkv: hd64 %u/%u/%u hd128 %u/%u/%u\n", tc_fwd_smem<64>(),
                tc_dq_smem<64>(), tc_dkv_smem<64>(), tc_fwd_smem<128>(), tc_dq_smem<128>(), tc_dkv_smem<128>());
    emu_smem_lo = reinterpret_cast<const unsigned char*>(attn_smem);
    emu_smem_hi = emu_smem_lo + sizeof attn_smem;
    const bool f32 = which == "all" || which == "f32", f16 = which == "all" || which == "f16",
               bf16 = which == "all" || which == "bf16";
    bool ok = true;
    if (f32) {
        int n = 0;
        for (int seq : {1, 7, 64, 65, 130, 257})
            for (int hd : {3, 5, 32, 33, 64, 80, 128}) {
                const Shape s{1 + n % 2, seq, 1 + n % 3, hd};
                ok &= run_any<float>(s, 1000 + n++, "f32", 2e-5);
            }
    }
    if (f16) ok &= check_primitives<__half>("f16");
    if (bf16) ok &= check_primitives<__nv_bfloat16>("bf16");
    int n = 0;
    for (const Shape& s : kTcShapes) {
        const uint64_t seed = 2000 + n++;
        if (f16) ok &= run_any<__half>(s, seed, "f16", 4e-3);
        if (bf16) ok &= run_any<__nv_bfloat16>(s, seed, "bf16", 2e-2);
    }
    // The checks above must be able to fail: with two lanes' mma results
    // swapped (a fragment-layout error) the same comparison has to reject
    // the kernels' output.
    if (bf16) {
        std::printf("self-test: the next case runs with lanes 0 and 4 of every mma swapped and must FAIL\n");
        emu_inject_mma_swap = true;
        const bool caught = !run_any<__nv_bfloat16>(Shape{1, 65, 1, 64}, 3000, "bf16", 2e-2);
        emu_inject_mma_swap = false;
        std::printf("self-test: injected fragment-layout error %s\n", caught ? "caught" : "NOT CAUGHT");
        ok &= caught;
    }
    std::printf(ok ? "all ok\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
