"""The LCM sampler against diffusers' LCMScheduler (an independent implementation), step for step."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from ldm.models.diffusion.ddpm import linear_schedule
from ldm.samplers.common import denoiser_from_eps
from ldm.samplers.lcm import consistency_denoiser, consistency_scalings, lcm_sigmas, lcm_timesteps, sample_lcm
from ldm.samplers.schedules import sigmas_from_alphas_cumprod, t_from_sigma

ALPHAS = linear_schedule(1000, 0.00085, 0.012)["alphas_cumprod"]


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a UNet whose output depends on both the latents and the timestep."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + torch.sin(tt / 150.0)) + 0.05 * x.roll(1, dims=-1)


def theirs(steps: int, strength: float = 1.0):
    s = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    s.set_timesteps(steps, strength=strength)
    return s


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_equal_diffusers(steps):
    assert lcm_timesteps(steps) == theirs(steps).timesteps.tolist()


@pytest.mark.parametrize(("steps", "strength"), [(2, 0.5), (4, 0.6), (3, 0.3)])
def test_img2img_timesteps_equal_diffusers(steps, strength):
    assert lcm_timesteps(steps, strength=strength) == theirs(steps, strength).timesteps.tolist()


def test_schedule_and_boundary_conditions_in_closed_form():
    assert torch.allclose(theirs(4).alphas_cumprod, ALPHAS)  # the same SD v1 schedule on both sides
    t = torch.tensor([0.0, 19.0, 999.0])
    c_skip, c_out = consistency_scalings(t)
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert torch.allclose(c_skip, 0.25 / ((10 * t) ** 2 + 0.25))
    assert torch.allclose(c_out, 10 * t / ((10 * t) ** 2 + 0.25).sqrt())
    sig = lcm_sigmas(ALPHAS, 4)
    assert sig[-1] == 0 and torch.allclose(sig[:-1].double(), sigmas_from_alphas_cumprod(ALPHAS)[lcm_timesteps(4)])


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sampling_equals_diffusers_step_for_step(steps):
    sched = theirs(steps)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    g_theirs = torch.Generator().manual_seed(3)
    expected_denoised = []
    sample = x_t.clone()
    for t in sched.timesteps:
        out = sched.step(eps_model(sample, t.expand(2)), t, sample, generator=g_theirs)
        sample = out.prev_sample
        expected_denoised.append(out.denoised)

    log_sigmas = sigmas_from_alphas_cumprod(ALPHAS).log()
    denoiser = consistency_denoiser(
        denoiser_from_eps(eps_model, ALPHAS, quantize=True), lambda s: t_from_sigma(s.cpu(), log_sigmas).round()
    )
    sigmas = lcm_sigmas(ALPHAS, steps)
    got_denoised = []
    x = x_t * (1 + sigmas[0].double() ** 2).sqrt().float()  # diffusers' x_t, in the variance-exploding form
    ours = sample_lcm(denoiser, x, sigmas, generator=torch.Generator().manual_seed(3),
                      callback=lambda i, x_, d: got_denoised.append(d))  # fmt: skip
    assert len(got_denoised) == steps
    for a, b in zip(got_denoised, expected_denoised, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def run_both(timesteps: list[int], boundary: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers on custom `timesteps` and ours on their sigmas, from the same start and noise."""
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(timesteps=timesteps)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sample, g = x_t.clone(), torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        sample = sched.step(eps_model(sample, t.expand(1)), t, sample, generator=g).prev_sample
    all_sigmas = sigmas_from_alphas_cumprod(ALPHAS)
    sigmas = torch.cat([all_sigmas[timesteps], torch.zeros(1, dtype=torch.float64)]).float()
    denoiser = denoiser_from_eps(eps_model, ALPHAS, quantize=True)
    if boundary:
        denoiser = consistency_denoiser(denoiser, lambda s: t_from_sigma(s.cpu(), all_sigmas.log()).round())
    x = x_t * (1 + sigmas[0].double() ** 2).sqrt().float()
    return sample_lcm(denoiser, x, sigmas, generator=torch.Generator().manual_seed(0)), sample


def test_boundary_conditions_where_they_matter():
    """On the usual grid (t >= 19) c_skip is below 1e-5, so check them down to t = 1, where they dominate: with
    them ours equals diffusers, without them it does not."""
    ours, expected = run_both([999, 499, 99, 9, 2, 1])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    without, expected = run_both([999, 499, 99, 9, 2, 1], boundary=False)
    assert (without - expected).abs().max() > 1e-2


def test_bad_step_counts_are_clear_errors():
    with pytest.raises(ValueError, match="LCM takes 1 to 50 steps"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match="below strength"):
        lcm_timesteps(8, strength=0.1)
