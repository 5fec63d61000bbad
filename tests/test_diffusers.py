"""pid_native.diffusers against a real diffusers StableDiffusionXLPipeline built from tiny configs
with random weights (nothing downloaded), run on the CPU, decoded with the synthetic mini bundle."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_EXTRA = "needs the diffusers extra: pip install '.[test,mlx,diffusers]'"
torch = pytest.importorskip("torch", reason=_EXTRA)
diffusers = pytest.importorskip("diffusers", reason=_EXTRA)
transformers = pytest.importorskip("transformers", reason=_EXTRA)

from PIL import Image  # noqa: E402

import pid_native.diffusers as pid  # noqa: E402
from conftest import imported_by  # noqa: E402
from pid_native import Decoder, InvalidInputError, MissingFileError  # noqa: E402
from pid_native.decoder import as_latents  # noqa: E402
from pid_native.images import LICENSE_NOTE, to_uint8  # noqa: E402
from pid_native.testing.synth import vae_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import diffusers_sdxl as example  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # diffusers' EulerDiscreteScheduler.set_timesteps calls np.array on a torch tensor.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

PROMPT = "a red fox in the snow"
SIZE = 32  # pixels the tiny pipeline generates: a [B, 4, 4, 4] latent, a 128x128 PiD image
STEPS = 6


def _clip_tokenizer(directory: Path) -> Any:
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(directory, model_max_length=77)


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SDXL's pipeline parts at toy size: two CLIP text encoders (hidden 32 each, so 64 for the
    UNet's cross-attention), a two-level text-time UNet, and the SDXL-layout VAE config of the
    synthetic bundle."""
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))
    vocab = len(tokenizer)
    text = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # six time ids of 8 each, plus the second encoder's 32-wide pooled projection
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = diffusers.AutoencoderKL(**{k: v for k, v in vae_config("mini").items() if not k.startswith("_")})
    return {
        "vae": vae.eval(),
        "text_encoder": transformers.CLIPTextModel(text).eval(),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(text).eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": unet.eval(),
    }


def _scheduler(name: str = "EulerDiscreteScheduler") -> Any:
    """SDXL base's scheduler configuration, as the given class."""
    return getattr(diffusers, name)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


@pytest.fixture
def pipe(components: dict[str, Any]) -> Any:
    p = diffusers.StableDiffusionXLPipeline(**components, scheduler=_scheduler(), add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def decoder(synth_bundle: Path) -> Decoder:
    return Decoder.open(synth_bundle, backend="candle-cpu")


def _run(pipe: Any, **kwargs: Any) -> Any:
    args = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "output_type": "latent"}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**args, **kwargs})


