// Philox4x32-10 + Box-Muller for the device, operation for operation the same as
// src/noise.rs: only IEEE-754 correctly rounded f64 operations (the _rn intrinsics, which the
// compiler never fuses into FMAs) and the same polynomial coefficients, so results match the
// CPU bit for bit.
#pragma once
#include <stdint.h>

__device__ __forceinline__ void pid_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * c[0];
        const uint64_t p1 = (uint64_t)0xCD9E8D57u * c[2];
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (uint32_t)p1;
        c[2] = n2;
        c[3] = (uint32_t)p0;
    }
}

// ln((a + 1) / 2^32): exponent split, then ln m = 2 atanh((m - 1) / (m + 1)) for m in [1/sqrt2, sqrt2].
__device__ __forceinline__ double pid_ln_u1(uint32_t a) {
    const uint64_t v = (uint64_t)a + 1;
    int e = 63 - __clzll((long long)v);
    double m = __ddiv_rn((double)v, (double)(1ull << e));
    if (m > 1.4142135623730951) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    const double s = __ddiv_rn(__dsub_rn(m, 1.0), __dadd_rn(m, 1.0));
    const double s2 = __dmul_rn(s, s);
    const double c[12] = {0.3333333333333333, 0.2, 0.14285714285714285, 0.1111111111111111,
                          0.09090909090909091, 0.07692307692307693, 0.06666666666666667,
                          0.058823529411764705, 0.05263157894736842, 0.047619047619047616,
                          0.043478260869565216, 0.04};
    double p = c[11];
    for (int i = 10; i >= 0; --i) p = __dadd_rn(__dmul_rn(p, s2), c[i]);
    p = __dadd_rn(__dmul_rn(p, s2), 1.0);
    const double ln_m = __dmul_rn(__dmul_rn(2.0, s), p);
    return __dadd_rn(__dmul_rn((double)(e - 32), 0.6931471805599453), ln_m);
}

// (cos, sin) of 2 pi b / 2^32: nearest quarter turn from the top bits, polynomials on [-pi/4, pi/4].
__device__ __forceinline__ void pid_sincos_turn(uint32_t b, double* cs, double* sn) {
    const uint64_t q = ((uint64_t)b + (1ull << 29)) >> 30;  // 0..4
    const int64_t rem = (int64_t)b - (int64_t)(q << 30);     // [-2^29, 2^29)
    const double x = __dmul_rn(__ddiv_rn((double)rem, 4294967296.0), 6.283185307179586);
    const double x2 = __dmul_rn(x, x);
    const double sc[9] = {-0.16666666666666666, 0.008333333333333333, -0.0001984126984126984,
                          2.7557319223985893e-06, -2.505210838544172e-08, 1.6059043836821613e-10,
                          -7.647163731819816e-13, 2.8114572543455206e-15, -8.22063524662433e-18};
    const double cc[9] = {-0.5, 0.041666666666666664, -0.001388888888888889, 2.48015873015873e-05,
                          -2.755731922398589e-07, 2.08767569878681e-09, -1.1470745597729725e-11,
                          4.779477332387385e-14, -1.5619206968586225e-16};
    double ps = sc[8], pc = cc[8];
    for (int i = 7; i >= 0; --i) {
        ps = __dadd_rn(__dmul_rn(ps, x2), sc[i]);
        pc = __dadd_rn(__dmul_rn(pc, x2), cc[i]);
    }
    const double s = __dmul_rn(x, __dadd_rn(__dmul_rn(ps, x2), 1.0));
    const double c = __dadd_rn(__dmul_rn(pc, x2), 1.0);
    switch (q & 3) {
        case 0: *cs = c; *sn = s; break;
        case 1: *cs = -s; *sn = c; break;
        case 2: *cs = -c; *sn = -s; break;
        default: *cs = s; *sn = -c; break;
    }
}

__device__ __forceinline__ void pid_box_muller(uint32_t a, uint32_t b, float* n0, float* n1) {
    const double r = __dsqrt_rn(__dmul_rn(-2.0, pid_ln_u1(a)));
    double cs, sn;
    pid_sincos_turn(b, &cs, &sn);
    *n0 = __double2float_rn(__dmul_rn(r, cs));
    *n1 = __double2float_rn(__dmul_rn(r, sn));
}

__device__ __forceinline__ void pid_block_normals(uint64_t seed, uint32_t stream, uint64_t block,
                                                  float z[4]) {
    uint32_t c[4] = {(uint32_t)block, (uint32_t)(block >> 32), stream, 0};
    pid_philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    pid_box_muller(c[0], c[1], &z[0], &z[1]);
    pid_box_muller(c[2], c[3], &z[2], &z[3]);
}
