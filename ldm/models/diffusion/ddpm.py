"""Latent diffusion: the UNet denoises in the autoencoder's latent space, conditioned on CLIP text.

Inference side only; the noise schedule, model calls and latent scaling live here, samplers elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.speed.hooks import decode_tiled
from ldm.util import instantiate_from_config

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def linear_schedule(timesteps: int, linear_start: float, linear_end: float) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers of SD v1: betas linear in sqrt, float64 math, stored as float32."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32, device="cpu") for k, v in values.items()}


class DiffusionWrapper(nn.Module):
    """Keeps the UNet under `model.diffusion_model`, the checkpoint's key path."""

    def __init__(self, unet_config: Mapping[str, Any]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(nn.Module):
    """Text-to-image latent diffusion (SD v1), built from the original config's `params`.

    Training-only entries of the original YAML (`monitor`, `scheduler_config`, `first_stage_key`, ...)
    are accepted and ignored, so both the original configs and ours instantiate it.
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        beta_schedule: str = "linear",
        scale_factor: float = 0.18215,
        conditioning_key: str = "crossattn",
        parameterization: str = "eps",
        channels: int = 4,
        image_size: int = 64,
        use_ema: bool = False,
        **_training_only: Any,
    ):
        super().__init__()
        if beta_schedule != "linear":
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (SD v1 uses 'linear')")
        if conditioning_key not in ("crossattn", "hybrid"):
            raise ValueError(
                f"conditioning_key {conditioning_key!r} is not supported (SD v1 uses 'crossattn'; its inpainting "
                "models 'hybrid')"
            )
        # hybrid: text by cross-attention plus extra input channels (inpainting: mask and masked-image latents)
        self.conditioning_key = conditioning_key
        if parameterization != "eps":
            raise ValueError(f"parameterization {parameterization!r} is not supported (SD v1 predicts 'eps')")
        self.num_timesteps = timesteps
        self.scale_factor = scale_factor
        self.channels = channels
        self.image_size = image_size
        self.linear_start, self.linear_end = linear_start, linear_end
        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval().requires_grad_(False)
        self.cond_stage_model = instantiate_from_config(cond_stage_config).eval().requires_grad_(False)
        # Made on the CPU even under a meta-device build, so a checkpoint without them still works.
        for name, value in linear_schedule(timesteps, linear_start, linear_end).items():
            self.register_buffer(name, value)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @torch.no_grad()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        return self.cond_stage_model.encode(prompts)

    @property
    def concat_channels(self) -> int:
        """Input channels the UNet takes beyond the latents (4 + 1 for the inpainting models, else 0)."""
        return self.model.diffusion_model.input_blocks[0][0].in_channels - self.channels

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents `x` at integer timesteps `t` under text context `cond`."""
        return self.model(x, t, cond)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 diffused to integer timesteps `t`: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self.sqrt_alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a * x0 + s * noise

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, posterior: DiagonalGaussianDistribution, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.scale_factor * posterior.sample(generator)

    def decode_first_stage(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents to pixels; `tile` (in latents) decodes in overlapping tiles to bound memory."""
        z = 1.0 / self.scale_factor * z
        if tile is None:
            return self.first_stage_model.decode(z)
        return decode_tiled(self.first_stage_model.decode, z, tile)
