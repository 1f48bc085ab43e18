// Emulator harness for kernels/multi_adapter.cu: builds pools, descriptors
// and work items the way src/multi_adapter.rs does (tiles of ≤ 8 rows of one
// adapter, 8-rank shrink items, 2048-column expand items), runs
// multi_adapter_shrink then multi_adapter_expand with the wrappers' launch
// geometry, and checks y against a direct f64 reference per row, element by
// element within the derived bound of tests/multi_adapter.rs:
//   |got − want| ≤ (u_T + 2⁻²⁴)·|want| + (K + r + 4)·2⁻²⁴·mag.
// Covers factor adapters with and without u, v, θ adapters with hash and
// balanced projections, mixed ranks 1–128, ids −1, runs of equal ids across
// tiles, the 16-byte and scalar paths (K, N multiples of 8 or not), and
// NaN-poisoned t' scratch (a read of an unwritten t' shows up as NaN).
#include "emu.h"

#include <map>
#include <random>
#include <string>
#include <tuple>

#include "multi_adapter.cu"

template <typename T> struct Names;
template <> struct Names<float> {
    static constexpr const char* name = "f32";
    static constexpr double unit = 0.0;
};
template <> struct Names<__half> {
    static constexpr const char* name = "f16";
    static constexpr double unit = 1.0 / 2048;
};
template <> struct Names<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr double unit = 1.0 / 256;
};

