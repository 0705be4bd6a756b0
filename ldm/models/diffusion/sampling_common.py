"""What DDIM and PLMS share: the step selection, the schedule at those steps, guidance, and the update.

Arithmetic mirrors the original CompVis samplers operation for operation (float32 schedule values,
the same noise draws in the same order), because those details decide the final image for a seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def ddim_timesteps(num_steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """The original's 'uniform' selection: every (T // S)-th step, shifted by one.

    It can yield more steps than asked (7 -> 8) and, for S in {3, 9, 27, 37, 111, 333, ...}, a step
    of T, past the end of the schedule, where the original crashes with an index error. We drop that
    one step instead, so those step counts run exactly S steps.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"number of sampling steps must be between 1 and {num_train_steps}, got {num_steps}")
    steps = np.arange(0, num_train_steps, num_train_steps // num_steps) + 1
    return steps[steps < num_train_steps]


@dataclass
class DDIMSchedule:
    """alpha-bar at the selected steps and at their predecessors, sigma for eta, all float32."""

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, eta: float) -> DDIMSchedule:
        ac = alphas_cumprod.detach().float().cpu()
        steps = ddim_timesteps(num_steps, len(ac))
        alphas = ac[steps]
        # The first step's predecessor is alpha-bar at t=0, not 1: the original's choice, kept.
        prev = torch.cat([ac[:1], ac[steps[:-1]]])
        a64, p64 = alphas.double(), prev.double()
        sigmas = eta * torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))
        # numpy's float32 sqrt, as the original computed this one: it is correctly rounded, while torch's
        # vectorised CPU sqrt can be one ulp off, which shifts pictures by a little.
        sqrt_one_minus = torch.from_numpy(np.sqrt(1.0 - alphas.numpy()))
        return cls(steps, alphas, prev, sigmas.float(), sqrt_one_minus)

    def to(self, device: torch.device) -> DDIMSchedule:
        return DDIMSchedule(
            self.timesteps,
            *(t.to(device) for t in (self.alphas, self.alphas_prev, self.sigmas, self.sqrt_one_minus_alphas)),
        )

    def at(self, index: int) -> tuple[torch.Tensor, ...]:
        """(alpha, alpha_prev, sigma, sqrt(1 - alpha)) at `index`, as [1, 1, 1] tensors.

        Not 0-d: torch divides by a 0-d tensor as a multiply by its reciprocal, which rounds
        differently from the original's true division by a per-sample tensor.
        """
        return tuple(
            t[index].reshape(1, 1, 1) for t in (self.alphas, self.alphas_prev, self.sigmas, self.sqrt_one_minus_alphas)
        )


def stochastic_encode(x0: torch.Tensor, s: DDIMSchedule, index: int, noise: torch.Tensor) -> torch.Tensor:
    """Noise clean latents to the level of the schedule's step `index`, as the original img2img does."""
    a_t, _, _, sqrt_one_minus_at = s.at(index)
    return a_t.sqrt() * x0 + sqrt_one_minus_at * noise


def guided_eps(
    model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Classifier-free guidance: one batched UNet call on [uncond, cond], then extrapolate."""
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    e_uncond, e_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_update(
    x: torch.Tensor, e_t: torch.Tensor, s: DDIMSchedule, index: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from the schedule's step `index` to the one before it; returns (x_prev, pred_x0)."""
    a_t, a_prev, sigma_t, sqrt_one_minus_at = s.at(index)
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
    return a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise, pred_x0


class DiscreteSampler:
    """Shared driver of the original's DDIM-family samplers; subclasses define `name` and `step`.

    Noise comes from torch's global generator unless one is given, drawn on the model's device,
    one latent-shaped tensor per DDIM update even when eta is 0, exactly as the original did.
    """

    name = "sampler"

    def __init__(self, model, generator: torch.Generator | None = None):
        self.model = model
        self.generator = generator

    def randn(self, shape, device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=device)

    def check_eta(self, eta: float) -> None:
        pass

    def reset(self) -> None:
        pass

    def step(
        self,
        x: torch.Tensor,
        index: int,
        t: torch.Tensor,
        t_next: torch.Tensor,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: DDIMSchedule,
    ):
        raise NotImplementedError

    def update(self, x: torch.Tensor, e_t: torch.Tensor, schedule: DDIMSchedule, index: int):
        return ddim_update(x, e_t, schedule, index, self.randn(x.shape, x.device))

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: torch.Tensor,
        eta: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: torch.Tensor | None = None,
        x_T: torch.Tensor | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        t_start: int | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise from `x_T` (or fresh noise of [batch_size, *shape]) in S steps; returns latents.

        img2img (the original's `decode`): `t_start` runs only the first `t_start` of the S steps, from
        `x_T` noised to that level. Inpainting (the original LDM's `mask`/`x0`): before every step the region
        where `mask` is 0 is replaced by the known latents `x0` noised to that step, so only mask-1 areas
        are generated.
        """
        self.check_eta(eta)
        if conditioning.shape[0] != batch_size:
            warnings.warn(f"got {conditioning.shape[0]} conditionings for a batch of {batch_size}", stacklevel=2)
        device = self.model.device
        schedule = DDIMSchedule.make(self.model.alphas_cumprod, S, eta).to(device)
        x = self.randn((batch_size, *shape), device) if x_T is None else x_T.to(device)

        def eps_fn(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            return guided_eps(
                self.model, x_, t_, conditioning, unconditional_conditioning, unconditional_guidance_scale
            )

        steps = schedule.timesteps if t_start is None else schedule.timesteps[:t_start]
        descending = steps[::-1]
        self.reset()
        for i, step in enumerate(tqdm(descending, desc=f"{self.name} sampler", disable=not progress, leave=False)):
            index = len(descending) - i - 1
            t = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                known = self.model.q_sample(x0, t, noise=self.randn(x0.shape, device))
                x = known * (1.0 - mask) + mask * x
            t_next = torch.full(
                (batch_size,), int(descending[min(i + 1, len(descending) - 1)]), device=device, dtype=torch.long
            )
            x, pred_x0 = self.step(x, index, t, t_next, eps_fn, schedule)
            if callback is not None:
                callback(i, x, pred_x0)
        return x
