// Emulated run of kernels/nn.cu against f64 references written here from
// the formulas of src/cpu/nn.rs, for checking the kernels' indexing,
// reductions and edge cases on a machine without a GPU. Launch geometry is
// that of the wrappers in src/cuda/nn.rs (256 threads, one warp per
// LayerNorm row, one block per cross-entropy row or token group, ...).
// Inputs are rounded to their storage dtype first and the references read the
// rounded values; outputs are NaN-poisoned before overwriting kernels, and
// accumulating kernels start from random values.
// Build and run with scripts/kernel-emu/run.sh nn [dtype].
#include "emu.h"

#include "nn.cu"

#include <algorithm>
#include <cstdarg>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>

// ---- launch geometry of src/cuda/nn.rs --------------------------------

constexpr unsigned THREADS = 256, WARPS = THREADS / 32;
// CE_THREADS (1024, from nn.cu): one cross-entropy row per block.
constexpr uint32_t LN_ROWS_PER_CHUNK = 64;
// The wrappers cap grid-stride grids at 65535 blocks (and the sum of squares
// at 1024). A grid-stride loop is correct for any grid, so the emulator caps
// them at 3 blocks instead: the runs stay short, and at n = 4097 every thread
// takes several strides, the last one partial.
constexpr unsigned EMU_MAX_BLOCKS = 3;

static unsigned cdiv(uint64_t a, uint64_t b) { return (unsigned)((a + b - 1) / b); }
// A host buffer as the device address an AdamWEntry holds (abi.h).
static uint64_t addr(const float* p) { return (uint64_t)(uintptr_t)p; }
// blocks_for in src/cuda/mod.rs: at least one block.
static unsigned blocks_for(uint64_t n) { return max(1u, cdiv(n, THREADS)); }
static unsigned grid_stride(uint64_t n) { return min(blocks_for(n), EMU_MAX_BLOCKS); }
static void launch(Dim3 grid, const std::function<void()>& k) { emu_launch(grid, THREADS, k); }
static void launch(unsigned blocks, const std::function<void()>& k) { launch(Dim3{blocks, 1, 1}, k); }

template <typename T> struct K;
#define EMU_TRAIN_KERNELS(S, T)                                                          \
    template <> struct K<T> {                                                            \
        static constexpr const char* name = #S;                                          \
        static constexpr auto embedding_forward = embedding_forward_##S;                 \
        static constexpr auto layernorm_forward = layernorm_forward_##S;                 \
        static constexpr auto residual_layernorm_forward = residual_layernorm_forward_##S; \
        static constexpr auto layernorm_backward_dx = layernorm_backward_dx_##S;         \
        static constexpr auto layernorm_partial = layernorm_backward_params_partial_##S; \
        static constexpr auto gelu_forward = gelu_forward_##S;                           \
        static constexpr auto gelu_backward = gelu_backward_##S;                         \
        static constexpr auto residual_add = residual_add_##S;                           \
        static constexpr auto cast_from_f32 = cast_from_f32_##S;                         \
        static constexpr auto cross_entropy = cross_entropy_##S;                         \
    };
LORAFUSE_FOR_EACH_DTYPE(EMU_TRAIN_KERNELS)

// ---- tolerances and comparison -------------------------------------------

// Each output element's error is |got − want| / (|want| + rms(want)): one
// wrong element fails however large the tensor, and elements near zero are
// judged on the tensor's scale. A kernel rounds its f32 result to the
// output's dtype once, so an f16 or bf16 output is off by at most the unit
// roundoff (2^-11, 2^-8) plus f32 error: the tolerances are about twice that.
// f32 outputs (residual stream, statistics, parameter gradients) carry only
// f32 arithmetic error, whatever T is.
template <typename T> constexpr double tol_of();
template <> constexpr double tol_of<float>() { return 1e-5; }
template <> constexpr double tol_of<__half>() { return 1e-3; }
template <> constexpr double tol_of<__nv_bfloat16>() { return 8e-3; }
template <> constexpr double tol_of<double>() { return 1e-12; }
constexpr double F32_TOL = tol_of<float>();

template <typename T> static double as64(T v) {
    if constexpr (std::is_same_v<T, double>) {
        return v;
    } else {
        return to_f32(v);
    }
}

// Worst error over the results table: per (kernel output, dtype).
struct Stat {
    int cases = 0, failed = 0;
    double worst = 0, tol = 0;
};
static std::map<std::pair<std::string, std::string>, Stat> g_stats;
static std::vector<std::string> g_kernels;  // in order of first use
static int g_failed_cases = 0, g_cases = 0;

static Stat& stat(const std::string& kernel, const char* dtype) {
    if (std::find(g_kernels.begin(), g_kernels.end(), kernel) == g_kernels.end()) g_kernels.push_back(kernel);
    return g_stats[{kernel, dtype}];
}

// One printed line: a kernel call (or a few) on one shape, every output
// compared.
struct Case {
    std::string head, body;
    const char* dtype;
    bool ok = true;

    Case(const char* dtype_, const std::string& what) : head(what), dtype(dtype_) {}

    // `want` NaN means the kernel must write NaN there (and only there).
    template <typename G>
    void close(const std::string& kernel, const char* out, const std::vector<G>& got, const std::vector<double>& want,
               double tol) {
        double ss = 0, worst = 0;
        size_t finite = 0, bad = 0;
        for (double w : want)
            if (!std::isnan(w)) ss += w * w, ++finite;
        const double rms = finite ? std::sqrt(ss / finite) : 0.0;
        for (size_t i = 0; i < want.size(); ++i) {
            const double g = as64(got[i]), w = want[i];
            if (std::isnan(w) || !std::isfinite(g)) {
                bad += !(std::isnan(w) && std::isnan(g));
                continue;
            }
            const double scale = std::fabs(w) + rms;
            worst = max(worst, scale > 0 ? std::fabs(g - w) / scale : (g == w ? 0.0 : INFINITY));
        }
        const bool good = bad == 0 && worst <= tol && got.size() == want.size();
        record(kernel, good, worst, tol);
        char buf[128];
        std::snprintf(buf, sizeof buf, " %s %.1e", out, worst);
        body += buf;
        if (bad) body += " (" + std::to_string(bad) + " NaN/inf misplaced)";
    }

    template <typename U>
    void exact(const std::string& kernel, const char* out, const std::vector<U>& got, const std::vector<U>& want) {
        size_t wrong = 0;
        for (size_t i = 0; i < want.size(); ++i) wrong += std::memcmp(&got[i], &want[i], sizeof(U)) != 0;
        record(kernel, wrong == 0, wrong ? INFINITY : 0.0, 0.0);
        body += std::string(" ") + out + (wrong ? " " + std::to_string(wrong) + " differ" : " exact");
    }

    void record(const std::string& kernel, bool good, double worst, double tol) {
        Stat& s = stat(kernel, dtype);
        s.cases++;
        s.failed += !good;
        s.worst = max(s.worst, worst);
        s.tol = tol;
        ok &= good;
    }

    ~Case() {
        ++g_cases;
        g_failed_cases += !ok;
        std::printf("%-4s %s:%s %s\n", dtype, head.c_str(), body.c_str(), ok ? "ok" : "FAIL");
    }
};

// ---- inputs ---------------------------------------------------------------

struct Rng {
    std::mt19937_64 g;
    explicit Rng(uint64_t seed) : g(seed) {}
    double uni(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); }
    uint32_t below(uint32_t n) { return std::uniform_int_distribution<uint32_t>(0, n - 1)(g); }
};

template <typename T> static std::vector<T> rand_vec(Rng& rng, size_t n, double lo, double hi) {
    std::vector<T> v(n);
    for (auto& x : v) x = from_f32<T>((float)rng.uni(lo, hi));
    return v;
}

template <typename T> static std::vector<double> widen(const std::vector<T>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = as64(v[i]);
    return r;
}

template <typename T> static std::vector<T> poisoned(size_t n) { return std::vector<T>(n, from_f32<T>(NAN)); }
template <> std::vector<double> poisoned<double>(size_t n) { return std::vector<double>(n, NAN); }

static std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char* f, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// ---- f64 references (the formulas of src/cpu/nn.rs) --------------------

constexpr double GELU_C64 = 0.7978845608028654;  // sqrt(2/π)
static double gelu64(double x) { return 0.5 * x * (1.0 + std::tanh(GELU_C64 * (x + 0.044715 * x * x * x))); }
static double gelu_grad64(double x) {
    const double t = std::tanh(GELU_C64 * (x + 0.044715 * x * x * x));
    const double du = GELU_C64 * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}

