//! Memory model and tiling planner, decided before anything is allocated.
//!
//! A decode holds the full-size sampler state (noise, x, x0, eps) for the whole image;
//! only the per-step *velocity forward* can be split into spatial tiles. The planner
//! prices a whole-image forward first and tiles only when that does not fit: tiling is an
//! approximation (attention cannot see across tiles), so it is a fallback, never a default.
//!
//! Tiles are aligned to whole latent pixels (`pixels_per_latent`, 32 for /8 spaces at 4x),
//! overlap by [`TILE_OVERLAP`] output pixels and are blended with a feathered window.

use crate::config::NetConfig;
use crate::{Error, Result};

/// Output pixels two neighbouring tiles share (blended).
pub const TILE_OVERLAP: usize = 256;
/// Smallest tile edge the planner will use; below it quality collapses (the network
/// was trained from 2048 px up) and the per-tile overhead dominates.
pub const MIN_TILE_EDGE: usize = 512;

/// Bytes of one element of the compute dtype (attention operands, weights cast for a matmul)
/// and of resident weights. Everything else a forward holds is f32, whatever the compute
/// dtype (see `net::PidNet::new`), and so is the sampler state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypes {
    pub activation: usize,
    pub weight: usize,
}

/// Bytes of the f32 tensors of a forward and of the sampler.
const F32: u64 = 4;

/// One forward's grid inside the output image, in output pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub y: usize,
    pub x: usize,
    pub h: usize,
    pub w: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub height: usize,
    pub width: usize,
    /// One tile equal to the image means a whole-image decode.
    pub tiles: Vec<Tile>,
    pub predicted_peak_bytes: u64,
    pub budget_bytes: u64,
}

impl Tile {
    /// The whole `h x w` image as one tile.
    pub fn whole(h: usize, w: usize) -> Self {
        Self { y: 0, x: 0, h, w }
    }

    /// The latent pixels a tile is conditioned on: its own (`f` output pixels per latent
    /// pixel, to which the tile is aligned) plus up to `halo` more on every side, within a
    /// latent of `(zh, zw)`. Returns the crop, in latent pixels, and where the tile starts
    /// inside it.
    pub fn latent_crop(
        &self,
        f: usize,
        halo: usize,
        (zh, zw): (usize, usize),
    ) -> (Tile, (usize, usize)) {
        let axis = |start: usize, len: usize, total: usize| {
            let (start, end) = (start / f, (start + len) / f);
            let lo = start.saturating_sub(halo);
            (lo, (end + halo).min(total) - lo, start - lo)
        };
        let (y, h, oy) = axis(self.y, self.h, zh);
        let (x, w, ox) = axis(self.x, self.w, zw);
        (Tile { y, x, h, w }, (oy, ox))
    }
}

impl Plan {
    pub fn is_whole(&self) -> bool {
        self.tiles == [Tile::whole(self.height, self.width)]
    }

    /// Check that the tiles lie inside the `height x width` image, aligned to `align` output
    /// pixels, and cover every pixel (the blend divides by the summed weights).
    pub fn check(&self, align: usize) -> Result<()> {
        let bad = |m: String| Err(Error::input("plan", m));
        let on_grid = |v: usize| align > 0 && v.is_multiple_of(align);
        if self.tiles.is_empty() || !on_grid(self.height) || !on_grid(self.width) {
            return bad(format!(
                "a plan of {} tile(s) for {}x{} output pixels does not fit a grid of {align}",
                self.tiles.len(),
                self.width,
                self.height
            ));
        }
        let (gh, gw) = (self.height / align, self.width / align);
        let mut covered = vec![false; gh * gw];
        for t in &self.tiles {
            let aligned = [t.y, t.x, t.h, t.w].into_iter().all(on_grid);
            let inside =
                t.y.saturating_add(t.h) <= self.height && t.x.saturating_add(t.w) <= self.width;
            if !aligned || t.h == 0 || t.w == 0 || !inside {
                return bad(format!(
                    "tile {t:?} is not a non-empty block of {align}-pixel cells inside the {}x{} image",
                    self.width, self.height
                ));
            }
            for r in t.y / align..(t.y + t.h) / align {
                covered[r * gw + t.x / align..r * gw + (t.x + t.w) / align].fill(true);
            }
        }
        if let Some(i) = covered.iter().position(|c| !c) {
            return bad(format!(
                "no tile covers output pixel ({}, {})",
                i % gw * align,
                i / gw * align
            ));
        }
        Ok(())
    }
}

/// Bytes resident for the whole decode regardless of tiling: the weights, the sampler
/// state of the image being decoded (noise, x, x0, eps, f64 temporaries, velocity
/// accumulator and blend weights) and the finished outputs of the batch. Images are
/// decoded one after another, so only one image's working state is ever priced.
pub fn resident_bytes(cfg: &NetConfig, batch: usize, h: usize, w: usize, dt: DTypes) -> u64 {
    let params: usize = cfg
        .expected_tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let image = (cfg.in_channels * h * w) as u64 * F32;
    (params * dt.weight) as u64 + 10 * image + batch as u64 * image
}

