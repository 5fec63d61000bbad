//! Counter-based Gaussian noise: the same seed gives the same bits on every backend,
//! device, tiling and thread count.
//!
//! Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
//! 1, 2, 3", SC'11) keyed by the 64-bit seed, with counter
//! `(block_lo, block_hi, stream, 0)` where `block = index / 4`. Each block's four
//! 32-bit outputs become two uniform pairs, and Box-Muller (evaluated in f64 from
//! correctly rounded operations only, rounded to f32) turns each pair into two normals.
//!
//! Element `index` of a draw takes normal `index % 4` of block `index / 4`. A value
//! depends only on (seed, stream, index), never on how the draw is split up.

use rayon::prelude::*;

/// Which draw of a decode a noise tensor is: the initial state, or the re-noising before step k+1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Initial,
    Renoise(u32),
}

impl Stream {
    pub fn id(self) -> u32 {
        match self {
            Stream::Initial => 0,
            Stream::Renoise(k) => k + 1,
        }
    }
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
pub fn philox4x32_10(mut ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(ctr[0]);
        let p1 = u64::from(M1) * u64::from(ctr[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        ctr = [hi1 ^ ctr[1] ^ k[0], lo1, hi0 ^ ctr[3] ^ k[1], lo0];
    }
    ctr
}

/// `ln((a + 1) / 2^32)`: exponent split, then `ln m = 2 atanh((m - 1) / (m + 1))` on
/// `m` in `[1/sqrt 2, sqrt 2]`, as a polynomial in `s^2`.
fn ln_u1(a: u32) -> f64 {
    const C: [f64; 12] = [
        0.333_333_333_333_333_3,
        0.2,
        0.142_857_142_857_142_85,
        0.111_111_111_111_111_1,
        0.090_909_090_909_090_91,
        0.076_923_076_923_076_93,
        0.066_666_666_666_666_67,
        0.058_823_529_411_764_705,
        0.052_631_578_947_368_42,
        0.047_619_047_619_047_616,
        0.043_478_260_869_565_216,
        0.04,
    ];
    let v = u64::from(a) + 1;
    let mut e = 63 - v.leading_zeros() as i32;
    let mut m = v as f64 / (1u64 << e) as f64;
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = C[11];
    for c in C[..11].iter().rev() {
        p = p * s2 + c;
    }
    p = p * s2 + 1.0;
    f64::from(e - 32) * std::f64::consts::LN_2 + 2.0 * s * p
}

/// `(cos, sin)` of `2 pi b / 2^32`: the nearest quarter turn from the top bits, then
/// Taylor polynomials on `[-pi/4, pi/4]`.
fn sincos_turn(b: u32) -> (f64, f64) {
    const SIN: [f64; 9] = [
        -0.166_666_666_666_666_66,
        0.008_333_333_333_333_333,
        -0.000_198_412_698_412_698_4,
        2.755_731_922_398_589_3e-6,
        -2.505_210_838_544_172e-8,
        1.605_904_383_682_161_3e-10,
        -7.647_163_731_819_816e-13,
        2.811_457_254_345_520_6e-15,
        -8.220_635_246_624_33e-18,
    ];
    const COS: [f64; 9] = [
        -0.5,
        0.041_666_666_666_666_664,
        -0.001_388_888_888_888_889,
        2.480_158_730_158_73e-5,
        -2.755_731_922_398_589e-7,
        2.087_675_698_786_81e-9,
        -1.147_074_559_772_972_5e-11,
        4.779_477_332_387_385e-14,
        -1.561_920_696_858_622_5e-16,
    ];
    let q = (u64::from(b) + (1 << 29)) >> 30; // 0..=4
    let rem = i64::from(b) - (q << 30) as i64; // [-2^29, 2^29)
    let x = rem as f64 / 4_294_967_296.0 * std::f64::consts::TAU;
    let x2 = x * x;
    let (mut ps, mut pc) = (SIN[8], COS[8]);
    for i in (0..8).rev() {
        ps = ps * x2 + SIN[i];
        pc = pc * x2 + COS[i];
    }
    let (s, c) = (x * (ps * x2 + 1.0), pc * x2 + 1.0);
    match q & 3 {
        0 => (c, s),
        1 => (-s, c),
        2 => (-c, -s),
        _ => (s, -c),
    }
}

/// Box-Muller from correctly rounded f64 operations only (no libm, no fused multiply-add), so
/// the CUDA twin in `kernels/noise_math.cuh` reproduces every bit:
///
/// ```text
/// u1 = (a + 1) / 2^32 in (0, 1],  u2 = b / 2^32 in [0, 1)
/// n0 = sqrt(-2 ln u1) cos(2 pi u2),  n1 = sqrt(-2 ln u1) sin(2 pi u2)
/// ```
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let r = (-2.0 * ln_u1(a)).sqrt();
    let (c, s) = sincos_turn(b);
    ((r * c) as f32, (r * s) as f32)
}

/// The four normals of counter block `block`.
fn block_normals(seed: u64, stream: u32, block: u64) -> [f32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let r = philox4x32_10([block as u32, (block >> 32) as u32, stream, 0], key);
    let (n0, n1) = box_muller(r[0], r[1]);
    let (n2, n3) = box_muller(r[2], r[3]);
    [n0, n1, n2, n3]
}

/// Fill `out` with the standard normals at indices `offset .. offset + out.len()`.
pub fn fill_normal(seed: u64, stream: Stream, offset: u64, out: &mut [f32]) {
    const CHUNK: usize = 1 << 14; // a multiple of 4, so chunks start on block boundaries when offset does
    let s = stream.id();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = offset + (c * CHUNK) as u64;
            let mut cached = (u64::MAX, [0f32; 4]);
            for (i, v) in chunk.iter_mut().enumerate() {
                let idx = start + i as u64;
                let block = idx / 4;
                if cached.0 != block {
                    cached = (block, block_normals(seed, s, block));
                }
                *v = cached.1[(idx % 4) as usize];
            }
        });
}

