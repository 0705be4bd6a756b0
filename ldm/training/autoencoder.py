"""Stage 1: the KL autoencoder, trained on reconstruction plus a small KL pull towards N(0, I)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.training.logged_loss import LoggedLossSteps


class AutoencoderKLTrainer(LoggedLossSteps, AutoencoderKL, pl.LightningModule):
    """AutoencoderKL with a training step; its checkpoints hold `encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*` exactly as the inference model names them.

    The loss is the original's without its perceptual (LPIPS) and adversarial terms, both of which need
    weights downloaded from elsewhere: per-image summed L1 reconstruction error plus `kl_weight` times the
    per-image KL divergence, averaged over the batch.
    """

    def __init__(
        self,
        *,
        base_learning_rate: float = 1e-3,
        kl_weight: float = 1e-6,
        image_key: str = "image",
        **params: Any,
    ):
        super().__init__(**params)
        self.learning_rate = base_learning_rate
        self.kl_weight = kl_weight
        self.image_key = image_key

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[self.image_key]
        reconstruction, posterior = self(x)
        rec = (x - reconstruction).abs().flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        pixels = x[0].numel()
        return loss, {"rec_l1_per_pixel": rec.detach() / pixels, "kl": kl.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))
