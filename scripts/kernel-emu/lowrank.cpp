// Emulated run of kernels/lowrank.cu against an f64 reference written here
// from the definition (y = x·Wᵀ + bias + v⊙(s·((x·Aᵀ)⊙u)·Bᵀ), t = x·Aᵀ),
// for checking the kernels' tiling, tails, fragment use and grid-sync
// protocol on a machine without a GPU:
// - lowrank_decode_fused (M ≤ 16, one cooperative launch): every block of
//   the grid runs at once (emu.h's emu_launch_cooperative), grids capped at
//   a few blocks so blocks walk several tiles; f16/bf16 run its
//   mma.m16n8k16 path, f32 its CUDA-core path;
// - lowrank_decode (the single-launch add the engine path keeps);
// - the tensor-core shrink and dy kernels (lowrank_shrink_rRB,
//   lowrank_dy_p_rRB with their hi/lo split), through emu.h's WMMA.
// Launch geometry follows src/cuda/lowrank.rs. Outputs start as NaN with NaN
// guards around them: an element not written, or written outside, fails.
// Error bounds are derived per element (see `bound_of`). Build and run with
// scripts/kernel-emu/run.sh lowrank [dtype].
#pragma GCC optimize("no-strict-aliasing")  // the kernels pack halves through uint4, as CUDA code does
#include "emu.h"

#include <random>
#include <string>

#define __align__(n) __attribute__((aligned(n)))
// Each block's own dynamic shared memory (see emu_launch_cooperative).
#define LOWRANK_DYN_SMEM(name) float* name = reinterpret_cast<float*>(emu_dyn_smem)

#include "lowrank.cu"

// Device allocations are 256-byte aligned; WMMA needs 32 bytes. std::vector
// gives 16, so buffers the kernels address by fragments use this.
template <typename V> struct Aligned256 {
    using value_type = V;
    Aligned256() = default;
    template <typename W> Aligned256(const Aligned256<W>&) {}
    V* allocate(size_t n) { return static_cast<V*>(::operator new(n * sizeof(V), std::align_val_t(256))); }
    void deallocate(V* p, size_t) { ::operator delete(p, std::align_val_t(256)); }
    template <typename W> bool operator==(const Aligned256<W>&) const { return true; }
};
template <typename V> using DevVec = std::vector<V, Aligned256<V>>;

static int g_cases = 0, g_failed = 0;
static const double U32 = 0x1p-24;

template <typename T> static double f(T v) { return (double)to_f32(v); }

// Worst-case bound of an f32 sum of n products in any order:
// γ(n) = n·u/(1 − n·u) times the sum of magnitudes.
static double gamma32(double n) { return n * U32 / (1 - n * U32); }

// A stored result rounded once to T from an f32 value within `e32` of the
// exact `want`: |T(out) − want| ≤ e32 + u_T·(|want| + e32) + subnormal ulp.
template <typename T> static double bound_of(double want, double e32) {
    return e32 + unit<T>() * (std::fabs(want) + e32) + sub_ulp<T>();
}

struct Check {
    size_t bad = 0, guards = 0;
    double worst = 0;
    void value(double got, double want, double bound) {
        const double err = std::fabs(got - want);
        bad += !(err <= bound);  // NaN (never written) fails too
        worst = std::max(worst, err / bound);
    }
    bool ok() const { return bad == 0 && guards == 0; }
    std::string why() const {
        std::string s;
        if (bad) s += " " + std::to_string(bad) + " outside the bound";
        if (guards) s += " " + std::to_string(guards) + " writes outside the output";
        return s;
    }
};

static void report(bool ok, const std::string& what, const Check& c) {
    ++g_cases;
    g_failed += !ok;
    std::printf("%s %s: worst err/bound %.3f%s\n", ok ? "ok  " : "FAIL", what.c_str(), c.worst, c.why().c_str());
}