/// `n` standard normals of `stream` for `seed`, starting at index 0.
pub fn normal(seed: u64, stream: Stream, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    fill_normal(seed, stream, 0, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123_known_answer() {
        // Known-answer vectors from Random123's kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([0xffff_ffff; 4], [0xffff_ffff; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn box_muller_parts_match_libm() {
        // Our ln/sincos must be accurate, not just reproducible: within a few f64 ulps of libm.
        for a in [
            0u32,
            1,
            2,
            1000,
            0x7fff_ffff,
            0xb504_f333,
            0xfffe_0000,
            u32::MAX,
        ] {
            let exact = ((f64::from(a) + 1.0) / 4_294_967_296.0).ln();
            let got = ln_u1(a);
            assert!(
                (got - exact).abs() <= 4e-16 * exact.abs().max(1e-300),
                "ln {a}: {got} vs {exact}"
            );
        }
        for b in (0..=u32::MAX)
            .step_by(104_729)
            .chain([0x2000_0000, 0x6000_0000, u32::MAX])
        {
            let theta = f64::from(b) / 4_294_967_296.0 * std::f64::consts::TAU;
            let (c, s) = sincos_turn(b);
            assert!((c - theta.cos()).abs() < 1e-15, "cos {b}");
            assert!((s - theta.sin()).abs() < 1e-15, "sin {b}");
        }
    }

    #[test]
    fn value_depends_only_on_index() {
        let whole = normal(7, Stream::Renoise(1), 1000);
        let mut part = vec![0f32; 333];
        fill_normal(7, Stream::Renoise(1), 401, &mut part);
        assert_eq!(&whole[401..734], part.as_slice());
        assert_ne!(
            normal(7, Stream::Initial, 16),
            normal(7, Stream::Renoise(0), 16)
        );
        assert_ne!(
            normal(7, Stream::Initial, 16),
            normal(8, Stream::Initial, 16)
        );
    }

    #[test]
    fn identical_across_thread_counts() {
        let draw = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| normal(3, Stream::Initial, 100_003))
        };
        let one = draw(1);
        assert_eq!(one, draw(2));
        assert_eq!(one, draw(5));
    }

    #[test]
    fn large_draw_is_standard_normal() {
        let v = normal(11, Stream::Renoise(2), 2_000_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n;
        // 5-sigma bounds for n = 2e6: mean +-0.0035, var +-0.005; P(|x| > 3) = 0.0027.
        assert!(mean.abs() < 0.0035, "mean {mean}");
        assert!((var - 1.0).abs() < 0.005, "var {var}");
        assert!((tail - 0.0027).abs() < 0.0003, "tail {tail}");
    }
}
