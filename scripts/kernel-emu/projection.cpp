// Emulated run of kernels/projection.cu against references written here
// from the definition in src/projection.rs (SplitMix64 columns, Feistel
// permutation, 1/sqrt(n_j) scales), for checking the kernels' tiling,
// alignment handling, segment tables and the deterministic scatter's
// speculate/settle protocol on a machine without a GPU. Host-side launch
// logic (segment tables, lead rows, one grid for both scatter phases)
// follows src/cuda/projection.rs; grids are capped at a few blocks so every
// block walks several tiles. Build and run with
// scripts/kernel-emu/run.sh projection [dtype].
#pragma GCC optimize("no-strict-aliasing")  // the kernels pack halves through uint4, as CUDA code does
#include "emu.h"

#include <algorithm>
#include <atomic>
#include <random>
#include <string>

// ---- what projection.cu needs beyond emu.h ---------------------------------

// Every block's dynamic shared memory (blocks run one at a time); the kernels
// declare it as `extern __shared__ proj_smem[]`.
alignas(16) unsigned char proj_smem[232448];
#undef __shared__
#define __shared__
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
using std::isfinite;

template <typename V> inline V __ldg(const V* p) { return *p; }
template <typename V> inline V __ldcg(const V* p) { return std::atomic_ref<V>(*const_cast<V*>(p)).load(); }
template <typename V> inline V atomicAdd(V* p, V v) { return std::atomic_ref<V>(*p).fetch_add(v); }
inline uint32_t atomicMax(uint32_t* p, uint32_t v) {
    std::atomic_ref<uint32_t> a(*p);
    uint32_t old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
// The device saturates out-of-range conversions to INT64_MIN; so does this.
inline long long __float2ll_rn(float x) {
    if (!(std::fabs(x) < 9.2233720368547758e18f)) return INT64_MIN;
    return std::llrintf(x);
}

#include "projection.cu"

// ---- the projection, from its definition (src/projection.rs) -------------

static uint64_t ref_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t ref_splitmix_at(uint64_t key, uint64_t i) { return ref_mix64(key + (i + 1) * 0x9E3779B97F4A7C15ull); }

struct RefProjection {
    uint64_t rows, key;
    uint32_t cols, mode, half_bits;
    std::vector<uint32_t> index;  // explicit mode
    std::vector<uint32_t> counts;
    std::vector<float> scale;

    uint32_t column(uint64_t i) const {
        if (mode == PROJ_HASH) return (uint32_t)(((ref_splitmix_at(key, i) >> 32) * cols) >> 32);
        if (mode == PROJ_EXPLICIT) return index[i];
        const uint64_t mask = (1ull << half_bits) - 1;
        uint64_t x = i;
        do {
            uint64_t l = x >> half_bits, r = x & mask;
            for (uint64_t round = 0; round < 4; ++round) {
                const uint64_t f = ref_splitmix_at(key ^ (0xA5A5A5A5ull * (round + 1)), r) & mask;
                const uint64_t nl = r;
                r = l ^ f;
                l = nl;
            }
            x = (l << half_bits) | r;
        } while (x >= rows);
        return (uint32_t)(x % cols);
    }

    RefProjection(uint64_t rows_, uint32_t cols_, uint64_t seed, uint32_t mode_, std::mt19937_64& rng)
        : rows(rows_), cols(cols_), mode(mode_) {
        key = ref_mix64(seed ^ 0x4C4F524146555345ull);
        uint32_t bits = 64 - __builtin_clzll(std::max<uint64_t>(rows, 2) - 1);
        half_bits = std::max(1u, (bits + 1) / 2);
        if (mode == PROJ_EXPLICIT)
            for (uint64_t i = 0; i < rows; ++i) index.push_back((uint32_t)(rng() % cols));
        counts.assign(cols, 0);
        for (uint64_t i = 0; i < rows; ++i) counts[column(i)]++;
        for (uint32_t n : counts) scale.push_back(n ? (float)(1.0 / std::sqrt((double)n)) : 0.0f);
    }

    ColumnMap map() const {
        return ColumnMap{key, rows, mode == PROJ_EXPLICIT ? (uint64_t)(uintptr_t)index.data() : 0, cols, mode, half_bits, 0};
    }
    uint32_t headroom() const {
        const uint32_t n = *std::max_element(counts.begin(), counts.end());
        return n <= 1 ? 0 : 32 - __builtin_clz(n - 1);
    }
};

// ---- layouts and launches as in src/cuda/projection.rs -------------------

// One segment: rows [start, start + len) of θ_D, stored `offset` elements into
// its own buffer (so its address is not 16-byte aligned when offset·size is not).
struct Seg {
    uint64_t start;
    uint32_t len, offset;
};

template <typename T> static std::vector<SegmentTable> make_tables(const std::vector<Seg>& segs, std::vector<T*>& ptrs) {
    std::vector<SegmentTable> out;
    for (size_t c = 0; c < segs.size(); c += PROJ_MAX_SEGMENTS) {
        SegmentTable t{};
        const size_t n = std::min<size_t>(PROJ_MAX_SEGMENTS, segs.size() - c);
        t.count = (uint32_t)n;
        uint32_t tiles = 0;
        for (size_t k = 0; k < n; ++k) {
            const Seg& s = segs[c + k];
            const uint64_t addr = (uint64_t)(uintptr_t)ptrs[c + k];
            const uint64_t lead = std::min<uint64_t>((16 - addr % 16) % 16 / sizeof(T), s.len);
            t.dst[k] = addr;
            t.start[k] = s.start;
            t.len[k] = s.len;
            t.tile_start[k] = tiles;
            tiles += (uint32_t)std::max<uint64_t>(1, (s.len - lead + PROJ_TILE - 1) / PROJ_TILE);
        }
        t.tile_start[n] = tiles;
        out.push_back(t);
    }
    return out;
}

static unsigned grid_for(const SegmentTable& t, unsigned cap) { return std::max(1u, std::min(t.tile_start[t.count], cap)); }

// Buffers of one layout: each segment's storage with `offset` leading
// elements and a poisoned guard element after the end.
template <typename T> struct Buffers {
    std::vector<std::vector<T>> store;
    std::vector<T*> ptrs;
    explicit Buffers(const std::vector<Seg>& segs) {
        for (const Seg& s : segs) store.emplace_back(s.offset + s.len + 1, from_f32<T>(NAN));
        for (size_t k = 0; k < segs.size(); ++k) ptrs.push_back(store[k].data() + segs[k].offset);
    }
};

template <typename T>
static void gather(const RefProjection& p, const std::vector<Seg>& segs, Buffers<T>& buf, const std::vector<float>& theta,
                   bool stage, unsigned cap) {
    const ColumnMap map = p.map();
    for (const SegmentTable& t : make_tables<T>(segs, buf.ptrs)) {
        emu_launch(Dim3{grid_for(t, cap)}, PROJ_THREADS,
                   [&] { gather_impl<T>(t, map, theta.data(), p.scale.data(), stage ? 1u : 0u); });
    }
}

// Deterministic scatter: both phases over every table, one grid.
template <typename T>
static void scatter(const RefProjection& p, const std::vector<Seg>& segs, Buffers<T>& buf,
                    std::vector<unsigned long long>& ws, std::vector<float>& out, bool stage, unsigned cap) {
    const ColumnMap map = p.map();
    const auto tables = make_tables<T>(segs, buf.ptrs);
    unsigned blocks = 1;
    for (const auto& t : tables) blocks = std::max(blocks, grid_for(t, cap));
    for (uint32_t phase : {(uint32_t)SCATTER_SPECULATE, (uint32_t)SCATTER_SETTLE})
        for (size_t k = 0; k < tables.size(); ++k) {
            const uint32_t last = k + 1 == tables.size();
            emu_launch(Dim3{blocks}, PROJ_THREADS, [&] {
                scatter_impl<T>(tables[k], map, ws.data(), p.scale.data(), out.data(), p.headroom(), stage ? 1u : 0u,
                                phase, last);
            });
        }
}

static std::vector<unsigned long long> fresh_workspace(uint32_t cols) {
    std::vector<unsigned long long> ws(cols + SCATTER_STATE_U64, 0);
    ScatterState* st = reinterpret_cast<ScatterState*>(ws.data() + cols);
    st->guess = st->final_shift = SHIFT_NONE;
    return ws;
}

// ---- checks ------------------------------------------------------------------

static int g_cases = 0, g_failed = 0;

struct Check {
    std::string what;
    bool ok = true;
    std::string notes;
    void fail(const std::string& why) {
        if (ok) notes += " FAIL:";
        ok = false;
        notes += " " + why;
    }
    ~Check() {
        ++g_cases;
        g_failed += !ok;
        std::printf("%s %s%s\n", ok ? "ok  " : "FAIL", what.c_str(), notes.c_str());
    }
};

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// The workspace every call must leave behind: zero sums, zero max, zero
// ticket, no pending redo (guess and final_shift are kept).
static bool workspace_clean(const std::vector<unsigned long long>& ws, uint32_t cols) {
    for (uint32_t j = 0; j < cols; ++j)
        if (ws[j]) return false;
    const ScatterState* st = reinterpret_cast<const ScatterState*>(ws.data() + cols);
    return st->absmax_bits == 0 && st->ticket == 0 && st->redo == 0;
}

struct Case {
    const char* name;
    uint64_t rows;
    uint32_t cols, mode, parts;
    bool gaps, stage_gather, stage_scatter;
    unsigned cap;
};

static std::vector<Seg> layout(const Case& c, std::mt19937_64& rng) {
    // `parts` segments with random cut points; with gaps, every other
    // segment loses a random tail so those rows land nowhere.
    std::vector<uint64_t> cuts{0, c.rows};
    for (uint32_t k = 1; k < c.parts && c.rows > 1; ++k) cuts.push_back(1 + rng() % (c.rows - 1));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<Seg> segs;
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
        uint64_t len = cuts[k + 1] - cuts[k];
        if (c.gaps && k % 2 == 1 && len > 1) len -= 1 + rng() % (len - 1);
        segs.push_back(Seg{cuts[k], (uint32_t)len, (uint32_t)(rng() % 8)});
    }
    return segs;
}

