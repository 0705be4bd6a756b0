"""Samplers: short pure functions over a denoiser and a sigma schedule (k-diffusion style), and their registry.

Here: `common` (conventions, step helpers, the eps-to-denoiser adapter), `ode`, `sde`, `schedules`, `registry`,
and `testbed` (exact answers for checking them); a sampler's function is `SAMPLERS[name].fn`.
Not here: the original's DDIM/PLMS classes (`ldm.models.diffusion`).
"""

from ldm.samplers.common import BrownianPath, Callback, Denoiser, ancestral_step, denoiser_from_eps
from ldm.samplers.registry import SAMPLERS, SamplerInfo, get_sampler
from ldm.samplers.schedules import (
    discrete_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigma_from_t,
    sigmas_from_alphas_cumprod,
    t_from_sigma,
)

__all__ = [
    "SAMPLERS",
    "BrownianPath",
    "Callback",
    "Denoiser",
    "SamplerInfo",
    "ancestral_step",
    "denoiser_from_eps",
    "discrete_sigmas",
    "exponential_sigmas",
    "get_sampler",
    "karras_sigmas",
    "sigma_from_t",
    "sigmas_from_alphas_cumprod",
    "t_from_sigma",
]
