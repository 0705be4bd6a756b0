"""The output folder of a batch run: `samples/RRRRR-II.png` per image and `manifest.jsonl`, one line per image.

Each image is written whole to a temporary file and renamed into place; its manifest line is appended (and synced)
only after that, so a line always names a complete file. At start the manifest is read back: lines of rows that are
complete (all their images, files present, same prompt and settings) are kept once each, everything else is dropped,
and the cleaned manifest replaces the old one atomically; the run then makes only the rows not kept. A run killed at
any point therefore ends, once rerun, with every row exactly once.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ldm.batch.rows import Row
from ldm.files.image_output import sync_dir

MANIFEST = "manifest.jsonl"


def image_name(row: int, index: int) -> str:
    return f"samples/{row:05d}-{index:02d}.png"


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, all or nothing: a temp file in the same folder, synced, then renamed over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The manifest's records; a line cut short by a kill (or otherwise unreadable) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("row"), int) and isinstance(record.get("index"), int):
            records.append(record)
    return records


class Output:
    """The output folder; `resume(rows)` cleans the manifest and says which rows are left, `add` stores one image."""

    def __init__(self, outdir: str | os.PathLike, n_samples: int):
        self.dir = Path(outdir)
        self.n_samples = n_samples
        self.manifest = self.dir / MANIFEST
        self._fh = None

    def _complete(self, record: dict[str, Any], rows: list[Row]) -> bool:
        r = record["row"]
        if not (0 <= r < len(rows) and 0 <= record["index"] < self.n_samples):
            return False
        return record.get("params") == rows[r].params() and (self.dir / str(record.get("file", ""))).is_file()

    def resume(self, rows: list[Row]) -> list[Row]:
        """Rows still to make; rewrites the manifest to hold each complete row's lines once, nothing else."""
        (self.dir / "samples").mkdir(parents=True, exist_ok=True)
        kept: dict[tuple[int, int], dict[str, Any]] = {}
        for record in read_lines(self.manifest):
            if self._complete(record, rows):
                kept[(record["row"], record["index"])] = record  # a line repeated: the last one
        done = {r for r in range(len(rows)) if all((r, i) in kept for i in range(self.n_samples))}
        lines = [kept[key] for key in sorted(kept) if key[0] in done]
        write_atomic(self.manifest, "".join(json.dumps(x) + "\n" for x in lines).encode())
        return [row for row in rows if row.row not in done]

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the record's PNG into place, then append its manifest line (without the bytes); the line."""
        name = image_name(record["row"], record["index"])
        write_atomic(self.dir / name, record["png"])
        line = {k: v for k, v in record.items() if k != "png"} | {"file": name}
        if self._fh is None:
            self._fh = open(self.manifest, "a", encoding="utf-8")
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return line

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
