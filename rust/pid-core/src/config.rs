//! Network configuration of a PiD student, and the exact tensor layout it implies.
//!
//! Field names are the upstream `PidNet` constructor arguments (nv-tlabs/PiD @2c8814c,
//! `pid/_src/configs/common/defaults/net.py:30-74`), so a golden file's `config`
//! metadata deserialises directly. Released checkpoints carry no config: it is
//! recovered from tensor names and shapes by [`NetConfig::from_tensor_shapes`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the LQ features are gated into the patch stream (pid_spec §4.4, §10.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateType {
    /// v1: `content_proj` maps to `hidden_size` channels, a gate per token and channel.
    SigmaAwarePerTokenPerDim,
    /// v1.5: `content_proj` maps to one scalar per token.
    SigmaAwarePerToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingMode {
    Zeros,
    Replicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeMode {
    /// Per-axis NTK-scaled theta relative to `rope_ref_h/w` (every released student).
    NtkAware,
    Original,
}

fn default_in_channels() -> usize {
    3
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}
fn default_controlnet() -> String {
    "controlnet".into()
}
fn default_ntk() -> RopeMode {
    RopeMode::NtkAware
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    pub hidden_size: usize,
    pub num_groups: usize,
    pub pixel_hidden_size: usize,
    pub pixel_attn_hidden_size: usize,
    pub pixel_num_groups: usize,
    pub patch_depth: usize,
    pub pixel_depth: usize,
    pub patch_size: usize,
    pub txt_embed_dim: usize,
    pub txt_max_length: usize,
    #[serde(default = "default_theta")]
    pub text_rope_theta: f64,
    #[serde(default = "default_true")]
    pub use_text_rope: bool,
    #[serde(default = "default_ntk")]
    pub rope_mode: RopeMode,
    pub rope_ref_h: usize,
    pub rope_ref_w: usize,
    #[serde(default = "default_controlnet")]
    pub lq_inject_mode: String,
    #[serde(default)]
    pub lq_in_channels: usize,
    pub lq_latent_channels: usize,
    pub lq_hidden_dim: usize,
    pub lq_num_res_blocks: usize,
    pub lq_interval: usize,
    pub lq_gate_type: GateType,
    pub lq_conv_padding_mode: PaddingMode,
    pub lq_latent_unpatchify_factor: usize,
    pub latent_spatial_down_factor: usize,
    pub sr_scale: usize,
    pub pit_lq_inject: bool,
    #[serde(default)]
    pub lq_aux_rgb_head: bool,
}

/// What the checkpoint cannot tell us about the latent it expects: the latent space's
/// channel count and spatial factor (flux2 packs 32 channels x 2x2 into 128 at /16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentHint {
    pub channels: usize,
    pub spatial_down_factor: usize,
}

/// Training-only tensors that released files may carry and inference never reads.
pub const IGNORED_PREFIXES: &[&str] = &["lq_proj.lq_aux_rgb_head."];

impl NetConfig {
    /// The released SDXL `2kto4k` student (pid_spec §1.1).
    pub fn sdxl_2kto4k() -> Self {
        Self {
            in_channels: 3,
            hidden_size: 1536,
            num_groups: 24,
            pixel_hidden_size: 16,
            pixel_attn_hidden_size: 1152,
            pixel_num_groups: 16,
            patch_depth: 14,
            pixel_depth: 2,
            patch_size: 16,
            txt_embed_dim: 2304,
            txt_max_length: 300,
            text_rope_theta: 10_000.0,
            use_text_rope: true,
            rope_mode: RopeMode::NtkAware,
            rope_ref_h: 1024,
            rope_ref_w: 1024,
            lq_inject_mode: "controlnet".into(),
            lq_in_channels: 0,
            lq_latent_channels: 4,
            lq_hidden_dim: 512,
            lq_num_res_blocks: 4,
            lq_interval: 2,
            lq_gate_type: GateType::SigmaAwarePerTokenPerDim,
            lq_conv_padding_mode: PaddingMode::Zeros,
            lq_latent_unpatchify_factor: 1,
            latent_spatial_down_factor: 8,
            sr_scale: 4,
            pit_lq_inject: false,
            lq_aux_rgb_head: false,
        }
    }

