//! Prompt construction, tokenisation and token selection (pid_spec §5.2-§5.3; upstream
//! `pixeldit_model.py:268-304` @2c8814c).
//!
//! prompt = CHI + caption (no separator, case kept); tokens = `<bos>` + prompt, right padded
//! with the pad id (0) and right truncated to `num_chi + 298`, where `num_chi` counts the
//! tokens of CHI alone, BOS included. PiD reads position 0 plus the last 299 positions.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// PiD's `txt_max_length`: the caption positions every released student reads.
pub const TEXT_TOKENS: usize = 300;

/// The CHI instruction, shared with the MLX backend (one source of truth, pid_spec §5.2).
const CHI_PROMPT_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../python/pid_native/data/chi_prompt.json"
));

#[derive(Deserialize)]
struct ChiPrompt {
    join: String,
    lines: Vec<String>,
}

/// The CHI prompt: its lines joined with "\n", ending in "User Prompt: ".
pub fn chi_prompt() -> Result<String> {
    let chi: ChiPrompt = serde_json::from_str(CHI_PROMPT_JSON).map_err(|e| {
        Error::Backend(candle_core::Error::Msg(format!(
            "the embedded chi_prompt.json is invalid ({e}); the build is broken"
        )))
    })?;
    Ok(chi.lines.join(&chi.join))
}

/// A tokenized batch, `(B, len)` row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// 1 for prompt tokens, 0 for padding.
    pub mask: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Per caption, how many tokens right truncation cut off (its tail is lost).
    pub dropped: Vec<usize>,
}

impl Tokens {
    /// `(input_ids, attention_mask)` as `(B, len)` u32 tensors.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.batch, self.len);
        Ok((
            Tensor::from_slice(&self.ids, shape, device)?,
            Tensor::from_slice(&self.mask, shape, device)?,
        ))
    }
}

/// CHI + caption -> fixed-length token ids, as the reference's Hugging Face tokenizer call does.
pub struct PromptTokenizer {
    /// No padding or truncation: counts what a prompt really takes.
    plain: Tokenizer,
    /// Pads and truncates to `max_len`, like `padding="max_length", truncation=True`.
    fixed: Tokenizer,
    chi: String,
    num_chi: usize,
    max_len: usize,
    source: PathBuf,
}

impl PromptTokenizer {
    /// Load `tokenizer.json`. `pad_id` and `bos_id` come from the model's config.
    pub fn from_file(path: &Path, pad_id: u32, bos_id: u32) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "the caption encoder needs the model's tokenizer.json; provision gemma-2-2b-it with `pid-native fetch`".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            Error::weights(
                path,
                "tokenizer",
                format!("cannot load the tokenizer ({e}); re-download tokenizer.json"),
            )
        })?;
        Self::new(tokenizer, pad_id, bos_id, path)
    }

    /// `source` names the tokenizer in errors.
    pub fn new(tokenizer: Tokenizer, pad_id: u32, bos_id: u32, source: &Path) -> Result<Self> {
        let chi = chi_prompt()?;
        let mut plain = tokenizer;
        plain
            .with_padding(None)
            .with_truncation(None)
            .map_err(|e| Error::weights(source, "tokenizer", e.to_string()))?;
        let chi_ids = encode(&plain, &chi, source)?.get_ids().to_vec();
        if chi_ids.first() != Some(&bos_id) {
            return Err(Error::weights(
                source,
                "tokenizer_no_bos",
                format!(
                    "the tokenizer does not start sequences with <bos> (id {bos_id}); PiD's prompts need it: \
                     use the model's own tokenizer.json, whose post-processor adds it"
                ),
            ));
        }
        let num_chi = chi_ids.len();
        // pid_spec §5.2: max_len = num_chi + 300 - 2.
        let max_len = num_chi + TEXT_TOKENS - 2;
        let pad_token = plain
            .id_to_token(pad_id)
            .unwrap_or_else(|| "<pad>".to_string());
        let mut fixed = plain.clone();
        fixed
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_len),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id,
                pad_type_id: 0,
                pad_token,
            }))
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::weights(source, "tokenizer", e.to_string()))?;
        Ok(Self {
            plain,
            fixed,
            chi,
            num_chi,
            max_len,
            source: source.to_path_buf(),
        })
    }

    /// Tokens of CHI alone, BOS included.
    pub fn num_chi(&self) -> usize {
        self.num_chi
    }

    /// The padded length of every prompt, `num_chi + 298`.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenize CHI + caption for each caption ("" is valid: BOS, CHI and padding).
    pub fn tokenize(&self, captions: &[String]) -> Result<Tokens> {
        let mut ids = Vec::with_capacity(captions.len() * self.max_len);
        let mut mask = Vec::with_capacity(captions.len() * self.max_len);
        let mut dropped = Vec::with_capacity(captions.len());
        let source = &self.source;
        for caption in captions {
            let prompt = format!("{}{caption}", self.chi);
            let full = encode(&self.plain, &prompt, source)?.len();
            let enc = encode(&self.fixed, &prompt, source)?;
            ids.extend_from_slice(enc.get_ids());
            mask.extend_from_slice(enc.get_attention_mask());
            let cut = full.saturating_sub(self.max_len);
            if cut > 0 {
                log::warn!(
                    "caption truncated: its last {cut} tokens are dropped (the prompt window holds {} caption tokens)",
                    self.max_len - self.num_chi
                );
            }
            dropped.push(cut);
        }
        Ok(Tokens {
            ids,
            mask,
            batch: captions.len(),
            len: self.max_len,
            dropped,
        })
    }
}

fn encode(tok: &Tokenizer, text: &str, source: &Path) -> Result<tokenizers::Encoding> {
    tok.encode(text, true)
        .map_err(|e| Error::weights(source, "tokenizer", format!("tokenization failed: {e}")))
}

/// PiD's caption features: position 0 (BOS) plus the last 299 positions of `hidden (B, L, D)`.
pub fn select_tokens(hidden: &Tensor) -> Result<Tensor> {
    let (_, l, _) = hidden.dims3()?;
    if l < TEXT_TOKENS {
        return Err(Error::input(
            "token_count",
            format!("the hidden states hold {l} positions; PiD selects {TEXT_TOKENS}"),
        ));
    }
    let tail = TEXT_TOKENS - 1;
    Ok(Tensor::cat(
        &[hidden.narrow(1, 0, 1)?, hidden.narrow(1, l - tail, tail)?],
        1,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_prompt_is_the_upstream_text() {
        let chi = chi_prompt().expect("embedded CHI prompt");
        assert!(chi.starts_with("Given a user prompt, generate an \"Enhanced prompt\""));
        assert!(chi.ends_with("\nUser Prompt: "));
        assert_eq!(chi.lines().count(), 8);
    }

    #[test]
    fn selection_keeps_bos_and_the_last_299() {
        let hidden = Tensor::arange(0f32, 320.0, &Device::Cpu)
            .and_then(|t| t.reshape((1, 320, 1)))
            .expect("hidden");
        let kept = select_tokens(&hidden)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("selection");
        assert_eq!(kept.len(), TEXT_TOKENS);
        assert_eq!(kept[0], 0.0);
        assert_eq!(kept[1], 21.0);
        assert_eq!(kept[299], 319.0);
    }
}
