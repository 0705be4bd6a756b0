"""Reading init images and masks for img2img and inpainting, whatever format people hand us.

The original opened the file, `.convert("RGB")`, cut width and height down to multiples of 32 and resized
with Lanczos. We do the same, and also: apply the EXIF orientation (a phone JPEG is otherwise sideways),
scale 16-bit and float images to 8 bits before the conversion (PIL would clip them to white), and turn every
read failure into one `ImageInputError` line, a decompression bomb (a small file that decodes to billions of
pixels) included: its size is checked from the header, before any pixel is decoded. Uploaded bytes (the image
service) take the same path as files, so both give the same pixels.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

MULTIPLE = 32


class ImageInputError(ValueError):
    """An init image or mask that cannot be used; the message is one line naming the file and the fix."""


ImageSource = str | os.PathLike | bytes | Image.Image


def pixel_limit() -> int:
    """PIL's own decompression-bomb limit (it refuses twice its MAX_IMAGE_PIXELS outright)."""
    return 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def open_image(path: ImageSource, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode `path` (or encoded bytes, or take a PIL image), upright, in an 8-bit mode.

    Images of more than `max_pixels` pixels (default: PIL's decompression-bomb limit) are refused from their
    header, before decoding."""
    if isinstance(path, Image.Image):
        img = path
    else:
        name = f"the uploaded {what}" if isinstance(path, bytes) else f"{what} {path}"
        if not isinstance(path, bytes) and not os.path.isfile(path):
            raise ImageInputError(f"{what} not found: {path} (give the path of a PNG or JPEG file)")
        limit = pixel_limit() if max_pixels is None else max_pixels
        try:
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
                width, height = im.size
                if width * height > limit:
                    raise ImageInputError(
                        f"{name} is {width}x{height} pixels, more than the {limit} allowed "
                        "(a decompression bomb?); use a smaller image"
                    )
                im.load()
                img = ImageOps.exif_transpose(im)  # a decoded, upright copy
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))  # PIL: "Image size (N pixels) exceeds limit of ..."
            count = f"{found.group(1)} pixels" if found else "too many pixels"
            raise ImageInputError(
                f"{name} has {count}, more than the {limit} allowed (a decompression bomb?); use a smaller image"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, ImageInputError):
                raise
            raise ImageInputError(f"cannot read {name}: {e} (is it a complete PNG or JPEG file?)") from None
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


def load_image_array(path: ImageSource, multiple: int = MULTIPLE, max_pixels: int | None = None) -> np.ndarray:
    """The init image as [H, W, 3] uint8, H and W cut to multiples of `multiple` and Lanczos-resized."""
    img = open_image(path, max_pixels=max_pixels).convert("RGB")
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


def check_mask_shape(mask_size: tuple[int, int], size: tuple[int, int], multiple: int = MULTIPLE) -> None:
    """A mask is stretched to the image, so its aspect ratio must be one the image could have had before it was
    cut to multiples of `multiple` (1% slack for rounding); another shape would repaint the wrong place."""
    (mw, mh), (w, h) = mask_size, size
    low, high = w / (h + multiple - 1) * 0.99, (w + multiple - 1) / h * 1.01
    if not low <= mw / mh <= high:
        raise ImageInputError(
            f"mask is {mw}x{mh} but the image is {w}x{h}: another aspect ratio, so it cannot be matched to the "
            "image; give a mask of the image's size"
        )


def load_mask(
    path: ImageSource, size: tuple[int, int], dilate: int = 0, blur: float = 0.0, max_pixels: int | None = None
) -> torch.Tensor:
    """A [1, 1, H, W] mask in [0, 1] at image `size` (W, H): 1 (white) = repaint, 0 (black) = keep.

    `dilate` grows the repainted region by that many pixels and `blur` feathers its edge (Gaussian radius),
    both in image pixels, so seams fall inside the repainted area.
    """
    img = open_image(path, what="mask", max_pixels=max_pixels)
    if img.mode in ("RGBA", "LA"):  # a transparent brush stroke is the usual way to draw a mask
        img = img.getchannel("A") if np.asarray(img.convert("L")).std() == 0 else img.convert("L")
    mask = img.convert("L")
    check_mask_shape(mask.size, tuple(size))
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), resample=Image.NEAREST)
    if dilate > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * int(dilate) + 1))
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0)[None, None]