    /// A released student's network: the v1 backbone (pid_spec §1.1) fed the latent of a space,
    /// or its v1.5 generation (pid_spec §10.2; upstream `PID_SR4X_V1PT5`, `net.py:63-83`), whose
    /// adapter is twice as wide. `unpatchify` is flux2 v1.5's 2x2 channel un-packing (1 elsewhere).
    pub fn released(latent: LatentHint, unpatchify: usize, v15: bool) -> Self {
        let base = Self {
            lq_latent_channels: latent.channels,
            latent_spatial_down_factor: latent.spatial_down_factor,
            lq_latent_unpatchify_factor: unpatchify,
            ..Self::sdxl_2kto4k()
        };
        if v15 {
            Self {
                lq_hidden_dim: 1024,
                ..base.v15()
            }
        } else {
            base
        }
    }

    /// The v1.5 changes to the forward pass: per-token scalar gates, replicate-padded adapter
    /// convs, NTK reference 2048 and the PiT injection (pid_spec §10.2).
    fn v15(self) -> Self {
        Self {
            lq_gate_type: GateType::SigmaAwarePerToken,
            lq_conv_padding_mode: PaddingMode::Replicate,
            rope_ref_h: 2048,
            rope_ref_w: 2048,
            pit_lq_inject: true,
            ..self
        }
    }

    /// This network shrunk for tests, synthetic bundles and test mirrors: the backbone of the
    /// `pidnet_*_mini` goldens and an adapter 16 times narrower, every layout rule kept.
    pub fn shrunk(self) -> Self {
        Self {
            hidden_size: 128,
            num_groups: 2,
            pixel_attn_hidden_size: 144,
            pixel_num_groups: 2,
            patch_depth: 4,
            txt_embed_dim: 64,
            lq_hidden_dim: self.lq_hidden_dim / 16,
            lq_num_res_blocks: 2,
            ..self
        }
    }

    /// The SDXL student shrunk: the topology of the `pidnet_sdxl_mini` golden.
    pub fn sdxl_mini() -> Self {
        Self::sdxl_2kto4k().shrunk()
    }

