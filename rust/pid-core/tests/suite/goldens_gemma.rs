//! Golden parity of the caption encoder's Gemma-2 against Hugging Face transformers, over
//! every `kind = gemma2` file in `PID_GOLDENS` (tolerances: tests/goldens/README.md).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use crate::common::{check_every_golden, golden_files, max_abs_diff, Golden};
use candle_core::Device;
use pid_core::caption::{select_tokens, CaptionCache, CaptionEncoder, GemmaWeights, TEXT_TOKENS};

const HIDDEN_TOL: f32 = 1e-4;

#[test]
fn golden_gemma_hidden_states_and_selection() {
    check_every_golden("gemma2", |path| {
        let golden = Golden::open(path);
        let model = GemmaWeights::open_embedded(path)
            .and_then(|w| w.load(&Device::Cpu))
            .map_err(|e| e.to_string())?;
        let (ids, mask) = (golden.get("in.input_ids"), golden.get("in.attention_mask"));
        // Softcap off is what the reference's default SDPA attention computes (pid_spec §5.7).
        let off = model.forward(&ids, &mask, false).unwrap();
        let on = model.forward(&ids, &mask, true).unwrap();
        let selected = select_tokens(&off).unwrap();
        let errors = [
            (
                "softcap-off hidden state",
                max_abs_diff(&off, &golden.get("out.hidden_nosoftcap")),
            ),
            (
                "softcap-on hidden state",
                max_abs_diff(&on, &golden.get("out.hidden_softcap")),
            ),
            (
                "caption_embs",
                max_abs_diff(&selected, &golden.get("out.caption_embs")),
            ),
        ];
        let report: Vec<String> = errors
            .iter()
            .map(|(what, e)| format!("{what} {e:.3e}"))
            .collect();
        match errors.iter().find(|(_, e)| *e > HIDDEN_TOL) {
            Some((what, e)) => Err(format!("{what} max abs error {e:.3e} > {HIDDEN_TOL:e}")),
            None => Ok(report.join(", ")),
        }
    });
}

/// The tiny Gemma-style tokenizer of `pid_native.testing.tokenizer`, written by its script.
fn tiny_tokenizer(tag: &str) -> PathBuf {
    let dir = crate::common::workspace_root().join("target/pid-seeded");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!(
        "tiny-gemma-tokenizer-{tag}-{}.json",
        std::process::id()
    ));
    let python = std::env::var("PID_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = crate::common::workspace_root().join("python/pid_native/testing/tokenizer.py");
    let status = Command::new(&python)
        .arg(&script)
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (set PID_PYTHON to a Python with `tokenizers`): {e}")
        });
    assert!(
        status.success(),
        "{python} {} failed; it needs the `tokenizers` package",
        script.display()
    );
    out
}

#[test]
fn encoder_features_are_the_selected_hidden_states_of_the_prompt() {
    let path = &golden_files("gemma2")[0];
    let tokenizer = tiny_tokenizer("encode");
    let cache = Arc::new(CaptionCache::new(4));
    let weights = GemmaWeights::open_embedded(path).unwrap();
    let enc = CaptionEncoder::new(weights, &tokenizer, false, cache.clone(), &Device::Cpu).unwrap();
    let captions = vec!["a cat on the mat".to_string(), String::new()];
    let encoded = enc.encode(&captions).unwrap();
    assert_eq!(
        encoded.embeddings.dims(),
        &[2, TEXT_TOKENS, enc.config().hidden_size]
    );
    assert_eq!(encoded.dropped, vec![0, 0]);
    // Same as running the whole padded batch through Gemma and selecting.
    let tokens = enc.tokenize(&captions).unwrap();
    assert_eq!(
        tokens.len,
        enc.prompt_tokenizer().num_chi() + TEXT_TOKENS - 2
    );
    let (ids, mask) = tokens.to_tensors(&Device::Cpu).unwrap();
    let batch = select_tokens(&enc.hidden_states(&ids, &mask, false).unwrap()).unwrap();
    assert!(max_abs_diff(&encoded.embeddings, &batch) <= 1e-5);
    // A second call is served from the cache, bit for bit.
    let again = enc.encode(&captions).unwrap();
    assert_eq!(max_abs_diff(&encoded.embeddings, &again.embeddings), 0.0);
    assert_eq!(cache.stats().hits, 2);
    std::fs::remove_file(tokenizer).ok();
}
