"""Generation parameters in the PNG "parameters" text chunk, in the format other SD tools read back.

Layout (the widely used one): the prompt, then an optional "Negative prompt: ..." line, then one line
of "Key: value" pairs separated by ", " (values holding a comma or quote are JSON-quoted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping

_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if ("," in text or '"' in text or "\n" in text) else text


def format_infotext(prompt: str, fields: Mapping[str, object], negative_prompt: str = "") -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from an infotext; the inverse of `format_infotext`."""
    *head, last = text.split("\n")
    prompt_lines, negative = [], ""
    for line in head:
        if line.startswith("Negative prompt: "):
            negative = line.removeprefix("Negative prompt: ")
        elif negative:
            negative += "\n" + line
        else:
            prompt_lines.append(line)
    fields = {}
    for key, value in _PAIR.findall(last):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return "\n".join(prompt_lines), negative, fields


def legacy_model_hash(path: str | os.PathLike) -> str:
    """The short "Model hash" other tools show: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits.

    Cheap on a 4 GB file, which a full sha256 is not."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
