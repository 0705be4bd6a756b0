"""Latent consistency distillation into a LoRA (Luo et al. 2023, "LCM-LoRA"): few-step sampling for a frozen model.

One training step, for latents z0 of a batch and their captions:

1. pick a step of the distillation grid (every `skip`-th of the 1000 training steps, the 50-step grid
   `ldm.samplers.lcm` samples on): t_{n+k} = grid[i], t_n = t_{n+k} - skip (0 at the bottom), and noise z0 to
   x_{n+k} at t_{n+k};
2. teacher (the frozen base UNet, LoRA off) with classifier-free guidance at scale `guidance` (empty prompt as the
   unconditional branch): one DDIM step from t_{n+k} to t_n gives x_n;
3. student (base + LoRA) at t_{n+k}: f(x_{n+k}) = c_skip x_{n+k} + c_out x0_hat, the consistency boundary
   conditions of `ldm.samplers.lcm.consistency_scalings`;
4. target: the same student, LoRA on, without gradient, at t_n on x_n (no EMA copy, as the LCM-LoRA recipe:
   the stop-gradient target moves with the LoRA);
5. loss: L2 (or pseudo-Huber) between student and target.

The guidance scale is fixed (or drawn uniformly per sample from `guidance: [low, high]`): the LoRA has no input
for it, so a range only trains it on the average of the targets. The result is used at `--scale 1`, one UNet
call per step, with the guidance of training baked in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ldm.samplers.lcm import ORIGINAL_STEPS, consistency_scalings
from ldm.training.lora import LoraTrainer


def ddim_solver_step(
    x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x0_hat): the deterministic DDIM step from alphas_cumprod `a_t` to `a_prev` with noise estimate eps."""
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def consistency_output(x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat, per sample of the batch (t: integer timesteps)."""
    c_skip, c_out = (c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) for c in consistency_scalings(t.float()))
    return c_skip * x + c_out * x0


class LcmLoraTrainer(LoraTrainer):
    """LoraTrainer whose loss is latent consistency distillation of its own frozen base model."""

    def __init__(
        self,
        *,
        guidance: float | Sequence[float] = 3.0,
        original_steps: int = ORIGINAL_STEPS,
        loss_type: str = "l2",
        huber_c: float = 0.001,
        **params: Any,
    ) -> None:
        params.update(ucg_rate=0.0)  # the student always sees the caption; the teacher's uncond is ""
        super().__init__(**params)
        low, high = (float(guidance), float(guidance)) if isinstance(guidance, int | float) else map(float, guidance)
        if not 1.0 <= low <= high:
            raise ValueError(f"guidance must be a scale >= 1 or a range [low, high], 1 <= low <= high, not {guidance}")
        if loss_type not in ("l2", "huber"):
            raise ValueError(f"loss_type must be l2 or huber, not {loss_type!r}")
        if self.num_timesteps % original_steps:
            raise ValueError(f"original_steps {original_steps} must divide the {self.num_timesteps} training steps")
        self.guidance = (low, high)
        self.skip = self.num_timesteps // original_steps
        self.register_buffer("grid", torch.arange(1, original_steps + 1) * self.skip - 1, persistent=False)
        self.loss_type, self.huber_c = loss_type, huber_c

    @contextmanager
    def lora_off(self) -> Iterator[None]:
        """The frozen base model: every LoRA layer's update scaled by 0 (exactly the base output)."""
        scales = {name: layer.scale for name, layer in self.lora_layers.items()}
        for layer in self.lora_layers.values():
            layer.scale = 0.0
        try:
            yield
        finally:
            for name, layer in self.lora_layers.items():
                layer.scale = scales[name]

    def guidance_scales(self, n: int, device: torch.device) -> torch.Tensor:
        low, high = self.guidance
        return low + (high - low) * torch.rand(n, device=device)

    def alpha(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def distillation_pair(
        self,
        z0: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        index: torch.Tensor,
        noise: torch.Tensor,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student output, target) for latents z0 at grid positions `index` with this noise and guidance."""
        start = self.grid[index]
        prev = (start - self.skip).clamp(min=0)
        x = self.q_sample(z0, start, noise)  # the steps below use alphas_cumprod, as ldm.samplers.lcm
        a_start, a_prev = self.alpha(start, x), self.alpha(prev, x)
        _, x0 = ddim_solver_step(x, self.apply_model(x, start, cond), a_start, a_prev)
        student = consistency_output(x, x0, start)
        with torch.no_grad():
            with self.lora_off():
                e_uncond, e_cond = self.apply_model(torch.cat([x, x]), torch.cat([start, start]),
                                                    torch.cat([uncond, cond])).chunk(2)  # fmt: skip
            w = scale.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            x_prev, _ = ddim_solver_step(x, e_uncond + w * (e_cond - e_uncond), a_start, a_prev)
            _, x0_prev = ddim_solver_step(x_prev, self.apply_model(x_prev, prev, cond), a_prev, a_prev)
            target = consistency_output(x_prev, x0_prev, prev)
        return student, target

    def loss(self, batch: dict, drop_captions: bool) -> torch.Tensor:
        z0 = self.latents(batch[self.image_key])
        n = z0.shape[0]
        cond = self.conditioning(batch[self.caption_key], drop=False)
        uncond = self.conditioning([""] * n, drop=False)
        index = torch.randint(0, len(self.grid), (n,), device=z0.device)
        student, target = self.distillation_pair(
            z0, cond, uncond, index, torch.randn_like(z0), self.guidance_scales(n, z0.device)
        )
        if self.loss_type == "huber":
            return (((student.float() - target.float()) ** 2 + self.huber_c**2).sqrt() - self.huber_c).mean()
        return F.mse_loss(student.float(), target.float())
