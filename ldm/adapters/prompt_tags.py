"""What a run asks for: `--lora PATH[:WEIGHT]`, `--embedding PATH`, AUTOMATIC1111's `<lora:NAME:WEIGHT>` prompt
tags (NAME looked up in the LoRA folder) and embeddings found by their word in the embeddings folder."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ldm.adapters.embeddings import EMBEDDING_SUFFIXES
from ldm.adapters.errors import AdapterError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)


@dataclass
class AdapterPlan:
    """LoRAs as (path, weight) and embedding paths for one run; `tags` are those that came from prompts."""

    loras: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    flag_tags: str = ""  # `<lora:NAME:W>` for LoRAs given as flags, to record them in the saved prompt

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings)


def _weight(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AdapterError(f"{what}: weight {text!r} is not a number (e.g. 0.8)") from None
    if value != value or abs(value) == float("inf"):
        raise AdapterError(f"{what}: weight must be a finite number, got {text}")
    return value


def parse_lora_flag(text: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` (a path may hold colons itself: only a number after the last one is a weight)."""
    path, sep, tail = text.rpartition(":")
    if sep and path and re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*", tail):
        return path, float(tail)
    return text, 1.0


def strip_lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME[:WEIGHT]>` tags (each replaced by nothing) and the tags' (NAME, WEIGHT)."""
    tags = []
    for match in LORA_TAG.finditer(text):
        fields = match.group(1).split(":")
        name = fields[0].strip()
        if not name:
            raise AdapterError(f"prompt tag {match.group(0)} names no LoRA; write <lora:NAME:0.8>")
        if len(fields) > 2:
            raise AdapterError(
                f"prompt tag {match.group(0)}: separate text-encoder/UNet weights are not supported; "
                "write <lora:NAME:WEIGHT>"
            )
        tags.append((name, _weight(fields[1], match.group(0)) if len(fields) == 2 else 1.0))
    return LORA_TAG.sub("", text), tags


def find_lora(name: str, lora_dir: str) -> str:
    """`lora_dir`/NAME with the first of LORA_SUFFIXES that exists (NAME may hold subfolders)."""
    for suffix in ("", *LORA_SUFFIXES):
        path = os.path.join(lora_dir, name + suffix)
        if os.path.isfile(path) and (suffix or name.lower().endswith(LORA_SUFFIXES)):
            return path
    raise AdapterError(
        f"<lora:{name}> not found: no {name}.safetensors (or .pt/.ckpt) in --lora_dir {lora_dir}; put the file "
        "there or pass --lora_dir"
    )


def word_pattern(word: str) -> re.Pattern:
    """The word as ldm.modules.encoders.tokenizer finds added words: any case, not inside another word."""
    before = r"(?<!\w)" if re.match(r"\w", word[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", word[-1]) else ""
    return re.compile(before + re.escape(word) + after, re.IGNORECASE)


def find_embeddings(texts: Iterable[str], embeddings_dir: str) -> list[str]:
    """Embedding files in `embeddings_dir` (and below) whose name appears as a word in one of `texts`."""
    if not os.path.isdir(embeddings_dir):
        return []
    joined = "\n".join(texts)
    found = []
    for root, _, files in sorted(os.walk(embeddings_dir)):
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in EMBEDDING_SUFFIXES and stem.strip() and word_pattern(stem).search(joined):
                found.append(os.path.join(root, name))
    return found


def plan_adapters(
    texts: Sequence[str], lora_flags: Sequence[str], embedding_flags: Sequence[str], lora_dir: str, embeddings_dir: str
) -> tuple[dict[str, str], AdapterPlan]:
    """Each distinct prompt text -> itself without LoRA tags, and the run's LoRAs and embeddings.

    The LoRAs merge into the weights for the whole run, so a LoRA named twice (tags on several lines, a tag
    and a flag) must carry one weight. Files are checked to exist here, before the model loads."""
    plan = AdapterPlan()
    weights: dict[str, float] = {}
    for flag in lora_flags:
        path, weight = parse_lora_flag(flag)
        if not os.path.isfile(path):
            raise AdapterError(f"--lora {path}: file not found; check the path")
        _add(weights, os.path.realpath(path), weight, f"--lora {flag}", path, plan)
    flag_count = len(plan.loras)
    stripped = {}
    for text in dict.fromkeys(texts):
        stripped[text], tags = strip_lora_tags(text)
        for name, weight in tags:
            path = find_lora(name, lora_dir)
            _add(weights, os.path.realpath(path), weight, f"<lora:{name}:{weight:g}>", path, plan)
    plan.flag_tags = " ".join(
        f"<lora:{os.path.splitext(os.path.basename(p))[0]}:{w:g}>" for p, w in plan.loras[:flag_count]
    )
    for path in embedding_flags:
        if not os.path.isfile(path):
            raise AdapterError(f"--embedding {path}: file not found; check the path")
        plan.embeddings.append(path)
    given = {os.path.realpath(p) for p in plan.embeddings}
    for path in find_embeddings(stripped.values(), embeddings_dir):
        if os.path.realpath(path) not in given:
            plan.embeddings.append(path)
    return stripped, plan


def _add(weights: dict[str, float], key: str, weight: float, what: str, path: str, plan: AdapterPlan) -> None:
    if key in weights:
        if weights[key] != weight:
            raise AdapterError(
                f"{what}: {path} is already applied at weight {weights[key]:g}; a LoRA is merged for the whole run, "
                "so give it one weight"
            )
        return
    weights[key] = weight
    plan.loras.append((path, weight))
