#!/usr/bin/env python
"""Measure the digits demo's LoRA (configs/demo/digits-lora.yaml): does the trigger word with the LoRA draw the
new style (italic: the digit leaning right), are the samples still the prompted digit, and is the style absent
without the LoRA?

    python scripts/digits_lora_eval.py models/demo/digits-italic-lora.safetensors     # about 2 min, 1 thread

100 samples (10 per digit, the demo's txt2img defaults: dpmpp_2m, 20 steps, scale 3) per case. Style: the slant
of each sample's ink (ldm.data.digits.slant: pixels across per pixel up; upright digits about 0, the style 0.5),
above 0.25 counts as italic. Digit: the demo's classifier judge (ldm.data.digit_eval), shown each sample set
upright first (ldm.data.digits.deskew, in every case alike), as it was fitted on upright digits.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.adapters import apply_adapters  # noqa: E402
from ldm.data.digit_eval import classify, fit_classifier, sample_digits  # noqa: E402
from ldm.data.digits import deskew, slant  # noqa: E402
from ldm.generation.load import load_config, load_model  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "demo", "digits.yaml")
CKPT = os.path.join(REPO, "models", "demo", "digits.safetensors")
ITALIC = 0.25  # halfway between upright (0) and the trained style (0.5)
PLAIN = "a handwritten digit {num}"
# (case, LoRA weight or None for no LoRA, with the trigger word)
CASES = [
    ("LoRA 1.0, with the trigger word", 1.0, True),
    ("LoRA 1.0, without the trigger word", 1.0, False),
    ("LoRA 0.0, with the trigger word", 0.0, True),
    ("no LoRA, with the trigger word", None, True),
]


def load_demo(threads: int = 1):
    """The demo model, its runtime and the classifier judge."""
    torch.set_num_threads(threads)
    config = load_config(CONFIG)
    runtime = resolve_runtime(config, None, None, None, None)
    return load_model(config, CKPT, runtime, verbose=False), runtime, fit_classifier()


def measure(model, runtime, classifier, template: str, *, per_digit: int = 10, seed: int = 42) -> dict[str, float]:
    """Of 10 * per_digit samples: the share drawn italic, the median slant, the share labelled as the prompted
    digit once set upright."""
    samples = sample_digits(model, runtime, per_digit=per_digit, template=template, seed=seed)
    lean = slant(samples.images)
    judged = classify(classifier, deskew(samples.images)) == samples.intended
    return {"italic": float((lean > ITALIC).float().mean()), "slant": float(lean.median()),
            "digit": float(np.mean(judged))}  # fmt: skip


def evaluate(model, runtime, classifier, lora: str, trigger: str = "italic", **kw) -> dict[str, dict[str, float]]:
    """`measure` for each of CASES."""
    results = {}
    for case, weight, triggered in CASES:
        template = f"{trigger} {PLAIN}" if triggered else PLAIN
        if weight is None:
            results[case] = measure(model, runtime, classifier, template, **kw)
        else:
            with apply_adapters(model, loras=[(lora, weight)]):
                results[case] = measure(model, runtime, classifier, template, **kw)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", help="the exported LoRA (.safetensors)")
    parser.add_argument("--trigger", default="italic")
    parser.add_argument("--per_digit", type=int, default=10, help="samples per digit and case (default 10)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    model, runtime, classifier = load_demo(args.threads)
    results = evaluate(model, runtime, classifier, args.lora, args.trigger, per_digit=args.per_digit, seed=args.seed)
    n = 10 * args.per_digit
    print(f"| case ({n} samples, {args.per_digit} per digit) | italic (slant > {ITALIC}) | median slant "
          "| prompted digit (judge) |")  # fmt: skip
    print("|---|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['italic']:.0%} | {r['slant']:.2f} | {r['digit']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
