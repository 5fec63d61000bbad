//! The decode pipeline, top to bottom: a request checked against the network together with
//! its plan -> per image: noise, sampler (every step's velocity assembled from the plan's
//! tiles, one for a whole-image decode) -> image in [-1, 1].
//!
//! Caption embeddings come in already encoded (see `caption`), so the same pipeline
//! serves callers that cache or precompute them. Images of a batch are decoded one after
//! another with their own seed, sigma and caption: a batch of B costs one image's working
//! memory plus B outputs, and each image equals its single-image decode.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use crate::kernels;
use crate::net::{PidNet, Trace};
use crate::noise::Stream;
use crate::plan::{feather, Plan, Tile};
use crate::sampler::{self, StepEvent, StepObserver};
use crate::{Error, NetConfig, Result};

/// What a decode reports while it runs. Returning an error from [`Progress::report`]
/// (typically [`Error::Cancelled`]) stops the decode at that boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Image `index` of `count` starts.
    Image { index: usize, count: usize },
    /// Sampler step `step` (0-based) of `total` starts.
    Step { step: usize, total: usize },
    /// Tile `tile` (0-based) of `tiles` of the current step starts.
    Tile { tile: usize, tiles: usize },
}

pub trait Progress {
    fn report(&mut self, event: Event) -> Result<()>;
}

/// No reporting, never cancels.
impl Progress for () {
    fn report(&mut self, _event: Event) -> Result<()> {
        Ok(())
    }
}

/// The inputs of a decode, unchecked: everything per image is indexed by the batch axis.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `(B, C, h, w)` latents in the space's normalised frame (SDXL: raw x 0.13025).
    pub latents: Tensor,
    /// `(B, Nt, txt_dim)` caption embeddings.
    pub captions: Tensor,
    /// Per-image noise level of the latent (variance-preserving for SDXL), in [0, 1].
    pub sigma: Vec<f32>,
    /// Per-image noise seeds.
    pub seeds: Vec<u64>,
    /// Sampler steps (4 is the trained schedule).
    pub steps: usize,
}

/// A decode request: inputs [`validate`] accepted, with the plan (see [`crate::plan::plan`])
/// they decode under, checked against them. The only way into [`decode`].
#[derive(Debug, Clone)]
pub struct Request {
    inputs: Inputs,
    plan: Plan,
}

impl Request {
    /// Check `inputs` against the network and `plan` against the output they decode to.
    pub fn new(cfg: &NetConfig, inputs: Inputs, plan: Plan) -> Result<Self> {
        validate(cfg, &inputs)?;
        let (_, _, h, w) = inputs.latents.dims4()?;
        let (oh, ow) = output_size(cfg, h, w);
        if (plan.height, plan.width) != (oh, ow) {
            return Err(Error::input(
                "plan",
                format!(
                    "the plan is for {}x{} but the latents decode to {ow}x{oh}",
                    plan.width, plan.height
                ),
            ));
        }
        plan.check(cfg.pixels_per_latent())?;
        Ok(Self { inputs, plan })
    }

    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Output size `(H, W)` for a latent of `(h, w)`.
pub fn output_size(cfg: &NetConfig, h: usize, w: usize) -> (usize, usize) {
    let f = cfg.pixels_per_latent();
    (h * f, w * f)
}

/// Check a decode's inputs against the network before any work: ranks, channels, sizes,
/// ranges, finiteness. Messages name the bad value and what to pass instead.
pub fn validate(cfg: &NetConfig, req: &Inputs) -> Result<()> {
    let dims = req.latents.dims();
    if dims.len() != 4 {
        return Err(Error::input(
            "latent_rank",
            format!("latents must be [B, C, h, w], got shape {dims:?}"),
        ));
    }
    let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
    if b == 0 || h == 0 || w == 0 {
        return Err(Error::input(
            "latent_shape",
            format!("latents have an empty axis: shape {dims:?}"),
        ));
    }
    if c != cfg.lq_latent_channels {
        return Err(Error::input(
            "latent_channels",
            format!(
                "latents have {c} channels but this checkpoint expects {} (got shape {dims:?}); \
                 pass a latent of the checkpoint's latent space",
                cfg.lq_latent_channels
            ),
        ));
    }
    let cdims = req.captions.dims();
    if cdims.len() != 3 || cdims[0] != b || cdims[2] != cfg.txt_embed_dim {
        return Err(Error::input(
            "caption_shape",
            format!(
                "caption embeddings must be [{b}, N, {}], got {cdims:?}",
                cfg.txt_embed_dim
            ),
        ));
    }
    if req.sigma.len() != b || req.seeds.len() != b {
        return Err(Error::input(
            "batch",
            format!(
                "{b} latents need {b} sigmas and seeds, got {} and {}",
                req.sigma.len(),
                req.seeds.len()
            ),
        ));
    }
    if let Some(s) = req.sigma.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        return Err(Error::input(
            "sigma_range",
            format!("sigma {s} is outside [0, 1]; pass the variance-preserving noise level (0 = clean latent)"),
        ));
    }
    let finite = req
        .latents
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(Error::input(
            "latent_not_finite",
            "latents contain NaN or infinity",
        ));
    }
    sampler::t_ladder(req.steps)?;
    Ok(())
}

