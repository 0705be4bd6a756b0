"""Samplers: short pure functions over a denoiser and a sigma schedule (k-diffusion style), and their registry.

Here: `common` (conventions, step helpers, the eps-to-denoiser adapter), `ode`, `sde`, `schedules`, `registry`,
and `testbed` (exact answers for checking them). Not here: the original's DDIM/PLMS classes (`ldm.models.diffusion`).
"""

from ldm.samplers.common import BrownianPath, Callback, Denoiser, ancestral_step, denoiser_from_eps
from ldm.samplers.ode import (
    sample_ddim,
    sample_dpm2,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_lms,
    sample_plms_sigma,
    sample_unipc,
)
from ldm.samplers.registry import SAMPLERS, SamplerInfo, get_sampler
from ldm.samplers.schedules import (
    discrete_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigma_from_t,
    sigmas_from_alphas_cumprod,
    t_from_sigma,
)
from ldm.samplers.sde import (
    sample_dpm2_ancestral,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler_ancestral,
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
    "sample_ddim",
    "sample_dpm2",
    "sample_dpm2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms_sigma",
    "sample_unipc",
    "sigma_from_t",
    "sigmas_from_alphas_cumprod",
    "t_from_sigma",
]