// ---- embedding ------------------------------------------------------------

struct EmbShape {
    uint32_t batch, seq, width, vocab, positions;
};

static std::vector<uint32_t> random_tokens(Rng& rng, const EmbShape& s) {
    std::vector<uint32_t> t((size_t)s.batch * s.seq);
    for (auto& v : t) v = rng.below(s.vocab);
    return t;
}

// out[row] = wte[tokens[row]] + wpe[row % seq]; a token ≥ vocab (which the
// wrapper rejects on the host) must give a NaN row, never a stray read.
template <typename T> static void test_embedding_forward(const EmbShape& s, uint64_t seed) {
    Rng rng(seed);
    const uint64_t rows = (uint64_t)s.batch * s.seq, total = rows * s.width;
    const auto wte = rand_vec<T>(rng, (size_t)s.vocab * s.width, -1, 1);
    const auto wpe = rand_vec<T>(rng, (size_t)s.positions * s.width, -1, 1);
    for (bool corrupt : {false, true}) {
        auto tokens = random_tokens(rng, s);
        if (corrupt) tokens[rows / 2] = s.vocab + 3 * (uint32_t)(rows % 2);  // vocab or vocab + 3
        Case c(K<T>::name, fmt("embedding_forward batch=%u seq=%u width=%u vocab=%u%s", s.batch, s.seq, s.width,
                               s.vocab, corrupt ? " (one token out of range)" : ""));
        auto out = poisoned<float>(total);
        launch(grid_stride(total), [&] {
            K<T>::embedding_forward(tokens.data(), wte.data(), wpe.data(), s.vocab, s.seq, s.width, total, out.data());
        });
        std::vector<double> want(total);
        for (uint64_t r = 0; r < rows; ++r)
            for (uint32_t ch = 0; ch < s.width; ++ch)
                want[r * s.width + ch] = tokens[r] < s.vocab ? as64(wte[(size_t)tokens[r] * s.width + ch]) +
                                                                   as64(wpe[(r % s.seq) * s.width + ch])
                                                             : NAN;
        c.close("embedding_forward_<T> out", "out", out, want, F32_TOL);
    }
}

// Token ids for the embedding backward's grouping: random, or a pattern
// whose groups hit the passes' edges.
enum class Ids {
    Random,
    Same,       // one token (vocab − 1) in every row: one group of all rows
    Distinct,   // a permutation of distinct ids: one row per group
    Straddle,   // runs of one id across each chunk boundary, the rest random
    Corrupt,    // random, two rows ≥ vocab (a device copy the host never checked)
};

static std::vector<uint32_t> group_ids(Rng& rng, const EmbShape& s, Ids ids) {
    const uint32_t rows = s.batch * s.seq;
    std::vector<uint32_t> t = random_tokens(rng, s);
    switch (ids) {
        case Ids::Random: break;
        case Ids::Same: std::fill(t.begin(), t.end(), s.vocab - 1); break;
        case Ids::Distinct: {  // needs vocab ≥ rows
            std::vector<uint32_t> all(s.vocab);
            std::iota(all.begin(), all.end(), 0u);
            std::shuffle(all.begin(), all.end(), rng.g);
            std::copy(all.begin(), all.begin() + rows, t.begin());
            // The last vocabulary row among them (it was not, so still distinct).
            if (std::find(t.begin(), t.end(), s.vocab - 1) == t.end()) t[rows / 2] = s.vocab - 1;
            break;
        }
        case Ids::Straddle:
            for (uint32_t b = THREADS; b < rows; b += THREADS)
                for (uint32_t r = b - 3; r < min(rows, b + 4); ++r) t[r] = b / THREADS % 2 ? s.vocab - 1 : 0;
            break;
        case Ids::Corrupt:
            t[rows / 3] = s.vocab;
            t[rows - 1] = 0xffffffffu;
            break;
    }
    return t;
}

static const char* ids_name(Ids ids) {
    switch (ids) {
        case Ids::Random: return "random";
        case Ids::Same: return "one id in every row";
        case Ids::Distinct: return "all distinct";
        case Ids::Straddle: return "groups across chunk boundaries";
        case Ids::Corrupt: return "two ids >= vocab";
    }
    return "?";
}

// dwte[tok] += Σ dout[rows holding tok], grouped on the device with the
// wrapper's five launches (src/cuda/nn.rs, embedding_backward_wte), and
// dwpe[t] += Σ_b dout[b, t]; both accumulators start random, and wpe rows
// past seq must stay as they were.
//
// The grouping is integer work: order, uniq, starts and the group count
// must equal a host stable sort's, exactly. dwte must then equal, bit for
// bit, the same f32 sums in the same order (each token's rows ascending,
// from 0, then added to dwte once), the order the kernels promise. Against the
// exact (f64) sum each element is held to the recursive-summation bound
// |err| ≤ γ_{n+1}·(|dwte0| + Σ|dout|), γ_k = k·u/(1 − k·u), u = 2^-24, for
// the n rows of its token (n + 1 f32 additions): derived, not tuned. Rows
// with an id ≥ vocab add to nothing.
static void test_embedding_backward(const EmbShape& s, Ids ids, uint64_t seed) {
    Rng rng(seed);
    const uint32_t rows = s.batch * s.seq;
    const auto tokens = group_ids(rng, s, ids);
    const auto dout = rand_vec<float>(rng, (size_t)rows * s.width, -1, 1);
    const auto dwte0 = rand_vec<float>(rng, (size_t)s.vocab * s.width, -1, 1);
    const auto dwpe0 = rand_vec<float>(rng, (size_t)s.positions * s.width, -1, 1);

    // The reference grouping: rows stably sorted by token, valid tokens only.
    std::vector<uint32_t> want_order, want_uniq, want_starts;
    for (uint32_t r = 0; r < rows; ++r)
        if (tokens[r] < s.vocab) want_order.push_back(r);
    std::stable_sort(want_order.begin(), want_order.end(),
                     [&](uint32_t a, uint32_t b) { return tokens[a] < tokens[b]; });
    for (size_t k = 0; k < want_order.size(); ++k)
        if (want_uniq.empty() || want_uniq.back() != tokens[want_order[k]]) {
            want_uniq.push_back(tokens[want_order[k]]);
            want_starts.push_back((uint32_t)k);
        }
    want_starts.push_back((uint32_t)want_order.size());

    Case c("f32", fmt("embedding_backward batch=%u seq=%u width=%u vocab=%u positions=%u, %s (%zu groups)", s.batch,
                      s.seq, s.width, s.vocab, s.positions, ids_name(ids), want_uniq.size()));
    // Scratch as the workspace leaves it: whatever the last call wrote.
    const uint32_t chunks = cdiv(rows, THREADS), max_groups = min(rows, s.vocab);
    auto table = std::vector<uint32_t>((size_t)chunks * s.vocab, 0xdeadbeefu);
    auto rank = std::vector<uint32_t>(rows, 0xdeadbeefu), order = rank;
    auto offsets = std::vector<uint32_t>(s.vocab, 0xdeadbeefu), uniq = std::vector<uint32_t>(max_groups, 0xdeadbeefu);
    auto starts = std::vector<uint32_t>(max_groups + 1, 0xdeadbeefu), groups = std::vector<uint32_t>(1, 0xdeadbeefu);
    auto dwte = dwte0, dwpe = dwpe0;
    launch(chunks, [&] { embedding_group_count_u32(tokens.data(), rows, s.vocab, table.data(), rank.data()); });
    launch(grid_stride(s.vocab), [&] { embedding_group_prefix_u32(chunks, s.vocab, table.data(), offsets.data()); });
    launch(1, [&] { embedding_group_scan_u32(s.vocab, offsets.data(), uniq.data(), starts.data(), groups.data()); });
    launch(grid_stride(rows), [&] {
        embedding_group_scatter_u32(tokens.data(), rows, s.vocab, table.data(), rank.data(), offsets.data(),
                                    order.data());
    });
    launch(max_groups, [&] {
        embedding_backward_wte_f32(order.data(), uniq.data(), starts.data(), groups.data(), s.width, dout.data(),
                                   dwte.data());
    });
    launch(blocks_for((uint64_t)s.seq * s.width),
           [&] { embedding_backward_wpe_f32(dout.data(), s.batch, s.seq, s.width, dwpe.data()); });

    const size_t n_groups = want_uniq.size();
    c.exact("embedding_group_* groups", "groups", groups, {(uint32_t)n_groups});
    order.resize(want_order.size());
    uniq.resize(n_groups);
    starts.resize(n_groups + 1);
    c.exact("embedding_group_* order", "order", order, want_order);
    c.exact("embedding_group_* uniq", "uniq", uniq, want_uniq);
    c.exact("embedding_group_* starts", "starts", starts, want_starts);

    // Same f32 sums in the same order, and the f64 sums with their bound.
    auto same_order = dwte0;
    std::vector<double> exact = widen(dwte0), bound(dwte0.size());
    for (size_t i = 0; i < dwte0.size(); ++i) bound[i] = std::fabs(dwte0[i]);
    std::vector<uint32_t> count(s.vocab, 0);
    for (size_t g = 0; g < n_groups; ++g) {
        const uint32_t tok = want_uniq[g];
        for (uint32_t ch = 0; ch < s.width; ++ch) {
            float sum = 0.0f;
            for (uint32_t k = want_starts[g]; k < want_starts[g + 1]; ++k) {
                const float d = dout[(size_t)want_order[k] * s.width + ch];
                sum += d;
                exact[(size_t)tok * s.width + ch] += d;
                bound[(size_t)tok * s.width + ch] += std::fabs(d);
            }
            same_order[(size_t)tok * s.width + ch] += sum;
        }
        count[tok] = want_starts[g + 1] - want_starts[g];
    }
    c.exact("embedding_backward_wte_f32 dwte (same order)", "dwte", dwte, same_order);
    double worst = 0;
    for (size_t i = 0; i < dwte.size(); ++i) {
        const double k = count[i / s.width] + 1.0, u = std::ldexp(1.0, -24), gamma = k * u / (1 - k * u);
        const double err = std::fabs((double)dwte[i] - exact[i]);
        worst = max(worst, bound[i] > 0 ? err / (gamma * bound[i]) : (err == 0 ? 0.0 : INFINITY));
    }
    c.record("embedding_backward_wte_f32 dwte / sum bound", worst <= 1.0, worst, 1.0);
    c.body += fmt(" dwte/bound %.2f", worst);

    auto want_pe = widen(dwpe0);
    for (uint64_t r = 0; r < rows; ++r)
        for (uint32_t ch = 0; ch < s.width; ++ch) want_pe[(r % s.seq) * s.width + ch] += dout[r * s.width + ch];
    c.close("embedding_backward_wpe_f32 dwpe", "dwpe", dwpe, want_pe, F32_TOL);
}

