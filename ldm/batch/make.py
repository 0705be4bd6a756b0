"""One row's images, the same way in every process: the library's `Pipeline.txt2img` with the row's own seed, each
image encoded as the PNG the driver writes (with txt2img's "parameters" text). The in-process loop and every Ray actor
call this, so a row's pixels do not depend on where it ran (given the same number of CPU threads)."""

from __future__ import annotations

import io
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.batch.rows import Row
from ldm.cli.txt2img import infotext_fields
from ldm.files.image_output import Watermarker, watermark_supported
from ldm.files.infotext import format_infotext


@dataclass(frozen=True)
class MakeOptions:
    """What every worker needs to load the model and sample like the others (plain data: it travels to actors)."""

    config: str
    ckpt: str
    n_samples: int = 1
    karras: bool = False
    eta: float = 0.0
    device: str | None = None
    precision: str | None = None
    watermark: bool = True
    threads: int | None = None
    deepcache: int = 0
    tome: float = 0.0
    vae_tile: int | None = None
    vae: str = "full"


def worker_name() -> str:
    """Which process made an image: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def png_bytes(rgb: np.ndarray, parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class RowMaker:
    """The model, loaded once; `make(row)` returns that row's images as manifest records with PNG bytes."""

    def __init__(self, options: MakeOptions):
        import torch

        from ldm.generation.pipeline import Pipeline

        if options.threads:
            torch.set_num_threads(options.threads)
        self.options = options
        self.pipe = Pipeline.from_config(options.config, ckpt=options.ckpt, device=options.device,
                                         precision=options.precision)  # fmt: skip
        self.watermarker = Watermarker() if options.watermark else None
        self.worker = worker_name()

    def fields(self, row: Row) -> dict[str, object]:
        """txt2img's PNG fields for this row: its `infotext_fields` of the row's settings."""
        o = self.options
        s = self.pipe.settings(steps=row.steps, sampler=row.sampler, scale=row.scale, height=row.H, width=row.W,
                               n_samples=o.n_samples, seed=row.seed, eta=o.eta,
                               schedule="karras" if o.karras else "discrete", reuse_interval=o.deepcache,
                               vae_tile=o.vae_tile, token_merge=o.tome, vae=o.vae)  # fmt: skip
        return infotext_fields(s, o.ckpt)

    def make(self, row: Row) -> list[dict[str, Any]]:
        o = self.options
        start = time.time()
        images = self.pipe.txt2img(row.prompt, negative_prompt=row.negative_prompt, n=o.n_samples, seed=row.seed,
                                   steps=row.steps, sampler=row.sampler, scale=row.scale, height=row.H, width=row.W,
                                   karras=o.karras, eta=o.eta, deepcache=o.deepcache, vae_tile=o.vae_tile, tome=o.tome,
                                   vae=o.vae)  # fmt: skip
        row_fields = self.fields(row)
        records = []
        for index, image in enumerate(images):
            rgb = np.asarray(image)
            if self.watermarker is not None and watermark_supported(row.H, row.W):
                rgb = self.watermarker.apply(rgb)
            fields = {**row_fields, "Batch pos": index}
            text = format_infotext(row.prompt, fields, negative_prompt=row.negative_prompt)
            records.append({"row": row.row, "index": index, "seed": row.seed, "png": png_bytes(rgb, text)})
        seconds = round(time.time() - start, 4)
        for record in records:
            record.update(params=row.params(), seconds=seconds, finished=round(time.time(), 3), worker=self.worker)
        return records
