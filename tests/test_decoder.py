"""The Python Decoder on the candle backend: results, validation, progress, cancel, threads."""

from __future__ import annotations

import _thread
import json
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import pid_native
from pid_native import CancelToken, Decoder, ProgressEvent

TXT = 64  # caption width of the mini network


@pytest.fixture(scope="module")
def dec(mini_checkpoint) -> Decoder:
    return Decoder.open(mini_checkpoint, backend="candle-cpu")


def latents(b: int = 1, h: int = 2, w: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 4, h, w)).astype(np.float32)


def embs(b: int = 1) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((b, 300, TXT)).astype(np.float32)


def test_decode_shape_range_determinism_and_per_image_seeds(dec: Decoder) -> None:
    lat = latents(2)
    out = dec.decode(lat, caption_embs=embs(2), seed=10)
    assert out.shape == (2, 3, 64, 96) and out.dtype == np.float32
    assert np.abs(out).max() <= 1.0
    np.testing.assert_array_equal(out, dec.decode(lat, caption_embs=embs(2), seed=10))
    # seed s gives latent b the seed s + b, so the batch equals single decodes.
    second = dec.decode(lat[1], caption_embs=embs(2)[1:], seed=11)
    np.testing.assert_array_equal(out[1:], second)
    assert np.abs(out - dec.decode(lat, caption_embs=embs(2), seed=[10, 12])).max() > 1e-3


def test_half_and_bfloat16_latents_decode_like_float32(dec: Decoder) -> None:
    lat = latents().astype(np.float16)
    ref = dec.decode(lat.astype(np.float32), caption_embs=embs())
    np.testing.assert_array_equal(dec.decode(lat, caption_embs=embs()), ref)
    bf = latents().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        dec.decode(bf, caption_embs=embs()), dec.decode(bf.astype(np.float32), caption_embs=embs())
    )


def test_compute_dtype_reaches_the_network(dec: Decoder, mini_checkpoint) -> None:
    half = Decoder.open(mini_checkpoint, backend="candle-cpu", compute_dtype="f16")
    ref = dec.decode(latents(), caption_embs=embs())
    out = half.decode(latents(), caption_embs=embs())
    # f16 arithmetic: close to the f32 decode, but not the same computation.
    assert 0 < np.abs(out - ref).max() < 0.1
    with pytest.raises(pid_native.InvalidInputError, match="bf16 compute needs a CUDA device") as info:
        Decoder.open(mini_checkpoint, backend="candle-cpu", compute_dtype="bf16")
    assert info.value.code == "compute_dtype"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"latents": np.zeros((1, 3, 2, 2), np.float32)}, "latent_channels"),
        ({"latents": np.zeros((4, 2), np.float32)}, "latent_rank"),
        ({"latents": np.zeros((1, 4, 2, 2), np.int32)}, "latent_dtype"),
        ({"latents": np.full((1, 4, 2, 2), np.nan, np.float32)}, "latent_not_finite"),
        ({"latents": np.full((1, 4, 2, 2), np.inf, np.float32)}, "latent_not_finite"),
        ({"latents": np.zeros((1, 4, 0, 2), np.float32)}, "latent_shape"),
        ({"sigma": 1.5}, "invalid_argument"),
        ({"sigma": float("nan")}, "invalid_argument"),
        ({"sigma": [0.1, 0.2]}, "sigma_count"),
        ({"seed": -1}, "invalid_argument"),
        ({"seed": 2**64}, "invalid_argument"),
        ({"steps": 0}, "invalid_argument"),
        ({"steps": 5}, "invalid_argument"),
        ({"caption": ["a", "b"]}, "caption_count"),
        ({"caption_embs": np.zeros((1, 300, 7), np.float32)}, "caption_shape"),
        ({"tile": 100}, "tile"),
    ],
)
def test_bad_input_is_rejected_with_a_code(dec: Decoder, kwargs: dict, code: str) -> None:
    args = {"latents": np.zeros((1, 4, 2, 2), np.float32), "caption_embs": embs(), **kwargs}
    lat = args.pop("latents")
    with pytest.raises(pid_native.InvalidInputError) as info:
        dec.decode(lat, **args)
    assert info.value.code == code
    assert str(info.value)


def test_progress_events_in_order(dec: Decoder) -> None:
    events: list[ProgressEvent] = []
    dec.decode(latents(2), caption_embs=embs(2), progress=events.append)
    expected = []
    for i in (1, 2):
        expected.append(f"image {i}/2")
        expected += [f"step {k}/4" for k in range(1, 5)]
    assert [str(e) for e in events] == [*expected, "done"]