template <typename T> static void shrink(Dim3 g, const T* x, const T* a, const float* f, const uint32_t* d, const uint4* it, float* t, int K, int ld);
template <typename T> static void expand(Dim3 g, const T* bt, const float* f, const uint32_t* d, const uint4* it, const float* t, T* y, int N, int ld);
#define BIND(SUFFIX, T)                                                                                          \
    template <> void shrink<T>(Dim3 g, const T* x, const T* a, const float* f, const uint32_t* d, const uint4* it, \
                               float* t, int K, int ld) {                                                        \
        emu_launch(g, MA_THREADS, [&] { multi_adapter_shrink_##SUFFIX(x, a, f, d, it, t, K, ld); });               \
    }                                                                                                            \
    template <> void expand<T>(Dim3 g, const T* bt, const float* f, const uint32_t* d, const uint4* it,           \
                               const float* t, T* y, int N, int ld) {                                            \
        emu_launch(g, MA_THREADS, [&] { multi_adapter_expand_##SUFFIX(bt, f, d, it, t, y, N, ld); });             \
    }
LORAFUSE_FOR_EACH_DTYPE(BIND)

static std::mt19937_64 rng_of(uint64_t seed) { return std::mt19937_64(seed); }
static float uni(std::mt19937_64& r, float lo, float hi) {
    return lo + (hi - lo) * (float)((r() >> 11) * (1.0 / 9007199254740992.0));
}

// One adapter as the reference sees it (f64 values of what the kernel reads).
struct RefAdapter {
    int rank = 0;
    double scale = 0;
    std::vector<double> a, b, u, v;  // r×K, N×r, r (or empty), N (or empty)
};

static int g_cases = 0, g_failed = 0;
static std::map<std::string, double> g_worst;

template <typename T> static void run_case(uint64_t seed, int K, int N) {
    auto r = rng_of(seed);
    const int slots = 7;
    std::vector<T> a_rows, bt_rows;
    std::vector<float> floats;
    std::vector<uint32_t> descs(slots * MA_DESC_WORDS, 0);
    std::vector<RefAdapter> refs(slots);
    const int ranks[] = {1, 5, 8, 9, 16, 33, 128};
    const uint32_t d = 41;
    const uint64_t rows_d = 300000;
    // Column scales of one projection (any positive values: the kernel reads them).
    const uint32_t colscale_off = 0;
    for (uint32_t j = 0; j < d; ++j) floats.push_back(uni(r, 0.2f, 1.0f));
    for (int s = 0; s < slots; ++s) {
        if (s == 6) continue;  // an empty slot no batch names
        const int rank = ranks[(s * 3 + seed) % 7];
        RefAdapter& ref = refs[s];
        ref.rank = rank;
        const float scale = uni(r, 0.25f, 2.0f);
        ref.scale = scale;
        uint32_t* w = &descs[s * MA_DESC_WORDS];
        w[MA_D_RANK] = rank;
        std::memcpy(&w[MA_D_SCALE], &scale, 4);
        w[MA_D_U_OFF] = w[MA_D_V_OFF] = MA_OFF_NONE;
        const int kind = s % 3;  // 0, 1: factors (1 with vectors), 2: θ
        if (kind < 2) {
            w[MA_D_KIND] = MA_KIND_FACTORS;
            w[MA_D_BASE] = (uint32_t)(a_rows.size() / K);
            ref.a.resize((size_t)rank * K);
            ref.b.resize((size_t)N * rank);
            for (int q = 0; q < rank; ++q)
                for (int k = 0; k < K; ++k) {
                    const T v = from_f32<T>(uni(r, -1, 1));
                    a_rows.push_back(v);
                    ref.a[(size_t)q * K + k] = to_f32(v);
                }
            std::vector<T> bt((size_t)rank * N);
            for (int q = 0; q < rank; ++q)
                for (int n = 0; n < N; ++n) {
                    const T v = from_f32<T>(uni(r, -1, 1));
                    bt[(size_t)q * N + n] = v;
                    ref.b[(size_t)n * rank + q] = to_f32(v);
                }
            bt_rows.insert(bt_rows.end(), bt.begin(), bt.end());
            if (kind == 1) {
                w[MA_D_U_OFF] = (uint32_t)floats.size();
                for (int q = 0; q < rank; ++q) floats.push_back(uni(r, -1.5f, 1.5f)), ref.u.push_back(floats.back());
                w[MA_D_V_OFF] = (uint32_t)floats.size();
                for (int n = 0; n < N; ++n) floats.push_back(uni(r, -1.5f, 1.5f)), ref.v.push_back(floats.back());
            }
        } else {
            const uint32_t mode = (s / 3) % 2, half_bits = 10;  // 2^20 ≥ rows_d
            const uint64_t key = r();
            w[MA_D_KIND] = MA_KIND_THETA;
            w[MA_D_BASE] = (uint32_t)floats.size();
            std::vector<float> theta(d);
            for (auto& v : theta) v = uni(r, -1, 1), floats.push_back(v);
            w[MA_D_COLSCALE_OFF] = colscale_off;
            w[MA_D_COLS] = d;
            w[MA_D_KEY] = (uint32_t)key, w[MA_D_KEY + 1] = (uint32_t)(key >> 32);
            w[MA_D_ROWS] = (uint32_t)rows_d, w[MA_D_ROWS + 1] = 0;
            w[MA_D_MODE] = mode, w[MA_D_HALF_BITS] = half_bits;
            const uint64_t a_start = r() % (rows_d - (uint64_t)rank * (K + N));
            const uint64_t b_start = a_start + (uint64_t)rank * K;
            w[MA_D_A_START] = (uint32_t)a_start, w[MA_D_A_START + 1] = 0;
            w[MA_D_B_START] = (uint32_t)b_start, w[MA_D_B_START + 1] = 0;
            auto at = [&](uint64_t i) {
                const uint32_t j = projection_column(key, rows_d, d, mode, half_bits, i);
                return (double)(theta[j] * floats[colscale_off + j]);
            };
            for (int i = 0; i < rank * K; ++i) ref.a.push_back(at(a_start + i));
            for (int i = 0; i < N * rank; ++i) ref.b.push_back(at(b_start + i));
        }
    }
    if (a_rows.empty()) a_rows.resize(8), bt_rows.resize(8);
    // A batch of runs with awkward lengths; ids −1 and repeats included.
    const int lens[] = {1, 2, 7, 8, 9, 17, 3};
    std::vector<int32_t> ids;
    for (int seg = 0; seg < 6; ++seg) {
        const int len = lens[r() % 7];
        const int pick = (int)(r() % 7);
        const int32_t id = pick == 6 ? -1 : pick;
        for (int i = 0; i < len; ++i) ids.push_back(id);
    }
    const int M = (int)ids.size();
    // The host plan (src/multi_adapter.rs `plan`).
    std::vector<uint4> sh, ex;
    int ld = 1;
    for (int first = 0; first < M;) {
        int len = 1;
        while (first + len < M && ids[first + len] == ids[first]) ++len;
        if (ids[first] >= 0) {
            const int rank = refs[ids[first]].rank;
            ld = std::max(ld, rank);
            for (int row0 = first; row0 < first + len; row0 += MA_TILE_ROWS) {
                const unsigned rows = (unsigned)std::min(MA_TILE_ROWS, first + len - row0);
                for (int q0 = 0; q0 < rank; q0 += MA_SHRINK_RANKS) sh.push_back({(unsigned)row0, rows, (unsigned)ids[first], (unsigned)q0});
                for (int n0 = 0; n0 < N; n0 += MA_EXPAND_COLS) ex.push_back({(unsigned)row0, rows, (unsigned)ids[first], (unsigned)n0});
            }
        }
        first += len;
    }
    std::vector<T> x((size_t)M * K), y((size_t)M * N);
    for (auto& v : x) v = from_f32<T>(uni(r, -1, 1));
    for (auto& v : y) v = from_f32<T>(uni(r, -1, 1));
    const std::vector<T> y0 = y;
    std::vector<float> t((size_t)M * ld, NAN);
    if (!sh.empty()) {
        shrink<T>(Dim3{(unsigned)sh.size(), 1, 1}, x.data(), a_rows.data(), floats.data(), descs.data(), sh.data(), t.data(), K, ld);
        expand<T>(Dim3{(unsigned)ex.size(), 1, 1}, bt_rows.data(), floats.data(), descs.data(), ex.data(), t.data(), y.data(), N, ld);
    }
    // Reference and check.
    double worst = 0;
    int bad = 0;
    for (int i = 0; i < M; ++i) {
        const int id = ids[i];
        for (int n = 0; n < N; ++n) {
            const double got = to_f32(y[(size_t)i * N + n]), y0v = to_f32(y0[(size_t)i * N + n]);
            if (id < 0) {
                if (got != y0v) ++bad;
                continue;
            }
            const RefAdapter& a = refs[id];
            double want = y0v, mag = std::fabs(y0v), z = 0, zmag = 0;
            for (int q = 0; q < a.rank; ++q) {
                double dot = 0, dmag = 0;
                for (int k = 0; k < K; ++k) {
                    const double p = (double)to_f32(x[(size_t)i * K + k]) * a.a[(size_t)q * K + k];
                    dot += p, dmag += std::fabs(p);
                }
                const double su = a.scale * (a.u.empty() ? 1.0 : a.u[q]);
                const double bq = a.b[(size_t)n * a.rank + q];
                z += su * dot * bq, zmag += std::fabs(su) * dmag * std::fabs(bq);
            }
            const double vn = a.v.empty() ? 1.0 : a.v[n];
            want += vn * z, mag += std::fabs(vn) * zmag;
            const double bound = (Names<T>::unit + std::ldexp(1.0, -24)) * std::fabs(want) +
                                 (K + a.rank + 4) * std::ldexp(1.0, -24) * mag;
            const double ratio = std::fabs(got - want) / bound;
            if (!(ratio <= 1.0)) ++bad;
            if (!(ratio <= worst)) worst = ratio;
        }
    }
    ++g_cases;
    const std::string key = std::string(Names<T>::name) + " K=" + std::to_string(K) + " N=" + std::to_string(N);
    g_worst[key] = std::max(g_worst[key], worst);
    if (bad) {
        ++g_failed;
        std::printf("FAIL %s seed %llu M=%d: %d elements outside the bound (worst ratio %.3g)\n", key.c_str(),
                    (unsigned long long)seed, M, bad, worst);
    }
}

template <typename T> static void run_dtype(uint64_t seed) {
    // (64, 2056): 16-byte paths, two expand column blocks, a partial one;
    // (37, 45): scalar paths; (24, 8): one thread's columns cover N.
    for (auto [K, N, cases] : {std::tuple{64, 2056, 1}, std::tuple{37, 45, 2}, std::tuple{24, 8, 2}})
        for (int c = 0; c < cases; ++c) run_case<T>(seed++, K, N);
}

int main(int argc, char** argv) {
    const std::string which = argc > 1 ? argv[1] : "all";
    if (which == "all" || which == "f32") run_dtype<float>(10);
    if (which == "all" || which == "f16") run_dtype<__half>(20);
    if (which == "all" || which == "bf16") run_dtype<__nv_bfloat16>(30);
    std::printf("\n%-28s %s\n", "multi_adapter case", "worst error / derived bound");
    for (const auto& [k, w] : g_worst) std::printf("%-28s %.3f\n", k.c_str(), w);
    std::printf("%d cases, %d failed\n%s\n", g_cases, g_failed, g_failed ? "FAILURES" : "all ok");
    return g_failed ? 1 : 0;
}
