//! Positional tables: 2-D NTK RoPE for image tokens, 1-D RoPE for text tokens,
//! and the absolute pixel sin-cos embedding (pid_spec §3.3, §3.4 step 5).
//!
//! Each table is computed with the same floating-point steps as the reference
//! (`pixeldit_official.py:32-200`, `:1345-1357`) so parity holds to f32 rounding.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use crate::config::RopeMode;

/// `torch.linspace(start, end, steps)` in f32, including its symmetric two-sided evaluation.
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// cos/sin tables `(rows x cols, head_dim / 2)` for interleaved-pair RoPE over the tokens
/// `rows x cols` (a tile's, or all) of an `hs x ws` token grid.
///
/// Pair 2k rotates by x_pos * w_k(theta_w), pair 2k+1 by y_pos * w_k(theta_h); positions
/// are `linspace(0, 16, n)` over the whole grid and theta is NTK-scaled per axis of the
/// whole grid against the reference grid, so a tile's tokens rotate as in the whole image.
pub fn image_rope(
    head_dim: usize,
    (hs, ws): (usize, usize),
    rows: Range<usize>,
    cols: Range<usize>,
    ref_grid: (usize, usize),
    mode: RopeMode,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let theta = 10_000.0f64;
    let axis_dim = (head_dim / 2) as f64;
    let ntk = |n: usize, reference: usize| -> f64 {
        match mode {
            RopeMode::NtkAware if axis_dim > 2.0 => {
                (n as f64 / reference as f64).powf(axis_dim / (axis_dim - 2.0))
            }
            _ => 1.0,
        }
    };
    let theta_h = (theta * ntk(hs, ref_grid.0)) as f32;
    let theta_w = (theta * ntk(ws, ref_grid.1)) as f32;
    let nfreq = head_dim / 4;
    let freqs = |base: f32| -> Vec<f32> {
        (0..nfreq)
            .map(|k| 1.0 / base.powf((4 * k) as f32 / head_dim as f32))
            .collect()
    };
    let (fw, fh) = (freqs(theta_w), freqs(theta_h));
    let (xs, ys) = (linspace_f32(0.0, 16.0, ws), linspace_f32(0.0, 16.0, hs));
    let (xs, ys) = (&xs[cols], &ys[rows]);
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(ys.len() * xs.len() * half);
    let mut sin = Vec::with_capacity(ys.len() * xs.len() * half);
    for y in ys {
        for x in xs {
            for k in 0..nfreq {
                for a in [x * fw[k], y * fh[k]] {
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
    }
    let shape = (ys.len() * xs.len(), half);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// cos/sin tables `(len, head_dim / 2)` for the text stream: integer positions, pair j at pos * theta^(-2j/d).
pub fn text_rope(
    head_dim: usize,
    len: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let theta = theta as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in 0..len {
        for f in &freqs {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

/// Absolute 2-D sin-cos embedding of the pixels `rows x cols` (a tile's, or the whole
/// image's), `(rows, cols, dim)` f32, computed in f64 like the reference.
///
/// For pixel (row r, col q): [sin(q w), cos(q w), sin(r w), cos(r w)] with w_k = 10000^(-k / (dim/4)).
pub fn pixel_sincos(
    dim: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    device: &Device,
) -> Result<Tensor> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10_000f64.powf(k as f64 / quarter as f64))
        .collect();
    let axis = |pos: usize| -> Vec<f32> {
        let mut v = Vec::with_capacity(2 * quarter);
        v.extend(omega.iter().map(|o| (pos as f64 * o).sin() as f32));
        v.extend(omega.iter().map(|o| (pos as f64 * o).cos() as f32));
        v
    };
    let (h, w) = (rows.len(), cols.len());
    let cols: Vec<Vec<f32>> = cols.map(axis).collect();
    let rows: Vec<Vec<f32>> = rows.map(axis).collect();
    let mut data = Vec::with_capacity(h * w * dim);
    for row in &rows {
        for col in &cols {
            data.extend_from_slice(col);
            data.extend_from_slice(row);
        }
    }
    Tensor::from_vec(data, (h, w, dim), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_endpoints_and_symmetry() {
        let v = linspace_f32(0.0, 16.0, 7);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[6], 16.0);
        assert_eq!(v[3], 16.0 - (16.0f32 / 6.0) * 3.0);
        assert_eq!(linspace_f32(0.0, 16.0, 1), vec![0.0]);
    }

    #[test]
    fn ntk_theta_matches_spec_table() {
        // pid_spec §3.3: 2048^2 output (128^2 grid), d = 64 -> theta 20 946.
        let axis = 32.0f64;
        let theta = 10_000.0 * 2f64.powf(axis / (axis - 2.0));
        assert_eq!(theta.round(), 20_946.0);
    }

    #[test]
    fn a_window_of_the_tables_equals_the_whole_tables_rows() -> Result<()> {
        let dev = Device::Cpu;
        let (hs, ws) = (6, 9);
        let whole = image_rope(
            72,
            (hs, ws),
            0..hs,
            0..ws,
            (64, 64),
            RopeMode::NtkAware,
            &dev,
        )?;
        let (rows, cols) = (2..5, 3..9);
        let tile = image_rope(
            72,
            (hs, ws),
            rows.clone(),
            cols.clone(),
            (64, 64),
            RopeMode::NtkAware,
            &dev,
        )?;
        for (w, t) in [(&whole.0, &tile.0), (&whole.1, &tile.1)] {
            let w = w.reshape((hs, ws, 36))?.narrow(0, 2, 3)?.narrow(1, 3, 6)?;
            assert_eq!(
                t.reshape((3, 6, 36))?.to_vec3::<f32>()?,
                w.to_vec3::<f32>()?
            );
        }
        let whole = pixel_sincos(16, 0..40, 0..70, &dev)?;
        let tile = pixel_sincos(16, 8..40, 32..64, &dev)?;
        let crop = whole.narrow(0, 8, 32)?.narrow(1, 32, 32)?;
        assert_eq!(tile.to_vec3::<f32>()?, crop.to_vec3::<f32>()?);
        Ok(())
    }
}
