"""Textual inversion: the same text-encoder output as diffusers' load_textual_inversion for every file format,
on the small config and the full-size text encoder; trigger words, negative prompts, weighting, removal."""

from __future__ import annotations

import json
import os
import pickle
from functools import cache

import pytest
import torch
import transformers
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import save_file

from ldm.adapters import AdapterError, apply_adapters
from ldm.generation.prompts import encode_pair

from .adapter_models import build_our_text_only, build_their_text
from .test_tokenizer import _reference_vocab

TOL = 1e-5  # relative L2 error, float32 (the text models agree bit for bit without embeddings)


class Loader(TextualInversionLoaderMixin):
    """diffusers' pipeline textual-inversion loading on a bare tokenizer and text encoder."""

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.hf_device_map, self.components = None, {}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vocab")
    vocab, merges = _reference_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@cache
def ours_for(which: str):
    return build_our_text_only(which)


def theirs_for(ours, vocab_dir) -> Loader:
    """A fresh tokenizer and text encoder (diffusers adds tokens and rows to both) on our base weights."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocab_dir), local_files_only=True)
    return Loader(tokenizer, build_their_text(ours))


@torch.no_grad()
def their_hidden(loader: Loader, prompt: str) -> torch.Tensor:
    text = loader.maybe_convert_prompt(prompt, loader.tokenizer)  # "word" -> "word word_1 word_2" (multi-vector)
    ids = loader.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return loader.text_encoder(input_ids=ids).last_hidden_state


def write(tmp_path, fmt: str, width: int, seed: int = 0) -> tuple[str, str, int]:
    """(path, the word diffusers is told, vectors) of a random embedding file in `fmt`."""
    g = torch.Generator().manual_seed(seed)
    n = {"a1111_pt": 3, "a1111_safetensors": 2, "single_safetensors": 1, "diffusers_bin": 1, "diffusers_st": 2}[fmt]
    vectors = torch.randn(n, width, generator=g) * 0.05
    if fmt == "a1111_pt":
        path = tmp_path / "mystyle.pt"
        param = vectors.clone().requires_grad_()  # as the web UI saves it, straight from training
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": "other", "step": 500}
        torch.save(data, path)
        return str(path), "mystyle", n
    if fmt == "a1111_safetensors":
        save_file({"emb_params": vectors}, tmp_path / "bad-hands.safetensors")
        return str(tmp_path / "bad-hands.safetensors"), "bad-hands", n
    if fmt == "single_safetensors":
        save_file({"anything": vectors}, tmp_path / "ng_deep.safetensors")
        return str(tmp_path / "ng_deep.safetensors"), "ng_deep", n
    folder = tmp_path / fmt
    folder.mkdir()
    if fmt == "diffusers_bin":  # a single vector stored 1-D, as textual_inversion.py saves one
        torch.save({"<cat-toy>": vectors[0]}, folder / "learned_embeds.bin")
        return str(folder / "learned_embeds.bin"), "<cat-toy>", n
    save_file({"<cat-toy>": vectors}, folder / "learned_embeds.safetensors")
    return str(folder / "learned_embeds.safetensors"), "<cat-toy>", n


FORMATS = ("a1111_pt", "a1111_safetensors", "single_safetensors", "diffusers_bin", "diffusers_st")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_parity(tmp_path, vocab_dir, which: str, fmt: str) -> None:
    ours = ours_for(which)
    embedder = ours.cond_stage_model
    width = embedder.transformer.text_model.config.hidden_size
    path, word, _ = write(tmp_path, fmt, width)
    theirs = theirs_for(ours, vocab_dir)
    theirs.load_textual_inversion(path, token=word)
    prompts = [f"a photo of {word} on a table", f"{word}, {word}"]
    with torch.no_grad():
        base = embedder.encode(prompts[:1])
        with apply_adapters(ours, embeddings=[path]):
            got = [embedder.encode([p]) for p in prompts]
    for p, g in zip(prompts, got, strict=True):
        assert rel(g, their_hidden(theirs, p)) < TOL, p
    assert rel(got[0], base) > 0.01  # the word does something


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_config_matches_diffusers(tmp_path, vocab_dir, fmt):
    check_parity(tmp_path, vocab_dir, "tiny", fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["a1111_pt", "diffusers_st"])
def test_full_size_text_encoder_matches_diffusers(tmp_path, vocab_dir, fmt):
    check_parity(tmp_path, vocab_dir, "full", fmt)


def test_negative_prompt_and_weighting(tmp_path, vocab_dir):
    """In the negative prompt, plain; in `(word:1.3)`, each of its vectors weighted as a word's tokens are, then
    the window rescaled to its unweighted mean (the webui's rule), on diffusers' hidden states."""
    ours = ours_for("tiny")
    path, word, n = write(tmp_path, "a1111_pt", 32)
    theirs = theirs_for(ours, vocab_dir)
    theirs.load_textual_inversion(path, token=word)
    with torch.no_grad(), apply_adapters(ours, embeddings=[path]):
        cond, uncond = encode_pair(ours.cond_stage_model, f"a ({word}:1.3) cat", f"blurry, {word}")
    assert rel(uncond, their_hidden(theirs, f"blurry, {word}")) < TOL
    z = their_hidden(theirs, f"a {word} cat")[0]
    weights = torch.ones(77)
    weights[2 : 2 + n] = 1.3  # BOS, "a", then the word's n vectors
    scaled = z * weights[:, None]
    expected = scaled * (z.mean() / scaled.mean())
    assert rel(cond[0], expected) < TOL


def test_trigger_words(tmp_path):
    """The file name triggers A1111 files (not their stored name), the stored token diffusers' generic files;
    any case; never inside a longer word."""
    ours = build_our_text_only("tiny")
    embedder = ours.cond_stage_model
    pt, _, _ = write(tmp_path, "a1111_pt", 32)
    learned, _, _ = write(tmp_path, "diffusers_st", 32)
    base_ids = embedder.tokenize(["a mystyles other <cat-toy2>"])
    with apply_adapters(ours, embeddings=[pt, learned]) as handle:
        assert [e.word for e in handle.embeddings] == ["mystyle", "<cat-toy>"]
        ids = embedder.tokenize(["a MyStyle <cat-toy>"])[0].tolist()
        assert ids[:7] == [49406, 320, 49408, 49409, 49410, 49411, 49412]
        assert torch.equal(embedder.tokenize(["a mystyles other <cat-toy2>"]), base_ids)
        assert "TI hashes" in handle.infotext_fields() and "mystyle: " in handle.infotext_fields()["TI hashes"]


def test_removal_restores_the_vocabulary_exactly(tmp_path):
    ours = build_our_text_only("tiny")
    embedder = ours.cond_stage_model
    table = embedder.transformer.text_model.embeddings.token_embedding
    weight, tokenizer = table.weight, embedder.tokenizer
    before = embedder.encode(["a mystyle cat"])
    handle = apply_adapters(ours, embeddings=[write(tmp_path, "a1111_pt", 32)[0]])
    assert table.weight.shape[0] == weight.shape[0] + 3
    handle.remove()
    assert table.weight is weight and embedder.tokenizer is tokenizer and table.num_embeddings == weight.shape[0]
    assert torch.equal(embedder.encode(["a mystyle cat"]), before)


def test_bad_embedding_files(tmp_path):
    ours = build_our_text_only("tiny")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match=r"xl.safetensors is for SDXL"):
        apply_adapters(ours, embeddings=[tmp_path / "xl.safetensors"])
    save_file({"emb_params": torch.zeros(2, 1024)}, tmp_path / "sd2.safetensors")
    with pytest.raises(AdapterError, match=r"sd2.safetensors has 1024-wide vectors but this text encoder takes 32"):
        apply_adapters(ours, embeddings=[tmp_path / "sd2.safetensors"])
    save_file({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(AdapterError, match=r"two.safetensors holds 2 tensors"):
        apply_adapters(ours, embeddings=[tmp_path / "two.safetensors"])
    with pytest.raises(AdapterError, match=r"embedding file not found: .*nope.pt"):
        apply_adapters(ours, embeddings=[tmp_path / "nope.pt"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-embedding",))


def test_malicious_pickle_embedding_is_refused_with_nothing_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": _RunsCode()}, tmp_path / "evil.pt")
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump({"string_to_param": _RunsCode()}, f, protocol=2)
    ours = build_our_text_only("tiny")
    for name in ("evil.pt", "legacy.pt"):
        with pytest.raises(AdapterError, match=rf"refusing to load .*{name}.*could run code") as e:
            apply_adapters(ours, embeddings=[tmp_path / name])
        assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned-by-embedding").exists()
