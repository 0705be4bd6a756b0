"""The PNG "parameters" text: format and parse are inverses on awkward values."""

from __future__ import annotations

import hashlib

from ldm.files.infotext import format_infotext, legacy_model_hash, parse_infotext


def test_round_trip_with_awkward_values():
    fields = {"Steps": 20, "Sampler": "dpmpp_2m karras", "Note": 'has, comma and "quotes"', "Size": "512x512"}
    text = format_infotext("line one\nline two: with colon, and comma", fields, negative_prompt="blurry, ugly")
    assert text.splitlines()[-1].startswith("Steps: 20, Sampler: dpmpp_2m karras, Note: ")
    prompt, negative, parsed = parse_infotext(text)
    assert prompt == "line one\nline two: with colon, and comma"
    assert negative == "blurry, ugly"
    assert parsed == {k: str(v) for k, v in fields.items()}


def test_legacy_model_hash_reads_the_64k_at_1mib(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "m.ckpt"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