// ---- LayerNorm --------------------------------------------------------------

// `ld` ≥ d: the forward outputs' row stride (a packed layer's x_packed);
// the columns past d start NaN and must stay NaN.
template <typename T> static void test_layernorm(uint32_t rows, uint32_t d, uint32_t ld, uint64_t seed) {
    Rng rng(seed);
    const size_t n = (size_t)rows * d;
    // Each row its own mean and spread, so a row mixed up with another shows.
    std::vector<float> x(n);
    for (uint32_t r = 0; r < rows; ++r) {
        const double mu = rng.uni(-2, 2), spread = rng.uni(0.2, 3);
        for (uint32_t i = 0; i < d; ++i) x[(size_t)r * d + i] = (float)(mu + spread * rng.uni(-1, 1));
    }
    const auto gamma = rand_vec<T>(rng, d, -1.5, 1.5), beta = rand_vec<T>(rng, d, -1, 1);
    const float eps = 1e-5f;  // the wrapper passes eps as f32
    Case c(K<T>::name, fmt("layernorm rows=%u d=%u out_ld=%u", rows, d, ld));
    const size_t nld = (size_t)rows * ld;

    // Forward: mean, variance around it, (x − μ)·rstd·γ + β.
    auto out = poisoned<T>(nld);
    auto mean = poisoned<float>(rows), rstd = poisoned<float>(rows);
    launch(cdiv(rows, WARPS), [&] {
        K<T>::layernorm_forward(x.data(), gamma.data(), beta.data(), eps, rows, d, out.data(), ld, mean.data(),
                                rstd.data());
    });
    std::vector<double> out_ref(n), mean_ref(rows), rstd_ref(rows);
    // out_ref at the output's stride, NaN (untouched) past each row's d.
    auto strided_ref = [&](const std::vector<double>& dense) {
        std::vector<double> w(nld, NAN);
        for (uint32_t r = 0; r < rows; ++r)
            for (uint32_t i = 0; i < d; ++i) w[(size_t)r * ld + i] = dense[(size_t)r * d + i];
        return w;
    };
    for (uint32_t r = 0; r < rows; ++r) {
        const float* xr = &x[(size_t)r * d];
        double mu = 0, var = 0;
        for (uint32_t i = 0; i < d; ++i) mu += xr[i];
        mu /= d;
        for (uint32_t i = 0; i < d; ++i) var += (xr[i] - mu) * (xr[i] - mu);
        var /= d;
        const double rs = 1.0 / std::sqrt(var + (double)eps);
        for (uint32_t i = 0; i < d; ++i)
            out_ref[(size_t)r * d + i] = (xr[i] - mu) * rs * as64(gamma[i]) + as64(beta[i]);
        mean_ref[r] = mu;
        rstd_ref[r] = rs;
    }
    c.close("layernorm_forward_<T> out", "out", out, strided_ref(out_ref), tol_of<T>());
    c.close("layernorm_forward_<T> mean", "mean", mean, mean_ref, F32_TOL);
    c.close("layernorm_forward_<T> rstd", "rstd", rstd, rstd_ref, F32_TOL);

    // The residual add fused in front: r = x0 + y written to `resid`, then
    // normalised. x0 = x − y (rounded to f32), so r is x up to one f32
    // rounding and the reference above applies to r's exact values.
    {
        const auto y = rand_vec<T>(rng, n, -1, 1);
        std::vector<float> x0(n);
        for (size_t i = 0; i < n; ++i) x0[i] = x[i] - to_f32(y[i]);
        auto resid = poisoned<float>(n);
        auto fout = poisoned<T>(nld);
        auto fmean = poisoned<float>(rows), frstd = poisoned<float>(rows);
        launch(cdiv(rows, WARPS), [&] {
            K<T>::residual_layernorm_forward(x0.data(), y.data(), gamma.data(), beta.data(), eps, rows, d,
                                             resid.data(), fout.data(), ld, fmean.data(), frstd.data());
        });
        std::vector<double> r_ref(n), fout_ref(n), fmean_ref(rows), frstd_ref(rows);
        for (size_t i = 0; i < n; ++i) r_ref[i] = (double)x0[i] + as64(y[i]);
        for (uint32_t r = 0; r < rows; ++r) {
            const double* rr = &r_ref[(size_t)r * d];
            double mu = 0, var = 0;
            for (uint32_t i = 0; i < d; ++i) mu += rr[i];
            mu /= d;
            for (uint32_t i = 0; i < d; ++i) var += (rr[i] - mu) * (rr[i] - mu);
            var /= d;
            const double rs = 1.0 / std::sqrt(var + (double)eps);
            for (uint32_t i = 0; i < d; ++i)
                fout_ref[(size_t)r * d + i] = (rr[i] - mu) * rs * as64(gamma[i]) + as64(beta[i]);
            fmean_ref[r] = mu;
            frstd_ref[r] = rs;
        }
        c.close("residual_layernorm_forward_<T> resid", "resid", resid, r_ref, F32_TOL);
        c.close("residual_layernorm_forward_<T> out", "fused out", fout, strided_ref(fout_ref), tol_of<T>());
        c.close("residual_layernorm_forward_<T> mean", "fused mean", fmean, fmean_ref, F32_TOL);
        c.close("residual_layernorm_forward_<T> rstd", "fused rstd", frstd, frstd_ref, F32_TOL);
    }

    // Backward, from the reference statistics rounded to f32 (what the
    // forward hands on), so only the backward kernels' error is measured.
    const auto dout = rand_vec<T>(rng, n, -1, 1);
    std::vector<float> mean_f(rows), rstd_f(rows);
    for (uint32_t r = 0; r < rows; ++r) mean_f[r] = (float)mean_ref[r], rstd_f[r] = (float)rstd_ref[r];
    const auto dx0 = rand_vec<float>(rng, n, -0.5, 0.5);
    auto dx = dx0;
    launch(cdiv(rows, WARPS), [&] {
        K<T>::layernorm_backward_dx(dout.data(), x.data(), gamma.data(), mean_f.data(), rstd_f.data(), rows, d,
                                    dx.data());
    });
    // x̂ = (x − μ)·rstd; dx̂ = dout·γ; dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂));
    // dγ += Σ_rows dout·x̂, dβ += Σ_rows dout (each row chunk a partial).
    const uint32_t chunks = cdiv(rows, LN_ROWS_PER_CHUNK);
    std::vector<double> dx_ref = widen(dx0), pg_ref((size_t)chunks * d, 0.0), pb_ref((size_t)chunks * d, 0.0);
    for (uint32_t r = 0; r < rows; ++r) {
        const size_t base = (size_t)r * d;
        const double mu = mean_f[r], rs = rstd_f[r];
        double m1 = 0, m2 = 0;
        for (uint32_t i = 0; i < d; ++i) {
            const double xhat = (x[base + i] - mu) * rs, dy = as64(dout[base + i]), dxhat = dy * as64(gamma[i]);
            m1 += dxhat;
            m2 += dxhat * xhat;
            pg_ref[(size_t)(r / LN_ROWS_PER_CHUNK) * d + i] += dy * xhat;
            pb_ref[(size_t)(r / LN_ROWS_PER_CHUNK) * d + i] += dy;
        }
        m1 /= d;
        m2 /= d;
        for (uint32_t i = 0; i < d; ++i) {
            const double xhat = (x[base + i] - mu) * rs;
            dx_ref[base + i] += rs * (as64(dout[base + i]) * as64(gamma[i]) - m1 - xhat * m2);
        }
    }
    c.close("layernorm_backward_dx_<T> dx", "dx", dx, dx_ref, F32_TOL);

    auto pg = poisoned<float>((size_t)chunks * d), pb = poisoned<float>((size_t)chunks * d);
    launch(Dim3{cdiv(d, THREADS), chunks, 1}, [&] {
        K<T>::layernorm_partial(dout.data(), x.data(), mean_f.data(), rstd_f.data(), rows, d, LN_ROWS_PER_CHUNK,
                                pg.data(), pb.data());
    });
    c.close("layernorm_backward_params_partial_<T> partials", "partial_g", pg, pg_ref, F32_TOL);
    c.close("layernorm_backward_params_partial_<T> partials", "partial_b", pb, pb_ref, F32_TOL);

    // The final sum, with both outputs and with either one null (the
    // wrapper passes null for a gradient nobody wants).
    std::vector<double> dg_ref(d, 0.0), db_ref(d, 0.0);
    for (uint32_t k = 0; k < chunks; ++k)
        for (uint32_t i = 0; i < d; ++i) dg_ref[i] += pg_ref[(size_t)k * d + i], db_ref[i] += pb_ref[(size_t)k * d + i];
    for (int which : {3, 1, 2}) {  // bit 0: dgamma given, bit 1: dbeta given
        const auto dg0 = rand_vec<float>(rng, d, -1, 1), db0 = rand_vec<float>(rng, d, -1, 1);
        auto dg = dg0, db = db0;
        float* dgp = which & 1 ? dg.data() : nullptr;
        float* dbp = which & 2 ? db.data() : nullptr;
        launch(cdiv(d, THREADS),
               [&] { layernorm_backward_params_final_f32(pg.data(), pb.data(), chunks, d, dgp, dbp); });
        std::vector<double> wg = widen(dg0), wb = widen(db0);
        for (uint32_t i = 0; i < d; ++i) {
            if (which & 1) wg[i] += dg_ref[i];
            if (which & 2) wb[i] += db_ref[i];
        }
        const char* gname = which == 3 ? "dgamma" : which == 1 ? "dgamma(dbeta=null)" : "dgamma=null";
        const char* bname = which == 3 ? "dbeta" : which == 1 ? "dbeta=null" : "dbeta(dgamma=null)";
        if (which & 1) {
            c.close("layernorm_backward_params_final_f32 dgamma", gname, dg, wg, F32_TOL);
        } else {
            c.exact("layernorm_backward_params_final_f32 null out", gname, dg, dg0);
        }
        if (which & 2) {
            c.close("layernorm_backward_params_final_f32 dbeta", bname, db, wb, F32_TOL);
        } else {
            c.exact("layernorm_backward_params_final_f32 null out", bname, db, db0);
        }
    }
}

