"""Prompt weighting and long prompts for SD v1 conditioning, in the AUTOMATIC1111 webui syntax.

Syntax (see :func:`parse_prompt_attention`): ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]``
divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3; groups nest and their factors multiply. ``\\(``,
``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters.

Conditioning (see :func:`encode_prompt`): every BPE token carries the weight of the text it came from. The text
encoder runs on windows of 75 tokens (BOS + 75 + EOS, padded with EOS to 77); the hidden state at each token
position is multiplied by its weight, then each window's 77xC block is rescaled so its mean equals the unweighted
one (the webui's "original" emphasis). With chunking the windows are concatenated along the sequence axis, so a
prompt of k windows gives a ``[1, 77*k, C]`` context, which SD v1's cross-attention accepts as is.

A prompt without weighting syntax and without chunking is encoded exactly as the original does (truncated to 75
tokens), so default runs keep giving the original's images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

__all__ = [
    "ROUND_FACTOR",
    "SQUARE_FACTOR",
    "dropped_words",
    "encode_pair",
    "encode_prompt",
    "encode_prompts",
    "has_weighting_syntax",
    "parse_prompt_attention",
    "uses_custom_path",
    "weighted_tokens",
]

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

PadMode = Literal["repeat", "empty"]

_ESCAPABLE = frozenset("()[]\\")
_SPECIAL = re.compile(r"[\\()\[\]:]")
# ":<number>)" closes the innermost open "(" with that factor. A plain decimal only: no exponent, inf or nan,
# so "(a:1e3)" or "(a:1.2.3)" stay literal text inside an ordinary 1.1 group.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` runs, so each token can be weighted by the text it came from.

    Rules (those of the AUTOMATIC1111 webui, which is what prompts found in the wild are written for):

    * ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w`` (a plain decimal,
      optional sign, whitespace allowed around it: ``(x: -0.5 )``). Nested groups multiply.
    * ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; any other backslash is literal too.
    * A colon is an ordinary character unless ``:number)`` closes an open ``(``: ``time: 5pm`` is plain text,
      and ``(a:x)`` is the text ``a:x`` in an ordinary 1.1 group; but ``(ratio 16:9)`` is ``ratio 16`` at 9.
    * Unbalanced brackets: an unclosed ``(`` or ``[`` applies its factor to the rest of the prompt; a closing
      bracket with no open bracket of its kind is literal text. Round and square groups are tracked separately,
      so ``[a (b] c)`` gives ``a`` 1/1.1, ``b`` 1.0, ``c`` 1.1.
    * Adjacent runs of equal weight are merged and empty runs dropped; an empty result is ``[]``. Hence
      ``(word:1.0)`` parses exactly like ``word``, and a prompt without syntax gives ``[(prompt, 1.0)]``.
    """
    runs: list[list] = []  # [text, weight], mutable so that closing a group can rescale what it spans
    round_open: list[int] = []  # index into runs where each open "(" started
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in _ESCAPABLE:
                runs.append([text[i + 1], 1.0])
                i += 2
            else:
                runs.append(["\\", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(runs))
            i += 1
        elif c == "[":
            square_open.append(len(runs))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, i) if round_open else None
            if m is not None:
                scale(round_open.pop(), float(m.group(1)))
                i = m.end()
            else:
                runs.append([":", 1.0])
                i += 1
        elif c == ")" and round_open:
            scale(round_open.pop(), ROUND_FACTOR)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), SQUARE_FACTOR)
            i += 1
        elif c in ")]":
            runs.append([c, 1.0])
            i += 1
        else:
            m = _SPECIAL.search(text, i)
            j = m.start() if m is not None else n
            runs.append([text[i:j], 1.0])
            i = j
    for start in round_open:
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, SQUARE_FACTOR)

    merged: list[tuple[str, float]] = []
    for piece, weight in runs:
        if not piece:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


def has_weighting_syntax(text: str) -> bool:
    """Whether parsing changes the prompt (any weight or escape), i.e. whether the weighted path is needed.

    A prompt for which this is False parses to itself with weight 1, so the original's encoding is exact for it.
    Stray closing brackets and colons outside weights do not count.
    """
    return parse_prompt_attention(text) != ([(text, 1.0)] if text else [])


