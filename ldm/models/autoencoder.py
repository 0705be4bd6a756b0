"""The KL-regularised autoencoder that maps 512x512x3 images to 64x64x4 latents and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.speed.hooks import compute_dtype


class AutoencoderKL(nn.Module):
    """Inference side of the original AutoencoderKL.

    Training-only config entries (`lossconfig`, `monitor`, `ckpt_path`, ...) are accepted and ignored,
    so the original YAML files instantiate unchanged.
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, **_training_only: Any):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: True (mean and log-variance channels)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Pixels in [-1, 1] to the latent posterior, whose parameters are float32 whatever the weights."""
        moments = self.quant_conv(self.encoder(x.to(compute_dtype(self))))
        return DiagonalGaussianDistribution(moments.float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(compute_dtype(self))))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
