//! f32 matrix products for the CPU on x86-64 with AVX2 and FMA: `C = alpha A B (+ bias)`.
//!
//! On a 2-core Zen 3 VM (FMA peak ~125 GF/s) candle's CPU matmul (the gemm crate) ran
//! PiD's linear shapes at 67-78 GF/s and PyTorch's MKL at 66-68; this classic packed
//! design runs them at 85-100 (80-90 inside a forward). B is packed once per product into
//! 16-column panels (a bf16 weight is widened in the same pass), A into 6-row panels per
//! (row block, depth block) in a per-thread scratch, and a 6 x 16 register tile (12 ymm
//! accumulators) walks the depth. Row blocks run in parallel and share the packed B.
//!
//! Compiled for x86-64 only; on an x86-64 CPU without AVX2 and FMA [`available`] is false,
//! and on other architectures `kernels::avx2_fma` is: callers then use candle's matmul.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

/// Rows of A and columns of B in one register tile.
const MR: usize = 6;
const NR: usize = 16;
/// Depth of a packed A block (6 x 768 x 4 B = 18 KB per panel, streamed from L2); a C
/// tile is read and written once per depth block, so deep blocks matter more than L1 fit.
const KC: usize = 768;
/// Rows of a packed A block (192 x 768 x 4 B = 576 KB, about L2).
const MC: usize = 192;

/// Whether this CPU runs [`matmul`]: x86-64 with AVX2 and FMA.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The right operand `B (k, n)` of a product, packed into panels of [`NR`] columns, each
/// `(k, NR)` row-major and zero-padded past `n`.
pub(crate) struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

/// Elements that widen to f32 while packing.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Eight consecutive elements at `p`, widened.
    ///
    /// # Safety
    /// AVX2 is available and `p` points at eight readable elements.
    unsafe fn widen8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline(always)]
    unsafe fn widen8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[inline(always)]
    unsafe fn widen8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the high half of an f32.
        let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
    }
}

impl PackedB {
    /// `B = W^T` for a weight `W (n, k)` row-major, as stored by `nn.Linear` (out, in).
    pub(crate) fn from_transposed<T: Widen>(w: &[T], n: usize, k: usize, buf: Vec<f32>) -> Self {
        assert_eq!(w.len(), n * k, "weight is not ({n}, {k})");
        Self::pack(k, n, buf, |panel, cols, dst| {
            let w = &w[panel * NR * k..][..cols * k];
            let whole = if cols == NR && available() {
                k / 8 * 8
            } else {
                0
            };
            // SAFETY: `whole > 0` only with AVX2 and a whole panel, NR rows of k elements.
            unsafe { avx2::transpose_panel(w, k, whole, dst) };
            // Depths past the last 8, and panels with fewer than NR columns.
            for p in whole..k {
                for c in 0..NR {
                    dst[p * NR + c] = if c < cols { w[c * k + p].widen() } else { 0.0 };
                }
            }
        })
    }

    /// Panels for `B (k, n)` in `buf` (reused: a fresh allocation of this size costs more
    /// in page faults than the packing), each `(k, NR)`; `fill(panel, cols, dst)` writes
    /// all of a panel, its `cols` live columns and zeros past them. Panels fill in parallel.
    fn pack(
        k: usize,
        n: usize,
        mut buf: Vec<f32>,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        let len = n.div_ceil(NR) * NR * k;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        if k > 0 {
            buf[..len]
                .par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(panel, dst)| fill(panel, NR.min(n - panel * NR), dst));
        }
        Self { data: buf, k, n }
    }

    /// The buffer back, for the next [`PackedB`].
    pub(crate) fn into_buffer(self) -> Vec<f32> {
        self.data
    }

    /// The `(kc, NR)` block of panel `j` starting at depth `p0`.
    fn block(&self, j: usize, p0: usize) -> *const f32 {
        self.data[j * self.k * NR + p0 * NR..].as_ptr()
    }
}

/// `A (m, k)` row-major with row stride `lda`, and where the product goes: `C (m, n)` with row
/// stride `ldc`, scaled by `alpha`, plus `bias (n)` if given.
pub(crate) struct Product<'a> {
    pub a: &'a [f32],
    pub lda: usize,
    pub m: usize,
    pub alpha: f32,
    pub bias: Option<&'a [f32]>,
}

