"""What every sampler shares: the conventions, the step helpers, and the adapter from SD's eps-prediction UNet.

Samplers are short pure functions over a denoiser and a noise-level schedule (the k-diffusion design).

Conventions, shared by every sampler here:

- A *denoiser* is any callable ``denoiser(x, sigma) -> x0_hat``: given x at noise level sigma in the
  variance-exploding form x = x0 + sigma * eps, it returns the estimate of x0 (the model's
  D(x; sigma)). ``sigma`` is passed as a tensor of shape ``[batch]``. `denoiser_from_eps` turns SD's
  discrete eps-prediction UNet into one.
- ``sigmas`` is a decreasing 1-D schedule (see `ldm.samplers.schedules`), normally ending with 0;
  ``x`` is the start, already at noise level ``sigmas[0]`` (for txt2img: ``randn * sigmas[0]``).
  A schedule that stops above 0 returns x at ``sigmas[-1]``.
- The probability-flow ODE these samplers solve is dx/dsigma = (x - D(x; sigma)) / sigma. The
  DPM-Solver family works in lambda = -log(sigma), where it reads dx/dlambda = D - x and the linear
  part is integrated exactly: x(lambda + h) = e^-h x(lambda) + int_0^h e^-(h-u) D(lambda + u) du.
- Stochastic samplers take ``eta`` (how much of each step's noise is re-drawn; 0 makes them
  deterministic) and ``s_noise`` (scale of the fresh noise), and draw every random number from
  ``generator``, so a seeded generator gives the same result on every run.
- ``callback(i, x, denoised)`` is called after step i with the new x and the step's denoised estimate.

Schedule arithmetic (step ratios, exponentials, multistep weights) is done on Python floats in
double precision; only the model calls and the tensor updates run in x's dtype and device.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ldm.samplers.schedules import sigmas_from_alphas_cumprod, t_from_sigma

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


# --------------------------------------------------------------------------------------------- helpers


class _Model:
    """Calls the denoiser with sigma as a [batch] tensor, in the wider of the sigmas' and x's dtypes."""

    def __init__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor):
        self.denoiser = denoiser
        dtype = sigmas.dtype if sigmas.is_floating_point() else torch.float32
        self.dtype = torch.promote_types(dtype, x.dtype) if x.is_floating_point() else dtype

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self.denoiser(x, torch.full((x.shape[0],), sigma, dtype=self.dtype, device=x.device))


def _prepare(denoiser: Denoiser, x: Tensor, sigmas: Tensor | Sequence[float]) -> tuple[_Model, list[float]]:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().cpu().double().tolist()
    if any(not math.isfinite(v) for v in s) or any(v <= 0 for v in s[:-1]) or (s and s[-1] < 0):
        raise ValueError("sigmas must be finite and positive, except a final 0")
    if any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise ValueError("sigmas must be strictly decreasing")
    return _Model(denoiser, x, sigmas), s


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _to_d(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """The ODE's slope dx/dsigma = (x - D) / sigma, which is also the model's eps estimate."""
    return (x - denoised) / sigma


def _exp_step(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """First-order step holding D fixed: x_to = D + (sigma_to / sigma) (x - D).

    The same update is DDIM, Euler in sigma, and DPM-Solver(++)-1 in lambda: with D constant the
    ODE is linear and this is its exact solution. It lands exactly on D when sigma_to is 0.
    """
    return denoised + (sigma_to / sigma) * (x - denoised)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic move to sigma_down plus fresh noise of
    size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 so the noise level comes out right.

    eta = 1 re-draws as much noise as the DDPM posterior q(x_next | x, x0) does (this is DDIM's eta
    translated to sigmas); eta = 0 is the deterministic ODE step.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!, the exponential-integrator functions (phi_0 = e^z,
    phi_{k+1}(z) = (phi_k(z) - 1/k!) / z). h^(k+1) phi_(k+1)(-h) = int_0^h e^-(h-u) u^k / k! du is the
    weight a D^(k) term gets in the DPM-Solver integral. Series for small |z| (the recurrence
    cancels catastrophically there), recurrence otherwise."""
    if abs(z) < 1.0:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) < 1e-18 * abs(total):
                return total + term
    value = math.exp(z)
    for m in range(k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


class BrownianPath:
    """A Brownian motion W(t) sampled lazily at the times asked for, each new value drawn from its
    exact conditional law given the values already drawn: a Brownian bridge between the two nearest
    known times, a free Gaussian step beyond either end (the Markov property makes the nearest
    neighbours enough). All randomness comes from `generator`, so the same seed and the same
    queries give the same path. Unlike a virtual Brownian tree, the values for one seed depend on
    which times were asked for, so schedules of different lengths do not share noise.
    """

    def __init__(self, like: Tensor, generator: torch.Generator | None = None):
        self.like = like
        self.generator = generator
        self.times: list[float] = []
        self.values: list[Tensor] = []

    def __call__(self, t: float) -> Tensor:
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            return self.values[i]
        if not self.times:
            value = torch.zeros_like(self.like)
        elif i == 0:
            value = self.values[0] + math.sqrt(self.times[0] - t) * _randn(self.like, self.generator)
        elif i == len(self.times):
            value = self.values[-1] + math.sqrt(t - self.times[-1]) * _randn(self.like, self.generator)
        else:
            (t0, w0), (t1, w1) = (self.times[i - 1], self.values[i - 1]), (self.times[i], self.values[i])
            frac = (t - t0) / (t1 - t0)
            std = math.sqrt((t - t0) * (t1 - t) / (t1 - t0))
            value = w0 + frac * (w1 - w0) + std * _randn(self.like, self.generator)
        self.times.insert(i, t)
        self.values.insert(i, value)
        return value

    def increment(self, t0: float, t1: float) -> Tensor:
        """(W(t1) - W(t0)) / sqrt(|t1 - t0|): a standard normal, correlated with the increments over
        overlapping intervals exactly as Brownian motion's are."""
        return (self(t1) - self(t0)) / math.sqrt(abs(t1 - t0))


def lms_coefficients(nodes: Sequence[float], start: float, end: float) -> list[float]:
    """Weights w_j with int_start^end p(s) ds = sum_j w_j p(nodes[j]) for every polynomial p of degree
    < len(nodes): the integrals of the Lagrange basis polynomials, by Gauss-Legendre quadrature with
    len(nodes) points (exact up to degree 2 len(nodes) - 1, so exact here)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    k = len(nodes)
    gx, gw = np.polynomial.legendre.leggauss(k)
    half = (end - start) / 2
    tau = (start + end) / 2 + half * gx
    weights = []
    for j in range(k):
        basis = np.ones_like(tau)
        for m in range(k):
            if m != j:
                basis *= (tau - nodes[m]) / (nodes[j] - nodes[m])
        weights.append(float(half * np.sum(gw * basis)))
    return weights


def _taylor_from_history(history: Sequence[tuple[float, Tensor]]) -> list[Tensor]:
    """Taylor coefficients c_1, c_2, ... (D^(k)(lambda_0) / k!) at the newest point of the polynomial
    through the (lambda, D) points of `history` (newest first), from Newton divided differences."""
    lams = [lam for lam, _ in history]
    n = len(history)
    if n < 2:
        return []
    table = [d for _, d in history]
    divided = [table[0]]
    for level in range(1, n):
        table = [(table[j] - table[j + 1]) / (lams[j] - lams[j + level]) for j in range(n - level)]
        divided.append(table[0])
    # P(l) = f0 + f01 (l - l0) + f012 (l - l0)(l - l1): expand about l0.
    if n == 2:
        return [divided[1]]
    return [divided[1] + divided[2] * (lams[0] - lams[1]), divided[2]]


# --------------------------------------------------------------------------------------------- model adapter


def denoiser_from_eps(
    eps_model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, *, quantize: bool = False
) -> Denoiser:
    """Wrap a discrete-time eps-prediction model `eps_model(x_t, t)` (SD's UNet, t in [0, T-1]) as a
    denoiser: x at noise level sigma is the model's x_t / sqrt(a_t), so feed x / sqrt(1 + sigma^2)
    at the continuous t whose sigma is sigma, and return x - sigma * eps. `quantize` rounds t to the
    nearest training step (the model only ever saw integer t)."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        t = t_from_sigma(sigma.detach().cpu(), log_sigmas)
        if quantize:
            t = t.round()
        sig = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps = eps_model(x / (1 + sig**2).sqrt(), t.to(device=x.device, dtype=torch.float32))
        return x - sig * eps

    return denoiser
