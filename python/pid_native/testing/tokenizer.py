"""A tiny Gemma-*style* ``tokenizer.json`` for tests (build_and_ecosystem.md §7).

No package ships Gemma-2's 256k-piece tokenizer, so tests build a small one with the same
mechanics: SentencePiece-style spaces (the normaliser turns " " into "▁", no
pre-tokenizer), BPE with byte fallback (an unknown character becomes its UTF-8 bytes as
``<0xNN>`` pieces, which are *normal* tokens so decoding keeps them), and a post-processor
that puts ``<bos>`` first. Ids follow Gemma: pad 0, eos 1, bos 2, unk 3.

The vocabulary is deterministic and stays below 512 entries, the vocabulary of the
``gemma2_mini`` golden, so its ids index that model's embedding table.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, processors

SPACE = "\u2581"
PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
# Frequent English fragments, merged left to right; each merge adds one vocabulary entry.
MERGES = (
    ("t", "h"),
    ("th", "e"),
    (SPACE, "the"),
    ("a", "t"),
    ("c", "at"),
    (SPACE, "cat"),
    ("i", "n"),
    ("in", "g"),
    ("e", "r"),
    ("o", "n"),
    ("a", "n"),
    (SPACE, "a"),
    (SPACE, "s"),
    (SPACE, "p"),
    ("r", "e"),
    ("e", "s"),
    ("o", "r"),
    ("e", "n"),
)
MAX_VOCAB = 512


def tiny_gemma_vocab() -> dict[str, int]:
    """Specials, the 256 byte-fallback pieces, single characters, then one entry per merge."""
    vocab: dict[str, int] = {}
    for piece in SPECIALS:
        vocab[piece] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in string.ascii_letters + string.digits + ".,:;!?'\"-()" + SPACE:
        vocab.setdefault(ch, len(vocab))
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def build_tiny_gemma_tokenizer(path: str | os.PathLike[str]) -> Path:
    """Write the tiny Gemma-style tokenizer to ``path`` (a ``tokenizer.json``) and return the path."""
    bpe = models.BPE(
        vocab=tiny_gemma_vocab(), merges=list(MERGES), unk_token="<unk>", byte_fallback=True, fuse_unk=True
    )
    tok = Tokenizer(bpe)
    tok.add_special_tokens(list(SPECIALS))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    out = Path(path)
    tok.save(str(out))
    return out


if __name__ == "__main__":  # used by the Rust test-suite, which needs only `tokenizers`
    import sys

    build_tiny_gemma_tokenizer(sys.argv[1])
