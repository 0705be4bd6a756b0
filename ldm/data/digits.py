"""Captioned handwritten digits from scikit-learn's bundled copy of the UCI set: a dataset with no download.

The 1,797 8x8 images (16 grey levels) are upsampled to `size` pixels, white ink on black, in [-1, 1] with
three equal channels, so they pass through the same RGB autoencoder path as SD v1's photos. Captions name the
digit in a few phrasings, in words and numerals, so that "a handwritten digit 3" and "the number three" both
mean 3.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten digit {num}",
    "the digit {num}",
    "the number {word}",
    "a handwritten {num}",
    "{num}",
    "{word}",
)


def caption_variants(digit: int) -> list[str]:
    """Every caption a training image of `digit` may get."""
    return [t.format(word=WORDS[digit], num=digit) for t in TEMPLATES]


def all_captions() -> list[str]:
    """Every training caption, for `zero_unused_tokens` in the stage-2 trainer."""
    return [c for d in range(10) for c in caption_variants(d)]


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """The raw data: (N, 8, 8) float grey levels in [0, 16] and (N,) integer labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in requirements.txt
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def upsample(images8: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(N, 8, 8) grey levels in [0, 16] to (N, 3, size, size) in [-1, 1], smoothly (bicubic, clamped)."""
    x = torch.as_tensor(images8, dtype=torch.float32)[:, None] / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return (2.0 * x - 1.0).expand(-1, 3, -1, -1).contiguous()


def _ink(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images in [-1, 1] to ink weights (N, H, W) in [0, 1], pixel columns and rows (H, W) and the
    ink's total mass (N,)."""
    w = ((images.float().mean(dim=1) + 1.0) / 2.0).clamp(0.0, 1.0)
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in w.shape[-2:]), indexing="ij")
    return w, cols, rows, w.sum((1, 2)).clamp(min=1e-6)


def slant(images: torch.Tensor) -> torch.Tensor:
    """How far each image's ink leans to the right, in pixels across per pixel up: -cov(x, y) / var(y) of the
    ink's mass (second moments, as MNIST deskewing measures it). Upright digits are near 0, "italic" ones 0.5."""
    w, x, y, mass = _ink(images)
    cx, cy = (w * x).sum((1, 2)) / mass, (w * y).sum((1, 2)) / mass
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    return -(w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2)).clamp(min=1e-6)


def shear(images: torch.Tensor, amount: torch.Tensor | float) -> torch.Tensor:
    """Each image's rows shifted right by `amount` pixels per pixel up (about the ink's centre row), so its
    `slant` grows by `amount`; bilinear, black (-1) where nothing maps."""
    n, _, h, w = images.shape
    amount = torch.as_tensor(amount, dtype=torch.float32).expand(n) * h / w
    ink, _, y, mass = _ink(images)
    cy = (2.0 * (ink * y).sum((1, 2)) / mass + 1.0) / h - 1.0  # the centre row in affine_grid's [-1, 1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2], theta[:, 1, 1] = 1.0, amount, -amount * cy, 1.0
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float() + 1.0, grid, mode="bilinear", align_corners=False) - 1.0


def deskew(images: torch.Tensor) -> torch.Tensor:
    """The images sheared upright (`slant` 0)."""
    return shear(images, -slant(images))


def italic(images: torch.Tensor, lean: float = 0.5) -> torch.Tensor:
    """The "italic" style: each digit set upright, then leaned right by `lean` (0.5: about 27 degrees)."""
    return shear(deskew(images), lean).clamp(-1.0, 1.0)


def downsample_to_8x8(images: torch.Tensor) -> np.ndarray:
    """Generated (N, 3, H, W) images in [-1, 1] back to the dataset's (N, 64) grey levels in [0, 16],
    by channel mean and area averaging, so a classifier fitted on the raw data can label them."""
    grey = ((images.float().mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)
    small = F.adaptive_avg_pool2d(grey, 8)
    return (16.0 * small).reshape(len(images), 64).cpu().numpy()


# The styles a LoRA can be taught (`style`): "italic" digits, which the demo's autoencoder reproduces (slant 0.49
# in, 0.46 after encoding and decoding), and "inverted" ones (black ink on white), which it cannot (docs/lora.md).
STYLES = {None: None, "italic": italic, "inverted": torch.neg}


class DigitsDataset(Dataset):
    """Items are dicts {"image": (3, size, size) tensor, "caption": str, "label": int}, like the original's
    txt2img datasets ({"jpg", "txt"}), keyed for the trainers in `ldm.training`."""

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        val_fraction: float = 0.05,
        limit: int | None = None,
        seed: int = 0,
        style: str | None = None,
        trigger: str = "",
        style_fraction: float = 0.5,
    ):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
        images8, labels = load_digits_8x8()
        order = np.random.default_rng(seed).permutation(len(labels))
        n_val = int(round(val_fraction * len(labels)))
        if split == "val":
            order = order[:n_val]
        elif split == "train":
            order = order[n_val:]
        if limit is not None:
            order = order[:limit]
        self.images = upsample(images8[order], size)
        self.labels = torch.as_tensor(labels[order])
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(map(str, STYLES))}, not {style!r}")
        # For a LoRA that teaches a style: that share of the items is drawn in it, its caption led by `trigger`;
        # the rest stay as they are, so the prompts without the trigger keep their meaning.
        self.style, self.trigger, self.style_fraction = style, trigger, style_fraction
        self.styled = None if style is None else STYLES[style](self.images)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        image, caption = self.images[i], random.choice(caption_variants(label))
        if self.style is not None and random.random() < self.style_fraction:
            image, caption = self.styled[i], f"{self.trigger} {caption}".strip()
        return {"image": image, "caption": caption, "label": label}


def collate(items: Sequence[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "label": torch.tensor([it["label"] for it in items]),
    }


class DigitsDataModule:
    """The `data:` section of the demo configs: train/val loaders over `DigitsDataset`.

    Duck-types pytorch-lightning's DataModule (train_dataloader/val_dataloader), which is all
    `Trainer.fit` asks of it, so importing this module does not import Lightning.
    """

    def __init__(
        self,
        batch_size: int = 64,
        size: int = 32,
        val_fraction: float = 0.05,
        limit: int | None = None,
        style: str | None = None,
        trigger: str = "",
    ):
        self.batch_size = batch_size
        styled = dict(style=style, trigger=trigger)
        self.train = DigitsDataset("train", size=size, val_fraction=val_fraction, limit=limit, **styled)
        self.val = DigitsDataset("val", size=size, val_fraction=val_fraction, limit=limit, **styled)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
