"""Textual-inversion embeddings: new words whose vectors go straight into the text encoder's token table.

Formats: AUTOMATIC1111's ``.pt`` (``string_to_param``), its ``.safetensors`` (``emb_params``, or a single
tensor), and diffusers' ``learned_embeds.bin``/``.safetensors`` (``{token: tensor}``). An embedding of n vectors
becomes n new token ids past the vocabulary; the word (the file's name, or the token a diffusers file stores
when the file has diffusers' generic name) is split out of prompts before BPE, as diffusers' added tokens are,
so it works in negative prompts and inside weighting syntax like any word.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ldm.adapters.errors import AdapterError
from ldm.files.checkpoints import CheckpointError, is_safetensors, read_state_dict, read_torch_object

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
GENERIC_NAMES = {"learned_embeds"}  # diffusers' file name for every concept: the stored token names it instead


@dataclass
class Embedding:
    path: str
    word: str  # what triggers it in a prompt
    vectors: torch.Tensor  # [n, width], the file's dtype

    def short_hash(self) -> str:
        """12 hex digits of the file's sha256, as AUTOMATIC1111 writes in "TI hashes"."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:12]


def _tensors_of(path: str) -> tuple[dict, str]:
    """The file's content as a dict, read without running pickle code, and its kind for messages."""
    try:
        if is_safetensors(path):
            return read_state_dict(path, mmap=False)[0], "safetensors"
        obj = read_torch_object(path)
    except CheckpointError as e:
        raise AdapterError(f"embedding {e}") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"embedding {path} holds a {type(obj).__name__}, not an embedding dict; get the file again")
    return obj, "torch"


def read_embedding(path: str | os.PathLike, word: str | None = None) -> Embedding:
    """Read one embedding file; `word` overrides the trigger word."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"embedding file not found: {path}; check the path (or put it in --embeddings_dir)")
    data, _ = _tensors_of(path)
    stored: str | None = None
    if "clip_l" in data or "clip_g" in data:
        raise AdapterError(f"embedding {path} is for SDXL (clip_l/clip_g vectors); use an SD 1.x embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise AdapterError(f"embedding {path}: string_to_param must hold one term; this one is not an A1111 file")
        vectors = next(iter(params.values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(list(data)[:4])
            raise AdapterError(
                f"embedding {path} holds {len(tensors)} tensors (keys: {keys}), not one embedding; expected an "
                "A1111 (string_to_param / emb_params) or diffusers ({token: tensor}) textual-inversion file"
            )
        stored, vectors = next(iter(tensors.items()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise AdapterError(f"embedding {path}: its vectors are not a [n, width] float tensor; get the file again")
    vectors = vectors.detach().reshape(-1, vectors.shape[-1])
    stem = os.path.splitext(os.path.basename(path))[0]
    if word is None:
        word = stored if stem in GENERIC_NAMES and stored else stem
    if not word.strip():
        raise AdapterError(f"embedding {path} has no usable trigger word; rename the file")
    return Embedding(path, word.strip(), vectors)


class EmbeddingState:
    """The text encoder's base token table and tokenizer, and the embeddings added on top (one per model)."""

    def __init__(self, model: nn.Module) -> None:
        self.embedder = model.cond_stage_model
        self.table: nn.Embedding = self.embedder.transformer.text_model.embeddings.token_embedding
        self.base_weight = self.table.weight
        self.base_tokenizer = self.embedder.tokenizer
        self.active: dict[int, list[Embedding]] = {}
        self._next = 0

    @classmethod
    def of(cls, model: nn.Module) -> EmbeddingState:
        state = getattr(model, "embedding_state", None)
        if state is None:
            state = cls(model)
            object.__setattr__(model, "embedding_state", state)
        return state

    def check(self, embeddings: list[Embedding]) -> None:
        width = self.base_weight.shape[1]
        words = {e.word.lower(): e.path for group in self.active.values() for e in group}
        for e in embeddings:
            if e.vectors.shape[1] != width:
                raise AdapterError(
                    f"embedding {e.path} has {e.vectors.shape[1]}-wide vectors but this text encoder takes {width} "
                    "(SD 2.x embeddings are 1024 wide); use an embedding made for this model"
                )
            if e.word.lower() in words:
                taken = words[e.word.lower()]
                raise AdapterError(f"embedding {e.path}: the word {e.word!r} is already taken by {taken}; rename one")
            words[e.word.lower()] = e.path

    def add(self, embeddings: list[Embedding]) -> int:
        self.check(embeddings)
        token = self._next
        self._next += 1
        self.active[token] = embeddings
        self._install()
        return token

    def remove(self, token: int) -> None:
        if self.active.pop(token, None) is not None:
            self._install()

    def _install(self) -> None:
        """Base table + every active embedding's rows; the base tokenizer + their words. No embedding: the base
        tensor and tokenizer objects themselves, so removing is exact."""
        group = [e for g in self.active.values() for e in g]
        if not group:
            self.table.weight, self.embedder.tokenizer = self.base_weight, self.base_tokenizer
            self.table.num_embeddings = self.base_weight.shape[0]
            return
        base = self.base_weight
        rows, words, next_id = [base.detach()], {}, base.shape[0]
        for e in group:
            rows.append(e.vectors.to(base.device, base.dtype))
            words[e.word] = list(range(next_id, next_id + len(e.vectors)))
            next_id += len(e.vectors)
        self.table.weight = nn.Parameter(torch.cat(rows), requires_grad=False)
        self.table.num_embeddings = next_id
        self.embedder.tokenizer = self.base_tokenizer.with_added_words(words)
