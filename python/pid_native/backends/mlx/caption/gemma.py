"""Gemma-2 decoder stack, the caption encoder's text model (pid_spec §5.1).

The bare ``Gemma2Model`` of Hugging Face transformers 4.57.1 (no LM head): embeddings
scaled by sqrt(hidden), per layer pre/post RMSNorms with the (1 + w) convention around
grouped-query attention and a GeGLU-tanh MLP, then a final norm. Attribute names are the
checkpoint's keys (``layers.3.self_attn.q_proj.weight``; a ``model.`` prefix is stripped
by the loader).

Softcap: the reference runs Gemma with transformers' default SDPA attention, which ignores
``attn_logit_softcapping`` (pid_spec §5.7), so ``softcap=False`` (the default) reproduces
the features PiD was trained on; ``softcap=True`` applies tanh(s / 50) * 50 to the
attention logits as the eager implementation does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ....errors import InvalidInputError
from ..net.layers import Linear, set_matmul_dtype
from ..net.rope import pow_f32, unary_f32


@dataclass(frozen=True)
class GemmaConfig:
    """The ``config.json`` fields the text model uses (HF ``Gemma2Config`` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()
    pad_token_id: int = 0
    bos_token_id: int = 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GemmaConfig:
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise InvalidInputError(
                f"Gemma hidden_activation {act!r} is not supported; Gemma-2 uses 'gelu_pytorch_tanh'",
                "gemma_config",
            )
        names = set(cls.__dataclass_fields__)
        # Absent or null pad/bos ids mean Gemma's 0 and 2; a null softcap or window means none.
        kwargs = {k: v for k, v in raw.items() if k in names and not (v is None and k.endswith("token_id"))}
        if not kwargs.get("layer_types"):
            # Gemma2Config's default: even layers (0-based) use the sliding window.
            kwargs["layer_types"] = [
                "sliding_attention" if (i + 1) % 2 else "full_attention"
                for i in range(raw["num_hidden_layers"])
            ]
        kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(**kwargs)


class GemmaRmsNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, in f32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.zeros((dim,))
        self._eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight.astype(x.dtype), self._eps)


class Embedding(nn.Module):
    """``embed_tokens``: a lookup table ``(vocab, hidden)``."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = mx.zeros((vocab, dim))

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids]


def rotate_half_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """HF's rotate-half RoPE of ``x (B, H, L, d)`` with tables ``(L, d/2)``, in f32, back to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(mx.float32)
    a, b = xf[..., :half], xf[..., half:]
    return mx.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos/sin tables ``(length, head_dim/2)`` with HF's f32 steps.

    inv_freq = 1 / theta^(2i/d) and angle = pos * inv_freq, both in f32.
    """
    exps = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / pow_f32(np.float32(theta), exps)
    angles = np.arange(length).astype(np.float32)[:, None] * inv_freq
    return mx.array(unary_f32(np.cos, angles)), mx.array(unary_f32(np.sin, angles))


class Attention(nn.Module):
    """``self_attn``: grouped-query attention with RoPE, scale query_pre_attn_scalar^-0.5."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, hq * hd, bias=False)
        self.k_proj = Linear(cfg.hidden_size, hkv * hd, bias=False)
        self.v_proj = Linear(cfg.hidden_size, hkv * hd, bias=False)
        self.o_proj = Linear(hq * hd, cfg.hidden_size, bias=False)
        self._heads = (hq, hkv, hd)
        self._scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar)

    def __call__(
        self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array, softcap: float | None
    ) -> mx.array:
        b, n, _ = x.shape
        hq, hkv, hd = self._heads
        q = self.q_proj(x).reshape(b, n, hq, hd).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, n, hkv, hd).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, hkv, hd).transpose(0, 2, 1, 3)
        q, k = rotate_half_rope(q, *rope), rotate_half_rope(k, *rope)
        if softcap is None:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self._scale, mask=mask)
        else:
            # The eager path: explicit logits so the softcap can be applied before the mask.
            rep = hq // hkv
            k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
            logits = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * self._scale
            logits = mx.tanh(logits / softcap) * softcap
            logits = mx.where(mask, logits, -mx.inf)
            out = mx.softmax(logits, axis=-1, precise=True).astype(v.dtype) @ v
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, hq * hd))


