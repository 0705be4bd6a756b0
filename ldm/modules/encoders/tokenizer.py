"""CLIP byte-level BPE tokenizer, self-contained and download-free.

Stable Diffusion v1 conditions on the OpenAI CLIP ViT-L/14 text encoder and tokenizes prompts with
``transformers.CLIPTokenizer`` (the slow, pure-Python one of transformers 4.19) loaded from
``openai/clip-vit-large-patch14``. That tokenizer's vocabulary is exactly the BPE table OpenAI shipped as
``bpe_simple_vocab_16e6.txt.gz``; open-clip-torch bundles the same file, so we read it from there instead of
downloading anything from the Hugging Face hub.

The ids produced here are those of the original pipeline:

* literal ``<|startoftext|>`` / ``<|endoftext|>`` in the raw prompt are split out first and become their ids
  (transformers' added-token split);
* every other chunk: ``ftfy.fix_text`` -> fold runs of whitespace to one space and strip -> lower case;
* split with the CLIP regex, map UTF-8 bytes to printable unicode characters, apply BPE merges by rank;
* ``[BOS] + ids[:max_length - 2] + [EOS]`` then padded with ``EOS`` (SD v1 pads with 49407, not 0).

``style="openai"`` instead reproduces OpenAI CLIP's own ``SimpleTokenizer`` (also open_clip's): it adds
``html.unescape`` twice after ftfy and has no special-token pre-split. The two styles differ only on text
where ftfy leaves HTML entities alone (text containing ``<``, e.g. ``"Tom &amp; Jerry <3"``) or that
contains the special-token strings glued to punctuation.
"""

from __future__ import annotations

import copy
import gzip
import html
import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Literal

import ftfy
import regex
import torch

__all__ = [
    "BOS_ID",
    "BPE_FILENAME",
    "CONTEXT_LENGTH",
    "EOS_ID",
    "VOCAB_SIZE",
    "CLIPTokenizer",
    "byte_to_unicode",
    "default_vocab_path",
    "get_tokenizer",
]

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # SD v1 / CLIP text context: BOS + 75 BPE tokens + EOS.

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header): with the 256 byte
# symbols, their 256 end-of-word twins and the two special tokens that gives 49408 ids.
NUM_MERGES = 49152 - 256 - 2