// ---- elementwise --------------------------------------------------------------

template <typename T> static void test_elementwise(uint64_t n, uint64_t seed) {
    Rng rng(seed);
    Case c(K<T>::name, fmt("elementwise n=%llu (grid %u x %u)", (unsigned long long)n, grid_stride(n), THREADS));
    // GELU over [-6, 6]: both tails and the bend.
    const auto x = rand_vec<T>(rng, n, -6, 6), dout = rand_vec<T>(rng, n, -1, 1);
    auto out = poisoned<T>(n);
    launch(grid_stride(n), [&] { K<T>::gelu_forward(x.data(), n, n, n, out.data()); });
    std::vector<double> want(n);
    for (uint64_t i = 0; i < n; ++i) want[i] = gelu64(as64(x[i]));
    c.close("gelu_forward_<T> out", "gelu", out, want, tol_of<T>());

    auto dx = poisoned<T>(n);
    launch(grid_stride(n), [&] { K<T>::gelu_backward(dout.data(), x.data(), n, n, n, dx.data()); });
    for (uint64_t i = 0; i < n; ++i) want[i] = as64(dout[i]) * gelu_grad64(as64(x[i]));
    c.close("gelu_backward_<T> dx", "gelu'", dx, want, tol_of<T>());

    // Buffers that start off a 16-byte boundary take the element-wise path.
    if (n > 1) {
        const uint64_t m = n - 1;
        auto out1 = poisoned<T>(n), dx1 = poisoned<T>(n);
        launch(grid_stride(m), [&] { K<T>::gelu_forward(x.data() + 1, m, m, m, out1.data() + 1); });
        launch(grid_stride(m), [&] { K<T>::gelu_backward(dout.data() + 1, x.data() + 1, m, m, m, dx1.data() + 1); });
        std::vector<double> wf(n, NAN), wb(n, NAN);
        for (uint64_t i = 1; i < n; ++i) {
            wf[i] = gelu64(as64(x[i]));
            wb[i] = as64(dout[i]) * gelu_grad64(as64(x[i]));
        }
        c.close("gelu_forward_<T> out (unaligned)", "gelu@1", out1, wf, tol_of<T>());
        c.close("gelu_backward_<T> dx (unaligned)", "gelu'@1", dx1, wb, tol_of<T>());
    }

    const auto xs = rand_vec<float>(rng, n, -2, 2);
    const auto y = rand_vec<T>(rng, n, -2, 2);
    auto sum = poisoned<float>(n);
    launch(grid_stride(n), [&] { K<T>::residual_add(xs.data(), y.data(), n, sum.data()); });
    for (uint64_t i = 0; i < n; ++i) want[i] = (double)xs[i] + as64(y[i]);
    c.close("residual_add_<T> out", "residual_add", sum, want, F32_TOL);

    // Magnitudes over 2^-12 ... 2^8: within every dtype's range, f16's
    // subnormals included.
    std::vector<float> wide(n);
    for (auto& v : wide) v = (float)std::ldexp(rng.uni(-1, 1), (int)std::floor(rng.uni(-12, 9)));
    auto cast = poisoned<T>(n);
    launch(grid_stride(n), [&] { K<T>::cast_from_f32(wide.data(), n, n, n, cast.data()); });
    c.close("cast_from_f32_<T> out", "cast", cast, widen(wide), tol_of<T>());
}

