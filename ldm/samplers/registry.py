"""The sampler registry: every k-diffusion-style sampler by name, with what `--sampler list` and tooling need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ldm.samplers.lcm import sample_lcm
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
from ldm.samplers.sde import (
    sample_dpm2_ancestral,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler_ancestral,
)

# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerInfo:
    """What `--sampler list` shows and what tooling needs to know about a sampler.

    order: the deterministic solver's order of convergence in the step size (None for stochastic
    samplers); evals_per_step: denoiser calls per step (first/last steps may differ by one)."""

    name: str
    fn: Callable[..., Tensor]
    order: int | None
    stochastic: bool
    evals_per_step: int
    description: str


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("euler", sample_euler, 1, False, 1, "Euler on the probability-flow ODE (= DDIM, eta 0)"),
        SamplerInfo("heun", sample_heun, 2, False, 2, "Heun's 2nd-order method (Karras et al. 2022)"),
        SamplerInfo("dpm2", sample_dpm2, 2, False, 2, "DPM-Solver-2: midpoint in log-sigma"),
        SamplerInfo("lms", sample_lms, 4, False, 1, "linear multistep, order 4, on the uneven sigma grid"),
        SamplerInfo("dpmpp_2m", sample_dpmpp_2m, 2, False, 1, "DPM-Solver++(2M): 2nd-order multistep, x0-pred"),
        SamplerInfo("unipc", sample_unipc, 3, False, 1, "UniPC bh2: order-2 predictor + corrector (order 3)"),
        SamplerInfo("ddim", sample_ddim, 1, False, 1, "DDIM in the sigma form; eta > 0 adds noise"),
        SamplerInfo("plms_sigma", sample_plms_sigma, 2, False, 1, "PLMS (eps Adams-Bashforth + DDIM), reference"),
        SamplerInfo("euler_a", sample_euler_ancestral, None, True, 1, "Euler ancestral (fresh noise each step)"),
        SamplerInfo("dpm2_a", sample_dpm2_ancestral, None, True, 2, "DPM2 ancestral"),
        SamplerInfo("dpmpp_2s_a", sample_dpmpp_2s_ancestral, None, True, 2, "DPM-Solver++(2S) ancestral"),
        SamplerInfo("dpmpp_sde", sample_dpmpp_sde, None, True, 2, "DPM-Solver++ SDE, Brownian-path noise"),
        SamplerInfo("dpmpp_2m_sde", sample_dpmpp_2m_sde, None, True, 1, "DPM-Solver++(2M) SDE"),
        SamplerInfo("dpmpp_3m_sde", sample_dpmpp_3m_sde, None, True, 1, "DPM-Solver++ 3rd-order multistep SDE"),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for `name`, with the valid names in the error if there is none."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None


# Samplers that need a model distilled for them (LCM, or any SD v1 model with LCM-LoRA) and run on their own
# schedule with their own boundary conditions (`ldm.samplers.lcm`): not solvers of the plain diffusion ODE/SDE,
# so not in SAMPLERS, whose members work with any denoiser on any schedule.
CONSISTENCY_SAMPLERS: dict[str, SamplerInfo] = {
    "lcm": SamplerInfo(
        "lcm", sample_lcm, None, True, 1, "Latent Consistency multistep, for LCM-LoRA/LCM models: 2-8 steps, --scale 1"
    ),
}