// Inputs of one layer: x (offset by `x_off` elements into its buffer, so
// offset 1 breaks 16-byte rows), W, bias in T; A, B, u, v in f32.
template <typename T> struct Layer {
    int M, K, N, r;
    DevVec<T> xbuf, W, bias;
    std::vector<float> A, B, u, v;
    float scale;
    int x_off;
    const T* x() const { return xbuf.data() + x_off; }
    Layer(int M_, int K_, int N_, int r_, bool with_bias, bool with_uv, int x_off_, uint64_t seed)
        : M(M_), K(K_), N(N_), r(r_), scale(0.75f), x_off(x_off_) {
        std::mt19937_64 rng(seed);
        std::uniform_real_distribution<float> uni(-1.0f, 1.0f), pos(0.5f, 1.5f);
        xbuf.assign((size_t)M * K + x_off, from_f32<T>(0.f));
        for (size_t i = 0; i < (size_t)M * K; ++i) xbuf[x_off + i] = from_f32<T>(uni(rng));
        W.resize((size_t)N * K);
        for (T& w : W) w = from_f32<T>(uni(rng));
        A.resize((size_t)r * K);
        for (float& a : A) a = 0.5f * uni(rng);
        B.resize((size_t)N * r);
        for (float& b : B) b = 0.5f * uni(rng);
        if (with_bias) {
            bias.resize(N);
            for (T& b : bias) b = from_f32<T>(uni(rng));
        }
        if (with_uv) {
            u.resize(r);
            v.resize(N);
            for (float& e : u) e = pos(rng);
            for (float& e : v) e = uni(rng);
        }
    }
    const float* uptr() const { return u.empty() ? nullptr : u.data(); }
    const float* vptr() const { return v.empty() ? nullptr : v.data(); }
    const T* bptr() const { return bias.empty() ? nullptr : bias.data(); }
};

// Reference t = x·Aᵀ (and Σ|x·A|), and y with the f32 error bound of the
// kernels' arithmetic: the base sum over K, the shrink over K, the expand
// over r on top of t's error, three more roundings (scale·t·u, v·lr, the
// adds of bias and the two terms).
template <typename T> struct Reference {
    std::vector<double> t, t_mag, y, y_e32;
    explicit Reference(const Layer<T>& L) {
        const int M = L.M, K = L.K, N = L.N, r = L.r;
        t.assign((size_t)M * r, 0);
        t_mag.assign((size_t)M * r, 0);
        for (int m = 0; m < M; ++m)
            for (int q = 0; q < r; ++q)
                for (int k = 0; k < K; ++k) {
                    const double p = f(L.x()[(size_t)m * K + k]) * L.A[(size_t)q * K + k];
                    t[(size_t)m * r + q] += p;
                    t_mag[(size_t)m * r + q] += std::fabs(p);
                }
        y.assign((size_t)M * N, 0);
        y_e32.assign((size_t)M * N, 0);
        for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
                double base = 0, base_mag = 0, lr = 0, lr_mag = 0;
                for (int k = 0; k < K; ++k) {
                    const double p = f(L.x()[(size_t)m * K + k]) * f(L.W[(size_t)n * K + k]);
                    base += p;
                    base_mag += std::fabs(p);
                }
                for (int q = 0; q < r; ++q) {
                    const double uq = L.u.empty() ? 1.0 : L.u[q];
                    const double c = L.scale * uq * L.B[(size_t)n * r + q];
                    lr += c * t[(size_t)m * r + q];
                    lr_mag += std::fabs(c) * t_mag[(size_t)m * r + q];
                }
                const double vn = L.v.empty() ? 1.0 : L.v[n];
                const double bn = L.bias.empty() ? 0.0 : f(L.bias[n]);
                const double want = base + bn + vn * lr;
                y[(size_t)m * N + n] = want;
                const double mag = base_mag + std::fabs(bn) + std::fabs(vn) * lr_mag;
                y_e32[(size_t)m * N + n] = gamma32(K + 2) * base_mag + gamma32(K + r + 6) * std::fabs(vn) * lr_mag +
                                           gamma32(3) * mag;
            }
    }
};

// ---- the fused decode ---------------------------------------------------------