// The elementwise producers of a packed layer's buffers: `rows` rows of
// `cols` written `ld` apart (GELU → x_packed, GELU backward and the cast →
// dy_packed). The columns past `cols` start NaN and must stay NaN; an ld
// that breaks the 16-byte packs takes the element loop.
template <typename T> static void test_strided(uint64_t rows, uint64_t cols, uint64_t ld, uint64_t seed) {
    Rng rng(seed);
    const uint64_t n = rows * cols, nld = rows * ld;
    Case c(K<T>::name, fmt("strided rows=%llu cols=%llu ld=%llu", (unsigned long long)rows,
                           (unsigned long long)cols, (unsigned long long)ld));
    const auto x = rand_vec<T>(rng, n, -6, 6), dout = rand_vec<T>(rng, n, -1, 1);
    std::vector<float> wide(n);
    for (auto& v : wide) v = (float)rng.uni(-3, 3);
    std::vector<double> wf(nld, NAN), wb(nld, NAN), wc(nld, NAN);
    for (uint64_t r = 0; r < rows; ++r)
        for (uint64_t i = 0; i < cols; ++i) {
            const uint64_t s = r * cols + i, o = r * ld + i;
            wf[o] = gelu64(as64(x[s]));
            wb[o] = as64(dout[s]) * gelu_grad64(as64(x[s]));
            wc[o] = wide[s];
        }
    auto out = poisoned<T>(nld), dx = poisoned<T>(nld), cast = poisoned<T>(nld);
    launch(grid_stride(n), [&] { K<T>::gelu_forward(x.data(), n, cols, ld, out.data()); });
    launch(grid_stride(n), [&] { K<T>::gelu_backward(dout.data(), x.data(), n, cols, ld, dx.data()); });
    launch(grid_stride(n), [&] { K<T>::cast_from_f32(wide.data(), n, cols, ld, cast.data()); });
    c.close("gelu_forward_<T> out (strided)", "gelu", out, wf, tol_of<T>());
    c.close("gelu_backward_<T> dx (strided)", "gelu'", dx, wb, tol_of<T>());
    c.close("cast_from_f32_<T> out (strided)", "cast", cast, wc, tol_of<T>());
}

// ---- softmax cross-entropy --------------------------------------------------

// `padded` ≥ vocab columns per row: the LM head's padded vocabulary. Pad
// columns hold 9.0, above every real logit, so a kernel that let them into
// the max, the sum or the argmax fails; their gradient must be 0.
template <typename T> static void test_cross_entropy(uint32_t vocab, uint32_t padded, uint64_t seed) {
    Rng rng(seed);
    constexpr uint32_t IGNORE = 0xffffffffu;
    std::vector<std::vector<float>> rows;
    std::vector<uint32_t> targets;
    auto random_row = [&] {
        std::vector<float> r(vocab);
        for (auto& v : r) v = (float)rng.uni(-5, 5);
        return r;
    };
    for (int i = 0; i < 6; ++i) rows.push_back(random_row()), targets.push_back(rng.below(vocab));
    rows.push_back(random_row()), targets.push_back(IGNORE);
    // Targets the host would have rejected (a pad column among them): NaN
    // loss, no stray read.
    rows.push_back(random_row()), targets.push_back(vocab);
    rows.push_back(random_row()), targets.push_back(padded);
    rows.push_back(random_row()), targets.push_back(IGNORE - 1);
    // Ties for the maximum (4.0, exact in every dtype; the rest below 3):
    // across warps and threads, inside one 16-byte pack (neighbouring
    // columns), at the last real column. The lowest index wins; a target on
    // another tied column is not "correct".
    const std::vector<std::set<uint32_t>> ties = {
        {vocab - 1, vocab / 2, vocab / 5}, {0, vocab - 1}, {vocab / 2, (vocab / 2) ^ 1u}};
    for (const auto& tie : ties) {
        std::set<uint32_t> in;
        for (uint32_t p : tie)
            if (p < vocab) in.insert(p);
        for (uint32_t target : {*in.begin(), *in.rbegin()}) {
            auto r = random_row();
            for (auto& v : r) v = std::min(v, 2.9f);
            for (uint32_t p : in) r[p] = 4.0f;
            rows.push_back(r), targets.push_back(target);
        }
    }
    std::vector<float> flat(vocab, 1.5f);  // all equal: argmax 0
    rows.push_back(flat), targets.push_back(vocab - 1);
    rows.push_back(flat), targets.push_back(0);
    // A −∞ logit has probability 0 and must not poison the sum.
    if (vocab > 1) {
        auto with_inf = random_row();
        with_inf[vocab / 3] = -INFINITY;
        rows.push_back(with_inf), targets.push_back(vocab - 1);
    }

    const uint32_t nrows = (uint32_t)rows.size();
    std::vector<T> logits0((size_t)nrows * padded, from_f32<T>(9.0f));
    for (uint32_t r = 0; r < nrows; ++r)
        for (uint32_t ch = 0; ch < vocab; ++ch) logits0[(size_t)r * padded + ch] = from_f32<T>(rows[r][ch]);
    const float scale = 0.37f;

    // Reference on the rounded logits of the real columns: loss = lse −
    // logit[target], argmax the lowest index of the maximum, grad =
    // scale·(softmax − onehot), 0 on pad columns and ignored rows.
    std::vector<double> loss_ref(nrows), grad_ref(logits0.size(), 0.0);
    std::vector<uint32_t> correct_ref(nrows, 0);
    for (uint32_t r = 0; r < nrows; ++r) {
        const uint32_t t = targets[r];
        if (t == IGNORE || t >= vocab) {
            loss_ref[r] = t == IGNORE ? 0.0 : NAN;
            continue;
        }
        const T* l = &logits0[(size_t)r * padded];
        double mx = -INFINITY;
        uint32_t arg = 0;
        for (uint32_t ch = 0; ch < vocab; ++ch)
            if (as64(l[ch]) > mx) mx = as64(l[ch]), arg = ch;
        double sum = 0;
        for (uint32_t ch = 0; ch < vocab; ++ch) sum += std::exp(as64(l[ch]) - mx);
        const double lse = mx + std::log(sum);
        loss_ref[r] = lse - as64(l[t]);
        correct_ref[r] = arg == t;
        for (uint32_t ch = 0; ch < vocab; ++ch)
            grad_ref[(size_t)r * padded + ch] = scale * (std::exp(as64(l[ch]) - lse) - (ch == t ? 1.0 : 0.0));
    }
    std::vector<T> grad_by_value;
    // write_grad 2: the scale read through a pointer (ce_mean_scale's
    // output), the argument holding a wrong value that must be ignored; the
    // gradient must equal the by-value one bit for bit.
    for (uint32_t write_grad : {1u, 0u, 2u}) {
        Case c(K<T>::name, fmt("cross_entropy rows=%u vocab=%u padded=%u write_grad=%u", nrows, vocab, padded,
                               write_grad));
        auto logits = logits0;
        auto losses = poisoned<float>(nrows);
        std::vector<uint32_t> correct(nrows, 0xdeadbeefu);
        const float* scale_ptr = write_grad == 2 ? &scale : nullptr;
        const float scale_arg = write_grad == 2 ? 1000.0f : scale;
        emu_launch(Dim3{nrows, 1, 1}, CE_THREADS, [&] {
            K<T>::cross_entropy(logits.data(), targets.data(), vocab, padded, write_grad != 0, scale_arg, scale_ptr,
                                losses.data(), correct.data());
        });
        if (write_grad == 1) grad_by_value = logits;
        if (write_grad == 2) c.exact("cross_entropy_<T> grad, scale by pointer", "same bits", logits, grad_by_value);
        c.close("cross_entropy_<T> loss", "loss", losses, loss_ref, F32_TOL);
        c.exact("cross_entropy_<T> correct", "correct", correct, correct_ref);
        if (write_grad) {
            c.close("cross_entropy_<T> grad", "grad", logits, grad_ref, tol_of<T>());
        } else {
            c.exact("cross_entropy_<T> logits kept", "logits kept", logits, logits0);
        }
    }
}

// ce_mean_scale: 1/n over the targets that are not IGNORE (everything else
// counts, even values the host would reject), 0 for none, as the host
// computes it (double division, one rounding to float): compared bit for
// bit. Sizes: empty, one, below a warp, past a block (several per thread),
// the bench's 8192; IGNORE fractions none, some, all.
static void test_ce_mean_scale(uint32_t n, double ignored, uint64_t seed) {
    constexpr uint32_t IGNORE = 0xffffffffu;
    Rng rng(seed);
    std::vector<uint32_t> targets(n);
    uint32_t scored = 0;
    for (auto& t : targets) {
        const bool skip = rng.uni(0, 1) < ignored;
        t = skip ? IGNORE : (rng.below(4) == 0 ? IGNORE - 1 : rng.below(50304));
        scored += !skip;
    }
    Case c("f32", fmt("ce_mean_scale n=%u ignored=%.2f (scored %u)", n, ignored, scored));
    float got = NAN;
    emu_launch(Dim3{1, 1, 1}, THREADS, [&] { ce_mean_scale(targets.data(), n, &got); });
    const float want = scored == 0 ? 0.0f : (float)(1.0 / (double)scored);
    c.exact("ce_mean_scale", "scale", std::vector<float>{got}, std::vector<float>{want});
}

