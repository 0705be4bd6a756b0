"""Text-to-image generation as the original txt2img does it, batch by batch, as a library.

The order of random draws is the original's, so a seed gives the original's image: after seeding,
an optional fixed start code, then per batch the start noise followed by the sampler's per-step draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_common import DiscreteSampler, guided_eps
from ldm.runtime import Runtime
from ldm.samplers.k_samplers import SAMPLERS as K_SAMPLERS
from ldm.samplers.k_samplers import SamplerInfo, denoiser_from_eps
from ldm.samplers.schedules import discrete_sigmas, karras_sigmas, sigmas_from_alphas_cumprod
from ldm.util import seed_everything

# The original's samplers, exact to its images; they run on the DDIM sub-schedule of the model's steps.
ORIGINAL_SAMPLERS: dict[str, type[DiscreteSampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler}
ORIGINAL_DESCRIPTIONS = {
    "ddim": "DDIM as the original txt2img runs it (--ddim_eta adds noise); 1 UNet call per step",
    "plms": "PLMS as the original txt2img runs it (--plms); 1 UNet call per step, 2 on the first",
}
# The k-diffusion-style solvers; their DDIM/PLMS reference versions are left to the tests.
SOLVERS: dict[str, SamplerInfo] = {k: v for k, v in K_SAMPLERS.items() if k not in ("ddim", "plms_sigma")}
SAMPLER_NAMES = (*ORIGINAL_SAMPLERS, *SOLVERS)
SCHEDULES = ("discrete", "karras")


def describe_samplers() -> str:
    """One line per sampler, for `--sampler list`."""
    lines = [f"{name:<13} {text}" for name, text in ORIGINAL_DESCRIPTIONS.items()]
    for name, info in SOLVERS.items():
        kind = "stochastic" if info.stochastic else f"order {info.order}"
        lines.append(f"{name:<13} {info.description} ({kind}, {info.evals_per_step} UNet call(s) per step)")
    return "\n".join(lines)


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
    schedule: str = "discrete"

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


def check_sampler(name: str, schedule: str = "discrete") -> None:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} (or --sampler list)")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if name in ORIGINAL_SAMPLERS and schedule != "discrete":
        raise ValueError(f"{name} runs the original's own step selection; --karras needs one of {', '.join(SOLVERS)}")


def solver_sigmas(model, steps: int, schedule: str, device: torch.device) -> torch.Tensor:
    """steps + 1 noise levels ending at 0: the model's own spacing, or Karras et al.'s over its range."""
    if schedule == "karras":
        trained = sigmas_from_alphas_cumprod(model.alphas_cumprod)
        return karras_sigmas(steps, float(trained[0]), float(trained[-1]), device=device)
    return discrete_sigmas(model.alphas_cumprod, steps, device=device)


def solve(
    model,
    s: SampleSettings,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    x_T: torch.Tensor,
    generator: torch.Generator,
    progress: bool,
) -> torch.Tensor:
    """Run a k-diffusion-style solver from unit noise `x_T`; guidance is applied inside the denoiser."""
    info = SOLVERS[s.sampler]
    sigmas = solver_sigmas(model, s.steps, s.schedule, x_T.device)
    denoiser = denoiser_from_eps(lambda x, t: guided_eps(model, x, t, cond, uncond, s.scale), model.alphas_cumprod)
    with tqdm(total=len(sigmas) - 1, desc=f"{s.sampler} sampler", disable=not progress, leave=False) as bar:
        return info.fn(
            denoiser, x_T * sigmas[0], sigmas, generator=generator, callback=lambda i, x, denoised: bar.update(1)
        )


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
    check_sampler(s.sampler, s.schedule)
    device = runtime.device
    sampler = ORIGINAL_SAMPLERS[s.sampler](model) if s.sampler in ORIGINAL_SAMPLERS else None
    seed_everything(s.seed)
    # Noise inside stochastic solvers comes from its own generator, so it never shifts the start noise.
    solver_noise = torch.Generator(device=device).manual_seed(s.seed)
    start_code = torch.randn((s.n_samples, *s.latent_shape), device=device) if s.fixed_code else None
    with runtime.autocast():
        for it in range(s.n_iter):
            for prompts in batches:
                n = len(prompts)
                uncond = model.get_learned_conditioning(s.n_samples * [""])[:n] if s.scale != 1.0 else None
                cond = model.get_learned_conditioning(list(prompts))
                x_T = start_code[:n] if start_code is not None else torch.randn((n, *s.latent_shape), device=device)
                if sampler is not None:
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
                else:
                    latents = solve(model, s, cond, uncond, x_T, solver_noise, progress)
                decoded = model.decode_first_stage(latents)
                yield BatchResult(it, list(prompts), cond, uncond, x_T, latents, decoded)
