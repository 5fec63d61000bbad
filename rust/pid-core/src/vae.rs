//! SDXL VAE (diffusers `AutoencoderKL` with Down/UpDecoder blocks, pid_spec §2.2): image
//! `(B, 3, H, W)` in [-1, 1] -> posterior mean x scaling_factor `(B, 4, H/8, W/8)`, and back.
//!
//! PiD never calls the VAE itself: it turns an image into the latent PiD decodes (the
//! posterior *mean*, scaled by 0.13025 for SDXL) and gives the plain VAE decode PiD is
//! compared with. Tensor names are diffusers' (`encoder.down_blocks.0.resnets.1.conv2.weight`).
//!
//! The model is assembled from candle-transformers' stable-diffusion blocks
//! (`DownEncoderBlock2D`, `UNetMidBlock2D`, `UpDecoderBlock2D`), wired as its `AutoEncoderKL`
//! wires them. `AutoEncoderKL` itself cannot give the mean: in candle-transformers 0.11 its
//! posterior keeps `mean` private and offers only `sample()` (huggingface/candle#3841 restores
//! `mode()`); once released, the encoder half here can become `AutoEncoderKL::encode(..).mode()`.
//!
//! Memory: the mid-block attention materialises `(h*w)^2` scores at the latent resolution
//! (1 GB for a 128x128 latent), as candle's block does.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
    UpDecoderBlock2D, UpDecoderBlock2DConfig,
};
use serde::Deserialize;

use crate::weights::{read_metadata, TensorSet};
use crate::{Error, Result};

/// diffusers' VAE blocks use this eps in every GroupNorm.
const EPS: f64 = 1e-6;

/// The `config.json` fields of an `AutoencoderKL` (diffusers names and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn sd_scaling_factor() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Parse and check a diffusers `config.json`; `source` names it in errors.
    pub fn from_json(json: &str, source: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|e| {
            Error::weights(
                source,
                "vae_config",
                format!("not an AutoencoderKL config.json ({e})"),
            )
        })?;
        cfg.check()
            .map_err(|m| Error::weights(source, "vae_config", m))?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| !c.is_multiple_of(self.norm_num_groups))
        {
            return Err(format!(
                "block_out_channels {:?} must be non-empty multiples of norm_num_groups {}",
                self.block_out_channels, self.norm_num_groups
            ));
        }
        let blocks_ok = |types: &[String], want: &str| {
            types.is_empty() || (types.len() == n && types.iter().all(|t| t == want))
        };
        if !blocks_ok(&self.down_block_types, "DownEncoderBlock2D")
            || !blocks_ok(&self.up_block_types, "UpDecoderBlock2D")
        {
            return Err(format!(
                "unsupported block types {:?} / {:?}; only SDXL-style VAEs ({n} DownEncoderBlock2D / UpDecoderBlock2D) are",
                self.down_block_types, self.up_block_types
            ));
        }
        if self.act_fn.as_deref().is_some_and(|a| a != "silu") || !self.mid_block_add_attention {
            return Err("only SDXL-style VAEs (silu, mid-block attention) are supported".into());
        }
        Ok(())
    }

    /// Image pixels per latent pixel along each axis.
    pub fn down_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Every tensor the model reads, `[(name, shape)]`, in diffusers names and forward order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let ch = &self.block_out_channels;
        let (first, last, lat) = (ch[0], ch[ch.len() - 1], self.latent_channels);
        let mut l = Layout(Vec::new());
        l.conv("encoder.conv_in", first, self.in_channels, 3);
        let mut cin = first;
        for (i, &cout) in ch.iter().enumerate() {
            for j in 0..self.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                l.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), c, cout);
            }
            if i + 1 < ch.len() {
                l.conv(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                );
            }
            cin = cout;
        }
        l.mid_block("encoder.mid_block", last);
        l.norm("encoder.conv_norm_out", last);
        l.conv("encoder.conv_out", 2 * lat, last, 3);
        if self.use_quant_conv {
            l.conv("quant_conv", 2 * lat, 2 * lat, 1);
        }
        if self.use_post_quant_conv {
            l.conv("post_quant_conv", lat, lat, 1);
        }
        l.conv("decoder.conv_in", last, lat, 3);
        l.mid_block("decoder.mid_block", last);
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            for j in 0..=self.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                l.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), c, cout);
            }
            if i + 1 < ch.len() {
                l.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                );
            }
            cin = cout;
        }
        l.norm("decoder.conv_norm_out", first);
        l.conv("decoder.conv_out", self.out_channels, first, 3);
        l.0
    }
}

