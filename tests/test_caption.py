"""The caption stage on tiny weights: prompt tokenisation, caching, directory loading, and
caption -> Gemma-2 features -> PiD mini network -> image.

Weights are the ``gemma2_mini`` golden's (hidden 64, the mini PiD network's txt_embed_dim) and
the tokenizer is ``pid_native.testing``'s tiny Gemma-style one; the reference for tokenisation
is the Hugging Face ``tokenizers`` call the upstream code makes (pid_spec §5.2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes  # also lets safetensors read the bf16 weights as numpy
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

import pid_native
from conftest import GOLDENS, golden_metadata
from pid_native import _native

GEMMA = GOLDENS / "gemma2_mini.safetensors"
CHI_JSON = Path(pid_native.__file__).parent / "data" / "chi_prompt.json"
TEXT_TOKENS = 300
PAD, BOS = 0, 2
LONG = "a small fluffy white cat sleeping on a warm sunny windowsill " * 40


def chi() -> str:
    data = json.loads(CHI_JSON.read_text())
    return data["join"].join(data["lines"])


def golden_weights(path: Path = GEMMA) -> dict[str, np.ndarray]:
    """The golden's bf16 weights under their bare Gemma2Model names."""
    with safe_open(str(path), "np") as f:
        return {k.removeprefix("weights."): f.get_tensor(k) for k in f.keys() if k.startswith("weights.")}