template <typename T> static void run_case(const Case& c, uint64_t seed) {
    std::mt19937_64 rng(seed);
    const RefProjection p(c.rows, c.cols, seed, c.mode, rng);
    const std::vector<Seg> segs = layout(c, rng);
    char head[200];
    std::snprintf(head, sizeof head, "%s %s D=%llu d=%u segments=%zu stage=%d/%d grid<=%u", dname<T>(), c.name,
                  (unsigned long long)c.rows, c.cols, segs.size(), c.stage_gather, c.stage_scatter, c.cap);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);

    // Gather: bit-exact against T(θ_j·scale_j), guards untouched.
    {
        Check ck{std::string("gather  ") + head};
        std::vector<float> theta(c.cols);
        for (float& t : theta) t = uni(rng);
        Buffers<T> buf(segs);
        gather<T>(p, segs, buf, theta, c.stage_gather, c.cap);
        size_t wrong = 0, guard = 0;
        for (size_t k = 0; k < segs.size(); ++k) {
            for (uint32_t e = 0; e < segs[k].len; ++e) {
                const uint32_t j = p.column(segs[k].start + e);
                const T want = from_f32<T>(theta[j] * p.scale[j]);
                wrong += std::memcmp(&buf.ptrs[k][e], &want, sizeof(T)) != 0;
            }
            for (uint32_t e = 0; e < segs[k].offset; ++e) guard += !std::isnan(to_f32(buf.store[k][e]));
            guard += !std::isnan(to_f32(buf.store[k][segs[k].offset + segs[k].len]));
        }
        if (wrong) ck.fail(std::to_string(wrong) + " elements differ");
        if (guard) ck.fail(std::to_string(guard) + " writes outside a segment");
    }

    // Deterministic scatter against Σ g·scale in f64, within the error the
    // fixed point allows: each term is rounded to a multiple of 2^-S
    // (≤ 2^-S/2 off), and the f64 result is rounded once to f32.
    Buffers<T> grads(segs);
    for (size_t k = 0; k < segs.size(); ++k)
        for (uint32_t e = 0; e < segs[k].len; ++e) grads.ptrs[k][e] = from_f32<T>(uni(rng) * 0.01f);
    auto reference = [&](std::vector<double>& want, std::vector<double>& bound) {
        want.assign(c.cols, 0.0);
        std::vector<double> n(c.cols, 0.0);
        float mx = 0;
        for (size_t k = 0; k < segs.size(); ++k)
            for (uint32_t e = 0; e < segs[k].len; ++e) {
                const double g = to_f32(grads.ptrs[k][e]);
                const uint32_t j = p.column(segs[k].start + e);
                want[j] += g;
                n[j] += 1;
                mx = std::max(mx, (float)std::fabs(g));
            }
        int e2;
        std::frexp(mx, &e2);
        e2 += (4 - (e2 & 3)) & 3;
        const int shift = 61 - (int)p.headroom() - e2;
        bound.assign(c.cols, 0.0);
        for (uint32_t j = 0; j < c.cols; ++j) {
            want[j] *= p.scale[j];
            bound[j] = p.scale[j] * n[j] * std::ldexp(0.5, -shift) + std::fabs(want[j]) * 0x1p-24 + 1e-300;
        }
    };
    std::vector<double> want, bound;
    reference(want, bound);
    auto within = [&](const std::vector<float>& got, Check& ck) {
        size_t bad = 0;
        double worst = 0;
        for (uint32_t j = 0; j < c.cols; ++j) {
            const double err = std::fabs(got[j] - want[j]);
            bad += !(err <= bound[j]);
            worst = std::max(worst, err / bound[j]);
        }
        char b[80];
        std::snprintf(b, sizeof b, " worst err/bound %.2f", worst);
        ck.notes += b;
        if (bad) ck.fail(std::to_string(bad) + " columns outside the bound");
    };
    {
        Check ck{std::string("scatter ") + head};
        auto ws = fresh_workspace(c.cols);
        std::vector<float> first(c.cols, NAN), second(c.cols, NAN), other_grid(c.cols, NAN);
        scatter<T>(p, segs, grads, ws, first, c.stage_scatter, c.cap);  // first call: measure, then sum
        within(first, ck);
        if (!workspace_clean(ws, c.cols)) ck.fail("workspace not clean after the first call");
        scatter<T>(p, segs, grads, ws, second, c.stage_scatter, c.cap);  // steady state: one read
        if (!same_bits(first, second)) ck.fail("second call (speculated S) changed bits");
        scatter<T>(p, segs, grads, ws, other_grid, !c.stage_scatter, c.cap + 2);
        if (!same_bits(first, other_grid)) ck.fail("another grid / accumulator changed bits");
        if (!workspace_clean(ws, c.cols)) ck.fail("workspace not clean");

        // max|g| moves up 3 buckets: the speculated S is wrong, SETTLE redoes
        // the sums, and the bits equal a fresh workspace's.
        for (size_t k = 0; k < segs.size(); ++k)
            for (uint32_t e = 0; e < segs[k].len; ++e)
                grads.ptrs[k][e] = from_f32<T>(to_f32(grads.ptrs[k][e]) * 4096.0f);
        std::vector<float> moved(c.cols, NAN), fresh(c.cols, NAN);
        scatter<T>(p, segs, grads, ws, moved, c.stage_scatter, c.cap);
        auto ws2 = fresh_workspace(c.cols);
        scatter<T>(p, segs, grads, ws2, fresh, c.stage_scatter, c.cap);
        if (!same_bits(moved, fresh)) ck.fail("bits depend on the previous call's scale");
        reference(want, bound);
        within(moved, ck);

        // A NaN anywhere poisons every column; the next call is clean again.
        if (!segs.empty()) {
            const T saved = grads.ptrs[0][0];
            grads.ptrs[0][0] = from_f32<T>(NAN);
            std::vector<float> poisoned(c.cols, 0.0f);
            scatter<T>(p, segs, grads, ws, poisoned, c.stage_scatter, c.cap);
            size_t finite = 0;
            for (float v : poisoned) finite += !std::isnan(v);
            if (finite) ck.fail(std::to_string(finite) + " columns not NaN after a NaN gradient");
            grads.ptrs[0][0] = saved;
            std::vector<float> after(c.cols, NAN);
            scatter<T>(p, segs, grads, ws, after, c.stage_scatter, c.cap);
            if (!same_bits(after, fresh)) ck.fail("a NaN call disturbed the next call");
            if (!workspace_clean(ws, c.cols)) ck.fail("workspace not clean after NaN");
        }
    }

    // Atomic scatter: float sums in any order, within n_j·2^-24 of Σ|terms|.
    {
        Check ck{std::string("atomic  ") + head};
        std::vector<float> out(c.cols, 0.0f);
        const ColumnMap map = p.map();
        for (const SegmentTable& t : make_tables<T>(segs, grads.ptrs))
            emu_launch(Dim3{grid_for(t, c.cap)}, PROJ_THREADS,
                       [&] { scatter_atomic_impl<T>(t, map, p.scale.data(), out.data()); });
        std::vector<double> abs(c.cols, 0.0), n(c.cols, 0.0);
        for (size_t k = 0; k < segs.size(); ++k)
            for (uint32_t e = 0; e < segs[k].len; ++e) {
                const uint32_t j = p.column(segs[k].start + e);
                abs[j] += std::fabs(to_f32(grads.ptrs[k][e]) * p.scale[j]);
                n[j] += 1;
            }
        size_t bad = 0;
        for (uint32_t j = 0; j < c.cols; ++j) bad += !(std::fabs(out[j] - want[j]) <= (n[j] + 1) * 0x1p-23 * abs[j] + 1e-30);
        if (bad) ck.fail(std::to_string(bad) + " columns outside the bound");
    }
}