def _trajectory(pipe: Any, **kwargs: Any) -> list[np.ndarray]:
    """The latent after every step of an uninterrupted run."""
    seen: list[np.ndarray] = []

    def record(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(tensors["latents"].numpy().copy())
        return tensors

    _run(pipe, callback_on_step_end=record, **kwargs)
    return seen


@contextmanager
def _unet_calls(pipe: Any) -> Iterator[list[int]]:
    """Records one entry per UNet forward: one per denoising step (CFG batches both halves)."""
    calls: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def _vp(sigma_euler: float) -> float:
    return sigma_euler / math.sqrt(sigma_euler * sigma_euler + 1.0)


def test_latent_output_decodes_like_the_decoder(pipe: Any, decoder: Decoder) -> None:
    out = _run(pipe)
    assert isinstance(out.images, torch.Tensor) and out.images.shape == (1, 4, SIZE // 8, SIZE // 8)
    ref = decoder.decode(out.images.numpy(), PROMPT, seed=3)
    assert ref.shape == (1, 3, 4 * SIZE, 4 * SIZE)

    as_np = pid.decode(out, PROMPT, decoder=decoder, output_type="np", seed=3)
    assert as_np.shape == (1, 4 * SIZE, 4 * SIZE, 3) and as_np.dtype == np.float32
    np.testing.assert_array_equal(as_np, ref.transpose(0, 2, 3, 1) * 0.5 + 0.5)
    assert 0.0 <= as_np.min() and as_np.max() <= 1.0

    as_pt = pid.decode(out.images, PROMPT, decoder=decoder, output_type="pt", seed=3)
    assert isinstance(as_pt, torch.Tensor) and as_pt.dtype == torch.float32
    np.testing.assert_array_equal(as_pt.numpy(), ref * 0.5 + 0.5)

    no_dict = _run(pipe, return_dict=False)
    (image,) = pid.decode(no_dict, PROMPT, decoder=decoder, seed=3)
    assert isinstance(image, Image.Image) and image.size == (4 * SIZE, 4 * SIZE)
    assert image.info["pid-license"] == LICENSE_NOTE
    np.testing.assert_array_equal(np.asarray(image), to_uint8(ref)[0])


def test_decoder_takes_torch_tensors_of_any_float_dtype(decoder: Decoder) -> None:
    base = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact = base.float().numpy()  # bf16 values are exact in f16 and f32 too
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        np.testing.assert_array_equal(as_latents(base.to(dtype)), exact)
    graph = base.float().requires_grad_()
    np.testing.assert_array_equal(as_latents(graph.transpose(2, 3)), exact.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(decoder.decode(base, PROMPT, seed=5), decoder.decode(exact, PROMPT, seed=5))
    with pytest.raises(InvalidInputError, match="floating point") as err:
        decoder.decode(torch.ones(1, 4, 2, 2, dtype=torch.int32))
    assert err.value.code == "latent_dtype"


def test_no_torch_import_without_torch_input() -> None:
    code = (
        "import numpy as np, pid_native.diffusers;"
        "from pid_native.decoder import as_latents;"
        "as_latents(np.zeros((1, 4, 2, 2), np.float32))"
    )
    assert imported_by(code, ("torch", "diffusers", "transformers")) == []


@pytest.mark.parametrize("scheduler", pid.EULER_FRAME_SCHEDULERS)
def test_early_stop_at_a_step(pipe: Any, scheduler: str) -> None:
    pipe.scheduler = _scheduler(scheduler)
    trajectory = _trajectory(pipe)
    assert len(trajectory) == STEPS
    stop = pid.EarlyStop(step=4)
    with _unet_calls(pipe) as calls:
        out = _run(pipe, callback_on_step_end=stop)

    assert len(calls) == 4 and stop.stopped and stop.steps == 4
    np.testing.assert_array_equal(out.images.numpy(), trajectory[3])  # the pipeline stopped there too
    sigma = float(pipe.scheduler.sigmas[4])  # the latent after 4 steps sits at sigmas[4]
    assert sigma > 0 and stop.sigma_euler == sigma and stop.sigma == _vp(sigma)
    np.testing.assert_allclose(stop.latents, trajectory[3] / math.sqrt(sigma * sigma + 1.0), rtol=1e-6)


def test_early_stop_at_a_ceiling(pipe: Any) -> None:
    schedule = _scheduler()
    schedule.set_timesteps(STEPS)
    vp = [_vp(float(s)) for s in schedule.sigmas]
    trajectory = _trajectory(pipe)

    stop = pid.EarlyStop(ceiling=(vp[2] + vp[3]) / 2)  # step 3 is the first at or below it
    with _unet_calls(pipe) as calls:
        _run(pipe, callback_on_step_end=stop)
    assert len(calls) == 3 and stop.stopped and stop.steps == 3
    assert stop.sigma_euler == float(schedule.sigmas[3]) and stop.sigma == vp[3]
    np.testing.assert_allclose(stop.latents, trajectory[2] * math.sqrt(1.0 - vp[3] ** 2), rtol=1e-6)

    stop = pid.EarlyStop(ceiling=vp[3])  # "at or below": exactly vp[3] still stops at step 3
    _run(pipe, callback_on_step_end=stop)
    assert stop.steps == 3

    # No step is that clean before the end: the run completes and the clean latent is kept.
    stop = pid.EarlyStop(ceiling=min(v for v in vp if v > 0) / 2)
    out = _run(pipe, callback_on_step_end=stop)
    assert not stop.stopped and stop.steps == STEPS and stop.sigma == 0.0
    np.testing.assert_array_equal(stop.latents, out.images.numpy())


def test_early_stop_in_img2img_counts_from_the_start_step(pipe: Any) -> None:
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    picture = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    trajectory = _trajectory(img2img, image=picture, strength=0.5)
    start = STEPS - int(STEPS * 0.5)  # diffusers skips the first steps of the schedule
    assert len(trajectory) == STEPS - start

    stop = pid.EarlyStop(step=2)
    _run(img2img, image=picture, strength=0.5, callback_on_step_end=stop)
    sigma = float(img2img.scheduler.sigmas[start + 2])
    assert stop.steps == 2 and stop.sigma_euler == sigma
    np.testing.assert_allclose(stop.latents, trajectory[1] / math.sqrt(sigma * sigma + 1.0), rtol=1e-6)


def test_decode_early_stop_hands_latent_and_sigma_to_the_decoder(pipe: Any, decoder: Decoder) -> None:
    stop = pid.EarlyStop(step=4)
    _run(pipe, callback_on_step_end=stop)
    assert 0 < stop.sigma < 1
    got = pid.decode(stop, PROMPT, decoder=decoder, output_type="np", seed=7)
    ref = decoder.decode(stop.latents, PROMPT, sigma=stop.sigma, seed=7)
    np.testing.assert_array_equal(got, ref.transpose(0, 2, 3, 1) * 0.5 + 0.5)
    # PiD's result depends on the noise level it is told, so the sigma did reach it.
    assert not np.array_equal(ref, decoder.decode(stop.latents, PROMPT, sigma=0.0, seed=7))
    with pytest.raises(InvalidInputError, match="sigma comes from the EarlyStop"):
        pid.decode(stop, PROMPT, decoder=decoder, sigma=0.5)


def test_unsupported_scheduler_is_refused_by_name(pipe: Any) -> None:
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    refused = pytest.raises(InvalidInputError, match="DPMSolverMultistepScheduler")
    with _unet_calls(pipe) as calls, refused as err:
        _run(pipe, callback_on_step_end=pid.EarlyStop(step=3))
    assert err.value.code == "unsupported_scheduler" and len(calls) == 1
    assert "EulerDiscreteScheduler.from_config(pipe.scheduler.config)" in str(err.value)


def test_early_stop_misuse(pipe: Any) -> None:
    for args, code in (
        ({}, "early_stop_args"),
        ({"step": 3, "ceiling": 0.1}, "early_stop_args"),
        ({"step": 0}, "early_stop_step"),
        ({"ceiling": 1.5}, "early_stop_ceiling"),
        ({"ceiling": float("nan")}, "early_stop_ceiling"),
    ):
        with pytest.raises(InvalidInputError) as err:
            pid.EarlyStop(**args)
        assert err.value.code == code, args
    stop = pid.EarlyStop(step=STEPS + 1)
    with pytest.raises(InvalidInputError, match=f"runs {STEPS} steps") as err:
        _run(pipe, callback_on_step_end=stop)
    assert err.value.code == "early_stop_step"
    with pytest.raises(InvalidInputError, match="captured nothing") as err:
        pid.decode(pid.EarlyStop(step=2), PROMPT)
    with pytest.raises(InvalidInputError, match="'latents'") as err:
        _run(pipe, callback_on_step_end=pid.EarlyStop(step=2), callback_on_step_end_tensor_inputs=[])
    assert err.value.code == "early_stop_no_latents"


def test_one_early_stop_serves_several_runs(pipe: Any) -> None:
    stop = pid.EarlyStop(step=2)
    first = _run(pipe, callback_on_step_end=stop)
    second = _run(pipe, callback_on_step_end=stop)
    assert stop.steps == 2
    np.testing.assert_array_equal(first.images.numpy(), second.images.numpy())


def test_raw_vae_latents_are_normalised_first(pipe: Any, decoder: Decoder) -> None:
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(image).latent_dist.mean
    from_raw = pid.decode(raw, PROMPT, decoder=decoder, raw_vae=pipe.vae, output_type="np")
    scaled = pid.decode(raw * 0.13025, PROMPT, decoder=decoder, output_type="np")
    np.testing.assert_allclose(from_raw, scaled, atol=1e-6)


def test_bad_inputs_raise_clear_errors(pipe: Any, decoder: Decoder) -> None:
    sd3_like = torch.randn(1, 16, 4, 4)  # SD3 and Flux pipelines' latents have 16 channels
    with pytest.raises(
        InvalidInputError, match=r"16 channels, but this decoder .* takes sdxl latents"
    ) as err:
        pid.decode(sd3_like, PROMPT, decoder=decoder)
    assert err.value.code == "latent_channels"

    pair = _run(pipe, num_images_per_prompt=2)
    with pytest.raises(InvalidInputError, match="num_images_per_prompt") as err:
        pid.decode(pair, ["a fox", "a hare", "a lynx"], decoder=decoder)
    assert err.value.code == "caption_count" and "3 entries but there are 2 latents" in str(err.value)

    with pytest.raises(InvalidInputError, match="output_type='latent'") as err:
        pid.decode(_run(pipe, num_inference_steps=2, output_type="pil"), PROMPT, decoder=decoder)
    assert err.value.code == "latent_type"
    with pytest.raises(InvalidInputError, match="pil, np, pt") as err:
        pid.decode(pair, PROMPT, decoder=decoder, output_type="latent")  # type: ignore[arg-type]
    assert err.value.code == "output_type"


def test_default_decoder_is_opened_once(
    pipe: Any, synth_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pid, "_default", None)
    monkeypatch.setenv("PID_NATIVE_BUNDLE", str(tmp_path / "nothing"))
    with pytest.raises(MissingFileError, match="pid-native fetch --accept-license") as err:
        pid.default_decoder()
    assert err.value.code == "not_provisioned"

    monkeypatch.setenv("PID_NATIVE_BUNDLE", str(synth_bundle))
    first = pid.default_decoder()
    assert pid.default_decoder() is first
    (image,) = pid.decode(_run(pipe, num_inference_steps=2), PROMPT)
    assert image.size == (4 * SIZE, 4 * SIZE) and pid.default_decoder() is first


def test_example_script(
    components: dict[str, Any], synth_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/diffusers_sdxl.py end to end, with the tiny pipeline saved as a local model."""
    model = tmp_path / "tiny-sdxl"
    tiny = diffusers.StableDiffusionXLPipeline(**components, scheduler=_scheduler(), add_watermarker=False)
    tiny.save_pretrained(model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["a fox", "--model", str(model), "--bundle", str(synth_bundle), "--steps", "4", "--stop-at", "3"]
    size = ["--width", str(SIZE), "--height", str(SIZE)]
    path = example.main([*args, *size, "-o", str(tmp_path / "fox.png")])
    with Image.open(path) as png:
        assert png.size == (4 * SIZE, 4 * SIZE) and png.info["pid-license"] == LICENSE_NOTE
