"""Cheap checks that turn late, confusing failures into early one-line errors.

* :func:`unwritable_dir_reason` says why an output directory could not be written, creating nothing;
* :func:`estimate_peak_bytes` / :func:`available_memory` let txt2img refuse a size that cannot fit in
  memory before it loads a multi-gigabyte model;
* :func:`check_finite` stops a run whose latents or pixels went NaN/inf instead of saving black images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "NonFiniteError",
    "available_memory",
    "check_finite",
    "estimate_peak_bytes",
    "format_bytes",
    "model_widths",
    "unwritable_dir_reason",
]


class NonFiniteError(RuntimeError):
    """Sampling or decoding produced NaN or inf values; the message is one line with a hint."""


def check_finite(x: torch.Tensor, what: str, hint: str) -> None:
    """Raise :class:`NonFiniteError` (``"<what>: <counts>; <hint>"``) if ``x`` holds any NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise NonFiniteError(f"{what}: {nan} NaN and {inf} inf among {x.numel()} values; {hint}")


# --------------------------------------------------------------------------- output directory


def unwritable_dir_reason(path: str | os.PathLike[str]) -> str | None:
    """Why files could not be created in directory ``path`` (made on demand), or None if they can.

    Nothing is created: an existing ``path`` must be a writable directory; otherwise its nearest existing
    ancestor must be one (so that ``os.makedirs`` can create the rest).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"no permission to write in {path}"
        return None
    parent = path
    while not os.path.exists(parent):
        if os.path.islink(parent):  # a dangling symlink: makedirs would fail on it
            return f"{parent} is a broken symbolic link"
        up = os.path.dirname(parent)
        if up == parent:  # pragma: no cover - the root always exists
            return f"no existing directory above {path}"
        parent = up
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create {path} in {parent}"
    return None


# --------------------------------------------------------------------------- memory

# Live activations at the peak, in multiples of one [batch, tokens, channels] tensor. UNet: at its first
# (full latent resolution) level the transformer's GEGLU feed-forward holds an 8x-wide projection plus its
# 4x-wide halves and product (~16), the residual stream and norms (~3) and the skip connections kept for
# the decoder half (~5.5 summed over levels); 32 leaves room for allocator slack. Attention is
# F.scaled_dot_product_attention, whose CPU (flash) and CUDA (flash / memory-efficient) kernels never
# hold the tokens x tokens score matrix, so there is no quadratic term. VAE decoder: at full image
# resolution a resnet block keeps ~6 tensors of the decoder's base width (2x-wide input, norm, act, conv
# outputs, shortcut).
# Text encoder: its MLP is 4x wide (plus input, output, residual), over 77 tokens per prompt.
UNET_LIVE_TENSORS = 32
VAE_LIVE_TENSORS = 6
TEXT_LIVE_TENSORS = 8
CONTEXT_TOKENS = 77


def estimate_peak_bytes(
    height: int,
    width: int,
    *,
    factor: int = 8,
    n_samples: int = 1,
    guidance: bool = True,
    unet_channels: int = 320,
    vae_channels: int = 128,
    text_channels: int = 768,
    weight_bytes: int = 0,
    dtype_bytes: int = 4,
    vae_tile: int | None = None,
) -> int:
    """Peak memory of one txt2img batch, in bytes: the weights plus the largest of the phases' activations,
    which run one after another: the text encoder's (n_samples prompts of 77 tokens, twice with guidance),
    the UNet's (batch doubled by classifier-free guidance, at the latent size), the VAE decoder's (at pixel
    size, or of one `vae_tile`-pixel tile at a time plus the float32 image and blend weights it fills).

    A deliberately rough upper-side estimate (exact integers, so absurd sizes do not overflow): it exists
    to refuse sizes that cannot possibly fit, not to predict allocator behaviour.
    """
    tokens = (height // factor) * (width // factor)
    batch = n_samples * (2 if guidance else 1)
    unet = UNET_LIVE_TENSORS * batch * tokens * unet_channels * dtype_bytes
    if vae_tile is not None and (height > vae_tile or width > vae_tile):
        tile_area = min(height, vae_tile) * min(width, vae_tile)
        vae = VAE_LIVE_TENSORS * tile_area * vae_channels * dtype_bytes + n_samples * height * width * 4 * 4
    else:
        vae = VAE_LIVE_TENSORS * n_samples * height * width * vae_channels * dtype_bytes
    text = TEXT_LIVE_TENSORS * batch * CONTEXT_TOKENS * text_channels * dtype_bytes
    return weight_bytes + max(text, unet, vae)


def model_widths(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(UNet model_channels, VAE decoder base width, text encoder width) from a model config; SD v1's
    where it says nothing."""

    def get(section: Any, *keys: str, default: int) -> int:
        for key in keys:
            if not isinstance(section, Mapping) or key not in section:
                return default
            section = section[key]
        return int(section) if isinstance(section, int) else default

    model = config.get("model", {}) if isinstance(config, Mapping) else {}
    unet = get(model, "params", "unet_config", "params", "model_channels", default=320)
    vae = get(model, "params", "first_stage_config", "params", "ddconfig", "ch", default=128)
    text = get(model, "params", "cond_stage_config", "params", "text_config", "hidden_size", default=768)
    return unet, vae, text


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup_headroom() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit():
        return None  # "max": no limit
    return max(int(limit) - used, 0)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes a run on ``device`` could still use, what that figure is); None where it cannot be told.

    CUDA: the device's free memory. CPU: MemAvailable (page cache counts as free) within any cgroup limit,
    plus free swap, so only runs that could not complete at all are refused.
    """
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except Exception:  # no driver, bad index: the run itself will say so
            return None, ""
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None, ""
    info = _meminfo()
    ram = info.get("MemAvailable")
    if ram is None:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None, ""
    headroom = _cgroup_headroom()
    if headroom is not None:
        ram = min(ram, headroom)
    swap = info.get("SwapFree", 0)
    return ram + swap, "available (RAM + swap)" if swap else "available RAM"


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; beyond 10^4 TiB only the order of magnitude ('~10^12 TiB'), in integer arithmetic
    so that the estimate for an absurd size never overflows a float."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    n = int(n)
    if n < 1024:
        return f"{n} B"
    tib = n // 1024**4
    if tib >= 10**4:
        return f"~10^{len(str(tib)) - 1} TiB"
    exp = 0
    while exp < len(units) - 1 and n >= 1024 ** (exp + 1):
        exp += 1
    return f"{n / 1024**exp:.1f} {units[exp]}"