thread_local! {
    /// Packed A blocks; grows to MC x KC once per thread.
    static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `c = alpha a b + bias` (overwriting `c`). `parallel` spreads row blocks over the rayon
/// pool; callers already inside a parallel loop pass false.
pub(crate) fn matmul(x: &Product, b: &PackedB, c: &mut [f32], ldc: usize, parallel: bool) {
    assert!(available(), "pid gemm needs AVX2 and FMA");
    let (m, k, n) = (x.m, b.k, b.n);
    assert!(
        m == 0 || x.a.len() >= (m - 1) * x.lda + k,
        "A is not ({m}, {k})"
    );
    assert!(
        m == 0 || c.len() >= (m - 1) * ldc + n,
        "C is not ({m}, {n})"
    );
    if let Some(bias) = x.bias {
        assert_eq!(bias.len(), n, "bias is not ({n})");
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            for (j, o) in row[..n].iter_mut().enumerate() {
                *o = x.bias.map_or(0.0, |b| b[j]);
            }
        }
        return;
    }
    let panels = n.div_ceil(NR);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    // Row blocks of at most MC rows, as many per thread; too few rows to go round also
    // split the columns.
    let row_tasks = m.div_ceil(MC).next_multiple_of(threads).min(m.div_ceil(MR));
    let rows_per_task = m.div_ceil(row_tasks).next_multiple_of(MR);
    let row_tasks = m.div_ceil(rows_per_task);
    let col_tasks = threads.div_ceil(row_tasks).min(panels);
    let panels_per_task = panels.div_ceil(col_tasks);
    let c_addr = c.as_mut_ptr() as usize;
    let task = |t: usize| {
        let (ri, ci) = (t / col_tasks, t % col_tasks);
        let rows = ri * rows_per_task..((ri + 1) * rows_per_task).min(m);
        let cols = ci * panels_per_task..((ci + 1) * panels_per_task).min(panels);
        // SAFETY: tasks write disjoint (rows x panel columns) regions of C, which the
        // asserts above showed to be in bounds; `c` outlives the parallel loop.
        unsafe { row_block(x, b, rows, cols, c_addr as *mut f32, ldc) };
    };
    if parallel {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * col_tasks).for_each(task);
    }
}

thread_local! {
    /// The last packed weight's buffer, reused by the next linear on this thread: it grows to
    /// the widest weight once (150 MB in PiD) where a fresh allocation per layer costs more in
    /// page faults than the packing.
    static PACKED_WEIGHT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `x (m, k) W^T + b` by our packed GEMM for a weight `W (n, k)`.
pub(crate) fn linear<T: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let packed = PackedB::from_transposed(w, n, k, PACKED_WEIGHT.take());
    let mut out = vec![0f32; m * n];
    let product = Product {
        a: x,
        lda: k,
        m,
        alpha: 1.0,
        bias,
    };
    matmul(&product, &packed, &mut out, n, true);
    PACKED_WEIGHT.set(packed.into_buffer());
    out
}

/// Rows `rows` of C over column panels `cols`, depth block by depth block.
///
/// # Safety
/// `c` addresses `C (m, n)` with row stride `ldc`; no other thread writes these rows and panels.
unsafe fn row_block(
    x: &Product,
    b: &PackedB,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    let k = b.k;
    let depth_blocks = k.div_ceil(KC);
    let kc_max = k.div_ceil(depth_blocks);
    let m_panels = rows.len().div_ceil(MR);
    PACKED_A.with_borrow_mut(|ap| {
        ap.resize(m_panels * MR * kc_max + A_SLACK, 0.0);
        for p0 in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - p0);
            pack_a(x, rows.start, rows.len(), p0, kc, ap);
            let first = p0 == 0;
            for j in cols.clone() {
                let bp = b.block(j, p0);
                let ncols = NR.min(b.n - j * NR);
                let bias = x
                    .bias
                    .filter(|_| first)
                    .map(|bias| &bias[j * NR..][..ncols]);
                for i in 0..m_panels {
                    let r0 = rows.start + i * MR;
                    let tile = Tile {
                        c: c.add(r0 * ldc + j * NR),
                        ldc,
                        rows: MR.min(rows.end - r0),
                        cols: ncols,
                        alpha: x.alpha,
                        overwrite: first,
                        bias,
                    };
                    tile.run(kc, ap[i * MR * kc..].as_ptr(), bp);
                }
            }
        }
    });
}