/// Builds the tensor list of [`VaeConfig::expected_tensors`], one diffusers module at a time.
struct Layout(Vec<(String, Vec<usize>)>);

impl Layout {
    fn param(&mut self, name: &str, leaf: &str, shape: &[usize]) {
        self.0.push((format!("{name}.{leaf}"), shape.to_vec()));
    }

    fn conv(&mut self, name: &str, cout: usize, cin: usize, k: usize) {
        self.param(name, "weight", &[cout, cin, k, k]);
        self.param(name, "bias", &[cout]);
    }

    fn norm(&mut self, name: &str, c: usize) {
        self.param(name, "weight", &[c]);
        self.param(name, "bias", &[c]);
    }

    /// `ResnetBlock2D`: a 1x1 `conv_shortcut` only when the width changes.
    fn resnet(&mut self, name: &str, cin: usize, cout: usize) {
        self.norm(&format!("{name}.norm1"), cin);
        self.conv(&format!("{name}.conv1"), cout, cin, 3);
        self.norm(&format!("{name}.norm2"), cout);
        self.conv(&format!("{name}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{name}.conv_shortcut"), cout, cin, 1);
        }
    }

    /// `UNetMidBlock2D`: resnet, single-head self-attention, resnet.
    fn mid_block(&mut self, name: &str, c: usize) {
        self.resnet(&format!("{name}.resnets.0"), c, c);
        let attn = format!("{name}.attentions.0");
        self.norm(&format!("{attn}.group_norm"), c);
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.param(&format!("{attn}.{proj}"), "weight", &[c, c]);
            self.param(&format!("{attn}.{proj}"), "bias", &[c]);
        }
        self.resnet(&format!("{name}.resnets.1"), c, c);
    }
}

/// `encoder`: conv_in, down blocks, mid block, norm, SiLU, conv_out -> posterior moments.
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = ch[ch.len() - 1];
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let block_cfg = DownEncoderBlock2DConfig {
                num_layers: cfg.layers_per_block,
                resnet_eps: EPS,
                resnet_groups: cfg.norm_num_groups,
                add_downsample: i + 1 < ch.len(),
                // diffusers pads (0, 1, 0, 1) before the stride-2 conv.
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(
                vb.pp(format!("down_blocks.{i}")),
                cin,
                cout,
                block_cfg,
            )?);
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, ch[0])?,
            down_blocks,
            mid_block: mid_block(cfg, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(cfg, last, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x, None)?;
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// `decoder`: conv_in, mid block, up blocks (widths reversed), norm, SiLU, conv_out -> image.
struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = ch[ch.len() - 1];
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let block_cfg = UpDecoderBlock2DConfig {
                num_layers: cfg.layers_per_block + 1,
                resnet_eps: EPS,
                resnet_groups: cfg.norm_num_groups,
                add_upsample: i + 1 < ch.len(),
                ..Default::default()
            };
            up_blocks.push(UpDecoderBlock2D::new(
                vb.pp(format!("up_blocks.{i}")),
                cin,
                cout,
                block_cfg,
            )?);
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.latent_channels, last)?,
            mid_block: mid_block(cfg, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: group_norm(cfg, ch[0], vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), ch[0], cfg.out_channels)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?, None)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.conv_norm_out.forward(&x)?)?)
    }
}

fn conv3x3(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, 3, cfg, vb)
}

fn conv1x1(vb: VarBuilder, c: usize) -> candle_core::Result<Conv2d> {
    candle_nn::conv2d(c, c, 1, Conv2dConfig::default(), vb)
}

fn group_norm(cfg: &VaeConfig, c: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    candle_nn::group_norm(cfg.norm_num_groups, c, EPS, vb)
}

