"""Deterministic full-size SD v1 checkpoints with random weights, in the original's layout.

Real weights are not always at hand (tests, benchmarks, CI): these files have every key, shape and dtype of
`sd-v1-4.ckpt`, so they exercise the same loading and the same arithmetic. The weights follow one documented
rule, so a file can be rebuilt anywhere bit for bit (`tests/reference/fake-ckpt-seed0-digest.json` holds the
sha256 of every tensor of seed 0, the weights the original code's reference case was made with):

- each random tensor is drawn in float32 from its own `torch.Generator`, seeded from sha256("<seed>/<key>"),
  so its bytes depend on neither key order nor other keys, and the fp16 file is the fp32 file rounded;
- tensors with 2 or more dimensions (convolutions, linears) ~ N(0, 1/fan_in), fan_in = prod(shape[1:]);
  CLIP's token embedding ~ N(0, 0.02^2), its position embedding ~ N(0, 0.01^2);
- 1-D weights (all of them GroupNorm/LayerNorm scales) = 1 + 0.05 N(0, 1), 1-D biases = 0.02 N(0, 1): not
  exactly 1 and 0, so a loader that skips them changes outputs;
- the 12 diffusion schedule buffers as the original computes them (float64 math, stored as float32);
- unless `exact_instantiation`, the extra keys a real file holds: `...position_ids` = arange(77) int64,
  `model_ema.decay` = 0.9999, `model_ema.num_updates` = 470000 (int32).

`scripts/make_fake_ckpt.py` writes such files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, linear_schedule

__all__ = ["GLOBAL_STEP", "SCHEDULE_BUFFERS", "fake_state_dict", "key_generator", "random_tensor", "tensor_digest"]
from ldm.util import instantiate_from_config

GLOBAL_STEP = 470000
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def key_generator(seed: int, key: str) -> torch.Generator:
    """One generator per tensor, seeded from the key: values do not depend on order or on other keys."""
    h = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def random_tensor(seed: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The rule above: activations stay O(1) through the net, norms are not exactly 1/0."""
    z = torch.randn(shape, generator=key_generator(seed, key), dtype=torch.float32)
    if key.endswith("token_embedding.weight"):
        return z.mul_(0.02)
    if key.endswith("position_embedding.weight"):
        return z.mul_(0.01)
    if len(shape) >= 2:
        return z.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(".weight"):  # every 1-D weight of SD v1 is a GroupNorm / LayerNorm scale
        return z.mul_(0.05).add_(1.0)
    if key.endswith(".bias"):
        return z.mul_(0.02)
    raise ValueError(f"no init rule for {key} {shape}")


def model_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model `model_config` builds, with its shape, in state-dict order (built on
    the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = instantiate_from_config(model_config)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def fake_state_dict(
    model_config: Mapping[str, Any],
    seed: int = 0,
    *,
    fp16: bool = False,
    exact_instantiation: bool = False,
) -> dict[str, torch.Tensor]:
    """The whole checkpoint's `state_dict` for `model_config` (SD v1's: 1142 keys, 4.27 GB in float32)."""
    schedule = None
    sd: dict[str, torch.Tensor] = {}
    for key, shape in model_shapes(model_config).items():
        if key in SCHEDULE_BUFFERS:
            if schedule is None:
                p = model_config["params"]
                schedule = linear_schedule(p.get("timesteps", 1000), p["linear_start"], p["linear_end"])
            sd[key] = schedule[key]
        else:
            sd[key] = random_tensor(seed, key, shape)
    if not exact_instantiation:
        sd[POSITION_IDS] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
        sd["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        sd["model_ema.num_updates"] = torch.tensor(GLOBAL_STEP, dtype=torch.int32)
    if fp16:
        sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
    return sd


def tensor_digest(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, str]]:
    """sha256 of all tensors together (keys, dtypes, shapes and bytes, in order) and the first 16 hex digits of
    each tensor's bytes: the digest file's two fields."""
    total = hashlib.sha256()
    per_key = {}
    for k, v in sd.items():
        data = v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b""
        per_key[k] = hashlib.sha256(data).hexdigest()[:16]
        total.update(k.encode() + b"\0" + str(v.dtype).encode() + str(list(v.shape)).encode() + b"\0")
        total.update(data)
    return total.hexdigest(), per_key
