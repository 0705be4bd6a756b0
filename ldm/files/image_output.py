"""Turning decoded samples into PNG files, as the original CompVis ``scripts/txt2img.py`` did.

Pixel values are reproduced bit for bit (the original's float arithmetic, its ``uint8`` truncation,
its invisible watermark and its torchvision grid layout).  File handling is deliberately *not* the
original's: it numbered files from ``len(os.listdir(...))`` (so a deleted file made it overwrite an
existing one) and wrote them in place (so a crash left a truncated PNG).  Here every file is written
to a hidden temporary file in the destination directory and then published under the next free
number with a no-clobber atomic operation, so an existing file is never overwritten and a final
name never refers to a partial file.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import warnings
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "GRID_FORMAT",
    "GRID_PATTERN",
    "SAMPLE_FORMAT",
    "SAMPLE_PATTERN",
    "OutputWriter",
    "Watermarker",
    "grid_to_uint8",
    "make_grid",
    "next_index",
    "to_uint8_images",
    "to_unit_range",
    "unit_to_uint8",
    "watermark_supported",
]

# outdir/samples/00000.png (5 digits) and outdir/grid-0000.png (4 digits), as in the original.
# The patterns accept more digits so that numbering keeps going past 99999 / 9999.
SAMPLE_FORMAT = "{:05d}.png"
SAMPLE_PATTERN = r"(\d{5,})\.png"
GRID_FORMAT = "grid-{:04d}.png"
GRID_PATTERN = r"grid-(\d{4,})\.png"

WATERMARK_TEXT = "StableDiffusionV1"

# Temporary files start with a dot (hidden, and never matching the patterns above).
_TMP_PREFIX = ".tmp-"
_TMP_SUFFIX = ".png.part"


# --------------------------------------------------------------------------------------------
# pixel arithmetic


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map decoded images from [-1, 1] to [0, 1] exactly as the original (in torch, on x's device).

    This is the tensor the original handed to the safety checker and to ``make_grid``.
    """
    return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            # numpy has no bfloat16 (the original would have crashed here); float32 holds it exactly.
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def unit_to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(255. * x).astype(np.uint8)`` in numpy, as the original: truncation, not rounding.

    Elementwise, so any layout works; the multiplication happens in x's own float dtype (float32
    normally, float16 if the decoder ran under autocast), exactly as the original's numpy did.
    """
    return (255.0 * _as_numpy(x)).astype(np.uint8)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Decoded NCHW images in [-1, 1] -> NHWC uint8, bit-identical to the original txt2img.

    The original clamped in torch, moved the batch to numpy as NHWC, then per image did
    ``255. * x`` and ``.astype(np.uint8)`` (a truncation, so 254.99 becomes 254).
    """
    if x.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
    unit = to_unit_range(x)
    return unit_to_uint8(unit.cpu().permute(0, 2, 3, 1))


def grid_to_uint8(grid: np.ndarray | torch.Tensor) -> np.ndarray:
    """A CHW grid in [0, 1] (from :func:`make_grid`) -> HWC uint8, as the original did for grids."""
    if grid.ndim != 3:
        raise ValueError(f"expected a CHW grid, got shape {tuple(grid.shape)}")
    if isinstance(grid, torch.Tensor):
        return unit_to_uint8(grid.permute(1, 2, 0))
    return unit_to_uint8(np.transpose(grid, (1, 2, 0)))


# --------------------------------------------------------------------------------------------
# grid


def _cat3(x: np.ndarray | torch.Tensor, axis: int) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return torch.cat((x, x, x), dim=axis)
    return np.concatenate((x, x, x), axis=axis)