def test_cancel_stops_at_the_next_step_and_the_decoder_stays_usable(dec: Decoder) -> None:
    token = CancelToken()
    seen: list[str] = []

    def progress(e: ProgressEvent) -> None:
        seen.append(str(e))
        if str(e) == "step 2/4":
            token.cancel()

    with pytest.raises(pid_native.Cancelled):
        dec.decode(latents(), caption_embs=embs(), progress=progress, cancel=token)
    assert seen == ["image 1/1", "step 1/4", "step 2/4"]
    assert token.cancelled
    assert dec.decode(latents(), caption_embs=embs()).shape == (1, 3, 64, 96)


@pytest.mark.usefixtures("console_sigint")
def test_ctrl_c_interrupts_a_decode(dec: Decoder) -> None:
    def progress(e: ProgressEvent) -> None:
        if str(e) == "step 2/4":
            _thread.interrupt_main()

    with pytest.raises(KeyboardInterrupt):
        dec.decode(latents(), caption_embs=embs(), progress=progress)


def test_callback_exceptions_propagate(dec: Decoder) -> None:
    def progress(e: ProgressEvent) -> None:
        raise RuntimeError("from the callback")

    with pytest.raises(RuntimeError, match="from the callback"):
        dec.decode(latents(), caption_embs=embs(), progress=progress)


def test_budget_refused_before_any_work(mini_checkpoint) -> None:
    small = Decoder.open(mini_checkpoint, backend="candle-cpu", memory_budget=0.01)
    events: list[ProgressEvent] = []
    with pytest.raises(pid_native.BudgetError) as info:
        small.decode(latents(), caption_embs=embs(), progress=events.append)
    assert info.value.code == "memory_budget" and "GiB" in str(info.value)
    assert events == []


def test_forced_tiles_report_every_tile(dec: Decoder) -> None:
    events: list[ProgressEvent] = []
    out = dec.decode(latents(1, 2, 6), caption_embs=embs(), tile=128, progress=events.append)
    assert out.shape == (1, 3, 64, 192)
    assert [str(e) for e in events if e.phase == "tile"] == ["tile 1/2", "tile 2/2"] * 4
    plan = dec.plan((1, 4, 2, 6), tile=128)
    assert not plan.whole and len(plan.tiles) == 2


def test_two_threads_decode_at_once(dec: Decoder) -> None:
    inputs = [(latents(1, seed=s), s) for s in range(4)]
    serial = [dec.decode(lat, caption_embs=embs(), seed=s) for lat, s in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        lat, s = inputs[i]
        results[i] = dec.decode(lat, caption_embs=embs(), seed=s)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(serial):
        np.testing.assert_array_equal(results[i], ref)


def test_missing_checkpoint_names_the_path_and_the_fix(tmp_path) -> None:
    with pytest.raises(pid_native.MissingFileError) as info:
        Decoder.open(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(info.value) and "pid-native fetch" in str(info.value)


_MEASURE_TILED = """
import json, sys
from pathlib import Path
import numpy as np
from pid_native import Decoder

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

ckpt, budget_gib = sys.argv[1], float(sys.argv[2])
start = status("VmRSS")
dec = Decoder.open(ckpt, backend="candle-cpu", memory_budget=budget_gib)
lat = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
plan = dec.plan(lat.shape)
Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark here
out = dec.decode(lat, caption_embs=np.ones((1, 300, 64), np.float32), steps=1)
used = status("VmHWM") - start
print(json.dumps({"whole": plan.whole, "tiles": len(plan.tiles), "predicted": plan.predicted_peak_bytes,
                  "budget": plan.budget_bytes, "used": used, "finite": bool(np.isfinite(out).all())}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures VmHWM (Linux)")
def test_tiled_decode_stays_within_a_small_budget(mini_checkpoint) -> None:
    """A 1024² decode priced at 0.54 GiB whole, given 0.5 GiB: it tiles, and the memory the
    decoder adds to the process (weights + work, measured as VmHWM) stays under the budget."""
    budget = 0.5
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_TILED, str(mini_checkpoint), str(budget)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert not r["whole"] and r["tiles"] > 1 and r["finite"], r
    assert r["budget"] == int(budget * 2**30) and r["predicted"] <= r["budget"], r
    assert 0 < r["used"] <= r["budget"], f"measured {r['used'] / 2**20:.0f} MiB > budget: {r}"
