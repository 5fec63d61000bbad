// C entry points that run pid_kernels.cu's kernels on the CPU emulation (include/cuda_emu.h),
// with the launch shapes src/kernels/cuda.rs uses (grid-stride kernels get a small grid here,
// which exercises their stride loops).
#include "../../rust/pid-core/kernels/pid_kernels.cu"

extern "C" {
void emu_rms_norm_modulate_f32(const float* x, const float* w, const float* shift, const float* scale,
                               float* out, int rows, int d, int rows_per_mod, float eps) {
    emu_launch({(unsigned)(rows + 7) / 8, 1, 1}, 256,
               [=] { pid_rms_norm_modulate_f32(x, w, shift, scale, out, rows, d, rows_per_mod, eps); });
}

void emu_rms_norm_modulate_bf16(const bf16* x, const bf16* w, const bf16* shift, const bf16* scale,
                                bf16* out, int rows, int d, int rows_per_mod, float eps) {
    emu_launch({(unsigned)(rows + 7) / 8, 1, 1}, 256,
               [=] { pid_rms_norm_modulate_bf16(x, w, shift, scale, out, rows, d, rows_per_mod, eps); });
}

void emu_gated_add_f32(const float* x, const float* gate, const float* y, float* out, size_t n, int d,
                       int rows_per_mod) {
    emu_launch({3, 1, 1}, 64, [=] { pid_gated_add_f32(x, gate, y, out, n, d, rows_per_mod); });
}

void emu_gated_add_bf16(const bf16* x, const bf16* gate, const bf16* y, bf16* out, size_t n, int d,
                        int rows_per_mod) {
    emu_launch({3, 1, 1}, 64, [=] { pid_gated_add_bf16(x, gate, y, out, n, d, rows_per_mod); });
}

void emu_sigma_gate_f32(const float* s, const float* f, const float* logit, const float* offset, float* out,
                        size_t n, int d, int gw, int rows_per_batch) {
    emu_launch({3, 1, 1}, 64, [=] { pid_sigma_gate_f32(s, f, logit, offset, out, n, d, gw, rows_per_batch); });
}

void emu_sigma_gate_bf16(const bf16* s, const bf16* f, const bf16* logit, const float* offset, bf16* out,
                         size_t n, int d, int gw, int rows_per_batch) {
    emu_launch({3, 1, 1}, 64, [=] { pid_sigma_gate_bf16(s, f, logit, offset, out, n, d, gw, rows_per_batch); });
}

void emu_flash_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int bh, int lq, int lk,
                              int d, float scale) {
    dim3 grid{(unsigned)(lq + FA_BR - 1) / FA_BR, (unsigned)bh, 1};
    if (d == 64)
        emu_launch(grid, FA_WARPS * 32, [=] { pid_flash_attention_bf16_d64(q, k, v, out, lq, lk, scale); });
    else
        emu_launch(grid, FA_WARPS * 32, [=] { pid_flash_attention_bf16_d72(q, k, v, out, lq, lk, scale); });
}

void emu_normal_f32(float* out, size_t n, uint64_t seed, uint32_t stream) {
    emu_launch({2, 1, 1}, 64, [=] { pid_normal_f32(out, n, seed, stream, 0); });
}
}