/// Peak bytes of one velocity forward over an `h x w` grid of one image, including the
/// cached conditioning of that grid.
pub fn forward_bytes(cfg: &NetConfig, h: usize, w: usize, dt: DTypes) -> u64 {
    let a = dt.activation as u64;
    let l = ((h / cfg.patch_size) * (w / cfg.patch_size)) as u64;
    let d = cfg.hidden_size as u64;
    let nt = cfg.txt_max_length as u64;
    let p2 = (cfg.patch_size * cfg.patch_size) as u64;
    let pd = cfg.pixel_hidden_size as u64;
    // Conditioning: LQ features per gate (+ PiT), caption tokens, pixel positions.
    let gates = (cfg.num_lq_outputs() + usize::from(cfg.pit_lq_inject)) as u64;
    let cond = (gates * l * d + nt * d + l * p2 * pd) * F32;
    // Patch blocks: the streams and their normed/modulated copies, qkv, q/k norms and the
    // projections (~10 x L x D), the per-head q/k/v/out of the attention (~4 x L x D), one
    // attention block (256 MiB) and one SwiGLU chunk of 8192 rows (w1, w3 and their product).
    let patch =
        (10 * F32 + 4 * a) * (l + nt) * d + (256 << 20) + 3 * 8192 * cfg.ffn_hidden() as u64 * F32;
    // PiT: the pixel stream and its successor and modulated copy, the compressed tokens
    // around the attention (and its operands), and one chunk of per-pixel modulation.
    let pixel = 3 * l * p2 * pd * F32
        + l * cfg.pixel_attn_hidden_size as u64 * (4 * F32 + 4 * a)
        + 6 * 1024 * p2 * pd * F32;
    // The largest weight widened at use: packed for the CPU GEMM (its buffer is kept for the
    // next layer) or cast for candle's matmul.
    let upcast = (6 * p2 * pd) * d * a;
    // LQ trunk (computed once per conditioning): activations and the 3x3 im2col buffer.
    let trunk = l * cfg.lq_hidden_dim as u64 * 12 * F32;
    cond + patch.max(pixel).max(trunk) + upcast
}

/// Tile starts covering `total` with tiles of `edge`, aligned to `align`, overlapping.
fn starts(total: usize, edge: usize, align: usize) -> Vec<usize> {
    if edge >= total {
        return vec![0];
    }
    let stride = (edge - TILE_OVERLAP.min(edge / 2)).max(align) / align * align;
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|s| s + edge < total)
        .collect();
    v.push(total - edge); // last tile flush with the border (aligned: both are multiples of align)
    v
}

