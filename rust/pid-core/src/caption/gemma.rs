//! Gemma-2 decoder stack, the caption encoder's text model (pid_spec §5.1).
//!
//! The bare `Gemma2Model` of Hugging Face transformers 4.57.1 (`models/gemma2/modeling_gemma2.py`,
//! no LM head): token embeddings times sqrt(hidden), then per layer a norm sandwich
//! (pre and post RMSNorm, `(1 + w)` convention) around grouped-query attention with
//! rotate-half RoPE and around a GeGLU-tanh MLP, then a final RMSNorm.
//!
//! Input: token ids and attention mask `(B, L)`, right padded. Output: the last hidden
//! state `(B, L, hidden)` f32, pad positions included: PiD conditions on them (pid_spec §5.4).
//!
//! Sliding layers see at most `sliding_window` keys back (4096 in gemma-2-2b: inert for
//! PiD's prompts of a few hundred tokens, kept for fidelity). The attention-logit softcap is
//! a per-call switch, off for PiD: the reference's SDPA attention ignores it (pid_spec §5.7).
//!
//! candle-transformers has a gemma2 model, but it has neither a key-padding mask nor a
//! hidden-state output, so this is written here. Weights stay in bf16 (the dtype the
//! reference runs Gemma in) and are upcast per layer; all arithmetic is f32.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::kernels::AttentionBudget;
use crate::net::Linear;
use crate::weights::{read_metadata, shard_files, TensorSet};
use crate::{Error, Result};

/// The `config.json` fields the text model uses (HF `Gemma2Config` names and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GemmaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// `null` in the JSON disables it; absent means HF's default 50.
    #[serde(default = "default_softcapping")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per-layer attention kind; HF's default when absent: even layers (0-based) slide.
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// The older name of `hidden_activation`.
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_softcapping() -> Option<f64> {
    Some(50.0)
}

impl GemmaConfig {
    /// Parse and check a `config.json`; `source` names it in errors.
    pub fn from_json(json: &str, source: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|e| {
            Error::weights(
                source,
                "gemma_config",
                format!("not a Gemma-2 config.json ({e}); provision gemma-2-2b-it again"),
            )
        })?;
        cfg.check()
            .map_err(|m| Error::weights(source, "gemma_config", m))?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "gemma2") {
            return Err(format!(
                "model_type is {t:?}; the caption encoder needs a gemma2 model"
            ));
        }
        let act = self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref());
        if act.is_some_and(|a| a != "gelu_pytorch_tanh") {
            return Err(format!(
                "hidden activation {act:?} is not supported; Gemma-2 uses \"gelu_pytorch_tanh\""
            ));
        }
        let (hq, hkv) = (self.num_attention_heads, self.num_key_value_heads);
        if hq == 0 || hkv == 0 || !hq.is_multiple_of(hkv) {
            return Err(format!(
                "{hq} attention heads cannot share {hkv} key/value heads evenly"
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types lists {} layers, num_hidden_layers is {}",
                    t.len(),
                    self.num_hidden_layers
                ));
            }
        }
        Ok(())
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_token_id.unwrap_or(2)
    }

    /// The key window of layer `i`, `None` for full attention.
    pub fn window(&self, i: usize) -> Option<usize> {
        let sliding = match &self.layer_types {
            Some(t) => t[i] == LayerType::SlidingAttention,
            None => i.is_multiple_of(2),
        };
        self.sliding_window.filter(|_| sliding)
    }

    /// Every tensor the model reads, `[(name, shape)]`, without the `model.` prefix.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, m) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let mut out = vec![("embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            let p = format!("layers.{i}");
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ] {
                out.push((format!("{p}.{norm}.weight"), vec![h]));
            }
            for (name, shape) in [
                ("q_proj", [q, h]),
                ("k_proj", [kv, h]),
                ("v_proj", [kv, h]),
                ("o_proj", [h, q]),
            ] {
                out.push((format!("{p}.self_attn.{name}.weight"), shape.to_vec()));
                if self.attention_bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![shape[0]]));
                }
            }
            for (name, shape) in [
                ("gate_proj", [m, h]),
                ("up_proj", [m, h]),
                ("down_proj", [h, m]),
            ] {
                out.push((format!("{p}.mlp.{name}.weight"), shape.to_vec()));
            }
        }
        out.push(("norm.weight".to_string(), vec![h]));
        out
    }
}

