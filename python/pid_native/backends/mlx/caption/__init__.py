"""Caption encoder: captions -> the ``[B, 300, 2304]`` features PiD consumes (pid_spec §5).

Pipeline: CHI prompt + caption -> tokens (:mod:`.prompt`) -> Gemma-2 last hidden state
(:mod:`.gemma`) -> BOS + last 299 positions -> float32. Computed once per decode and reused
for every sampler step; recent captions are cached.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ....errors import InvalidInputError, MissingFileError, WeightsError
from ..weights import load_safetensors
from .gemma import Gemma2Model, GemmaConfig
from .prompt import TEXT_TOKENS, HfPromptTokenizer, PromptTokenizer, select_tokens


class CaptionEncoder:
    """Gemma-2 features of captions, as PiD consumes them.

    Args:
        model: the loaded Gemma-2 text model.
        tokenizer: prompt construction and tokenisation (see :class:`.prompt.PromptTokenizer`).
        cache_size: how many recent captions' features to keep.
    """

    def __init__(self, model: Gemma2Model, tokenizer: PromptTokenizer, cache_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        softcap: bool = False,
        matmul_dtype: mx.Dtype | None = None,
        tokenizer: PromptTokenizer | None = None,
    ) -> CaptionEncoder:
        """Load a Gemma-2-2b-it directory (``config.json``, ``tokenizer.json``, ``*.safetensors``).

        Args:
            directory: the Hugging Face model directory.
            softcap: apply the attention-logit softcap (the reference does not; pid_spec §5.7).
            matmul_dtype: matmul arithmetic (None: float32).
            tokenizer: replaces the default ``tokenizer.json`` tokenizer.

        Raises:
            MissingFileError: a needed file is missing. WeightsError: the tensors do not fit the config.
        """
        d = Path(directory)
        config = d / "config.json"
        files = sorted(d.glob("*.safetensors"))
        if not config.is_file() or not files:
            raise MissingFileError(
                f"{d}: not a Gemma-2 directory (needs config.json and *.safetensors); "
                "provision gemma-2-2b-it with `pid-native fetch`",
                "missing_file",
            )
        cfg = GemmaConfig.from_dict(json.loads(config.read_text()))
        model = Gemma2Model(cfg, softcap=softcap, matmul_dtype=matmul_dtype)
        load_gemma(model, load_safetensors(files), d)
        tok = tokenizer or HfPromptTokenizer(d / "tokenizer.json", cfg.pad_token_id, cfg.bos_token_id)
        return cls(model, tok)

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Gemma's last hidden state ``(B, L, D)`` f32 for token ids and mask ``(B, L)``."""
        h = self.model(mx.array(input_ids.astype(np.int32)), mx.array(attention_mask.astype(np.int32)))
        return np.array(h.astype(mx.float32))

    def encode(self, captions: list[str]) -> np.ndarray:
        """Caption features ``(B, 300, D)`` float32, one row per caption ("" is valid).

        Each uncached caption runs through Gemma on its own, as in the core, so a caption's
        features never depend on the rest of the batch and peak memory is that of one prompt.
        """
        if not all(isinstance(c, str) for c in captions):
            raise InvalidInputError("captions must be strings", "caption_type")
        rows = []
        for caption in captions:
            if caption not in self._cache:
                ids, mask = self.tokenizer.tokenize([caption])
                self._cache[caption] = select_tokens(self.hidden_states(ids, mask))[0]
            self._cache.move_to_end(caption)
            rows.append(self._cache[caption])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if not rows:
            return np.zeros((0, TEXT_TOKENS, self.model.config.hidden_size), np.float32)
        return np.stack(rows)


def load_gemma(model: Gemma2Model, tensors: dict[str, mx.array], source: str | os.PathLike[str]) -> None:
    """Load HF ``Gemma2`` tensors (``model.`` prefix optional; the tied ``lm_head`` is ignored).

    Raises:
        WeightsError: names or shapes do not match the config.
    """
    tensors = {k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"}
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{source}: Gemma tensors do not match its config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}",
            "gemma_layout",
        )
    for name, w in tensors.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{source}: tensor `{name}` has shape {list(w.shape)}, expected {list(expected[name].shape)}",
                "tensor_shape",
            )
    model.load_weights(list(tensors.items()), strict=True)
    mx.eval(model.parameters())


__all__ = [
    "TEXT_TOKENS",
    "CaptionEncoder",
    "HfPromptTokenizer",
    "PromptTokenizer",
    "load_gemma",
    "select_tokens",
]