/// Choose whole-image or tiled decoding for `batch` images of `h x w` within `budget` bytes.
///
/// `forced_tile` (an edge in output pixels) overrides the choice, for tests and users
/// who want a fixed tiling.
pub fn plan(
    cfg: &NetConfig,
    batch: usize,
    h: usize,
    w: usize,
    dt: DTypes,
    budget: u64,
    forced_tile: Option<usize>,
) -> Result<Plan> {
    let align = cfg.pixels_per_latent();
    let resident = resident_bytes(cfg, batch, h, w, dt);
    let whole = resident + forward_bytes(cfg, h, w, dt);
    let mk = |edge_h: usize, edge_w: usize, peak: u64| -> Plan {
        let tiles = starts(h, edge_h, align)
            .into_iter()
            .flat_map(|y| {
                starts(w, edge_w, align).into_iter().map(move |x| Tile {
                    y,
                    x,
                    h: edge_h,
                    w: edge_w,
                })
            })
            .collect();
        Plan {
            height: h,
            width: w,
            tiles,
            predicted_peak_bytes: peak,
            budget_bytes: budget,
        }
    };
    if let Some(edge) = forced_tile {
        if edge == 0 || edge % align != 0 {
            return Err(Error::input(
                "tile",
                format!("tile edge {edge} must be a positive multiple of {align} output pixels"),
            ));
        }
        let (eh, ew) = (edge.min(h), edge.min(w));
        return Ok(mk(eh, ew, resident + forward_bytes(cfg, eh, ew, dt)));
    }
    if whole <= budget {
        return Ok(mk(h, w, whole));
    }
    // The fewest tiles per axis that fit, each the smallest aligned square that count
    // allows (neighbours share TILE_OVERLAP). A larger tile of the same count only widens
    // the overlap: more work (attention grows with the square of the tokens: 4 tiles of
    // 3520² where 2176² do at 4096²) and a higher peak. `tile=` forces larger tiles.
    let min_edge = MIN_TILE_EDGE.div_ceil(align) * align;
    let long = h.max(w);
    for per_axis in 2.. {
        let cover = (long + (per_axis - 1) * TILE_OVERLAP).div_ceil(per_axis);
        let edge = (cover.div_ceil(align) * align).max(min_edge);
        let (eh, ew) = (edge.min(h), edge.min(w));
        let peak = resident + forward_bytes(cfg, eh, ew, dt);
        if peak <= budget {
            return Ok(mk(eh, ew, peak));
        }
        if edge == min_edge {
            break;
        }
    }
    let (eh, ew) = (min_edge.min(h), min_edge.min(w));
    let needed = resident + forward_bytes(cfg, eh, ew, dt);
    Err(Error::Budget {
        needed_bytes: needed,
        budget_bytes: budget,
        message: format!(
            "decoding {batch} image(s) of {w}x{h} needs about {:.2} GiB even with {ew}x{eh} tiles, \
             but the memory budget is {:.2} GiB; decode fewer images at once, a smaller latent, \
             or raise the budget (memory_budget= or PID_MEMORY_BUDGET_GIB)",
            gib(needed),
            gib(budget)
        ),
    })
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Feathered blend weight of a tile along one axis: ramps linearly over the overlap on
/// sides that touch another tile, 1 elsewhere (floor keeps every pixel covered).
pub fn feather(len: usize, ramp_start: bool, ramp_end: bool) -> Vec<f32> {
    let ramp = TILE_OVERLAP.min(len / 2).max(1);
    (0..len)
        .map(|i| {
            let mut wgt = 1.0f32;
            if ramp_start {
                wgt = wgt.min((i as f32 + 0.5) / ramp as f32);
            }
            if ramp_end {
                wgt = wgt.min(((len - i) as f32 - 0.5) / ramp as f32);
            }
            wgt.clamp(1e-4, 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini() -> NetConfig {
        let mut c = NetConfig::sdxl_2kto4k();
        c.hidden_size = 128;
        c.num_groups = 2;
        c.patch_depth = 4;
        c.pixel_attn_hidden_size = 144;
        c.pixel_num_groups = 2;
        c.txt_embed_dim = 64;
        c.lq_hidden_dim = 32;
        c.lq_num_res_blocks = 2;
        c
    }

    const F32: DTypes = DTypes {
        activation: 4,
        weight: 2,
    };

    #[test]
    fn whole_image_when_it_fits() {
        let p = plan(&mini(), 1, 256, 320, F32, 1 << 40, None).unwrap();
        assert!(p.is_whole());
    }

    #[test]
    fn tiles_cover_the_image_aligned_and_overlapping() {
        let cfg = mini();
        let p = plan(&cfg, 1, 1024, 1600, F32, u64::MAX, Some(512)).unwrap();
        let mut covered = vec![false; 1024 * 1600];
        for t in &p.tiles {
            assert_eq!((t.y % 32, t.x % 32, t.h, t.w), (0, 0, 512, 512));
            for y in t.y..t.y + t.h {
                for x in t.x..t.x + t.w {
                    covered[y * 1600 + x] = true;
                }
            }
        }
        assert!(covered.iter().all(|c| *c));
    }

    #[test]
    fn tiles_when_whole_does_not_fit_and_refuses_when_nothing_fits() {
        let cfg = NetConfig::sdxl_2kto4k();
        let whole = resident_bytes(&cfg, 1, 4096, 4096, F32) + forward_bytes(&cfg, 4096, 4096, F32);
        let p = plan(&cfg, 1, 4096, 4096, F32, whole - 1, None).unwrap();
        assert!(p.tiles.len() > 1 && p.predicted_peak_bytes < whole);
        // Two tiles per axis fit, so two it is, each just large enough to cover its half
        // plus the shared overlap: (4096 + 256) / 2.
        let edges: Vec<_> = p.tiles.iter().map(|t| (t.y, t.x, t.h, t.w)).collect();
        assert_eq!(
            edges,
            [
                (0, 0, 2176, 2176),
                (0, 1920, 2176, 2176),
                (1920, 0, 2176, 2176),
                (1920, 1920, 2176, 2176)
            ]
        );
        // A budget that two per axis exceed: three per axis of (4096 + 2 * 256) / 3.
        let three = resident_bytes(&cfg, 1, 4096, 4096, F32) + forward_bytes(&cfg, 1536, 1536, F32);
        let p = plan(&cfg, 1, 4096, 4096, F32, three, None).unwrap();
        assert_eq!(p.tiles.len(), 9);
        assert!(p.tiles.iter().all(|t| (t.h, t.w) == (1536, 1536)));
        let err = plan(&cfg, 1, 4096, 4096, F32, 1 << 30, None).unwrap_err();
        assert_eq!(err.code(), "memory_budget");
    }

    #[test]
    fn batch_adds_only_its_outputs() {
        let cfg = NetConfig::sdxl_2kto4k();
        let one = plan(&cfg, 1, 2048, 2048, F32, u64::MAX, None)
            .unwrap()
            .predicted_peak_bytes;
        let four = plan(&cfg, 4, 2048, 2048, F32, u64::MAX, None)
            .unwrap()
            .predicted_peak_bytes;
        assert_eq!(four - one, 3 * 3 * 2048 * 2048 * 4);
    }

    #[test]
    fn feather_is_one_inside_and_ramps_at_shared_edges() {
        let f = feather(1024, true, false);
        assert!(f[0] < 0.01 && f[1023] == 1.0 && f[600] == 1.0);
        assert!(feather(64, false, false).iter().all(|w| *w == 1.0));
    }
}
