"""An analytic test bed for the samplers: Gaussian data, whose denoiser and probability-flow ODE have
closed forms, so every sampler's error can be measured against the exact answer.

Data x0 ~ N(mu, Sigma) in d dimensions. At noise level sigma, x = x0 + sigma * eps ~ N(mu, Sigma +
sigma^2 I) and the ideal denoiser is the posterior mean

    D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu).

In Sigma's eigenbasis (Sigma = Q diag(l) Q^T, y = Q^T (x - mu)) the ODE dx/dsigma = (x - D) / sigma
decouples into dy_i/dsigma = sigma / (l_i + sigma^2) y_i, solved by

    y_i(s) = y_i(s0) sqrt((l_i + s^2) / (l_i + s0^2)),

which maps N(0, l_i + s0^2) onto N(0, l_i + s^2) as the flow must. Everything is float64. The test
(`tests/test_samplers_analytic.py`) and the docs table (`scripts/sampler_table.py`) both use the
functions here, so they measure the same thing.

`GaussianMixtureTestbed` is a second bed closer to image latents: several Gaussian components with
small covariances of different shapes, so the denoiser is nonlinear (posterior-weighted component
denoisers) and the ODE has no closed form; its `flow` is a fine RK4 solve in log-sigma instead.
`original_plms` runs the original CompVis PLMS (`ldm.models.diffusion.plms`) on either bed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.samplers.registry import SAMPLERS
from ldm.samplers.schedules import discrete_sigmas, karras_sigmas, sd_v1_alphas_cumprod, sigmas_from_alphas_cumprod

DTYPE = torch.float64
SD_ALPHAS_CUMPROD = sd_v1_alphas_cumprod()
_SD_SIGMAS = sigmas_from_alphas_cumprod(SD_ALPHAS_CUMPROD)
SIGMA_MIN = float(_SD_SIGMAS[0])  # 0.0292: SD v1 at t = 0
SIGMA_MAX = float(_SD_SIGMAS[-1])  # 14.6146: SD v1 at t = 999


@dataclass(frozen=True)
class GaussianTestbed:
    """N(mean, Q diag(eigvals) Q^T) data; `denoiser` is exact, `flow` solves the ODE exactly."""

    mean: Tensor
    eigvals: Tensor
    eigvecs: Tensor

    @classmethod
    def default(cls) -> GaussianTestbed:
        """d = 4, a non-diagonal covariance with eigenvalues 0.25..2 (a spread of time scales), and a
        mean away from 0 so that errors in the data term and the noise term both show."""
        mean = torch.tensor([0.5, -1.0, 0.25, 1.5], dtype=DTYPE)
        eigvals = torch.tensor([0.25, 0.5, 1.0, 2.0], dtype=DTYPE)
        a = torch.tensor([[2.0, 1, 0, 1], [1, 3, 1, 0], [0, -1, 2, 1], [1, 0, -2, 3]], dtype=DTYPE)
        q, _ = torch.linalg.qr(a)
        return cls(mean, eigvals, q)

    @classmethod
    def wide(cls) -> GaussianTestbed:
        """d = 8, eigenvalues 1e-3..3 in half-decades: variance at every scale down to sigma_min^2,
        closer to image latents, whose fine detail lives at small sigma. Rotated by a Hadamard matrix."""
        eigvals = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0], dtype=DTYPE)
        h = torch.ones(1, 1, dtype=DTYPE)
        for _ in range(3):
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return cls(torch.linspace(-0.5, 0.5, 8, dtype=DTYPE), eigvals, h / math.sqrt(8))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def cov(self) -> Tensor:
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    def _to_eig(self, x: Tensor) -> Tensor:
        return (x - self.mean) @ self.eigvecs

    def _from_eig(self, y: Tensor) -> Tensor:
        return y @ self.eigvecs.T + self.mean

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The exact D(x; sigma) for x of shape [batch, d], sigma a scalar or [batch]."""
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        return self._from_eig(self._to_eig(x) * self.eigvals / (self.eigvals + s2))

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """The exact solution of the probability-flow ODE from sigma_from to sigma_to (0 allowed)."""
        ratio = ((self.eigvals + sigma_to**2) / (self.eigvals + sigma_from**2)).sqrt()
        return self._from_eig(self._to_eig(x) * ratio)

    def sample(self, n: int, sigma: float, generator: torch.Generator) -> Tensor:
        """n draws from the exact noisy marginal N(mean, Sigma + sigma^2 I). Starting a sampler from
        these (rather than from N(0, sigma^2 I)) leaves the solver as the only source of error."""
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self._from_eig(z * (self.eigvals + sigma**2).sqrt())

    def moment_errors(self, samples: Tensor) -> tuple[float, float]:
        """(|sample mean - mean|, ||sample cov - Sigma||_F / ||Sigma||_F)."""
        mean_err = (samples.mean(0) - self.mean).norm().item()
        cov_err = ((torch.cov(samples.T) - self.cov).norm() / self.cov.norm()).item()
        return mean_err, cov_err


