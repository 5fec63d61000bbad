//! Bad checkpoints are refused up front with an error naming the file and the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::mini::{mini_checkpoint, mini_config};
use candle_core::{DType, Device, Shape, Tensor};
use pid_core::config::LatentHint;
use pid_core::weights::Checkpoint;
use pid_core::{Error, NetConfig};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pid-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Write `tensors` as a safetensors file in the test's temp dir.
fn save(tensors: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let path = tmp(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn zeros<S: Into<Shape>>(shape: S, dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, &Device::Cpu).unwrap()
}

fn load_all(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Open + detect + validate, the way every loader does.
fn check(path: &Path, hint: Option<LatentHint>) -> Result<NetConfig, Error> {
    let ckpt = Checkpoint::open(path)?;
    let cfg = ckpt.detect_config(hint)?;
    ckpt.validate(&cfg)?;
    Ok(cfg)
}

fn code(r: Result<NetConfig, Error>) -> String {
    let e = r.unwrap_err();
    assert!(!e.to_string().is_empty());
    e.code().to_string()
}

#[test]
fn the_mini_preset_is_the_mini_golden_topology() {
    let meta = pid_core::weights::read_metadata(
        crate::common::bundled_goldens_dir().join("pidnet_sdxl_mini.safetensors"),
    )
    .unwrap();
    assert_eq!(
        NetConfig::from_json(&meta["config"]).unwrap(),
        NetConfig::sdxl_mini()
    );
}

#[test]
fn a_good_checkpoint_detects_its_config_in_both_key_layouts() {
    let good = mini_checkpoint();
    assert_eq!(check(&good, None).unwrap(), mini_config());
    // Raw upstream layout: `net.` prefix plus EMA/teacher tensors that must be ignored.
    let mut raw: HashMap<String, Tensor> = load_all(&good)
        .into_iter()
        .map(|(k, v)| (format!("net.{k}"), v))
        .collect();
    raw.insert("net_ema.y_pos_embedding".into(), zeros(3, DType::F32));
    raw.insert("discriminator.head.weight".into(), zeros(3, DType::F32));
    let path = save(&raw, "raw.safetensors");
    assert_eq!(check(&path, None).unwrap(), mini_config());
}

#[test]
fn missing_tensor_wrong_shape_and_unexpected_tensor() {
    let all = load_all(&mini_checkpoint());
    let mut missing = all.clone();
    missing.remove("patch_blocks.2.mlp_x.w3.weight");
    let path = save(&missing, "missing.safetensors");
    let err = check(&path, None).unwrap_err();
    assert_eq!(err.code(), "missing_tensor");
    assert!(
        err.to_string().contains("patch_blocks.2.mlp_x.w3.weight"),
        "{err}"
    );

    let mut wrong = all.clone();
    wrong.insert(
        "final_layer.linear.weight".into(),
        zeros((3, 8), DType::BF16),
    );
    let path = save(&wrong, "wrong.safetensors");
    let err = check(&path, None).unwrap_err();
    assert_eq!(err.code(), "tensor_shape");
    assert!(err.to_string().contains("final_layer.linear.weight"));

    let mut extra = all.clone();
    extra.insert("something_else.weight".into(), zeros(2, DType::BF16));
    extra.insert(
        "lq_proj.lq_aux_rgb_head.1.weight".into(),
        zeros(2, DType::BF16),
    );
    let path = save(&extra, "extra.safetensors");
    let err = check(&path, None).unwrap_err();
    assert_eq!(err.code(), "unexpected_tensor");
    assert!(err.to_string().contains("something_else.weight"));
    // The training-only aux head alone is accepted.
    extra.remove("something_else.weight");
    assert!(check(&save(&extra, "extra.safetensors"), None).is_ok());
}

#[test]
fn truncated_and_non_safetensors_files() {
    let bytes = std::fs::read(mini_checkpoint()).unwrap();
    let path = tmp("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(code(check(&path, None)), "truncated");
    let path = tmp("text.safetensors");
    std::fs::write(&path, b"this is not a checkpoint at all, just some text").unwrap();
    assert_eq!(code(check(&path, None)), "not_safetensors");
    std::fs::write(&path, b"tiny").unwrap();
    assert_eq!(code(check(&path, None)), "not_safetensors");
    assert_eq!(
        code(check(&tmp("does-not-exist.safetensors"), None)),
        "missing_file"
    );
    assert_eq!(code(check(&std::env::temp_dir(), None)), "not_a_file");
}

#[test]
fn inconsistent_v15_signals_and_wrong_latent_space() {
    let mut all = load_all(&mini_checkpoint());
    let d = mini_config().hidden_size;
    // A v1 (per-dim gates) file that also has the v1.5 PiT gate.
    all.insert(
        "pit_lq_gate.content_proj.weight".into(),
        zeros((1, 2 * d), DType::BF16),
    );
    let path = save(&all, "inconsistent.safetensors");
    let err = check(&path, None).unwrap_err();
    assert_eq!(err.code(), "inconsistent_checkpoint");
    assert!(err.to_string().contains("pit_lq_gate.content_proj.weight"));

    // An SDXL (4-channel) checkpoint offered a 16-channel latent space.
    let hint = Some(LatentHint {
        channels: 6,
        spatial_down_factor: 8,
    });
    assert_eq!(code(check(&mini_checkpoint(), hint)), "latent_channels");
}

#[test]
fn output_size_must_be_a_multiple_of_the_patch() {
    let net = crate::common::mini::mini_net();
    let dev = Device::Cpu;
    let cfg = mini_config();
    let y = Tensor::zeros((1, 300, cfg.txt_embed_dim), DType::F32, &dev).unwrap();
    let z = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap();
    let s = Tensor::zeros(1, DType::F32, &dev).unwrap();
    let err = net
        .condition(&y, &z, &s, (64, 70), &mut pid_core::net::Trace::disabled())
        .unwrap_err();
    assert!(
        err.to_string().contains("multiple of the patch size 16"),
        "{err}"
    );
}

#[test]
fn a_shard_index_is_one_checkpoint_and_a_missing_shard_is_named() {
    let whole = mini_checkpoint();
    let all = load_all(&whole);
    // Shards by first name component (the seeded cache groups `patch_blocks.3` finer; any split works).
    let mut shards: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (name, t) in &all {
        let group = name.split('.').next().unwrap().to_string();
        shards
            .entry(group)
            .or_default()
            .insert(name.clone(), t.clone());
    }
    assert!(shards.len() > 1);
    let mut weight_map = serde_json::Map::new();
    for (group, tensors) in &shards {
        let file = format!("shard-{group}.safetensors");
        save(tensors, &file);
        for name in tensors.keys() {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    let index = tmp("mini.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({ "weight_map": weight_map }).to_string(),
    )
    .unwrap();

    let (sharded, reference) = (
        Checkpoint::open(&index).unwrap(),
        Checkpoint::open(&whole).unwrap(),
    );
    assert_eq!(sharded.index(), reference.index());
    for name in reference.index().keys() {
        assert_eq!(
            sharded.raw_bytes(name).unwrap(),
            reference.raw_bytes(name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(check(&index, None).unwrap(), check(&whole, None).unwrap());

    let (group, _) = shards.iter().next().unwrap();
    std::fs::remove_file(tmp(&format!("shard-{group}.safetensors"))).unwrap();
    let err = Checkpoint::open(&index).err().unwrap();
    assert_eq!(err.code(), "missing_file");
    assert!(err.to_string().contains(&format!("shard-{group}")), "{err}");

    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    assert_eq!(code(check(&index, None)), "shard_index");
}