// Host logic of decode_fused in src/cuda/lowrank.rs, with the grid capped at
// `max_blocks` (the occupancy bound on a GPU).
template <typename T> static void run_fused(const Layer<T>& L, int max_blocks, bool inject, uint64_t) {
    const int M = L.M, K = L.K, N = L.N, r = L.r;
    const int tiles = (N + DEC_COLS - 1) / DEC_COLS;
    const int blocks = std::max(1, std::min(tiles, max_blocks));
    const int max_slices = (K + DEC_SLICE - 1) / DEC_SLICE;
    int slices = std::clamp(4096 / (M * r), 1, max_slices);
    const int k_slice = ((K + slices - 1) / slices + DEC_SLICE - 1) / DEC_SLICE * DEC_SLICE;
    slices = (K + k_slice - 1) / k_slice;
    std::vector<float> part((size_t)slices * M * r, NAN);
    // y and t with NaN guards of 8 elements on each side.
    std::vector<T> ybuf((size_t)M * N + 16, from_f32<T>(NAN));
    std::vector<float> tbuf((size_t)M * r + 16, NAN);
    T* y = ybuf.data() + 8;
    float* t = tbuf.data() + 8;
    const size_t smem = (size_t)(DEC_WARPS * DEC_MAX_M * DEC_COLS + M * r) * 4;
    emu_inject_mma_swap = inject;
    emu_launch_cooperative(blocks, DEC_THREADS, smem, [&] {
        decode_fused_impl<T>(L.x(), L.W.data(), L.A.data(), L.B.data(), L.uptr(), L.vptr(), L.bptr(), L.scale, y, t,
                             part.data(), M, K, N, r, k_slice, slices);
    });
    emu_inject_mma_swap = false;

    const Reference<T> ref(L);
    Check c;
    for (size_t i = 0; i < (size_t)M * N; ++i) c.value(f(y[i]), ref.y[i], bound_of<T>(ref.y[i], ref.y_e32[i]));
    for (size_t i = 0; i < (size_t)M * r; ++i)
        c.value(t[i], ref.t[i], gamma32(K + 1) * ref.t_mag[i] + 0x1p-149);
    for (int i = 0; i < 8; ++i) {
        c.guards += !std::isnan(f(ybuf[i])) + !std::isnan(f(ybuf[8 + (size_t)M * N + i]));
        c.guards += !std::isnan(tbuf[i]) + !std::isnan(tbuf[8 + (size_t)M * r + i]);
    }
    char what[200];
    std::snprintf(what, sizeof what, "decode_fused %s M=%d K=%d N=%d r=%d%s%s x+%d blocks=%d slices=%d%s", dname<T>(),
                  M, K, N, r, L.bias.empty() ? "" : " bias", L.u.empty() ? "" : " u,v", L.x_off, blocks, slices,
                  inject ? " [injected mma lane swap: must FAIL]" : "");
    if (inject) {
        // The self-test passes when the check fails.
        ++g_cases;
        g_failed += c.ok();
        std::printf("%s %s: %s\n", c.ok() ? "FAIL" : "ok  ", what,
                    c.ok() ? "the injected bug went unnoticed" : ("caught:" + c.why()).c_str());
        return;
    }
    report(c.ok(), what, c);
}

// ---- the single-launch add (y already holds x·Wᵀ) --------------------------

