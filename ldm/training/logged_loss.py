"""Lightning's training and validation steps for a module whose `loss(batch)` gives (loss, {name: value})."""

from __future__ import annotations

import torch


class LoggedLossSteps:
    """Mixed in before `pl.LightningModule`: logs the loss and its parts under train/ and val/."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logs = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        self.log_dict({f"val/{k}": v for k, v in logs.items()})