/// A validated Gemma-2 checkpoint: config plus tensors, not yet loaded.
pub struct GemmaWeights {
    pub config: GemmaConfig,
    /// Every file the features depend on (weights and config), for the cache identity.
    pub files: Vec<PathBuf>,
    tensors: TensorSet,
}

impl GemmaWeights {
    /// A Hugging Face Gemma-2 directory: `config.json` plus `model.safetensors`, the shards
    /// listed in `model.safetensors.index.json`, or else every `*.safetensors`. Tensor names
    /// may carry the `model.` prefix; a tied `lm_head.weight` is ignored.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = GemmaConfig::from_json(&json, &config_path)?;
        let mut files = weight_files(dir)?;
        let tensors = TensorSet::open(dir, &files, &["model."])?;
        files.push(config_path);
        Self::checked(config, files, tensors)
    }

    /// A golden file of kind `gemma2`: config in the metadata, bf16 tensors `weights.*`.
    pub fn open_embedded(path: &Path) -> Result<Self> {
        let meta = read_metadata(path)?;
        if meta.get("kind").map(String::as_str) != Some("gemma2")
            || meta.get("weights").map(String::as_str) != Some("embedded")
        {
            return Err(Error::weights(
                path,
                "not_gemma_golden",
                "not a gemma2 golden file with embedded weights (metadata kind=gemma2, weights=embedded)",
            ));
        }
        let config = GemmaConfig::from_json(
            meta.get("config").map(String::as_str).unwrap_or_default(),
            path,
        )?;
        let files = vec![path.to_path_buf()];
        let tensors = TensorSet::open(path, &files, &["weights."])?;
        if tensors.prefix() != "weights." {
            return Err(Error::weights(
                path,
                "not_gemma_golden",
                "no `weights.*` tensors",
            ));
        }
        Self::checked(config, files, tensors)
    }

    fn checked(config: GemmaConfig, files: Vec<PathBuf>, tensors: TensorSet) -> Result<Self> {
        tensors.check(
            &config.expected_tensors(),
            "the Gemma-2 model its config describes",
            |name| name == "lm_head.weight",
        )?;
        Ok(Self {
            config,
            files,
            tensors,
        })
    }

    /// Load the model, weights bf16-resident on `device`.
    pub fn load(self, device: &Device) -> Result<Gemma2Model> {
        let vb = self.tensors.var_builder(DType::BF16, device)?;
        Ok(Gemma2Model::new(&self.config, vb)?)
    }
}

/// The safetensors files of a Hugging Face model directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_files(&index);
    }
    let merged = dir.join("model.safetensors");
    if merged.is_file() {
        return Ok(vec![merged]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::MissingFile {
            path: dir.join("model.safetensors"),
            hint: "the Gemma-2 directory has no *.safetensors weights; provision gemma-2-2b-it with `pid-native fetch`".into(),
        });
    }
    Ok(files)
}

/// Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, in f32.
#[derive(Debug, Clone)]
struct GemmaRmsNorm {
    scale: Tensor, // (1 + w), f32
    eps: f32,
}

impl GemmaRmsNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        let w = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        Ok(Self {
            scale: (w + 1.0)?,
            eps: eps as f32,
        })
    }
}

impl Module for GemmaRmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.scale, self.eps)
    }
}

/// `self_attn`: grouped-query attention with RoPE and scale `query_pre_attn_scalar^-0.5`.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn new(cfg: &GemmaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), h, q, bias, DType::F32)?,
            k_proj: Linear::new(vb.pp("k_proj"), h, kv, bias, DType::F32)?,
            v_proj: Linear::new(vb.pp("v_proj"), h, kv, bias, DType::F32)?,
            o_proj: Linear::new(vb.pp("o_proj"), q, h, bias, DType::F32)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `x (B, L, hidden)`, additive `mask (B, 1, L, L)` -> `(B, L, hidden)`.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        softcap: bool,
        budget: AttentionBudget,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, l, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.heads)?; // (B, Hq, L, d)
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?; // (B, Hkv, L, d)
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rope.0, &rope.1)?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.0, &rope.1)?;
        let rep = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, rep)?; // (B, Hq, L, d)
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        // Reference quirk: the SDPA attention PiD ran ignores the softcap (pid_spec §5.7).
        let cap = self.softcap.filter(|_| softcap);
        let y = masked_attention(&q, &k, &v, mask, self.scale, cap, budget)?;
        self.o_proj.forward(
            &y.transpose(1, 2)?
                .reshape((b, l, self.heads * self.head_dim))?,
        )
    }
}

