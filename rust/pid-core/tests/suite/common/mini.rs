//! The shrunk SDXL network (`NetConfig::sdxl_mini`, the `pidnet_sdxl_mini` golden topology) with seeded weights.

use candle_core::{DType, Device};
use pid_core::weights::{read_metadata, Checkpoint};
use pid_core::{NetConfig, PidNet};

use super::{goldens_dir, seeded_checkpoint};

pub fn mini_config() -> NetConfig {
    let meta = read_metadata(goldens_dir().join("pidnet_sdxl_mini.safetensors"))
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
