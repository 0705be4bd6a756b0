"""PLMS (Liu et al. 2022, pseudo linear multi-step): Adams-Bashforth on the noise prediction.

The first step has no history, so it takes a pseudo improved-Euler step (two UNet calls, and two
noise draws, as the original does); later steps combine up to four past predictions.
"""

from __future__ import annotations

from ldm.models.diffusion.sampling_common import DiscreteSampler


class PLMSSampler(DiscreteSampler):
    name = "PLMS"

    def check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError(f"PLMS is deterministic and needs eta 0, got {eta} (use DDIM for eta > 0)")

    def reset(self) -> None:
        self.old_eps = []

    def step(self, x, index, t, t_next, eps_fn, schedule):
        e_t = eps_fn(x, t)
        old = self.old_eps
        if not old:
            x_next, _ = self.update(x, e_t, schedule, index)
            e_prime = (e_t + eps_fn(x_next, t_next)) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old.append(e_t)
        if len(old) > 3:
            old.pop(0)
        return self.update(x, e_prime, schedule, index)