template <typename T> static void run_add(const Layer<T>& L, int max_blocks) {
    const int M = L.M, K = L.K, N = L.N, r = L.r;
    // As decode() in src/cuda/lowrank.rs, blocks capped.
    int blocks = std::max(1, std::min({max_blocks, (K + 31) / 32}));
    const int k_chunk = (K + blocks - 1) / blocks;
    blocks = (K + k_chunk - 1) / k_chunk;
    std::vector<float> work((size_t)(blocks + 1) * M * r, NAN), t((size_t)M * r, NAN);
    // y starts as x·Wᵀ rounded to T, as the base GEMM leaves it.
    std::vector<T> y((size_t)M * N);
    std::vector<double> y0((size_t)M * N);
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            double s = 0;
            for (int k = 0; k < K; ++k) s += f(L.x()[(size_t)m * K + k]) * f(L.W[(size_t)n * K + k]);
            y[(size_t)m * N + n] = from_f32<T>((float)s);
            y0[(size_t)m * N + n] = f(y[(size_t)m * N + n]);
        }
    emu_launch_cooperative(blocks, LR_THREADS, (size_t)M * r * 4, [&] {
        decode_impl<T>(L.x(), L.A.data(), L.B.data(), L.uptr(), L.vptr(), L.bptr(), L.scale, y.data(), t.data(),
                       work.data(), M, K, N, r, k_chunk);
    });
    const Reference<T> ref(L);
    Check c;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            const size_t i = (size_t)m * N + n;
            // want = y0 + (ref.y − exact base): the add's own term only.
            double base = 0, base_mag = 0;
            for (int k = 0; k < K; ++k) {
                const double p = f(L.x()[(size_t)m * K + k]) * f(L.W[(size_t)n * K + k]);
                base += p;
                base_mag += std::fabs(p);
            }
            const double want = y0[i] + (ref.y[i] - base);
            const double e32 = ref.y_e32[i] - gamma32(K + 2) * base_mag + gamma32(3) * std::fabs(y0[i]);
            c.value(f(y[i]), want, bound_of<T>(want, e32));
        }
    for (size_t i = 0; i < (size_t)M * r; ++i) c.value(t[i], ref.t[i], gamma32(K + 1) * ref.t_mag[i] + 0x1p-149);
    char what[160];
    std::snprintf(what, sizeof what, "decode_add %s M=%d K=%d N=%d r=%d%s%s blocks=%d", dname<T>(), M, K, N, r,
                  L.bias.empty() ? "" : " bias", L.u.empty() ? "" : " u,v", blocks);
    report(c.ok(), what, c);
}

// ---- tensor-core shrink and dy products (WMMA) -----------------------------

// hi/lo halves as lowrank_split writes them (one launch, as split() does).
template <typename T>
static void split_host(const float* src, bool trans, const float* cs, int rows, int cols, int rows_pad, int ld,
                       DevVec<T>& hi, DevVec<T>& lo) {
    hi.assign((size_t)rows_pad * ld, from_f32<T>(NAN));
    lo.assign((size_t)rows_pad * ld, from_f32<T>(NAN));
    emu_launch(Dim3{4, 1, 1}, LR_THREADS,
               [&] { split_impl<T>(src, trans, cs, hi.data(), lo.data(), rows, cols, rows_pad, ld); });
}

static int rank_block(int r) { return r <= 16 ? 16 : r <= 32 ? 32 : 64; }

// shrink_tc in src/cuda/lowrank.rs: part[split][row][q] over K-splits of a
// multiple of TC_KT, A split to hi/lo padded to r_pad × K_pad.
template <typename T, int RB> static void launch_shrink(const Layer<T>& L, int splits, std::vector<float>& part) {
    const int M = L.M, K = L.K, r = L.r;
    const int k_pad = (K + TC_KT - 1) / TC_KT * TC_KT, r_pad = (r + RB - 1) / RB * RB;
    DevVec<T> hi, lo;
    split_host<T>(L.A.data(), false, nullptr, r, K, r_pad, k_pad, hi, lo);
    const int steps = (K + TC_KT - 1) / TC_KT;
    const int k_per_split = (steps + splits - 1) / splits * TC_KT;
    splits = (K + k_per_split - 1) / k_per_split;
    part.assign((size_t)splits * M * r, NAN);
    const Dim3 grid{(unsigned)((M + 63) / 64), (unsigned)splits, (unsigned)(r_pad / RB)};
    emu_launch(grid, TC_THREADS, [&] {
        shrink_tc_impl<T, RB>(L.x(), K, hi.data(), lo.data(), k_pad, part.data(), M, K, r, k_per_split);
    });
}

