//! f32 attention for the CPU on x86-64 with AVX2 and FMA: flash attention with the keys in
//! rows and the queries in vector lanes.
//!
//! A task takes panels of [`NQ`] queries and walks the keys a block at a time. The score
//! tile `S^T = K Q^T` holds [`MR`] keys x NQ queries in 12 ymm accumulators, so everything
//! the online softmax does per query (the running max, the exponentials, the sums and the
//! rescaling of the output so far) is lane-wise, with no horizontal reductions. The
//! probabilities land in exactly the layout the value product `O^T = V^T P^T` reads as its
//! right operand, and the rescaling rides in that product's epilogue (`O = O c + V^T P^T`),
//! so a score is written once, exponentiated in place and read once. Queries are
//! pre-scaled (exactly, for PiD's d = 64: the scale is 1/8).
//!
//! On a 2-core Zen 4 VM (FMA peak ~232 GF/s) the earlier design (row-major scores through
//! the general GEMM, a row softmax, a re-pack of the probabilities for the value product,
//! then a rescale pass) ran 120-148 GF/s on 24 heads of 16684 keys, d 64; this one runs
//! 178-183 there, where the linear GEMM ran 150-192. Packing each key block's keys and
//! values contiguously (rather than each in one array per head) took 16684 keys from 75 to
//! 92 GF/s on one thread.
//!
//! Compiled for x86-64 only, like `gemm.rs`; elsewhere attention runs through the gemm crate.

use std::cell::RefCell;

use super::cpu::exp_f32;
use super::gemm;

/// Keys per score tile, and value dims per output tile.
const MR: usize = 4;
/// Queries per tile: three 8-lane vectors.
const NQ: usize = 24;

/// Whether this CPU runs [`attend`] (AVX2 and FMA, as for our GEMM).
pub(crate) fn available() -> bool {
    gemm::available()
}

/// One batch-head's keys and values `(lk, d)`, packed for [`attend`] in blocks of
/// `key_block` keys, each block's keys then values contiguous (one stream to fetch).
pub(crate) struct PackedKeys {
    /// Per block of `kb` keys: panels of MR keys, each `(d, MR)`, then `V^T` as panels of
    /// MR value dims, each `(kb, MR)`. Keys past `lk` and dims past `d` are zero.
    data: Vec<f32>,
    lk: usize,
    d: usize,
    key_block: usize,
}

impl PackedKeys {
    /// `key_block` is rounded up to whole tiles.
    pub(crate) fn new(k: &[f32], v: &[f32], d: usize, key_block: usize) -> Self {
        assert!(d > 0 && k.len() == v.len() && k.len().is_multiple_of(d));
        let lk = k.len() / d;
        let key_block = key_block
            .next_multiple_of(MR)
            .min(lk.next_multiple_of(MR))
            .max(MR);
        let mut data = vec![0f32; lk.next_multiple_of(MR) * (d + d.next_multiple_of(MR))];
        let mut at = 0;
        for (k, v) in k.chunks(key_block * d).zip(v.chunks(key_block * d)) {
            let kb = (k.len() / d).next_multiple_of(MR);
            let (kp, rest) = data[at..].split_at_mut(kb * d);
            for (panel, keys) in kp.chunks_exact_mut(d * MR).zip(k.chunks(MR * d)) {
                for (r, key) in keys.chunks_exact(d).enumerate() {
                    for (p, &x) in key.iter().enumerate() {
                        panel[p * MR + r] = x;
                    }
                }
            }
            for (key, row) in v.chunks_exact(d).enumerate() {
                for (panel, dims) in row.chunks(MR).enumerate() {
                    let at = (panel * kb + key) * MR;
                    rest[at..at + dims.len()].copy_from_slice(dims);
                }
            }
            at += kb * (d + d.next_multiple_of(MR));
        }
        Self {
            data,
            lk,
            d,
            key_block,
        }
    }

    /// Key blocks in order: first key, padded length, packed keys, packed values.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, &[f32], &[f32])> {
        let (d, d_pad) = (self.d, self.d.next_multiple_of(MR));
        let lk_pad = self.lk.next_multiple_of(MR);
        (0..lk_pad).step_by(self.key_block).map(move |k0| {
            let kb = self.key_block.min(lk_pad - k0);
            let (k, v) = self.data[k0 * (d + d_pad)..][..kb * (d + d_pad)].split_at(kb * d);
            (k0, kb, k, v)
        })
    }
}

