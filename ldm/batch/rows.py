"""Prompt files read into rows: plain text (one prompt a line, "prompt<TAB>negative" as txt2img's --from-file), JSON
lines or CSV with per-row settings. Each row's seed is fixed here, before any row is handed to a worker, so a row
makes the same images wherever and whenever it runs."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldm.cli.options import SEED_RANGE, UsageError
from ldm.generation.generate import SAMPLER_NAMES

# Per-row fields and the types they are read as; "width"/"height" are accepted for W/H.
FIELDS: dict[str, type] = {"prompt": str, "negative_prompt": str, "seed": int, "W": int, "H": int, "sampler": str,
                           "steps": int, "scale": float}  # fmt: skip
ALIASES = {"width": "W", "height": "H"}


@dataclass(frozen=True)
class Row:
    """One line of the prompt file with every setting resolved (its own, else the command line's)."""

    row: int  # 0-based position among the file's rows
    prompt: str
    negative_prompt: str
    seed: int
    W: int
    H: int
    sampler: str
    steps: int
    scale: float

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "row"}


def row_seed(explicit: int | None, base_seed: int, index: int) -> int:
    """A row's own seed, else the base seed plus its index (row 0 gets --seed, row 1 --seed + 1, ...)."""
    return explicit if explicit is not None else base_seed + index


def _fail(where: str, message: str) -> UsageError:
    return UsageError(f"{where}: {message}")


def _convert(value: Any, name: str, where: str) -> Any:
    kind = FIELDS[name]
    if value is None or (isinstance(value, str) and value.strip() == "" and name != "prompt"):
        return None  # an empty cell: the command line's value
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted: Any = int(value) if not isinstance(value, str) else int(value.strip())
        elif kind is float:
            converted = float(value)
        else:
            converted = value if isinstance(value, str) else None
            if converted is None:
                raise ValueError
    except (TypeError, ValueError):
        raise _fail(where, f"field {name!r} is {value!r}, not {'an integer' if kind is int else kind.__name__}; "
                           "fix or remove it") from None  # fmt: skip
    return converted


def _normalise(record: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = ALIASES.get(str(key).strip(), str(key).strip())
        if name not in FIELDS:
            known = ", ".join([*FIELDS, *ALIASES])
            raise _fail(where, f"unknown field {key!r}; the fields are {known}")
        out[name] = _convert(value, name, where)
    if not isinstance(out.get("prompt"), str):
        raise _fail(where, "no 'prompt' (every row needs one; use \"\" for an empty prompt)")
    return out


def _text_records(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for n, line in enumerate(lines, 1):
        prompt, tab, negative = line.partition("\t")
        records.append((f"line {n}", {"prompt": prompt, **({"negative_prompt": negative} if tab else {})}))
    return records


def _jsonl_records(lines: list[str], path: str) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, f"not JSON ({e.msg}); write one JSON object per line") from None
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise _fail(where, 'expected an object such as {"prompt": "...", "seed": 1}')
        records.append((where, record))
    return records


def _csv_records(text: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
        raise _fail(f"{path} line 1", "the CSV header has no 'prompt' column (the first line names the columns)")
    records = []
    for record in reader:
        where = f"{path} line {reader.line_num}"
        if None in record:
            raise _fail(where, f"more cells than the header's {len(reader.fieldnames)} columns; quote commas")
        if any(v is None for v in record.values()):
            raise _fail(where, f"fewer cells than the header's {len(reader.fieldnames)} columns")
        records.append((where, record))
    return records


def read_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, fields) per row; the format is the file's extension: .jsonl/.json, .csv, else plain text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = f"not UTF-8 text ({e})" if isinstance(e, UnicodeDecodeError) else e.strerror or e
        raise UsageError(f"cannot read --from-file {path}: {reason}") from None
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = _jsonl_records(text.splitlines(), path)
    elif suffix == ".csv":
        records = _csv_records(text, path)
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        records = [(f"{path} {where}", r) for where, r in _text_records(lines)]
    if not records:
        raise UsageError(f"--from-file {path} has no prompts (one prompt a line, JSON lines or a CSV with 'prompt')")
    return records


def check_row(row: Row, where: str, factor: int) -> None:
    if row.sampler not in SAMPLER_NAMES:
        raise _fail(where, f"unknown sampler {row.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    for name in ("W", "H"):
        value = getattr(row, name)
        if value < factor or value % factor:
            raise _fail(where, f"{name} is {value}; it must be a positive multiple of {factor} (e.g. 512)")
    if not 1 <= row.steps <= 1000:
        raise _fail(where, f"steps is {row.steps}; it must be between 1 and 1000")
    if not row.scale >= 0 or row.scale == float("inf"):
        raise _fail(where, f"scale is {row.scale}; it must be a finite number >= 0")
    if not SEED_RANGE[0] <= row.seed <= SEED_RANGE[1]:
        raise _fail(where, f"seed {row.seed} is out of range (use 0 to {SEED_RANGE[1]})")


def read_rows(path: str, defaults: dict[str, Any], base_seed: int, factor: int) -> list[Row]:
    """The file's rows, each setting its own or `defaults` (keys as Row's), seeds fixed; UsageError naming the row
    and field of the first bad one."""
    rows = []
    for index, (where, record) in enumerate(read_records(path)):
        fields = {k: v for k, v in _normalise(record, where).items() if v is not None}
        seed = row_seed(fields.pop("seed", None), base_seed, index)
        row = Row(row=index, seed=seed, **{**defaults, **fields})
        check_row(row, where, factor)
        rows.append(row)
    return rows
