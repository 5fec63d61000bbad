//! The decode pipeline on the mini network: shapes, determinism, batching, tiling,
//! progress, cancellation and input validation.

use crate::common::mini::mini_net;
use crate::common::{max_abs, max_abs_diff};
use candle_core::{Device, Tensor};
use pid_core::decoder::{decode, Event, Progress, Request};
use pid_core::plan::{plan, DTypes, Plan, Tile};
use pid_core::{Error, PidNet};

const DT: DTypes = DTypes {
    activation: 4,
    weight: 4,
};

fn request(net: &PidNet, b: usize, h: usize, w: usize, seeds: Vec<u64>) -> Request {
    let cfg = net.config();
    let dev = Device::Cpu;
    Request {
        latents: Tensor::randn(0f32, 1., (b, cfg.lq_latent_channels, h, w), &dev).unwrap(),
        captions: Tensor::randn(0f32, 1., (b, 300, cfg.txt_embed_dim), &dev).unwrap(),
        sigma: (0..b).map(|i| 0.1 * i as f32).collect(),
        seeds,
        steps: 4,
    }
}

fn whole(net: &PidNet, req: &Request) -> Plan {
    let (h, w) = (req.latents.dims()[2] * 32, req.latents.dims()[3] * 32);
    plan(net.config(), req.sigma.len(), h, w, DT, u64::MAX, None).unwrap()
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
    let req = request(&net, 2, 2, 3, vec![5, 9]);
    let p = whole(&net, &req);
    let a = decode(&net, &req, &p, &mut ()).unwrap();
    assert_eq!(a.dims(), &[2, 3, 64, 96]);
    assert!(max_abs(&a) <= 1.0);
    assert_eq!(
        max_abs_diff(&a, &decode(&net, &req, &p, &mut ()).unwrap()),
        0.0
    );
    for b in 0..2 {
        let single = Request {
            latents: req.latents.narrow(0, b, 1).unwrap(),
            captions: req.captions.narrow(0, b, 1).unwrap(),
            sigma: vec![req.sigma[b]],
            seeds: vec![req.seeds[b]],
            steps: 4,
        };
        let p1 = whole(&net, &single);
        let one = decode(&net, &single, &p1, &mut ()).unwrap();
        assert_eq!(max_abs_diff(&one, &a.narrow(0, b, 1).unwrap()), 0.0);
    }
    let other = Request {
        seeds: vec![6, 9],
        ..req.clone()
    };
    assert!(max_abs_diff(&a, &decode(&net, &other, &p, &mut ()).unwrap()) > 1e-3);
}

#[test]
fn tiled_path_with_covering_tiles_equals_whole_decode() {
    let net = mini_net();
    let req = request(&net, 1, 2, 3, vec![1]);
    let p = whole(&net, &req);
    let full = Tile {
        y: 0,
        x: 0,
        h: 64,
        w: 96,
    };
    // Two tiles that both cover the image force the tiled code path; blending
    // identical velocities must give back the whole-image decode.
    let tiled = Plan {
        tiles: vec![full, full],
        ..p.clone()
    };
    assert!(!tiled.is_whole());
    let err = max_abs_diff(
        &decode(&net, &req, &p, &mut ()).unwrap(),
        &decode(&net, &req, &tiled, &mut ()).unwrap(),
    );
    assert!(err < 1e-5, "tiled vs whole {err}");
}

#[test]
fn tiled_decode_reports_every_tile_of_every_step() {
    let net = mini_net();
    let req = request(&net, 1, 2, 6, vec![1]);
    let p = plan(net.config(), 1, 64, 192, DT, u64::MAX, Some(128)).unwrap();
    assert_eq!(p.tiles.len(), 2);
    let mut rec = Recorder::default();
    let out = decode(&net, &req, &p, &mut rec).unwrap();
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
    let req = request(&net, 2, 2, 2, vec![1, 2]);
    let p = whole(&net, &req);
    let mut rec = Recorder::default();
    decode(&net, &req, &p, &mut rec).unwrap();
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
    let err = decode(&net, &req, &p, &mut rec).unwrap_err();
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
    let good = request(&net, 1, 2, 2, vec![1]);
    let p = whole(&net, &good);
    let code = |r: Request| decode(&net, &r, &p, &mut ()).unwrap_err().code();
    let dev = Device::Cpu;
    assert_eq!(
        code(Request {
            latents: Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev).unwrap(),
            ..good.clone()
        }),
        "latent_channels"
    );
    assert_eq!(
        code(Request {
            latents: Tensor::zeros((4, 2, 2), candle_core::DType::F32, &dev).unwrap(),
            ..good.clone()
        }),
        "latent_rank"
    );
    let nan = Tensor::full(f32::NAN, (1, 4, 2, 2), &dev).unwrap();
    assert_eq!(
        code(Request {
            latents: nan,
            ..good.clone()
        }),
        "latent_not_finite"
    );
    assert_eq!(
        code(Request {
            sigma: vec![1.5],
            ..good.clone()
        }),
        "sigma_range"
    );
    assert_eq!(
        code(Request {
            seeds: vec![],
            ..good.clone()
        }),
        "batch"
    );
    assert_eq!(
        code(Request {
            steps: 7,
            ..good.clone()
        }),
        "steps"
    );
    assert_eq!(code(request(&net, 1, 3, 2, vec![1])), "plan");
}
