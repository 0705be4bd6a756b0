"""Tests for ldm.generation.prompts: the webui attention syntax, weighted token conditioning, long-prompt chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.generation.prompts import (
    dropped_words,
    encode_pair,
    encode_prompt,
    encode_prompts,
    has_weighting_syntax,
    parse_prompt_attention,
    weighted_tokens,
)
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import BOS_ID, EOS_ID

torch.set_num_threads(1)

R = 1.1
S = 1 / 1.1

# Words that are one BPE token each (checked by `test_word_list_is_one_token_per_word`).
WORDS = "cat dog red blue green tree house car sky sun moon star river city road".split()


@pytest.fixture(scope="module")
def embedder() -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
        )
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in emb.named_parameters():
            if p.ndim >= 2:
                scale = 0.02 if "embedding" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight"):
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))
            elif "final_layer_norm" in name:  # a clearly non-zero mean, so mean restoration is well conditioned
                p.copy_(0.3 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return emb.eval()


def plain(embedder: FrozenCLIPEmbedder, ids: list[int]) -> torch.Tensor:
    """The text model on one packed window, computed directly (independent of ldm.generation.prompts)."""
    row = [BOS_ID, *ids, EOS_ID] + [EOS_ID] * (75 - len(ids))
    assert len(row) == 77
    with torch.no_grad():
        return embedder.transformer.text_model(torch.tensor([row]))[0]


def long_prompt(n: int, change: int | None = None) -> str:
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    if change is not None:
        words[change] = "moon" if words[change] != "moon" else "star"
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------------------
# Parser


PARSE_CASES = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", R)]),
    ("[cat]", [("cat", S)]),
    ("((a))", [("a", R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(a: -0.5 )", [("a", -0.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("((a:1.2) b)", [("a", 1.2 * R), (" b", R)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("[a (b) c]", [("a ", S), ("b", 1.0), (" c", S)]),
    ("(a:1.0)", [("a", 1.0)]),
    ("x (a:1.0) y", [("x a y", 1.0)]),
    ("(a:1.5)(b:1.5)", [("ab", 1.5)]),
    ("a()b", [("ab", 1.0)]),
    ("()", []),
    # escapes
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\[a\]", [("[a]", 1.0)]),
    (r"a\\b", [("a\\b", 1.0)]),
    (r"a\b", [("a\\b", 1.0)]),  # a lone backslash is literal
    ("a\\", [("a\\", 1.0)]),
    (r"(a\)b)", [("a)b", R)]),
    (r"\((a)\)", [("(", 1.0), ("a", R), (")", 1.0)]),
    (r"(a\:1.5)", [("a\\", 1.5)]),  # only the bracket escapes exist; "\:" is a literal backslash then a weight
    # colons that are not weights
    ("time: 5pm", [("time: 5pm", 1.0)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),  # no open "(": literal
    ("(a:x)", [("a:x", R)]),
    ("(a:1.2.3)", [("a:1.2.3", R)]),
    ("(a:1e3)", [("a:1e3", R)]),
    ("(a:1.3:2)", [("a:1.3", 2.0)]),
    ("(ratio 16:9)", [("ratio 16", 9.0)]),  # as in the webui: ":9)" inside a group is a weight
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(a:)", [("a:", R)]),
    # unbalanced
    ("(a", [("a", R)]),
    ("a (b c", [("a ", 1.0), ("b c", R)]),
    ("[a", [("a", S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("a) b", [("a) b", 1.0)]),
    ("a] b", [("a] b", 1.0)]),
    ("(a]", [("a]", R)]),
    ("[a (b] c)", [("a ", S), ("b", S * R), (" c", R)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES, ids=[repr(c[0]) for c in PARSE_CASES])
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=1e-12)


def test_weight_one_is_exactly_plain() -> None:
    assert parse_prompt_attention("a (cat:1.0) on (a:1) mat") == parse_prompt_attention("a cat on a mat")
    assert parse_prompt_attention("a cat on a mat") == [("a cat on a mat", 1.0)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", False),
        ("", False),
        ("time: 5pm", False),
        ("a) b] c", False),
        (r"a\b", False),
        ("(cat)", True),
        ("[cat]", True),
        ("(cat:1.0)", True),  # syntax even though it changes nothing
        (r"\(cat\)", True),  # escapes change the text
        ("(a", True),
    ],
)
def test_has_weighting_syntax(text: str, expected: bool) -> None:
    assert has_weighting_syntax(text) is expected


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def test_word_list_is_one_token_per_word(embedder: FrozenCLIPEmbedder) -> None:
    for w in WORDS + ["a", "on", "mat", "moon", "star"]:
        assert len(embedder.tokenizer.encode(w)) == 1, w


def test_weighted_tokens(embedder: FrozenCLIPEmbedder) -> None:
    ids, weights = weighted_tokens(embedder, "a (cat:1.5) [dog] on a mat")
    assert ids == embedder.tokenizer.encode("a cat dog on a mat")
    assert weights == pytest.approx([1.0, 1.5, S, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


@torch.no_grad()
def test_default_is_original_encode(embedder: FrozenCLIPEmbedder) -> None:
    for text in ["a cat on a mat", "", "time: 5pm, a) b", long_prompt(100)]:
        ref = embedder.encode([text])
        assert torch.equal(encode_prompt(embedder, text), ref)
        assert torch.equal(encode_prompt(embedder, text, chunking=False), ref)
    texts = ["a cat on a mat", long_prompt(90), ""]
    assert torch.equal(encode_prompts(embedder, texts), embedder.encode(texts))
    cond, uncond = encode_pair(embedder, texts, "")
    assert torch.equal(cond, embedder.encode(texts))
    assert torch.equal(uncond, embedder.encode(["", "", ""]))


@torch.no_grad()
def test_short_prompt_chunked_is_one_window_equal_to_default(embedder: FrozenCLIPEmbedder) -> None:
    for text in ["a cat on a mat", "", long_prompt(75)]:
        z = encode_prompt(embedder, text, chunking=True)
        assert z.shape == (1, 77, 32)
        assert torch.equal(z, embedder.encode([text]))


@torch.no_grad()
def test_weight_one_equals_plain_embedding(embedder: FrozenCLIPEmbedder) -> None:
    ref = embedder.encode(["a cat on a mat"])
    assert torch.equal(encode_prompt(embedder, "a (cat:1.0) on a mat"), ref)
    assert torch.equal(encode_prompt(embedder, "a (cat:1.0) on a mat", chunking=False), ref)
    assert torch.equal(encode_prompt(embedder, "a cat on a mat", chunking=True), ref)


@torch.no_grad()
def test_weights_scale_the_right_positions(embedder: FrozenCLIPEmbedder) -> None:
    text = "a (cat:1.5) [dog] on a ((mat))"
    z = encode_prompt(embedder, text)[0]
    ids = [embedder.tokenizer.encode(w)[0] for w in "a cat dog on a mat".split()]
    base = plain(embedder, ids)
    w = torch.ones(77)
    w[2], w[3], w[6] = 1.5, 1 / 1.1, 1.1 * 1.1  # position 0 is BOS

    # Independent computation of "scale, then restore the original mean".
    expected = base * w[:, None]
    expected = expected * (base.mean() / expected.mean())
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)

    # Per position the ratio to the unweighted states is (weight * one common constant).
    ratio = (z / base).mean(dim=1)
    torch.testing.assert_close(ratio / ratio[0], w, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ratio[0], torch.tensor(1.0))  # the mean restoration did rescale everything


@torch.no_grad()
def test_mean_is_restored_per_window(embedder: FrozenCLIPEmbedder) -> None:
    text = "(" + long_prompt(80) + ":1.4) [[" + long_prompt(60) + "]]"
    z = encode_prompt(embedder, text)
    assert z.shape == (1, 77 * 2, 32)
    ids, _ = weighted_tokens(embedder, text)
    for k in range(2):
        base = plain(embedder, ids[75 * k : 75 * (k + 1)])
        window = z[0, 77 * k : 77 * (k + 1)]
        torch.testing.assert_close(window.mean(), base.mean(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(window, base)


@torch.no_grad()
def test_unweighted_window_is_untouched(embedder: FrozenCLIPEmbedder) -> None:
    text = long_prompt(75) + " (moon:1.3)"
    z = encode_prompt(embedder, text)
    ids, _ = weighted_tokens(embedder, text)
    assert z.shape == (1, 154, 32)
    torch.testing.assert_close(z[0, :77], plain(embedder, ids[:75]), rtol=0, atol=0)
    assert not torch.allclose(z[0, 77:], plain(embedder, ids[75:]))


@torch.no_grad()
def test_long_prompt_chunking(embedder: FrozenCLIPEmbedder) -> None:
    a, b = long_prompt(150), long_prompt(150, change=100)
    za, zb = encode_prompt(embedder, a, chunking=True), encode_prompt(embedder, b, chunking=True)
    assert za.shape == (1, 154, 32)
    assert torch.equal(za[:, :77], zb[:, :77])
    assert not torch.allclose(za[:, 77:], zb[:, 77:])
    ids = embedder.tokenizer.encode(a)
    torch.testing.assert_close(za[0, 77:], plain(embedder, ids[75:]), rtol=1e-5, atol=1e-6)

    # Without chunking the word after token 77 is dropped, weighted or not.
    assert torch.equal(encode_prompt(embedder, a), encode_prompt(embedder, b))
    wa, wb = "(red:1.2) " + a, "(red:1.2) " + b
    assert encode_prompt(embedder, wa, chunking=False).shape == (1, 77, 32)
    assert torch.equal(encode_prompt(embedder, wa, chunking=False), encode_prompt(embedder, wb, chunking=False))
    # Weighting syntax turns chunking on by default.
    assert not torch.equal(encode_prompt(embedder, wa), encode_prompt(embedder, wb))
    assert encode_prompt(embedder, long_prompt(151), chunking=True).shape == (1, 77 * 3, 32)


@torch.no_grad()
def test_encode_pair_pads_to_equal_shapes(embedder: FrozenCLIPEmbedder) -> None:
    prompt = "(" + long_prompt(160) + ")"  # 3 windows
    cond, uncond = encode_pair(embedder, prompt, "blurry")
    assert cond.shape == uncond.shape == (1, 77 * 3, 32)
    neg = embedder.encode(["blurry"])
    for k in range(3):
        assert torch.equal(uncond[:, 77 * k : 77 * (k + 1)], neg)

    cond_e, uncond_e = encode_pair(embedder, prompt, "blurry", pad="empty")
    assert torch.equal(cond_e, cond)
    assert torch.equal(uncond_e[:, :77], neg)
    empty = embedder.encode([""])
    assert torch.equal(uncond_e[:, 77:154], empty) and torch.equal(uncond_e[:, 154:], empty)

    # The cond side is padded when the negative prompt is the longer one; windows tile cyclically.
    cond, uncond = encode_pair(embedder, "a cat", long_prompt(160), chunking=True)
    assert cond.shape == uncond.shape == (1, 77 * 3, 32)
    assert torch.equal(cond[:, 154:], embedder.encode(["a cat"]))
    two = encode_prompt(embedder, long_prompt(100), chunking=True)
    cond, _ = encode_pair(embedder, long_prompt(100), long_prompt(160), chunking=True)
    assert torch.equal(cond, torch.cat([two, two[:, :77]], dim=1))

    # A batch: every item padded to the longest, the string negative prompt shared.
    cond, uncond = encode_pair(embedder, ["a cat", prompt, "a cat"], "blurry")
    assert cond.shape == uncond.shape == (3, 77 * 3, 32)
    assert torch.equal(cond[1:2], encode_prompt(embedder, prompt))
    with pytest.raises(ValueError):
        encode_pair(embedder, ["a", "b"], ["c"])
    with pytest.raises(ValueError):
        encode_pair(embedder, "a", "b", pad="zeros")  # type: ignore[arg-type]


@torch.no_grad()
def test_repeated_window_leaves_cross_attention_unchanged() -> None:
    """Why "repeat" is the default padding: duplicated keys/values give the same attention output."""
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 77, 8, generator=g)
    once = F.scaled_dot_product_attention(q, kv, kv)
    thrice = F.scaled_dot_product_attention(q, kv.repeat(1, 1, 3, 1), kv.repeat(1, 1, 3, 1))
    torch.testing.assert_close(once, thrice, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_encode_prompts_batch(embedder: FrozenCLIPEmbedder) -> None:
    texts = ["a (cat) on a mat", long_prompt(120), "a (cat) on a mat"]
    z = encode_prompts(embedder, texts, chunking=True)
    assert z.shape == (3, 154, 32)
    assert torch.equal(z[0], z[2])
    assert torch.equal(z[1:2], encode_prompt(embedder, texts[1], chunking=True))
    assert encode_prompts(embedder, ["a cat"], min_windows=2).shape == (1, 154, 32)


def test_dropped_words(embedder: FrozenCLIPEmbedder) -> None:
    assert dropped_words(embedder, "a cat on a mat") == ""
    assert dropped_words(embedder, long_prompt(75)) == ""
    text = long_prompt(75) + " moon, star river"
    assert dropped_words(embedder, text) == "moon , star river"
    assert dropped_words(embedder, text, chunking=True) == ""
    weighted = "(" + text + ":1.2)"
    assert dropped_words(embedder, weighted) == ""  # weighting syntax turns chunking on
    assert dropped_words(embedder, weighted, chunking=False) == "moon , star river"