/// Rows `r0..r0 + rows`, depth `p0..p0 + kc` of A into `(kc, MR)` panels, zero-padded to MR
/// rows. `ap` holds [`A_SLACK`] floats past the last panel.
fn pack_a(x: &Product, r0: usize, rows: usize, p0: usize, kc: usize, ap: &mut [f32]) {
    let panels = rows.div_ceil(MR);
    assert!(ap.len() >= panels * MR * kc + A_SLACK);
    for i in 0..panels {
        let live = MR.min(rows - i * MR);
        let src = &x.a[(r0 + i * MR) * x.lda + p0..];
        let panel = &mut ap[i * MR * kc..];
        // Whole panels in blocks of 8 depths through registers, the rest one value at a time.
        let whole = if live == MR { kc / 8 * 8 } else { 0 };
        if whole > 0 {
            assert!(src.len() >= (MR - 1) * x.lda + kc);
            // SAFETY: `matmul` checked AVX2; six rows of `kc` values are readable at `src`
            // and `panel` has room for `whole x MR` floats plus the slack the last store
            // spills into (the next panel's start, rewritten when it is packed, or A_SLACK).
            unsafe { avx2::pack_a_panel(src.as_ptr(), x.lda, whole, panel.as_mut_ptr()) };
        }
        for p in whole..kc {
            for ii in 0..MR {
                panel[p * MR + ii] = if ii < live { src[ii * x.lda + p] } else { 0.0 };
            }
        }
    }
}

/// Floats past the packed A panels that [`avx2::pack_a_panel`]'s last store may write.
const A_SLACK: usize = 8 - MR;

/// One `rows x cols` (at most MR x NR) tile of C.
struct Tile<'a> {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    /// First depth block: write `alpha acc + bias` instead of adding `alpha acc`.
    overwrite: bool,
    bias: Option<&'a [f32]>,
}

impl Tile<'_> {
    /// Accumulate `kc` steps of packed A `(kc, MR)` times packed B `(kc, NR)` into the tile.
    ///
    /// # Safety
    /// `a` and `b` point at `kc x MR` and `kc x NR` floats; `c` at the tile's rows and columns.
    unsafe fn run(&self, kc: usize, a: *const f32, b: *const f32) {
        let mut bias = [0f32; NR];
        if let Some(src) = self.bias {
            bias[..src.len()].copy_from_slice(src);
        }
        if self.rows == MR && self.cols == NR {
            avx2::tile(
                kc,
                a,
                b,
                self.c,
                self.ldc,
                self.alpha,
                self.overwrite,
                &bias,
            );
        } else {
            // Edge tile: run the full tile on a scratch copy, keep the live part.
            let mut scratch = [0f32; MR * NR];
            for r in 0..self.rows {
                for q in 0..self.cols {
                    scratch[r * NR + q] = *self.c.add(r * self.ldc + q);
                }
            }
            let s = scratch.as_mut_ptr();
            avx2::tile(kc, a, b, s, NR, self.alpha, self.overwrite, &bias);
            for r in 0..self.rows {
                for q in 0..self.cols {
                    *self.c.add(r * self.ldc + q) = scratch[r * NR + q];
                }
            }
        }
    }
}

mod avx2 {
    use std::arch::x86_64::*;

    use super::{Widen, MR, NR};