/// Standard-normal noise of `stream` for one image `(1, 3, H, W)`.
pub fn image_noise(
    seed: u64,
    stream: Stream,
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Tensor> {
    Ok(kernels::normal(seed, stream, 3 * h * w, device)?.reshape((1, 3, h, w))?)
}

/// Decode a request; returns `(B, 3, H, W)` in [-1, 1].
pub fn decode(net: &PidNet, req: &Request, progress: &mut dyn Progress) -> Result<Tensor> {
    let Inputs {
        latents,
        captions,
        sigma,
        seeds,
        steps,
    } = &req.inputs;
    let plan = &req.plan;
    let (oh, ow) = (plan.height, plan.width);
    let t_list = sampler::t_ladder(*steps)?;
    let dev = net.device().clone();
    let count = sigma.len();
    let mut images = Vec::with_capacity(count);
    let progress = RefCell::new(progress);
    for b in 0..count {
        progress
            .borrow_mut()
            .report(Event::Image { index: b, count })?;
        let z = latents.narrow(0, b, 1)?.to_device(&dev)?;
        let y = captions.narrow(0, b, 1)?.to_device(&dev)?;
        let sig = Tensor::new(&[sigma[b]], &dev)?;
        let condition = |tile: &Tile| {
            net.condition_window(&y, &z, &sig, (oh, ow), tile, &mut Trace::disabled())
        };
        // One tile keeps its conditioning across steps; a tiled plan rebuilds each tile's per
        // step (cheap next to the forward), so it never holds every tile's LQ features at once.
        let kept = match plan.tiles.as_slice() {
            [tile] => Some(condition(tile)?),
            _ => None,
        };
        let velocity = |x: &Tensor, t: &Tensor| {
            blend(plan, &dev, |i, tile| {
                if plan.tiles.len() > 1 {
                    let tiles = plan.tiles.len();
                    progress
                        .borrow_mut()
                        .report(Event::Tile { tile: i, tiles })?;
                }
                let xt = x.narrow(2, tile.y, tile.h)?.narrow(3, tile.x, tile.w)?;
                let v = match &kept {
                    Some(cond) => net.velocity(cond, &xt, t, &mut Trace::disabled())?,
                    None => net.velocity(&condition(tile)?, &xt, t, &mut Trace::disabled())?,
                };
                Ok(v)
            })
        };
        // Noise is drawn for the whole image from (seed, stream, pixel): no tile draws its own.
        let seed = seeds[b];
        let noise = image_noise(seed, Stream::Initial, oh, ow, &dev)?;
        let eps = |k: usize| image_noise(seed, Stream::Renoise(k as u32), oh, ow, &dev);
        images.push(sampler::run(
            &noise,
            &t_list,
            velocity,
            eps,
            &mut Steps(&progress),
        )?);
    }
    Ok(Tensor::cat(&images, 0)?)
}

/// Forwards sampler steps to the caller's progress sink.
struct Steps<'a, 'p>(&'a RefCell<&'p mut dyn Progress>);

impl StepObserver for Steps<'_, '_> {
    fn before_step(&mut self, e: StepEvent) -> Result<()> {
        self.0.borrow_mut().report(Event::Step {
            step: e.step,
            total: e.total,
        })
    }
}

/// The RGB velocity `(1, 3, H, W)` of the plan's image from each tile's,
/// `tile_velocity(index, tile)`, weighted by a feathered window (a linear ramp over the
/// overlap on sides shared with a neighbour, 1 elsewhere) divided by the windows' sum at
/// every pixel: the weights of each pixel sum to one, so identical tile velocities blend back
/// to themselves, and a one-tile plan returns its tile's velocity exactly.
pub fn blend(
    plan: &Plan,
    dev: &Device,
    mut tile_velocity: impl FnMut(usize, &Tile) -> Result<Tensor>,
) -> Result<Tensor> {
    let (hh, ww) = (plan.height, plan.width);
    let mut acc = Tensor::zeros((1, 3, hh, ww), DType::F32, dev)?;
    let mut wsum = Tensor::zeros((1, 1, hh, ww), DType::F32, dev)?;
    for (i, tile) in plan.tiles.iter().enumerate() {
        let v = tile_velocity(i, tile)?.to_dtype(DType::F32)?;
        let Tile {
            y: ty,
            x: tx,
            h: th,
            w: tw,
        } = *tile;
        let fy = Tensor::new(feather(th, ty > 0, ty + th < hh), dev)?.reshape((1, 1, th, 1))?;
        let fx = Tensor::new(feather(tw, tx > 0, tx + tw < ww), dev)?.reshape((1, 1, 1, tw))?;
        let wt = fy.broadcast_mul(&fx)?;
        let ranges = |c: usize| [0..1, 0..c, ty..ty + th, tx..tx + tw];
        let region = acc.narrow(2, ty, th)?.narrow(3, tx, tw)?;
        acc = acc.slice_assign(&ranges(3), &(region + v.broadcast_mul(&wt)?)?)?;
        let wregion = wsum.narrow(2, ty, th)?.narrow(3, tx, tw)?;
        wsum = wsum.slice_assign(&ranges(1), &(wregion + wt)?)?;
    }
    Ok(acc.broadcast_div(&wsum)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_abs_diff;

    #[test]
    fn identical_tile_velocities_blend_back_to_themselves() -> Result<()> {
        let dev = Device::Cpu;
        let field = Tensor::randn(0f32, 1., (1, 3, 640, 448), &dev)?;
        let ones = field.ones_like()?;
        // Overlapping 256-pixel tiles whose last row and column sit flush with the border (so
        // wider overlaps there), two tiles along one axis, and the whole image.
        let cfg = NetConfig::sdxl_mini();
        let dt = crate::plan::DTypes {
            activation: 4,
            weight: 2,
        };
        for edge in [256, 448, 640] {
            let plan = crate::plan::plan(&cfg, 1, 640, 448, dt, u64::MAX, Some(edge))?;
            for f in [&field, &ones] {
                let blended = blend(&plan, &dev, |_, t| {
                    Ok(f.narrow(2, t.y, t.h)?.narrow(3, t.x, t.w)?)
                })?;
                let err = max_abs_diff(&blended, f)?;
                assert!(err <= 1e-6, "{} tiles of {edge}: {err:e}", plan.tiles.len());
                if plan.tiles.len() == 1 {
                    assert_eq!(err, 0.0, "a one-tile plan returns its velocity exactly");
                }
            }
        }
        Ok(())
    }
}
