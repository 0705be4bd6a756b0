"""The LoRAs and embeddings a server offers: the files in its --lora_dir and --embeddings_dir, by name.

A request names a LoRA (`<lora:NAME:W>` in a prompt, or the native `loras` field) or uses an embedding's word. A
name is looked up in a listing of the server's own folders and only a listed file is ever opened, so no request
can make the server read another file (a path such as `<lora:/etc/passwd>` names nothing listed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldm.adapters.embeddings import EMBEDDING_SUFFIXES, read_embedding
from ldm.adapters.errors import AdapterError
from ldm.adapters.prompt_tags import LORA_SUFFIXES, strip_lora_tags

MAX_LORAS = 8  # per request: each is merged into the weights and taken out again


def _listing(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """NAME (relative, '/'-separated, no suffix) -> file, the first of `suffixes` winning as the CLI's lookup."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    rank = {s: i for i, s in enumerate(suffixes)}
    best: dict[str, int] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in rank or name.startswith("."):
                continue
            key = Path(root, stem).relative_to(folder).as_posix()
            if key not in best or rank[suffix.lower()] < best[key]:
                best[key], found[key] = rank[suffix.lower()], Path(root, name)
    return found


@dataclass(frozen=True)
class AdapterCatalog:
    """Listings of the two folders, read afresh on each call (files may be added while the server runs)."""

    lora_dir: Path
    embeddings_dir: Path

    def loras(self) -> dict[str, Path]:
        return _listing(Path(self.lora_dir), LORA_SUFFIXES)

    def embeddings(self) -> dict[str, Path]:
        return _listing(Path(self.embeddings_dir), tuple(EMBEDDING_SUFFIXES))

    def check_tags(self, text: str) -> list[tuple[str, float]]:
        """The (NAME, WEIGHT) of `text`'s `<lora:...>` tags, each NAME a listed LoRA; ValueError says what is wrong."""
        try:
            _, tags = strip_lora_tags(text)
        except AdapterError as e:
            raise ValueError(str(e)) from None
        for name, _ in tags:
            self.check_name(name)
        return tags

    def check_name(self, name: str) -> Path:
        listed = self.loras()
        if name not in listed:
            known = ", ".join(sorted(listed)[:20]) or f"none: the server's --lora_dir {self.lora_dir} has no LoRA"
            raise ValueError(f"unknown LoRA {name!r}; this server has {known}")
        return listed[name]

    def embedding_shapes(self) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
        """word -> (vectors, width) of each listed embedding that reads, and word -> why for those that do not
        (as A1111's `loaded` and `skipped`). Files are read by the safe loader: none runs code."""
        loaded, skipped = {}, {}
        for word, path in self.embeddings().items():
            try:
                vectors = read_embedding(path).vectors
            except (AdapterError, OSError, ValueError) as e:
                skipped[word] = str(e)
                continue
            loaded[word] = (int(vectors.shape[0]), int(vectors.shape[-1]))
        return loaded, skipped