    /// `dst[p * NR + c] = w[c * k + p]` for the NR rows of `w` and depths `p < depth`, a
    /// multiple of 8: 8 x 8 blocks transposed in registers.
    ///
    /// # Safety
    /// AVX2 is available; if `depth > 0`, `w` holds NR rows of `k >= depth` elements and `dst`
    /// `depth x NR` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_panel<T: Widen>(
        w: &[T],
        k: usize,
        depth: usize,
        dst: &mut [f32],
    ) {
        if depth == 0 {
            return;
        }
        assert!(w.len() >= NR * k && dst.len() >= depth * NR && depth <= k);
        let (w, dst) = (w.as_ptr(), dst.as_mut_ptr());
        for p in (0..depth).step_by(8) {
            for half in 0..2 {
                let r: [__m256; 8] =
                    std::array::from_fn(|c| T::widen8(w.add((half * 8 + c) * k + p)));
                for (i, col) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(dst.add((p + i) * NR + half * 8), col);
                }
            }
        }
    }

    /// Six rows of A at `a` (row stride `lda`), depths `0..depth` (a multiple of 8), as a
    /// `(depth, MR)` panel at `dst`: 8 x 8 transposes with two zero rows, each column stored
    /// whole so its two padding lanes land where the next column goes (and the last one's
    /// `8 - MR` floats past the panel).
    ///
    /// # Safety
    /// AVX2 is available; rows `0..MR` of `depth` floats are readable at `a`; `dst` has room
    /// for `depth x MR + 8 - MR` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_a_panel(a: *const f32, lda: usize, depth: usize, dst: *mut f32) {
        for p in (0..depth).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|row| {
                if row < MR {
                    _mm256_loadu_ps(a.add(row * lda + p))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (i, col) in transpose8(r).into_iter().enumerate() {
                _mm256_storeu_ps(dst.add((p + i) * MR), col);
            }
        }
    }

    /// The 8 x 8 transpose: lane `c` of output `i` is lane `i` of input `c`.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ]
    }

    /// The 6 x 16 register tile: `c = alpha (a b) + bias` if `overwrite`, else `c += alpha (a b)`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a`, `b` hold `kc x MR`, `kc x NR` floats; `c` rows of 16
    /// floats `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        overwrite: bool,
        bias: &[f32; NR],
    ) {
        // C is read and written after the depth loop: start fetching it now.
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * ldc + NR - 1) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm256_broadcast_ss(&*a.add(p * MR + r));
                acc[0] = _mm256_fmadd_ps(ar, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ar, b1, acc[1]);
            }
        }
        let alpha = _mm256_set1_ps(alpha);
        let (bias0, bias1) = (
            _mm256_loadu_ps(bias.as_ptr()),
            _mm256_loadu_ps(bias.as_ptr().add(8)),
        );
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * ldc);
            let (base0, base1) = if overwrite {
                (bias0, bias1)
            } else {
                (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
            };
            _mm256_storeu_ps(row, _mm256_fmadd_ps(alpha, acc[0], base0));
            _mm256_storeu_ps(row.add(8), _mm256_fmadd_ps(alpha, acc[1], base1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `alpha a b + bias` in f64, for `b (k, n)` row-major.
    fn reference(
        a: &[f32],
        m: usize,
        b: &[f32],
        k: usize,
        n: usize,
        alpha: f32,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                c[i * n + j] = (alpha as f64 * dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| (((i * 2_654_435_761 + seed) >> 7) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn a_bf16_weight_packs_as_its_widened_copy() {
        // Whole panels, a part panel, and depths past the last 8.
        let (n, k) = (40, 27);
        let w: Vec<bf16> = values(n * k, 4).into_iter().map(bf16::from_f32).collect();
        let widened: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
        let packed = PackedB::from_transposed(&w, n, k, Vec::new());
        let want = PackedB::from_transposed(&widened, n, k, Vec::new());
        assert_eq!(packed.data, want.data);
        // Panel 2 holds columns 32..48 (8 live), depth-major.
        assert_eq!(packed.data[2 * k * NR + 5 * NR + 3], widened[35 * k + 5]);
        assert_eq!(packed.data[2 * k * NR + 5 * NR + 9], 0.0);
    }

    #[test]
    fn matmul_equals_the_f64_product_on_edge_shapes() {
        if !available() {
            return;
        }
        // Edges off every blocking: rows off MR and MC, columns off NR, depth over KC.
        for (m, k, n) in [
            (1, 1, 1),
            (7, 5, 17),
            (13, 1000, 33),
            (200, 1700, 40),
            (385, 64, 300),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bias = values(n, 3);
            let want = reference(&a, m, &b, k, n, 0.5, Some(&bias));
            for parallel in [false, true] {
                let mut c = vec![f32::NAN; m * n];
                let x = Product {
                    a: &a,
                    lda: k,
                    m,
                    alpha: 0.5,
                    bias: Some(&bias),
                };
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                // A reused buffer too small, and one larger than needed.
                for buf in [vec![f32::NAN; 7], vec![f32::NAN; 70000]] {
                    let packed = PackedB::from_transposed(&bt, n, k, buf);
                    matmul(&x, &packed, &mut c, n, parallel);
                    // `c` starts as NaN: an element the product never wrote fails here.
                    for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (x - y).abs() < 1e-5 * (k as f32).sqrt(),
                            "({m}, {k}, {n}) parallel {parallel}: element {i} is {x}, want {y}"
                        );
                    }
                }
            }
        }
    }
}