template <typename T> static void run_all(uint64_t seed) {
    const Case cases[] = {
        // name          D        d     mode           parts gaps  stage g/s     grid cap
        {"hash", 50'001, 777, PROJ_HASH, 5, false, true, true, 3},
        {"hash-unstaged", 40'000, 1'000, PROJ_HASH, 3, true, false, false, 2},
        {"balanced", 20'011, 3, PROJ_BALANCED, 2, false, true, true, 2},
        {"explicit-130seg", 30'000, 513, PROJ_EXPLICIT, 130, true, true, true, 4},
        {"one-row", 1, 1, PROJ_HASH, 1, false, true, true, 1},
        {"short-segments", 37, 5, PROJ_HASH, 9, false, true, false, 2},
    };
    for (const Case& c : cases) run_case<T>(c, seed++);
}

int main(int argc, char** argv) {
    const std::string dtype = argc > 1 ? argv[1] : "all";
    // The published first output of SplitMix64 seeded with 0: the reference
    // hash above is SplitMix64.
    if (ref_splitmix_at(0, 0) != 0xE220A8397B1DCDAFull) {
        std::printf("FAIL reference SplitMix64\n");
        return 1;
    }
    if (dtype == "all" || dtype == "f32") run_all<float>(100);
    if (dtype == "all" || dtype == "f16") run_all<__half>(200);
    if (dtype == "all" || dtype == "bf16") run_all<__nv_bfloat16>(300);
    std::printf("projection: %d of %d checks passed\n", g_cases - g_failed, g_cases);
    return g_failed ? 1 : 0;
}