// The hi/lo split keeps ~16 (bf16) or ~22 (f16) bits of each f32 factor:
// |a − hi − lo| ≤ u_T²·|a| (two roundings to T); products of 16-bit values
// are exact in f32; the sum of 2·n products has the f32 bound.
template <typename T> static double split_rel() { return 2 * unit<T>() * unit<T>() * (1 + unit<T>()); }

template <typename T> static void run_shrink_tc(const Layer<T>& L, int splits) {
    std::vector<float> part;
    const int rb = rank_block(L.r);
    if (rb == 16) launch_shrink<T, 16>(L, splits, part);
    else if (rb == 32) launch_shrink<T, 32>(L, splits, part);
    else launch_shrink<T, 64>(L, splits, part);
    const int M = L.M, r = L.r, nsplit = (int)(part.size() / ((size_t)M * r));
    const Reference<T> ref(L);
    Check c;
    for (size_t i = 0; i < (size_t)M * r; ++i) {
        double s = 0;
        for (int p = 0; p < nsplit; ++p) s += part[(size_t)p * M * r + i];
        c.value(s, ref.t[i], (gamma32(2 * L.K + nsplit) + split_rel<T>()) * ref.t_mag[i] + 0x1p-149);
    }
    char what[160];
    std::snprintf(what, sizeof what, "shrink_r%d (wmma) %s M=%d K=%d r=%d x+%d splits=%d", rb, dname<T>(), M, L.K, r,
                  L.x_off, nsplit);
    report(c.ok(), what, c);
}

// dy_p_tc in src/cuda/lowrank.rs: ppart[stripe][q][col] = Σ_rows dy·(t⊙u),
// here with dy = x (M×K playing M×N), t from the reference and u as the
// split's column scale (as dy_products_tc passes them).
template <typename T, int RB>
static void launch_dy_p(const T* dy, int M, int N, const std::vector<float>& t, const float* u, int r, int stripes,
                        std::vector<float>& ppart) {
    const int m_pad = (M + 15) / 16 * 16, ld = (r + RB - 1) / RB * RB;
    DevVec<T> hi, lo;
    split_host<T>(t.data(), false, u, M, r, m_pad, ld, hi, lo);
    const int tiles = (M + 15) / 16;
    const int rows_per_block = (tiles + stripes - 1) / stripes * 16;
    stripes = (M + rows_per_block - 1) / rows_per_block;
    ppart.assign((size_t)stripes * r * N, NAN);
    constexpr int WC = 16 * (64 / RB);
    const Dim3 grid{(unsigned)((N + TC_WARPS * WC - 1) / (TC_WARPS * WC)), (unsigned)stripes, (unsigned)(ld / RB)};
    emu_launch(grid, TC_THREADS,
               [&] { dy_p_impl<T, RB>(dy, N, hi.data(), lo.data(), ld, ppart.data(), M, N, r, rows_per_block); });
}

template <typename T> static void run_dy_p_tc(const Layer<T>& L, int stripes) {
    // dy := x (M×K, so N here is K); tu := t⊙u of the reference, in f32.
    const int M = L.M, N = L.K, r = L.r;
    const Reference<T> ref(L);
    std::vector<float> t((size_t)M * r), tu((size_t)M * r);
    for (size_t i = 0; i < tu.size(); ++i) {
        t[i] = (float)ref.t[i];
        tu[i] = t[i] * (L.u.empty() ? 1.f : L.u[i % r]);  // as the kernel's split forms it, rounded in f32
    }
    std::vector<float> ppart;
    const int rb = rank_block(r);
    if (rb == 16) launch_dy_p<T, 16>(L.x(), M, N, t, L.uptr(), r, stripes, ppart);
    else if (rb == 32) launch_dy_p<T, 32>(L.x(), M, N, t, L.uptr(), r, stripes, ppart);
    else launch_dy_p<T, 64>(L.x(), M, N, t, L.uptr(), r, stripes, ppart);
    const int nstripe = (int)(ppart.size() / ((size_t)r * N));
    Check c;
    for (int q = 0; q < r; ++q)
        for (int n = 0; n < N; ++n) {
            double want = 0, mag = 0, got = 0;
            for (int m = 0; m < M; ++m) {
                const double p = f(L.x()[(size_t)m * N + n]) * tu[(size_t)m * r + q];
                want += p;
                mag += std::fabs(p);
            }
            for (int s = 0; s < nstripe; ++s) got += ppart[((size_t)s * r + q) * N + n];
            c.value(got, want, (gamma32(2 * M + nstripe) + split_rel<T>()) * mag + 0x1p-149);
        }
    char what[160];
    std::snprintf(what, sizeof what, "dy_p_r%d (wmma) %s M=%d N=%d r=%d stripes=%d", rb, dname<T>(), M, N, r, nstripe);
    report(c.ok(), what, c);
}