// ---- optimiser and norms ------------------------------------------------------

static void test_adamw(uint64_t n, int step, uint64_t seed) {
    Rng rng(seed);
    Case c("f32", fmt("adamw n=%llu step=%d (grid %u x %u)", (unsigned long long)n, step, grid_stride(n), THREADS));
    const double lr = 0.05, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1, gs = 0.5;
    // As the wrapper builds it (corrections 1 − β^step).
    const AdamWArgs a{lr, b1, b2, eps, wd, gs, 1.0 - std::pow(b1, step), 1.0 - std::pow(b2, step)};
    const auto p0 = rand_vec<float>(rng, n, -1, 1), g = rand_vec<float>(rng, n, -1, 1);
    const auto m0 = rand_vec<float>(rng, n, -0.1, 0.1), v0 = rand_vec<float>(rng, n, 0, 0.01);
    auto p = p0, m = m0, v = v0;
    launch(grid_stride(n), [&] { adamw_f32(p.data(), g.data(), m.data(), v.data(), n, a); });
    std::vector<double> pw(n), mw(n), vw(n);
    for (uint64_t i = 0; i < n; ++i) {
        const double gi = g[i] * gs;
        mw[i] = b1 * m0[i] + (1 - b1) * gi;
        vw[i] = b2 * v0[i] + (1 - b2) * gi * gi;
        double pi = p0[i];
        pi -= lr * wd * pi;
        pi -= lr * (mw[i] / a.correction1) / (std::sqrt(vw[i] / a.correction2) + eps);
        pw[i] = pi;
    }
    c.close("adamw_f32 param", "param", p, pw, F32_TOL);
    c.close("adamw_f32 m", "m", m, mw, F32_TOL);
    c.close("adamw_f32 v", "v", v, vw, F32_TOL);
}

// Several tensors (an empty one among them) in one launch: blockIdx.y picks
// the tensor, each tensor's partials are added by its own final block.
static void test_sum_squares(const std::vector<uint64_t>& ns, uint64_t seed) {
    Rng rng(seed);
    uint64_t longest = 0;
    for (uint64_t n : ns) longest = max(longest, n);
    const unsigned blocks = grid_stride(longest), tensors = (unsigned)ns.size();
    std::string shape;
    for (uint64_t n : ns) shape += " " + std::to_string(n);
    Case c("f32", fmt("sum_squares_multi n =%s (grid %u x %u x %u)", shape.c_str(), blocks, tensors, THREADS));
    std::vector<std::vector<float>> xs;
    std::vector<const float*> ptrs;
    std::vector<double> want;
    for (uint64_t n : ns) {
        xs.push_back(rand_vec<float>(rng, n, -3, 3));
        long double w = 0;
        for (float v : xs.back()) w += (long double)v * v;
        want.push_back((double)w);
    }
    for (const auto& x : xs) ptrs.push_back(x.data());
    auto partial = poisoned<double>((size_t)blocks * tensors), out = poisoned<double>(tensors);
    launch(Dim3{blocks, tensors, 1}, [&] { sum_squares_multi_partial_f32(ptrs.data(), ns.data(), partial.data()); });
    launch(tensors, [&] { sum_squares_final_f32(partial.data(), blocks, out.data()); });
    c.close("sum_squares_{multi_partial,final}_f32", "sums", out, want, tol_of<double>());
}

// adamw_multi_f32: tensors of different lengths (an empty one among them),
// each with its own rate and decay, in one launch.
static void test_adamw_multi(int step, uint64_t seed) {
    Rng rng(seed);
    const std::vector<uint64_t> ns = {31, 0, 4097, 1, 300};
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8, gs = 0.5;
    const AdamWArgs a{NAN, b1, b2, eps, NAN, gs, 1.0 - std::pow(b1, step), 1.0 - std::pow(b2, step)};
    uint64_t longest = 0;
    for (uint64_t n : ns) longest = max(longest, n);
    const unsigned tensors = (unsigned)ns.size(), blocks = grid_stride(longest);
    Case c("f32", fmt("adamw_multi tensors=%u step=%d (grid %u x %u x %u)", tensors, step, blocks, tensors, THREADS));
    struct Host {
        std::vector<float> p, g, m, v, p0, m0, v0;
        double lr, wd;
    };
    std::vector<Host> hs;
    std::vector<AdamWEntry> table;
    for (uint64_t n : ns) {
        Host h;
        h.p0 = rand_vec<float>(rng, n, -1, 1), h.g = rand_vec<float>(rng, n, -1, 1);
        h.m0 = rand_vec<float>(rng, n, -0.1, 0.1), h.v0 = rand_vec<float>(rng, n, 0, 0.01);
        h.p = h.p0, h.m = h.m0, h.v = h.v0;
        h.lr = rng.uni(0.001, 0.1), h.wd = rng.uni(0, 0.2);
        hs.push_back(std::move(h));
    }
    for (auto& h : hs) table.push_back({addr(h.p.data()), addr(h.g.data()), addr(h.m.data()), addr(h.v.data()), h.p.size(), h.lr, h.wd});
    launch(Dim3{blocks, tensors, 1}, [&] { adamw_multi_f32(table.data(), a); });
    std::vector<float> p, m, v;
    std::vector<double> pw, mw, vw;
    for (const auto& h : hs) {
        for (size_t i = 0; i < h.p.size(); ++i) {
            const double gi = h.g[i] * gs;
            const double mi = b1 * h.m0[i] + (1 - b1) * gi, vi = b2 * h.v0[i] + (1 - b2) * gi * gi;
            double pi = h.p0[i];
            pi -= h.lr * h.wd * pi;
            pi -= h.lr * (mi / a.correction1) / (std::sqrt(vi / a.correction2) + eps);
            pw.push_back(pi), mw.push_back(mi), vw.push_back(vi);
        }
        p.insert(p.end(), h.p.begin(), h.p.end());
        m.insert(m.end(), h.m.begin(), h.m.end());
        v.insert(v.end(), h.v.begin(), h.v.end());
    }
    c.close("adamw_multi_f32 param", "param", p, pw, F32_TOL);
    c.close("adamw_multi_f32 m", "m", m, mw, F32_TOL);
    c.close("adamw_multi_f32 v", "v", v, vw, F32_TOL);
}

// The final pass alone over more partials than it has threads (the wrapper
// allows up to 1024).
static void test_sum_squares_final(unsigned blocks, uint64_t seed) {
    Rng rng(seed);
    Case c("f32", fmt("sum_squares_final partials=%u", blocks));
    std::vector<double> partial(blocks);
    long double want = 0;
    for (auto& v : partial) want += v = rng.uni(0, 100);
    auto out = poisoned<double>(1);
    launch(1, [&] { sum_squares_final_f32(partial.data(), blocks, out.data()); });
    c.close("sum_squares_final_f32 (many partials)", "sum", out, {(double)want}, tol_of<double>());
}

// ---- the optimizer step decided on the device ------------------------------

// OptimConsts::lr_factor and ::decide (src/nn.rs), written out again.
static double ref_lr_factor(const OptimArgs& c, uint64_t step) {
    if (c.warmup > 0 && step <= c.warmup) return (double)step / (double)c.warmup;
    const double span = (double)std::max<uint64_t>(c.total > c.warmup ? c.total - c.warmup : 0, 1);
    const double progress = std::min((double)(step > c.warmup ? step - c.warmup : 0) / span, 1.0);
    const double m = c.min_lr_ratio;
    switch (c.decay) {
        case 2: return 1.0;
        case 1: return m + (1 - m) * (1 - progress);
        default: return m + (1 - m) * 0.5 * (1 + std::cos(M_PI * progress));
    }
}

static std::vector<double> ref_decide(const OptimArgs& c, const std::vector<double>& sums, uint32_t norm_tensors,
                                      double steps_before) {
    long double norm_sq = 0;
    for (uint32_t i = 0; i < norm_tensors; ++i) norm_sq += sums[i];
    double first_bad = -1;
    for (size_t i = 0; i < sums.size(); ++i)
        if (!std::isfinite(sums[i])) {
            first_bad = (double)i;
            break;
        }
    const double norm = std::sqrt((double)norm_sq);
    const bool accepted = first_bad < 0 && std::isfinite(norm);
    const double step = steps_before + accepted, t = std::max(step, 1.0);
    std::vector<double> h(OPTIM_HEADER);
    h[OPTIM_NORM] = norm;
    h[OPTIM_SCALE] = c.clip_norm > 0 && norm > c.clip_norm ? c.clip_norm / norm : 1.0;
    h[OPTIM_ACCEPTED] = accepted;
    h[OPTIM_STEP] = step;
    h[OPTIM_LR_FACTOR] = ref_lr_factor(c, (uint64_t)t);
    h[OPTIM_CORRECTION1] = 1 - std::pow(c.beta1, t);
    h[OPTIM_CORRECTION2] = 1 - std::pow(c.beta2, t);
    h[OPTIM_FIRST_BAD] = first_bad;
    return h;
}