thread_local! {
    /// Per-thread scratch of one task: each query panel's packed queries, output, max and
    /// sum, then one key block's scores. Reused across tasks and calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out (r, d) = softmax(scale q (r, d) k^T) v` on one thread, a key block at a time.
pub(crate) fn attend(q: &[f32], keys: &PackedKeys, out: &mut [f32], scale: f32) {
    assert!(available(), "pid flash attention needs AVX2 and FMA");
    let d = keys.d;
    let rows = q.len() / d;
    assert!(q.len() == rows * d && out.len() == q.len());
    let panels = rows.div_ceil(NQ);
    let panel_len = Panel::len(d);
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(panels * panel_len + keys.key_block * NQ, 0.0);
        let (state, scores) = scratch.split_at_mut(panels * panel_len);
        for (st, q) in state.chunks_exact_mut(panel_len).zip(q.chunks(NQ * d)) {
            let p = Panel::new(st, d);
            p.qt.fill(0.0);
            for (i, row) in q.chunks_exact(d).enumerate() {
                for (k, &x) in row.iter().enumerate() {
                    p.qt[k * NQ + i] = x * scale;
                }
            }
            p.ot.fill(0.0);
            p.max.fill(f32::NEG_INFINITY);
            p.sum.fill(0.0);
        }
        for (k0, kb, kp, vp) in keys.blocks() {
            let scores = &mut scores[..kb * NQ];
            for st in state.chunks_exact_mut(panel_len) {
                let p = Panel::new(st, d);
                let block_max = scores_block(kp, d, keys.lk - k0, p.qt, scores);
                // The online softmax: move to the new max, rescaling what came before.
                let mut rescale = [0f32; NQ];
                for i in 0..NQ {
                    let m = p.max[i].max(block_max[i]);
                    rescale[i] = exp_f32(p.max[i] - m);
                    p.max[i] = m;
                }
                let block_sum = exp_in_place(scores, p.max);
                for i in 0..NQ {
                    p.sum[i] = p.sum[i] * rescale[i] + block_sum[i];
                }
                values_block(vp, kb, scores, p.ot, &rescale);
            }
        }
        for (st, out) in state
            .chunks_exact_mut(panel_len)
            .zip(out.chunks_mut(NQ * d))
        {
            let p = Panel::new(st, d);
            for (i, row) in out.chunks_exact_mut(d).enumerate() {
                let inv = 1.0 / p.sum[i];
                for (k, o) in row.iter_mut().enumerate() {
                    *o = p.ot[k * NQ + i] * inv;
                }
            }
        }
    });
}

/// One panel of NQ queries' state in a task's scratch.
struct Panel<'a> {
    /// The queries, scaled, as `(d, NQ)`.
    qt: &'a mut [f32],
    /// The output so far, as `(d_pad, NQ)`.
    ot: &'a mut [f32],
    /// The running max and sum of each query's scores.
    max: &'a mut [f32],
    sum: &'a mut [f32],
}

impl<'a> Panel<'a> {
    fn len(d: usize) -> usize {
        (d + d.next_multiple_of(MR) + 2) * NQ
    }

    fn new(st: &'a mut [f32], d: usize) -> Self {
        let (qt, rest) = st.split_at_mut(d * NQ);
        let (ot, rest) = rest.split_at_mut(d.next_multiple_of(MR) * NQ);
        let (max, sum) = rest.split_at_mut(NQ);
        Self { qt, ot, max, sum }
    }
}

/// Scores `(kb, NQ)` of one key block `kp` (panels of MR keys, `live` of them real)
/// against one query panel, the padding keys at -inf; returns each query's largest.
fn scores_block(kp: &[f32], d: usize, live: usize, qt: &[f32], scores: &mut [f32]) -> [f32; NQ] {
    let mut max = [f32::NEG_INFINITY; NQ];
    for (t, (panel, tile)) in kp
        .chunks_exact(d * MR)
        .zip(scores.chunks_exact_mut(MR * NQ))
        .enumerate()
    {
        let live = live.saturating_sub(t * MR).min(MR);
        // SAFETY: `attend` checked AVX2 and FMA; the slices hold the (d, MR), (d, NQ) and
        // (MR, NQ) operands the tile reads and writes.
        unsafe { avx2::scores_tile(d, panel, qt, tile, live, &mut max) };
    }
    max
}

