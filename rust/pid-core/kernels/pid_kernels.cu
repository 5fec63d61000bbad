// pid-native's own CUDA kernels (sm_80+), compiled to PTX by pid-core's build script.
//
// Each kernel has a candle-ops twin in src/kernels/mod.rs that computes the same thing and is
// what runs on the CPU, on other dtypes, and when PID_CUDA_KERNELS=0. Math is f32 throughout:
// bf16 tensors are widened on load and rounded once on store.

#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(bf16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm + adaLN modulate: out = rmsnorm(x) * w * (1 + scale[m]) + shift[m].
// x (rows, d); shift/scale (rows / rows_per_mod, d): row r reads modulation r / rows_per_mod
// (a patch block's per-image modulation, or a PiT block's per-pixel one with rows_per_mod = 1).
// One warp per row.
template <typename T>
__device__ void rms_norm_modulate(const T* x, const T* w, const T* shift, const T* scale, T* out,
                                  int rows, int d, int rows_per_mod, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * d;
    float ss = 0.f;
    for (int c = lane; c < d; c += 32) {
        const float v = load_f(xr + c);
        ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / d + eps);
    const size_t m = (size_t)(row / rows_per_mod) * d;
    T* orow = out + (size_t)row * d;
    for (int c = lane; c < d; c += 32) {
        const float n = load_f(xr + c) * inv * load_f(w + c);
        store_f(orow + c, n * (1.f + load_f(scale + m + c)) + load_f(shift + m + c));
    }
}

// Gated residual: out = x + gate[m] * y, x and y (rows, d), gate (rows / rows_per_mod, d).
template <typename T>
__device__ void gated_add(const T* x, const T* gate, const T* y, T* out, size_t n, int d,
                          int rows_per_mod) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / d, c = i % d;
        const size_t g = (row / rows_per_mod) * d + c;
        store_f(out + i, load_f(x + i) + load_f(gate + g) * load_f(y + i));
    }
}

// Sigma-aware LQ gate: out = s + f * sigmoid(logit - offset[b]), s and f (rows, d), logit
// (rows, gw) with gw = d (per token and channel) or 1 (per token), offset (batch,) f32 and
// rows_per_batch = L tokens.
template <typename T>
__device__ void sigma_gate(const T* s, const T* f, const T* logit, const float* offset, T* out,
                           size_t n, int d, int gw, int rows_per_batch) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / d, c = i % d;
        const float z = load_f(logit + row * gw + (gw == 1 ? 0 : c)) - offset[row / rows_per_batch];
        const float g = 1.f / (1.f + expf(-z));
        store_f(out + i, load_f(s + i) + load_f(f + i) * g);
    }
}

// ---------------------------------------------------------------------------------------------
// Flash attention, bf16 in and out, f32 softmax and accumulation, no mask.
// q (BH, lq, D), k and v (BH, lk, D), out (BH, lq, D). Grid (ceil(lq / 64), BH), 128 threads:
// each of 4 warps owns 16 query rows; key/value tiles of 32 rows are shared by the block.
// Tensor-core tiles are 16 wide, so head dims are zero-padded to DP in shared memory
// (72 -> 80). The running output lives in shared memory (f32) because WMMA accumulator
// layouts are opaque: rows are rescaled there, then reloaded as the accumulator of P V.
constexpr int FA_BR = 64, FA_BC = 32, FA_WARPS = 4;

// Rows [row0, row0 + rows) of a (n, D) tensor into a (rows, DP) shared tile; rows past n and
// columns past D are zero. All threads of the block take part.
template <int D, int DP>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int row0, int n, int rows, bool vec) {
    if (vec) {
        constexpr int CH = DP / 8;  // 16-byte chunks per padded row
        for (int i = threadIdx.x; i < rows * CH; i += blockDim.x) {
            const int r = i / CH, c = (i % CH) * 8;
            uint4 chunk = make_uint4(0, 0, 0, 0);
            if (row0 + r < n && c < D) chunk = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * D + c);
            *reinterpret_cast<uint4*>(dst + r * DP + c) = chunk;
        }
    } else {
        for (int i = threadIdx.x; i < rows * DP; i += blockDim.x) {
            const int r = i / DP, c = i % DP;
            dst[i] = (row0 + r < n && c < D) ? src[(size_t)(row0 + r) * D + c] : __float2bfloat16(0.f);
        }
    }
}

