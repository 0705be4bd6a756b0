"""Text-to-image generation as the original txt2img does it, batch by batch, as a library.

The order of random draws is the original's, so a seed gives the original's image: after seeding,
an optional fixed start code, then per batch the start noise followed by the sampler's per-step draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_common import DiscreteSampler
from ldm.runtime import Runtime
from ldm.util import seed_everything

SAMPLERS: dict[str, type[DiscreteSampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler}


@dataclass
class SampleSettings:
    steps: int = 50
    sampler: str = "plms"
    eta: float = 0.0
    scale: float = 7.5
    height: int = 512
    width: int = 512
    channels: int = 4
    factor: int = 8
    n_samples: int = 1
    n_iter: int = 1
    seed: int = 42
    fixed_code: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height // self.factor, self.width // self.factor)


@dataclass
class BatchResult:
    iteration: int
    prompts: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor | None
    x_T: torch.Tensor
    latents: torch.Tensor
    decoded: torch.Tensor


def make_sampler(name: str, model) -> DiscreteSampler:
    try:
        return SAMPLERS[name](model)
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def prompt_batches(prompts: Sequence[str], batch_size: int) -> list[list[str]]:
    """Group prompts into batches of `batch_size` (the last may be shorter)."""
    return [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


@torch.no_grad()
def generate(
    model, batches: Sequence[Sequence[str]], s: SampleSettings, runtime: Runtime, progress: bool = True
) -> Iterator[BatchResult]:
    """Yield one decoded batch at a time: n_iter passes over `batches`.

    A short last batch (prompts from a file not filling n_samples) samples as many images as it has
    prompts; the original crashed there.
    """
    sampler = make_sampler(s.sampler, model)
    device = runtime.device
    seed_everything(s.seed)
    start_code = torch.randn((s.n_samples, *s.latent_shape), device=device) if s.fixed_code else None
    with runtime.autocast():
        for it in range(s.n_iter):
            for prompts in batches:
                n = len(prompts)
                uncond = model.get_learned_conditioning(s.n_samples * [""])[:n] if s.scale != 1.0 else None
                cond = model.get_learned_conditioning(list(prompts))
                x_T = start_code[:n] if start_code is not None else torch.randn((n, *s.latent_shape), device=device)
                latents = sampler.sample(
                    s.steps,
                    n,
                    s.latent_shape,
                    cond,
                    eta=s.eta,
                    unconditional_guidance_scale=s.scale,
                    unconditional_conditioning=uncond,
                    x_T=x_T,
                    progress=progress,
                )
                decoded = model.decode_first_stage(latents)
                yield BatchResult(it, list(prompts), cond, uncond, x_T, latents, decoded)
