"""Building objects from OmegaConf `target:`/`params:` configs, so a YAML file is the whole recipe."""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"config target {path!r} is not a dotted path like 'package.module.Class'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"config target {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def instantiate_from_config(config: Mapping, **overrides: Any) -> Any:
    """Call `config.target(**config.params, **overrides)`."""
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in config section, found keys {sorted(config)}")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) like pytorch-lightning's seed_everything."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` was called on it (its calls go through torch.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None
