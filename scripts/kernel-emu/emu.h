// Runs CUDA kernels on the CPU for the kernel emulator (scripts/kernel-emu):
// every thread of a block is an OS thread, __syncthreads a barrier over the
// block, warp shuffles and __syncwarp barriers over the warp. Blocks run one
// after another: a launch starts one OS thread per CUDA thread, and those
// threads walk the grid block by block, meeting at a barrier between blocks.
// So one static array can serve as every block's dynamic shared memory, and a
// static __shared__ declaration becomes a function-local static (one per
// kernel instantiation, seen by all threads of the running block). Only what
// the emulated kernels and common.cuh use is provided.
//
// Limits: every thread of a block must reach every barrier (a thread that
// returns early while others wait hangs the run, where sm_70+ would let it
// go); static shared memory keeps the previous block's values rather than
// holding garbage, so a read-before-write there goes unnoticed; the memory
// model, warp scheduling and speed of a GPU are not modelled.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>  // the host stand-ins in stub/
#include <cuda_fp16.h>

using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory: see the header comment. A harness whose kernels only
// declare `extern __shared__` arrays (attention.cu) redefines this as empty.
#define __shared__ static

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// What the lanes of a warp deposit for a warp-collective operation: a
// shuffle's value, an mma's registers, an ldmatrix's row address. Two sets,
// used alternately, so one barrier per collective suffices: a lane can only
// deposit into a set again after the next collective's barrier, which every
// lane reaches after reading this one.
struct EmuWarpSlots {
    uint64_t value[32];
    uint32_t regs[32][6];
    const unsigned char* addr[32];
    uint32_t wmma[32][16];  // a WMMA fragment triple: 8 + 8 16-bit, 8 f32
};
struct EmuWarp {
    std::barrier<> bar{32};
    EmuWarpSlots slots[2];
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;
inline thread_local std::barrier<>* emu_block_bar;
inline void emu_cp_async_check_idle();
inline thread_local EmuWarp* emu_warp;
inline thread_local unsigned emu_collectives;  // this lane's count: picks the slot set

// Deposits nothing yet: returns the slot set of this lane's next collective.
inline EmuWarpSlots& emu_next_slots() { return emu_warp->slots[emu_collectives++ % 2]; }

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }

// Any 4- or 8-byte value, like the device's overloads (float, int, unsigned,
// double, ...); the mask is taken to be the full warp, as in every caller.
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int o) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 8);
    const unsigned lane = threadIdx.x % 32;
    EmuWarpSlots& w = emu_next_slots();
    std::memcpy(&w.value[lane], &v, sizeof v);
    emu_warp->bar.arrive_and_wait();
    V r;
    std::memcpy(&r, &w.value[lane ^ o], sizeof r);
    return r;
}

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}

inline void __trap() {
    std::fprintf(stderr, "__trap() in block (%u,%u) thread %u\n", blockIdx.x, blockIdx.y, threadIdx.x);
    std::abort();
}

// Runs `kernel` over a grid×block launch (1-D blocks of a whole number of
// warps, 3-D grids), blocks in order x fastest, then y, then z.
inline void emu_launch(Dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    if (threads == 0 || threads % 32 != 0) {
        std::fprintf(stderr, "emu_launch: %u threads per block (want a multiple of 32)\n", threads);
        std::abort();
    }
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    std::barrier<> block_bar(threads), between_blocks(threads);
    std::vector<std::unique_ptr<EmuWarp>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = Dim3{t, 0, 0};
            emu_collectives = 0;
            emu_block_bar = &block_bar;
            emu_warp = warps[t / 32].get();
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = Dim3{bx, by, bz};
                        kernel();
                        emu_cp_async_check_idle();
                        // No thread starts the next block (and overwrites shared
                        // memory) while another is still in this one.
                        between_blocks.arrive_and_wait();
                    }
        });
    }
    for (auto& th : pool) th.join();
}

// ---- tensor-core and async-copy primitives ---------------------------------
// The C++ side of common.cuh's mma_16816, ldmatrix_x4(_trans) and cp_async_*:
// each warp-collective one deposits every lane's registers or address in the
// warp's slots, meets at a barrier, and lets each lane compute its outputs
// from the whole warp's data as the PTX ISA lays fragments out (the slot
// sets alternate, see EmuWarpSlots). A kernel that gets a fragment layout wrong
// therefore computes wrong numbers here, as it would on the GPU.
#define LORAFUSE_KERNEL_EMU 1

