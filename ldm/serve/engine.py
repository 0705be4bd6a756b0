"""The model and one job's picture-making, exactly as the CLI does it (same sampling calls, same PNG files with the
same "parameters" text), so a job's images equal `scripts/txt2img.py` / `scripts/img2img.py` with those settings.

Only the worker thread calls `Engine.run`; the model is never used by two threads at once.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.adapters import apply_adapters
from ldm.cli.txt2img import infotext_fields, plan_run_adapters, split_negatives
from ldm.files.checkpoints import prefer_safetensors
from ldm.files.image_input import MULTIPLE, load_image_array, load_mask, to_model_range
from ldm.files.image_output import OutputWriter, Watermarker, sync_dir, to_uint8_images
from ldm.files.infotext import format_infotext, legacy_model_hash
from ldm.generation.generate import SampleSettings, StepCallback, generate, original_steps
from ldm.generation.img2img import composite, generate_img2img
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model, resolve_config_path
from ldm.generation.pipeline import ORIGINAL_DEFAULTS  # for configs without a `txt2img:` section
from ldm.serve.adapters import AdapterCatalog
from ldm.serve.settings import Settings
from ldm.speed.runtime import resolve_runtime

SAMPLE_NAME = "{:05d}.png"  # OutputWriter's sample numbering, from 0 in a fresh folder


def offers_tiny_autoencoder(settings: Settings, cfg=None) -> bool:
    """Whether the engine for `settings` loads a tiny autoencoder (--taesd files or the config's taesd: section)."""
    cfg = load_config(settings.config) if cfg is None else cfg
    return bool(settings.taesd) or bool(cfg.get("taesd", None))


def config_defaults(cfg) -> dict[str, Any]:
    """The config's txt2img defaults over the original's (size, factor, sampler, steps, scale, ckpt, watermark)."""
    section = cfg.get("txt2img", None)
    return {**ORIGINAL_DEFAULTS, **(OmegaConf.to_container(section) if section else {})}


class Engine:
    """Config + checkpoint loaded once; `defaults` are the config's txt2img defaults (size, sampler, steps...)."""

    def __init__(self, settings: Settings):
        self.config_path = settings.config
        cfg = load_config(settings.config)
        self.defaults = config_defaults(cfg)
        ckpt = settings.ckpt or self.defaults.get("ckpt")
        if ckpt is None:
            raise ValueError(f"{settings.config} names no checkpoint (txt2img.ckpt): pass --ckpt PATH")
        if settings.ckpt is None:
            ckpt = resolve_config_path(str(ckpt), settings.config)
        self.ckpt = prefer_safetensors(ckpt)
        s = settings
        self.runtime = resolve_runtime(cfg, s.device, s.precision, s.channels_last, s.compile)
        self.hybrid = OmegaConf.select(cfg, "model.params.conditioning_key", default=None) == "hybrid"
        self.speed = {"reuse_interval": settings.deepcache, "token_merge": settings.tome, "vae_tile": settings.vae_tile}
        self.model = load_model(cfg, self.ckpt, self.runtime, verbose=False)
        if offers_tiny_autoencoder(settings, cfg):  # for requests' vae "taesd" and for step previews
            attach_tiny_autoencoder(self.model, cfg, self.runtime, settings.taesd, settings.config)
        self.model_name = os.path.splitext(os.path.basename(self.ckpt))[0]
        self.model_hash = legacy_model_hash(self.ckpt)
        self.factor = int(self.defaults["f"])

    def settings_for(self, r: dict[str, Any]) -> SampleSettings:
        """The CLI's `settings_from` for a stored request (already checked and complete)."""
        return SampleSettings(
            steps=r["steps"],
            sampler=r["sampler"],
            schedule=r["schedule"],
            eta=r["eta"],
            scale=r["scale"],
            height=r["height"],
            width=r["width"],
            channels=int(self.defaults["C"]),
            factor=self.factor,
            n_samples=r["n"],
            n_iter=r["n_iter"],
            seed=r["seed"],
            vae=r.get("vae", "full"),
            **self.speed,
        )

    def steps_per_batch(self, r: dict[str, Any]) -> int:
        """Sampling steps one batch runs (for progress before the first step is reported)."""
        steps = original_steps(self.model, r["steps"]) if r["sampler"] in ("ddim", "plms") else r["steps"]
        if r["kind"] in ("img2img", "inpaint"):
            return min(int(r["strength"] * r["steps"]), steps)
        return steps

    def preview_jpeg(self, denoised: torch.Tensor) -> bytes:
        """The first image of a step's denoised estimate, drawn by the tiny decoder, as JPEG bytes (small enough
        to send with every progress event)."""
        with torch.no_grad():
            pixels = self.model.tiny_autoencoder.decode(denoised[:1].to(self.runtime.arithmetic_dtype))
        buf = io.BytesIO()
        Image.fromarray(to_uint8_images(pixels.float())[0]).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def run(
        self,
        kind: str,
        r: dict[str, Any],
        inputs: dict[str, bytes],
        out_dir: Path,
        on_step: StepCallback,
        adapters: AdapterCatalog | None = None,
    ) -> int:
        """Make the job's images into `out_dir` (emptied first: a crashed run may have left some); their count.

        LoRAs (tags and the request's `loras`, names of `adapters`' listing) and embeddings are applied as the CLI
        applies them and taken off after the job, so the next job has the base weights. Each PNG is written whole
        to a temporary file and linked into place (OutputWriter), then the folder is synced, so the caller can
        mark the job succeeded."""
        shutil.rmtree(out_dir, ignore_errors=True)
        if self.hybrid and "mask" not in inputs:
            raise ValueError(f"{self.config_path} is an inpainting model: send an init image and a mask")
        s = self.settings_for(r)
        shown, shown_negatives = split_negatives([r["n"] * [r["prompt"]]], r["negative_prompt"])
        batches, negatives, plan = shown, shown_negatives, None
        if adapters is not None:
            flags = [f"{adapters.check_name(name)}:{weight}" for name, weight in r.get("loras", ())]
            opt = SimpleNamespace(lora=flags, embedding=[], lora_dir=str(adapters.lora_dir),
                                  embeddings_dir=str(adapters.embeddings_dir))  # fmt: skip
            batches, negatives, plan, shown = plan_run_adapters(opt, shown, shown_negatives)
        fields = infotext_fields(s, self.ckpt)
        with apply_adapters(self.model, plan.loras, plan.embeddings) if plan else nullcontext() as handle:
            if handle is not None:
                fields.update(handle.infotext_fields())
            runs, finish = self._runs(kind, r, inputs, on_step, s, batches, negatives, fields)
            return self._write(out_dir, runs, finish, shown[0], shown_negatives[0], fields, kind)

    def _runs(self, kind, r, inputs, on_step, s, batches, negatives, fields):
        """The sampling runs (lazy: they compute as they are read) and what finishes their images."""
        finish: Callable[[np.ndarray], list[np.ndarray]] | None = None
        if kind == "txt2img":
            runs = generate(self.model, batches, s, self.runtime, progress=False, negative_prompt=negatives,
                            step_callback=on_step)  # fmt: skip
        else:
            rgb = load_image_array(inputs["init"], MULTIPLE)
            h, w = rgb.shape[:2]
            mask = None
            if "mask" in inputs:
                mask = load_mask(inputs["mask"], (w, h), r["mask_dilate"], r["mask_blur"])
            runs = generate_img2img(self.model, batches, s, self.runtime, to_model_range(rgb), r["strength"],
                                    mask=mask, negative_prompt=negatives[0][0], progress=False,
                                    step_callback=on_step)  # fmt: skip
            fields["Denoising strength"] = r["strength"]
            if mask is not None:
                fields["Mask blur"] = r["mask_blur"]

                def finish(images: np.ndarray) -> list[np.ndarray]:
                    return [composite(rgb, im, mask[0]) for im in images]

        return runs, finish

    def _write(self, out_dir: Path, runs, finish, prompts: list[str], negatives: list[str], fields, kind: str) -> int:
        """Each image as the CLI writes it, its "parameters" naming the prompt as given (tags included)."""
        watermark = kind == "txt2img" and bool(self.defaults.get("watermark", True))  # img2img's default: none
        writer = OutputWriter(out_dir, Watermarker() if watermark else None)
        count = 0
        for batch in runs:
            rgbs = to_uint8_images(batch.decoded)
            if finish is not None:
                rgbs = finish(rgbs)
            for i, (prompt, rgb) in enumerate(zip(prompts, rgbs, strict=True)):
                extra = {"Iteration": batch.iteration, "Batch pos": i}
                info = format_infotext(prompt, {**fields, **extra}, negative_prompt=negatives[i])
                writer.save_sample(rgb, {"parameters": info})
                count += 1
        sync_dir(writer.sample_dir)
        return count

    def image_path(self, out_dir: Path, k: int) -> Path:
        return out_dir / "samples" / SAMPLE_NAME.format(k)
