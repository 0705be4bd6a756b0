"""img2img and inpainting: start from an encoded picture instead of pure noise, as the original img2img does.

The DDIM path is the original's algorithm: the init image is encoded once (one posterior draw), then per
batch its latent is noised to the level of DDIM step `t_enc = int(strength * steps)` and the first `t_enc`
steps are run (the original's `stochastic_encode` + `decode`, off-by-one included: noised to step index
t_enc, denoised from t_enc - 1). The other samplers noise the latent to the matching sigma of their
schedule and run the remaining steps. Where the original crashes or wastes work we do this instead:
when t_enc reaches past the DDIM selection (strength 1 with a step count that selects exactly that many
steps, such as 50) we start from pure noise and run txt2img's whole schedule, where the original indexes
past its schedule and crashes; strength 0 returns the encoded image untouched (the original still adds
step-1 noise). Step counts whose selection has one step more (6, 7, ...) keep the original's strength-1
behaviour. The seed is set after the model is built (the original seeds before, so its random init eats
into the stream and its images depend on its init code; its txt2img seeds after, as we do).

Inpainting blends the known latents back in at every step (outside the mask) and finally composites the
decoded picture with the input in pixel space, so unmasked pixels are exactly the input's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.generation.generate import (
    ORIGINAL_SAMPLERS,
    BatchResult,
    SampleSettings,
    StepCallback,
    batch_place,
    check_sampler,
    conditioning,
    decode,
    encode_all_then_free,
    free_weights,
    latent_tile,
    nan_hint,
    original_callback,
    run_solver,
    solver_sigmas,
    tiny_autoencoder,
)
from ldm.models.diffusion.sampling_common import DDIMSchedule, stochastic_encode
from ldm.samplers.registry import CONSISTENCY_SAMPLERS
from ldm.speed.feature_reuse import reuse_features
from ldm.speed.runtime import Runtime
from ldm.speed.token_merge import merge_tokens
from ldm.util import seed_everything


def encoding_steps(strength: float, steps: int) -> int:
    """The original's t_enc: how many of the `steps` sampling steps img2img runs."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    return int(strength * steps)


