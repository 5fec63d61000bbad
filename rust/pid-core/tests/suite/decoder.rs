//! The decode pipeline on the mini network: shapes, determinism, batching, tiling,
//! progress, cancellation and input validation.

use crate::common::mini::{mini_net, mini_net_edited};
use crate::common::{max_abs, max_abs_diff};
use candle_core::{DType, Device, IndexOp, Tensor};
use pid_core::decoder::{decode, image_noise, Event, Inputs, Progress, Request};
use pid_core::net::Trace;
use pid_core::noise::Stream;
use pid_core::plan::{plan, DTypes, Plan, Tile};
use pid_core::sampler::{self, t_ladder};
use pid_core::{Error, PidNet};

const DT: DTypes = DTypes {
    activation: 4,
    weight: 4,
};

fn inputs(net: &PidNet, b: usize, h: usize, w: usize, seeds: Vec<u64>) -> Inputs {
    let cfg = net.config();
    let dev = Device::Cpu;
    Inputs {
        latents: Tensor::randn(0f32, 1., (b, cfg.lq_latent_channels, h, w), &dev).unwrap(),
        captions: Tensor::randn(0f32, 1., (b, 300, cfg.txt_embed_dim), &dev).unwrap(),
        sigma: (0..b).map(|i| 0.1 * i as f32).collect(),
        seeds,
        steps: 4,
    }
}

/// The planner's plan for `inputs` (whole image within an unbounded budget, or `tile`).
fn plan_for(net: &PidNet, inputs: &Inputs, tile: Option<usize>) -> Plan {
    let (h, w) = (inputs.latents.dims()[2] * 32, inputs.latents.dims()[3] * 32);
    plan(net.config(), inputs.sigma.len(), h, w, DT, u64::MAX, tile).unwrap()
}

fn request(net: &PidNet, inputs: Inputs, tile: Option<usize>) -> Request {
    let p = plan_for(net, &inputs, tile);
    Request::new(net.config(), inputs, p).unwrap()
}

#[derive(Default)]
struct Recorder {
    events: Vec<Event>,
    cancel_at: Option<Event>,
}