template <int D, int DP>
__device__ void flash_attention(const bf16* q, const bf16* k, const bf16* v, bf16* out, int lq,
                                int lk, float scale) {
    static_assert(DP % 16 == 0 && DP >= D && D % 8 == 0, "padded head dim, whole 16-byte chunks");
    // o_s doubles as the staging area of the block's queries before the loop.
    __shared__ __align__(128) float o_s[FA_BR * DP];
    __shared__ __align__(128) bf16 k_s[FA_BC * DP];
    __shared__ __align__(128) bf16 v_s[FA_BC * DP];
    __shared__ __align__(128) float s_s[FA_BR * FA_BC];
    __shared__ __align__(128) bf16 p_s[FA_BR * FA_BC];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const size_t bh = blockIdx.y;
    const int row0 = blockIdx.x * FA_BR;
    q += bh * lq * D;
    k += bh * lk * D;
    v += bh * lk * D;
    out += bh * lq * D;

    // Rows of 64 and 72 bf16 are whole 16-byte chunks: tiles load 8 values per instruction
    // when the tensors are 16-byte aligned (candle's allocations are).
    const bool vec = ((reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                       reinterpret_cast<uintptr_t>(v)) & 15) == 0;
    bf16* q_s = reinterpret_cast<bf16*>(o_s);
    load_tile<D, DP>(q_s, q, row0, lq, FA_BR, vec);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> q_frag[DP / 16];
    for (int kk = 0; kk < DP / 16; ++kk)
        wmma::load_matrix_sync(q_frag[kk], q_s + warp * 16 * DP + kk * 16, DP);
    __syncthreads();
    for (int i = tid; i < FA_BR * DP; i += blockDim.x) o_s[i] = 0.f;

    // Lanes 2r and 2r+1 own row r of the warp's 16, each half of its columns.
    const int r = lane / 2, half = lane % 2;
    float m = -INFINITY, l = 0.f;
    float* s_row = s_s + (warp * 16 + r) * FA_BC;
    bf16* p_row = p_s + (warp * 16 + r) * FA_BC;
    float* o_row = o_s + (warp * 16 + r) * DP;

    for (int t0 = 0; t0 < lk; t0 += FA_BC) {
        __syncthreads();  // the previous tile is consumed (and o_s zeroed on the first pass)
        load_tile<D, DP>(k_s, k, t0, lk, FA_BC, vec);
        load_tile<D, DP>(v_s, v, t0, lk, FA_BC, vec);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows: K row-major is K^T column-major.
        for (int n = 0; n < FA_BC / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int kk = 0; kk < DP / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> k_frag;
                wmma::load_matrix_sync(k_frag, k_s + n * 16 * DP + kk * 16, DP);
                wmma::mma_sync(acc, q_frag[kk], k_frag, acc);
            }
            wmma::store_matrix_sync(s_s + warp * 16 * FA_BC + n * 16, acc, FA_BC, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this tile; keys past lk score -inf.
        constexpr int HALF = FA_BC / 2;
        float tmax = -INFINITY;
        for (int c = half * HALF; c < (half + 1) * HALF; ++c) {
            const float sc = (t0 + c < lk) ? s_row[c] * scale : -INFINITY;
            s_row[c] = sc;
            tmax = fmaxf(tmax, sc);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const float m_new = fmaxf(m, tmax);
        const float corr = expf(m - m_new);
        float psum = 0.f;
        for (int c = half * HALF; c < (half + 1) * HALF; ++c) {
            const float p = expf(s_row[c] - m_new);
            p_row[c] = __float2bfloat16(p);
            psum += p;
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        l = l * corr + psum;
        m = m_new;
        for (int c = half * (DP / 2); c < (half + 1) * (DP / 2); ++c) o_row[c] *= corr;
        __syncwarp();

        // O += P V
        for (int n = 0; n < DP / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            float* o_tile = o_s + warp * 16 * DP + n * 16;
            wmma::load_matrix_sync(acc, o_tile, DP, wmma::mem_row_major);
            for (int kk = 0; kk < FA_BC / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> p_frag;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> v_frag;
                wmma::load_matrix_sync(p_frag, p_s + warp * 16 * FA_BC + kk * 16, FA_BC);
                wmma::load_matrix_sync(v_frag, v_s + kk * 16 * DP + n * 16, DP);
                wmma::mma_sync(acc, p_frag, v_frag, acc);
            }
            wmma::store_matrix_sync(o_tile, acc, DP, wmma::mem_row_major);
        }
        __syncwarp();
    }

    const int row = row0 + warp * 16 + r;
    if (row < lq) {
        const float inv = 1.f / l;
        for (int c = half; c < D; c += 2) out[(size_t)row * D + c] = __float2bfloat16(o_row[c] * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// Counter-based Gaussian noise, the device twin of src/noise.rs (same Philox4x32-10 counter
// layout and the same f64 Box-Muller built from correctly rounded operations only, so every
// value is bit-identical to the CPU's). Thread i fills elements 4i .. 4i+3 of the draw that
// starts at element `offset` (a multiple of 4).
#include "noise_math.cuh"

extern "C" __global__ void pid_normal_f32(float* out, size_t n, uint64_t seed, uint32_t stream,
                                          uint64_t offset) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; 4 * i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float z[4];
        pid_block_normals(seed, stream, offset / 4 + i, z);
        for (int j = 0; j < 4 && 4 * i + j < n; ++j) out[4 * i + j] = z[j];
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per dtype (and head dim).
#define PID_ELEMENTWISE(T, SUFFIX)                                                               \
    extern "C" __global__ void pid_rms_norm_modulate_##SUFFIX(                                   \
        const T* x, const T* w, const T* shift, const T* scale, T* out, int rows, int d,          \
        int rows_per_mod, float eps) {                                                            \
        rms_norm_modulate<T>(x, w, shift, scale, out, rows, d, rows_per_mod, eps);                \
    }                                                                                             \
    extern "C" __global__ void pid_gated_add_##SUFFIX(const T* x, const T* gate, const T* y,      \
                                                      T* out, size_t n, int d, int rows_per_mod) { \
        gated_add<T>(x, gate, y, out, n, d, rows_per_mod);                                        \
    }                                                                                             \
    extern "C" __global__ void pid_sigma_gate_##SUFFIX(const T* s, const T* f, const T* logit,    \
                                                       const float* offset, T* out, size_t n,      \
                                                       int d, int gw, int rows_per_batch) {        \
        sigma_gate<T>(s, f, logit, offset, out, n, d, gw, rows_per_batch);                         \
    }

PID_ELEMENTWISE(float, f32)
PID_ELEMENTWISE(bf16, bf16)

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) pid_flash_attention_bf16_d64(
    const bf16* q, const bf16* k, const bf16* v, bf16* out, int lq, int lk, float scale) {
    flash_attention<64, 64>(q, k, v, out, lq, lk, scale);
}

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) pid_flash_attention_bf16_d72(
    const bf16* q, const bf16* k, const bf16* v, bf16* out, int lq, int lk, float scale) {
    flash_attention<72, 80>(q, k, v, out, lq, lk, scale);
}