# Alternation order matters: special tokens and contractions must win over the generic classes.
_SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")  # case-sensitive, on the raw text


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable, non-whitespace unicode char (the BPE never sees spaces/control bytes).

    Bytes that are already visible Latin-1 characters map to themselves; the remaining 68 bytes are shifted to
    code points 256, 257, ... in increasing byte order. The dict's insertion order (visible bytes first) is the
    order of the first 256 vocabulary ids, so it must not be changed.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def default_vocab_path() -> Path:
    """Locate the BPE file inside the installed open-clip-torch package without importing it (import is slow)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"The CLIP tokenizer needs {BPE_FILENAME}, which ships with open-clip-torch; "
            "install it with `pip install open-clip-torch` (or pass vocab_path=...)."
        )
    path = Path(locations[0]) / BPE_FILENAME
    if not path.is_file():
        raise RuntimeError(
            f"{path} not found although open_clip is installed; reinstall it with "
            "`pip install --force-reinstall open-clip-torch` (or pass vocab_path=...)."
        )
    return path


def _load_merges(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} does not look like CLIP's {BPE_FILENAME}: expected {NUM_MERGES} merge lines")
    return merges  # type: ignore[return-value]


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer giving the exact ids Stable Diffusion v1 feeds its text encoder.

    ``tokenizer(prompts)`` returns the ``[batch, 77]`` LongTensor SD v1 uses; ``encode`` gives the raw BPE ids.
    Construction parses ~49k merges (tens of milliseconds), so prefer the shared :func:`get_tokenizer`.
    """

    def __init__(
        self, vocab_path: str | os.PathLike[str] | None = None, *, style: Literal["sd", "openai"] = "sd"
    ) -> None:
        """Build the vocabulary from CLIP's merges file.

        ``vocab_path`` defaults to the copy bundled with open-clip-torch. ``style="sd"`` (default) matches
        transformers' CLIPTokenizer as SD v1 uses it; ``style="openai"`` matches OpenAI CLIP / open_clip (see
        the module docstring for the rare prompts where they differ).
        """
        if style not in ("sd", "openai"):
            raise ValueError(f"style must be 'sd' or 'openai', got {style!r}")
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        merges = _load_merges(path)

        self.style = style
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        byte_chars = list(self.byte_encoder.values())
        vocab = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
        if len(vocab) != VOCAB_SIZE:  # pragma: no cover - guarded by _load_merges
            raise ValueError(f"built {len(vocab)} tokens, expected {VOCAB_SIZE}")
        self.decoder: list[str] = vocab
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(f"{path}: merged tokens are not unique")
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        # Cache per regex piece (before byte encoding) -> ids; prompts reuse few distinct words.
        self._cache: dict[str, tuple[int, ...]] = {BOS_TOKEN: (BOS_ID,), EOS_TOKEN: (EOS_ID,)}
        # Words added by textual inversion (lower case) -> their ids past the vocabulary; see with_added_words.
        self.added: dict[str, tuple[int, ...]] = {}
        self._added_split: regex.Pattern | None = None

    def with_added_words(self, words: Mapping[str, Sequence[int]]) -> CLIPTokenizer:
        """A copy that also turns each of `words` into its ids (textual inversion's new words), the shared
        tokenizer left as it is.

        A word is found in the raw text before cleaning, as transformers finds added tokens, in any case; a word
        that starts or ends with a letter or digit must not continue another word there (`mystyle` is not
        found in `mystyles`). Longer words win over words they contain."""
        new = copy.copy(self)
        new.added = {**self.added, **{w.lower(): tuple(ids) for w, ids in words.items()}}
        alternatives = []
        for word in sorted(new.added, key=len, reverse=True):
            before = r"(?<![\w])" if regex.match(r"\w", word[0]) else ""
            after = r"(?![\w])" if regex.match(r"\w", word[-1]) else ""
            alternatives.append(before + regex.escape(word) + after)
        new._added_split = regex.compile("(" + "|".join(alternatives) + ")", regex.IGNORECASE) if alternatives else None
        return new

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def clean(self, text: str) -> str:
        """Normalize text as the reference tokenizer does before its regex split (ftfy, whitespace fold, lower)."""
        text = ftfy.fix_text(text)
        if self.style == "openai":
            text = html.unescape(html.unescape(text))
        return _WHITESPACE.sub(" ", text).strip().lower()

    def bpe(self, word: str) -> list[str]:
        """Merge the (byte-encoded) characters of one word by merge rank; the last symbol carries ``</w>``."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best_rank = NUM_MERGES
            best: tuple[str, str] | None = None
            for pair in pairwise(symbols):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:  # merge every non-overlapping occurrence, left to right
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids = tuple(self.encoder[tok] for tok in self.bpe(word))
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without BOS/EOS and without truncation."""
        if self._added_split is None:
            return self._encode_text(text)
        ids: list[int] = []
        for i, chunk in enumerate(self._added_split.split(text)):
            ids.extend(self.added[chunk.lower()] if i % 2 else self._encode_text(chunk))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self.style == "openai":
            return self._encode_chunk(text)
        # transformers splits its special tokens out of the raw text before cleaning each remaining chunk.
        ids: list[int] = []
        for i, chunk in enumerate(_SPECIAL_SPLIT.split(text)):
            if i % 2:
                ids.append(self.encoder[chunk])
            else:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def _encode_chunk(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPLIT_PATTERN.findall(self.clean(text)):
            ids.extend(self._piece_ids(piece))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Best-effort inverse of :meth:`encode` (cleaning is lossy: case and whitespace are not restored)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if any(i >= VOCAB_SIZE for i in ids):  # added words: decode the text between them, name them as such
            words = {ws[0]: w for w, ws in self.added.items() if ws}
            pieces, start = [], 0
            for k, i in enumerate([*ids, -1]):
                if i >= VOCAB_SIZE or i == -1:
                    pieces.append(self.decode(ids[start:k], skip_special_tokens))
                    pieces.append(words.get(i, ""))
                    start = k + 1
            return " ".join(p for p in pieces if p)
        tokens = [self.decoder[int(i)] for i in ids if not (skip_special_tokens and int(i) in (BOS_ID, EOS_ID))]
        # Special tokens are plain ASCII, so they survive the byte round trip unchanged.
        data = bytearray(self.byte_decoder[ch] for ch in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def pack(self, ids: Sequence[int], max_length: int = CONTEXT_LENGTH, pad_id: int = EOS_ID) -> list[int]:
        """``[BOS] + ids[:max_length-2] + [EOS]`` padded with ``pad_id`` to ``max_length`` (HF truncation rule)."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold BOS and EOS, got {max_length}")
        row = [BOS_ID, *ids[: max_length - 2], EOS_ID]
        return row + [pad_id] * (max_length - len(row))

    def __call__(
        self, texts: str | Sequence[str], max_length: int = CONTEXT_LENGTH, pad_id: int = EOS_ID
    ) -> torch.LongTensor:
        """Tokenize a prompt or a batch into the ``[batch, max_length]`` int64 tensor SD v1's text encoder takes."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.pack(self.encode(t), max_length, pad_id) for t in texts]
        if not rows:
            return torch.empty(0, max_length, dtype=torch.long)  # type: ignore[return-value]
        return torch.tensor(rows, dtype=torch.long)  # type: ignore[return-value]

    def truncated_words(self, text: str, max_length: int = CONTEXT_LENGTH) -> list[str]:
        """The words cut off by truncation to ``max_length`` (empty when the prompt fits), for user warnings."""
        dropped = self.encode(text)[max(max_length - 2, 0) :]
        return self.decode(dropped).split()


@lru_cache(maxsize=1)
def get_tokenizer() -> CLIPTokenizer:
    """Shared SD v1 tokenizer with the bundled vocabulary (built once per process)."""
    return CLIPTokenizer()
