"""One call to put LoRAs and embeddings on a loaded model, and a handle that takes them off again exactly.

handle = apply_adapters(model, loras=[("models/lora/style.safetensors", 0.8)], embeddings=["neg.pt"])
...  # generate
handle.remove()  # every weight and the tokenizer are the base model's again, bit for bit
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from torch import nn

from ldm.adapters.embeddings import Embedding, EmbeddingState, read_embedding
from ldm.adapters.lora import LoraFile, MergeState, load_lora
from ldm.adapters.prompt_tags import plan_adapters

LoraSpec = str | os.PathLike | tuple[str | os.PathLike, float]
EmbeddingSpec = str | os.PathLike | tuple[str | os.PathLike, str]


class AdapterHandle:
    """What `apply_adapters` put on the model; `remove()` (or leaving a `with` block) takes it off."""

    def __init__(self, model: nn.Module, loras: list[tuple[LoraFile, float]], embeddings: list[Embedding]) -> None:
        self.model, self.loras, self.embeddings = model, loras, embeddings
        self._lora_token = MergeState.of(model).add(loras) if loras else None
        try:
            self._embedding_token = EmbeddingState.of(model).add(embeddings) if embeddings else None
        except Exception:
            if self._lora_token is not None:
                MergeState.of(model).remove(self._lora_token)
            raise

    def remove(self) -> None:
        """Unmerge the LoRAs and drop the embeddings; others applied by other handles stay. Idempotent."""
        if self._lora_token is not None:
            MergeState.of(self.model).remove(self._lora_token)
            self._lora_token = None
        if self._embedding_token is not None:
            EmbeddingState.of(self.model).remove(self._embedding_token)
            self._embedding_token = None

    def __enter__(self) -> AdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def infotext_fields(self) -> dict[str, str]:
        """The PNG "parameters" entries other tools write: `Lora hashes` and `TI hashes`, "name: 12 hex" each."""
        fields = {}
        if self.loras:
            fields["Lora hashes"] = ", ".join(f"{lora.name}: {lora.short_hash()}" for lora, _ in self.loras)
        if self.embeddings:
            fields["TI hashes"] = ", ".join(f"{e.word}: {e.short_hash()}" for e in self.embeddings)
        return fields


def apply_adapters(
    model: nn.Module, loras: Iterable[LoraSpec] = (), embeddings: Iterable[EmbeddingSpec] = ()
) -> AdapterHandle:
    """Merge `loras` (paths, or (path, weight); weight 1 by default) into an SD v1 model's UNet and text encoder and
    add `embeddings` (paths, or (path, trigger word)) to its vocabulary.

    Every file is read and checked against the model before anything changes, so a bad file (an error naming it
    and its first key that does not fit) leaves the model as it was. Several handles may be active at once."""
    loaded = [(load_lora(os.fspath(path), model), float(weight)) for path, weight in map(_lora_pair, loras)]
    words = [read_embedding(*_embedding_pair(spec)) for spec in embeddings]
    if words:
        EmbeddingState.of(model).check(words)
    return AdapterHandle(model, loaded, words)


def _lora_pair(spec: LoraSpec) -> tuple[str | os.PathLike, float]:
    return (spec, 1.0) if isinstance(spec, str | os.PathLike) else (spec[0], spec[1])


def _embedding_pair(spec: EmbeddingSpec) -> Sequence:
    return (spec, None) if isinstance(spec, str | os.PathLike) else spec


def adapters_for_prompts(
    model: nn.Module,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] = (),
    *,
    loras: Iterable[str | tuple[str, float]] = (),
    embeddings: Iterable[str] = (),
    lora_dir: str = "models/lora",
    embeddings_dir: str = "models/embeddings",
) -> tuple[list[str], list[str], AdapterHandle]:
    """What the CLI does for a run, for the Python Pipeline and the image service: the prompts and negative prompts
    without their `<lora:NAME:W>` tags, and a handle with those LoRAs (from `lora_dir`), `loras` ("PATH[:W]" or
    (path, weight)), `embeddings` and the embeddings of `embeddings_dir` the prompts name, applied. Use the handle
    as a context manager around the sampling so the model is the base model again afterwards."""
    flags = [spec if isinstance(spec, str) else f"{spec[0]}:{spec[1]}" for spec in loras]
    stripped, plan = plan_adapters([*prompts, *negative_prompts], flags, list(embeddings), lora_dir, embeddings_dir)
    handle = apply_adapters(model, plan.loras, plan.embeddings)
    return [stripped[p] for p in prompts], [stripped[p] for p in negative_prompts], handle