// Values that may be ±∞ or NaN (a norm, a sum): a non-finite `want` must
// be matched exactly (the same infinity, or NaN for NaN), which Case::close
// would count as misplaced; such pairs become 0 = 0 and the rest compare
// as usual. A non-finite `got` where `want` is finite stays and fails.
static void close_or_same(Case& c, const std::string& kernel, const char* out, std::vector<double> got,
                          std::vector<double> want, double tol) {
    for (size_t i = 0; i < want.size() && i < got.size(); ++i)
        if (!std::isfinite(want[i]) && (got[i] == want[i] || (std::isnan(got[i]) && std::isnan(want[i]))))
            got[i] = want[i] = 0.0;
    c.close(kernel, out, got, want, tol);
}

// The header's exact fields (decision, count, culprit) bit for bit, the
// others to double precision.
static void check_header(Case& c, const std::vector<double>& state, const std::vector<double>& want) {
    std::vector<double> exact_got, exact_want, got, wanted;
    for (int i : {OPTIM_ACCEPTED, OPTIM_STEP, OPTIM_FIRST_BAD}) exact_got.push_back(state[i]), exact_want.push_back(want[i]);
    for (int i : {OPTIM_NORM, OPTIM_SCALE, OPTIM_LR_FACTOR, OPTIM_CORRECTION1, OPTIM_CORRECTION2})
        got.push_back(state[i]), wanted.push_back(want[i]);
    c.exact("optimizer_decide_f32 decision", "decision", exact_got, exact_want);
    close_or_same(c, "optimizer_decide_f32 values", "values", got, wanted, tol_of<double>());
}

// optimizer_decide_f32 alone on given sums: schedules, clipping on and
// off, a NaN gradient, an infinite guard, more tensors than threads.
static void test_optimizer_decide(const char* what, std::vector<double> sums, uint32_t norm_tensors,
                                  double steps_before, OptimArgs k) {
    Case c("f32", fmt("optimizer_decide %s tensors=%zu norm=%u step=%g", what, sums.size(), norm_tensors,
                      steps_before));
    std::vector<double> state(OPTIM_HEADER, NAN);
    state[OPTIM_STEP] = steps_before;
    state.insert(state.end(), sums.begin(), sums.end());
    const auto want = ref_decide(k, sums, norm_tensors, steps_before);
    const auto sums0 = sums;
    launch(1, [&] { optimizer_decide_f32(state.data(), (uint32_t)sums.size(), norm_tensors, k); });
    check_header(c, state, want);
    c.exact("optimizer_decide_f32 sums kept", "sums kept", std::vector<double>(state.begin() + OPTIM_HEADER, state.end()),
            sums0);
}

// The whole device-side step as src/cuda/nn.rs queues it: the norm
// partials into the scratch, each tensor's sum into the state, the decision,
// then adamw_multi_state_f32. Tensors of different lengths (an empty one),
// a guard after them; `poison` puts a NaN into a gradient (refused: nothing
// may change) or an ∞ into the guard.
static void test_optimizer_step(int poison, double steps_before, double grad_scale, uint64_t seed) {
    Rng rng(seed);
    const std::vector<uint64_t> ns = {31, 0, 4097, 1, 300, 5};  // the last one is the guard
    const uint32_t tensors = (uint32_t)ns.size(), norm_tensors = tensors - 1;
    const OptimArgs k{1.0, 0.9, 0.95, 1e-8, 0.1, 3, 40, 0, 0};
    uint64_t longest = 0;
    for (uint64_t n : ns) longest = max(longest, n);
    const unsigned blocks = grid_stride(longest);
    Case c("f32", fmt("optimizer step poison=%d step=%g grad*%g (grid %u x %u x %u)", poison, steps_before,
                      grad_scale, blocks, tensors, THREADS));
    struct Host {
        std::vector<float> p, g, m, v;
        double lr, wd;
    };
    std::vector<Host> hs;
    for (uint64_t n : ns) {
        Host h;
        h.p = rand_vec<float>(rng, n, -1, 1), h.g = rand_vec<float>(rng, n, -grad_scale, grad_scale);
        h.m = rand_vec<float>(rng, n, -0.1, 0.1), h.v = rand_vec<float>(rng, n, 0, 0.01);
        h.lr = rng.uni(0.001, 0.1), h.wd = rng.uni(0, 0.2);
        hs.push_back(std::move(h));
    }
    if (poison == 1) hs[2].g[4000] = NAN;
    if (poison == 2) hs.back().g[3] = INFINITY;
    std::vector<const float*> ptrs;
    std::vector<double> sums;
    for (const auto& h : hs) {
        ptrs.push_back(h.g.data());
        long double s = 0;
        for (float x : h.g) s += (long double)x * x;
        sums.push_back((double)s);
    }
    const auto header = ref_decide(k, sums, norm_tensors, steps_before);
    std::vector<double> state(OPTIM_HEADER + tensors, NAN);
    state[OPTIM_STEP] = steps_before;
    auto scratch = poisoned<double>((size_t)blocks * tensors);
    launch(Dim3{blocks, tensors, 1}, [&] { sum_squares_multi_partial_f32(ptrs.data(), ns.data(), scratch.data()); });
    launch(tensors, [&] { sum_squares_final_f32(scratch.data(), blocks, state.data() + OPTIM_HEADER); });
    launch(1, [&] { optimizer_decide_f32(state.data(), tensors, norm_tensors, k); });
    check_header(c, state, header);
    close_or_same(c, "optimizer step sums", "sums", std::vector<double>(state.begin() + OPTIM_HEADER, state.end()),
                  sums, tol_of<double>());

    std::vector<AdamWEntry> table;
    std::vector<Host> before(hs.begin(), hs.end() - 1);
    for (uint32_t t = 0; t < norm_tensors; ++t) {
        auto& h = hs[t];
        table.push_back({addr(h.p.data()), addr(h.g.data()), addr(h.m.data()), addr(h.v.data()), h.p.size(), h.lr, h.wd});
    }
    launch(Dim3{blocks, norm_tensors, 1}, [&] { adamw_multi_state_f32(table.data(), state.data(), k); });
    std::vector<float> p, m, v;
    std::vector<double> pw, mw, vw;
    for (uint32_t t = 0; t < norm_tensors; ++t) {
        const auto &h = hs[t], &h0 = before[t];
        for (size_t i = 0; i < h.p.size(); ++i) {
            if (header[OPTIM_ACCEPTED] == 0) {
                pw.push_back(h0.p[i]), mw.push_back(h0.m[i]), vw.push_back(h0.v[i]);
                continue;
            }
            const double gi = h0.g[i] * header[OPTIM_SCALE], lr = h0.lr * header[OPTIM_LR_FACTOR];
            const double mi = k.beta1 * h0.m[i] + (1 - k.beta1) * gi, vi = k.beta2 * h0.v[i] + (1 - k.beta2) * gi * gi;
            double pi = h0.p[i];
            pi -= lr * h0.wd * pi;
            pi -= lr * (mi / header[OPTIM_CORRECTION1]) / (std::sqrt(vi / header[OPTIM_CORRECTION2]) + k.eps);
            pw.push_back(pi), mw.push_back(mi), vw.push_back(vi);
        }
        p.insert(p.end(), h.p.begin(), h.p.end());
        m.insert(m.end(), h.m.begin(), h.m.end());
        v.insert(v.end(), h.v.begin(), h.v.end());
    }
    if (header[OPTIM_ACCEPTED] == 0) {
        // Refused: every byte as it was.
        std::vector<float> p0, m0, v0;
        for (const auto& h0 : before) {
            p0.insert(p0.end(), h0.p.begin(), h0.p.end());
            m0.insert(m0.end(), h0.m.begin(), h0.m.end());
            v0.insert(v0.end(), h0.v.begin(), h0.v.end());
        }
        c.exact("adamw_multi_state_f32 refused", "param", p, p0);
        c.exact("adamw_multi_state_f32 refused", "m", m, m0);
        c.exact("adamw_multi_state_f32 refused", "v", v, v0);
    } else {
        c.close("adamw_multi_state_f32 param", "param", p, pw, F32_TOL);
        c.close("adamw_multi_state_f32 m", "m", m, mw, F32_TOL);
        c.close("adamw_multi_state_f32 v", "v", v, vw, F32_TOL);
    }
}