// ---- cases ------------------------------------------------------------------

template <typename T> static void run_all(uint64_t seed) {
    struct S {
        int M, K, N, r;
        bool bias, uv;
        int x_off, max_blocks;
    };
    // M across the m16 tile (1, 3, 16); K with ragged 8-element chunks (37,
    // 300), several 32-wide steps per warp and several shrink slices (1000,
    // 2056), a misaligned x (x+1: element loads); N with partial 16-column
    // tiles; r from 1 to 64; grids of 1–3 blocks walking several tiles, and
    // one with more blocks than tiles.
    const S cases[] = {
        {1, 8, 5, 1, false, false, 0, 1},     {1, 300, 40, 4, true, false, 0, 2},
        {3, 37, 129, 16, true, true, 0, 3},   {16, 1000, 40, 64, true, true, 0, 2},
        {16, 256, 17, 4, false, true, 1, 2},  {3, 2056, 33, 16, true, false, 0, 3},
        {1, 512, 16, 64, false, true, 0, 2},  {16, 64, 8, 1, true, false, 0, 1},
        {1, 1, 1, 1, true, true, 0, 1},       {2, 5, 3, 2, false, false, 0, 1},
    };
    for (const S& c : cases) {
        const Layer<T> L(c.M, c.K, c.N, c.r, c.bias, c.uv, c.x_off, seed++);
        run_fused<T>(L, c.max_blocks, false, seed);
    }
    if constexpr (sizeof(T) == 2) {
        const Layer<T> L(3, 300, 40, 4, true, true, 0, seed++);
        run_fused<T>(L, 2, true, seed);  // self-test: a wrong fragment layout must fail
    }
    const S add_cases[] = {{1, 300, 40, 4, true, false, 0, 3}, {16, 1000, 33, 16, false, true, 0, 2}};
    for (const S& c : add_cases) {
        const Layer<T> L(c.M, c.K, c.N, c.r, c.bias, c.uv, 0, seed++);
        run_add<T>(L, c.max_blocks);
    }
    if constexpr (sizeof(T) == 2) {
        // Rank buckets 16/32/64 (r = 3, 20, 64, and 100 over two rank
        // blocks), rows across 64-row blocks, K across splits.
        const S tc_cases[] = {{70, 200, 1, 3, false, false, 0, 1},  {16, 1000, 1, 20, false, true, 0, 3},
                              {130, 136, 1, 64, false, false, 0, 2}, {33, 72, 1, 100, false, true, 0, 1}};
        for (const S& c : tc_cases) {
            const Layer<T> L(c.M, c.K, 1, c.r, false, c.uv, 0, seed++);
            run_shrink_tc<T>(L, c.max_blocks);
            run_dy_p_tc<T>(L, c.max_blocks);
        }
    }
}

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines before an abort are kept
    const std::string dtype = argc > 1 ? argv[1] : "all";
    if (dtype == "all" || dtype == "f32") run_all<float>(10);
    if (dtype == "all" || dtype == "f16") run_all<__half>(20);
    if (dtype == "all" || dtype == "bf16") run_all<__nv_bfloat16>(30);
    std::printf("lowrank: %d of %d checks passed\n", g_cases - g_failed, g_cases);
    return g_failed ? 1 : 0;
}