def composite(init_rgb: np.ndarray, generated_rgb: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Final pixels: the input's own uint8 values where the mask is 0, the generated ones where it is 1,
    blended in between (a feathered mask). Done in uint8 space so kept pixels are bit-exact."""
    m = mask.reshape(mask.shape[-2], mask.shape[-1], 1).cpu().numpy().astype(np.float32)
    blend = np.rint(m * generated_rgb.astype(np.float32) + (1.0 - m) * init_rgb.astype(np.float32))
    return np.where(m == 0.0, init_rgb, blend.astype(np.uint8))


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (1 = repaint) at latent resolution: a latent cell is repainted if any of its pixels is."""
    return F.adaptive_max_pool2d(mask, latent_hw)


def _solver_img2img(
    model, s, cond, uncond, z0, noise, t_enc, generator, mask, progress, step_callback=None, strength: float = 1.0
):
    """The solver's schedule from the sigma `t_enc` steps before its end: from z0 noised to it, or from pure
    noise when t_enc covers every step (txt2img's start)."""
    if s.sampler in CONSISTENCY_SAMPLERS:  # all its steps, on the part of its grid below strength (as diffusers)
        sigmas = solver_sigmas(model, s.steps, s.schedule, z0.device, s.sampler, strength=strength)
        x = z0 + noise * sigmas[0]
    else:
        sigmas = solver_sigmas(model, s.steps, s.schedule, z0.device)[s.steps - t_enc :]
        x = noise * sigmas[0] if t_enc == s.steps else z0 + noise * sigmas[0]
    wrap = None
    if mask is not None:  # the kept region's prediction is the known latent: it converges there exactly

        def wrap(inner):
            return lambda x_, sigma: mask * inner(x_, sigma) + (1.0 - mask) * z0

    return run_solver(
        model, s, cond, uncond, x, sigmas, generator, progress, wrap_denoiser=wrap, step_callback=step_callback
    )


class ConcatConditioned:
    """The model as the samplers see it when its UNet takes extra input channels (the SD inpainting models):
    every UNet call gets [x, c_concat] along channels, c_concat repeated over the guidance batch."""

    def __init__(self, model, c_concat: torch.Tensor):
        self._model = model
        self._c_concat = c_concat

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cc = self._c_concat.to(x.dtype)
        if cc.shape[0] != x.shape[0]:
            cc = cc.repeat(x.shape[0] // cc.shape[0], 1, 1, 1)
        return self._model.apply_model(torch.cat([x, cc], dim=1), t, cond)


def inpainting_concat(model, init: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The extra UNet input of the inpainting models (sd-v1-5-inpainting): the mask at latent size, then the
    latents of the image with the repainted area blanked (as they were trained: mask >= 0.5 is repainted)."""
    repaint = (mask >= 0.5).to(init.dtype)
    masked = (init * (1.0 - repaint)).repeat(n, 1, 1, 1)
    masked_latents = model.get_first_stage_encoding(model.encode_first_stage(masked))
    small_mask = F.interpolate(repaint, size=masked_latents.shape[-2:]).repeat(n, 1, 1, 1)
    return torch.cat([small_mask, masked_latents], dim=1)


@torch.no_grad()
def generate_img2img(
    model,
    batches: Sequence[Sequence[str]],
    s: SampleSettings,
    runtime: Runtime,
    init_image: torch.Tensor,
    strength: float,
    mask: torch.Tensor | None = None,
    negative_prompt: str = "",
    progress: bool = True,
    low_memory: bool = False,
    step_callback: StepCallback | None = None,
) -> Iterator[BatchResult]:
    """Yield decoded batches made from `init_image` ([1, 3, H, W] in [-1, 1]); `mask` ([1, 1, H, W],
    1 = repaint) turns it into inpainting. Random draws, after seeding: the one posterior sample of the
    init image, then per batch the noise for its start, then the sampler's draws.

    `low_memory` frees, for good, the VAE encoder once the image is encoded, the text encoder after encoding
    every batch's prompts first (which draws no random numbers), and the UNet before the last decode, as
    txt2img's does. The images are the same. `step_callback` as in `generate`."""
    check_sampler(s.sampler, s.schedule, s.steps)
    t_enc = encoding_steps(strength, s.steps)
    device = runtime.device
    seed_everything(s.seed)
    solver_noise = torch.Generator(device=device).manual_seed(s.seed)
    init = init_image.to(device)
    with runtime.autocast():
        if s.vae == "taesd":  # the tiny encoder gives the latents themselves: no posterior sample is drawn
            z_init = tiny_autoencoder(model).encode(init).repeat(s.n_samples, 1, 1, 1)
        else:
            posterior = model.encode_first_stage(init.repeat(s.n_samples, 1, 1, 1))
            z_init = model.get_first_stage_encoding(posterior)
        m = c_concat = None
        if getattr(model, "concat_channels", 0):
            if mask is None:
                raise ValueError(
                    "this is an inpainting model (its UNet also takes a mask and a masked image): give a mask"
                )
            # The model itself fills in the masked area, from the mask and the masked image it is given.
            c_concat = inpainting_concat(model, init, mask.to(device, init.dtype), s.n_samples)
        elif mask is not None:
            m = latent_mask(mask.to(device, z_init.dtype), z_init.shape[-2:])
        schedule = DDIMSchedule.make(model.alphas_cumprod, s.steps, s.eta).to(device)
        encoded = encode_all_then_free(model, batches, negative_prompt, s) if low_memory else None
        for it in range(s.n_iter):
            for b, prompts in enumerate(batches):
                n = len(prompts)
                z0 = z_init[:n]
                sampling_model = model if c_concat is None else ConcatConditioned(model, c_concat[:n])
                if encoded is not None:
                    cond, uncond = encoded[b]
                else:
                    cond, uncond = conditioning(model, prompts, n * [negative_prompt], s)
                noise = torch.randn_like(z0)
                if t_enc == 0:
                    latents = z0
                else:
                    with reuse_features(model, s.reuse_interval), merge_tokens(model, s.token_merge):
                        if s.sampler in ORIGINAL_SAMPLERS:
                            sampler = ORIGINAL_SAMPLERS[s.sampler](sampling_model)
                            full = t_enc >= len(schedule.timesteps)
                            x = noise if full else stochastic_encode(z0, schedule, t_enc, noise)
                            latents = sampler.sample(
                                s.steps,
                                n,
                                tuple(z0.shape[1:]),
                                cond,
                                eta=s.eta,
                                unconditional_guidance_scale=s.scale,
                                unconditional_conditioning=uncond,
                                x_T=x,
                                progress=progress,
                                t_start=t_enc,
                                mask=None if m is None else m[:n],
                                x0=None if m is None else z0,
                                callback=original_callback(step_callback, min(t_enc, len(schedule.timesteps))),
                            )
                        else:
                            latents = _solver_img2img(
                                sampling_model,
                                s,
                                cond,
                                uncond,
                                z0,
                                noise,
                                t_enc,
                                solver_noise,
                                None if m is None else m[:n],
                                progress,
                                step_callback,
                                strength,
                            )
                if low_memory and it == s.n_iter - 1 and b == len(batches) - 1:
                    free_weights(model, model.model)
                where = batch_place(s, it, b, len(batches))
                decoded = decode(model, latents, runtime, where, nan_hint(s, runtime), latent_tile(s), s.vae)
                if mask is not None:
                    keep = 1.0 - mask.to(decoded.device, decoded.dtype)
                    decoded = keep * init + (1.0 - keep) * decoded
                yield BatchResult(it, list(prompts), cond, uncond, noise, latents, decoded)
