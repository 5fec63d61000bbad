"""Batch decode and upscale: pid_native.batch and the CLI over many inputs, on the synthetic bundle."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pid_native
from pid_native import batch
from pid_native.images import to_uint8
from test_cli import EXE, run


@pytest.fixture(scope="module")
def dec(synth_bundle: Path) -> pid_native.Decoder:
    return pid_native.Decoder.open(synth_bundle, backend="candle-cpu")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def report(path: Path) -> dict[str, dict]:
    """The JSONL report, keyed by input file name."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_name = {Path(r["input"]).name: r for r in lines}
    assert len(by_name) == len(lines), "an item was reported twice"
    return by_name


def one_by_one(dec: pid_native.Decoder, latents: np.ndarray, item: batch.Item, steps: int = 4) -> np.ndarray:
    """What a single ``decode`` of this item's latents writes, as ``[B, H, W, 3]`` uint8."""
    return to_uint8(dec.decode(latents, item.caption, seed=item.seed, sigma=item.sigma, steps=steps))


def test_upscale_directory_with_a_corrupt_file_and_a_done_output(synth_bundle: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name, size in (("a", (48, 32)), ("b", (48, 32)), ("c", (48, 32)), ("d", (33, 40))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(src / f"{name}.png")
    (src / "x_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "notes.txt").write_text("not an image: ignored")
    # a.png was upscaled before, one at a time: the batch run must keep that output untouched.
    r = run(
        "upscale", str(src / "a.png"), "--weights", str(synth_bundle), "--seed", "5", "-o", str(out / "a.png")
    )
    assert r.returncode == 0, r.stderr
    before = (out / "a.png").stat()

    r = run(
        "upscale",
        str(src),
        "--weights",
        str(synth_bundle),
        "--seed",
        "5",
        "--batch-size",
        "2",
        "-o",
        str(out),
    )
    assert r.returncode == 1, r.stderr  # one item failed
    lines = report(out / batch.REPORT_NAME)
    assert {k: v["status"] for k, v in lines.items()} == {
        "a.png": "skipped",
        "b.png": "done",
        "c.png": "done",
        "d.png": "done",
        "x_broken.png": "failed",
    }
    broken = lines["x_broken.png"]
    assert (
        broken["code"] == "image_unreadable" and broken["outputs"] == [] and "x_broken.png" in broken["error"]
    )
    assert "1 skipped" in r.stdout and "1 failed" in r.stdout and "FAILED" in r.stdout
    after = (out / "a.png").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "d.png", batch.REPORT_NAME]
    with Image.open(out / "d.png") as img:
        assert img.size == (128, 128) and "NSCLv1" in img.text["pid-license"]

    # b.png and c.png were decoded in one call: b.png is what it is alone.
    r = run(
        "upscale",
        str(src / "b.png"),
        "--weights",
        str(synth_bundle),
        "--seed",
        "5",
        "-o",
        str(tmp_path / "b1.png"),
    )
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(pixels(out / "b.png"), pixels(tmp_path / "b1.png"))


def write_manifest(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Latent files and a manifest naming them (different captions, seeds, sigmas; one file of two)."""
    rng = np.random.default_rng(2)
    latents = {f"l{i}.npy": rng.standard_normal((1, 4, 3, 3)).astype(np.float32) for i in range(6)}
    latents["pair.npy"] = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    (tmp_path / "lat").mkdir()
    for name, lat in latents.items():
        np.save(tmp_path / "lat" / name, lat)
    lines = [
        {
            "input": f"lat/l{i}.npy",
            "caption": ["a cat", "", "a dog"][i % 3],
            "seed": 10 * i,
            "sigma": 0.1 * (i % 2),
        }
        for i in range(6)
    ]
    lines[2]["output"] = "named/second.png"
    lines.append({"input": "lat/pair.npy", "caption": "two", "seed": 7})
    manifest = tmp_path / "job.jsonl"
    manifest.write_text("\n".join(map(json.dumps, lines)) + "\n")
    return manifest, latents


def test_api_run_cancelled_mid_decode_then_resumed_matches_one_by_one(dec, tmp_path: Path) -> None:
    manifest, latents = write_manifest(tmp_path)
    out = tmp_path / "out"
    items = batch.collect([manifest], out, "decode", caption="default")
    assert items[2].output == out / "named" / "second.png" and items[6].caption == "two"

    token = pid_native.CancelToken()
    finished: list[batch.ItemResult] = []

    def cancel_in_the_third_decode(event: pid_native.ProgressEvent) -> None:
        if len(finished) == 2 and event.phase == "step" and event.index == 1:
            token.cancel()

    with pytest.raises(pid_native.Cancelled):
        for result in batch.run(dec, items, steps=2, progress=cancel_in_the_third_decode, cancel=token):
            finished.append(result)
    assert [r.status for r in finished] == ["done", "done"]
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == [Path("l0.png"), Path("l1.png")]  # the third, cancelled mid-decode, left nothing

    resumed = list(batch.run(dec, items, steps=2, batch_size=3))
    assert [r.status for r in resumed] == ["skipped"] * 2 + ["done"] * 5
    assert resumed[-1].outputs == [out / "pair_0.png", out / "pair_1.png"]
    for item in items:
        expected = one_by_one(dec, latents[item.input.name], item, steps=2)
        for output, want in zip(item.outputs(len(expected)), expected, strict=True):
            np.testing.assert_array_equal(pixels(output), want, err_msg=str(output))
    # Nothing left to do: a third run skips every item, including the file of two latents.
    assert {r.status for r in batch.run(dec, items, steps=2)} == {"skipped"}


@pytest.mark.usefixtures("console_sigint")
def test_cli_manifest_interrupted_by_ctrl_c_then_resumed(synth_bundle: Path, tmp_path: Path) -> None:
    manifest, _ = write_manifest(tmp_path)
    out = tmp_path / "out"
    cmd = [EXE, "decode", str(manifest), "--weights", str(synth_bundle), "--steps", "2", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "item(s)" in stdout
    assert not list(out.rglob("*.partial"))
    done_before = {p: p.stat().st_ino for p in out.rglob("*.png")}
    assert 2 <= len(done_before) < 8
    interrupted = report(out / batch.REPORT_NAME)
    assert interrupted and {r["status"] for r in interrupted.values()} == {"done"}

    r = run(*cmd[1:])
    assert r.returncode == 0, r.stderr
    resumed = report(out / batch.REPORT_NAME)
    assert len(resumed) == 7 and {r["status"] for r in resumed.values()} == {"done", "skipped"}
    assert all(resumed[name]["status"] == "skipped" for name in interrupted)
    assert {p: p.stat().st_ino for p in done_before} == done_before  # none written twice
    assert len(list(out.rglob("*.png"))) == 8


def test_bad_jobs_fail_before_any_work(synth_bundle: Path, tmp_path: Path) -> None:
    lat = tmp_path / "lat"
    lat.mkdir()
    np.save(lat / "x.npy", np.zeros((4, 2, 2), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
    with pytest.raises(pid_native.InvalidInputError, match="would both write") as e:
        batch.collect([lat, tmp_path / "x.npy"], tmp_path / "out", "decode")
    assert e.value.code == "output_clash"
    with pytest.raises(pid_native.InvalidInputError, match="replace an input"):
        batch.collect([tmp_path / "in.png"], tmp_path, "upscale")
    with pytest.raises(pid_native.InvalidInputError, match="no files match") as e:
        batch.collect([str(tmp_path / "*.webp")], tmp_path / "out", "upscale")
    assert e.value.code == "no_inputs"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "lat/x.npy"}\n\n{"input": "lat/x.npy", "steps": 2}\n')
    with pytest.raises(pid_native.InvalidInputError, match=r"bad.jsonl line 3: .*steps") as e:
        batch.collect([bad], tmp_path / "out", "decode")
    assert e.value.code == "manifest"
    bad.write_text('{"input": "lat/x.npy", "seed": -1}\n')
    with pytest.raises(pid_native.InvalidInputError, match=r"line 1: .*seed"):
        batch.collect([bad], tmp_path / "out", "decode")

    weights = ("--weights", str(synth_bundle))
    r = run("decode", str(lat), *weights, "-o", str(tmp_path / "one.png"))
    assert r.returncode == 1 and "output_dir" in r.stderr and "-o DIR" in r.stderr
    r = run("decode", str(lat / "x.npy"), *weights, "--overwrite", "-o", str(tmp_path / "one.png"))
    assert r.returncode == 1 and "batch_only" in r.stderr
    r = run("decode", str(bad), *weights, "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "[manifest]" in r.stderr and "line 1" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "one.png").exists()


def test_overwrite_redoes_and_damaged_outputs_are_redone(dec, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(3).standard_normal((4, 2, 2)).astype(np.float32))
    items = batch.collect([tmp_path / "x.npy"], tmp_path / "out", "decode", seed=4)
    assert [r.status for r in batch.run(dec, items, steps=1)] == ["done"]
    good = (tmp_path / "out" / "x.png").read_bytes()
    (tmp_path / "out" / "x.png").write_bytes(good[: len(good) // 2])  # a truncated PNG is not complete
    assert [r.status for r in batch.run(dec, items, steps=1)] == ["done"]
    assert (tmp_path / "out" / "x.png").read_bytes() == good
    inode = (tmp_path / "out" / "x.png").stat().st_ino
    assert [r.status for r in batch.run(dec, items, steps=1)] == ["skipped"]
    assert [r.status for r in batch.run(dec, items, steps=1, overwrite=True)] == ["done"]
    assert (tmp_path / "out" / "x.png").stat().st_ino != inode


def test_ray_without_ray_installed_names_the_extra(synth_bundle: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "site" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray (hidden by the test)')\n")
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2), np.float32))
    out = tmp_path / "out"
    cmd = ("decode", str(tmp_path / "x.npy"), "--ray", "-o", str(out), "--weights", str(synth_bundle))
    r = run(*cmd, env={"PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 1 and "[ray_missing]" in r.stderr and "pid-native[ray]" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and not out.exists()
