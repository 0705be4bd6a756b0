"""A tiny autoencoder for a model's latent space, distilled from that model's own VAE (no images of its own).

The student learns to map images to the teacher's (scaled) latents and those latents back to the teacher's
decoded images, so it stands in for the teacher wherever the UNet's latents go in or come out. The teacher is
read once from the diffusion model's checkpoint and is not part of the student's state dict: a checkpoint of
this module is a `TinyAutoencoder` (`encoder.N`, `decoder.N`), which `ldm.models.taesd.load_taesd` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.models.taesd import TinyAutoencoder
from ldm.training.logged_loss import LoggedLossSteps


class TinyAutoencoderTrainer(LoggedLossSteps, TinyAutoencoder, pl.LightningModule):
    def __init__(
        self,
        *,
        teacher_config: str,
        teacher_ckpt: str | None = None,
        base_learning_rate: float = 1e-3,
        latent_weight: float = 1.0,
        image_key: str = "image",
        latent_channels: int = 4,
        channels: int = 64,
        encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        decoder_blocks: Sequence[int] = (3, 3, 3, 1),
    ):
        super().__init__(latent_channels, channels, encoder_blocks, decoder_blocks)
        self.learning_rate = base_learning_rate
        self.latent_weight = latent_weight
        self.image_key = image_key
        self._teacher = [self._load_teacher(teacher_config, teacher_ckpt)]  # a list: not a submodule, not saved

    @staticmethod
    def _load_teacher(config_path: str, ckpt: str | None):
        import torch as _torch

        from ldm.generation.load import load_config, load_model, resolve_config_path
        from ldm.speed.runtime import Runtime

        config = load_config(config_path)
        if ckpt is None:
            ckpt = resolve_config_path(str(config.txt2img.ckpt), config_path)
        model = load_model(config, ckpt, Runtime(_torch.device("cpu")), verbose=False)
        return model.eval().requires_grad_(False)

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's scaled latents of images `x` (a sample of its posterior, as training saw) and its
        decoding of them."""
        teacher = self._teacher[0]
        with torch.no_grad():
            z = teacher.get_first_stage_encoding(teacher.encode_first_stage(x))
            return z, teacher.decode_first_stage(z)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[self.image_key]
        z, decoded = self.targets(x)
        image_loss = F.mse_loss(self.decode(z), decoded)
        latent_loss = F.mse_loss(self.encode(x), z)
        return image_loss + self.latent_weight * latent_loss, {
            "image_mse": image_loss.detach(),
            "latent_mse": latent_loss.detach(),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)
