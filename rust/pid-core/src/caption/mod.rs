//! Caption encoder: captions -> the `(B, 300, hidden)` features PiD consumes (pid_spec §5).
//!
//! Pipeline: CHI prompt + caption -> tokens ([`prompt`]) -> Gemma-2 last hidden state
//! ([`gemma`]) -> position 0 plus the last 299 positions, f32. Computed once per decode and
//! reused for every sampler step; recent captions are cached ([`cache`]).
//!
//! Memory: gemma-2-2b-it stays resident in bf16, about 5.2 GB. When memory is tight,
//! encode the captions first and drop the [`CaptionEncoder`] before decoding, keeping
//! its [`CaptionCache`] (an `Arc`): an encoder reopened later on the same unchanged files
//! has the same identity, so the captions it already encoded are still cache hits.

pub mod cache;
pub mod gemma;
pub mod prompt;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use cache::{CacheStats, CachedCaption, CaptionCache, EncoderId};
pub use gemma::{Gemma2Model, GemmaConfig, GemmaWeights};
pub use prompt::{select_tokens, PromptTokenizer, Tokens, TEXT_TOKENS};

use crate::Result;

/// Caption features for a batch, with what truncation cost each caption.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `(B, 300, hidden)` f32.
    pub embeddings: Tensor,
    /// Per caption, how many tokens right truncation dropped (0 when it fit).
    pub dropped: Vec<usize>,
}

/// Gemma-2 plus its tokenizer and a caption cache: the whole caption stage.
pub struct CaptionEncoder {
    model: Gemma2Model,
    tokenizer: PromptTokenizer,
    softcap: bool,
    id: EncoderId,
    cache: Arc<CaptionCache>,
}

impl CaptionEncoder {
    /// Assemble from validated weights and a `tokenizer.json`, sharing `cache`.
    pub fn new(
        weights: GemmaWeights,
        tokenizer: &Path,
        softcap: bool,
        cache: Arc<CaptionCache>,
        device: &Device,
    ) -> Result<Self> {
        let cfg = &weights.config;
        let tokenizer_model = PromptTokenizer::from_file(tokenizer, cfg.pad_id(), cfg.bos_id())?;
        let mut files: Vec<&Path> = weights.files.iter().map(PathBuf::as_path).collect();
        files.push(tokenizer);
        let id = EncoderId::of_files(&files, &format!("softcap={softcap}"))?;
        Ok(Self {
            model: weights.load(device)?,
            tokenizer: tokenizer_model,
            softcap,
            id,
            cache,
        })
    }

    pub fn config(&self) -> &GemmaConfig {
        self.model.config()
    }

    pub fn prompt_tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn softcap(&self) -> bool {
        self.softcap
    }

    /// The cache key of this encoder's weights, tokenizer and settings.
    pub fn id(&self) -> EncoderId {
        self.id
    }

    pub fn cache(&self) -> &Arc<CaptionCache> {
        &self.cache
    }

    /// CHI + caption tokens, padded to `num_chi + 298` (see [`PromptTokenizer::tokenize`]).
    pub fn tokenize(&self, captions: &[String]) -> Result<Tokens> {
        self.tokenizer.tokenize(captions)
    }

    /// Gemma's last hidden state `(B, L, hidden)` f32 for given tokens (see [`Gemma2Model::forward`]).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        softcap: bool,
    ) -> Result<Tensor> {
        self.model.forward(input_ids, attention_mask, softcap)
    }

    /// PiD's caption features `(B, 300, hidden)` f32, one row per caption ("" is valid).
    ///
    /// Each uncached caption runs through Gemma on its own, so a caption's features never
    /// depend on the rest of the batch and peak memory stays that of one prompt.
    pub fn encode(&self, captions: &[String]) -> Result<Encoded> {
        let mut rows = Vec::with_capacity(captions.len());
        let mut dropped = Vec::with_capacity(captions.len());
        for caption in captions {
            let entry = match self.cache.get(self.id, caption) {
                Some(hit) => hit,
                None => {
                    let tokens = self.tokenizer.tokenize(std::slice::from_ref(caption))?;
                    let (ids, mask) = tokens.to_tensors(self.model.device())?;
                    let hidden = self.model.forward(&ids, &mask, self.softcap)?;
                    let entry = CachedCaption {
                        embeddings: select_tokens(&hidden)?.squeeze(0)?,
                        dropped: tokens.dropped[0],
                    };
                    self.cache.insert(self.id, caption, entry.clone());
                    entry
                }
            };
            rows.push(entry.embeddings);
            dropped.push(entry.dropped);
        }
        let embeddings = if rows.is_empty() {
            let hidden = self.config().hidden_size;
            Tensor::zeros((0, TEXT_TOKENS, hidden), DType::F32, self.model.device())?
        } else {
            Tensor::stack(&rows, 0)?
        };
        Ok(Encoded {
            embeddings,
            dropped,
        })
    }
}
