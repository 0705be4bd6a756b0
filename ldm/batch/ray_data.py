"""Rows on a Ray cluster with Ray Data: `from_items(rows)` in one block per row, `map_batches` onto a fixed pool of
actors (each loads the model once and makes one row per call), results streamed back to the driver in the order they
finish. The only module of the package that imports Ray; `ldm-batch` loads it for `--ray` alone."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import ray

from ldm.batch.make import MakeOptions, RowMaker
from ldm.batch.rows import Row

COLUMNS = ("row", "index", "seed", "png", "params", "seconds", "finished", "worker")


class RowActor:
    """A Ray Data actor: one loaded model; a batch of (one) row in, that row's images out, one output row each."""

    def __init__(self, options: dict[str, Any]):
        self.maker = RowMaker(MakeOptions(**options))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for text in batch["row"]:
            for record in self.maker.make(Row(**json.loads(str(text)))):
                for name in COLUMNS:
                    value = record[name]
                    out[name].append(json.dumps(value) if name == "params" else value)
        return out


def connect(address: str | None) -> None:
    """Join `address` ('auto', ray://...), or start a local instance when it is empty; reuse one already joined."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our tqdm bar says how far it is
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = 900  # every actor loaded before rows are handed out, so all of them get rows
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)


def run_on_ray(rows: list[Row], options: MakeOptions, address: str | None, actors: int, cpus: float,
               gpus: float) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Each row's image records as the actors finish them (rows in any order)."""
    connect(address)
    opts = asdict(options)
    if opts["threads"] is None:
        opts["threads"] = max(1, int(cpus))  # as many torch threads as the CPUs reserved for the actor
    items = [{"row": json.dumps(asdict(row))} for row in rows]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per row: rows spread over actors
    ds = ds.map_batches(RowActor, fn_constructor_kwargs={"options": opts}, batch_size=1, concurrency=actors,
                        num_cpus=cpus, num_gpus=gpus or None)  # fmt: skip
    for out in ds.iter_rows():
        record = {name: out[name] for name in COLUMNS}
        record["params"] = json.loads(record["params"])
        for name in ("row", "index", "seed"):
            record[name] = int(record[name])
        record["seconds"] = float(record["seconds"])
        record["finished"] = float(record["finished"])
        record["png"] = bytes(record["png"])
        record["worker"] = str(record["worker"])
        yield record