def rk4_flow(
    denoiser: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma_from: float, sigma_to: float, steps: int
) -> Tensor:
    """The probability-flow ODE dx/dlog(sigma) = x - D(x; sigma) by classical RK4 in `steps` equal log-sigma
    steps (both sigmas > 0): the reference where a bed has no closed form, and a check where it has one."""
    ts = torch.linspace(math.log(sigma_from), math.log(sigma_to), steps + 1, dtype=DTYPE).tolist()

    def f(x: Tensor, t: float) -> Tensor:
        return x - denoiser(x, torch.tensor(math.exp(t), dtype=DTYPE))

    for a, b in zip(ts[:-1], ts[1:], strict=True):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(x + h * k3, b))
    return x


class GaussianMixtureTestbed:
    """sum_k w_k N(m_k, Q_k diag(l_k) Q_k^T). The denoiser is exact (Tweedie's posterior mean: the
    component posterior means weighted by the component responsibilities at noise level sigma); `flow`
    is a reference solve of the ODE (classical RK4 in log-sigma; 1000 steps agree with 16000 to ~1e-8)."""

    def __init__(self, weights: Tensor, means: Tensor, eigvals: Tensor, eigvecs: Tensor, flow_steps: int = 1000):
        self.weights, self.means, self.eigvals, self.eigvecs = weights, means, eigvals, eigvecs
        self.flow_steps = flow_steps

    @classmethod
    def image_like(cls, d: int = 8, k: int = 8, seed: int = 0) -> GaussianMixtureTestbed:
        """k components in d dimensions, all drawn from a fixed seed: means ~ N(0, 0.75^2 I) (about unit
        variance overall, as SD's scaled latents have), unequal weights, and per-component covariances
        with randomly rotated eigenvectors and eigenvalues log-spaced from 0.1 down to 1e-4 (times a
        random factor in [1/2, 2] per component): data near a union of low-dimensional sets, with
        detail below sigma_min^2 = 8.5e-4, where image latents keep their fine texture."""
        g = torch.Generator().manual_seed(seed)
        w = 1 + torch.rand(k, generator=g, dtype=DTYPE)
        means = 0.75 * torch.randn(k, d, generator=g, dtype=DTYPE)
        base = torch.logspace(-1, -4, d, dtype=DTYPE)
        eigvals = base * 2 ** (2 * torch.rand(k, 1, generator=g, dtype=DTYPE) - 1)
        eigvecs = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=DTYPE))[0]
        return cls(w / w.sum(), means, eigvals, eigvecs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _components(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log w_k N(x; m_k, C_k + sigma^2 I) up to a constant, y = Q_k^T (x - m_k), l + sigma^2)."""
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1) ** 2
        y = torch.einsum("bd,kde->bke", x, self.eigvecs) - torch.einsum("kd,kde->ke", self.means, self.eigvecs)
        var = self.eigvals.unsqueeze(0) + s2
        return self.weights.log() - 0.5 * (y**2 / var).sum(-1) - 0.5 * var.log().sum(-1), y, var

    def log_density(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log p_sigma(x) up to a constant (Tweedie: D = x + sigma^2 grad log p_sigma)."""
        return torch.logsumexp(self._components(x, sigma)[0], -1)

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The exact D(x; sigma) for x of shape [batch, d], sigma a scalar or [batch]."""
        logp, y, var = self._components(x, sigma)
        post = torch.einsum("bke,kde->bkd", y * self.eigvals / var, self.eigvecs) + self.means
        return (torch.softmax(logp, -1).unsqueeze(-1) * post).sum(1)

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Reference ODE solution: RK4 in log-sigma down to max(sigma_to, 1e-7); for sigma_to = 0 the
        rest is D(x; 1e-7), which is within ~(1e-7)^2 / min(l) of x(0)."""
        end = max(sigma_to, 1e-7)
        x = rk4_flow(self.denoiser, x, sigma_from, end, self.flow_steps)
        return self.denoiser(x, torch.tensor(end, dtype=DTYPE)) if sigma_to == 0 else x

    def sample(self, n: int, sigma: float, generator: torch.Generator) -> Tensor:
        """n draws from the exact noisy marginal: x0 from the mixture plus sigma times fresh noise."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        x0 = self.means[comp] + torch.einsum("bd,bed->be", z * self.eigvals[comp].sqrt(), self.eigvecs[comp])
        return x0 + sigma * torch.randn(n, self.dim, generator=generator, dtype=DTYPE)


class GuidedGaussianTestbed:
    """Classifier-free guidance, as SD samples (scale 7.5), on Gaussian data with an exact answer.

    Unconditional data N(m_u, Q diag(l_u) Q^T), conditional N(m_c, Q diag(l_c) Q^T) (same eigenvectors; the
    condition narrows and shifts the data), guided denoiser D = D_u + s (D_c - D_u). Each eigen-coordinate
    then follows a linear ODE, dz/dsigma = sigma (A z - B) with A = (1 - s) / (l_u + sigma^2) + s / (l_c +
    sigma^2) and B = (1 - s) m_u / (l_u + sigma^2) + s m_c / (l_c + sigma^2), solved by
    z(sigma) = h(sigma) [z0 / h(sigma0) - int_sigma0^sigma t B(t) / h(t) dt] with the closed-form
    h = (l_u + sigma^2)^((1 - s) / 2) (l_c + sigma^2)^(s / 2); the integral (which does not depend on z) is
    done by adaptive quadrature to ~1e-12. With s = 7.5 the flow changes fast where sigma^2 lies between l_c
    and l_u: guidance makes the ODE harder than any plain data distribution's."""

    def __init__(
        self, eigvecs: Tensor, l_uncond: Tensor, l_cond: Tensor, m_uncond: Tensor, m_cond: Tensor, scale: float
    ):
        self.q, self.lu, self.lc, self.mu, self.mc, self.scale = eigvecs, l_uncond, l_cond, m_uncond, m_cond, scale

    @classmethod
    def image_like(cls, d: int = 8, scale: float = 7.5, seed: int = 0) -> GuidedGaussianTestbed:
        """The `wide` bed's spread of variances (3 down to 1e-3) for the unconditional data; the condition
        keeps a log-uniform 25-100% of each variance and moves the mean by up to about half a standard
        deviation per direction; a random rotation. Seeded: `seed` picks one such pair."""
        g = torch.Generator().manual_seed(seed)
        lu = torch.logspace(math.log10(3), -3, d, dtype=DTYPE)
        keep = torch.exp(torch.empty(d, dtype=DTYPE).uniform_(math.log(0.25), 0.0, generator=g))
        mu = 0.5 * torch.randn(d, generator=g, dtype=DTYPE)
        mc = mu + 0.5 * lu.sqrt() * torch.randn(d, generator=g, dtype=DTYPE)
        q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))[0]
        return cls(q, lu, lu * keep, mu, mc, scale)

    @property
    def dim(self) -> int:
        return self.lu.numel()

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        z = x @ self.q
        du = self.mu + self.lu / (self.lu + s2) * (z - self.mu)
        dc = self.mc + self.lc / (self.lc + s2) * (z - self.mc)
        return (du + self.scale * (dc - du)) @ self.q.T

    def _h(self, i: int, sigma: float) -> float:
        u, s = sigma * sigma, self.scale
        return (float(self.lu[i]) + u) ** ((1 - s) / 2) * (float(self.lc[i]) + u) ** (s / 2)

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        from scipy.integrate import quad

        z = x @ self.q
        out = torch.empty_like(z)
        s = self.scale
        for i in range(self.dim):
            lu, lc, mu, mc = float(self.lu[i]), float(self.lc[i]), float(self.mu[i]), float(self.mc[i])

            def integrand(t: float, i: int = i, lu: float = lu, lc: float = lc, mu: float = mu, mc: float = mc):
                sig = math.exp(t)  # in log-sigma: d sigma = sigma dt
                b = (1 - s) * mu / (lu + sig * sig) + s * mc / (lc + sig * sig)
                return sig * sig * b / self._h(i, sig)

            lo = math.log(max(sigma_to, 1e-12))  # below 1e-12 the integrand is ~sigma^2: nothing left
            integral = quad(integrand, math.log(sigma_from), lo, epsabs=1e-13, epsrel=1e-12, limit=500)[0]
            h0, h1 = self._h(i, sigma_from), self._h(i, sigma_to)
            out[:, i] = h1 / h0 * z[:, i] - h1 * integral
        return out @ self.q.T

    def sample(self, n: int, sigma: float, generator: torch.Generator) -> Tensor:
        """Start points: the conditional data's noisy marginal (the guided flow's own marginal has no closed
        form; any start works, since errors are measured against the exact flow from the same point)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return (self.mc + z * (self.lc + sigma**2).sqrt()) @ self.q.T


Bed = GaussianTestbed | GaussianMixtureTestbed | GuidedGaussianTestbed


def sd_sigma_at(t: int) -> float:
    """sigma of SD v1 at integer timestep t, from the float32 alpha-bar the original samplers use."""
    a = SD_ALPHAS_CUMPROD.float().double()[t]
    return float(((1 - a) / a).sqrt())


class _EpsModel:
    """What the original samplers call: `apply_model(x_t, t, cond)` -> eps in the DDPM (VP) convention,
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps = sqrt(a_t) * x with x = x0 + sigma_t eps, built from the
    bed's exact denoiser: eps = (x - D(x; sigma_t)) / sigma_t, sigma_t = sqrt((1 - a_t) / a_t)."""

    device = torch.device("cpu")

    def __init__(self, bed: Bed):
        self.bed = bed
        self.alphas_cumprod = SD_ALPHAS_CUMPROD.float().double()  # the float32 values DDIMSchedule uses

    def apply_model(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        a = self.alphas_cumprod[t].reshape(-1, 1)
        sigma = ((1 - a) / a).sqrt()
        x = x_t.flatten(1) / a.sqrt()
        return ((x - self.bed.denoiser(x, sigma.flatten())) / sigma).reshape(x_t.shape)


def original_plms(bed: Bed, x: Tensor, steps: int) -> Tensor:
    """The original CompVis PLMS as SD's txt2img runs it (`ldm.models.diffusion.plms`): timesteps
    1, 1 + T//S, ..., starting at the last of them (t = 981 for 50 steps, sigma 13.12, not 14.61),
    whose last update goes to alpha-bar at t = 0, i.e. sigma_min, not 0. `x` is the start in the sigma
    form (x0 + sigma eps at sigma(t_start)); returns the output in the same form, at sigma_min."""
    from ldm.models.diffusion.plms import PLMSSampler
    from ldm.models.diffusion.sampling_common import ddim_timesteps

    model = _EpsModel(bed)
    ac = model.alphas_cumprod
    x_t = (x * ac[int(ddim_timesteps(steps)[-1])].sqrt()).reshape(*x.shape, 1, 1)
    sampler = PLMSSampler(model, generator=torch.Generator().manual_seed(0))  # eta 0: noise unused
    out = sampler.sample(steps, x.shape[0], (x.shape[1], 1, 1), torch.zeros(x.shape[0], 1), x_T=x_t, progress=False)
    return out.flatten(1) / ac[0].sqrt()


def original_plms_error(bed: Bed, steps: int, *, at_zero: bool = True, n: int = 256, seed: int = 0) -> float:
    """RMS error of `original_plms` from n exact marginal draws at its own start sigma, against the
    exact (reference) ODE solution from the same points to 0 (`at_zero`) or to sigma_min, where it stops."""
    from ldm.models.diffusion.sampling_common import ddim_timesteps

    s0 = sd_sigma_at(int(ddim_timesteps(steps)[-1]))
    x = bed.sample(n, s0, torch.Generator().manual_seed(seed))
    return rms_error(original_plms(bed, x, steps), bed.flow(x, s0, 0.0 if at_zero else sd_sigma_at(0)))


def rms_error(x: Tensor, exact: Tensor) -> float:
    """Root mean square over the batch of the Euclidean distance to the exact answer."""
    return (x - exact).pow(2).sum(-1).mean().sqrt().item()


def karras(n: int, *, append_zero: bool = True) -> Tensor:
    """Karras (rho 7) sigmas over SD v1's range, float64."""
    return karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, append_zero=append_zero, dtype=DTYPE)


