"""The one place that decides device and precision, from the config's `runtime:` section and CLI flags.

Model code never calls `.cuda()` or picks dtypes; scripts ask for a `Runtime` and pass it along.

Precisions:
- `full`: float32 weights and arithmetic (the original's `--precision full`).
- `autocast`: the original's default: float32 weights, fp16 autocast on CUDA; on a CPU it changes nothing.
- `bf16` / `fp16`: 16-bit weights (half the memory). Arithmetic runs in that dtype where the hardware has
  it (CUDA; bf16 on CPUs with AVX512-BF16 or AMX); elsewhere each layer computes in float32 from its 16-bit
  weights, so memory halves while speed stays float32's (16-bit math without hardware support is many
  times slower than float32 on a CPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ldm.speed import native
from ldm.speed.cpu import cpu_flags

PRECISIONS = ("full", "autocast", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeChoiceError(ValueError):
    """A device or precision the user asked for that this machine or build cannot give."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "full"
    weight_dtype: torch.dtype = torch.float32
    # The dtype layers compute in; None: their weights' dtype.
    compute_dtype: torch.dtype | None = None
    # Convolution weights (and so activations) in NHWC order: faster oneDNN kernels on CPUs, tensor cores'
    # layout on GPUs. Changes float32 results in the last bits (a different summation order), so float32 runs
    # keep the original's layout unless asked; see `resolve_runtime` for when it is on by default.
    channels_last: bool = False
    # torch.compile the UNet (ldm.generation.load.compile_unet): faster steps after a compile in each new process.
    compile: bool = False
    # Its torch.compile mode (None: torch's default); e.g. "reduce-overhead" adds CUDA graphs on a GPU.
    compile_mode: str | None = None
    # bf16 attention by ldm.speed.native's AVX512-BF16 kernel where it supports the shape (ldm.generation.load
    # applies it when the kernel builds); changes bf16 results within bf16 rounding. See `resolve_runtime`.
    native_attention: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """fp16 autocast on CUDA, as the original's `autocast("cuda")`; on a CPU that call did nothing."""
        if self.precision == "autocast" and self.device.type == "cuda":
            return torch.float16
        return None

    @property
    def reduced_precision(self) -> bool:
        """Whether any arithmetic runs below float32 (so fp16/bf16 overflow is possible)."""
        return self.arithmetic_dtype != torch.float32

    @property
    def arithmetic_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.compute_dtype or self.weight_dtype

    @property
    def casts_weights(self) -> bool:
        """True when layers keep 16-bit weights but compute in another dtype (float32)."""
        return self.compute_dtype is not None and self.compute_dtype != self.weight_dtype

    @property
    def packs_convolutions(self) -> bool:
        """Convolution weights packed once for oneDNN (ldm.speed.packed_conv): on a CPU in NHWC, where it gives
        the eager NHWC bits faster. Not under compile (its freezing packs them) nor when weights are cast per
        call (their dtype changes at every call)."""
        return self.device.type == "cpu" and self.channels_last and not self.compile and not self.casts_weights

    @property
    def fuses_epilogues(self) -> bool:
        """Elementwise work folded into the preceding products (ldm.speed.fused_epilogues): with packed
        convolutions in bf16, where it is faster and at least as close to float32."""
        return self.packs_convolutions and self.arithmetic_dtype == torch.bfloat16

    @property
    def shares_guidance_prefix(self) -> bool:
        """A guidance batch's identical halves run once up to the first cross-attention (UNetModel.forward).
        Batch-1 kernels may round differently from batch-2 ones, so not in float32 (the original's bits);
        measured on CPUs, where it is on with bf16. Not compiled: the check would break the graph."""
        return self.device.type == "cpu" and self.arithmetic_dtype == torch.bfloat16 and not self.compile

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def describe(self) -> str:
        weights = dtype_name(self.weight_dtype)
        text = f"{self.device.type}, weights {weights}, compute {dtype_name(self.arithmetic_dtype)}"
        if self.casts_weights and self.device.type == "cpu":
            text += f" (this CPU has no fast {weights} arithmetic)"
        if self.channels_last:
            text += ", channels last"
        if self.packs_convolutions:
            text += " (convolution weights packed for oneDNN"
            text += ", elementwise work fused into them)" if self.fuses_epilogues else ")"
        if self.shares_guidance_prefix:
            text += ", guidance halves shared to the first cross-attention"
        if self.native_attention:
            kernel = native.kernel()
            text += ", attention by ldm.speed.native's AVX512-BF16 kernel" if kernel.function else ""
        if self.compile:
            text += ", UNet compiled"
        return text


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: the CPU instructions that make bf16 matmuls and convolutions fast."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_prefers_native_attention() -> bool:
    """AVX512-BF16 without AMX (AMD Zen 4 and later, some Intel CPUs): where ldm.speed.native's bf16 attention
    kernel measured 2.7x faster than PyTorch's flash kernel. With AMX, PyTorch's kernel runs on its tile
    units (0.08 s for SD's largest self-attention at 2 threads on a Xeon, against the kernel's 0.17 s on a
    Zen 4), so it is left alone there."""
    flags = cpu_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def native_attention_pays(
    device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None, compile: bool
) -> bool:
    """bf16 arithmetic on a CPU that prefers ldm.speed.native's attention, not compiled (inductor would stop at the
    foreign call): the default of `Runtime.native_attention`."""
    bf16_arithmetic = weight_dtype == torch.bfloat16 and compute_dtype is None
    return device.type == "cpu" and bf16_arithmetic and not compile and cpu_prefers_native_attention()


def resolve_runtime(
    config: Mapping[str, Any] | None,
    device: str | None = None,
    precision: str | None = None,
    channels_last: bool | str | None = None,
    compile: bool | None = None,
) -> Runtime:
    """Flags win over the config's `runtime:` section; device `auto` means CUDA when present, else CPU.

    `native_attention` is on for bf16 arithmetic on a CPU without AMX but with AVX512-BF16, unless compiled
    (`native_attention_pays`).

    `channels_last: auto` (the default) turns NHWC on where it was measured to pay and float32 fidelity is not
    at stake: bf16 arithmetic on a CPU (AMX/AVX512-BF16), where oneDNN's NHWC kernels made the UNet step 1.3x
    and the VAE decode 2.6x faster at 512 pixels (docs/performance.md). Everywhere else it stays off.
    """
    section = dict((config or {}).get("runtime", None) or {})
    if channels_last is None:
        channels_last = section.get("channels_last", "auto")
    if channels_last not in (True, False, "auto"):
        raise RuntimeChoiceError(f"runtime.channels_last must be true, false or auto, not {channels_last!r}")
    if compile is None:
        compile = section.get("compile", False)
    if compile not in (True, False):
        raise RuntimeChoiceError(f"runtime.compile must be true or false, not {compile!r}")
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
    if precision not in _HALF:
        return Runtime(device=dev, precision=precision, channels_last=channels_last is True, compile=compile)
    weights = _HALF[precision]
    native = dev.type != "cpu" or (weights == torch.bfloat16 and cpu_has_bf16())
    compute = None if native else torch.float32
    if channels_last == "auto":
        channels_last = dev.type == "cpu" and native
    return Runtime(
        device=dev,
        precision=precision,
        weight_dtype=weights,
        compute_dtype=compute,
        channels_last=channels_last,
        compile=compile,
        native_attention=native_attention_pays(dev, weights, compute, compile),
    )
