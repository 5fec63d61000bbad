//! Golden parity of the SDXL VAE against diffusers' `AutoencoderKL`, over every
//! `kind = sdxl_vae` file in `PID_GOLDENS` (tolerance: tests/goldens/README.md).

use crate::common::{check_every_golden, golden_files, max_abs_diff, Golden};
use candle_core::Device;
use pid_core::vae::Vae;

const VAE_TOL: f32 = 1e-4;

#[test]
fn golden_vae_encode_mean_and_decode() {
    check_every_golden("sdxl_vae", |path| {
        let golden = Golden::open(path);
        let vae = Vae::open(path, &Device::Cpu).map_err(|e| e.to_string())?;
        let mean = vae.encode_mean(&golden.get("in.image")).unwrap();
        let err_enc = max_abs_diff(&mean, &golden.get("out.latent_mean_raw"));
        let image = vae.decode_raw(&golden.get("in.latent_raw")).unwrap();
        let err_dec = max_abs_diff(&image, &golden.get("out.decoded"));
        let report = format!("posterior mean max abs error {err_enc:.3e}, decode {err_dec:.3e}");
        if err_enc <= VAE_TOL && err_dec <= VAE_TOL {
            Ok(report)
        } else {
            Err(format!("{report} (tolerance {VAE_TOL:e})"))
        }
    });
}

#[test]
fn scaled_latents_round_trip_through_the_scaling_factor() {
    let path = &golden_files("sdxl_vae")[0];
    let golden = Golden::open(path);
    let vae = Vae::open(path, &Device::Cpu).unwrap();
    let image = golden.get("in.image");
    let scaled = vae.encode(&image).unwrap();
    let mean = vae.encode_mean(&image).unwrap();
    let factor = vae.config().scaling_factor;
    assert_eq!(factor, 0.13025);
    assert!(max_abs_diff(&scaled, &(mean * factor).unwrap()) <= 1e-7);
    let latent = golden.get("in.latent_raw");
    let via_scaled = vae.decode(&(&latent * factor).unwrap()).unwrap();
    assert!(max_abs_diff(&via_scaled, &golden.get("out.decoded")) <= VAE_TOL);
}
