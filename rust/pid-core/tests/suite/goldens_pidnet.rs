//! Golden parity of the network and sampler against the upstream PyTorch reference,
//! over every `kind = pidnet` file in `PID_GOLDENS` (tolerances: tests/goldens/README.md).

use crate::common::{golden_files, max_abs, max_abs_diff, seeded_checkpoint, Golden};
use candle_core::{DType, Device, Tensor};
use pid_core::net::{PidNet, Trace};
use pid_core::sampler::{self, StepObserver};
use pid_core::weights::{read_metadata, Checkpoint};
use pid_core::NetConfig;

const V_TOL: f32 = 1e-4;
const IMAGE_TOL: f32 = 5e-4;

fn load_net(golden: &Golden) -> PidNet {
    let meta = read_metadata(&golden.path).unwrap();
    let cfg = NetConfig::from_json(&meta["config"]).unwrap();
    let vb = match meta.get("weights").map(String::as_str) {
        Some("seeded-v1") => {
            let salt = meta.get("weights_salt").cloned().unwrap_or_default();
            let ckpt = Checkpoint::open(seeded_checkpoint(&cfg.expected_tensors(), &salt)).unwrap();
            ckpt.validate(&cfg).unwrap();
            // bf16-resident like a real decode: it halves memory for the full topology.
            ckpt.var_builder(DType::BF16, &Device::Cpu).unwrap()
        }
        Some("embedded") => {
            let st =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(&golden.path) }.unwrap();
            candle_nn::VarBuilder::from_backend(Box::new(st), DType::F32, Device::Cpu).pp("weights")
        }
        other => panic!(
            "{}: unknown weights recipe {other:?}",
            golden.path.display()
        ),
    };
    PidNet::new(&cfg, vb, DType::F32).unwrap()
}

/// Errors of every recorded trace against the golden, in forward order.
fn trace_report(golden: &Golden, case: &str, trace: Vec<(String, Tensor)>) -> String {
    let mut lines = Vec::new();
    for (name, t) in trace {
        let key = format!("trace.{case}.{name}");
        if golden.has(&key) {
            let g = golden.get(&key);
            lines.push(format!(
                "  {name}: max abs {:.3e} (|ref| max {:.3})",
                max_abs_diff(&t, &g),
                max_abs(&g)
            ));
        }
    }
    lines.join("\n")
}

fn check_forward(golden: &Golden, net: &PidNet, case: &str) {
    let inp = |n: &str| golden.get(&format!("in.{case}.{n}"));
    let mut trace = Trace::enabled();
    let v = net
        .forward(
            &inp("x"),
            &inp("t"),
            &inp("y"),
            &inp("lq_latent"),
            &inp("sigma"),
            &mut trace,
        )
        .unwrap();
    let err = max_abs_diff(&v, &golden.get(&format!("out.{case}.v")));
    eprintln!(
        "{} {case}: v max abs error {err:.3e}",
        golden.path.display()
    );
    assert!(
        err <= V_TOL,
        "{} case {case}: v max abs error {err:.3e} > {V_TOL:e}; traces:\n{}",
        golden.path.display(),
        trace_report(golden, case, trace.into_entries())
    );
}

struct X0Trace(Vec<Tensor>);

impl StepObserver for X0Trace {
    fn after_step(&mut self, _step: usize, x0: &Tensor) {
        self.0.push(x0.clone());
    }
}

fn check_sample(golden: &Golden, net: &PidNet) {
    let meta = read_metadata(&golden.path).unwrap();
    let t_list: Vec<f32> = serde_json::from_str(&meta["t_list"]).unwrap();
    let inp = |n: &str| golden.get(&format!("in.sample.{n}"));
    let noise = inp("noise");
    let (_, _, h, w) = noise.dims4().unwrap();
    let cond = net
        .condition(
            &inp("y"),
            &inp("lq_latent"),
            &inp("sigma"),
            (h, w),
            &mut Trace::disabled(),
        )
        .unwrap();
    let mut x0s = X0Trace(Vec::new());
    let image = sampler::run(
        &noise,
        &t_list,
        sampler::net_velocity(net, &cond),
        |k| Ok(inp(&format!("eps{k}"))),
        &mut x0s,
    )
    .unwrap();
    let err = max_abs_diff(&image, &golden.get("out.sample.image"));
    eprintln!(
        "{} sample: image max abs error {err:.3e}",
        golden.path.display()
    );
    let steps: Vec<String> = x0s
        .0
        .iter()
        .enumerate()
        .map(|(k, x0)| {
            format!(
                "x0_step{k}: {:.3e}",
                max_abs_diff(x0, &golden.get(&format!("trace.sample.x0_step{k}")))
            )
        })
        .collect();
    assert!(
        err <= IMAGE_TOL,
        "{}: sampler image max abs error {err:.3e} > {IMAGE_TOL:e} ({})",
        golden.path.display(),
        steps.join(", ")
    );
}

#[test]
fn golden_pidnet_forward_and_sampler() {
    for path in golden_files("pidnet") {
        let golden = Golden::open(&path);
        let net = load_net(&golden);
        for case in golden.cases_with("x") {
            check_forward(&golden, &net, &case);
        }
        if golden.has("out.sample.image") {
            check_sample(&golden, &net);
        }
        eprintln!("parity ok: {}", path.display());
    }
}
