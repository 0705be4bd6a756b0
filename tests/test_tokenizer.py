"""Tests for ldm.modules.encoders.tokenizer: exact SD v1 / CLIP ViT-L/14 token ids without any download.

Three independent references:

* the ids the original CompVis code produced for the reference case in ``tests/reference/oracle``.
* transformers' ``CLIPTokenizer`` built offline from vocab.json + merges.txt that this test derives itself from
  the BPE file bundled with open-clip-torch. SD v1 used the slow, pure-Python tokenizer of transformers 4.19:
  its ``tokenize`` cuts the raw text at the special tokens, then ``_tokenize`` runs
  ``whitespace_clean(ftfy.fix_text(chunk)).lower()`` on each other chunk (no html.unescape) before the CLIP
  regex. transformers 5 removed that class: ``CLIPTokenizer`` is now backed by the Rust ``tokenizers`` library
  (there is no slow CLIP tokenizer left), whose normalizer is only NFC + whitespace folding + lower case (no
  ftfy). We therefore feed it text pre-cleaned the 4.19 way (``sd_v1_clean``); it pads with ``<|endoftext|>``
  (49407) like SD v1, so whole rows must be equal, padding included.
* open_clip's ``SimpleTokenizer`` (OpenAI's original CLIP code). We load ``open_clip/tokenizer.py`` as a
  stand-alone module instead of ``import open_clip``: the package import pulls in the whole model zoo (~5 s),
  the tokenizer file only needs ftfy/regex/torch. open_clip 3.3 pads with 0 and truncates as
  ``(BOS + ids + EOS)[:77]`` with the last slot forced to EOS, i.e. ``BOS + ids[:75] + EOS`` -- the same rule as
  ours, so with ``pad_id=0`` whole rows must be equal. OpenAI CLIP additionally runs ``html.unescape`` twice
  after ftfy and does not split special tokens out first; SD v1 does neither, so open_clip is compared with
  ``style="openai"`` (and with the default style only on prompts where that cannot matter).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import time
from pathlib import Path

import ftfy
import numpy as np
import pytest
import regex
import torch

from ldm.modules.encoders import tokenizer as tokmod
from ldm.modules.encoders.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, CLIPTokenizer, get_tokenizer

from .conftest import ORACLE

REFERENCE_PROMPT = "a photograph of an astronaut riding a horse"

LONG_PROMPT = (
    "An extremely detailed matte painting of a sprawling cyberpunk city at dusk, neon signs reflecting in puddles, "
    "flying cars, towering skyscrapers covered with holographic advertisements, dense fog, volumetric lighting, "
    "cinematic composition, by Greg Rutkowski and Alphonse Mucha, trending on ArtStation, 8k, octane render, "
    "unreal engine 5, hyperrealistic, sharp focus, intricate, elegant, award-winning photograph"
)

PROMPTS = [
    REFERENCE_PROMPT,
    "",
    "Hello, world! What?!... (yes) -- [no] {maybe} #tag @user $5 100% a/b\\c ~*~",
    "\u201ccurly double\u201d and \u2018curly single\u2019 quotes",
    "emoji \U0001f600\U0001f525\U0001f44d\U0001f3fd and flags \U0001f1eb\U0001f1f7",
    "Caf\u00e9 Stra\u00dfe \u6771\u4eac na\u00efve "
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "&amp; &lt;3 &#39;",
    "A SHOUTING UPPER CASE PROMPT",
    "  repeated   spaces\tand\ttabs\nand\r\nnewlines  ",
    "it's we'll they're I'm you've he'd can't IT'S don't",
    "digits 1234 and 3.14159 and 1,000,000",
    LONG_PROMPT,
    "mojibake caf\u00c3\u00a9 fixed by ftfy",
    "no\u00a0break\u3000ideographic space",
    "\u039f\u0394\u039f\u03a3 final sigma",
]
# ftfy leaves entities alone in text that looks like HTML (contains "<"); only there CLIP's extra
# html.unescape changes the ids.
HTML_SENSITIVE = "Tom &amp; Jerry <3 <b>&quot;bold&quot;</b>"
# transformers splits special tokens out of the raw text; CLIP's regex glues "!<|" into one punctuation piece.
GLUED_SPECIAL = "photo!<|endoftext|>x"
SPECIAL_PROMPTS = [HTML_SENSITIVE, GLUED_SPECIAL, "a <|endoftext|> b", "<|startoftext|>x&amp;y<|ENDOFTEXT|>"]
SPECIAL_RE = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def _ids(prompt: str) -> str:
    return repr(prompt[:30])


def random_texts(seed: int, n: int) -> list[str]:
    """Random prompts mixing several scripts, punctuation, whitespace, emoji, entities and special tokens."""
    rng = random.Random(seed)
    pool = (
        "abcxyzABCXYZ0123456789 \t\n'\"!?.,;:-_()[]{}<>/\\&#@%*+=~^|`"
        "\u00e9\u00df\u00fc\u00f1\u00c5\u0153\u00e6\u00ff\u03b1\u03a3\u0436\u6771\u4eac\u3042\u30ab\ud55c"
        "\u2018\u2019\u201c\u201d\u2014\u2026\u00a0\u00b7\u0301\u200d\U0001f600\U0001f525\U0001f3fd"
    )
    words = ["photo", "astronaut", "it's", "can't", "we'll", "they're", "I'D", "'''s", "&amp;", "&lt;", "&#39;"]
    words += ["8k", "caf\u00c3\u00a9", "<|endoftext|>", "<|startoftext|>"]
    return [
        "".join(rng.choice(words) if rng.random() < 0.3 else rng.choice(pool) for _ in range(rng.randint(0, 40)))
        for _ in range(n)
    ]


# ---------------------------------------------------------------- references


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations, "open-clip-torch must be installed for the tests"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def ours_openai() -> CLIPTokenizer:
    return CLIPTokenizer(style="openai")


@pytest.fixture(scope="module")
def open_clip_tok():
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", _open_clip_dir() / "tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module._tokenizer  # the instance behind open_clip.tokenize()


def _reference_vocab() -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocab/merges from the BPE file, independently of the code under test."""
    with gzip.open(_open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    # Bytes that are visible Latin-1 characters keep their code point, the others get 256, 257, ...
    visible = [b for b in range(256) if chr(b).isprintable() and not chr(b).isspace()]
    assert len(visible) == 188
    others = [b for b in range(256) if b not in visible]
    byte_chars = [chr(b) for b in visible] + [chr(256 + i) for i in range(len(others))]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab, merges = _reference_vocab()
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def sd_v1_clean(text: str) -> str:
    """The text transformers 4.19's slow CLIPTokenizer ran its regex + BPE on.

    Special tokens are cut out of the raw text and kept as is (transformers 5 also keeps them whole); every
    other chunk gets ftfy, whitespace folding and lower case on its own.
    """
    chunks = SPECIAL_RE.split(text)
    return "".join(
        c if i % 2 else regex.sub(r"\s+", " ", ftfy.fix_text(c)).strip().lower() for i, c in enumerate(chunks)
    )


def hf_row(hf_tok, text: str) -> list[int]:
    return hf_tok(sd_v1_clean(text), truncation=True, max_length=77, padding="max_length")["input_ids"]


def hf_encode(hf_tok, text: str) -> list[int]:
    return hf_tok(sd_v1_clean(text), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- vocabulary and construction


def test_vocabulary_matches_independent_derivation(ours):
    vocab, _ = _reference_vocab()
    assert len(vocab) == VOCAB_SIZE == ours.vocab_size == 49408
    assert ours.encoder == vocab
    assert ours.encoder["<|startoftext|>"] == BOS_ID == 49406
    assert ours.encoder["<|endoftext|>"] == EOS_ID == 49407


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()


def test_missing_open_clip_gives_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        tokmod.importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install open-clip-torch"):
        CLIPTokenizer()


def test_explicit_vocab_path_and_bad_style(ours):
    tok = CLIPTokenizer(_open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz")
    assert tok.encode(LONG_PROMPT) == ours.encode(LONG_PROMPT)
    with pytest.raises(ValueError):
        CLIPTokenizer(style="clip")


# ---------------------------------------------------------------- reference ids of the original pipeline


@pytest.mark.parametrize(("prompt", "filename"), [(REFERENCE_PROMPT, "tokens.npy"), ("", "tokens_uc.npy")])
def test_matches_original_sd_reference(ours, prompt, filename):
    path = ORACLE / filename
    expected = np.load(path)
    assert expected.shape == (1, 77) and expected.dtype == np.int64
    got = ours(prompt)
    assert got.dtype == torch.long and got.shape == (1, 77)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_reference_prompt_literal_ids(ours):
    # Independent of the shared data: the well-known ids of the SD v1 example prompt.
    assert ours.encode(REFERENCE_PROMPT) == [320, 8853, 539, 550, 18376, 6765, 320, 4558]


# ---------------------------------------------------------------- agreement with transformers (SD v1)


@pytest.mark.parametrize("prompt", [*PROMPTS, *SPECIAL_PROMPTS], ids=_ids)
def test_matches_transformers(ours, hf_tok, prompt):
    assert ours(prompt)[0].tolist() == hf_row(hf_tok, prompt)
    assert ours.encode(prompt) == hf_encode(hf_tok, prompt)


def test_fuzz_against_transformers(ours, hf_tok):
    for text in random_texts(4321, 300):
        assert ours.encode(text) == hf_encode(hf_tok, text), repr(text)


# ---------------------------------------------------------------- agreement with open_clip / OpenAI CLIP


@pytest.mark.parametrize("prompt", [*PROMPTS, HTML_SENSITIVE], ids=_ids)
def test_openai_style_matches_open_clip(ours_openai, open_clip_tok, prompt):
    assert ours_openai.encode(prompt) == open_clip_tok.encode(prompt)
    expected = open_clip_tok(prompt)  # zero padded, truncated to 77 with EOS last
    torch.testing.assert_close(ours_openai(prompt, pad_id=0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=_ids)
def test_sd_style_matches_open_clip_on_ordinary_prompts(ours, open_clip_tok, prompt):
    assert ours.encode(prompt) == open_clip_tok.encode(prompt)
    torch.testing.assert_close(ours(prompt, pad_id=0), open_clip_tok(prompt), rtol=0, atol=0)


def test_fuzz_against_open_clip(ours_openai, open_clip_tok):
    for text in random_texts(1234, 300):
        # open_clip renamed its special tokens <start_of_text>/<end_of_text>; OpenAI CLIP's are ours.
        text = text.replace("<|endoftext|>", "<|").replace("<|startoftext|>", "|>")
        assert ours_openai.encode(text) == open_clip_tok.encode(text), repr(text)


def test_where_sd_and_openai_styles_differ(ours, ours_openai, hf_tok, open_clip_tok):
    # SD v1 keeps "&amp;" here because ftfy treats the text as HTML; OpenAI CLIP unescapes it.
    assert ours.encode(HTML_SENSITIVE) == hf_encode(hf_tok, HTML_SENSITIVE)
    assert ours_openai.encode(HTML_SENSITIVE) == open_clip_tok.encode(HTML_SENSITIVE)
    assert ours.decode(ours.encode(HTML_SENSITIVE)).replace(" ", "") == "tom&amp;jerry<3<b>&quot;bold&quot;</b>"
    assert ours_openai.decode(ours_openai.encode(HTML_SENSITIVE)).replace(" ", "") == 'tom&jerry<3<b>"bold"</b>'
    # Special-token text glued to punctuation: an EOS id for SD v1, punctuation + letters for OpenAI CLIP.
    assert ours.encode(GLUED_SPECIAL) == [*ours.encode("photo!"), EOS_ID, *ours.encode("x")]
    assert EOS_ID not in ours_openai.encode(GLUED_SPECIAL)
    assert ours_openai.encode("a <|endoftext|> b") == ours.encode("a <|endoftext|> b") == [320, EOS_ID, 321]


# ---------------------------------------------------------------- BOS / EOS / padding / truncation rules


def _digits(n: int) -> str:
    return " ".join(str(i % 10) for i in range(n))


@pytest.fixture(scope="module")
def digit_ids(ours) -> list[int]:
    ids = [ours.encoder[f"{d}</w>"] for d in range(10)]
    assert len(set(ids)) == 10
    return ids


@pytest.mark.parametrize("n", [0, 1, 74, 75, 76, 77, 200])
def test_truncation_and_padding(ours, digit_ids, n):
    bpe = [digit_ids[i % 10] for i in range(n)]
    assert ours.encode(_digits(n)) == bpe  # encode: no BOS/EOS, no truncation

    kept = bpe[:75]  # BOS + 75 + EOS = 77: the EOS always stays the last real token
    for pad_id in (EOS_ID, 0):
        row = ours(_digits(n), pad_id=pad_id)
        assert row.shape == (1, 77) and row.dtype == torch.long
        assert row[0].tolist() == [BOS_ID, *kept, EOS_ID] + [pad_id] * (75 - len(kept))
    assert ours(_digits(n))[0].tolist().count(EOS_ID) == 77 - 1 - len(kept)  # SD v1 pads with EOS


def test_custom_max_length_and_batch(ours, digit_ids):
    out = ours([_digits(3), _digits(20), ""], max_length=10, pad_id=0)
    assert out.shape == (3, 10)
    assert out[0].tolist() == [BOS_ID, *digit_ids[:3], EOS_ID, 0, 0, 0, 0, 0]
    assert out[1].tolist() == [BOS_ID, *[digit_ids[i % 10] for i in range(8)], EOS_ID]
    assert out[2].tolist() == [BOS_ID, EOS_ID] + [0] * 8
    assert ours([]).shape == (0, 77)
    with pytest.raises(ValueError):
        ours("x", max_length=1)


def test_truncated_words(ours):
    assert ours.truncated_words(_digits(75)) == []
    assert ours.truncated_words(_digits(80)) == ["5", "6", "7", "8", "9"]
    assert ours.truncated_words(LONG_PROMPT)[-4:] == ["award", "-", "winning", "photograph"]


def test_decode_round_trip(ours):
    assert ours.decode(ours.encode("A Photograph   of an ASTRONAUT")) == "a photograph of an astronaut"
    text = "caf\u00e9 stra\u00dfe \u6771\u4eac \U0001f600 it's"
    assert ours.decode(ours(text)[0]) == ours.decode(ours.encode(text))
    assert ours.decode(ours.encode(text)).replace(" ", "") == text.replace(" ", "")


def test_tokenizing_is_fast(ours):
    words = ["zorbulent", "quixotical", "flabbergastedly", "snorkelwise", "vermiculated", "glimmerous", "brontide"]
    prompts = [f"a {w} portrait of prompt number {i}, {w}ish style" for i, w in enumerate(words)]
    start = time.perf_counter()
    for p in prompts:  # unseen words: exercises BPE, not just the cache
        ours(p)
    per_prompt = (time.perf_counter() - start) / len(prompts)
    assert per_prompt < 0.02, f"{per_prompt * 1e3:.1f} ms per prompt"
