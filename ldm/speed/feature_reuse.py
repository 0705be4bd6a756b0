"""Reuse the UNet's deep features across nearby steps (DeepCache, Ma et al., CVPR 2024).

Between neighbouring sampling steps the UNet's low-resolution features barely change, while its
outermost level sees the new input. So only every `interval`-th UNet call runs in full and keeps the
feature entering the last `depth + 1` decoder blocks; the calls in between run just the outermost
`depth + 1` encoder blocks and those decoder blocks on top of the kept feature. At depth 0 a shallow
call is the input conv, one decoder block and the output layers. It changes the image (measured in
docs/performance.md), so it is opt-in (`--deepcache N`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ldm.util import is_compiled


@dataclass
class FeatureReuse:
    interval: int
    depth: int = 0
    calls: int = 0
    full_calls: int = 0
    cached: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.interval < 1 or self.depth < 0:
            raise ValueError(f"feature reuse needs interval >= 1 and depth >= 0, not {self.interval}, {self.depth}")

    def next_is_full(self, x: torch.Tensor) -> bool:
        """Whether this call must run in full: on schedule, or when there is no kept feature for this batch."""
        due = self.calls % self.interval == 0
        self.calls += 1
        stale = self.cached is None or self.cached.shape[0] != x.shape[0]
        if due or stale:
            self.full_calls += 1
            return True
        return False


@contextlib.contextmanager
def reuse_features(model, interval: int, depth: int = 0) -> Iterator[FeatureReuse | None]:
    """Within the block, `model`'s UNet reuses its deep features (`interval` <= 1: does nothing)."""
    if interval <= 1:
        yield None
        return
    unet = model.model.diffusion_model
    if is_compiled(unet):
        # Its per-call branching and counters would make torch.compile re-trace at every step.
        raise ValueError("feature reuse (--deepcache) and a compiled UNet (--compile) do not combine; choose one")
    reuse = FeatureReuse(interval, depth)
    unet.feature_reuse = reuse
    try:
        yield reuse
    finally:
        unet.feature_reuse = None
