// Emulated run of kernels/attention.cu against a direct f64 reference (the
// textbook loops, written independently of src/cpu/attention.rs), for
// checking the kernels' indexing on a machine without a GPU. Same shapes,
// input rounding and NaN-poisoned outputs as the GPU tests in
// tests/attention.rs. Build and run with scripts/kernel-emu/run.sh attention.
#include "emu.h"

// Every block's dynamic shared memory (blocks run one at a time).
float attn_smem[1 << 16];

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

template <typename T, int D> struct Kernels;
#define EMU_KERNELS(SUF, T, D)                                       \
    template <> struct Kernels<T, D> {                               \
        static constexpr auto fwd = attention_forward_hd##D##_##SUF; \
        static constexpr auto dq = attention_backward_dq_hd##D##_##SUF; \
        static constexpr auto dkv = attention_backward_dkv_hd##D##_##SUF; \
        static constexpr auto delta = attention_backward_delta_##SUF; \
    };
#define EMU_ALL_D(SUF, T) EMU_KERNELS(SUF, T, 32) EMU_KERNELS(SUF, T, 64) EMU_KERNELS(SUF, T, 128)
LORAFUSE_FOR_EACH_DTYPE(EMU_ALL_D)

static unsigned cdiv(unsigned a, unsigned b) { return (a + b - 1) / b; }

template <typename T, int D>
static bool run(Shape s, uint64_t seed, const char* dtype, double tol) {
    using Tl = AttnTiles<D>;
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
    std::vector<T> out(nout, from_f32<T>(NAN));
    std::vector<float> lse(nlse, NAN);
    emu_launch(Dim3{bh, cdiv(s.seq, 16 * Tl::FWD_R), 1}, ATTN_THREADS,
               [&] { Kernels<T, D>::fwd(qkv.data(), a, out.data(), lse.data()); });

    // The backward sees the reference's out (rounded to T) and lse (to f32),
    // and so does its reference: only the backward kernels' error is measured.
    std::vector<T> out_t(nout);
    std::vector<float> lse_f(nlse);
    std::vector<double> out_t64(nout), lse_f64(nlse);
    for (size_t i = 0; i < nout; ++i) out_t64[i] = to_f32(out_t[i] = from_f32<T>((float)out_ref[i]));
    for (size_t i = 0; i < nlse; ++i) lse_f64[i] = lse_f[i] = (float)lse_ref[i];
    ref_backward(dout64, qkv64, out_t64, lse_f64, s, dqkv_ref);
    std::vector<float> delta(nlse, NAN);
    std::vector<T> dqkv(nqkv, from_f32<T>(NAN));
    const uint64_t rows = nlse;
    emu_launch(Dim3{(unsigned)cdiv(rows, 8), 1, 1}, 256,
               [&] { Kernels<T, D>::delta(dout.data(), out_t.data(), a, delta.data()); });
    emu_launch(Dim3{bh, cdiv(s.seq, 16 * Tl::DQ_R), 1}, ATTN_THREADS, [&] {
        Kernels<T, D>::dq(dout.data(), qkv.data(), lse_f.data(), delta.data(), a, dqkv.data());
    });
    emu_launch(Dim3{bh, cdiv(s.seq, 16 * Tl::DKV_R), 1}, ATTN_THREADS, [&] {
        Kernels<T, D>::dkv(dout.data(), qkv.data(), lse_f.data(), delta.data(), a, dqkv.data());
    });

    size_t bad_o, bad_l, bad_d;
    const double eo = rel_err(out, out_ref, &bad_o), el = rel_err(lse, lse_ref, &bad_l);
    const double ed = rel_err(dqkv, dqkv_ref, &bad_d);
    const bool ok = bad_o + bad_l + bad_d == 0 && eo <= tol && el <= 1e-5 && ed <= tol;
    std::printf("%-4s batch=%d seq=%-3d heads=%d hd=%-3d (D=%-3d) seed=%-4llu out %.2e lse %.2e dqkv %.2e "
                "non-finite %zu/%zu/%zu %s\n",
                dtype, s.batch, s.seq, s.heads, s.hd, D, (unsigned long long)seed, eo, el, ed, bad_o, bad_l, bad_d,
                ok ? "ok" : "FAIL");
    return ok;
}

template <typename T> static bool run_any(Shape s, uint64_t seed, const char* dtype, double tol) {
    if (s.hd <= 32) return run<T, 32>(s, seed, dtype, tol);
    if (s.hd <= 64) return run<T, 64>(s, seed, dtype, tol);
    return run<T, 128>(s, seed, dtype, tol);
}

int main(int argc, char** argv) {
    const std::string which = argc > 1 ? argv[1] : "all";
    std::printf("dynamic shared memory (bytes) fwd/dq/dkv: hd32 %u/%u/%u hd64 %u/%u/%u hd128 %u/%u/%u\n",
                4 * fwd_smem_floats<32, 4, 64>(), 4 * dq_smem_floats<32, 4, 64>(), 4 * dkv_smem_floats<32, 4, 64>(),
                4 * fwd_smem_floats<64, 4, 64>(), 4 * dq_smem_floats<64, 4, 32>(), 4 * dkv_smem_floats<64, 4, 32>(),
                4 * fwd_smem_floats<128, 4, 32>(), 4 * dq_smem_floats<128, 2, 32>(),
                4 * dkv_smem_floats<128, 2, 32>());
    bool ok = true;
    int n = 0;
    for (int seq : {1, 7, 64, 65, 130, 257})
        for (int hd : {3, 5, 32, 33, 64, 80, 128}) {
            const Shape s{1 + n % 2, seq, 1 + n % 3, hd};
            const uint64_t seed = 1000 + n++;
            if (which == "all" || which == "f32") ok &= run_any<float>(s, seed, "f32", 2e-5);
            if (which == "all" || which == "f16") ok &= run_any<__half>(s, seed, "f16", 4e-3);
            if (which == "all" || which == "bf16") ok &= run_any<__nv_bfloat16>(s, seed, "bf16", 2e-2);
        }
    std::printf(ok ? "all ok\n" : "FAILURES\n");
    return ok ? 0 : 1;
}
