"""Provisioning: the real huggingface_hub client against a fake Hub on 127.0.0.1.

Every test that downloads runs the client in a fresh interpreter (``fakehub.py`` as a
script, or ``python -m pid_native.cli``) with ``HF_ENDPOINT``/``HF_HOME`` set before
huggingface_hub is imported, exactly as a user's environment would. The fake Hub serves
the manifest's real repository names with the files of a synthetic mini bundle
(``pid_native.testing.synth``: seeded weights); ``nvidia/PiD`` holds the students as upstream
publishes them, ``.pth`` files beside the training-only networks, shrunk (the test manifest
says so). Nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from conftest import GOLDENS
from fakehub import FakeHub, FakeRepo
from pid_native import MissingFileError, ProvisioningError, WeightsError, _native
from pid_native.errors import InvalidInputError
from pid_native.provisioning import (
    build_bundle,
    default_bundle_dir,
    inspect_bundle,
    licences,
    load_bundle,
    load_manifest,
    verify,
)
from pid_native.provisioning.bundle import BUNDLE_FILE, LOCK_FILE
from pid_native.provisioning.manifest import PACKAGED_MANIFEST
from pid_native.provisioning.verify import safetensors_index
from pid_native.testing.goldens import seeded_checkpoint
from pid_native.testing.pth import write_pth
from pid_native.testing.synth import CHECKPOINT as SYNTH_CKPT
from pid_native.testing.synth import write_bundle

FAKEHUB = Path(__file__).with_name("fakehub.py")
CKPT = "checkpoints/PiD_res2kto4k_sr4x_official_sdxl_distill_4step/model_ema_bf16.pth"
FLUX_CKPT = "checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step/model_ema_bf16.pth"
PID_REPO = "nvidia/PiD"
GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"
GATED_GEMMA = "google/gemma-2-2b-it"
VAE_REPO = "stabilityai/sdxl-vae"


# ---------------------------------------------------------------- synthetic repositories


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic mini bundle (pid_native.testing.synth): the content the fake Hub serves."""
    return write_bundle(tmp_path_factory.mktemp("synth") / "mini", preset="mini")


def _shards() -> dict[str, bytes]:
    """Tiny weights split as google/gemma-2-2b-it splits its own: an index and two shards."""
    rng = np.random.default_rng(1)
    first = {"embed_tokens.weight": rng.standard_normal((32, 8)).astype(np.float32)}
    second = {"norm.weight": np.ones(8, np.float32)}
    index = {
        "metadata": {"total_size": 33 * 8 * 4},
        "weight_map": {
            "embed_tokens.weight": "model-00001-of-00002.safetensors",
            "norm.weight": "model-00002-of-00002.safetensors",
        },
    }
    return {
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": save(first),
        "model-00002-of-00002.safetensors": save(second),
    }


def published(checkpoint: Path, out: Path) -> bytes:
    """A student as upstream publishes it: a ``.pth`` of ``net.*`` beside a training-only network."""
    arrays = {f"net.{k}": v for k, v in _native.checkpoint_arrays(str(checkpoint)).items()}
    arrays["fake_score.x_embedder.weight"] = ("f32", np.ones((2, 2), np.float32))
    return write_pth(arrays, out).read_bytes()


@pytest.fixture(scope="session")
def repos(
    synthetic: Path, seeded_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FakeRepo]:
    """The manifest's repositories, with synthetic content and the extra files real ones hold."""
    out = tmp_path_factory.mktemp("published")
    gemma = {n: (synthetic / "gemma" / n).read_bytes() for n in ("config.json", "tokenizer.json")}
    vae = {
        n: (synthetic / "vae" / n).read_bytes()
        for n in ("config.json", "diffusion_pytorch_model.safetensors")
    }
    return {
        PID_REPO: FakeRepo(
            {
                CKPT: published(synthetic / SYNTH_CKPT, out / "sdxl.pth"),
                # flux-2kto4k_v1pt5 shrunk: the network of the v1.5 16-channel mini golden.
                FLUX_CKPT: published(
                    seeded_checkpoint(GOLDENS / "pidnet_v15_mini.safetensors", seeded_cache), out / "flux.pth"
                ),
                "README.md": b"# PiD\n",
                ".gitattributes": b"*.safetensors lfs\n",
            }
        ),
        GEMMA_REPO: FakeRepo(
            {
                **gemma,
                "gemma-2-2b-it.safetensors": (synthetic / "gemma" / "model.safetensors").read_bytes(),
                "tokenizer_config.json": b"{}",
                "README.md": b"# Gemma\n",
            }
        ),
        GATED_GEMMA: FakeRepo(
            {
                **gemma,
                **_shards(),
                "tokenizer.model": b"sentencepiece",
                "generation_config.json": b"{}",
                "special_tokens_map.json": b"{}",
            },
            gated=True,
        ),
        VAE_REPO: FakeRepo(
            {
                **vae,
                "sdxl_vae.safetensors": vae["diffusion_pytorch_model.safetensors"],
                "diffusion_pytorch_model.bin": b"pickle",
                "README.md": b"# VAE\n",
            }
        ),
    }