class Mlp(nn.Module):
    """``mlp``: ``down_proj(gelu_tanh(gate_proj x) * up_proj x)``."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRmsNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = GemmaRmsNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRmsNorm(cfg.hidden_size, eps)
        self.mlp = Mlp(cfg)
        self.post_feedforward_layernorm = GemmaRmsNorm(cfg.hidden_size, eps)

    def __call__(
        self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array, softcap: float | None
    ) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, softcap))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nn.Module):
    """The text model; ``__call__`` returns the last hidden state after the final norm."""

    def __init__(self, cfg: GemmaConfig, softcap: bool = False, matmul_dtype: mx.Dtype | None = None) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = GemmaRmsNorm(cfg.hidden_size, cfg.rms_norm_eps)
        set_matmul_dtype(self, matmul_dtype)
        self._cfg = cfg
        self._softcap = cfg.attn_logit_softcapping if softcap else None

    @property
    def config(self) -> GemmaConfig:
        return self._cfg

    def masks(self, attention_mask: mx.array) -> dict[str, mx.array]:
        """Boolean ``(B, 1, L, L)`` masks per layer type: causal, pad keys hidden, sliding window.

        Positions are 0..L-1 whatever the padding, and pad *queries* still attend to the
        real tokens before them: their features are conditioning too (pid_spec §5.4).
        """
        n = attention_mask.shape[1]
        q = mx.arange(n)[:, None]
        k = mx.arange(n)[None]
        keep = (k <= q)[None, None] & (attention_mask[:, None, None, :] != 0)
        out = {"full_attention": keep}
        if self._cfg.sliding_window is not None:
            out["sliding_attention"] = keep & ((q - k) < self._cfg.sliding_window)[None, None]
        else:
            out["sliding_attention"] = keep
        return out

    def check_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Shapes, vocabulary and right padding, as the core checks them.

        Raises:
            InvalidInputError: codes ``token_shape``, ``token_id``, ``attention_mask``.
        """
        if input_ids.ndim != 2 or 0 in input_ids.shape or attention_mask.shape != input_ids.shape:
            raise InvalidInputError(
                "input_ids and attention_mask must both be non-empty (B, L); "
                f"got {list(input_ids.shape)} and {list(attention_mask.shape)}",
                "token_shape",
            )
        vocab = self._cfg.vocab_size
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        if bad.size:
            raise InvalidInputError(
                f"token id {bad[0]} is outside the vocabulary 0..{vocab}; was the text tokenized with "
                "this model's tokenizer.json?",
                "token_id",
            )
        if not np.isin(attention_mask, (0, 1)).all():
            raise InvalidInputError("attention_mask must hold only 0 and 1", "attention_mask")
        if (attention_mask[:, 0] == 0).any():
            raise InvalidInputError(
                "every sequence must start with a token (attention_mask[:, 0] == 1): "
                "the batch must be right padded",
                "attention_mask",
            )

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """``input_ids, attention_mask (B, L)`` (right padded) -> hidden states ``(B, L, hidden)`` f32."""
        self.check_inputs(np.array(input_ids), np.array(attention_mask))
        cfg = self._cfg
        x = self.embed_tokens(input_ids).astype(mx.float32)
        x = x * mx.array(math.sqrt(cfg.hidden_size), dtype=x.dtype)
        rope = rope_tables(cfg.head_dim, input_ids.shape[1], cfg.rope_theta)
        masks = self.masks(attention_mask)
        for layer, kind in zip(self.layers, cfg.layer_types, strict=True):
            x = layer(x, rope, masks[kind], self._softcap)
            mx.eval(x)
        return self.norm(x)