// Where shared memory lives, so ldmatrix and cp.async can reject addresses
// outside it (set by a harness; unchecked while hi is null).
inline const unsigned char* emu_smem_lo = nullptr;
inline const unsigned char* emu_smem_hi = nullptr;

// Set by a harness to check that its checks catch a wrong fragment layout.
inline bool emu_inject_mma_swap = false;

inline void emu_fail(const char* what, const void* p) {
    std::fprintf(stderr, "%s (address %p) in block (%u,%u) thread %u\n", what, p, blockIdx.x, blockIdx.y,
                 threadIdx.x);
    std::abort();
}

inline void emu_check_shared(const void* p, size_t bytes, const char* op) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fail(op, p);
    if (emu_smem_hi && (c < emu_smem_lo || c + bytes > emu_smem_hi)) emu_fail(op, p);
}

inline float emu_to_f32(__half v) { return __half2float(v); }
inline float emu_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> inline float emu_b16(uint32_t reg, int half) {
    const uint16_t bits = (uint16_t)(reg >> (16 * half));
    T v;
    std::memcpy(&v, &bits, 2);
    return emu_to_f32(v);
}

// d += A·B (16×8×16), A, B of 16-bit T, f32 accumulate in k order.
template <typename T> inline void emu_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const unsigned lane = threadIdx.x % 32;
    EmuWarpSlots& w = emu_next_slots();
    for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
    w.regs[lane][4] = b0;
    w.regs[lane][5] = b1;
    emu_warp->bar.arrive_and_wait();
    // Element (r, k) of A lives in lane 4(r%8) + (k%8)/2, register
    // (r ≥ 8) + 2(k ≥ 8), half k%2; element (k, n) of B in lane 4n + (k%8)/2,
    // register 4 + (k ≥ 8), half k%2.
    auto A = [&](int r, int k) { return emu_b16<T>(w.regs[4 * (r % 8) + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k % 2); };
    auto B = [&](int k, int n) { return emu_b16<T>(w.regs[4 * n + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    int g = lane / 4, t = lane % 4;
    // Fault injection for the harness's self-test: lanes 0 and 4 (rows 0
    // and 1 of A and of C) trade places in the result.
    if (emu_inject_mma_swap && (lane == 0 || lane == 4)) g ^= 1;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc = std::fmaf(A(r, k), B(k, n), acc);
        out[i] = acc;
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.m8n8.x4(.trans).b16: lane l names row l%8 of matrix l/8.
inline void emu_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
    const unsigned lane = threadIdx.x % 32;
    emu_check_shared(row, 16, "ldmatrix: row address not 16-byte aligned or outside shared memory");
    EmuWarpSlots& w = emu_next_slots();
    w.addr[lane] = static_cast<const unsigned char*>(row);
    emu_warp->bar.arrive_and_wait();
    auto elem = [&](int m, int rr, int c) {
        uint16_t v;
        std::memcpy(&v, w.addr[8 * m + rr] + 2 * c, 2);
        return (uint32_t)v;
    };
    for (int m = 0; m < 4; ++m) {
        if (!trans) {
            // Row l/4, columns 2(l%4) and 2(l%4)+1.
            r[m] = elem(m, lane / 4, 2 * (lane % 4)) | elem(m, lane / 4, 2 * (lane % 4) + 1) << 16;
        } else {
            // Column l/4, rows 2(l%4) and 2(l%4)+1.
            r[m] = elem(m, 2 * (lane % 4), lane / 4) | elem(m, 2 * (lane % 4) + 1, lane / 4) << 16;
        }
    }
}

// cp.async: copies are queued per thread and land only when a
// cp_async_wait lets their group complete, the latest moment the PTX
// memory model allows. A kernel that reads a tile before waiting for it
// (or without the __syncthreads after) reads stale data here.
struct EmuCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};
inline thread_local std::vector<EmuCopy> emu_cp_open;                 // issued, not committed
inline thread_local std::vector<std::vector<EmuCopy>> emu_cp_groups;  // committed, oldest first

inline void emu_cp_async_16(void* dst, const void* src, bool fill) {
    emu_check_shared(dst, 16, "cp.async: destination not 16-byte aligned or outside shared memory");
    EmuCopy c{static_cast<unsigned char*>(dst), {}};
    if (fill) {
        if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu_fail("cp.async: source not 16-byte aligned", src);
        std::memcpy(c.bytes, src, 16);
    }
    emu_cp_open.push_back(c);
}

inline void emu_cp_async_commit() {
    emu_cp_groups.push_back(std::move(emu_cp_open));
    emu_cp_open.clear();
}

inline void emu_cp_async_wait(int n) {
    while ((int)emu_cp_groups.size() > n) {
        for (const EmuCopy& c : emu_cp_groups.front()) std::memcpy(c.dst, c.bytes, 16);
        emu_cp_groups.erase(emu_cp_groups.begin());
    }
}

// A block that ends with copies in flight would let them land in the next
// block's shared memory: on the GPU a kernel bug, here a loud one.
inline void emu_cp_async_check_idle() {
    if (!emu_cp_open.empty() || !emu_cp_groups.empty()) {
        std::fprintf(stderr, "cp.async copies still pending at the end of block (%u,%u) thread %u\n", blockIdx.x,
                     blockIdx.y, threadIdx.x);
        std::abort();
    }
}

// Vector types and bit casts the kernels use for 16-byte accesses.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float __uint_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- cooperative launches ---------------------------------------------------
// A cooperative launch (cudaLaunchCooperativeKernel) has every block
// resident at once, so its blocks may wait for each other at a grid sync
// (stub/cooperative_groups.h). Here every block of the grid runs at the same
// time, each on its own OS threads, with its own block barrier, warps and
// dynamic shared memory (`emu_dyn_smem`, `bytes` each, zero-initialised);
// a static `__shared__` array would be one for all blocks, so kernels run
// this way use dynamic shared memory only. 1-D grids.
inline thread_local std::barrier<>* emu_grid_bar = nullptr;
inline thread_local unsigned char* emu_dyn_smem = nullptr;

inline void emu_grid_sync() {
    if (!emu_grid_bar) {
        std::fprintf(stderr, "grid sync outside a cooperative launch (block %u thread %u)\n", blockIdx.x,
                     threadIdx.x);
        std::abort();
    }
    emu_grid_bar->arrive_and_wait();
}

inline void emu_launch_cooperative(unsigned blocks, unsigned threads, size_t bytes,
                                   const std::function<void()>& kernel) {
    if (threads == 0 || threads % 32 != 0 || blocks == 0) {
        std::fprintf(stderr, "emu_launch_cooperative: %u blocks of %u threads\n", blocks, threads);
        std::abort();
    }
    gridDim = Dim3{blocks, 1, 1};
    blockDim = Dim3{threads, 1, 1};
    std::barrier<> grid_bar(blocks * threads);
    std::vector<std::unique_ptr<std::barrier<>>> block_bars;
    std::vector<std::unique_ptr<EmuWarp>> warps;
    std::vector<std::vector<unsigned char>> smem(blocks, std::vector<unsigned char>(bytes + 16));
    for (unsigned b = 0; b < blocks; ++b) {
        block_bars.push_back(std::make_unique<std::barrier<>>(threads));
        for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
    }
    std::vector<std::thread> pool;
    for (unsigned b = 0; b < blocks; ++b)
        for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, b, t] {
                threadIdx = Dim3{t, 0, 0};
                blockIdx = Dim3{b, 0, 0};
                emu_collectives = 0;
                emu_block_bar = block_bars[b].get();
                emu_warp = warps[b * (threads / 32) + t / 32].get();
                emu_grid_bar = &grid_bar;
                auto* base = smem[b].data();
                emu_dyn_smem = base + (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
                kernel();
                emu_cp_async_check_idle();
                emu_grid_bar = nullptr;
            });
    for (auto& th : pool) th.join();
}

// ---- WMMA (nvcuda::wmma, <mma.h>) ------------------------------------------
// The element layout of a WMMA fragment is unspecified by the API: a kernel
// may only fill, load, store and multiply fragments (and apply elementwise
// maps to all elements alike). So any consistent layout emulates it. Here
// lane l holds elements 8l..8l+7 of the 16×16 tile, row-major, in `x`; the
// multiply is warp-collective (each lane deposits its three fragments,
// then computes its 8 outputs from the whole warp's), with f32 fused
// multiply-adds in k order. Loads and stores check what the device
// requires: the same pointer and stride in every lane, a 256-bit aligned
// pointer and a stride that is a multiple of 16 bytes. Only 16×16×16 with
// 16-bit A and B and an f32 accumulator, the shape the kernels use.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator knows 16x16x16 WMMA only");
    static constexpr int num_elements = 8;
    T x[8];
};