@pytest.fixture(scope="session")
def test_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged manifest, except that the students are their mini networks."""
    data = json.loads(PACKAGED_MANIFEST.read_text())
    data["pid"]["shrunk"] = True
    path = tmp_path_factory.mktemp("manifest") / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def hub(repos: dict[str, FakeRepo]) -> Any:
    with FakeHub(repos) as h:
        yield h


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, test_manifest: Path) -> dict[str, str]:
    """A client environment: the fake Hub, an empty Hub cache, no token, the test manifest."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PID_NATIVE_", "HUGGING_FACE"))}
    return {
        **base,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PID_NATIVE_HOME": str(tmp_path / "home"),
        "PID_NATIVE_MANIFEST": str(test_manifest),
    }


def bundle_of(env: dict[str, str]) -> Path:
    return Path(env["PID_NATIVE_HOME"]) / "bundles" / "sdxl"


def call(name: str = "provision", **kwargs: Any) -> dict[str, Any]:
    return {"call": name, "kwargs": kwargs}


def clients(env: dict[str, str], *calls: dict[str, Any], stdin: Any = subprocess.DEVNULL) -> list[dict]:
    """Run provisioning calls in order in one fresh interpreter; per call, its result or error and events."""
    proc = subprocess.run(
        [sys.executable, str(FAKEHUB), json.dumps(list(calls))],
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"client crashed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return json.loads(lines[-1])


def client(
    env: dict[str, str], name: str = "provision", stdin: Any = subprocess.DEVNULL, **kwargs: Any
) -> dict:
    return clients(env, call(name, **kwargs), stdin=stdin)[0]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pid_native.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )


def ok(outcome: dict) -> Path:
    assert outcome["ok"], f"{outcome.get('type')} [{outcome.get('code')}]: {outcome.get('message')}"
    return Path(outcome["result"])


