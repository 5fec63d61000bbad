//! The shrunk SDXL network (`NetConfig::sdxl_mini`, the `pidnet_sdxl_mini` golden topology) with seeded weights.

use candle_core::{DType, Device};
use pid_core::weights::{read_metadata, Checkpoint};
use pid_core::{NetConfig, PidNet};

use super::{bundled_goldens_dir, seeded_checkpoint};

pub fn mini_config() -> NetConfig {
    let meta = read_metadata(bundled_goldens_dir().join("pidnet_sdxl_mini.safetensors"))
        .expect("pidnet_sdxl_mini golden");
    NetConfig::from_json(&meta["config"]).unwrap()
}

pub fn mini_checkpoint() -> std::path::PathBuf {
    seeded_checkpoint(&mini_config().expected_tensors(), "")
}

pub fn mini_net() -> PidNet {
    let cfg = mini_config();
    let ckpt = Checkpoint::open(mini_checkpoint()).unwrap();
    ckpt.validate(&cfg).unwrap();
    PidNet::new(
        &cfg,
        ckpt.var_builder(DType::F32, &Device::Cpu).unwrap(),
        DType::F32,
    )
    .unwrap()
}

/// The mini network with every checkpoint tensor passed through `edit(name, tensor)`.
pub fn mini_net_edited(edit: impl Fn(&str, candle_core::Tensor) -> candle_core::Tensor) -> PidNet {
    let tensors = candle_core::safetensors::load(mini_checkpoint(), &Device::Cpu).unwrap();
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = edit(&name, t);
            (name, t)
        })
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    PidNet::new(&mini_config(), vb, DType::F32).unwrap()
}