// ---- driver -------------------------------------------------------------------

template <typename T> static void run_dtype(uint64_t seed) {
    // rows 130: three row chunks of the parameter gradients, and a last
    // block with two of its eight warps in use.
    for (uint32_t rows : {1u, 7u, 130u})
        // 12, 768, 1024: the register path (d % 4 == 0, d ≤ 1024); 1028:
        // a multiple of 4 too wide for it; the rest: the plain loop.
        for (uint32_t d : {1u, 12u, 31u, 33u, 257u, 768u, 1024u, 1028u}) test_layernorm<T>(rows, d, d, seed++);
    // Packed rows: ld = d + p (p a multiple of 8: the 16-byte path), an ld
    // that is not a multiple of 4 (the plain loop), an odd width.
    for (auto [d, ld] : {std::pair{12u, 20u}, std::pair{768u, 776u}, std::pair{12u, 13u}, std::pair{31u, 40u}})
        test_layernorm<T>(5, d, ld, seed++);
    for (uint64_t n : {1ull, 31ull, 4097ull}) test_elementwise<T>(n, seed++);
    for (auto [rows, cols, ld] : {std::tuple{7ull, 16ull, 24ull}, std::tuple{5ull, 768ull, 776ull},
                                  std::tuple{3ull, 12ull, 13ull}, std::tuple{4ull, 31ull, 40ull}})
        test_strided<T>(rows, cols, ld, seed++);
    // padded == vocab: 16-byte packs only where vocab allows them (f32:
    // 1031 no, 1032 yes); padded > vocab: the LM head's padded rows, packed
    // (multiples of 64) and not (1, 7 → 9). 9000 → 9024: several packs per
    // thread.
    for (auto [vocab, padded] : std::vector<std::pair<uint32_t, uint32_t>>{
             {1, 1}, {7, 7}, {257, 257}, {1031, 1031}, {1032, 1032}, {1, 64}, {7, 9}, {257, 320}, {1031, 1088},
             {9000, 9024}})
        test_cross_entropy<T>(vocab, padded, seed++);
    for (const EmbShape& s : {EmbShape{1, 1, 1, 1, 1}, EmbShape{3, 11, 31, 1, 11}, EmbShape{2, 5, 33, 7, 8},
                              EmbShape{4, 9, 257, 257, 9}, EmbShape{2, 6, 768, 7, 13}})
        test_embedding_forward<T>(s, seed++);
}

static void run_f32_only(uint64_t seed) {
    for (uint32_t n : {0u, 1u, 31u, 1000u, 3 * THREADS + 17, 8192u})
        for (double ignored : {0.0, 0.4, 1.0}) test_ce_mean_scale(n, ignored, seed++);
    // vocab 1: one token, one group of every row; vocab 7: repeats;
    // vocab 257: mostly distinct tokens. positions > seq: rows left alone.
    for (const EmbShape& s : {EmbShape{1, 1, 1, 1, 1}, EmbShape{3, 11, 31, 1, 11}, EmbShape{2, 5, 33, 7, 8},
                              EmbShape{4, 9, 257, 257, 9}, EmbShape{2, 6, 768, 7, 13}})
        test_embedding_backward(s, Ids::Random, seed++);
    // Rows not a multiple of the 256-row chunk: 300 (two chunks, the last
    // of 44 rows), 769 (four, the last of one), 513 (three); the vocabulary
    // wider than the scan block (1031: a slice of 5 per thread, the last
    // ones empty) and narrower (7, 200: slices of one, most threads idle).
    for (Ids ids : {Ids::Random, Ids::Same, Ids::Straddle, Ids::Corrupt}) {
        test_embedding_backward(EmbShape{3, 100, 5, 7, 100}, ids, seed++);
        test_embedding_backward(EmbShape{1, 769, 3, 1031, 769}, ids, seed++);
    }
    for (uint32_t vocab : {300u, 1031u}) test_embedding_backward(EmbShape{3, 100, 5, vocab, 100}, Ids::Distinct, seed++);
    test_embedding_backward(EmbShape{1, 513, 2, 2, 513}, Ids::Straddle, seed++);
    // The bench's shape (8 × 1024 rows, the padded GPT-2 vocabulary: 32
    // chunks, a 197-entry scan slice per thread), narrow rows.
    for (Ids ids : {Ids::Random, Ids::Same})
        test_embedding_backward(EmbShape{8, 1024, 2, 50304, 1024}, ids, seed++);
    for (uint64_t n : {1ull, 31ull, 4097ull})
        for (int step : {1, 7}) test_adamw(n, step, seed++);
    for (uint64_t n : {1ull, 31ull, 4097ull}) test_sum_squares({n}, seed++);
    test_sum_squares({31, 0, 4097, 1, 1000}, seed++);
    for (int step : {1, 7}) test_adamw_multi(step, seed++);
    test_sum_squares_final(1000, seed++);
    // clip_norm, β1, β2, ε, min_lr_ratio, warmup, total, decay.
    const OptimArgs cosine{1.0, 0.9, 0.999, 1e-8, 0.1, 10, 100, 0, 0};
    OptimArgs linear = cosine, constant = cosine, no_clip = cosine, no_warmup = cosine;
    linear.decay = 1, constant.decay = 2, no_clip.clip_norm = 0, no_warmup.warmup = 0;
    test_optimizer_decide("clipped warmup", {4.0, 9.0, 0.0, 1.0}, 3, 0, cosine);
    test_optimizer_decide("within clip, cosine", {0.01, 0.2, 0.0}, 3, 54, cosine);
    test_optimizer_decide("linear, past total", {0.5, 0.25}, 2, 150, linear);
    test_optimizer_decide("constant", {3.0, 1.0}, 2, 30, constant);
    test_optimizer_decide("no clip, no warmup", {400.0, 1.0}, 2, 0, no_warmup);
    test_optimizer_decide("clip 0", {400.0, 1.0}, 2, 5, no_clip);
    test_optimizer_decide("NaN gradient", {1.0, NAN, 2.0, INFINITY}, 3, 7, cosine);
    test_optimizer_decide("infinite guard", {1.0, 2.0, INFINITY}, 2, 7, cosine);
    test_optimizer_decide("norm overflow", {1e308, 1e308}, 2, 7, cosine);
    {
        Rng rng(seed++);
        std::vector<double> many(600);
        for (auto& x : many) x = rng.uni(0, 3);
        test_optimizer_decide("600 tensors", many, 597, 11, linear);
    }
    for (double steps : {0.0, 8.0})
        for (double gs : {0.01, 3.0}) test_optimizer_step(0, steps, gs, seed++);
    test_optimizer_step(1, 8.0, 1.0, seed++);
    test_optimizer_step(2, 8.0, 1.0, seed++);
}

int main(int argc, char** argv) {
    const std::string which = argc > 1 ? argv[1] : "all";
    if (which != "all" && which != "f32" && which != "f16" && which != "bf16") {
        std::fprintf(stderr, "usage: %s [all|f32|f16|bf16]\n", argv[0]);
        return 2;
    }
    if (which == "all" || which == "f32") {
        run_dtype<float>(2000);
        run_f32_only(2500);
    }
    if (which == "all" || which == "f16") run_dtype<__half>(3000);
    if (which == "all" || which == "bf16") run_dtype<__nv_bfloat16>(4000);

    std::printf("\n%-52s %-5s %6s %9s %9s  %s\n", "kernel output", "dtype", "cases", "worst", "tolerance", "");
    for (const auto& kernel : g_kernels)
        for (const char* dtype : {"f32", "f16", "bf16"}) {
            const auto it = g_stats.find({kernel, dtype});
            if (it == g_stats.end()) continue;
            const Stat& s = it->second;
            std::printf("%-52s %-5s %6d %9.1e %9.1e  %s\n", kernel.c_str(), dtype, s.cases, s.worst, s.tol,
                        s.failed ? "FAIL" : "ok");
        }
    std::printf("%d cases, %d failed\n", g_cases, g_failed_cases);
    std::printf(g_failed_cases ? "FAILURES\n" : "all ok\n");
    return g_failed_cases ? 1 : 0;
}