fn mid_block(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<UNetMidBlock2D> {
    let last = cfg.block_out_channels[cfg.block_out_channels.len() - 1];
    let mid_cfg = UNetMidBlock2DConfig {
        resnet_eps: EPS,
        resnet_groups: Some(cfg.norm_num_groups),
        // One attention head spanning every channel.
        attn_num_head_channels: None,
        ..Default::default()
    };
    UNetMidBlock2D::new(vb, last, None, mid_cfg)
}

/// The SDXL VAE, weights in f32 (candle's CPU convolution has no bf16).
pub struct Vae {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    cfg: VaeConfig,
    device: Device,
}

impl Vae {
    /// Open a diffusers VAE directory (`config.json` + `diffusion_pytorch_model.safetensors`)
    /// or a golden file of kind `sdxl_vae` (config in the metadata, tensors `weights.*`).
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let (cfg, tensors) = if path.is_dir() {
            let config_path = path.join("config.json");
            let json =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let cfg = VaeConfig::from_json(&json, &config_path)?;
            let file = path.join("diffusion_pytorch_model.safetensors");
            if !file.is_file() {
                return Err(Error::MissingFile {
                    path: file,
                    hint: "a diffusers VAE directory holds config.json and diffusion_pytorch_model.safetensors".into(),
                });
            }
            (cfg, TensorSet::open(path, &[file], &[])?)
        } else {
            let meta = read_metadata(path)?;
            let (Some("sdxl_vae"), Some(json)) =
                (meta.get("kind").map(String::as_str), meta.get("config"))
            else {
                return Err(Error::weights(
                    path,
                    "not_vae",
                    "expected a diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors) \
                     or a golden file of kind sdxl_vae",
                ));
            };
            let cfg = VaeConfig::from_json(json, path)?;
            (
                cfg,
                TensorSet::open(path, &[path.to_path_buf()], &["weights."])?,
            )
        };
        tensors.check(
            &cfg.expected_tensors(),
            "the VAE its config describes",
            |_| false,
        )?;
        Ok(Self::new(&cfg, tensors.var_builder(DType::F32, device)?)?)
    }

    /// Build from a VarBuilder over diffusers names.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let moments = 2 * cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv1x1(vb.pp("quant_conv"), moments))
                .transpose()?,
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv1x1(vb.pp("post_quant_conv"), cfg.latent_channels))
                .transpose()?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The latent PiD decodes: `(mean - shift) * scaling_factor` of the posterior of `image`.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let mean = self.encode_mean(image)?;
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        Ok(((mean - shift)? * self.cfg.scaling_factor)?)
    }

    /// The posterior mean `(B, latent, H/f, W/f)` of `image (B, 3, H, W)` in [-1, 1], unscaled.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let f = self.cfg.down_factor();
        let ok = match image.dims() {
            &[b, c, h, w] => {
                b > 0
                    && c == self.cfg.in_channels
                    && h > 0
                    && w > 0
                    && h.is_multiple_of(f)
                    && w.is_multiple_of(f)
            }
            _ => false,
        };
        if !ok {
            return Err(Error::input(
                "image_shape",
                format!(
                    "the VAE encodes images (B, {}, H, W) with H and W positive multiples of {f}; got {:?}",
                    self.cfg.in_channels,
                    image.dims()
                ),
            ));
        }
        let image = image.to_device(&self.device)?.to_dtype(DType::F32)?;
        let moments = self.encoder.forward(&image)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&moments)?,
            None => moments,
        };
        // Moments are [mean, logvar] along channels; the mean is the deterministic latent.
        Ok(moments.narrow(1, 0, self.cfg.latent_channels)?)
    }

    /// The image `(B, 3, H, W)` (about [-1, 1], unclamped) of a latent scaled as [`Vae::encode`] returns.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        self.decode_raw(&((latent / self.cfg.scaling_factor)? + shift)?)
    }

    /// The image of an unscaled latent `(B, latent, h, w)`.
    pub fn decode_raw(&self, latent: &Tensor) -> Result<Tensor> {
        let ok = matches!(latent.dims(), &[b, c, h, w] if b > 0 && c == self.cfg.latent_channels && h > 0 && w > 0);
        if !ok {
            return Err(Error::input(
                "latent_shape",
                format!(
                    "the VAE decodes latents (B, {}, h, w); got {:?}",
                    self.cfg.latent_channels,
                    latent.dims()
                ),
            ));
        }
        let z = latent.to_device(&self.device)?.to_dtype(DType::F32)?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        Ok(self.decoder.forward(&z)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_layout_has_the_diffusers_tensor_count() {
        let cfg = VaeConfig::from_json(
            r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                "scaling_factor": 0.13025}"#,
            Path::new("config.json"),
        )
        .expect("config");
        // diffusers' SDXL AutoencoderKL state_dict has 248 tensors.
        assert_eq!(cfg.expected_tensors().len(), 248);
        assert_eq!(cfg.down_factor(), 8);
    }
}
