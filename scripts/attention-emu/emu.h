// Runs CUDA kernels on the CPU for the attention emulator: every thread of a
// block is an OS thread, __syncthreads a barrier over the block, warp
// shuffles and __syncwarp barriers over the warp. Blocks run one after
// another, so one static array serves as every block's dynamic shared
// memory. Only what kernels/attention.cu and common.cuh use is provided.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct EmuWarp {
    std::barrier<> bar{32};
    float slot[32];
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;
inline thread_local std::barrier<>* emu_block_bar;
inline thread_local EmuWarp* emu_warp;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned lane = threadIdx.x % 32;
    emu_warp->slot[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const float r = emu_warp->slot[lane ^ o];
    emu_warp->bar.arrive_and_wait();
    return r;
}
inline void __trap() {
    std::fprintf(stderr, "__trap() in block (%u,%u) thread %u\n", blockIdx.x, blockIdx.y, threadIdx.x);
    std::abort();
}

// Runs `kernel` over a grid×block launch (1-D blocks, 2-D grids).
inline void emu_launch(Dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> block_bar(threads);
            std::vector<std::unique_ptr<EmuWarp>> warps;
            for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([&, t] {
                    threadIdx = Dim3{t, 0, 0};
                    blockIdx = Dim3{bx, by, 0};
                    emu_block_bar = &block_bar;
                    emu_warp = warps[t / 32].get();
                    kernel();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
