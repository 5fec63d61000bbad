"""Golden fixtures: reference outputs of the upstream PyTorch code, and how to replay them.

Format (tests/goldens/README.md): one safetensors file per fixture, ``__metadata__`` with
``kind`` (``pidnet``, ``gemma2``, ``sdxl_vae``), ``config``, ``weights`` and ``t_list``;
tensors ``in.<case>.<name>``, ``out.<case>.<name>`` and ``trace.<case>.<module>``. Every
consumer runs on *every* file of a kind, in the bundled directory and in every directory of
``$PID_GOLDENS``, so a directory of more files (of some kinds or all) extends the suite.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .. import _native
from ..errors import WeightsError
from .paths import golden_dirs
from .seeded import RECIPE, cached_seeded

# Parity tolerances of the README. float32: max abs error of the network's `v` and of the
# sampler's image. Reduced precision (bf16/f16) is judged against the float32 `v`: within
# AUTOCAST_RATIO times the reference's own bf16 autocast error, in mean and in max, where the
# golden records it (`out.<case>.v_bf16_autocast`), else within the README's absolute bounds.
V_TOL = 1e-4
IMAGE_TOL = 5e-4
AUTOCAST_RATIO = 1.25
REDUCED_MEAN_TOL = 1e-2
REDUCED_MAX_TOL = 0.15

SAMPLE = "sample"


def golden_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def golden_files(kind: str, directory: Path | None = None) -> list[Path]:
    """Every golden file of ``kind`` in :func:`golden_dirs` (or only in ``directory``), a file
    whose bytes another already has listed once.

    Raises:
        RuntimeError: there is none; an empty directory is an error, never a silent pass.
    """
    dirs = golden_dirs() if directory is None else [directory]
    seen: set[str] = set()
    files = []
    for d in dirs:
        for path in sorted(d.glob("*.safetensors")):
            if golden_metadata(path).get("kind") != kind:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                files.append(path)
    if not files:
        raise RuntimeError(f"no golden files of kind {kind!r} in {[str(d) for d in dirs]} (set PID_GOLDENS)")
    return files


def golden_cases(path: Path, input_name: str) -> list[str]:
    """Case names with an input ``in.<case>.<input_name>``."""
    with safe_open(str(path), "np") as f:
        keys = list(f.keys())
    suffix = f".{input_name}"
    return sorted(k[3 : -len(suffix)] for k in keys if k.startswith("in.") and k.endswith(suffix))


def golden_config(path: Path) -> dict:
    return json.loads(golden_metadata(path)["config"])


def is_full_topology(path: Path) -> bool:
    return golden_config(path).get("hidden_size", 0) >= 1024


def golden_arrays(path: Path) -> dict[str, np.ndarray]:
    """Inputs, outputs and traces of a golden file (embedded bf16 weights stay in the file)."""
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("weights.")}


def case_inputs(golden: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    """The inputs ``in.<case>.*`` by name."""
    prefix = f"in.{case}."
    return {k.removeprefix(prefix): v for k, v in golden.items() if k.startswith(prefix)}


def pidnet_cases(path: Path) -> list[str]:
    """The forward cases of a pidnet golden, then :data:`SAMPLE` when it has a sampler case."""
    cases = golden_cases(path, "x")
    with safe_open(str(path), "np") as f:
        has_sample = f"out.{SAMPLE}.image" in f.keys()
    return [*cases, SAMPLE] if has_sample else cases


def sample_args(
    golden: dict[str, np.ndarray], path: Path
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """``PidNet.sample``'s arguments for the sampler case: noise, eps, y, lq_latent, sigma, t_list."""
    t_list = json.loads(golden_metadata(path)["t_list"])
    g = case_inputs(golden, SAMPLE)
    eps = [g[f"eps{k}"] for k in range(len(t_list) - 2)]
    return g["noise"], eps, g["y"], g["lq_latent"], g["sigma"], t_list


def reduced_precision_error(golden: dict[str, np.ndarray], case: str, v: np.ndarray) -> tuple[bool, str]:
    """Whether a reduced-precision ``v`` of ``case`` is within bounds, and its errors in words.

    The bounds are :data:`AUTOCAST_RATIO` times the mean and max abs error of the reference's
    bf16 autocast output where the golden has one, else :data:`REDUCED_MEAN_TOL` and
    :data:`REDUCED_MAX_TOL`. A non-finite ``v`` fails.
    """
    want = golden[f"out.{case}.v"]
    err = np.abs(v.astype(np.float64) - want)
    mean, worst = float(err.mean()), float(err.max())
    autocast = golden.get(f"out.{case}.v_bf16_autocast")
    if autocast is None:
        bounds, against = (REDUCED_MEAN_TOL, REDUCED_MAX_TOL), "README bounds"
    else:
        ref = np.abs(autocast.astype(np.float64) - want)
        ref_mean, ref_max = float(ref.mean()), float(ref.max())
        bounds = (AUTOCAST_RATIO * ref_mean, AUTOCAST_RATIO * ref_max)
        against = (
            f"x{mean / ref_mean:.2f}, x{worst / ref_max:.2f} of autocast's {ref_mean:.3e}, {ref_max:.3e}"
        )
    ok = bool(np.isfinite(v).all()) and mean <= bounds[0] and worst <= bounds[1]
    return ok, f"mean {mean:.3e} max {worst:.3e} ({against}; bounds {bounds[0]:.3e}, {bounds[1]:.3e})"


def seeded_checkpoint(path: Path, cache: Path) -> Path:
    """The golden's network weights, generated (once, into ``cache``) from its seeded-v1 recipe.

    Raises:
        WeightsError: the golden's weights are not seeded.
    """
    meta = golden_metadata(path)
    if meta.get("weights") != RECIPE:
        raise WeightsError(
            f"{path.name}: weights {meta.get('weights')!r} are not supported for a pidnet golden; "
            f"only {RECIPE!r} (generated from the recipe) is",
            "golden_weights",
        )
    layout = _native.checkpoint_layout(meta["config"])
    return cached_seeded(cache, layout, salt=meta.get("weights_salt", ""))


__all__ = [
    "AUTOCAST_RATIO",
    "IMAGE_TOL",
    "REDUCED_MAX_TOL",
    "REDUCED_MEAN_TOL",
    "SAMPLE",
    "V_TOL",
    "case_inputs",
    "golden_arrays",
    "golden_cases",
    "golden_config",
    "golden_files",
    "golden_metadata",
    "is_full_topology",
    "pidnet_cases",
    "reduced_precision_error",
    "sample_args",
    "seeded_checkpoint",
]
