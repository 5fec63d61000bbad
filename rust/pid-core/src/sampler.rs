//! The distilled few-step sampler (pid_spec §6; upstream `_student_sample_loop`,
//! `models/pid_distill_model_infer.py:138-210, 320-357`).
//!
//! Rectified flow with t = 1 as noise; the network predicts v = eps - x0. Each step
//! estimates x0 = x - t v (in f64), then re-noises onto the path at the next t with
//! fresh noise (DMD2 "SDE" rollout). No CFG, no time shift.

use candle_core::{DType, Tensor};

use crate::net::{Conditioning, PidNet, Trace};
use crate::{Error, Result};

/// The distilled ladder of every released student.
pub const DISTILLED_T: [f32; 5] = [0.999, 0.866, 0.634, 0.342, 0.0];

/// The t ladder for `steps` network evaluations, as upstream subsamples it:
/// indices round-half-even(linspace(0, 4, steps + 1)); a single step runs at t = 1.
pub fn t_ladder(steps: usize) -> Result<Vec<f32>> {
    let n = DISTILLED_T.len() - 1;
    match steps {
        1 => Ok(vec![1.0, 0.0]),
        s if s == n => Ok(DISTILLED_T.to_vec()),
        2 | 3 => Ok(crate::net::linspace_f32(0.0, n as f32, steps + 1)
            .into_iter()
            .map(|i| DISTILLED_T[i.round_ties_even() as usize])
            .collect()),
        _ => Err(Error::input(
            "steps",
            format!("steps = {steps} is not supported; the distilled student runs 1, 2, 3 or 4 steps (4 is the trained schedule)"),
        )),
    }
}

/// Progress of the loop, reported before each network evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEvent {
    pub step: usize,
    pub total: usize,
    pub t: f32,
}

/// Hooks into the loop. `before_step` may stop it by returning an error (cancellation).
pub trait StepObserver {
    fn before_step(&mut self, _event: StepEvent) -> Result<()> {
        Ok(())
    }
    /// The x0 estimate of step `step` (golden traces `x0_stepK`).
    fn after_step(&mut self, _step: usize, _x0: &Tensor) {}
}

impl StepObserver for () {}

/// Run the sampler from `noise (B, 3, H, W)`.
///
/// `velocity(x, t_scaled)` evaluates the network (whole image or tiled); `eps(k)`
/// supplies the fresh noise for the re-noising after step k.
pub fn run(
    noise: &Tensor,
    t_list: &[f32],
    mut velocity: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    mut eps: impl FnMut(usize) -> Result<Tensor>,
    observer: &mut dyn StepObserver,
) -> Result<Tensor> {
    let b = noise.dim(0)?;
    let total = t_list.len() - 1;
    let mut x = noise.to_dtype(DType::F32)?;
    for k in 0..total {
        let (t, t_next) = (t_list[k], t_list[k + 1]);
        observer.before_step(StepEvent { step: k, total, t })?;
        let t_scaled = Tensor::full(t * 1000.0, b, noise.device())?;
        let v = velocity(&x, &t_scaled)?;
        // x0 = x - t v in f64, like the reference (pid_spec §6).
        let x0 = (x.to_dtype(DType::F64)? - (v.to_dtype(DType::F64)? * f64::from(t))?)?
            .to_dtype(DType::F32)?;
        observer.after_step(k, &x0);
        if t_next > 0.0 {
            x = ((&x0 * f64::from(1.0 - t_next))?
                + (eps(k)?.to_dtype(DType::F32)? * f64::from(t_next))?)?;
        } else {
            return Ok(x0.clamp(-1f32, 1f32)?);
        }
    }
    Ok(x.clamp(-1f32, 1f32)?)
}

/// Whole-image velocity with the network, for [`run`].
pub fn net_velocity<'a>(
    net: &'a PidNet,
    cond: &'a Conditioning,
) -> impl FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a {
    move |x, t| Ok(net.velocity(cond, x, t, &mut Trace::disabled())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_match_upstream_subsampling() {
        assert_eq!(t_ladder(4).unwrap(), DISTILLED_T.to_vec());
        assert_eq!(t_ladder(3).unwrap(), vec![0.999, 0.866, 0.342, 0.0]);
        assert_eq!(t_ladder(2).unwrap(), vec![0.999, 0.634, 0.0]);
        assert_eq!(t_ladder(1).unwrap(), vec![1.0, 0.0]);
        assert_eq!(t_ladder(5).unwrap_err().code(), "steps");
    }
}
