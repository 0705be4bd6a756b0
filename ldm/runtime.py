"""The one place that decides device and precision, from the config's `runtime:` section and CLI flags.

Model code never calls `.cuda()` or picks dtypes; scripts ask for a `Runtime` and pass it along.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("full", "autocast")


class RuntimeChoiceError(ValueError):
    """A device or precision the user asked for that this machine or build cannot give."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "full"
    weight_dtype: torch.dtype = torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """fp16 autocast on CUDA, as the original's `autocast("cuda")`; on a CPU that call did nothing."""
        if self.precision == "autocast" and self.device.type == "cuda":
            return torch.float16
        return None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def describe(self) -> str:
        compute = self.autocast_dtype or self.weight_dtype
        return f"{self.device.type}, weights {_name(self.weight_dtype)}, compute {_name(compute)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_runtime(
    config: Mapping[str, Any] | None, device: str | None = None, precision: str | None = None
) -> Runtime:
    """Flags win over the config's `runtime:` section; `auto` means CUDA when present, else CPU."""
    section = dict((config or {}).get("runtime", None) or {})
    device_name = device or section.get("device", "auto")
    precision = precision or section.get("precision", "autocast")
    if precision not in PRECISIONS:
        raise RuntimeChoiceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device_name)
    except RuntimeError:
        raise RuntimeChoiceError(f"unknown device {device_name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            "CUDA is not available here: running on the CPU instead "
            "(use --config configs/stable-diffusion/v1-inference-cpu.yaml to say so)",
            stacklevel=2,
        )
        dev = torch.device("cpu")
    return Runtime(device=dev, precision=precision)
