// Emulated run of kernels/adapter_sum.cu (the merge W += alpha·Lᵀ·R) against
// an f64 reference written here from the definition, for checking the
// kernel's tiling, edge handling (partial tiles, widths that break 16-byte
// rows, a misaligned W, ranks across several staged slices) on a machine
// without a GPU. Launch geometry is that of src/cuda/adapter_sum.rs. Build
// and run with scripts/kernel-emu/run.sh adapter_sum [dtype].
#pragma GCC optimize("no-strict-aliasing")  // the kernel packs halves through uint4, as CUDA code does
#include "emu.h"

#include <random>
#include <string>

#define __align__(n) __attribute__((aligned(n)))

#include "adapter_sum.cu"

static int g_cases = 0, g_failed = 0;

// The kernel computes dot = Σ_k L·R in f32 (error ≤ (r+1)·2^-24·Σ|L·R|),
// x = fma(alpha, dot, w) in f32 (one more 2^-24·|x|), and rounds x once to
// T (u_T·|x| plus a subnormal half-ulp). The bound adds these up.
template <typename T>
static void run_case(uint32_t rows, uint32_t cols, uint32_t rank, uint32_t offset, float alpha, uint64_t seed) {
    using G = MergeTile<T>;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    const size_t n = (size_t)rows * cols;
    // W starts `offset` elements into its buffer and has NaN guards around it.
    std::vector<T> buf(offset + n + 8, from_f32<T>(NAN));
    T* w = buf.data() + offset;
    for (size_t i = 0; i < n; ++i) w[i] = from_f32<T>(uni(rng));
    std::vector<float> left((size_t)rank * rows), right((size_t)rank * cols);
    for (float& v : left) v = uni(rng);
    for (float& v : right) v = uni(rng);
    std::vector<double> want(n), bound(n);
    for (uint32_t i = 0; i < rows; ++i)
        for (uint32_t j = 0; j < cols; ++j) {
            double dot = 0, mag = 0;
            for (uint32_t k = 0; k < rank; ++k) {
                const double t = (double)left[(size_t)k * rows + i] * right[(size_t)k * cols + j];
                dot += t;
                mag += std::fabs(t);
            }
            const double w0 = to_f32(w[(size_t)i * cols + j]);
            const double x = w0 + (double)alpha * dot;
            const double e32 = std::fabs(alpha) * (rank + 1) * 0x1p-24 * mag + 0x1p-24 * std::fabs(x);
            want[(size_t)i * cols + j] = x;
            bound[(size_t)i * cols + j] = e32 + unit<T>() * (std::fabs(x) + e32) + sub_ulp<T>();
        }

    const uint32_t tiles = ((rows + G::TILE_M - 1) / G::TILE_M) * ((cols + G::TILE_N - 1) / G::TILE_N);
    emu_launch(Dim3{tiles}, MERGE_THREADS,
               [&] { adapter_merge_tile<T>(w, left.data(), right.data(), rows, cols, rank, alpha); });

    size_t bad = 0, guards = 0;
    double worst = 0;
    for (size_t i = 0; i < n; ++i) {
        const double err = std::fabs(to_f32(w[i]) - want[i]);
        bad += !(err <= bound[i]);
        worst = std::max(worst, err / bound[i]);
    }
    for (uint32_t i = 0; i < offset; ++i) guards += !std::isnan(to_f32(buf[i]));
    for (size_t i = offset + n; i < buf.size(); ++i) guards += !std::isnan(to_f32(buf[i]));
    const bool ok = bad == 0 && guards == 0;
    ++g_cases;
    g_failed += !ok;
    std::printf("%s merge %s %ux%u rank %u offset %u alpha %g: worst err/bound %.2f%s%s\n", ok ? "ok  " : "FAIL",
                dname<T>(), rows, cols, rank, offset, alpha, worst,
                bad ? (" " + std::to_string(bad) + " outside the bound").c_str() : "",
                guards ? (" " + std::to_string(guards) + " writes outside W").c_str() : "");
}

template <typename T> static void run_all(uint64_t seed) {
    struct S {
        uint32_t rows, cols, rank, offset;
        float alpha;
    };
    // Partial tiles in both directions, widths whose rows are not 16-byte
    // aligned (odd, 67), a W that starts off 16 bytes (offset 1), ranks that
    // span one, two and three staged slices, and unmerge (alpha < 0).
    const S cases[] = {{1, 1, 1, 0, 1.0f},       {1, 300, 3, 0, -0.75f},  {65, 129, 17, 0, 0.5f},
                       {64, 128, 16, 0, 1.0f},   {200, 67, 33, 0, -1.0f}, {130, 1000, 64, 0, 1e-3f},
                       {129, 256, 40, 1, 2.0f},  {70, 136, 70, 0, -0.25f}, {3, 2048, 8, 0, 1.0f}};
    for (const S& c : cases) run_case<T>(c.rows, c.cols, c.rank, c.offset, c.alpha, seed++);
}

int main(int argc, char** argv) {
    const std::string dtype = argc > 1 ? argv[1] : "all";
    if (dtype == "all" || dtype == "f32") run_all<float>(10);
    if (dtype == "all" || dtype == "f16") run_all<__half>(20);
    if (dtype == "all" || dtype == "bf16") run_all<__nv_bfloat16>(30);
    std::printf("adapter_sum: %d of %d checks passed\n", g_cases - g_failed, g_cases);
    return g_failed ? 1 : 0;
}