def discrete(n: int, *, append_zero: bool = True) -> Tensor:
    """SD v1's own discrete schedule in n steps, float64."""
    return discrete_sigmas(SD_ALPHAS_CUMPROD, n, append_zero=append_zero, dtype=DTYPE)


SCHEDULES: dict[str, Callable[..., Tensor]] = {"karras": karras, "discrete": discrete}


def ode_error(name: str, sigmas: Tensor, *, bed: Bed | None = None, n: int = 256, seed: int = 0, **options) -> float:
    """RMS error of deterministic sampler `name` against the exact ODE solution, from n exact
    marginal draws at sigmas[0] to sigmas[-1] (which may be 0)."""
    bed = bed or GaussianTestbed.default()
    s = sigmas.tolist()
    x = bed.sample(n, s[0], torch.Generator().manual_seed(seed))
    out = SAMPLERS[name].fn(bed.denoiser, x, sigmas, **options)
    return rms_error(out, bed.flow(x, s[0], s[-1]))


def final_step_floor(*, bed: GaussianTestbed | None = None, n: int = 256, seed: int = 0) -> float:
    """The error at sigma = 0 of a perfect solver to sigma_min whose last step lands on D(x; sigma_min)
    (as most samplers' step to 0 does): a floor no step count removes while sigma_min stays put."""
    bed = bed or GaussianTestbed.default()
    x = bed.sample(n, SIGMA_MAX, torch.Generator().manual_seed(seed))
    at_min = bed.flow(x, SIGMA_MAX, SIGMA_MIN)
    return rms_error(bed.denoiser(at_min, torch.tensor(SIGMA_MIN, dtype=DTYPE)), bed.flow(x, SIGMA_MAX, 0.0))


