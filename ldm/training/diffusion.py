"""Stage 2: latent diffusion on a frozen first stage; the text encoder frozen as in SD v1, or trained along
as in the original LDM's text-to-image models (`cond_stage_trainable`)."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.files.checkpoints import read_state_dict
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.training.ema import LitEma
from ldm.util import get_obj_from_str


class LatentDiffusionTrainer(LatentDiffusion, pl.LightningModule):
    """LatentDiffusion with the DDPM training objective: predict the noise added at a uniformly drawn step.

    The UNet (`model.diffusion_model`) learns, and with `cond_stage_trainable` the text encoder too.
    Captions are replaced by the empty prompt with probability `ucg_rate`, so the same network also learns
    the unconditional model that classifier-free guidance needs. `first_stage_ckpt` names the stage-1
    checkpoint; `use_ema` keeps an EMA of the UNet under `model_ema.*` as the original does.

    `zero_unused_tokens` zeroes the token-embedding rows of every token no training caption uses: they are
    never read, and zeros keep a committed checkpoint small in git. `token_init_std` redraws the used rows
    at that scale. Measured on the digits demo: at CLIP's 0.02, a small random text encoder's contexts for
    different digits differ by a few percent (averaged over a 77-token context), and after 600 steps the UNet
    still ignored the prompt; at 1.0 with an 8-token context they differ by about 20% and the prompt is
    followed after 500 steps.
    """

    def __init__(
        self,
        *,
        base_learning_rate: float = 1e-4,
        warmup_steps: int = 0,
        ucg_rate: float = 0.1,
        cond_stage_trainable: bool = False,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        first_stage_ckpt: str | None = None,
        zero_unused_tokens: bool = False,
        token_init_std: float | None = None,
        caption_vocabulary: list[str] | str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        **params: Any,
    ):
        super().__init__(**params)
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.learning_rate = base_learning_rate
        self.warmup_steps = warmup_steps
        self.ucg_rate = ucg_rate
        self.image_key, self.caption_key = image_key, caption_key
        if first_stage_ckpt:
            self.load_first_stage(first_stage_ckpt)
        self.cond_stage_trainable = cond_stage_trainable
        self.token_init_std = token_init_std
        if cond_stage_trainable:
            self.cond_stage_model.requires_grad_(True)
        if zero_unused_tokens:
            if isinstance(caption_vocabulary, str):  # a dotted path to a function listing every caption
                caption_vocabulary = get_obj_from_str(caption_vocabulary)()
            self.zero_unused_token_rows(list(caption_vocabulary or []))
        self.model_ema = LitEma(self.model, decay=ema_decay) if use_ema else None
        self._context_cache: dict[str, torch.Tensor] = {}

    def load_first_stage(self, path: str | os.PathLike) -> None:
        sd, _ = read_state_dict(path)
        # A stage-1 checkpoint names `encoder.*`; a full model's names `first_stage_model.encoder.*`.
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        self.first_stage_model.load_state_dict(sd, strict=True)

    @torch.no_grad()
    def zero_unused_token_rows(self, captions: list[str]) -> None:
        tokenizer = self.cond_stage_model.tokenizer
        used = torch.unique(tokenizer(list(captions) + [""], max_length=self.cond_stage_model.max_length))
        weight = self.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
        keep = torch.zeros(weight.shape[0], dtype=torch.bool)
        keep[used] = True
        weight[~keep] = 0.0
        if self.token_init_std is not None:
            weight[keep] = torch.randn(int(keep.sum()), weight.shape[1]) * self.token_init_std

    def train(self, mode: bool = True) -> LatentDiffusionTrainer:
        """Frozen parts stay in eval mode whatever Lightning asks (the original's `disabled_train`)."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_first_stage_encoding(self.encode_first_stage(images))

    def conditioning(self, captions: list[str], drop: bool) -> torch.Tensor:
        if drop and self.ucg_rate > 0:
            keep = torch.rand(len(captions)) >= self.ucg_rate
            captions = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        if self.cond_stage_trainable:
            return self.cond_stage_model.encode(list(captions))
        # A frozen text encoder gives a caption the same context every time: encode each distinct one once.
        missing = sorted({c for c in captions if c not in self._context_cache})
        if missing:
            for caption, context in zip(missing, self.get_learned_conditioning(missing), strict=True):
                self._context_cache[caption] = context
        return torch.stack([self._context_cache[c] for c in captions])

    def loss(self, batch: dict, drop_captions: bool) -> torch.Tensor:
        z0 = self.latents(batch[self.image_key])
        cond = self.conditioning(batch[self.caption_key], drop=drop_captions)
        t = torch.randint(0, self.num_timesteps, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        return F.mse_loss(self.apply_model(self.q_sample(z0, t, noise), t, cond), noise)

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        if self.global_step > 0 or loader is None:
            return
        batch = next(iter(loader))
        std = float(self.latents(batch[self.image_key].to(self.device)).std())
        self.print(
            f"latent std with scale_factor {self.scale_factor}: {std:.3f} (ideal 1; set scale_factor to "
            f"{self.scale_factor / std:.4f} for exactly 1)"
        )
        if not 0.67 < std < 1.5:
            warnings.warn(
                f"scaled latents have std {std:.3f}: set model.params.scale_factor to "
                f"{self.scale_factor / std:.4f} in the config (inference reads the same value)",
                stacklevel=1,
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, drop_captions=True)
        self.log("train/loss_simple", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator_state = torch.get_rng_state()
        torch.manual_seed(batch_idx)  # the same t and noise every validation: losses compare across epochs
        loss = self.loss(batch, drop_captions=False)
        torch.set_rng_state(generator_state)
        self.log("val/loss_simple", loss, prog_bar=True)

    def configure_optimizers(self) -> dict:
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        # No weight decay: the zeroed rows of unused tokens get no gradient and so stay exactly zero.
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        warmup = max(1, self.warmup_steps)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total is None or total <= warmup:
                return 1.0
            # cosine decay to 10% over the rest: the EMA then settles on a well-trained model
            progress = min(1.0, (step - warmup) / (total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
