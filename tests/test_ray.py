"""The batch job on a real local Ray cluster (2 CPUs) with the synthetic bundle."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pid_native import batch
from test_cli import run

pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install '.[ray]' (CI installs it)")
import ray

from pid_native import ray as pid_ray

# Ray Data's DataContext sets its own deprecated fields whenever it is built, warning each time.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster for this module; its address, for CLI runs to join."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_job_matches_the_single_process_run(cluster: str, synth_bundle: Path, tmp_path: Path) -> None:
    import pid_native

    lat = tmp_path / "lat"
    lat.mkdir()
    rng = np.random.default_rng(4)
    for i in range(6):
        np.save(lat / f"l{i}.npy", rng.standard_normal((4, 3, 3)).astype(np.float32))
    np.save(lat / "nan.npy", np.full((4, 3, 3), np.nan, np.float32))
    (lat / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    items = batch.collect([lat], tmp_path / "single", "decode", caption="a cat", seed=3)
    dec = pid_native.Decoder.open(synth_bundle, backend="candle-cpu")
    single = {r.item.input.name: r for r in batch.run(dec, items, steps=2)}
    assert sum(r.status == "done" for r in single.values()) == 6

    out = tmp_path / "ray"
    out.mkdir()
    shutil.copy2(tmp_path / "single" / "l0.png", out / "l0.png")  # done before: must stay untouched
    kept = (out / "l0.png").stat()
    settings = ("--caption", "a cat", "--seed", "3", "--steps", "2", "--batch-size", "2")
    r = run("decode", str(lat), "--weights", str(synth_bundle), *settings, "-o", str(out), f"--ray={cluster}")
    assert r.returncode == 1, r.stderr  # two items failed
    lines = [json.loads(line) for line in (out / batch.REPORT_NAME).read_text().splitlines()]
    status = {Path(x["input"]).name: x["status"] for x in lines}
    assert len(lines) == len(status) == 8  # every item reported once
    assert status == {"l0.npy": "skipped", "nan.npy": "failed", "torn.safetensors": "failed"} | {
        f"l{i}.npy": "done" for i in range(1, 6)
    }
    codes = {Path(x["input"]).name: x["code"] for x in lines if x["status"] == "failed"}
    assert codes == {"nan.npy": "latent_not_finite", "torn.safetensors": "latent_unreadable"}
    assert codes == {k: r.code for k, r in single.items() if r.status == "failed"}
    written = [p for x in lines for p in x["outputs"]]
    assert len(written) == len(set(written)) == 5  # no output written twice
    for i in range(6):
        assert (out / f"l{i}.png").read_bytes() == (tmp_path / "single" / f"l{i}.png").read_bytes()
    assert (out / "l0.png").stat().st_mtime_ns == kept.st_mtime_ns

    # Resumed through the Python API on the same cluster: nothing is redone.
    inodes = {p: p.stat().st_ino for p in out.glob("*.png")}
    ray_items = batch.collect([lat], out, "decode", caption="a cat", seed=3)
    again = list(pid_ray.run(ray_items, synth_bundle, workers=2, batch_size=2, steps=2))
    assert sorted(r.status for r in again) == ["failed"] * 2 + ["skipped"] * 6
    assert {p: p.stat().st_ino for p in out.glob("*.png")} == inodes


def test_an_actor_whose_decoder_cannot_open_fails_its_items(cluster: str, synth_bundle: Path) -> None:
    items = [batch.Item(input=Path(f"/nowhere/{i}.npy"), output=Path(f"/nowhere/{i}.png")) for i in range(2)]
    actor = pid_ray.DecodeBatches(str(synth_bundle), backend="no-such-backend")
    rows = actor({pid_ray.ITEM_COLUMN: np.array([item.model_dump_json() for item in items], dtype=object)})
    results = [pid_ray.result({pid_ray.RESULT_COLUMN: row}) for row in rows[pid_ray.RESULT_COLUMN]]
    assert [r.item for r in results] == items
    assert {(r.status, r.code) for r in results} == {("failed", "unknown_backend")}
    assert "no-such-backend" in str(results[0].error)
