"""DDIM (Song et al. 2020) with eta: eta 0 is deterministic, eta 1 matches DDPM's noise level."""

from __future__ import annotations

from ldm.models.diffusion.sampling_common import DiscreteSampler


class DDIMSampler(DiscreteSampler):
    name = "DDIM"

    def step(self, x, index, t, t_next, eps_fn, schedule):
        return self.update(x, eps_fn(x, t), schedule, index)
