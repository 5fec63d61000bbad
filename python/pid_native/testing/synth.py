"""Synthetic bundles: every file a real bundle has, with seeded random weights.

A synthetic bundle has the exact layout ``pid-native fetch`` writes (PiD checkpoint,
``gemma/`` with config, tokenizer and weights, ``vae/``), so tests and integrators' CI
exercise the whole pipeline without downloading anything. Its images are noise-like:
the weights are random (seeded-v1 recipe), not the PiD model.

Presets:
    mini: the shrunk SDXL student of the golden fixtures, a 3-layer Gemma of width 64 and a
        narrow 4-level SDXL-layout VAE (a few MB; decodes in about a second).
    full: the real SDXL student topology (1.36 B parameters), a Gemma-2 with the real
        2.6 B-parameter shape except for a tiny vocabulary, and the real SDXL VAE shape
        (about 7 GB; for benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import _native
from .seeded import write_seeded
from .tokenizer import build_tiny_gemma_tokenizer

BUNDLE_FILE = "pid-bundle.json"
CHECKPOINT = "pid_sdxl_2kto4k.safetensors"

# Gemma-2 shapes: the real gemma-2-2b-it except for the vocabulary, and a tiny one.
_GEMMA = {
    "mini": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
    },
    "full": {
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
    },
}
_VAE_CHANNELS = {"mini": [32, 64, 64, 64], "full": [128, 256, 512, 512]}
_VAE_LAYERS = {"mini": 1, "full": 2}
_TOKENIZER_VOCAB = 512


def gemma_config(preset: str) -> dict[str, Any]:
    """A Gemma-2 ``config.json`` (transformers' field names) for ``preset``."""
    g = _GEMMA[preset]
    layers = g["num_hidden_layers"]
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": _TOKENIZER_VOCAB,
        **g,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def gemma_layout(cfg: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes of a bare ``Gemma2Model`` (no ``model.`` prefix)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out: list[tuple[str, list[int]]] = [("embed_tokens.weight", [cfg["vocab_size"], h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}"
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            out.append((f"{p}.{norm}.weight", [h]))
        out += [
            (f"{p}.self_attn.q_proj.weight", [q, h]),
            (f"{p}.self_attn.k_proj.weight", [kv, h]),
            (f"{p}.self_attn.v_proj.weight", [kv, h]),
            (f"{p}.self_attn.o_proj.weight", [h, q]),
            (f"{p}.mlp.gate_proj.weight", [inter, h]),
            (f"{p}.mlp.up_proj.weight", [inter, h]),
            (f"{p}.mlp.down_proj.weight", [h, inter]),
        ]
    out.append(("norm.weight", [h]))
    return out


def vae_config(preset: str) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config with the SDXL layout (4 levels, /8)."""
    n = len(_VAE_CHANNELS[preset])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": _VAE_CHANNELS[preset],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": _VAE_LAYERS[preset],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def vae_layout(cfg: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """diffusers ``AutoencoderKL`` state-dict names and shapes for ``cfg``."""
    ch = cfg["block_out_channels"]
    lat = cfg["latent_channels"]
    out: list[tuple[str, list[int]]] = []

    def conv(name: str, cin: int, cout: int, k: int = 3) -> None:
        out.extend([(f"{name}.weight", [cout, cin, k, k]), (f"{name}.bias", [cout])])

    def norm(name: str, c: int) -> None:
        out.extend([(f"{name}.weight", [c]), (f"{name}.bias", [c])])

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name: str, c: int) -> None:
        resnet(f"{name}.resnets.0", c, c)
        norm(f"{name}.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out.extend(
                [(f"{name}.attentions.0.{proj}.weight", [c, c]), (f"{name}.attentions.0.{proj}.bias", [c])]
            )
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", cfg["in_channels"], ch[0])
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(cfg["layers_per_block"]):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < len(ch) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c)
        cin = c
    mid("encoder.mid_block", ch[-1])
    norm("encoder.conv_norm_out", ch[-1])
    conv("encoder.conv_out", ch[-1], 2 * lat)
    conv("quant_conv", 2 * lat, 2 * lat, 1)
    conv("post_quant_conv", lat, lat, 1)
    conv("decoder.conv_in", lat, ch[-1])
    mid("decoder.mid_block", ch[-1])
    rev = list(reversed(ch))
    cin = rev[0]
    for i, c in enumerate(rev):
        for j in range(cfg["layers_per_block"] + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c)
        cin = c
    norm("decoder.conv_norm_out", ch[0])
    conv("decoder.conv_out", ch[0], cfg["out_channels"])
    return out


def write_bundle(path: str | os.PathLike[str], preset: str = "mini") -> Path:
    """Write (or reuse) a complete synthetic sdxl bundle at ``path``; returns ``path``.

    An existing complete bundle of the same preset is reused. The bundle is assembled in a
    temporary directory and renamed into place, so an interrupted run never leaves a
    bundle that looks complete.
    """
    if preset not in _GEMMA:
        raise ValueError(f"unknown preset {preset!r}; use 'mini' or 'full'")
    path = Path(path)
    manifest = path / BUNDLE_FILE
    existing = json.loads(manifest.read_text()).get("synthetic") if manifest.is_file() else None
    if existing == preset:
        return path
    if path.exists() and existing is None and any(path.iterdir()):
        raise FileExistsError(
            f"{path} exists and is not a synthetic bundle; choose an empty or new directory"
        )
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gemma").mkdir(parents=True)
    (tmp / "vae").mkdir()

    net_config = _native.preset_config("sdxl-mini" if preset == "mini" else "sdxl-2kto4k")
    write_seeded(tmp / CHECKPOINT, _native.checkpoint_layout(net_config), salt="synth")

    gcfg = gemma_config(preset)
    (tmp / "gemma" / "config.json").write_text(json.dumps(gcfg, indent=2))
    build_tiny_gemma_tokenizer(tmp / "gemma" / "tokenizer.json")
    write_seeded(tmp / "gemma" / "model.safetensors", gemma_layout(gcfg), salt="synth-gemma")

    vcfg = vae_config(preset)
    (tmp / "vae" / "config.json").write_text(json.dumps(vcfg, indent=2))
    write_seeded(tmp / "vae" / "diffusion_pytorch_model.safetensors", vae_layout(vcfg), salt="synth-vae")

    (tmp / BUNDLE_FILE).write_text(
        json.dumps(
            {
                "format": 1,
                "space": "sdxl",
                "checkpoint": CHECKPOINT,
                "gemma": "gemma",
                "vae": "vae",
                "synthetic": preset,
                "license": None,
            },
            indent=2,
        )
    )
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


__all__ = ["BUNDLE_FILE", "gemma_config", "gemma_layout", "vae_config", "vae_layout", "write_bundle"]
