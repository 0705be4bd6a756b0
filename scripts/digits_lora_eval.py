#!/usr/bin/env python
"""Measure the digits demo's LoRA (configs/demo/digits-lora.yaml): does the trigger word with the LoRA draw the
new style (black ink on white), are the samples still the prompted digit, and is the style absent without it?

    python scripts/digits_lora_eval.py models/demo/digits-inverted-lora.safetensors

100 samples (10 per digit) per case. Style: the mean brightness of each image's 4-pixel border (the background),
in [-1, 1]; above 0 counts as white. Digit: the demo's classifier judge (ldm.data.digit_eval), shown the image
with its ink made white again (negated) when the background is white, as it was fitted on white-on-black digits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.adapters import apply_adapters  # noqa: E402
from ldm.data.digit_eval import classify, fit_classifier, sample_digits  # noqa: E402
from ldm.generation.load import load_config, load_model  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

CONFIG = "configs/demo/digits.yaml"
CKPT = "models/demo/digits.safetensors"


def background(images: torch.Tensor) -> torch.Tensor:
    """Mean of each image's outer 4-pixel frame, over channels: the background's brightness in [-1, 1]."""
    frame = torch.ones(images.shape[-2:], dtype=torch.bool)
    frame[4:-4, 4:-4] = False
    return images.float().mean(1)[:, frame].mean(1)


def measure(model, runtime, classifier, template: str, seed: int) -> tuple[float, float]:
    """(share with a white background, share labelled as the prompted digit) of 100 samples."""
    samples = sample_digits(model, runtime, per_digit=10, template=template, seed=seed)
    white = background(samples.images) > 0
    upright = torch.where(white[:, None, None, None], -samples.images, samples.images)
    return float(white.float().mean()), float(np.mean(classify(classifier, upright) == samples.intended))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", help="the exported LoRA (.safetensors)")
    parser.add_argument("--trigger", default="inverted")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    config = load_config(CONFIG)
    runtime = resolve_runtime(config, None, None, None, None)
    model = load_model(config, CKPT, runtime, verbose=False)
    classifier = fit_classifier()
    with_trigger = f"{args.trigger} a handwritten digit {{num}}"
    rows = []
    for label, weight, template in [
        ("LoRA 1.0, with the trigger word", 1.0, with_trigger),
        ("LoRA 1.0, without the trigger word", 1.0, "a handwritten digit {num}"),
        ("LoRA 0.0, with the trigger word", 0.0, with_trigger),
        ("no LoRA, with the trigger word", None, with_trigger),
    ]:
        if weight is None:
            white, digit = measure(model, runtime, classifier, template, args.seed)
        else:
            with apply_adapters(model, loras=[(args.lora, weight)]):
                white, digit = measure(model, runtime, classifier, template, args.seed)
        rows.append(f"| {label} | {white:.0%} | {digit:.0%} |")
    print("| case (100 samples, 10 per digit) | white background | prompted digit (judge) |")
    print("|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
