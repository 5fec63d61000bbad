// WMMA (m16n16k16) for the CPU emulation: each lane holds the whole tile; every collective call
// is fenced by warp barriers so lanes read and write shared memory as one warp would.
#pragma once
#include <type_traits>

#include "cuda_bf16.h"

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    float v[16][16];
};

inline float emu_load(const float* p) { return *p; }
inline float emu_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    __syncwarp();
    constexpr bool col = std::is_same_v<Layout, col_major>;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) f.v[i][j] = emu_load(col ? p + i + j * ldm : p + i * ldm + j);
    __syncwarp();
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const float* p, unsigned ldm, layout_t) {
    __syncwarp();
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) f.v[i][j] = p[i * ldm + j];
    __syncwarp();
}

template <typename T>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t) {
    __syncwarp();
    if (threadIdx.x % 32 == 0)
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
    __syncwarp();
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float x) {
    for (auto& row : f.v)
        for (float& e : row) e = x;
}

template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
    fragment<accumulator, 16, 16, 16, TC> r;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float s = c.v[i][j];
            for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
            r.v[i][j] = s;
        }
    d = r;
}
}  // namespace nvcuda::wmma