inline void emu_wmma_check(const void* p, unsigned ldm, size_t elem, const char* op) {
    const unsigned lane = threadIdx.x % 32;
    EmuWarpSlots& w = emu_next_slots();
    w.addr[lane] = static_cast<const unsigned char*>(p);
    w.value[lane] = ldm;
    emu_warp->bar.arrive_and_wait();
    for (int l = 0; l < 32; ++l)
        if (w.addr[l] != w.addr[0] || w.value[l] != w.value[0]) emu_fail("wmma: lanes disagree on pointer or stride", p);
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu_fail(op, p);
    if ((ldm * elem) % 16 != 0) emu_fail("wmma: stride not a multiple of 16 bytes", p);
}

// Element (row, col) of a tile stored at p with stride ldm.
template <typename V> inline V emu_wmma_at(const V* p, unsigned ldm, int row, int col, bool row_major_) {
    return row_major_ ? p[(size_t)row * ldm + col] : p[(size_t)col * ldm + row];
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout");
    emu_wmma_check(p, ldm, sizeof(T), "wmma::load_matrix_sync: pointer not 32-byte aligned");
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 8; ++i) {
        const int e = 8 * lane + i;
        f.x[i] = emu_wmma_at(p, ldm, e / 16, e % 16, std::is_same_v<Layout, row_major>);
    }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    emu_wmma_check(p, ldm, sizeof(float), "wmma::store_matrix_sync: pointer not 32-byte aligned");
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 8; ++i) {
        const int e = 8 * lane + i, row = e / 16, col = e % 16;
        (layout == mem_row_major ? p[(size_t)row * ldm + col] : p[(size_t)col * ldm + row]) = f.x[i];
    }
}

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
    for (int i = 0; i < 8; ++i) f.x[i] = v;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    static_assert(sizeof(T) == 2, "16-bit A and B only");
    const unsigned lane = threadIdx.x % 32;
    EmuWarpSlots& w = emu_next_slots();
    std::memcpy(&w.wmma[lane][0], a.x, 16);
    std::memcpy(&w.wmma[lane][4], b.x, 16);
    std::memcpy(&w.wmma[lane][8], c.x, 32);
    emu_warp->bar.arrive_and_wait();
    auto elem = [&](int base, int e) {  // element e of the 16×16 tile at word `base` of every lane
        T v;
        std::memcpy(&v, reinterpret_cast<const unsigned char*>(&w.wmma[e / 8][base]) + 2 * (e % 8), 2);
        return emu_to_f32(v);
    };
    float out[8];
    for (int i = 0; i < 8; ++i) {
        const int e = 8 * lane + i, row = e / 16, col = e % 16;
        float acc;
        std::memcpy(&acc, &w.wmma[e / 8][8 + e % 8], 4);
        for (int k = 0; k < 16; ++k) acc = std::fmaf(elem(0, row * 16 + k), elem(4, k * 16 + col), acc);
        out[i] = acc;
    }
    for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

// ---- per-dtype facts the harnesses' error bounds and reports use ---------

// The kernels' dtype suffix of T.
template <typename T> static const char* dname();
template <> const char* dname<float>() { return "f32"; }
template <> const char* dname<__half>() { return "f16"; }
template <> const char* dname<__nv_bfloat16>() { return "bf16"; }
// Unit roundoff of T (half an ulp, relative) and the absolute half-ulp of
// its subnormals.
template <typename T> static double unit();
template <> double unit<float>() { return 0x1p-24; }
template <> double unit<__half>() { return 0x1p-11; }
template <> double unit<__nv_bfloat16>() { return 0x1p-8; }
template <typename T> static double sub_ulp();
template <> double sub_ulp<float>() { return 0x1p-150; }
template <> double sub_ulp<__half>() { return 0x1p-25; }
template <> double sub_ulp<__nv_bfloat16>() { return 0x1p-134; }
