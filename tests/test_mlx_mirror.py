"""The MLX backend mirrors pid-core: a module per core module, and in the network the same
modules (types), each named after its checkpoint keys. What differs on purpose is listed here
with the reason; anything else that differs fails, so the two trees cannot drift apart unseen.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "rust" / "pid-core" / "src"
MLX = REPO / "python" / "pid_native" / "backends" / "mlx"

# Core modules without an MLX twin.
CORE_ONLY = {
    "lib.rs": "the crate root; the package root is __init__.py",
    "error.rs": "MLX raises the package-level pid_native.errors, which the binding maps the core's to",
    "caption/cache.rs": "MLX keeps its caption cache inside CaptionEncoder (caption/__init__.py)",
    "cuda_device.rs": "opens and checks CUDA devices; MLX picks its own device (Metal or CPU)",
    "pth.rs": "reads .pth checkpoints without pickle; MLX gets their tensors from it (weights.py)",
    "kernels/attention.rs": "our CPU/CUDA kernels; MLX runs its own ops (mx.fast on Metal)",
    "kernels/cpu.rs": "our CPU/CUDA kernels; MLX runs its own ops",
    "kernels/cuda.rs": "our CPU/CUDA kernels; MLX runs its own ops",
    "kernels/flash.rs": "our CPU/CUDA kernels; MLX runs its own ops",
    "kernels/gemm.rs": "our CPU/CUDA kernels; MLX runs its own ops",
    "kernels/linear.rs": "our CPU/CUDA kernels; MLX runs its own ops (the arithmetic is in net/layers.py)",
    "kernels/mod.rs": "our CPU/CUDA kernels; MLX runs its own ops",
    "kernels/pixel_mlp.rs": "our CPU/CUDA kernels; MLX runs its own ops",
}
# MLX modules without a core twin.
MLX_ONLY = {
    "engine.py": "adapts MlxDecoder to the backend registry, which the PyO3 binding does for candle",
}
# Network types that differ: (core file, type) or (MLX file, class) -> why.
NET_DIFFERENCES = {
    ("net/mod.rs", "Rope"): "MLX: a (cos, sin) tuple alias in net/attention.py",
    ("net/mod.rs", "JointRope"): "MLX: Conditioning holds the image and text rotations as two fields",
    ("net/lq_proj.rs", "Conv3x3"): "MLX: the general Conv2d of net/layers.py, which the VAE shares",
    ("net/lq_proj.rs", "GroupNorm"): "MLX: in net/layers.py, which the VAE shares",
    ("net/layers.py", "Conv2d"): "the core's Conv3x3 in net/lq_proj.rs",
    ("net/layers.py", "GroupNorm"): "the core's GroupNorm in net/lq_proj.rs",
    ("net/patch_block.rs", "StreamQkv"): "MLX: JointAttention holds both streams' attn.* keys",
    ("net/patch_block.py", "JointAttention"): "the core's two StreamQkv and the block's projections",
    ("net/attention.py", "AttentionBudget"): "the core's is kernels::AttentionBudget (score bytes only);"
    " MLX adds the fused Metal kernel's limits",
}


def twin(core: str) -> str:
    """The MLX path of a core module: `mod.rs` is a package's `__init__.py`."""
    path = Path(core)
    name = "__init__.py" if path.name == "mod.rs" else path.with_suffix(".py").name
    return str(path.with_name(name))


def _modules(root: Path, suffix: str) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob(f"*{suffix}")}


def test_every_core_module_has_its_mlx_twin_or_a_reason() -> None:
    core, mlx = _modules(CORE, ".rs"), _modules(MLX, ".py")
    twins = {twin(c) for c in core - CORE_ONLY.keys()}
    assert twins - mlx == set(), "core modules without an MLX twin (add one, or a reason to CORE_ONLY)"
    assert mlx - twins - MLX_ONLY.keys() - {"__init__.py"} == set(), "MLX modules without a core twin"
    assert CORE_ONLY.keys() <= core and MLX_ONLY.keys() <= mlx, "a listed difference no longer exists"


def test_the_networks_are_built_from_the_same_modules() -> None:
    found = set()
    for rs in sorted((CORE / "net").glob("*.rs")):
        core_types = set(re.findall(r"^(?:pub(?:\(crate\))? )?struct (\w+)", rs.read_text(), re.M))
        core_file = str(rs.relative_to(CORE))
        py = MLX / twin(core_file)
        mlx_file = str(py.relative_to(MLX))
        mlx_types = set(re.findall(r"^class (\w+)", py.read_text(), re.M))
        core_only = {t for t in core_types - mlx_types if (core_file, t) not in NET_DIFFERENCES}
        mlx_only = {t for t in mlx_types - core_types if (mlx_file, t) not in NET_DIFFERENCES}
        assert not core_only, f"{core_file} types missing from {mlx_file}: {sorted(core_only)}"
        assert not mlx_only, f"{mlx_file} classes missing from {core_file}: {sorted(mlx_only)}"
        found |= {(core_file, t) for t in core_types} | {(mlx_file, t) for t in mlx_types}
    assert NET_DIFFERENCES.keys() <= found, "a listed difference no longer exists"