def weighted_tokens(embedder: FrozenCLIPEmbedder, text: str) -> tuple[list[int], list[float]]:
    """Raw BPE ids of a prompt (no BOS/EOS, no truncation) and each token's weight from its parsed run.

    Each run is tokenized on its own, as the webui does, so a run boundary inside a word splits that word.
    """
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        piece_ids = embedder.tokenizer.encode(piece)
        ids.extend(piece_ids)
        weights.extend([weight] * len(piece_ids))
    return ids, weights


def uses_custom_path(text: str, chunking: bool | None = None) -> bool:
    """Whether :func:`encode_prompt` leaves the original's encoding for this prompt (weighting or chunking)."""
    return bool(chunking) or has_weighting_syntax(text)


def _window_size(embedder: FrozenCLIPEmbedder) -> int:
    return embedder.max_length - 2


def _chunking_on(text: str, chunking: bool | None) -> bool:
    return chunking if chunking is not None else has_weighting_syntax(text)


def _token_device(embedder: FrozenCLIPEmbedder) -> torch.device:
    return embedder.transformer.text_model.embeddings.token_embedding.weight.device


def encode_prompt(embedder: FrozenCLIPEmbedder, text: str, *, chunking: bool | None = None) -> torch.Tensor:
    """Encode one prompt to a ``[1, L*k, C]`` context (``L = embedder.max_length``, k windows of 75 tokens).

    * No weighting syntax and ``chunking`` not True: exactly ``embedder.encode([text])`` (truncated to 75).
    * ``chunking`` True, or None with weighting syntax: every token is kept, in windows of 75 tokens, each
      encoded as its own BOS + 75 + EOS row; a prompt of at most 75 tokens is a single window.
    * ``chunking=False`` with weighting syntax: weighted, but truncated to the first window like the original.

    Weighted windows are scaled per token and then rescaled to their unweighted mean; windows whose weights are
    all 1 are left exactly as the text model returns them.
    """
    if not uses_custom_path(text, chunking):
        return embedder.encode([text])
    ids, weights = weighted_tokens(embedder, text)
    size = _window_size(embedder)
    if not _chunking_on(text, chunking):
        ids, weights = ids[:size], weights[:size]
    count = max(1, math.ceil(len(ids) / size))
    tok = embedder.tokenizer
    rows = [tok.pack(ids[k * size : (k + 1) * size], embedder.max_length) for k in range(count)]
    row_weights = []
    for k in range(count):
        w = weights[k * size : (k + 1) * size]
        row_weights.append([1.0, *w] + [1.0] * (embedder.max_length - 1 - len(w)))

    input_ids = torch.tensor(rows, dtype=torch.long, device=_token_device(embedder))
    z = embedder.transformer.text_model(input_ids)  # [k, L, C]
    w_all = torch.tensor(row_weights, dtype=torch.float32, device=z.device)
    windows = []
    for k in range(count):
        zk = z[k]
        if bool((w_all[k] != 1.0).any()):
            zk = _apply_weights(zk, w_all[k])
        windows.append(zk)
    return torch.cat(windows, dim=0)[None]


def _apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position by its weight, then restore the block's original mean (computed in float32)."""
    zf = z.float()
    original_mean = zf.mean()
    scaled = zf * weights[:, None]
    new_mean = scaled.mean()
    if new_mean != 0:
        scaled = scaled * (original_mean / new_mean)
    return scaled.to(z.dtype)


def _pad_windows(z: torch.Tensor, count: int, length: int, pad: PadMode, empty: torch.Tensor | None) -> torch.Tensor:
    """Extend a ``[1, length*k, C]`` context to ``count`` windows by tiling its own windows or appending ``empty``."""
    have = z.shape[1] // length
    if have >= count:
        return z
    if pad == "repeat":
        windows = z.reshape(1, have, length, z.shape[-1])
        index = torch.arange(count, device=z.device) % have
        return windows[:, index].reshape(1, count * length, z.shape[-1])
    assert empty is not None
    return torch.cat([z, empty.to(z).repeat(1, count - have, 1)], dim=1)


def _check_pad(pad: str) -> None:
    if pad not in ("repeat", "empty"):
        raise ValueError(f"pad must be 'repeat' or 'empty', not {pad!r}")