/// Replace `scores (kb, NQ)` by `exp(score - max)` per query; returns each query's sum.
fn exp_in_place(scores: &mut [f32], max: &[f32]) -> [f32; NQ] {
    let mut sums = [0f32; NQ];
    // Eight queries (one vector) at a time, so their max and sum stay in registers.
    for (lane, (sums, max)) in sums
        .chunks_exact_mut(8)
        .zip(max.chunks_exact(8))
        .enumerate()
    {
        let max: [f32; 8] = max.try_into().expect("8 lanes");
        let mut sum = [0f32; 8];
        for row in scores.chunks_exact_mut(NQ) {
            for ((x, m), s) in row[lane * 8..][..8].iter_mut().zip(max).zip(&mut sum) {
                *x = exp_f32(*x - m);
                *s += *x;
            }
        }
        sums.copy_from_slice(&sum);
    }
    sums
}

/// `o^T = o^T rescale + V^T P^T` over one key block of `kb` keys, `vp` its packed values,
/// for one query panel.
fn values_block(vp: &[f32], kb: usize, p: &[f32], ot: &mut [f32], rescale: &[f32; NQ]) {
    for (panel, tile) in vp.chunks_exact(kb * MR).zip(ot.chunks_exact_mut(MR * NQ)) {
        // SAFETY: `attend` checked AVX2 and FMA; the slices hold the (kb, MR), (kb, NQ) and
        // (MR, NQ) operands the tile reads and writes.
        unsafe { avx2::values_tile(kb, panel, p, tile, rescale) };
    }
}

mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NQ};

    /// `a^T b` for `a (depth, MR)` and `b (depth, NQ)`, in the 12 accumulators.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `a` and `b` point at `depth x MR` and `depth x NQ` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn product(depth: usize, a: *const f32, b: *const f32) -> [[__m256; 3]; MR] {
        let mut acc = [[_mm256_setzero_ps(); 3]; MR];
        for p in 0..depth {
            let b = [0, 8, 16].map(|c| _mm256_loadu_ps(b.add(p * NQ + c)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm256_broadcast_ss(&*a.add(p * MR + r));
                for c in 0..3 {
                    acc[c] = _mm256_fmadd_ps(ar, b[c], acc[c]);
                }
            }
        }
        acc
    }

    /// `s (MR, NQ) = a^T b` for `a (d, MR)` keys and `b (d, NQ)` queries; rows from `live`
    /// on are -inf. Folds each query's largest score into `max`.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_tile(
        d: usize,
        a: &[f32],
        b: &[f32],
        s: &mut [f32],
        live: usize,
        max: &mut [f32; NQ],
    ) {
        assert!(a.len() >= d * MR && b.len() >= d * NQ && s.len() >= MR * NQ);
        let acc = product(d, a.as_ptr(), b.as_ptr());
        let mut m = [0, 8, 16].map(|c| _mm256_loadu_ps(max.as_ptr().add(c)));
        for (r, acc) in acc.iter().enumerate() {
            for c in 0..3 {
                let x = if r < live {
                    acc[c]
                } else {
                    _mm256_set1_ps(f32::NEG_INFINITY)
                };
                _mm256_storeu_ps(s.as_mut_ptr().add(r * NQ + c * 8), x);
                m[c] = _mm256_max_ps(m[c], x);
            }
        }
        for (c, m) in m.into_iter().enumerate() {
            _mm256_storeu_ps(max.as_mut_ptr().add(c * 8), m);
        }
    }

    /// `o (MR, NQ) = o rescale + a^T p` for `a (kb, MR)` value dims and `p (kb, NQ)`
    /// probabilities, `rescale` per query.
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values_tile(
        kb: usize,
        a: &[f32],
        p: &[f32],
        o: &mut [f32],
        rescale: &[f32; NQ],
    ) {
        assert!(a.len() >= kb * MR && p.len() >= kb * NQ && o.len() >= MR * NQ);
        let acc = product(kb, a.as_ptr(), p.as_ptr());
        let c = [0, 8, 16].map(|c| _mm256_loadu_ps(rescale.as_ptr().add(c)));
        for (r, acc) in acc.iter().enumerate() {
            for q in 0..3 {
                let at = o.as_mut_ptr().add(r * NQ + q * 8);
                _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_loadu_ps(at), c[q], acc[q]));
            }
        }
    }
}
