"""Golden parity of the MLX backend against the upstream references (float32 path).

One test per (golden file, case), parametrised over every file of the kind in
``PID_GOLDENS``, with the tolerances of tests/goldens/README.md: network ``v`` <= 1e-4,
sampler image <= 5e-4, Gemma hidden states <= 1e-4, VAE <= 1e-4 (max abs). A failing
network test lists every trace tensor's error in forward order, so the first diverging
module is visible. The bf16 path (bf16 operands of matmuls and attention) must err from ``v`` by
at most 1.25 times the reference's own bf16 autocast, in mean and in max.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import golden_cases, golden_files, golden_metadata, is_full_topology

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pid-native[mlx]')")

from pid_native.backends.mlx import sampler  # noqa: E402
from pid_native.backends.mlx.caption.gemma import Gemma2Model, GemmaConfig  # noqa: E402
from pid_native.backends.mlx.caption.prompt import select_tokens  # noqa: E402
from pid_native.backends.mlx.config import NetConfig  # noqa: E402
from pid_native.backends.mlx.net import PidNet, Trace  # noqa: E402
from pid_native.backends.mlx.vae import AutoencoderKL  # noqa: E402
from pid_native.backends.mlx.weights import load_pidnet  # noqa: E402
from pid_native.testing.goldens import (  # noqa: E402
    IMAGE_TOL,
    V_TOL,
    case_inputs,
    golden_arrays,
    reduced_precision_error,
    seeded_checkpoint,
)

pytestmark = pytest.mark.mlx

GEMMA_TOL = 1e-4
VAE_TOL = 1e-4


def golden_weights(path: Path) -> dict[str, mx.array]:
    return {k.removeprefix("weights."): v for k, v in mx.load(str(path)).items() if k.startswith("weights.")}


def _pidnet_params(bf16: bool = False) -> list:
    params = []
    for path in golden_files("pidnet"):
        marks = [pytest.mark.slow] if is_full_topology(path) else []
        g = golden_arrays(path)
        cases = golden_cases(path, "x")
        if not bf16 and "out.sample.image" in g:
            cases.append("sample")
        params += [pytest.param(path, case, id=f"{path.stem}-{case}", marks=marks) for case in cases]
    return params


_NETS: dict[tuple[Path, bool], PidNet] = {}


def _net(path: Path, cache: Path, bf16: bool = False) -> PidNet:
    key = (path, bf16)
    if key not in _NETS:
        _NETS.clear()  # keep at most one (possibly 2.7 GB) network resident
        _NETS[key] = load_pidnet(
            seeded_checkpoint(path, cache),
            NetConfig.from_json(golden_metadata(path)["config"]),
            matmul_dtype=mx.bfloat16 if bf16 else None,
        )
    return _NETS[key]


def _inputs(golden: dict[str, np.ndarray], case: str) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in case_inputs(golden, case).items()}


def _trace_report(golden: dict[str, np.ndarray], case: str, trace: Trace) -> str:
    lines = []
    for name, value in (trace.entries or {}).items():
        ref = golden.get(f"trace.{case}.{name}")
        if ref is not None:
            err = np.abs(np.array(value.astype(mx.float32)) - ref).max()
            lines.append(f"  {name}: max abs {err:.3e} (|ref| max {np.abs(ref).max():.3f})")
    return "\n".join(lines)


@pytest.mark.parametrize(("path", "case"), _pidnet_params())
def test_golden_pidnet_mlx(path: Path, case: str, seeded_cache: Path) -> None:
    golden = golden_arrays(path)
    net = _net(path, seeded_cache)
    inp = _inputs(golden, case)
    if case == "sample":
        t_list = json.loads(golden_metadata(path)["t_list"])
        cond = net.condition(inp["y"], inp["lq_latent"], inp["sigma"], tuple(inp["noise"].shape[2:]))
        x0s: list[np.ndarray] = []

        class Keep:
            def before_step(self, event: sampler.StepEvent) -> None:
                pass

            def after_step(self, step: int, x0: mx.array) -> None:
                x0s.append(np.array(x0))

        image = sampler.run(
            inp["noise"], t_list, lambda x, t: net.velocity(cond, x, t), lambda k: inp[f"eps{k}"], Keep()
        )
        err = float(np.abs(np.array(image) - golden["out.sample.image"]).max())
        steps = ", ".join(
            f"x0_step{k}: {np.abs(x0 - golden[f'trace.sample.x0_step{k}']).max():.3e}"
            for k, x0 in enumerate(x0s)
        )
        assert len(x0s) == len(t_list) - 1
        assert err <= IMAGE_TOL, f"sampler image max abs error {err:.3e} > {IMAGE_TOL} ({steps})"
        return
    trace = Trace(enabled=True)
    v = np.array(net(inp["x"], inp["t"], inp["y"], inp["lq_latent"], inp["sigma"], trace))
    err = float(np.abs(v - golden[f"out.{case}.v"]).max())
    assert err <= V_TOL, f"v max abs error {err:.3e} > {V_TOL}; traces:\n{_trace_report(golden, case, trace)}"


@pytest.mark.parametrize(("path", "case"), _pidnet_params(bf16=True))
def test_golden_pidnet_bf16_mlx(path: Path, case: str, seeded_cache: Path) -> None:
    """bf16 operands (the reference's CUDA autocast matmuls) err at most 1.25x as much as autocast."""
    golden = golden_arrays(path)
    net = _net(path, seeded_cache, bf16=True)
    inp = _inputs(golden, case)
    v = np.array(net(inp["x"], inp["t"], inp["y"], inp["lq_latent"], inp["sigma"]))
    ok, errors = reduced_precision_error(golden, case, v)
    assert ok, errors
    assert float(np.abs(v - golden[f"out.{case}.v"]).max()) > V_TOL, "looks like float32 arithmetic"


def _gemma_params() -> list:
    return [
        pytest.param(path, case, id=f"{path.stem}-{case}")
        for path in golden_files("gemma2")
        for case in ("nosoftcap", "softcap", "caption_embs")
    ]


@pytest.mark.parametrize(("path", "case"), _gemma_params())
def test_golden_gemma2_mlx(path: Path, case: str) -> None:
    golden = golden_arrays(path)
    cfg = GemmaConfig.from_dict(json.loads(golden_metadata(path)["config"]))
    model = Gemma2Model(cfg, softcap=case == "softcap")
    model.load_weights(list(golden_weights(path).items()), strict=True)
    hidden = np.array(model(mx.array(golden["in.input_ids"]), mx.array(golden["in.attention_mask"])))
    if case == "caption_embs":
        got, ref = select_tokens(hidden, golden["out.caption_embs"].shape[1]), golden["out.caption_embs"]
    else:
        got, ref = hidden, golden[f"out.hidden_{case}"]
    err = float(np.abs(got - ref).max())
    assert err <= GEMMA_TOL, f"{case} max abs error {err:.3e} > {GEMMA_TOL}"


def _vae_params() -> list:
    return [
        pytest.param(path, case, id=f"{path.stem}-{case}")
        for path in golden_files("sdxl_vae")
        for case in ("encode", "decode")
    ]


@pytest.mark.parametrize(("path", "case"), _vae_params())
def test_golden_sdxl_vae_mlx(path: Path, case: str) -> None:
    golden = golden_arrays(path)
    vae = AutoencoderKL.open(path)
    if case == "encode":
        got = vae.encode_mean(mx.array(golden["in.image"].transpose(0, 2, 3, 1)))
        ref = golden["out.latent_mean_raw"]
    else:
        got = vae.decode_raw(mx.array(golden["in.latent_raw"].transpose(0, 2, 3, 1)))
        ref = golden["out.decoded"]
    err = float(np.abs(np.array(got).transpose(0, 3, 1, 2) - ref).max())
    assert err <= VAE_TOL, f"VAE {case} max abs error {err:.3e} > {VAE_TOL}"