def write_hf_dir(
    out: Path, tokenizer: Path, weights: dict[str, np.ndarray], *, prefix: str = "model.", shards: int = 1
) -> Path:
    """A Hugging Face-style Gemma-2 directory: config.json, tokenizer.json, one or more shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(golden_metadata(GEMMA)["config"])
    shutil.copy(tokenizer, out / "tokenizer.json")
    names = sorted(weights)
    if shards == 1:
        save_file({prefix + n: weights[n] for n in names}, str(out / "model.safetensors"))
        return out
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({prefix + n: weights[n] for n in part}, str(out / fname))
        weight_map.update({prefix + n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def enc(tiny_tokenizer: Path) -> _native.CaptionEncoder:
    return _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, cache_size=8)


@pytest.fixture(scope="module")
def reference_tokenizer(tiny_tokenizer: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_tokenizer))


def reference_tokens(tok: Tokenizer, captions: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """What ``tokenizer(prompts, padding="max_length", max_length=num_chi + 298, truncation=True)`` gives."""
    num_chi = len(tok.encode(chi()).ids)
    max_len = num_chi + TEXT_TOKENS - 2
    full = [len(tok.encode(chi() + c).ids) for c in captions]
    fixed = Tokenizer.from_str(tok.to_str())
    fixed.enable_padding(pad_id=PAD, pad_token="<pad>", length=max_len)
    fixed.enable_truncation(max_len)
    encs = fixed.encode_batch([chi() + c for c in captions])
    ids = np.array([e.ids for e in encs], np.int32)
    mask = np.array([e.attention_mask for e in encs], np.int32)
    return ids, mask, [max(0, n - max_len) for n in full]


# --- tokenisation -------------------------------------------------------------------------


def test_prompt_length_is_num_chi_plus_298_with_bos_first(enc, reference_tokenizer) -> None:
    num_chi = len(reference_tokenizer.encode(chi()).ids)
    assert enc.num_chi == num_chi
    assert enc.max_length == num_chi + 298
    ids, mask, dropped = enc.tokenize(["a cat"])
    assert ids.shape == mask.shape == (1, num_chi + 298) and ids.dtype == mask.dtype == np.int32
    assert ids[0, 0] == BOS and dropped == [0]
    n = int(mask[0].sum())
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert (ids[0, n:] == PAD).all()


def test_batch_of_different_lengths_matches_the_reference_call(enc, reference_tokenizer) -> None:
    captions = ["a cat", "", "Über 猫 🐈 — naïve café", "A busy city street at dusk, glowing lamps", LONG]
    ids, mask, dropped = enc.tokenize(captions)
    ref_ids, ref_mask, ref_dropped = reference_tokens(reference_tokenizer, captions)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert dropped == ref_dropped
    lengths = mask.sum(axis=1)
    assert len(set(lengths.tolist())) == len(captions)  # every row padded differently


def test_empty_caption_is_bos_chi_and_padding(enc) -> None:
    _, mask, dropped = enc.tokenize([""])
    assert int(mask.sum()) == enc.num_chi and dropped == [0]
    feats = enc.encode([""])
    assert feats.shape == (1, TEXT_TOKENS, enc.hidden_size) and np.isfinite(feats).all()


def test_unicode_caption_falls_back_to_bytes(enc, reference_tokenizer) -> None:
    caption = "Über 猫 🐈"
    ids, mask, _ = enc.tokenize([caption])
    n = int(mask.sum())
    byte_ids = {reference_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "猫🐈".encode()}
    assert byte_ids <= set(ids[0, :n].tolist())
    assert reference_tokenizer.decode(ids[0, :n].tolist(), skip_special_tokens=True) == chi() + caption


def test_caption_longer_than_the_window_is_truncated_and_warned(enc, reference_tokenizer) -> None:
    ids, mask, dropped = enc.tokenize([LONG])
    expected = len(reference_tokenizer.encode(chi() + LONG).ids) - enc.max_length
    assert dropped == [expected] and expected > 0
    assert mask.all()  # the whole window is prompt
    # Right truncation keeps the start of the caption: the first tokens equal an untruncated prefix.
    np.testing.assert_array_equal(ids[0], reference_tokenizer.encode(chi() + LONG).ids[: enc.max_length])
    with pytest.warns(UserWarning, match=rf"last {expected} tokens were dropped"):
        feats = enc.encode([LONG])
    assert feats.shape == (1, TEXT_TOKENS, enc.hidden_size)


def test_tokenizer_without_bos_is_refused(tmp_path: Path, tiny_tokenizer: Path) -> None:
    raw = json.loads(tiny_tokenizer.read_text())
    raw["post_processor"] = None
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(pid_native.WeightsError) as info:
        _native.CaptionEncoder.from_golden(GEMMA, bad)
    assert info.value.code == "tokenizer_no_bos" and "<bos>" in str(info.value)


# --- features -----------------------------------------------------------------------------


def test_encode_is_position_0_plus_the_last_299_of_gemma(enc) -> None:
    captions = ["a cat", "", "the cat on the mat, in the rain"]
    feats = enc.encode(captions)
    ids, mask, _ = enc.tokenize(captions)
    hidden = enc.hidden_states(ids, mask)
    assert hidden.shape == (3, enc.max_length, enc.hidden_size)
    selected = np.concatenate([hidden[:, :1], hidden[:, -(TEXT_TOKENS - 1) :]], axis=1)
    assert feats.shape == (3, TEXT_TOKENS, enc.hidden_size) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, selected, rtol=0, atol=1e-5)
    # Pad positions are computed, not zeroed (pid_spec §5.4).
    assert np.abs(feats[1, -1]).max() > 0.1


def test_bad_token_inputs_are_rejected_with_a_code(enc) -> None:
    ids, mask, _ = enc.tokenize(["a cat"])
    cases = [
        (np.full_like(ids, 10_000), mask, "token_id"),
        (ids, np.full_like(mask, 2), "attention_mask"),
        (ids, np.roll(mask, 1, axis=1), "attention_mask"),  # left padded: no token first
        (ids[:, :5], mask, "token_shape"),
    ]
    for bad_ids, bad_mask, code in cases:
        with pytest.raises(pid_native.InvalidInputError) as info:
            enc.hidden_states(bad_ids, bad_mask)
        assert info.value.code == code


# --- cache --------------------------------------------------------------------------------


def test_cache_hits_misses_and_bound(tiny_tokenizer: Path) -> None:
    cache = _native.CaptionCache(2)
    enc = _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, cache=cache)
    first = enc.encode(["a", "b"])
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    np.testing.assert_array_equal(enc.encode(["b", "a"]), first[::-1])
    assert (cache.hits, cache.misses) == (2, 2)
    enc.encode(["c"])  # evicts the least recently used, "b"
    assert len(cache) == 2 and cache.capacity == 2
    enc.encode(["a"])
    assert cache.hits == 3
    enc.encode(["b"])
    assert cache.misses == 4
    cache.clear()
    assert len(cache) == 0


def test_different_weights_never_share_entries(tmp_path: Path, tiny_tokenizer: Path) -> None:
    weights = golden_weights()
    weights["norm.weight"] = (weights["norm.weight"].astype(np.float32) + 0.5).astype(ml_dtypes.bfloat16)
    other = write_hf_dir(tmp_path / "other", tiny_tokenizer, weights)
    same = write_hf_dir(tmp_path / "same", tiny_tokenizer, golden_weights())
    cache = _native.CaptionCache(8)
    a = _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, cache=cache)
    b = _native.CaptionEncoder.open(other, cache=cache)
    c = _native.CaptionEncoder.open(same, cache=cache)
    assert len({a.identity, b.identity, c.identity}) == 3
    fa, fb, fc = (e.encode(["a cat"]) for e in (a, b, c))
    assert len(cache) == 3 and cache.hits == 0
    assert np.abs(fa - fb).max() > 1e-2  # other weights, other features
    np.testing.assert_allclose(fa, fc, rtol=0, atol=1e-6)  # same weights in another layout
    # softcap changes the features, so it is part of the identity too.
    d = _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, softcap=True, cache=cache)
    assert d.identity != a.identity
    # Reopening the same files finds the earlier entry.
    again = _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, cache=cache)
    assert again.identity == a.identity
    np.testing.assert_array_equal(again.encode(["a cat"]), fa)
    assert cache.hits == 1


def test_cache_size_and_shared_cache_are_exclusive(tiny_tokenizer: Path) -> None:
    with pytest.raises(pid_native.InvalidInputError) as info:
        _native.CaptionEncoder.from_golden(GEMMA, tiny_tokenizer, cache_size=4, cache=_native.CaptionCache())
    assert info.value.code == "cache"


# --- Hugging Face directories -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "shards"), [("model.", 1), ("", 1), ("model.", 3)], ids=["merged", "bare-names", "sharded"]
)
def test_directory_layouts_load_the_same_model(
    tmp_path: Path, tiny_tokenizer: Path, enc, prefix: str, shards: int
) -> None:
    d = write_hf_dir(tmp_path / "gemma", tiny_tokenizer, golden_weights(), prefix=prefix, shards=shards)
    from_dir = _native.CaptionEncoder.open(d)
    ids, mask, _ = enc.tokenize(["a cat"])
    np.testing.assert_array_equal(from_dir.hidden_states(ids, mask), enc.hidden_states(ids, mask))


def test_directory_problems_are_named(tmp_path: Path, tiny_tokenizer: Path) -> None:
    weights = golden_weights()
    d = write_hf_dir(tmp_path / "gemma", tiny_tokenizer, weights)
    (d / "tokenizer.json").unlink()
    with pytest.raises(pid_native.MissingFileError, match=r"tokenizer\.json"):
        _native.CaptionEncoder.open(d)
    weights["layers.1.mlp.up_proj.weight"] = weights["layers.1.mlp.up_proj.weight"][:, :8]
    d = write_hf_dir(tmp_path / "bad", tiny_tokenizer, weights)
    with pytest.raises(pid_native.WeightsError) as info:
        _native.CaptionEncoder.open(d)
    assert info.value.code == "tensor_shape" and "layers.1.mlp.up_proj.weight" in str(info.value)
    (d / "config.json").unlink()
    with pytest.raises(pid_native.MissingFileError, match=r"config\.json"):
        _native.CaptionEncoder.open(d)


# --- end to end ---------------------------------------------------------------------------


def test_caption_to_image_through_the_mini_network_is_deterministic(
    tmp_path: Path, tiny_tokenizer: Path, mini_checkpoint: Path, enc
) -> None:
    gemma = write_hf_dir(tmp_path / "gemma", tiny_tokenizer, golden_weights())
    dec = pid_native.Decoder.open(mini_checkpoint, backend="candle-cpu", gemma=gemma)
    latents = np.random.default_rng(0).standard_normal((1, 4, 2, 3)).astype(np.float32)
    image = dec.decode(latents, "a red cat on a blue mat", seed=5)
    assert image.shape == (1, 3, 64, 96) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, dec.decode(latents, "a red cat on a blue mat", seed=5))
    # The caption path is exactly the encoder's features fed to the network.
    embs = enc.encode(["a red cat on a blue mat"])
    np.testing.assert_array_equal(image, dec.decode(latents, caption_embs=embs, seed=5))
    # The caption conditions the image.
    assert np.abs(image - dec.decode(latents, "", seed=5)).max() > 1e-3
