//! Counter-based Gaussian noise: the same seed gives the same bits on every backend,
//! device, tiling and thread count.
//!
//! Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
//! 1, 2, 3", SC'11) keyed by the 64-bit seed, with counter
//! `(block_lo, block_hi, stream, 0)` where `block = index / 4`. Each block's four
//! 32-bit outputs become two uniform pairs, and Box-Muller (evaluated in f64, rounded
//! to f32) turns each pair into two normals:
//!
//! ```text
//! u1 = (a + 1) / 2^32 in (0, 1],  u2 = b / 2^32 in [0, 1)
//! n0 = sqrt(-2 ln u1) cos(2 pi u2),  n1 = sqrt(-2 ln u1) sin(2 pi u2)
//! ```
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

fn box_muller(a: u32, b: u32) -> (f32, f32) {
    const INV_2_32: f64 = 1.0 / 4_294_967_296.0;
    let u1 = (f64::from(a) + 1.0) * INV_2_32;
    let u2 = f64::from(b) * INV_2_32;
    let r = (-2.0 * u1.ln()).sqrt();
    let theta = 2.0 * std::f64::consts::PI * u2;
    ((r * theta.cos()) as f32, (r * theta.sin()) as f32)
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
