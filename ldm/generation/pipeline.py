"""The Python API: load a model once, then txt2img / img2img / inpaint, each returning PIL images.

    from ldm.generation.pipeline import Pipeline
    pipe = Pipeline.from_config("configs/demo/digits.yaml")          # its checkpoint named in the config
    digits = pipe.txt2img("a handwritten digit 7", n=4, seed=1)
    variations = pipe.img2img(digits[0], "a handwritten digit 1", strength=0.6)

Settings default to the config's `txt2img:` section, then to the original txt2img's defaults. The
sampling code is the CLI's (`ldm.generation.generate`, `ldm.generation.img2img`), so a seed gives the CLI's image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.adapters import adapters_for_prompts
from ldm.files.image_input import MULTIPLE, load_image_array, load_mask, to_model_range
from ldm.files.image_output import to_uint8_images
from ldm.generation.generate import BatchResult, SampleSettings, StepCallback, check_sampler, generate
from ldm.generation.img2img import composite, generate_img2img
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model, resolve_config_path
from ldm.speed.runtime import Runtime, resolve_runtime

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "digits.yaml"
# The original txt2img's flag defaults, under their flag names, for configs without a `txt2img:` section.
ORIGINAL_DEFAULTS = {"H": 512, "W": 512, "C": 4, "f": 8, "ddim_steps": 50, "sampler": "plms", "scale": 7.5}


class Pipeline:
    def __init__(self, model, runtime: Runtime, defaults: Mapping[str, Any] | None = None):
        self.model = model
        self.runtime = runtime
        self.defaults = {**ORIGINAL_DEFAULTS, **(defaults or {})}

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike = DEMO_CONFIG,
        ckpt: str | os.PathLike | None = None,
        device: str | None = None,
        precision: str | None = None,
        verbose: bool = False,
        channels_last: bool | None = None,
        compile: bool | None = None,
        taesd: Sequence[str | os.PathLike] = (),
    ) -> Pipeline:
        """Build the model of `config` from `ckpt` (default: the checkpoint its `txt2img:` section names), with the
        tiny autoencoder for `vae="taesd"` from `taesd` files or the config's `taesd:` section, where either is."""
        cfg = load_config(config)
        defaults = dict(cfg.get("txt2img", None) or {})
        if ckpt is None:
            if "ckpt" not in defaults:
                raise ValueError(f"{config} names no checkpoint (txt2img.ckpt): pass ckpt=PATH")
            ckpt = resolve_config_path(str(defaults["ckpt"]), config)
        runtime = resolve_runtime(cfg, device, precision, channels_last, compile)
        model = load_model(cfg, ckpt, runtime, verbose=verbose)
        if taesd or cfg.get("taesd", None):
            attach_tiny_autoencoder(model, cfg, runtime, taesd, config)
        return cls(model, runtime, defaults)

    def settings(self, **overrides: Any) -> SampleSettings:
        d = self.defaults
        given = {k: v for k, v in overrides.items() if v is not None}
        s = SampleSettings(
            steps=given.pop("steps", d["ddim_steps"]),
            sampler=given.pop("sampler", d["sampler"]),
            scale=given.pop("scale", d["scale"]),
            height=given.pop("height", d["H"]),
            width=given.pop("width", d["W"]),
            channels=d["C"],
            factor=d["f"],
            **given,
        )
        check_sampler(s.sampler, s.schedule, s.steps)
        return s

    def _settings(
        self, n, seed, steps, sampler, scale, height, width, karras, eta, deepcache, vae_tile, tome, vae
    ) -> SampleSettings:
        """The per-call arguments of txt2img and img2img, under SampleSettings' names."""
        return self.settings(
            steps=steps,
            sampler=sampler,
            scale=scale,
            height=height,
            width=width,
            n_samples=n,
            seed=seed,
            eta=eta,
            schedule="karras" if karras else "discrete",
            reuse_interval=deepcache,
            vae_tile=vae_tile,
            token_merge=tome,
            vae=vae,
        )

    def _with_adapters(
        self,
        prompt: str,
        negative_prompt: str,
        loras: Sequence[str | tuple[str, float]],
        embeddings: Sequence[str],
        run: Callable[[str, str], Iterator[BatchResult]],
    ) -> BatchResult:
        """The one batch `run(prompt, negative_prompt)` makes, with the LoRAs and embeddings of the call (and of the
        prompt's `<lora:...>` tags) applied while it runs, and the base model back afterwards."""
        (prompt,), (negative_prompt,), adapters = adapters_for_prompts(
            self.model, [prompt], [negative_prompt], loras=loras, embeddings=embeddings
        )
        with adapters:
            (batch,) = run(prompt, negative_prompt)
        return batch

    def txt2img(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        n: int = 1,
        seed: int = 42,
        steps: int | None = None,
        sampler: str | None = None,
        scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        karras: bool = False,
        eta: float = 0.0,
        deepcache: int = 0,
        vae_tile: int | None = None,
        tome: float = 0.0,
        vae: str = "full",
        loras: Sequence[str | tuple[str, float]] = (),
        embeddings: Sequence[str] = (),
        step_callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """`vae="taesd"` decodes with the tiny autoencoder (fast, a little less detail). `loras` ("PATH[:WEIGHT]" or
        (path, weight)) are merged for this call only, as are `<lora:NAME:WEIGHT>` tags of the prompt (from
        models/lora/); `embeddings` (and those of models/embeddings/ whose name the prompts use) add words.
        `step_callback(i, steps, denoised)` is called after each sampling step (denoised: the latents that step
        predicts, for previews) and may raise to stop the run.
        `deepcache=N` runs the full UNet every N-th call only (ldm.speed.feature_reuse); `vae_tile` decodes in tiles
        of that many pixels (ldm.speed.tiling); `tome=RATIO` merges tokens before the full-resolution
        self-attentions (ldm.speed.token_merge). Each saves time or memory and changes the pixels a little."""
        s = self._settings(n, seed, steps, sampler, scale, height, width, karras, eta, deepcache, vae_tile, tome, vae)

        def run(prompt: str, negative_prompt: str):
            return generate(
                self.model,
                [n * [prompt]],
                s,
                self.runtime,
                progress=False,
                negative_prompt=negative_prompt,
                step_callback=step_callback,
            )

        batch = self._with_adapters(prompt, negative_prompt, loras, embeddings, run)
        return [Image.fromarray(a) for a in to_uint8_images(batch.decoded)]

    def img2img(
        self,
        image: str | os.PathLike | Image.Image,
        prompt: str,
        *,
        strength: float = 0.75,
        mask: str | os.PathLike | Image.Image | None = None,
        mask_dilate: int = 0,
        mask_blur: float = 0.0,
        negative_prompt: str = "",
        n: int = 1,
        seed: int = 42,
        steps: int | None = None,
        sampler: str | None = None,
        scale: float | None = None,
        karras: bool = False,
        eta: float = 0.0,
        deepcache: int = 0,
        vae_tile: int | None = None,
        tome: float = 0.0,
        vae: str = "full",
        loras: Sequence[str | tuple[str, float]] = (),
        embeddings: Sequence[str] = (),
        step_callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Variations of `image` (cut to multiples of 32 pixels); with `mask` (white = repaint), inpainting.
        `vae="taesd"` encodes and decodes with the tiny autoencoder."""
        rgb = load_image_array(image, MULTIPLE)
        h, w = rgb.shape[:2]
        m = None if mask is None else load_mask(mask, (w, h), dilate=mask_dilate, blur=mask_blur)
        s = self._settings(n, seed, steps, sampler, scale, h, w, karras, eta, deepcache, vae_tile, tome, vae)

        def run(prompt: str, negative_prompt: str):
            return generate_img2img(
                self.model,
                [n * [prompt]],
                s,
                self.runtime,
                to_model_range(rgb),
                strength,
                mask=m,
                negative_prompt=negative_prompt,
                progress=False,
                step_callback=step_callback,
            )

        batch = self._with_adapters(prompt, negative_prompt, loras, embeddings, run)
        out = to_uint8_images(batch.decoded)
        if m is not None:
            out = np.stack([composite(rgb, o, m[0]) for o in out])
        return [Image.fromarray(a) for a in out]

    def inpaint(
        self,
        image: str | os.PathLike | Image.Image,
        mask: str | os.PathLike | Image.Image,
        prompt: str,
        *,
        strength: float = 1.0,
        **kwargs: Any,
    ) -> list[Image.Image]:
        """Repaint the white part of `mask`; every pixel where the mask is black stays exactly the input's."""
        return self.img2img(image, prompt, strength=strength, mask=mask, **kwargs)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as the [1, 3, H, W] float tensor in [-1, 1] the model takes."""
    return to_model_range(np.asarray(image.convert("RGB")))