def _encode_rows(embedder: FrozenCLIPEmbedder, texts: list[str], chunking: bool | None) -> list[torch.Tensor]:
    """Each text's own ``[1, L*k_i, C]`` context (the whole batch at once when all take the original's path)."""
    if not any(uses_custom_path(t, chunking) for t in texts):
        z = embedder.encode(texts) if texts else None
        return [z[i : i + 1] for i in range(len(texts))] if z is not None else []
    cache: dict[str, torch.Tensor] = {}
    for t in texts:
        if t not in cache:
            cache[t] = encode_prompt(embedder, t, chunking=chunking)
    return [cache[t] for t in texts]


def _stack(embedder: FrozenCLIPEmbedder, rows: list[torch.Tensor], count: int, pad: PadMode) -> torch.Tensor:
    length = embedder.max_length
    empty = None
    if pad == "empty" and any(r.shape[1] < count * length for r in rows):
        empty = embedder.encode([""])
    return torch.cat([_pad_windows(r, count, length, pad, empty) for r in rows], dim=0)


def _windows_of(rows: list[torch.Tensor], length: int) -> int:
    return max((r.shape[1] // length for r in rows), default=1)


def encode_prompts(
    embedder: FrozenCLIPEmbedder,
    texts: Sequence[str],
    *,
    chunking: bool | None = None,
    pad: PadMode = "repeat",
    min_windows: int = 1,
) -> torch.Tensor:
    """Encode a batch of prompts to one ``[B, L*k, C]`` tensor, k the most windows any prompt (or min_windows) needs.

    When no prompt needs weighting or chunking this is exactly ``embedder.encode(list(texts))``, the original's
    batched call. Shorter prompts are padded as in :func:`encode_pair`.
    """
    _check_pad(pad)
    texts = list(texts)
    if not texts:
        raise ValueError("encode_prompts needs at least one prompt")
    if not any(uses_custom_path(t, chunking) for t in texts) and min_windows <= 1:
        return embedder.encode(texts)
    rows = _encode_rows(embedder, texts, chunking)
    return _stack(embedder, rows, max(min_windows, _windows_of(rows, embedder.max_length)), pad)


def encode_pair(
    embedder: FrozenCLIPEmbedder,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    *,
    chunking: bool | None = None,
    pad: PadMode = "repeat",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional contexts of equal shape, as classifier-free guidance batches them.

    ``prompt`` may be a batch; a single ``negative_prompt`` string is used for every item. Each prompt is
    encoded as :func:`encode_prompt` would; whichever side has fewer windows is padded to the other's count:

    * ``pad="repeat"`` (default) tiles its own windows. For a one-window context this changes nothing in
      cross-attention: duplicated keys with their values give exactly the same softmax average.
    * ``pad="empty"`` appends windows of the empty prompt's encoding (the webui's "pad cond/uncond" option).

    With no weighting syntax and no chunking both are exactly the original's ``encode`` calls.
    """
    _check_pad(pad)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("encode_pair needs at least one prompt")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    if not any(uses_custom_path(t, chunking) for t in prompts + negatives):
        return embedder.encode(prompts), embedder.encode(negatives)
    cond_rows = _encode_rows(embedder, prompts, chunking)
    uncond_rows = _encode_rows(embedder, negatives, chunking)
    count = _windows_of(cond_rows + uncond_rows, embedder.max_length)
    return _stack(embedder, cond_rows, count, pad), _stack(embedder, uncond_rows, count, pad)


def dropped_words(embedder: FrozenCLIPEmbedder, text: str, *, chunking: bool | None = None) -> str:
    """The text that :func:`encode_prompt` cuts off after 75 tokens (decoded from its tokens), or ``""``.

    Nothing is dropped when chunking applies (``chunking=True``, or None with weighting syntax). The decoded
    words are lower-cased and space-separated token by token, e.g. ``"a, b"`` comes back as ``"a , b"``.
    """
    if uses_custom_path(text, chunking):
        if _chunking_on(text, chunking):
            return ""
        ids, _ = weighted_tokens(embedder, text)
    else:
        ids = embedder.tokenizer.encode(text)
    dropped = ids[_window_size(embedder) :]
    return embedder.tokenizer.decode(dropped) if dropped else ""