/// softmax(cap(q k^T * scale) + mask) v, in query chunks bounded by `budget`, like eager attention.
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    budget: AttentionBudget,
) -> candle_core::Result<Tensor> {
    let (b, h, l, _) = q.dims4()?;
    let kt = k.t()?.contiguous()?; // (B, H, d, L)
    let block = |start: usize, len: usize| -> candle_core::Result<Tensor> {
        let mut s = (q.narrow(2, start, len)?.contiguous()?.matmul(&kt)? * scale)?;
        if let Some(cap) = softcap {
            s = ((s / cap)?.tanh()? * cap)?;
        }
        let s = s.broadcast_add(&mask.narrow(2, start, len)?)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(v)
    };
    let rows = budget.query_rows(b * h, l, DType::F32.size_in_bytes());
    if rows >= l {
        return block(0, l);
    }
    let mut outs = Vec::with_capacity(l.div_ceil(rows));
    for start in (0..l).step_by(rows) {
        outs.push(block(start, rows.min(l - start))?);
    }
    Tensor::cat(&outs, 2)
}

/// `mlp`: `down_proj(gelu_tanh(gate_proj x) * up_proj x)`.
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &GemmaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(vb.pp("gate_proj"), h, m, false, DType::F32)?,
            up_proj: Linear::new(vb.pp("up_proj"), h, m, false, DType::F32)?,
            down_proj: Linear::new(vb.pp("down_proj"), m, h, false, DType::F32)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // candle's `gelu` is the tanh approximation, HF's gelu_pytorch_tanh.
        let g = self.gate_proj.forward(x)?.gelu()?;
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

struct DecoderLayer {
    input_layernorm: GemmaRmsNorm,
    self_attn: Attention,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: GemmaRmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn new(cfg: &GemmaConfig, i: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let norm = |name: &str| GemmaRmsNorm::new(vb.pp(name), cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding: cfg.window(i).is_some(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        softcap: bool,
        budget: AttentionBudget,
    ) -> candle_core::Result<Tensor> {
        let a = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rope,
            mask,
            softcap,
            budget,
        )?;
        let x = (x + self.post_attention_layernorm.forward(&a)?)?;
        let m = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&x)?)?;
        x + self.post_feedforward_layernorm.forward(&m)?
    }
}

/// The bare Gemma-2 decoder stack (`Gemma2Model`), returning the last hidden state.
pub struct Gemma2Model {
    embed_tokens: Tensor, // (vocab, hidden), bf16
    layers: Vec<DecoderLayer>,
    norm: GemmaRmsNorm,
    cfg: GemmaConfig,
    budget: AttentionBudget,
}

