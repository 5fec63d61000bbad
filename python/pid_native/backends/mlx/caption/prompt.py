"""Caption prompt construction, tokenisation and token selection (pid_spec §5.2-§5.3).

prompt = CHI + caption (no separator, no chat template); num_chi = the token count of
CHI alone *including* BOS; every prompt is tokenised with BOS, right-truncated and
right-padded to ``num_chi + 300 - 2`` tokens; PiD then keeps position 0 (BOS) and the last
299 positions. Pad positions are real conditioning (pid_spec §5.4).

Tokenisation is pluggable (:class:`PromptTokenizer`): :class:`HfPromptTokenizer` runs
Gemma's ``tokenizer.json`` through the ``tokenizers`` library with the same settings as the
core's ``caption/prompt.rs`` (which uses the same library's Rust crate), so both backends
produce identical ids.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from ....errors import InvalidInputError, MissingFileError, WeightsError

log = logging.getLogger(__name__)

# PiD's txt_max_length: the caption positions every released student reads.
TEXT_TOKENS = 300


def chi_prompt() -> str:
    """The 8-line "Enhanced prompt" instruction prepended to every caption (``data/chi_prompt.json``)."""
    data = json.loads(resources.files("pid_native").joinpath("data/chi_prompt.json").read_text("utf-8"))
    return data["join"].join(data["lines"])


class PromptTokenizer(Protocol):
    """Turns captions into Gemma input ids and attention masks, both ``(B, L)`` int32."""

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


class HfPromptTokenizer:
    """:class:`PromptTokenizer` over a Hugging Face ``tokenizer.json`` (the core's ``PromptTokenizer``).

    Args:
        path: the model's ``tokenizer.json``.
        pad_id, bos_id: Gemma's pad and BOS ids (0 and 2), from its ``config.json``.

    Raises:
        MissingFileError: no such file. WeightsError: unreadable, or it does not add BOS.
    """

    def __init__(self, path: str | Path, pad_id: int = 0, bos_id: int = 2) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(
                f"{path}: not found; the caption encoder needs the model's tokenizer.json, "
                "provision gemma-2-2b-it with `pid-native fetch`",
                "missing_file",
            )
        try:
            plain = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            msg = f"{path}: cannot load the tokenizer ({exc}); re-download it"
            raise WeightsError(msg, "tokenizer") from None
        plain.no_padding()
        plain.no_truncation()
        self._chi = chi_prompt()
        chi_ids = plain.encode(self._chi, add_special_tokens=True).ids
        if chi_ids[:1] != [bos_id]:
            raise WeightsError(
                f"{path}: the tokenizer does not start sequences with <bos> (id {bos_id}); PiD's prompts "
                "need it: use the model's own tokenizer.json, whose post-processor adds it",
                "tokenizer_no_bos",
            )
        self.num_chi = len(chi_ids)
        # pid_spec §5.2: max_len = num_chi + 300 - 2.
        self.max_len = self.num_chi + TEXT_TOKENS - 2
        fixed = Tokenizer.from_str(plain.to_str())
        fixed.enable_truncation(self.max_len, strategy="longest_first", direction="right")
        pad_token = plain.id_to_token(pad_id) or "<pad>"
        fixed.enable_padding(direction="right", length=self.max_len, pad_id=pad_id, pad_token=pad_token)
        self._plain, self._fixed = plain, fixed

    def tokenize(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = [], []
        for caption in captions:
            prompt = self._chi + caption
            cut = len(self._plain.encode(prompt, add_special_tokens=True).ids) - self.max_len
            if cut > 0:
                log.warning(
                    "caption truncated: its last %d tokens are dropped "
                    "(the prompt window holds %d caption tokens)",
                    cut,
                    self.max_len - self.num_chi,
                )
            enc = self._fixed.encode(prompt, add_special_tokens=True)
            ids.append(enc.ids)
            mask.append(enc.attention_mask)
        shape = (len(captions), self.max_len)
        return np.array(ids, dtype=np.int32).reshape(shape), np.array(mask, dtype=np.int32).reshape(shape)


def select_tokens(hidden: np.ndarray, count: int = TEXT_TOKENS) -> np.ndarray:
    """Position 0 (BOS) plus the last ``count - 1`` positions of ``hidden (B, L, D)``.

    Raises:
        InvalidInputError: fewer than ``count`` positions (code ``token_count``).
    """
    if hidden.shape[1] < count:
        raise InvalidInputError(
            f"the hidden states hold {hidden.shape[1]} positions; PiD selects {count}", "token_count"
        )
    return np.concatenate([hidden[:, :1], hidden[:, hidden.shape[1] - (count - 1) :]], axis=1)
