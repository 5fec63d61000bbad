// A CPU stand-in for the parts of CUDA that rust/pid-core/kernels/pid_kernels.cu uses, so the
// kernel source itself can be compiled with g++ and tested without a GPU.
//
// Every CUDA thread is a std::thread; blocks run one after another (so `__shared__` becomes
// `static`); __syncthreads and __syncwarp are barriers; warp shuffles go through a per-warp
// exchange buffer; WMMA fragments hold the whole 16x16 tile in every lane, and each collective
// WMMA call is fenced by warp barriers so lanes see memory as one warp would.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> exchange;  // 32 floats per warp
};
inline EmuBlock* emu_block = nullptr;

inline int emu_warp() { return threadIdx.x / 32; }
inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[emu_warp()]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    float* ex = emu_block->exchange.data() + 32 * emu_warp();
    const int lane = threadIdx.x % 32;
    __syncwarp();
    ex[lane] = v;
    __syncwarp();
    const float out = ex[lane ^ mask];
    __syncwarp();
    return out;
}

// Runs `kernel` over a 2-D grid of 1-D blocks (all the kernels here use), block by block.
inline void emu_launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    const unsigned warps = (threads + 31) / 32;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            EmuBlock b;
            b.block = std::make_unique<std::barrier<>>(threads);
            for (unsigned w = 0; w < warps; ++w)
                b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
            b.exchange.assign(32 * warps, 0.f);
            emu_block = &b;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([&, t] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                });
            for (auto& th : pool) th.join();
        }
    }
}

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
// Correctly rounded f64 operations; the test build uses -ffp-contract=off so nothing is fused.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return (float)a; }