def convergence(
    name: str, steps: Sequence[int], schedule: str = "karras", *, append_zero: bool = False, **options
) -> list[float]:
    """ODE errors of `name` for each step count in `steps`."""
    return [ode_error(name, SCHEDULES[schedule](k, append_zero=append_zero), **options) for k in steps]


def fitted_order(steps: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope of -log(error) against log(steps): the observed order of convergence."""
    slope, _ = np.polyfit(np.log(np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)
    return float(-slope)


def sde_moments(
    name: str, sigmas: Tensor, *, bed: GaussianTestbed | None = None, n: int = 20000, seed: int = 0, **options
) -> tuple[float, float]:
    """(mean error, relative covariance error) of n samples of `name` from sigmas[0] down to 0.

    Starts from N(0, sigma_max^2 I), as real sampling does; at sigma_max = 14.6 that start's
    mismatch with the true marginal is forgotten by any sampler that injects noise. The Monte Carlo
    error for n samples is about sqrt(tr(Sigma) / n) for the mean and sqrt(2 / n)-ish for the
    covariance (see `monte_carlo_floor`)."""
    bed = bed or GaussianTestbed.default()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, bed.dim, generator=gen, dtype=DTYPE) * sigmas[0].item()
    out = SAMPLERS[name].fn(bed.denoiser, x, sigmas, generator=gen, **options)
    return bed.moment_errors(out)


def monte_carlo_floor(*, bed: GaussianTestbed | None = None, n: int = 20000, seed: int = 0) -> tuple[float, float]:
    """The moment errors of n exact samples from the data distribution: what sampling noise alone gives."""
    bed = bed or GaussianTestbed.default()
    return bed.moment_errors(bed.sample(n, 0.0, torch.Generator().manual_seed(seed)))
