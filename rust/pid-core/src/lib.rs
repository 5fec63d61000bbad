//! pid-core: NVIDIA's PiD pixel-diffusion decoder in candle.
//!
//! PiD replaces a latent diffusion model's VAE decoder: from a latent `[B, C, h, w]`
//! and a caption it denoises directly in pixel space and returns a 4x super-resolved
//! image `[B, 3, 32h, 32w]` in 4 distilled steps.
//!
//! Data flow: latent -> [`caption`] -> [`sampler`] (driving [`net::PidNet`]) -> image.
//!
//! PiD weights are under the NVIDIA License (NSCLv1, non-commercial): the restriction
//! extends to every decoded image.

pub mod caption;
pub mod config;
pub mod cuda_device;
pub mod decoder;
pub mod error;
pub mod kernels;
pub mod net;
pub mod noise;
pub mod plan;
pub mod pth;
pub mod sampler;
pub mod vae;
pub mod weights;

pub use config::{LatentHint, NetConfig};
pub use error::{Error, Result};
pub use net::PidNet;