def fails(outcome: dict, code: str) -> str:
    assert not outcome["ok"], f"expected error {code}, got success"
    assert outcome["code"] == code, f"expected {code}, got [{outcome['code']}]: {outcome['message']}"
    return outcome["message"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


SDXL_FILES = sorted(
    [
        CKPT,
        "gemma/config.json",
        "gemma/gemma-2-2b-it.safetensors",
        "gemma/tokenizer.json",
        BUNDLE_FILE,
        LOCK_FILE,
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
)


# ---------------------------------------------------------------- downloads through the real client


def test_fresh_install_writes_a_complete_locked_bundle(
    hub: FakeHub, env: dict[str, str], repos: dict
) -> None:
    outcome = client(env, accept_license=True)
    root = ok(outcome)
    assert root == bundle_of(env)
    assert listing(root) == SDXL_FILES  # only the selected files: no README, .bin or duplicate VAE

    info = json.loads((root / BUNDLE_FILE).read_text())
    assert {k: info[k] for k in ("format", "space", "checkpoint", "gemma", "vae")} == {
        "format": 1,
        "space": "sdxl",
        "checkpoint": CKPT,
        "gemma": "gemma",
        "vae": "vae",
    }
    assert info["license"]["method"] == "argument"
    assert {(lic["id"], lic["version"]) for lic in info["license"]["licences"]} == {
        ("NSCLv1", "1"),
        ("gemma", None),
    }

    lock = json.loads((root / LOCK_FILE).read_text())
    for name, repo_id, prefix in (
        ("pid", PID_REPO, ""),
        ("gemma", GEMMA_REPO, "gemma/"),
        ("vae", VAE_REPO, "vae/"),
    ):
        entry, repo = lock["components"][name], repos[repo_id]
        assert (entry["repo"], entry["requested_revision"], entry["revision"]) == (repo_id, "main", repo.sha)
        for f in entry["files"]:
            data = repo.files[f["path"].removeprefix(prefix)]
            assert (f["size"], f["sha256"]) == (len(data), sha256(data))
    assert lock["components"]["pid"]["shrunk"] is True
    assert lock["components"]["pid"]["student"] == "sdxl-2kto4k"

    # Files are hard links into the Hub cache: no second copy on disk.
    assert (root / CKPT).stat().st_nlink == 2
    # Each selected file was fetched exactly once; nothing else was.
    fetched = sorted(path.split("/resolve/")[1].split("/", 1)[1] for _, path, _ in hub.gets())
    assert fetched == sorted(
        p.removeprefix("gemma/").removeprefix("vae/") for p in SDXL_FILES if "pid-bundle" not in p
    )

    events = outcome["events"]
    assert events[0]["kind"] == "plan" and events[-1]["kind"] == "complete"
    assert events[0]["total"] == sum(
        (root / p).stat().st_size for p in SDXL_FILES if not p.startswith("pid-bundle")
    )
    assert events[0]["files"] == 6
    assert sum(e["kind"] == "verified" for e in events) == 6
    done = [e["done"] for e in events if e["kind"] == "bytes"]
    assert done == sorted(done) and done[-1] == events[0]["total"]
    ckpt_bytes = [e["file_done"] for e in events if e["kind"] == "bytes" and e["file"] == CKPT]
    assert ckpt_bytes[-1] == len(repos[PID_REPO].files[CKPT])

    bundle = load_bundle(root)
    assert bundle.checkpoint == root / CKPT and bundle.checkpoint.is_absolute()
    assert (bundle.gemma, bundle.vae, bundle.space) == (root / "gemma", root / "vae", "sdxl")
    assert verify(root).ok

    # A rerun finds the bundle complete and verified: no request at all.
    before = len(hub.requests)
    assert ok(client(env, accept_license=True)) == root
    assert len(hub.requests) == before


def test_licence_not_accepted_downloads_nothing(hub: FakeHub, env: dict[str, str]) -> None:
    message = fails(client(env), "license_not_accepted")
    assert "NSCLv1" in message and "https://huggingface.co/nvidia/PiD" in message
    assert "Gemma Terms of Use" in message and "--accept-license" in message
    assert hub.requests == []
    assert not bundle_of(env).exists()


@pytest.mark.parametrize(("answer", "accepted"), [(b"no\n", False), (b"yes\n", True)])
def test_licence_prompt_on_a_terminal(
    hub: FakeHub, env: dict[str, str], answer: bytes, accepted: bool
) -> None:
    main, secondary = pty.openpty()
    try:
        os.write(main, answer)
        outcome = client(env, stdin=secondary)
    finally:
        os.close(secondary)
        os.close(main)
    if not accepted:
        fails(outcome, "license_not_accepted")
        assert hub.requests == []
        return
    root = ok(outcome)
    assert json.loads((root / BUNDLE_FILE).read_text())["license"]["method"] == "prompt"


def test_gated_gemma_needs_a_token(hub: FakeHub, env: dict[str, str]) -> None:
    anonymous, wrong = clients(
        env,
        call(accept_license=True, gemma_repo=GATED_GEMMA),
        call(accept_license=True, gemma_repo=GATED_GEMMA, token="hf_wrong"),
    )
    message = fails(anonymous, "gated_repo")
    assert f"{hub.url}/{GATED_GEMMA}" in message and "HF_TOKEN" in message and "--token" in message
    assert "has no access" not in message
    assert "has no access" in fails(wrong, "gated_repo")
    assert hub.gets() == []  # planning failed before any download

    planned, outcome = clients(
        {**env, "HF_TOKEN": hub.token},
        call("plan", gemma_repo=GATED_GEMMA),
        call(accept_license=True, gemma_repo=GATED_GEMMA),
    )
    assert planned["result"]["gated"] == [GATED_GEMMA]
    root = ok(outcome)
    assert listing(root / "gemma") == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    lock = json.loads((root / LOCK_FILE).read_text())
    assert lock["components"]["gemma"]["repo"] == GATED_GEMMA
    gated = [h.get("authorization") for _, p, h in hub.gets() if GATED_GEMMA in p]
    assert gated and set(gated) == {f"Bearer {hub.token}"}, gated
    assert verify(root).ok


def test_dropped_connection_resumes_with_a_range_request(
    hub: FakeHub, env: dict[str, str], repos: dict
) -> None:
    hub.fault(PID_REPO, CKPT, "drop")
    root = ok(client(env, accept_license=True))
    gets = hub.gets(CKPT)
    assert len(gets) == 2
    assert "range" not in gets[0][2] and gets[1][2]["range"].startswith("bytes=")
    assert sha256((root / CKPT).read_bytes()) == sha256(repos[PID_REPO].files[CKPT])


def test_killed_download_leaves_no_bundle_and_the_rerun_completes(hub: FakeHub, env: dict[str, str]) -> None:
    hub.fault(PID_REPO, CKPT, "stall")
    proc = subprocess.Popen(
        [sys.executable, str(FAKEHUB), json.dumps([call(accept_license=True)])],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not hub.gets(CKPT) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.gets(CKPT), "the client never started downloading the checkpoint"
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    hub.release.set()

    root = bundle_of(env)
    assert not (root / BUNDLE_FILE).exists()
    with pytest.raises(MissingFileError) as info:
        load_bundle(root)
    assert info.value.code == "not_provisioned" and "interrupted" in info.value.message
    assert not inspect_bundle(root).complete

    assert ok(client(env, accept_license=True)) == root
    assert not root.with_name(f".{root.name}.partial").exists()
    assert verify(root).ok


def test_corrupted_download_is_detected_and_fetched_again(hub: FakeHub, env: dict[str, str]) -> None:
    gemma_file = "gemma-2-2b-it.safetensors"
    hub.fault(GEMMA_REPO, gemma_file, "corrupt")
    outcome = client(env, accept_license=True)
    root = ok(outcome)
    refetches = [e for e in outcome["events"] if e["kind"] == "refetch"]
    assert [(e["file"], "sha256" in e["message"]) for e in refetches] == [(gemma_file, True)]
    assert len(hub.gets(gemma_file)) == 2
    assert verify(root).ok


def test_persistent_corruption_fails_cleanly_then_a_rerun_repairs_the_cache(
    hub: FakeHub, env: dict[str, str]
) -> None:
    hub.fault(PID_REPO, CKPT, "corrupt", times=2)
    root = bundle_of(env)
    failed = client(env, accept_license=True)
    assert "still wrong after downloading it again" in fails(failed, "checksum_mismatch")
    assert not root.exists() and not root.with_name(f".{root.name}.partial").exists()

    # The damaged blob stays in the Hub cache: the next run finds it, rejects it, fetches it again.
    outcome = client(env, accept_license=True)
    ok(outcome)
    kinds = [(e["kind"], e["file"]) for e in outcome["events"] if e["file"] == CKPT]
    assert ("cached", CKPT) in kinds and ("refetch", CKPT) in kinds and ("verified", CKPT) in kinds
    assert verify(root).ok


def test_verify_detects_damage_and_fetch_repairs_it(hub: FakeHub, env: dict[str, str]) -> None:
    root = ok(client(env, accept_license=True))
    with open(root / "gemma" / "gemma-2-2b-it.safetensors", "r+b") as f:  # same inode as the cache blob
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.truncate(root / "vae" / "diffusion_pytorch_model.safetensors", 100)

    report = verify(root)
    assert not report.ok
    assert {(p.path, p.code) for p in report.problems} == {
        ("gemma/gemma-2-2b-it.safetensors", "checksum_mismatch"),
        ("vae/diffusion_pytorch_model.safetensors", "size_mismatch"),
    }
    run = cli(env, "verify", str(root))
    assert run.returncode == 1 and "checksum_mismatch" in run.stdout

    outcome = client(env, accept_license=True)
    ok(outcome)
    assert outcome["events"][0]["kind"] == "repair"
    refetched = {e["file"] for e in outcome["events"] if e["kind"] == "refetch"}
    assert refetched == {"gemma-2-2b-it.safetensors", "diffusion_pytorch_model.safetensors"}
    assert verify(root).ok
    assert cli(env, "verify", str(root)).returncode == 0


def test_offline_uses_the_bundle_or_the_cache_without_any_request(hub: FakeHub, env: dict[str, str]) -> None:
    root = ok(client(env, accept_license=True))
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    hub.requests.clear()
    assert ok(client(offline, accept_license=True)) == root
    assert hub.requests == []

    # Without the bundle, it is rebuilt from the Hub cache, still without a request.
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()
    assert ok(client(offline, accept_license=True)) == root
    assert hub.requests == []
    assert verify(root).ok

    empty = {
        **offline,
        "HF_HOME": env["HF_HOME"] + "-empty",
        "PID_NATIVE_HOME": env["PID_NATIVE_HOME"] + "-2",
    }
    message = fails(client(empty, accept_license=True), "offline_not_cached")
    assert "HF_HUB_OFFLINE" in message
    assert hub.requests == []


def test_unreachable_hub_is_reported(env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    message = fails(
        client({**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}, accept_license=True), "network_unreachable"
    )
    assert "HF_HUB_OFFLINE=1" in message


def test_missing_repository_revision_and_file(hub: FakeHub, env: dict[str, str]) -> None:
    repo, revision, file = clients(
        env,
        call(accept_license=True, gemma_repo="nobody/nothing"),
        call(accept_license=True, gemma_repo=f"{GEMMA_REPO}@{'0' * 40}"),
        call(accept_license=True, vae_repo=GEMMA_REPO),
    )
    fails(repo, "repo_not_found")
    fails(revision, "revision_not_found")
    assert "diffusion_pytorch_model.safetensors" in fails(file, "file_not_found")
    assert hub.gets() == []


def test_a_checkpoint_of_the_wrong_network_is_rejected(hub: FakeHub, env: dict[str, str]) -> None:
    packaged = {
        k: v for k, v in env.items() if k != "PID_NATIVE_MANIFEST"
    }  # expects the full sdxl-2kto4k student
    message = fails(client(packaged, accept_license=True), "tensor_shape")
    assert "sdxl-2kto4k PiD student" in message
    assert not bundle_of(env).exists()


def test_disk_space_is_checked_before_downloading(repos: dict, env: dict[str, str]) -> None:
    huge = {**repos, PID_REPO: FakeRepo(repos[PID_REPO].files, declared_sizes={CKPT: 2**50})}
    with FakeHub(huge) as big:
        message = fails(client({**env, "HF_ENDPOINT": big.url}, accept_license=True), "disk_full")
        assert big.gets() == []
    assert "GB are needed" in message


def test_dry_run_shows_files_and_sizes_and_downloads_nothing(
    hub: FakeHub, env: dict[str, str], repos: dict
) -> None:
    run = cli(env, "fetch", "--dry-run")
    assert run.returncode == 0, run.stderr
    for name in (
        CKPT,
        "gemma-2-2b-it.safetensors",
        "diffusion_pytorch_model.safetensors",
    ):
        assert name in run.stdout
    assert "to download:" in run.stdout and "NSCLv1" in run.stdout and "--accept-license" in run.stdout
    assert "sdxl_vae.safetensors" not in run.stdout
    assert hub.gets() == []
    assert not bundle_of(env).exists()

    plan = client(env, "plan")["result"]
    sizes = {f["file"]: f["size"] for f in plan["files"]}
    assert sizes[CKPT] == len(repos[PID_REPO].files[CKPT])
    assert all(f["download"] for f in plan["files"]) and len(plan["files"]) == 6

    offline = cli(env, "fetch", "--dry-run", "--offline")
    assert offline.returncode == 1 and "[offline_not_cached]" in offline.stderr
    assert cli(env, "fetch", "--space").returncode == 2  # usage error


def test_cli_fetch_and_verify(hub: FakeHub, env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "my-bundle"
    refused = cli(env, "fetch", "--bundle", str(target))
    assert refused.returncode == 1 and "[license_not_accepted]" in refused.stderr
    assert hub.requests == []

    run = cli(env, "fetch", "--accept-license", "--no-vae", "--bundle", str(target))
    assert run.returncode == 0, run.stderr
    assert f"bundle ready: {target}" in run.stdout
    assert json.loads((target / BUNDLE_FILE).read_text())["vae"] is None
    assert not (target / "vae").exists()
    assert load_bundle(target).vae is None

    run = cli(env, "verify", str(target), "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["ok"] is True
    assert cli(env, "verify", str(tmp_path / "nothing")).returncode == 1

    # The fetched bundle is what the decoder opens: decode a latent with its Gemma and network.
    from pid_native import Decoder

    dec = Decoder.open(target, backend="candle-cpu")
    out = dec.decode(np.zeros((1, 4, 2, 2), np.float32), "a fetched caption", seed=1)
    assert out.shape == (1, 3, 64, 64) and np.isfinite(out).all()


def test_cli_fetch_space_takes_only_its_student_from_the_official_repository(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    deprecated = cli(env, "fetch", "--student", "flux2-2kto4k", "--accept-license")
    assert deprecated.returncode == 1 and "[deprecated_student]" in deprecated.stderr
    assert "2kto4k_v1pt5" in deprecated.stderr and hub.requests == []

    run = cli(env, "fetch", "--space", "zimage", "--accept-license")
    assert run.returncode == 0, run.stderr
    root = Path(env["PID_NATIVE_HOME"]) / "bundles" / "flux"
    fetched = {path.split("/resolve/")[1].split("/", 1)[1] for _, path, _ in hub.gets()}
    assert fetched == {FLUX_CKPT, "config.json", "tokenizer.json", "gemma-2-2b-it.safetensors"}
    bundle = load_bundle(root)
    assert (bundle.space, bundle.student, bundle.vae) == ("flux", "flux-2kto4k_v1pt5", None)
    assert bundle.checkpoint == root / FLUX_CKPT and verify(root).ok

    # The published .pth is decoded as it is, and converts to an equivalent safetensors file.
    from pid_native import Decoder

    dec = Decoder.open(root, backend="candle-cpu")
    latent = np.random.default_rng(0).standard_normal((1, 16, 2, 2)).astype(np.float32)
    out = dec.decode(latent, "a fetched caption", seed=1)
    assert out.shape == (1, 3, 64, 64) and np.isfinite(out).all()
    with pytest.raises(InvalidInputError, match="is a sdxl latent") as wrong:
        dec.decode(np.zeros((1, 4, 2, 2), np.float32))
    assert wrong.value.code == "latent_channels"
    converted = tmp_path / "flux.safetensors"
    run = cli(env, "convert", str(bundle.checkpoint), str(converted))
    assert run.returncode == 0 and "flux-2kto4k_v1pt5" in run.stdout, run.stderr
    again = Decoder.open(converted, backend="candle-cpu", gemma=bundle.gemma)
    assert again.student is not None and again.student.name == "flux-2kto4k_v1pt5"
    np.testing.assert_array_equal(again.decode(latent, "a fetched caption", seed=1), out)


# ---------------------------------------------------------------- offline pieces, in process


def test_importing_provisioning_does_not_import_huggingface_hub() -> None:
    code = "import sys, pid_native.provisioning; sys.exit('huggingface_hub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_shipped_manifest() -> None:
    manifest = load_manifest(PACKAGED_MANIFEST)
    assert (manifest.pid.default, manifest.pid.files, manifest.pid.shrunk) == (PID_REPO, (), False)
    assert manifest.vae_spaces == ("sdxl",)
    assert manifest.gemma.default == GEMMA_REPO and manifest.gemma.sources[GATED_GEMMA].gated
    assert set(manifest.vae.sources) == {VAE_REPO, "madebyollin/sdxl-vae-fp16-fix"}
    ids = {r["id"] for r in licences()}
    for spec in (manifest.pid, manifest.gemma, manifest.vae):
        for source in spec.sources.values():
            assert source.licence in ids
            assert source.revision == "main" or source.pinned


def test_manifest_resolves_requests(tmp_path: Path) -> None:
    manifest = load_manifest(PACKAGED_MANIFEST)
    target, comps = manifest.components("kolors")
    assert (target.space, target.label) == ("sdxl", "sdxl-2kto4k")
    assert [c.name for c in comps] == ["pid", "gemma", "vae"] and comps[0].files == (CKPT,)
    _, comps = manifest.components("sdxl", include_vae=False, gemma=f"{GATED_GEMMA}@{'a' * 40}")
    assert [c.name for c in comps] == ["pid", "gemma"]
    assert (comps[1].repo, comps[1].revision, comps[1].gated) == (GATED_GEMMA, "a" * 40, True)
    _, comps = manifest.components("sdxl", gemma=tmp_path)
    assert comps[1].local == tmp_path.resolve() and comps[1].repo is None
    _, comps = manifest.components("qwenimage")
    assert [c.name for c in comps] == ["pid", "gemma"]
    # Each space's default student and any named one: one file of nvidia/PiD, never the repository.
    for space, student, experiment in (
        ("zimage", None, "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"),
        ("flux2-klein-4b", None, "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step"),
        ("qwenimage-2512", None, "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step"),
        ("sd3", None, "PiD_res2kto4k_sr4x_official_sd3_distill_4step"),
        (None, "zimage-turbo-2k", "PiD_res2k_sr4x_official_flux_distill_4step"),
        (None, "flux2-2k", "PiD_res2k_sr4x_official_flux2_distill_4step"),
        ("sd3", "sd3-2k", "PiD_res2k_sr4x_official_sd3_distill_4step"),
    ):
        target, comps = manifest.components(space, student_name=student)
        assert comps[0].files == (f"checkpoints/{experiment}/model_ema_bf16.pth",), (space, student)
        assert comps[0].repo == PID_REPO and [c.name for c in comps] == ["pid", "gemma"]
    for kwargs, code in (
        ({"student_name": "qwenimage-2kto4k"}, "no_hub_weights"),
        ({"space": "sdxl", "student_name": "flux-2k"}, "wrong_student"),
        ({"student_name": "sdxl-2k"}, "unknown_student"),
        ({"space": "dinov2"}, "unsupported_space"),
        ({"student_name": "siglip-2k"}, "unsupported_space"),
        ({"space": "nope"}, "unknown_space"),
        ({"space": "sdxl", "gemma": "not a repo"}, "bad_repo_id"),
    ):
        with pytest.raises(InvalidInputError) as info:
            manifest.components(**kwargs)
        assert info.value.code == code


def test_licence_records_for_hosts() -> None:
    records = {r["id"]: r for r in licences()}
    for r in records.values():
        assert set(r) == {"id", "name", "url", "commercial_use", "restriction", "attribution", "components"}
        assert r["commercial_use"] or r["restriction"]
    pid = records["NSCLv1"]
    assert pid["commercial_use"] is False and "every image" in pid["restriction"]
    assert pid["url"] == "https://huggingface.co/nvidia/PiD"
    assert records["gemma"]["url"] == "https://ai.google.dev/gemma/terms"


@pytest.fixture
def local_weights(tmp_path: Path, synthetic: Path) -> dict[str, Path]:
    """A PiD checkpoint file and Gemma and VAE directories, as a user might have them."""
    src = tmp_path / "src"
    shutil.copytree(synthetic, src, ignore=shutil.ignore_patterns(BUNDLE_FILE))
    return {"checkpoint": src / SYNTH_CKPT, "gemma": src / "gemma", "vae": src / "vae"}


def build(root: Path, weights: dict[str, Path], **options: Any) -> Path:
    return build_bundle(
        root, checkpoint=weights["checkpoint"], gemma=weights["gemma"], vae=weights["vae"], **options
    )


@pytest.mark.parametrize("link", ["hardlink", "symlink", "copy"])
def test_build_bundle_from_local_files(
    local_weights: dict[str, Path],
    tmp_path: Path,
    test_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    link: str,
) -> None:
    monkeypatch.setenv("PID_NATIVE_MANIFEST", str(test_manifest))
    root = build(tmp_path / "bundle", local_weights, link=link, accept_license=True)
    bundle = load_bundle(root)
    assert bundle.checkpoint.name == local_weights["checkpoint"].name
    assert bundle.license is not None and bundle.license.method == "argument"
    assert (root / "gemma" / "model.safetensors").is_symlink() == (link == "symlink")
    lock = json.loads((root / LOCK_FILE).read_text())
    assert (
        lock["components"]["gemma"]["local"] == str(local_weights["gemma"])
        and lock["components"]["gemma"]["repo"] is None
    )
    assert verify(root).ok
    assert build(tmp_path / "bundle", local_weights, link=link) == root


def test_build_bundle_rejects_bad_sources(
    local_weights: dict[str, Path], tmp_path: Path, test_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MissingFileError) as missing:
        build_bundle(tmp_path / "b", checkpoint=tmp_path / "no.safetensors", gemma=tmp_path / "no-gemma")
    assert "no.safetensors" in missing.value.message and "no-gemma" in missing.value.message

    # The packaged manifest expects the full SDXL student, not the mini network.
    with pytest.raises(WeightsError) as wrong:
        build(tmp_path / "b", local_weights)
    assert wrong.value.code == "tensor_shape"

    monkeypatch.setenv("PID_NATIVE_MANIFEST", str(test_manifest))
    (local_weights["gemma"] / "tokenizer.json").unlink()
    with pytest.raises(ProvisioningError) as no_tokenizer:
        build(tmp_path / "b", local_weights)
    assert no_tokenizer.value.code == "file_not_found" and "tokenizer.json" in no_tokenizer.value.message

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(InvalidInputError) as not_bundle:
        build(foreign, local_weights)
    assert not_bundle.value.code == "not_a_bundle" and (foreign / "cat.jpg").exists()
    assert not (tmp_path / "b").exists()


def test_load_bundle_lists_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as none:
        load_bundle(tmp_path / "absent")
    assert none.value.code == "not_provisioned" and "pid-native fetch --accept-license" in none.value.message

    root = tmp_path / "b"
    (root / "gemma").mkdir(parents=True)
    (root / "gemma" / "config.json").write_text("{}")
    (root / BUNDLE_FILE).write_text(
        json.dumps(
            {
                "format": 1,
                "space": "sdxl",
                "checkpoint": CKPT,
                "gemma": "gemma",
                "vae": "vae",
                "license": None,
            }
        )
    )
    with pytest.raises(MissingFileError) as some:
        load_bundle(root)
    for missing in (CKPT, "tokenizer.json", "the Gemma weights", "diffusion_pytorch_model.safetensors"):
        assert missing in some.value.message
    status = inspect_bundle(root)
    assert (status.complete, status.checkpoint, status.gemma, status.vae) == (False, False, False, False)

    (root / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(ProvisioningError) as bad:
        load_bundle(root)
    assert bad.value.code == "bad_bundle"


def test_load_bundle_reads_synthetic_bundles(synthetic: Path) -> None:
    """Bundles from ``pid_native.testing.synth`` have no licence record and no lock file."""
    bundle = load_bundle(synthetic)
    assert (bundle.space, bundle.synthetic, bundle.license, bundle.lock) == ("sdxl", "mini", None, None)
    assert (bundle.checkpoint, bundle.gemma, bundle.vae) == (
        synthetic / SYNTH_CKPT,
        synthetic / "gemma",
        synthetic / "vae",
    )
    assert inspect_bundle(synthetic).complete
    report = verify(synthetic)
    assert not report.ok and [p.code for p in report.problems] == ["no_lock"]


def test_default_bundle_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PID_NATIVE_HOME", str(tmp_path))
    assert default_bundle_dir("kolors") == tmp_path / "bundles" / "sdxl"
    assert default_bundle_dir("zimage-turbo") == tmp_path / "bundles" / "flux"
    assert default_bundle_dir(student="zimage-2k") == tmp_path / "bundles" / "flux-2k"
    monkeypatch.delenv("PID_NATIVE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_bundle_dir() == tmp_path / "xdg" / "pid-native" / "bundles" / "sdxl"


def test_safetensors_headers_must_describe_the_file(tmp_path: Path) -> None:
    good = save({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)})
    path = tmp_path / "x.safetensors"
    path.write_bytes(good)
    assert safetensors_index(path) == {"a": ("F32", (2, 3)), "b": ("F32", (4,))}
    for data, code in (
        (good[:-1], "truncated"),
        (good + b"\0", "truncated"),
        (b"\x05\0\0\0\0\0\0\0{nope", "not_safetensors"),
        (b"\xff" * 16, "not_safetensors"),
    ):
        path.write_bytes(data)
        with pytest.raises(WeightsError) as info:
            safetensors_index(path)
        assert info.value.code == code, data[:16]
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    header["b"]["data_offsets"] = [28, 44]  # a 4-byte hole after "a"
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + good[8 + n :] + b"\0" * 4)
    with pytest.raises(WeightsError, match="gap or overlap"):
        safetensors_index(path)