    /// A named preset: `sdxl-2kto4k` (the released student) or `sdxl-mini`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "sdxl-2kto4k" => Ok(Self::sdxl_2kto4k()),
            "sdxl-mini" => Ok(Self::sdxl_mini()),
            other => Err(Error::input(
                "preset",
                format!("unknown network preset {other:?}; use \"sdxl-2kto4k\" or \"sdxl-mini\""),
            )),
        }
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json)
            .map_err(|e| Error::input("config", format!("invalid network config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("NetConfig always serialises")
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_groups
    }

    pub fn pixel_head_dim(&self) -> usize {
        self.pixel_attn_hidden_size / self.pixel_num_groups
    }

    /// SwiGLU width of the patch blocks: int(2 * 4 * hidden / 3) (pid_spec §3.1).
    pub fn ffn_hidden(&self) -> usize {
        2 * 4 * self.hidden_size / 3
    }

    /// PiT MLP width (mlp_ratio 4).
    pub fn pixel_mlp_hidden(&self) -> usize {
        4 * self.pixel_hidden_size
    }

    pub fn num_lq_outputs(&self) -> usize {
        self.patch_depth.div_ceil(self.lq_interval)
    }

    /// Channels the first adapter conv sees after un-patchifying the latent.
    pub fn lq_conv_in_channels(&self) -> usize {
        self.lq_latent_channels
            / (self.lq_latent_unpatchify_factor * self.lq_latent_unpatchify_factor)
    }

    /// Output pixels per latent pixel (32 for every /8 space at 4x).
    pub fn pixels_per_latent(&self) -> usize {
        self.sr_scale * self.latent_spatial_down_factor
    }

    fn gate_out_dim(&self) -> usize {
        match self.lq_gate_type {
            GateType::SigmaAwarePerTokenPerDim => self.hidden_size,
            GateType::SigmaAwarePerToken => 1,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::input("config", m));
        if self.lq_inject_mode != "controlnet" {
            return bad(format!(
                "lq_inject_mode {:?} is not supported; released students use \"controlnet\"",
                self.lq_inject_mode
            ));
        }
        if self.lq_in_channels != 0 {
            return bad(format!(
                "lq_in_channels = {} (pixel-space LQ branch) is not supported; released students are latent-only",
                self.lq_in_channels
            ));
        }
        if self.num_groups == 0 || !self.hidden_size.is_multiple_of(self.num_groups) {
            return bad(format!(
                "hidden_size {} is not divisible by num_groups {}",
                self.hidden_size, self.num_groups
            ));
        }
        if self.pixel_num_groups == 0
            || !self
                .pixel_attn_hidden_size
                .is_multiple_of(self.pixel_num_groups)
        {
            return bad(format!(
                "pixel_attn_hidden_size {} is not divisible by pixel_num_groups {}",
                self.pixel_attn_hidden_size, self.pixel_num_groups
            ));
        }
        for (name, d) in [
            ("head", self.head_dim()),
            ("pixel head", self.pixel_head_dim()),
        ] {
            if d % 4 != 0 {
                return bad(format!(
                    "{name} dim {d} must be a multiple of 4 for 2-D RoPE"
                ));
            }
        }
        if self.lq_interval == 0 || self.patch_depth == 0 || self.patch_size == 0 {
            return bad("lq_interval, patch_depth and patch_size must be positive".into());
        }
        let f = self.lq_latent_unpatchify_factor;
        if f == 0 || !self.lq_latent_channels.is_multiple_of(f * f) {
            return bad(format!(
                "lq_latent_channels {} is not divisible by lq_latent_unpatchify_factor^2 = {}",
                self.lq_latent_channels,
                f * f
            ));
        }
        if !self.latent_spatial_down_factor.is_multiple_of(f) {
            return bad(format!(
                "latent_spatial_down_factor {} is not divisible by lq_latent_unpatchify_factor {f}",
                self.latent_spatial_down_factor
            ));
        }
        let ratio = self.sr_scale * self.latent_spatial_down_factor / f;
        if ratio < self.patch_size || !ratio.is_multiple_of(self.patch_size) {
            return bad(format!(
                "latent-to-patch ratio {ratio}/{} is not an integer >= 1; only upsampling adapters are supported",
                self.patch_size
            ));
        }
        Ok(())
    }

    /// Every tensor the network reads, with its shape, in upstream state-dict names
    /// (pid_spec §9; 456 for the SDXL student, 461 for v1.5).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden_size;
        let p2 = self.patch_size * self.patch_size;
        let pd = self.pixel_hidden_size;
        let ad = self.pixel_attn_hidden_size;
        let lh = self.lq_hidden_dim;
        let ffn = self.ffn_hidden();
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: &[usize]| v.push((name, shape.to_vec()));

        add("y_pos_embedding".into(), &[1, self.txt_max_length, d]);
        add("pixel_embedder.proj.weight".into(), &[pd, self.in_channels]);
        add("pixel_embedder.proj.bias".into(), &[pd]);
        add("s_embedder.proj.weight".into(), &[d, self.in_channels * p2]);
        add("s_embedder.proj.bias".into(), &[d]);
        add("t_embedder.mlp.0.weight".into(), &[d, 256]);
        add("t_embedder.mlp.0.bias".into(), &[d]);
        add("t_embedder.mlp.2.weight".into(), &[d, d]);
        add("t_embedder.mlp.2.bias".into(), &[d]);
        add("y_embedder.proj.weight".into(), &[d, self.txt_embed_dim]);
        add("y_embedder.proj.bias".into(), &[d]);
        add("y_embedder.norm.weight".into(), &[d]);
        add("final_layer.norm.weight".into(), &[pd]);
        add("final_layer.linear.weight".into(), &[self.in_channels, pd]);
        add("final_layer.linear.bias".into(), &[self.in_channels]);

        let hd = self.head_dim();
        for i in 0..self.patch_depth {
            let b = format!("patch_blocks.{i}");
            for n in ["norm_x1", "norm_y1", "norm_x2", "norm_y2"] {
                add(format!("{b}.{n}.weight"), &[d]);
            }
            add(format!("{b}.attn.qkv_x.weight"), &[3 * d, d]);
            add(format!("{b}.attn.qkv_y.weight"), &[3 * d, d]);
            for n in ["q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y"] {
                add(format!("{b}.attn.{n}.weight"), &[hd]);
            }
            for s in ["x", "y"] {
                add(format!("{b}.attn.proj_{s}.weight"), &[d, d]);
                add(format!("{b}.attn.proj_{s}.bias"), &[d]);
            }
            for s in ["x", "y"] {
                add(format!("{b}.mlp_{s}.w1.weight"), &[ffn, d]);
                add(format!("{b}.mlp_{s}.w3.weight"), &[ffn, d]);
                add(format!("{b}.mlp_{s}.w2.weight"), &[d, ffn]);
            }
            for s in ["img", "txt"] {
                add(format!("{b}.adaLN_modulation_{s}.0.weight"), &[6 * d, d]);
                add(format!("{b}.adaLN_modulation_{s}.0.bias"), &[6 * d]);
            }
        }

        let phd = self.pixel_head_dim();
        for j in 0..self.pixel_depth {
            let b = format!("pixel_blocks.{j}");
            add(format!("{b}.compress_to_attn.weight"), &[ad, p2 * pd]);
            add(format!("{b}.compress_to_attn.bias"), &[ad]);
            add(format!("{b}.expand_from_attn.weight"), &[p2 * pd, ad]);
            add(format!("{b}.expand_from_attn.bias"), &[p2 * pd]);
            add(format!("{b}.norm1.weight"), &[pd]);
            add(format!("{b}.norm2.weight"), &[pd]);
            add(format!("{b}.attn.qkv.weight"), &[3 * ad, ad]);
            add(format!("{b}.attn.q_norm.weight"), &[phd]);
            add(format!("{b}.attn.k_norm.weight"), &[phd]);
            add(format!("{b}.attn.proj.weight"), &[ad, ad]);
            add(format!("{b}.attn.proj.bias"), &[ad]);
            let mh = self.pixel_mlp_hidden();
            add(format!("{b}.mlp.fc1.weight"), &[mh, pd]);
            add(format!("{b}.mlp.fc1.bias"), &[mh]);
            add(format!("{b}.mlp.fc2.weight"), &[pd, mh]);
            add(format!("{b}.mlp.fc2.bias"), &[pd]);
            add(format!("{b}.adaLN_modulation.0.weight"), &[6 * pd * p2, d]);
            add(format!("{b}.adaLN_modulation.0.bias"), &[6 * pd * p2]);
        }

        add(
            "lq_proj.latent_proj.0.weight".into(),
            &[lh, self.lq_conv_in_channels(), 3, 3],
        );
        add("lq_proj.latent_proj.0.bias".into(), &[lh]);
        add("lq_proj.latent_proj.2.weight".into(), &[lh, lh, 3, 3]);
        add("lq_proj.latent_proj.2.bias".into(), &[lh]);
        for r in 0..self.lq_num_res_blocks {
            let b = format!("lq_proj.latent_proj.{}.block", r + 3);
            for (k, conv) in [(0, false), (2, true), (3, false), (5, true)] {
                if conv {
                    add(format!("{b}.{k}.weight"), &[lh, lh, 3, 3]);
                } else {
                    add(format!("{b}.{k}.weight"), &[lh]);
                }
                add(format!("{b}.{k}.bias"), &[lh]);
            }
        }
        for j in 0..self.num_lq_outputs() {
            add(format!("lq_proj.output_heads.{j}.weight"), &[d, lh]);
            add(format!("lq_proj.output_heads.{j}.bias"), &[d]);
        }
        let gate_out = self.gate_out_dim();
        let mut gates: Vec<String> = (0..self.num_lq_outputs())
            .map(|j| format!("lq_proj.gate_modules.{j}"))
            .collect();
        if self.pit_lq_inject {
            add("lq_proj.pit_head.weight".into(), &[d, lh]);
            add("lq_proj.pit_head.bias".into(), &[d]);
            gates.push("pit_lq_gate".into());
        }
        for g in gates {
            add(format!("{g}.content_proj.weight"), &[gate_out, 2 * d]);
            add(format!("{g}.content_proj.bias"), &[gate_out]);
            add(format!("{g}.log_alpha"), &[]);
        }
        v
    }

    /// Recover the configuration of a released student from its tensor shapes
    /// (names already stripped of any `net.` prefix).
    ///
    /// What shapes cannot say comes from the latent space (`hint`): flux2 feeds a
    /// 128-channel packed latent at /16 that the v1.5 adapter un-patchifies by 2.
    pub fn from_tensor_shapes(
        shapes: &BTreeMap<String, Vec<usize>>,
        hint: Option<LatentHint>,
    ) -> Result<Self> {
        let shape = |name: &str| -> Result<&Vec<usize>> {
            shapes.get(name).ok_or_else(|| {
                Error::input(
                    "missing_tensor",
                    format!("tensor `{name}` is missing, so this is not a PiD student checkpoint"),
                )
            })
        };
        let dim = |name: &str, axis: usize| -> Result<usize> {
            let s = shape(name)?;
            s.get(axis).copied().ok_or_else(|| {
                Error::input(
                    "tensor_shape",
                    format!("tensor `{name}` has shape {s:?}, expected rank > {axis}"),
                )
            })
        };
        let count_from = |prefix: &str, first: usize| -> usize {
            (first..)
                .take_while(|i| {
                    shapes
                        .keys()
                        .any(|k| k.starts_with(&format!("{prefix}.{i}.")))
                })
                .count()
        };
        let count = |prefix: &str| count_from(prefix, 0);

        let hidden_size = dim("s_embedder.proj.weight", 0)?;
        let in_channels = dim("pixel_embedder.proj.weight", 1)?;
        let patch_in = dim("s_embedder.proj.weight", 1)?;
        let patch_size = ((patch_in / in_channels.max(1)) as f64).sqrt().round() as usize;
        let head_dim = dim("patch_blocks.0.attn.q_norm_x.weight", 0)?;
        let pixel_attn_hidden_size = dim("pixel_blocks.0.compress_to_attn.weight", 0)?;
        let pixel_head_dim = dim("pixel_blocks.0.attn.q_norm.weight", 0)?;
        let lq_conv_in = dim("lq_proj.latent_proj.0.weight", 1)?;
        let patch_depth = count("patch_blocks");
        let num_lq_outputs = count("lq_proj.output_heads");
        if num_lq_outputs == 0 {
            return Err(Error::input(
                "missing_tensor",
                "tensor `lq_proj.output_heads.0.weight` is missing, so this is not a PiD student checkpoint",
            ));
        }
        // The smallest interval that yields this many heads (upstream: ceil(depth / interval)).
        let lq_interval = (1..=patch_depth)
            .find(|i| patch_depth.div_ceil(*i) == num_lq_outputs)
            .ok_or_else(|| {
                Error::input(
                    "inconsistent_checkpoint",
                    format!(
                        "{num_lq_outputs} LQ output heads cannot serve {patch_depth} patch blocks"
                    ),
                )
            })?;

        let gate_rows = dim("lq_proj.gate_modules.0.content_proj.weight", 0)?;
        let per_token_gate = gate_rows == 1;
        let pit_gate = shapes.contains_key("pit_lq_gate.content_proj.weight");
        if per_token_gate != pit_gate {
            return Err(Error::input(
                "inconsistent_checkpoint",
                format!(
                    "inconsistent v1.5 checkpoint signals: `lq_proj.gate_modules.0.content_proj.weight` has {gate_rows} rows \
                     (v1.5 has 1) but `pit_lq_gate.content_proj.weight` is {}",
                    if pit_gate { "present" } else { "absent" }
                ),
            ));
        }
        let v15 = per_token_gate;

        let (lq_latent_channels, latent_spatial_down_factor, unpatchify) = match hint {
            None => (lq_conv_in, 8, 1),
            Some(h) => {
                if h.channels % lq_conv_in != 0 {
                    return Err(Error::input(
                        "latent_channels",
                        format!(
                            "the latent space has {} channels but `lq_proj.latent_proj.0.weight` expects {lq_conv_in} \
                             input channels; this checkpoint belongs to another latent space",
                            h.channels
                        ),
                    ));
                }
                let f = ((h.channels / lq_conv_in) as f64).sqrt().round() as usize;
                if f * f * lq_conv_in != h.channels {
                    return Err(Error::input(
                        "latent_channels",
                        format!(
                            "latent channels {} / adapter input channels {lq_conv_in} is not a perfect square",
                            h.channels
                        ),
                    ));
                }
                (h.channels, h.spatial_down_factor, f)
            }
        };
        let cfg = Self {
            in_channels,
            hidden_size,
            num_groups: hidden_size / head_dim.max(1),
            pixel_hidden_size: dim("pixel_embedder.proj.weight", 0)?,
            pixel_attn_hidden_size,
            pixel_num_groups: pixel_attn_hidden_size / pixel_head_dim.max(1),
            patch_depth,
            pixel_depth: count("pixel_blocks"),
            patch_size,
            txt_embed_dim: dim("y_embedder.proj.weight", 1)?,
            txt_max_length: dim("y_pos_embedding", 1)?,
            text_rope_theta: 10_000.0,
            use_text_rope: true,
            rope_mode: RopeMode::NtkAware,
            rope_ref_h: 1024,
            rope_ref_w: 1024,
            lq_inject_mode: "controlnet".into(),
            lq_in_channels: 0,
            lq_latent_channels,
            lq_hidden_dim: dim("lq_proj.latent_proj.0.weight", 0)?,
            // latent_proj: conv 0, SiLU 1, conv 2, then the ResBlocks from index 3.
            lq_num_res_blocks: count_from("lq_proj.latent_proj", 3),
            lq_interval,
            lq_gate_type: GateType::SigmaAwarePerTokenPerDim,
            lq_conv_padding_mode: PaddingMode::Zeros,
            lq_latent_unpatchify_factor: unpatchify,
            latent_spatial_down_factor,
            sr_scale: 4,
            pit_lq_inject: false,
            lq_aux_rgb_head: shapes.keys().any(|k| k.starts_with(IGNORED_PREFIXES[0])),
        };
        let cfg = if v15 { cfg.v15() } else { cfg };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_layout_has_456_tensors_and_1_36b_parameters() {
        let cfg = NetConfig::sdxl_2kto4k();
        let t = cfg.expected_tensors();
        assert_eq!(t.len(), 456);
        let params: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 1_362_292_874);
    }

    #[test]
    fn released_students_detect_as_themselves() {
        let spaces = [
            (4, 8, 1, false),
            (16, 8, 1, false),
            (128, 16, 1, false),
            (16, 8, 1, true),
            (128, 16, 2, true),
        ];
        for (channels, down, unpatchify, v15) in spaces {
            let hint = LatentHint {
                channels,
                spatial_down_factor: down,
            };
            let cfg = NetConfig::released(hint, unpatchify, v15);
            cfg.validate().unwrap();
            let tensors = cfg.expected_tensors();
            assert_eq!(tensors.len(), if v15 { 461 } else { 456 });
            let shapes = tensors.into_iter().collect();
            assert_eq!(
                NetConfig::from_tensor_shapes(&shapes, Some(hint)).unwrap(),
                cfg
            );
        }
        assert_eq!(
            NetConfig::released(
                LatentHint {
                    channels: 4,
                    spatial_down_factor: 8
                },
                1,
                false
            ),
            NetConfig::sdxl_2kto4k()
        );
    }

    #[test]
    fn detection_round_trips_v1_and_v15() {
        let v1 = NetConfig::sdxl_2kto4k();
        let mut v15 = v1.clone();
        v15.lq_gate_type = GateType::SigmaAwarePerToken;
        v15.pit_lq_inject = true;
        v15.lq_conv_padding_mode = PaddingMode::Replicate;
        v15.rope_ref_h = 2048;
        v15.rope_ref_w = 2048;
        v15.lq_hidden_dim = 1024;
        v15.lq_latent_channels = 128;
        v15.lq_latent_unpatchify_factor = 2;
        v15.latent_spatial_down_factor = 16;
        assert_eq!(v15.expected_tensors().len(), 461);
        for (cfg, hint) in [
            (v1, None),
            (
                v15,
                Some(LatentHint {
                    channels: 128,
                    spatial_down_factor: 16,
                }),
            ),
        ] {
            let shapes = cfg.expected_tensors().into_iter().collect();
            assert_eq!(NetConfig::from_tensor_shapes(&shapes, hint).unwrap(), cfg);
        }
    }
}