impl Gemma2Model {
    /// Build from a VarBuilder over the names without `model.`; weights stay in `vb.dtype()`.
    pub fn new(cfg: &GemmaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            embed_tokens: vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?,
            layers,
            norm: GemmaRmsNorm::new(vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            cfg: cfg.clone(),
            budget: AttentionBudget::default(),
        })
    }

    pub fn config(&self) -> &GemmaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The last hidden state `(B, L, hidden)` f32 for `input_ids` and `attention_mask` `(B, L)`
    /// (any integer dtype). The mask is 1 for tokens and 0 for padding, with a token first.
    ///
    /// `softcap` applies the config's attention-logit softcap, which the reference does not
    /// (pid_spec §5.7): `false` reproduces the features PiD was trained on.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        softcap: bool,
    ) -> Result<Tensor> {
        let (ids, keep) = self.check_inputs(input_ids, attention_mask)?;
        let (b, l) = input_ids.dims2()?;
        let dev = self.embed_tokens.device();
        let ids = Tensor::from_vec(ids, b * l, dev)?;
        // HF scales by sqrt(hidden) cast to the activation dtype: bf16 in PiD's run (48.0 for
        // 2304), f32 in the goldens (8.0 for their 64). Both roots are exact in bf16 and f32,
        // so computing it in f32 matches either; for a hidden size whose root is not a bf16
        // number this follows the f32 goldens.
        let normalizer = (self.cfg.hidden_size as f32).sqrt();
        let mut x = (self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, l, self.cfg.hidden_size))?
            * f64::from(normalizer))?;
        let rope = rope_tables(self.cfg.head_dim, l, self.cfg.rope_theta, dev)?;
        let full = attention_bias(&keep, b, l, None, dev)?;
        // Every sliding layer shares one window; one as long as the sequence masks nothing extra.
        let sliding = match self.cfg.sliding_window.filter(|&w| w < l) {
            Some(w) => Some(attention_bias(&keep, b, l, Some(w), dev)?),
            None => None,
        };
        for layer in &self.layers {
            let mask = match (&sliding, layer.sliding) {
                (Some(m), true) => m,
                _ => &full,
            };
            x = layer.forward(&x, &rope, mask, softcap, self.budget)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Ids as u32 and the mask as booleans, after checking shapes, vocabulary and padding.
    fn check_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let dims = input_ids.dims();
        if dims.len() != 2 || dims.contains(&0) || attention_mask.dims() != dims {
            return Err(Error::input(
                "token_shape",
                format!(
                    "input_ids and attention_mask must both be non-empty (B, L); got {dims:?} and {:?}",
                    attention_mask.dims()
                ),
            ));
        }
        let ids = input_ids
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
            return Err(Error::input(
                "token_id",
                format!("token id {bad} is outside the vocabulary 0..{vocab}; was the text tokenized with this model's tokenizer.json?"),
            ));
        }
        let mask = attention_mask
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        if mask.iter().any(|&m| m != 0 && m != 1) {
            return Err(Error::input(
                "attention_mask",
                "attention_mask must hold only 0 and 1",
            ));
        }
        let len = dims[1];
        if mask.iter().step_by(len).any(|&m| m == 0) {
            return Err(Error::input(
                "attention_mask",
                "every sequence must start with a token (attention_mask[:, 0] == 1): the batch must be right padded",
            ));
        }
        Ok((
            ids.into_iter().map(|i| i as u32).collect(),
            mask.into_iter().map(|m| m == 1).collect(),
        ))
    }
}

/// Additive attention bias `(B, 1, L, L)`: 0 where query i may see key j (causal, key not
/// padding, and `i - j < window` on sliding layers), -inf elsewhere.
///
/// Pad queries attend too: their features are real conditioning (pid_spec §5.4). No row is
/// empty because every sequence starts with a token.
fn attention_bias(
    keep: &[bool],
    b: usize,
    l: usize,
    window: Option<usize>,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let mut bias = vec![f32::NEG_INFINITY; b * l * l];
    for s in 0..b {
        let keys = &keep[s * l..(s + 1) * l];
        for i in 0..l {
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            let row = &mut bias[(s * l + i) * l..(s * l + i + 1) * l];
            for j in first..=i {
                if keys[j] {
                    row[j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, l, l), dev)
}

/// Rotate-half RoPE tables `(L, head_dim / 2)` for positions 0..L-1, as HF computes them:
/// `inv_freq = 1 / theta^(2i/d)` and `angle = pos * inv_freq`, both in f32.
fn rope_tables(
    head_dim: usize,
    len: usize,
    theta: f64,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let theta = theta as f32;
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let angles: Vec<f32> = (0..len)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (len, head_dim / 2), dev)?;
    Ok((angles.cos()?, angles.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_is_causal_padded_and_windowed() {
        let keep = [true, true, true, false];
        let bias = attention_bias(&keep, 1, 4, Some(2), &Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("bias");
        let open: Vec<Vec<usize>> = bias
            .chunks(4)
            .map(|row| (0..4).filter(|&j| row[j] == 0.0).collect())
            .collect();
        // Query 3 is padding: it still attends, to the unpadded keys in its window.
        assert_eq!(open, vec![vec![0], vec![0, 1], vec![1, 2], vec![2]]);
    }

    #[test]
    fn default_layer_types_slide_on_even_layers() {
        let json = r#"{"vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 2, "query_pre_attn_scalar": 2, "sliding_window": 16}"#;
        let cfg = GemmaConfig::from_json(json, Path::new("config.json")).expect("config");
        assert_eq!(
            (0..3).map(|i| cfg.window(i)).collect::<Vec<_>>(),
            vec![Some(16), None, Some(16)]
        );
        assert_eq!(cfg.attn_logit_softcapping, Some(50.0));
    }
}
