"""The samplers of `ldm.samplers` proven on Gaussian data, where the denoiser and the probability-flow
ODE have closed forms (`ldm.samplers.testbed`): deterministic samplers converge to the exact ODE
solution at their theoretical order, stochastic samplers reproduce the data distribution, and the
same seed gives the same samples.

Where errors are measured: the order tests use schedules that stop at sigma_min (no final 0) and
compare with the exact flow to sigma_min. The usual last step, sigma_min -> 0, lands on
D(x; sigma_min) for most samplers, which differs from the ODE's endpoint by a fixed amount that does
not shrink with more steps (about 1e-3 here), so at sigma = 0 every slope would flatten onto that
floor. `docs/samplers.md` (from `scripts/sampler_table.py`) has the errors at sigma = 0 as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from ldm.models.diffusion.sampling_common import ddim_timesteps
from ldm.samplers import (
    SAMPLERS,
    BrownianPath,
    ancestral_step,
    denoiser_from_eps,
    discrete_sigmas,
    exponential_sigmas,
    get_sampler,
    karras_sigmas,
    sigma_from_t,
    sigmas_from_alphas_cumprod,
    t_from_sigma,
)
from ldm.samplers.common import lms_coefficients, phi
from ldm.samplers.testbed import (
    DTYPE,
    SD_ALPHAS_CUMPROD,
    SIGMA_MAX,
    SIGMA_MIN,
    GaussianMixtureTestbed,
    GaussianTestbed,
    GuidedGaussianTestbed,
    convergence,
    discrete,
    final_step_floor,
    fitted_order,
    karras,
    ode_error,
    original_plms,
    rk4_flow,
    sd_sigma_at,
    sde_moments,
)

torch.set_num_threads(1)

ORDER_STEPS = [8, 11, 16, 23, 32, 45, 64]

# (sampler, options) -> the order the fitted slope over ORDER_STEPS must reach (within 0.3).
# Stochastic samplers at eta = 0 are ODE solvers too, and are held to their drift's order.
# lms: nominally 4; over 8..64 steps it shows ~3.3, and asymptotically 2, because its first steps
# run at orders 1, 2, 3 (the Euler first step's O(h^2) local error dominates in the end; local
# slopes 3.6, 3.4, 2.8, 2.3, 2.1, 2.0 from 32 to 2048 steps). The same holds for dpmpp_3m_sde
# (~3.2 here). UniPC's corrector lifts its order-2 predictor to 3 from the first step on.
EXPECTED_ORDER = {
    ("euler", ()): 1,
    ("ddim", ()): 1,
    ("heun", ()): 2,
    ("dpm2", ()): 2,
    ("lms", ()): 3,
    ("plms_sigma", ()): 2,
    ("dpmpp_2m", ()): 2,
    ("unipc", ()): 3,
    ("unipc", (("order", 1),)): 2,
    ("unipc", (("order", 3),)): 4,
    ("unipc", (("variant", "bh1"),)): 3,
    ("euler_a", (("eta", 0.0),)): 1,
    ("dpm2_a", (("eta", 0.0),)): 2,
    ("dpmpp_2s_a", (("eta", 0.0),)): 2,
    ("dpmpp_sde", (("eta", 0.0),)): 2,
    ("dpmpp_2m_sde", (("eta", 0.0),)): 2,
    ("dpmpp_3m_sde", (("eta", 0.0),)): 3,
}

STOCHASTIC = [name for name, info in SAMPLERS.items() if info.stochastic]


# ----------------------------------------------------------------------------------------- test bed


def test_testbed_denoiser_and_flow_are_exact():
    """The closed forms against brute force: D is the posterior mean (regression of x0 on x over
    many joint draws), and the flow solves dx/dsigma = (x - D) / sigma (finite differences)."""
    bed = GaussianTestbed.default()
    g = torch.Generator().manual_seed(0)
    sigma = 0.7
    # Posterior mean of a Gaussian pair = the linear regression of x0 on x.
    x0 = bed.sample(200000, 0.0, g)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=DTYPE)
    xc, x0c = x - x.mean(0), x0 - x0.mean(0)
    coef = torch.linalg.lstsq(xc, x0c).solution
    probe = bed.sample(5, sigma, g)
    regression = x0.mean(0) + (probe - x.mean(0)) @ coef
    torch.testing.assert_close(bed.denoiser(probe, torch.full((5,), sigma, dtype=DTYPE)), regression, atol=0.03, rtol=0)
    # The flow: d/dsigma of flow(x, s0, s) equals (x_s - D(x_s; s)) / s.
    start = bed.sample(8, 3.0, g)
    for s in (2.0, 0.5, 0.05):
        ds = 1e-6
        slope = (bed.flow(start, 3.0, s + ds) - bed.flow(start, 3.0, s - ds)) / (2 * ds)
        xs = bed.flow(start, 3.0, s)
        torch.testing.assert_close(slope, (xs - bed.denoiser(xs, torch.tensor(s))) / s, atol=1e-7, rtol=1e-7)
    # The flow maps the sigma marginal onto the sigma' marginal.
    moved = bed.flow(bed.sample(200000, 5.0, g), 5.0, 0.0)
    mean_err, cov_err = bed.moment_errors(moved)
    assert mean_err < 0.02 and cov_err < 0.02


# ----------------------------------------------------------------------------------------- schedules


def test_schedules():
    sig = sigmas_from_alphas_cumprod(SD_ALPHAS_CUMPROD)
    assert math.isclose(SIGMA_MIN, 0.0292, abs_tol=1e-4) and math.isclose(SIGMA_MAX, 14.6146, abs_tol=1e-3)
    log_sig = sig.log()
    # discrete: n + 1 values, the model's end points, a final 0, integer t reproduces the table.
    d = discrete_sigmas(SD_ALPHAS_CUMPROD, 1000, dtype=torch.float64)
    assert len(d) == 1001 and d[-1] == 0
    torch.testing.assert_close(d[:-1], sig.flip(0), rtol=1e-12, atol=0)
    d10 = discrete_sigmas(SD_ALPHAS_CUMPROD, 10, dtype=torch.float64)
    assert len(d10) == 11 and math.isclose(d10[0], SIGMA_MAX) and math.isclose(d10[-2], SIGMA_MIN)
    # Between integer steps, sigma is interpolated in log-sigma.
    t = torch.tensor([0.0, 0.25, 10.5, 998.9, 999.0], dtype=DTYPE)
    s = sigma_from_t(t, log_sig)
    torch.testing.assert_close(s[2].log(), (log_sig[10] + log_sig[11]) / 2)
    torch.testing.assert_close(t_from_sigma(s, log_sig), t)  # exact inverse
    assert t_from_sigma(torch.tensor([1e-4, 100.0]), log_sig).tolist() == [0.0, 999.0]  # clamped
    # Karras: end points, rho = 7 spacing, decreasing, final 0.
    k = karras_sigmas(5, 0.1, 10.0, dtype=torch.float64)
    assert len(k) == 6 and k[-1] == 0 and math.isclose(k[0], 10.0) and math.isclose(k[-2], 0.1)
    assert bool((k[:-1].diff() < 0).all())
    torch.testing.assert_close(k[:-1] ** (1 / 7), torch.linspace(10 ** (1 / 7), 0.1 ** (1 / 7), 5, dtype=DTYPE))
    e = exponential_sigmas(5, 0.1, 10.0, dtype=torch.float64)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((4,), -math.log(100) / 4, dtype=DTYPE))
    assert karras_sigmas(3, 0.1, 1.0, append_zero=False).dtype == torch.float32
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.1, 1.0)


def test_denoiser_from_eps_round_trip():
    """An eps model built from the exact denoiser, in the DDPM convention (input x_t = sqrt(a) x0 +
    sqrt(1-a) eps at continuous t), comes back as the exact denoiser."""
    bed = GaussianTestbed.default()
    log_sig = sigmas_from_alphas_cumprod(SD_ALPHAS_CUMPROD).log()

    def eps_model(x_t, t):
        sigma = sigma_from_t(t.double(), log_sig).reshape(-1, 1)
        x = x_t * (1 + sigma**2).sqrt()  # back to the VE form x0 + sigma eps
        return (x - bed.denoiser(x, sigma.flatten())) / sigma

    den = denoiser_from_eps(eps_model, SD_ALPHAS_CUMPROD)
    x = bed.sample(6, 2.0, torch.Generator().manual_seed(1))
    sigma = torch.tensor([14.0, 3.3, 2.0, 0.5, 0.1, 0.03], dtype=DTYPE)
    torch.testing.assert_close(den(x, sigma), bed.denoiser(x, sigma), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- building blocks


def test_lms_coefficients_integrate_polynomials_exactly():
    nodes = [0.9, 1.3, 2.0, 3.1]
    for k in range(1, 5):
        w = lms_coefficients(nodes[:k], 0.9, 0.4)
        for p in range(k):  # int_0.9^0.4 s^p ds
            exact = (0.4 ** (p + 1) - 0.9 ** (p + 1)) / (p + 1)
            assert math.isclose(sum(wj * nj**p for wj, nj in zip(w, nodes[:k], strict=True)), exact, rel_tol=1e-12)


def test_phi_functions():
    """phi_k(-h) h^k = int_0^1 e^(-h(1-t)) t^(k-1) / (k-1)! dt, series and recurrence branches alike."""
    x, wq = np.polynomial.legendre.leggauss(30)
    t = (x + 1) / 2
    for k in (1, 2, 3, 4):
        for h in (1e-6, 0.3, 0.999, 1.001, 2.5, 8.0):
            quad = float(np.sum(wq / 2 * np.exp(-h * (1 - t)) * t ** (k - 1))) / math.factorial(k - 1)
            assert math.isclose(phi(k, -h), quad, rel_tol=1e-10), (k, h)


def test_ancestral_step():
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert math.isclose(down**2 + up**2, 1.0) and math.isclose(down, 0.5)  # eta 1: down = sigma_next^2 / sigma
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0, 1.0) == (0.0, 0.0)
    assert ancestral_step(2.0, 1.9, 100.0)[1] == 1.9  # never more noise than the target level


def test_brownian_path_statistics():
    """Increments are standard normal, overlapping ones correlate as sqrt(overlap ratio), disjoint
    ones not at all, and a bridge value between known points has the right law: whatever the
    query order."""
    like = torch.zeros(200000, dtype=DTYPE)
    path = BrownianPath(like, torch.Generator().manual_seed(0))
    a = path.increment(2.0, 1.5)  # sub-step, as dpmpp_sde asks
    b = path.increment(2.0, 0.8)  # full step
    c = path.increment(0.8, 0.3)  # next step
    mid = path(1.1)  # bridge between 1.5 and 0.8, asked for last
    for z in (a, b, c):
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    corr = float((a * b).mean())
    assert abs(corr - math.sqrt(0.5 / 1.2)) < 0.01
    assert abs(float((b * c).mean())) < 0.01
    w2 = path(2.0)
    assert abs(float((mid - w2).var()) - 0.9) < 0.02  # Var(W(1.1) - W(2.0)) = 0.9
    assert path(1.1) is mid  # a known time is never re-drawn


def test_registry():
    assert get_sampler("dpmpp_2m").fn is SAMPLERS["dpmpp_2m"].fn
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope")
    for name, info in SAMPLERS.items():
        assert info.name == name and info.description and info.evals_per_step in (1, 2)
        assert (info.order is None) == info.stochastic


# ----------------------------------------------------------------------------------------- identities


def _run(name, sigmas, seed=0, n=64, **options):
    bed = GaussianTestbed.default()
    x = bed.sample(n, float(sigmas[0]), torch.Generator().manual_seed(seed))
    return SAMPLERS[name].fn(bed.denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed + 1), **options)


@pytest.mark.parametrize(
    "a, opts_a, b, opts_b",
    [
        ("ddim", {}, "euler", {}),  # DDIM is Euler in the sigma form
        ("ddim", {"eta": 1.0}, "euler_a", {}),  # DDIM's eta is the ancestral split
        ("dpmpp_2m_sde", {"eta": 0.0}, "dpmpp_2m", {}),
        ("dpmpp_sde", {"eta": 0.0}, "dpmpp_2s_a", {"eta": 0.0}),  # r = 1/2: the same single-step solver
        ("dpm2_a", {"eta": 0.0}, "dpm2", {}),
        ("unipc", {"use_corrector": False}, "dpmpp_2m", {}),  # UniP-2 bh2 is DPM-Solver++(2M)
    ],
)
def test_sampler_identities(a, opts_a, b, opts_b):
    sig = karras(12)
    torch.testing.assert_close(_run(a, sig, **opts_a), _run(b, sig, **opts_b), rtol=1e-10, atol=1e-10)


def test_evaluation_counts_and_callback():
    """Heun and DPM2 skip their second evaluation on the step to 0; callbacks see every step."""
    bed = GaussianTestbed.default()
    expected = {"heun": 19, "dpm2": 19, "dpm2_a": 19, "dpmpp_2s_a": 19, "dpmpp_sde": 19, "plms_sigma": 11}
    for name, info in SAMPLERS.items():
        calls, steps = [], []

        def den(x, sigma, calls=calls):
            assert sigma.shape == (x.shape[0],)
            calls.append(float(sigma[0]))
            return bed.denoiser(x, sigma)

        x = bed.sample(3, SIGMA_MAX, torch.Generator().manual_seed(0))

        def record(i, x, denoised, steps=steps):
            steps.append(i)

        info.fn(den, x, karras(10), generator=torch.Generator().manual_seed(0), callback=record)
        assert len(calls) == expected.get(name, 10), name
        assert steps == list(range(10)), name


def test_float32_and_partial_schedules():
    """float32 runs (SD's dtype) agree with float64 to float32 accuracy; a schedule that stops above 0
    returns x at its last sigma (img2img-style partial runs and the order tests rely on it)."""
    bed = GaussianTestbed.default()
    x = bed.sample(16, SIGMA_MAX, torch.Generator().manual_seed(0))
    sig32 = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)

    def den32(x, sigma):
        return bed.denoiser(x.double(), sigma.double()).float()

    for name in ("dpmpp_2m", "unipc", "lms", "heun"):
        out32 = SAMPLERS[name].fn(den32, x.float(), sig32)
        out64 = SAMPLERS[name].fn(bed.denoiser, x, sig32.double())
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)
    partial = torch.tensor([2.0, 1.5], dtype=DTYPE)
    d = bed.denoiser(x, torch.full((16,), 2.0, dtype=DTYPE))
    torch.testing.assert_close(SAMPLERS["euler"].fn(bed.denoiser, x, partial), x + (x - d) / 2.0 * -0.5)
    for bad in ([1.0, 2.0, 0.0], [2.0, 0.0, 0.0], [2.0, -1.0], [[2.0, 1.0]]):
        with pytest.raises(ValueError):
            SAMPLERS["euler"].fn(bed.denoiser, x, torch.tensor(bad, dtype=DTYPE))


# ----------------------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("key", list(EXPECTED_ORDER), ids=lambda k: k[0] + "".join(f"-{a}={v}" for a, v in k[1]))
def test_order_of_convergence(key):
    name, opts = key
    errors = convergence(name, ORDER_STEPS, **dict(opts))
    order = fitted_order(ORDER_STEPS, errors)
    expected = EXPECTED_ORDER[key]
    assert order >= expected - 0.3, f"{name}{opts}: fitted order {order:.2f}, expected {expected}; errors {errors}"
    assert order <= expected + 0.6, f"{name}{opts}: fitted order {order:.2f} above {expected}: update the table"
    # Monotone-ish: every doubling of the steps helps, and the last error is small.
    assert all(b < a * 1.05 for a, b in zip(errors, errors[2:], strict=False)), errors
    assert errors[-1] < 0.05


def test_registry_orders_match_measurements():
    for name, info in SAMPLERS.items():
        if info.order is not None and name != "lms":  # lms: see EXPECTED_ORDER
            assert EXPECTED_ORDER[(name, ())] == info.order, name


def test_endpoint_at_zero_converges_to_the_final_step_floor():
    """With the final 0 kept, the error of a D-landing sampler tends to the fixed gap between
    D(x(sigma_min); sigma_min) and the ODE's endpoint x(0) (the floor), not to 0."""
    floor = final_step_floor()
    assert 5e-4 < floor < 2e-3
    err = ode_error("unipc", karras(200))
    assert abs(err - floor) < 0.05 * floor


def test_dpmpp_2m_at_20_steps_vs_plms_at_50():
    """The issue's benchmark: DPM-Solver++(2M) on Karras sigmas at 20 steps against PLMS on the
    model's discrete schedule at 50, both measured against the exact ODE endpoint at sigma = 0.

    On this test bed the claim that 2M@20 beats PLMS@50 does NOT hold: the Gaussian's ODE is
    nearly a polynomial in sigma below sigma ~ 0.3, which PLMS's sigma-space Adams steps integrate
    almost exactly while 2M's lambda-space steps do not (see docs/samplers.md). What does hold,
    and is asserted: 2M@20 beats the old default DDIM@50, and UniPC@20 beats 2M@20. The numbers
    measured when this was written: 2M@20 2.2e-2, PLMS@50 3.9e-4, DDIM@50 5.7e-2, UniPC@20 8.6e-3.
    """
    dpmpp = ode_error("dpmpp_2m", karras(20))
    plms = ode_error("plms_sigma", discrete(50))
    ddim = ode_error("ddim", discrete(50))
    unipc = ode_error("unipc", karras(20))
    assert dpmpp < ddim / 2
    assert unipc < dpmpp / 2
    assert plms < dpmpp  # the documented finding; if this flips, update docs/samplers.md
    for value, expected in ((dpmpp, 2.2e-2), (plms, 3.9e-4), (ddim, 5.7e-2), (unipc, 8.6e-3)):
        assert expected / 1.2 < value < expected * 1.2


# ----------------------------------------------------------------------------------------- stochastic samplers


@pytest.mark.parametrize("name", STOCHASTIC + ["ddim"])
def test_stochastic_samplers_reproduce_the_data_distribution(name):
    """20000 samples at 100 Karras steps from N(0, sigma_max^2 I): mean within 0.05 of mu (Monte Carlo
    error ~0.013 plus a 0.007 bias from the start: the true start has mean mu), covariance within
    10% (Frobenius) of Sigma (Monte Carlo ~2%)."""
    opts = {"eta": 1.0} if name == "ddim" else {}
    mean_err, cov_err = sde_moments(name, karras(100), **opts)
    assert mean_err < 0.05, mean_err
    assert cov_err < 0.1, cov_err


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seed_determinism(name):
    sig = karras(8)
    bed = GaussianTestbed.default()
    x = bed.sample(64, SIGMA_MAX, torch.Generator().manual_seed(3))
    fn = SAMPLERS[name].fn
    a = fn(bed.denoiser, x, sig, generator=torch.Generator().manual_seed(10))
    b = fn(bed.denoiser, x, sig, generator=torch.Generator().manual_seed(10))
    c = fn(bed.denoiser, x, sig, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # All of the noise comes from the generator: the global RNG's state does not matter.
    torch.manual_seed(0)
    d = fn(bed.denoiser, x, sig, generator=torch.Generator().manual_seed(10))
    torch.manual_seed(1)
    assert torch.equal(d, a) and torch.equal(fn(bed.denoiser, x, sig, generator=torch.Generator().manual_seed(10)), a)


def test_noise_scale_options():
    """s_noise = 0 leaves only the drift: for this affine problem that is the exact output mean."""
    bed = GaussianTestbed.default()
    sig = karras(30)
    zero = torch.zeros(1, bed.dim, dtype=DTYPE)
    for name in STOCHASTIC:
        mean = SAMPLERS[name].fn(bed.denoiser, zero, sig, s_noise=0.0)
        assert (mean[0] - bed.mean).norm() < 0.02, name


# ----------------------------------------------------------------------------------------- mixture bed, original PLMS


def _single_component(bed: GaussianTestbed, flow_steps: int = 1000) -> GaussianMixtureTestbed:
    return GaussianMixtureTestbed(
        torch.ones(1, dtype=DTYPE), bed.mean[None], bed.eigvals[None], bed.eigvecs[None], flow_steps=flow_steps
    )


def test_mixture_denoiser_is_tweedie():
    """D(x; sigma) = x + sigma^2 grad_x log p_sigma(x), the gradient by autograd of `log_density`,
    at sigmas from below sigma_min to sigma_max, on points near the data and far from it."""
    bed = GaussianMixtureTestbed.image_like(d=8, k=8, seed=0)
    g = torch.Generator().manual_seed(0)
    for sigma in (0.01, SIGMA_MIN, 0.1, 0.5, 2.0, SIGMA_MAX):
        x = bed.sample(32, sigma, g).requires_grad_(True)
        s = torch.full((32,), sigma, dtype=DTYPE)
        (grad,) = torch.autograd.grad(bed.log_density(x, s).sum(), x)
        with torch.no_grad():
            torch.testing.assert_close(bed.denoiser(x, s), x + sigma**2 * grad, rtol=1e-9, atol=1e-9 * max(1, sigma))


def test_mixture_flow_reference():
    """One component: the RK4 reference equals the Gaussian's closed-form flow to ~1e-8, to sigma_min
    and to 0. Eight components (no closed form): each doubling of its steps changes it ~16x less than
    the one before (order 4; measured 1.8e-5, 1.2e-6, 7.9e-8 from 125 to 1000 steps), so the default
    1000 steps are within ~1e-8 of the limit."""
    gauss = GaussianTestbed.default()
    one = _single_component(gauss)
    x = gauss.sample(64, SIGMA_MAX, torch.Generator().manual_seed(0))
    for end in (SIGMA_MIN, 0.0):
        torch.testing.assert_close(one.flow(x, SIGMA_MAX, end), gauss.flow(x, SIGMA_MAX, end), rtol=0, atol=1e-8)
    mix = GaussianMixtureTestbed.image_like(d=8, k=8, seed=0)
    x = mix.sample(16, SIGMA_MAX, torch.Generator().manual_seed(1))
    sols = []
    for steps in (125, 250, 500, 1000):
        mix.flow_steps = steps
        sols.append(mix.flow(x, SIGMA_MAX, 0.0))
    diffs = [(a - b).abs().max().item() for a, b in zip(sols, sols[1:], strict=False)]
    assert all(b < a / 8 for a, b in zip(diffs, diffs[1:], strict=False)), diffs
    assert diffs[-1] < 2e-7, diffs


@pytest.mark.parametrize("steps", [10, 50])
def test_original_plms_matches_plms_sigma_on_its_grid(steps):
    """The original CompVis PLMS (`ldm.models.diffusion.plms`, float32, VP form, through an eps model
    built from the exact denoiser) and `plms_sigma` (float64, sigma form) on the same grid: the
    original's timesteps then sigma_min. They agree to float32 rounding (measured <= 4.3e-7 relative),
    on both beds; ending the grid at 0 instead would differ by 3e-3..0.6."""
    ts = ddim_timesteps(steps)[::-1].tolist()
    grid = torch.tensor([sd_sigma_at(t) for t in ts] + [sd_sigma_at(0)], dtype=DTYPE)
    for bed in (GaussianTestbed.default(), GaussianMixtureTestbed.image_like(d=8, k=8, seed=0)):
        x = bed.sample(32, float(grid[0]), torch.Generator().manual_seed(0))
        ours = SAMPLERS["plms_sigma"].fn(bed.denoiser, x, grid)
        orig = original_plms(bed, x, steps).double()
        rel = ((orig - ours).norm(dim=-1) / ours.norm(dim=-1)).max().item()
        assert rel < 2e-6, rel


def _mixture_moments(bed: GaussianMixtureTestbed, sigma: float) -> tuple[Tensor, Tensor]:
    comp_cov = torch.einsum("kde,ke,kfe->kdf", bed.eigvecs, bed.eigvals, bed.eigvecs)
    mean = bed.weights @ bed.means
    second = torch.einsum("k,kdf->df", bed.weights, comp_cov + bed.means[:, :, None] * bed.means[:, None, :])
    return mean, second - torch.outer(mean, mean) + sigma**2 * torch.eye(bed.dim, dtype=DTYPE)


def test_mixture_sample_moments():
    """200000 draws: mean within 0.01 of sum w_k m_k (Monte Carlo ~0.003) and covariance within 2%
    (Frobenius) of sum w_k (C_k + m_k m_k^T) - mean mean^T + sigma^2 I (Monte Carlo ~0.5%)."""
    bed = GaussianMixtureTestbed.image_like(d=8, k=8, seed=0)
    g = torch.Generator().manual_seed(0)
    for sigma in (0.0, 0.5):
        xs = bed.sample(200000, sigma, g)
        mean, cov = _mixture_moments(bed, sigma)
        assert (xs.mean(0) - mean).norm() < 0.01
        assert (torch.cov(xs.T) - cov).norm() / cov.norm() < 0.02


# ----------------------------------------------------------------------------------------- guided bed


def test_guided_flow_is_exact():
    """The closed form (plus quadrature) against a fine RK4 solve of dx/dsigma = (x - D) / sigma with the
    guided denoiser, to sigma_min and across an inner interval; at scale 1 it is the conditional Gaussian's
    own closed-form flow."""
    bed = GuidedGaussianTestbed.image_like(seed=0)
    x = bed.sample(8, SIGMA_MAX, torch.Generator().manual_seed(0))
    for s0, s1 in ((SIGMA_MAX, SIGMA_MIN), (2.0, 0.05)):
        exact = bed.flow(x, s0, s1)
        torch.testing.assert_close(rk4_flow(bed.denoiser, x, s0, s1, 4000), exact, rtol=0, atol=1e-8)
    cond = GuidedGaussianTestbed(bed.q, bed.lu, bed.lc, bed.mu, bed.mc, scale=1.0)
    plain = GaussianTestbed(bed.mc @ bed.q.T, bed.lc, bed.q)
    torch.testing.assert_close(cond.flow(x, SIGMA_MAX, 0.0), plain.flow(x, SIGMA_MAX, 0.0), rtol=0, atol=1e-10)
    torch.testing.assert_close(cond.denoiser(x, torch.tensor(0.3)), plain.denoiser(x, torch.tensor(0.3)))


def test_dpmpp_2m_at_20_vs_original_plms_at_50_under_guidance():
    """SD samples with guidance 7.5. On the guided bed (five seeds, 64 start points each), at sigma = 0:
    2M@20 on Karras sigmas is about as accurate as the original PLMS@50 but never better (measured RMS
    ratios 2M/PLMS 1.00, 1.00, 1.07, 1.03, 1.57 rounded, seeds 0-4); UniPC@20 on Karras sigmas beats the
    original PLMS@50 on every seed (ratios 0.67-0.89); both beat DDIM@50. See docs/samplers.md."""
    for seed in range(5):
        bed = GuidedGaussianTestbed.image_like(seed=seed)
        s0 = sd_sigma_at(int(ddim_timesteps(50)[-1]))
        x = bed.sample(64, s0, torch.Generator().manual_seed(0))
        plms = (original_plms(bed, x, 50).double() - bed.flow(x, s0, 0.0)).pow(2).sum(-1).mean().sqrt().item()
        dpmpp = ode_error("dpmpp_2m", karras(20), bed=bed, n=64)
        unipc = ode_error("unipc", karras(20), bed=bed, n=64)
        ddim = ode_error("ddim", discrete(50), bed=bed, n=64)
        assert dpmpp < ddim and unipc < ddim
        assert 0.95 < dpmpp / plms < 2.0, (seed, dpmpp, plms)  # the documented finding: 2M@20 does not win
        assert unipc < 0.95 * plms, (seed, unipc, plms)


def test_dpmpp_2m_at_20_vs_original_plms_at_50_on_mixtures():
    """On the image-like mixtures (seeds 0-4, 256 start points each, errors at sigma = 0 against the RK4
    reference): 2M@20 on Karras sigmas beats the original PLMS@50 in the median error on every seed
    (measured 2M/PLMS 0.57-0.70), and so it does in RMS once the misses (endpoints more than 0.5 from the
    reference: in another mixture component) are left out (0.60-0.65). Counting them, it wins in RMS
    only on seeds 0 and 1 (0.65, 0.63; seeds 2-4 2.8-4.8x worse): 2M misses 0, 0, 2, 3, 1 of 256, the
    original PLMS 0, 0, 0, 1, 0. See docs/samplers.md."""
    s0 = sd_sigma_at(int(ddim_timesteps(50)[-1]))
    rms_ratios, misses = [], []
    for seed in range(5):
        bed = GaussianMixtureTestbed.image_like(d=8, k=8, seed=seed)
        x = bed.sample(256, s0, torch.Generator().manual_seed(0))
        plms = (original_plms(bed, x, 50).double() - bed.flow(x, s0, 0.0)).norm(dim=-1)
        x = bed.sample(256, SIGMA_MAX, torch.Generator().manual_seed(0))
        dpmpp = (SAMPLERS["dpmpp_2m"].fn(bed.denoiser, x, karras(20)) - bed.flow(x, SIGMA_MAX, 0.0)).norm(dim=-1)
        assert dpmpp.median() < 0.8 * plms.median(), seed
        rms = [d.pow(2).mean().sqrt() for d in (dpmpp, plms)]
        clean = [d[d <= 0.5].pow(2).mean().sqrt() for d in (dpmpp, plms)]
        assert clean[0] < 0.75 * clean[1], (seed, clean)
        rms_ratios.append((rms[0] / rms[1]).item())
        misses.append((int((dpmpp > 0.5).sum()), int((plms > 0.5).sum())))
    assert all(m <= 3 and p <= 1 for m, p in misses), misses
    # the documented split: where 2M misses, its RMS loses
    assert [r < 1 for r in rms_ratios] == [m == 0 for m, _ in misses] == [True, True, False, False, False], (
        rms_ratios,
        misses,
    )