def make_grid(
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 0.0,
) -> np.ndarray | torch.Tensor:
    """Tile NCHW images into one CHW image with torchvision's ``make_grid`` layout (no normalize).

    Our own version so that ``ldm`` does not depend on torchvision.  Same semantics, including its
    quirks: a single image is returned as is (no padding); ``min(nrow, N)`` columns; the last row
    is left as ``pad_value`` where images run out; 1-channel images become 3-channel.  Returns a
    torch tensor for torch input and a numpy array otherwise, in the input's dtype.
    """
    if isinstance(images, (list, tuple)):
        if all(isinstance(t, torch.Tensor) for t in images):
            images = torch.stack(list(images), dim=0)
        else:
            images = np.stack([_as_numpy(t) for t in images], axis=0)
    x = images if isinstance(images, torch.Tensor) else np.asarray(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")

    if x.ndim == 2:  # a single H x W image
        x = x[None]
    if x.ndim == 3:  # a single C x H x W image
        if x.shape[0] == 1:
            x = _cat3(x, 0)
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = _cat3(x, 1)

    n, c, h, w = (int(s) for s in x.shape)
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if n == 1:
        return x[0]

    cols = min(nrow, n)
    rows = int(math.ceil(float(n) / cols))
    cell_h, cell_w = h + padding, w + padding
    shape = (c, cell_h * rows + padding, cell_w * cols + padding)
    if isinstance(x, torch.Tensor):
        grid = x.new_full(shape, pad_value)
    else:
        grid = np.full(shape, pad_value, dtype=x.dtype)
    for k in range(n):
        r, col = divmod(k, cols)
        top, left = r * cell_h + padding, col * cell_w + padding
        grid[:, top : top + h, left : left + w] = x[k]
    return grid


# --------------------------------------------------------------------------------------------
# watermark


def watermark_supported(height: int, width: int) -> bool:
    """Whether ``imwatermark``'s dwtDct encoder accepts an image of this size.

    ``WatermarkEncoder.encode`` raises ``RuntimeError('image too small, should be larger than
    256x256')`` when ``rows * cols < 256 * 256`` (an area test: 128x512 is accepted, 255x256 is
    not).  With fewer than 4 rows or columns it fails inside pywt with a ``ValueError``.
    """
    return height * width >= 256 * 256 and min(height, width) >= 4


class Watermarker:
    """The original's invisible watermark (imwatermark, 'bytes' payload, 'dwtDct' method).

    Images the library refuses (see :func:`watermark_supported`) are returned unwatermarked with a
    warning, emitted once per instance, instead of crashing the run as the original did.
    """

    def __init__(self, text: str = WATERMARK_TEXT) -> None:
        from imwatermark import WatermarkEncoder  # imported lazily: pulls in cv2 and pywt

        self.text = text
        self._encoder = WatermarkEncoder()
        self._encoder.set_watermark("bytes", text.encode("utf-8"))
        self._warned = False

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Watermark an HWC uint8 RGB image; returns a new HWC uint8 RGB array (input untouched).

        Bit-identical to the original ``put_watermark``: RGB->BGR, ``encode(bgr, 'dwtDct')``,
        BGR->RGB.  The channel swaps are done with numpy, which equals ``cv2.COLOR_RGB2BGR``.
        """
        _check_rgb(rgb)
        h, w = rgb.shape[:2]
        if not watermark_supported(h, w):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"image is {w}x{h}: the invisible-watermark library cannot watermark images "
                    f"smaller than 256x256 pixels (height*width < 65536, or a side under 4 px), so "
                    f"these images are saved without the watermark",
                    UserWarning,
                    stacklevel=2,
                )
            return rgb
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        bgr = self._encoder.encode(bgr, "dwtDct")
        return np.ascontiguousarray(bgr[:, :, ::-1])


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"expected an HWC uint8 RGB array, got shape {shape} dtype {dtype}")


# --------------------------------------------------------------------------------------------
# files


def next_index(directory: str | os.PathLike[str], pattern_regex: str | re.Pattern[str]) -> int:
    """One past the largest index among names in ``directory`` that fully match the pattern.

    The pattern's first group is the index.  Unlike the original's ``len(os.listdir(...))`` this
    cannot point at an existing file when earlier files were deleted.  0 for a missing/empty dir.
    """
    pattern = re.compile(pattern_regex) if isinstance(pattern_regex, str) else pattern_regex
    if pattern.groups < 1:
        raise ValueError("pattern_regex needs a group that captures the index")
    largest = -1
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is not None:
                largest = max(largest, int(m.group(1)))
    return largest + 1


_O_BINARY = getattr(os, "O_BINARY", 0)


def _create_temp(directory: Path) -> tuple[int, Path]:
    """A new hidden file in ``directory``, opened for writing, with the usual 0o666 & ~umask mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY
    while True:
        path = directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}{_TMP_SUFFIX}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue


class OutputWriter:
    """Writes txt2img's PNGs: ``outdir/samples/NNNNN.png`` and ``outdir/grid-NNNN.png``.

    Each image is watermarked (if a :class:`Watermarker` is given), encoded to a hidden temp file
    in the destination directory, fsynced, then published under the next free number with
    ``os.link`` (fails instead of overwriting; on a clash the next number is tried).  Where hard
    links are unsupported it falls back to reserving the name with ``O_CREAT | O_EXCL`` and
    ``os.replace``-ing the temp file onto that reservation.  The temp file is removed in a
    ``finally``, so an exception or Ctrl-C leaves no partial file under a final name.
    """

    def __init__(
        self,
        outdir: str | os.PathLike[str],
        watermark: Watermarker | None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        self.watermark = watermark
        self.metadata = dict(metadata) if metadata else None
        self._links_ok = True

    def save_sample(self, rgb_uint8: np.ndarray, metadata: dict[str, str] | None = None) -> Path:
        """Save one HWC uint8 RGB sample as ``samples/NNNNN.png``; returns its path.

        ``metadata`` (text chunks for this image) replaces the writer's own, if given."""
        return self._save(rgb_uint8, self.sample_dir, SAMPLE_PATTERN, SAMPLE_FORMAT, metadata)

    def save_grid(self, rgb_uint8: np.ndarray, metadata: dict[str, str] | None = None) -> Path:
        """Save an HWC uint8 RGB grid (see :func:`grid_to_uint8`) as ``grid-NNNN.png``; returns its path."""
        return self._save(rgb_uint8, self.outdir, GRID_PATTERN, GRID_FORMAT, metadata)

    def _pnginfo(self, metadata: dict[str, str] | None) -> PngInfo | None:
        # Each item becomes one text chunk (txt2img passes {"parameters": ...}).  Without metadata
        # the file is byte-identical to the original's plain ``img.save(path)``.
        metadata = metadata if metadata is not None else self.metadata
        if not metadata:
            return None
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)  # falls back to iTXt for non-latin-1 text
        return info

    def _save(
        self, rgb: np.ndarray, directory: Path, pattern: str, fmt: str, metadata: dict[str, str] | None = None
    ) -> Path:
        _check_rgb(rgb)
        if self.watermark is not None:
            rgb = self.watermark.apply(rgb)
        img = Image.fromarray(rgb)
        pnginfo = self._pnginfo(metadata)
        kwargs = {} if pnginfo is None else {"pnginfo": pnginfo}

        fd, tmp = _create_temp(directory)
        try:
            with os.fdopen(fd, "wb") as f:
                img.save(f, format="PNG", **kwargs)
                f.flush()
                os.fsync(f.fileno())
            return self._publish(tmp, directory, pattern, fmt)
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)

    def _publish(self, tmp: Path, directory: Path, pattern: str, fmt: str) -> Path:
        index = next_index(directory, pattern)
        while True:
            final = directory / fmt.format(index)
            try:
                self._place_no_clobber(tmp, final)
                return final
            except FileExistsError:
                # Someone took this number meanwhile: take the next one (re-listing in case they
                # went further ahead).
                index = max(index + 1, next_index(directory, pattern))

    def _place_no_clobber(self, tmp: Path, final: Path) -> None:
        """Make ``final`` name the complete ``tmp`` file; FileExistsError if ``final`` exists."""
        if self._links_ok:
            try:
                os.link(tmp, final)
                return
            except FileExistsError:
                raise
            except (OSError, AttributeError, NotImplementedError):
                # Hard links unsupported here (FAT, some network/FUSE file systems, ...).
                self._links_ok = False
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
        try:
            os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            # Don't leave our empty reservation behind under a final name (if tmp is gone, the
            # replace itself went through and final is complete).
            if os.path.lexists(tmp):
                with suppress(OSError):
                    os.unlink(final)
            raise


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so the names linked or renamed into it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
