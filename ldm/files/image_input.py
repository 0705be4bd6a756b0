"""Reading init images and masks for img2img and inpainting, whatever format people hand us.

The original opened the file, `.convert("RGB")`, cut width and height down to multiples of 32 and resized
with Lanczos. We do the same, and also: apply the EXIF orientation (a phone JPEG is otherwise sideways),
scale 16-bit and float images to 8 bits before the conversion (PIL would clip them to white), and turn every
read failure into one `ImageInputError` line.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

MULTIPLE = 32


class ImageInputError(ValueError):
    """An init image or mask that cannot be used; the message is one line naming the file and the fix."""


def open_image(path: str | os.PathLike | Image.Image, what: str = "image") -> Image.Image:
    """Open and fully decode `path` (or take a PIL image), upright, in an 8-bit mode."""
    if isinstance(path, Image.Image):
        img = path
    else:
        if not os.path.isfile(path):
            raise ImageInputError(f"{what} not found: {path} (give the path of a PNG or JPEG file)")
        try:
            with Image.open(path) as im:
                im.load()
                img = ImageOps.exif_transpose(im)  # a decoded, upright copy
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageInputError(f"cannot read {what} {path}: {e} (is it a complete PNG or JPEG file?)") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    return img


def fit_size(width: int, height: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """Width and height cut down to multiples of `multiple`, as the original did."""
    w, h = width - width % multiple, height - height % multiple
    if w < multiple or h < multiple:
        raise ImageInputError(f"image is {width}x{height}; it must be at least {multiple}x{multiple} pixels")
    return w, h


def load_image_array(path: str | os.PathLike | Image.Image, multiple: int = MULTIPLE) -> np.ndarray:
    """The init image as [H, W, 3] uint8, H and W cut to multiples of `multiple` and Lanczos-resized."""
    img = open_image(path).convert("RGB")
    w, h = fit_size(*img.size, multiple)
    if (w, h) != img.size:
        img = img.resize((w, h), resample=Image.LANCZOS)
    return np.asarray(img).copy()


def to_model_range(rgb: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 to the [1, 3, H, W] float tensor in [-1, 1] the autoencoder takes (the original's
    `load_img` arithmetic: /255 in float32, then 2x - 1)."""
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    return 2.0 * x - 1.0


def load_image(path: str | os.PathLike | Image.Image, multiple: int = MULTIPLE) -> torch.Tensor:
    """The original's `load_img`: a [1, 3, H, W] tensor in [-1, 1]."""
    return to_model_range(load_image_array(path, multiple))


def load_mask(
    path: str | os.PathLike | Image.Image, size: tuple[int, int], dilate: int = 0, blur: float = 0.0
) -> torch.Tensor:
    """A [1, 1, H, W] mask in [0, 1] at image `size` (W, H): 1 (white) = repaint, 0 (black) = keep.

    `dilate` grows the repainted region by that many pixels and `blur` feathers its edge (Gaussian radius),
    both in image pixels, so seams fall inside the repainted area.
    """
    img = open_image(path, what="mask")
    if img.mode in ("RGBA", "LA"):  # a transparent brush stroke is the usual way to draw a mask
        img = img.getchannel("A") if np.asarray(img.convert("L")).std() == 0 else img.convert("L")
    mask = img.convert("L")
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), resample=Image.NEAREST)
    if dilate > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * int(dilate) + 1))
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0)[None, None]