impl Progress for Recorder {
    fn report(&mut self, e: Event) -> pid_core::Result<()> {
        self.events.push(e);
        if self.cancel_at == Some(e) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

#[test]
fn decode_is_deterministic_in_range_and_batch_equals_singles() {
    let net = mini_net();
    let inp = inputs(&net, 2, 2, 3, vec![5, 9]);
    let req = request(&net, inp.clone(), None);
    let a = decode(&net, &req, &mut ()).unwrap();
    assert_eq!(a.dims(), &[2, 3, 64, 96]);
    assert!(max_abs(&a) <= 1.0);
    assert_eq!(max_abs_diff(&a, &decode(&net, &req, &mut ()).unwrap()), 0.0);
    for b in 0..2 {
        let single = Inputs {
            latents: inp.latents.narrow(0, b, 1).unwrap(),
            captions: inp.captions.narrow(0, b, 1).unwrap(),
            sigma: vec![inp.sigma[b]],
            seeds: vec![inp.seeds[b]],
            steps: 4,
        };
        let one = decode(&net, &request(&net, single, None), &mut ()).unwrap();
        assert_eq!(max_abs_diff(&one, &a.narrow(0, b, 1).unwrap()), 0.0);
    }
    let other = Inputs {
        seeds: vec![6, 9],
        ..inp
    };
    let b = decode(&net, &request(&net, other, None), &mut ()).unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-3);
}

#[test]
fn a_one_tile_plan_decodes_exactly_as_the_sampler_on_the_whole_image() {
    let net = mini_net();
    let inp = inputs(&net, 1, 2, 3, vec![1]);
    let req = request(&net, inp.clone(), None);
    assert_eq!(req.plan().tiles, [Tile::whole(64, 96)]);
    let got = decode(&net, &req, &mut ()).unwrap();
    let dev = Device::Cpu;
    let sigma = Tensor::new(inp.sigma.as_slice(), &dev).unwrap();
    let cond = net
        .condition(
            &inp.captions,
            &inp.latents,
            &sigma,
            (64, 96),
            &mut Trace::disabled(),
        )
        .unwrap();
    let noise = |s: Stream| image_noise(1, s, 64, 96, &dev);
    let want = sampler::run(
        &noise(Stream::Initial).unwrap(),
        &t_ladder(4).unwrap(),
        sampler::net_velocity(&net, &cond),
        |k| noise(Stream::Renoise(k as u32)),
        &mut (),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

#[test]
fn tiled_path_with_covering_tiles_equals_whole_decode() {
    let net = mini_net();
    let inp = inputs(&net, 1, 2, 3, vec![1]);
    let whole = plan_for(&net, &inp, None);
    // Two tiles that both cover the image force the tiled code path; blending
    // identical velocities must give back the whole-image decode.
    let tiled = Plan {
        tiles: vec![Tile::whole(64, 96); 2],
        ..whole.clone()
    };
    assert!(!tiled.is_whole());
    let cfg = net.config();
    let err = max_abs_diff(
        &decode(
            &net,
            &Request::new(cfg, inp.clone(), whole).unwrap(),
            &mut (),
        )
        .unwrap(),
        &decode(&net, &Request::new(cfg, inp, tiled).unwrap(), &mut ()).unwrap(),
    );
    assert!(err < 1e-5, "tiled vs whole {err}");
}

#[test]
fn a_tiles_positions_and_rotations_are_the_whole_images_at_its_pixels() {
    let net = mini_net();
    let inp = inputs(&net, 1, 4, 6, vec![1]);
    let p = plan_for(&net, &inp, Some(96));
    assert!(p.tiles.len() > 2, "{:?}", p.tiles);
    let sigma = Tensor::new(&[0.3f32], &Device::Cpu).unwrap();
    let (h, w) = (128, 192);
    let cond = |tile: &Tile| {
        let (y, z) = (&inp.captions, &inp.latents);
        net.condition_window(y, z, &sigma, (h, w), tile, &mut Trace::disabled())
            .unwrap()
    };
    let whole = cond(&Tile::whole(h, w));
    let (patch, pixel) = whole.image_ropes();
    for tile in &p.tiles {
        let c = cond(tile);
        assert_eq!(c.size(), (tile.h, tile.w));
        let pos = whole.pixel_positions();
        let want = pos
            .i((tile.y..tile.y + tile.h, tile.x..tile.x + tile.w))
            .unwrap();
        assert_eq!(max_abs_diff(c.pixel_positions(), &want), 0.0, "{tile:?}");
        // Patch grid 8 x 12; the tile's rows of the whole image's tables, row-major.
        let (r0, c0, rh, rw) = (tile.y / 16, tile.x / 16, tile.h / 16, tile.w / 16);
        let rows: Vec<u32> = (r0..r0 + rh)
            .flat_map(|r| (c0..c0 + rw).map(move |c| (r * 12 + c) as u32))
            .collect();
        let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let (tile_patch, tile_pixel) = c.image_ropes();
        for (got, all) in [(tile_patch, patch), (tile_pixel, pixel)] {
            for (g, a) in [(&got.cos, &all.cos), (&got.sin, &all.sin)] {
                let want = a.index_select(&idx, 0).unwrap();
                assert_eq!(max_abs_diff(g, &want), 0.0, "{tile:?}");
            }
        }
    }
}

/// Zero every attention and LQ contribution (the gate_msa rows of every adaLN modulation and
/// the LQ output heads): what is left of the network is local to a patch, so tiling may
/// change nothing but the order of additions. Noise, seeds, pixel positions, the blend and
/// the latent crops are all still in play.
#[test]
fn tiled_decode_equals_whole_when_nothing_reaches_across_patches() {
    let local = mini_net_edited(|name, t| {
        let zero_rows = |t: Tensor, rows: &dyn Fn(usize) -> bool| {
            let keep: Vec<f32> = (0..t.dim(0).unwrap())
                .map(|r| if rows(r) { 0.0 } else { 1.0 })
                .collect();
            let shape: Vec<usize> = (0..t.rank())
                .map(|a| if a == 0 { keep.len() } else { 1 })
                .collect();
            let keep = Tensor::new(keep.as_slice(), t.device())
                .unwrap()
                .reshape(shape)
                .unwrap();
            t.to_dtype(DType::F32)
                .unwrap()
                .broadcast_mul(&keep)
                .unwrap()
        };
        let d = 128; // hidden size of the mini network; PiT pixel dim 16
        if name.starts_with("lq_proj.output_heads.") {
            t.zeros_like().unwrap()
        } else if name.contains(".adaLN_modulation_img.0.")
            || name.contains(".adaLN_modulation_txt.0.")
        {
            zero_rows(t, &|r| (2 * d..3 * d).contains(&r))
        } else if name.contains("pixel_blocks.") && name.contains(".adaLN_modulation.0.") {
            zero_rows(t, &|r| (r % (6 * 16)) / 16 == 2)
        } else {
            t
        }
    });
    let inp = inputs(&local, 1, 4, 6, vec![7]);
    let whole = decode(&local, &request(&local, inp.clone(), None), &mut ()).unwrap();
    let tiled_req = request(&local, inp.clone(), Some(96));
    assert!(tiled_req.plan().tiles.len() > 2);
    let tiled = decode(&local, &tiled_req, &mut ()).unwrap();
    let err = max_abs_diff(&tiled, &whole);
    assert!(err <= 1e-5, "patch-local network, tiled vs whole: {err:e}");
    // The full network attends across tiles, so there tiling does change the image.
    let net = mini_net();
    let whole = decode(&net, &request(&net, inp.clone(), None), &mut ()).unwrap();
    let tiled = decode(&net, &request(&net, inp, Some(96)), &mut ()).unwrap();
    assert!(max_abs_diff(&tiled, &whole) > 1e-3);
}

#[test]
fn tiled_decode_reports_every_tile_of_every_step() {
    let net = mini_net();
    let req = request(&net, inputs(&net, 1, 2, 6, vec![1]), Some(128));
    assert_eq!(req.plan().tiles.len(), 2);
    let mut rec = Recorder::default();
    let out = decode(&net, &req, &mut rec).unwrap();
    assert_eq!(out.dims(), &[1, 3, 64, 192]);
    let tiles = rec
        .events
        .iter()
        .filter(|e| matches!(e, Event::Tile { .. }))
        .count();
    assert_eq!(tiles, 2 * 4);
}

#[test]
fn progress_order_and_cancellation() {
    let net = mini_net();
    let req = request(&net, inputs(&net, 2, 2, 2, vec![1, 2]), None);
    let mut rec = Recorder::default();
    decode(&net, &req, &mut rec).unwrap();
    let mut expected = Vec::new();
    for index in 0..2 {
        expected.push(Event::Image { index, count: 2 });
        expected.extend((0..4).map(|step| Event::Step { step, total: 4 }));
    }
    assert_eq!(rec.events, expected);

    let mut rec = Recorder {
        cancel_at: Some(Event::Step { step: 2, total: 4 }),
        ..Default::default()
    };
    let err = decode(&net, &req, &mut rec).unwrap_err();
    assert_eq!(err.code(), "cancelled");
    assert_eq!(
        rec.events.len(),
        4,
        "stopped at the first boundary after cancel"
    );
}

#[test]
fn bad_requests_are_refused_with_codes() {
    let net = mini_net();
    let good = inputs(&net, 1, 2, 2, vec![1]);
    let p = plan_for(&net, &good, None);
    let code = |i: Inputs| Request::new(net.config(), i, p.clone()).unwrap_err().code();
    let dev = Device::Cpu;
    assert_eq!(
        code(Inputs {
            latents: Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap(),
            ..good.clone()
        }),
        "latent_channels"
    );
    assert_eq!(
        code(Inputs {
            latents: Tensor::zeros((4, 2, 2), DType::F32, &dev).unwrap(),
            ..good.clone()
        }),
        "latent_rank"
    );
    let nan = Tensor::full(f32::NAN, (1, 4, 2, 2), &dev).unwrap();
    assert_eq!(
        code(Inputs {
            latents: nan,
            ..good.clone()
        }),
        "latent_not_finite"
    );
    assert_eq!(
        code(Inputs {
            sigma: vec![1.5],
            ..good.clone()
        }),
        "sigma_range"
    );
    assert_eq!(
        code(Inputs {
            seeds: vec![],
            ..good.clone()
        }),
        "batch"
    );
    assert_eq!(
        code(Inputs {
            steps: 7,
            ..good.clone()
        }),
        "steps"
    );
    assert_eq!(code(inputs(&net, 1, 3, 2, vec![1])), "plan");
    // A plan that leaves pixels uncovered, or whose tiles are off the latent grid.
    for tiles in [
        vec![Tile {
            y: 0,
            x: 0,
            h: 32,
            w: 64,
        }],
        vec![
            Tile {
                y: 0,
                x: 0,
                h: 64,
                w: 48,
            },
            Tile {
                y: 0,
                x: 16,
                h: 64,
                w: 48,
            },
        ],
    ] {
        let bad = Plan { tiles, ..p.clone() };
        let err = Request::new(net.config(), good.clone(), bad).unwrap_err();
        assert_eq!(err.code(), "plan", "{err}");
    }
}
