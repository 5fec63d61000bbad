//! Sigma-aware LQ adapter, `lq_proj` (pid_spec §4, §10.2; upstream `LQProjection2D`,
//! `networks/lq_projection_2d.py`).
//!
//! The latent is (un-patchified for flux2 v1.5 and) nearest-resized to the patch grid,
//! run through a conv trunk, and projected by one linear head per injection point.
//! The features depend only on the latent, so callers compute them once per decode.

use std::ops::Range;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::Linear;
use crate::config::{NetConfig, PaddingMode};
use crate::kernels::cast_param;
use crate::plan::Tile;

/// 3x3 convolution, stride 1, padding 1 with zero or replicate padding, on operands rounded
/// to `dtype`; f32 result.
#[derive(Debug, Clone)]
struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
    padding: PaddingMode,
    dtype: DType,
}

impl Conv3x3 {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        padding: PaddingMode,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, 3, 3), "weight")?,
            bias: vb.get(cout, "bias")?,
            padding,
            dtype,
        })
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The operands rounded to the compute dtype, convolved in f32 like `kernels::linear`
        // (the trunk runs once per conditioning, so f32 costs little).
        let x = x.to_dtype(self.dtype)?.to_dtype(DType::F32)?;
        let w = cast_param(&cast_param(&self.weight, self.dtype)?, DType::F32)?;
        let y = match self.padding {
            PaddingMode::Zeros => x.conv2d(&w, 1, 1, 1, 1)?,
            PaddingMode::Replicate => x
                .pad_with_same(2, 1, 1)?
                .pad_with_same(3, 1, 1)?
                .conv2d(&w, 0, 1, 1, 1)?,
        };
        let bias = cast_param(&self.bias, DType::F32)?.reshape((1, (), 1, 1))?;
        y.broadcast_add(&bias)
    }
}

/// `nn.GroupNorm(groups, C, eps=1e-5)` on `(B, C, H, W)`, in f32 (autocast's fp32 list).
#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    const EPS: f64 = 1e-5;

    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, (c / self.groups) * h * w))?;
        let g = g.broadcast_sub(&g.mean_keepdim(2)?)?;
        let var = g.sqr()?.mean_keepdim(2)?;
        let g = g
            .broadcast_div(&(var + Self::EPS)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        let shape = (1, c, 1, 1);
        g.broadcast_mul(&cast_param(&self.weight, DType::F32)?.reshape(shape)?)?
            .broadcast_add(&cast_param(&self.bias, DType::F32)?.reshape(shape)?)
    }
}

/// Pre-activation residual block: x + Conv(SiLU(GN(Conv(SiLU(GN(x)))))), keys `block.{0,2,3,5}`.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
}

impl ResBlock {
    const GROUPS: usize = 4;

    fn new(vb: VarBuilder, ch: usize, padding: PaddingMode, dtype: DType) -> Result<Self> {
        let vb = vb.pp("block");
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("0"), ch, Self::GROUPS)?,
            conv1: Conv3x3::new(vb.pp("2"), ch, ch, padding, dtype)?,
            norm2: GroupNorm::new(vb.pp("3"), ch, Self::GROUPS)?,
            conv2: Conv3x3::new(vb.pp("5"), ch, ch, padding, dtype)?,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        x + h
    }
}

/// `SigmaAwarePerToken[AndDim]Gate`: s + sigmoid(W [s; F] + b - exp(log_alpha) * sigma) * F.
#[derive(Debug, Clone)]
pub struct SigmaGate {
    content_proj: Linear,
    log_alpha: Tensor,
}

impl SigmaGate {
    pub fn new(vb: VarBuilder, dim: usize, out: usize, dtype: DType) -> Result<Self> {
        Ok(Self {
            content_proj: Linear::new(vb.pp("content_proj"), 2 * dim, out, true, dtype)?,
            log_alpha: vb.get((), "log_alpha")?,
        })
    }

    /// `s, f (B, L, D)`, `sigma (B,)` in f32; returns f32.
    pub fn forward(&self, s: &Tensor, f: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        // The projection rounds [s; f] to its dtype anyway: concatenate them there.
        let dt = self.content_proj.dtype();
        let sf = Tensor::cat(&[s.to_dtype(dt)?, f.to_dtype(dt)?], 2)?;
        let logit = self.content_proj.forward(&sf)?;
        let offset = sigma.broadcast_mul(&self.log_alpha.to_dtype(DType::F32)?.exp()?)?;
        crate::kernels::sigma_gate(s, f, &logit, &offset)
    }
}

/// Adapter outputs for one latent: one feature per gate, plus the PiT feature for v1.5.
#[derive(Debug, Clone)]
pub struct LqFeatures {
    pub heads: Vec<Tensor>, // each (B, L, D)
    pub pit: Option<Tensor>,
}

