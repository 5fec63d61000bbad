//! The decode pipeline, top to bottom: latent checks -> noise -> sampler (whole image or
//! tiled velocity) -> image in [-1, 1].
//!
//! Caption embeddings come in already encoded (see `caption`), so the same pipeline
//! serves callers that cache or precompute them. Images of a batch are decoded one after
//! another with their own seed, sigma and caption: a batch of B costs one image's working
//! memory plus B outputs, and each image equals its single-image decode.

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

/// One decode request: everything per image is indexed by the batch axis.
#[derive(Debug, Clone)]
pub struct Request {
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

/// Output size `(H, W)` for a latent of `(h, w)`.
pub fn output_size(cfg: &NetConfig, h: usize, w: usize) -> (usize, usize) {
    let f = cfg.pixels_per_latent();
    (h * f, w * f)
}

/// Check a request against the network before any work: ranks, channels, sizes, ranges,
/// finiteness. Messages name the bad value and what to pass instead.
pub fn validate(cfg: &NetConfig, req: &Request) -> Result<()> {
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

/// Decode a validated request with `plan` (see [`crate::plan::plan`]); returns `(B, 3, H, W)` in [-1, 1].
pub fn decode(
    net: &PidNet,
    req: &Request,
    plan: &Plan,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let cfg = net.config();
    validate(cfg, req)?;
    let (_, _, h, w) = req.latents.dims4()?;
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
    let t_list = sampler::t_ladder(req.steps)?;
    let dev = net.device().clone();
    let count = req.sigma.len();
    let mut images = Vec::with_capacity(count);
    let progress = std::cell::RefCell::new(progress);
    for b in 0..count {
        progress
            .borrow_mut()
            .report(Event::Image { index: b, count })?;
        let z = req.latents.narrow(0, b, 1)?.to_device(&dev)?;
        let y = req.captions.narrow(0, b, 1)?.to_device(&dev)?;
        let sigma = Tensor::new(&[req.sigma[b]], &dev)?;
        let seed = req.seeds[b];
        let noise = image_noise(seed, Stream::Initial, oh, ow, &dev)?;
        let eps = |k: usize| image_noise(seed, Stream::Renoise(k as u32), oh, ow, &dev);
        let mut observer = Steps(&progress);
        let image = if plan.is_whole() {
            let cond = net.condition(&y, &z, &sigma, (oh, ow), &mut Trace::disabled())?;
            sampler::run(
                &noise,
                &t_list,
                sampler::net_velocity(net, &cond),
                eps,
                &mut observer,
            )?
        } else {
            let velocity =
                |x: &Tensor, t: &Tensor| tiled_velocity(net, plan, &z, &y, &sigma, x, t, &progress);
            sampler::run(&noise, &t_list, velocity, eps, &mut observer)?
        };
        images.push(image);
    }
    Ok(Tensor::cat(&images, 0)?)
}

/// Forwards sampler steps to the caller's progress sink.
struct Steps<'a, 'p>(&'a std::cell::RefCell<&'p mut dyn Progress>);

impl StepObserver for Steps<'_, '_> {
    fn before_step(&mut self, e: StepEvent) -> Result<()> {
        self.0.borrow_mut().report(Event::Step {
            step: e.step,
            total: e.total,
        })
    }
}

/// The velocity of the whole image assembled from per-tile forwards, blended with a
/// feathered window. Each tile sees its aligned slice of the latent and is conditioned
/// as an image of its own size; its conditioning is rebuilt per step (cheap next to the
/// forward) so tiled decodes never hold every tile's LQ features at once.
#[allow(clippy::too_many_arguments)]
fn tiled_velocity(
    net: &PidNet,
    plan: &Plan,
    z: &Tensor,
    y: &Tensor,
    sigma: &Tensor,
    x: &Tensor,
    t: &Tensor,
    progress: &std::cell::RefCell<&mut dyn Progress>,
) -> Result<Tensor> {
    let f = net.config().pixels_per_latent();
    let dev = x.device();
    let (hh, ww) = (plan.height, plan.width);
    let mut acc = Tensor::zeros((1, 3, hh, ww), DType::F32, dev)?;
    let mut wsum = Tensor::zeros((1, 1, hh, ww), DType::F32, dev)?;
    for (i, tile) in plan.tiles.iter().enumerate() {
        progress.borrow_mut().report(Event::Tile {
            tile: i,
            tiles: plan.tiles.len(),
        })?;
        let Tile {
            y: ty,
            x: tx,
            h: th,
            w: tw,
        } = *tile;
        let zt = z.narrow(2, ty / f, th / f)?.narrow(3, tx / f, tw / f)?;
        let cond = net.condition(y, &zt, sigma, (th, tw), &mut Trace::disabled())?;
        let xt = x.narrow(2, ty, th)?.narrow(3, tx, tw)?;
        let v = net.velocity(&cond, &xt, t, &mut Trace::disabled())?;
        let fy = Tensor::new(feather(th, ty > 0, ty + th < hh), dev)?.reshape((1, 1, th, 1))?;
        let fx = Tensor::new(feather(tw, tx > 0, tx + tw < ww), dev)?.reshape((1, 1, 1, tw))?;
        let wt = fy.broadcast_mul(&fx)?;
        let ranges = |c: usize| [0..1, 0..c, ty..ty + th, tx..tx + tw];
        let region = acc.narrow(2, ty, th)?.narrow(3, tx, tw)?;
        acc = acc.slice_assign(
            &ranges(3),
            &(region + v.to_dtype(DType::F32)?.broadcast_mul(&wt)?)?,
        )?;
        let wregion = wsum.narrow(2, ty, th)?.narrow(3, tx, tw)?;
        wsum = wsum.slice_assign(&ranges(1), &(wregion + wt)?)?;
    }
    Ok(acc.broadcast_div(&wsum)?)
}
