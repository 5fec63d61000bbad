"""Golden fixtures: reference outputs of the upstream PyTorch code, and how to replay them.

Format (tests/goldens/README.md): one safetensors file per fixture, ``__metadata__`` with
``kind`` (``pidnet``, ``gemma2``, ``sdxl_vae``), ``config``, ``weights`` and ``t_list``;
tensors ``in.<case>.<name>``, ``out.<case>.<name>`` and ``trace.<case>.<module>``. Every
consumer runs on *every* file of a kind in the directory, so dropping more files of the same
format in extends the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .. import _native
from ..errors import WeightsError
from .paths import goldens_dir
from .seeded import RECIPE, cached_seeded

# Parity tolerances of the README. float32: max abs error of the network's `v` and of the
# sampler's image. Reduced precision (bf16/f16) is judged against the float32 `v`.
V_TOL = 1e-4
IMAGE_TOL = 5e-4
REDUCED_MEAN_TOL = 1e-2
REDUCED_MAX_TOL = 0.15

SAMPLE = "sample"


def golden_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


def golden_files(kind: str, directory: Path | None = None) -> list[Path]:
    """Every golden file of ``kind`` in ``directory`` (default :func:`goldens_dir`).

    Raises:
        RuntimeError: there is none; an empty directory is an error, never a silent pass.
    """
    directory = goldens_dir() if directory is None else directory
    files = sorted(p for p in directory.glob("*.safetensors") if golden_metadata(p).get("kind") == kind)
    if not files:
        raise RuntimeError(f"no golden files of kind {kind!r} in {directory} (set PID_GOLDENS)")
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
    "sample_args",
    "seeded_checkpoint",
]