impl LqFeatures {
    /// The features of the `rows x cols` window of their `(hs, ws)` patch grid.
    fn window(
        &self,
        (hs, ws): (usize, usize),
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Self> {
        let crop = |f: &Tensor| -> Result<Tensor> {
            if (rows.len(), cols.len()) == (hs, ws) {
                return Ok(f.clone());
            }
            let (b, _, d) = f.dims3()?;
            f.reshape((b, hs, ws, d))?
                .narrow(1, rows.start, rows.len())?
                .narrow(2, cols.start, cols.len())?
                .contiguous()?
                .reshape((b, rows.len() * cols.len(), d))
        };
        Ok(Self {
            heads: self.heads.iter().map(crop).collect::<Result<_>>()?,
            pit: self.pit.as_ref().map(crop).transpose()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LqProj {
    latent_proj_0: Conv3x3,
    latent_proj_2: Conv3x3,
    res_blocks: Vec<ResBlock>,
    output_heads: Vec<Linear>,
    pit_head: Option<Linear>,
    gate_modules: Vec<SigmaGate>,
    interval: usize,
    unpatchify: usize,
    latent_channels: usize,
}

impl LqProj {
    pub fn new(vb: VarBuilder, cfg: &NetConfig, dtype: DType) -> Result<Self> {
        let (d, lh, pad) = (cfg.hidden_size, cfg.lq_hidden_dim, cfg.lq_conv_padding_mode);
        let trunk = vb.pp("latent_proj");
        let gate_out = match cfg.lq_gate_type {
            crate::config::GateType::SigmaAwarePerTokenPerDim => d,
            crate::config::GateType::SigmaAwarePerToken => 1,
        };
        let n = cfg.num_lq_outputs();
        Ok(Self {
            latent_proj_0: Conv3x3::new(trunk.pp("0"), cfg.lq_conv_in_channels(), lh, pad, dtype)?,
            latent_proj_2: Conv3x3::new(trunk.pp("2"), lh, lh, pad, dtype)?,
            res_blocks: (0..cfg.lq_num_res_blocks)
                .map(|r| ResBlock::new(trunk.pp(r + 3), lh, pad, dtype))
                .collect::<Result<_>>()?,
            output_heads: (0..n)
                .map(|j| Linear::new(vb.pp(format!("output_heads.{j}")), lh, d, true, dtype))
                .collect::<Result<_>>()?,
            pit_head: if cfg.pit_lq_inject {
                Some(Linear::new(vb.pp("pit_head"), lh, d, true, dtype)?)
            } else {
                None
            },
            gate_modules: (0..n)
                .map(|j| SigmaGate::new(vb.pp(format!("gate_modules.{j}")), d, gate_out, dtype))
                .collect::<Result<_>>()?,
            interval: cfg.lq_interval,
            unpatchify: cfg.lq_latent_unpatchify_factor,
            latent_channels: cfg.lq_latent_channels,
        })
    }

    /// Gate index applied before patch block `i`, if any (every `interval`-th block).
    pub fn gate_for_block(&self, i: usize) -> Option<usize> {
        i.is_multiple_of(self.interval)
            .then_some(i / self.interval)
            .filter(|j| *j < self.gate_modules.len())
    }

    pub fn gate(&self, j: usize, s: &Tensor, f: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        self.gate_modules[j].forward(s, f, sigma)
    }

    /// The features of the window `window` (in output pixels) of an `(h, w)` output whose
    /// latent is `z (B, C, zh, zw)`, `f` output pixels per latent pixel and `p` per patch.
    ///
    /// The whole image takes any latent (nearest-resized to the patch grid, as upstream); a
    /// tile needs the image's own latent (`zh f = h`) and is computed on the tile's latent and
    /// a halo as wide as the trunk's receptive field, so that only the GroupNorm statistics
    /// tell its features from the whole image's.
    pub fn window_features(
        &self,
        z: &Tensor,
        (h, w): (usize, usize),
        window: &Tile,
        f: usize,
        p: usize,
    ) -> Result<LqFeatures> {
        if *window == Tile::whole(h, w) {
            return self.features(z, h / p, w / p);
        }
        let (_, _, zh, zw) = z.dims4()?;
        if (zh * f, zw * f) != (h, w) {
            candle_core::bail!(
                "a tile of a {w}x{h} output needs its {}x{} latent, got {zw}x{zh}",
                w / f,
                h / f
            )
        }
        let cells = f / p; // patch cells per latent pixel
                           // Each 3x3 convolution of the trunk reaches one patch cell further.
        let reach = 2 + 2 * self.res_blocks.len();
        let (crop, (oy, ox)) = window.latent_crop(f, reach.div_ceil(cells), (zh, zw));
        let zc = z.narrow(2, crop.y, crop.h)?.narrow(3, crop.x, crop.w)?;
        let grid = (crop.h * cells, crop.w * cells);
        let (r0, c0) = (oy * cells, ox * cells);
        self.features(&zc, grid.0, grid.1)?.window(
            grid,
            r0..r0 + window.h / p,
            c0..c0 + window.w / p,
        )
    }

    /// `z (B, C, h, w)` -> features on the `hs x ws` patch grid.
    fn features(&self, z: &Tensor, hs: usize, ws: usize) -> Result<LqFeatures> {
        let (b, c, h, w) = z.dims4()?;
        if c != self.latent_channels {
            candle_core::bail!(
                "lq latent has {c} channels, the adapter expects {}",
                self.latent_channels
            )
        }
        let f = self.unpatchify;
        // Channel c*f*f + i*f + j moves to spatial offset (i, j) at f-times the resolution.
        let z = if f > 1 {
            z.reshape((b, c / (f * f), f, f, h, w))?
                .permute((0, 1, 4, 2, 5, 3))?
                .contiguous()?
                .reshape((b, c / (f * f), h * f, w * f))?
        } else {
            z.clone()
        };
        let z = if z.dims()[2..] == [hs, ws] {
            z
        } else {
            z.upsample_nearest2d(hs, ws)?
        };
        let mut t = self
            .latent_proj_2
            .forward(&self.latent_proj_0.forward(&z)?.silu()?)?;
        for r in &self.res_blocks {
            t = r.forward(&t)?;
        }
        let lh = t.dim(1)?;
        let tokens = t.reshape((b, lh, hs * ws))?.transpose(1, 2)?.contiguous()?; // (B, L, lh)
        Ok(LqFeatures {
            heads: self
                .output_heads
                .iter()
                .map(|h| h.forward(&tokens))
                .collect::<Result<_>>()?,
            pit: self
                .pit_head
                .as_ref()
                .map(|h| h.forward(&tokens))
                .transpose()?,
        })
    }
}
