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

struct EmuWarp {
    std::barrier<> bar{32};
    uint64_t slot[32];
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;
inline thread_local std::barrier<>* emu_block_bar;
inline thread_local EmuWarp* emu_warp;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }

// Any 4- or 8-byte value, like the device's overloads (float, int, unsigned,
// double, ...); the mask is taken to be the full warp, as in every caller.
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int o) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= 8);
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(&emu_warp->slot[lane], &v, sizeof v);
    emu_warp->bar.arrive_and_wait();
    V r;
    std::memcpy(&r, &emu_warp->slot[lane ^ o], sizeof r);
    emu_warp->bar.arrive_and_wait();
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
// warps, 2-D grids), blocks in order x fastest.
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
            emu_block_bar = &block_bar;
            emu_warp = warps[t / 32].get();
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx = Dim3{bx, by, 0};
                    kernel();
                    // No thread starts the next block (and overwrites shared
                    // memory) while another is still in this one.
                    between_blocks.arrive_and_wait();
                }
        });
    }
    for (auto& th : pool) th.join();
}

// Vector types and bit casts used by kernels/multi_adapter.cu.
struct uint4 {
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
