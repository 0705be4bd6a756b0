#!/usr/bin/env python
"""The fast path on the digits demo: prompt adherence of few-step recipes, with the full VAE and with the tiny
autoencoder distilled for the demo, and how long each decoder takes (the tables in docs/performance.md).

    python scripts/digits_fast_eval.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from ldm.data.digit_eval import adherence, fit_classifier, sample_digits  # noqa: E402
from ldm.generation.generate import SampleSettings, generate  # noqa: E402
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "demo", "digits.yaml")
RECIPES = [  # sampler, steps, guidance scale, decoder
    ("dpmpp_2m", 20, 3.0, "full"),
    ("dpmpp_2m", 20, 3.0, "taesd"),
    ("lcm", 4, 1.0, "full"),
    ("lcm", 4, 1.0, "taesd"),
    ("lcm", 4, 3.0, "full"),
    ("dpmpp_2m", 4, 3.0, "full"),
    ("unipc", 4, 3.0, "full"),
    ("euler_a", 4, 3.0, "full"),
]


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per_digit", type=int, default=10, help="samples per digit (default 10: 100 per recipe)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG)
    runtime = resolve_runtime(config)
    model = load_model(config, os.path.join(REPO, config.txt2img.ckpt), runtime, verbose=False)
    attach_tiny_autoencoder(model, config, runtime, [], CONFIG)
    classifier = fit_classifier()
    print("| sampler | steps | scale | decoder | adherence | seconds |\n|---|---|---|---|---|---|")
    for sampler, steps, scale, vae in RECIPES:
        t0 = time.perf_counter()
        samples = sample_digits(model, runtime, sampler=sampler, steps=steps, scale=scale,
                                per_digit=args.per_digit, seed=args.seed, vae=vae)  # fmt: skip
        acc = adherence(classifier, samples)
        print(f"| {sampler} | {steps} | {scale:g} | {vae} | {100 * acc:.0f}% | {time.perf_counter() - t0:.1f} |")
    n = 10 * args.per_digit
    s = SampleSettings(steps=20, sampler="dpmpp_2m", scale=3.0, height=32, width=32, factor=4, n_samples=n, seed=1)
    (batch,) = generate(model, [[f"a handwritten digit {i % 10}" for i in range(n)]], s, runtime, progress=False)
    z = batch.latents
    with torch.no_grad():
        full = median_seconds(lambda: model.decode_first_stage(z))
        tiny = median_seconds(lambda: model.tiny_autoencoder.decode(z))
        diff = (model.decode_first_stage(z).clamp(-1, 1) - model.tiny_autoencoder.decode(z).clamp(-1, 1)).abs()
    params_full = sum(p.numel() for p in model.first_stage_model.decoder.parameters())
    params_tiny = sum(p.numel() for p in model.tiny_autoencoder.decoder.parameters())
    print(f"\nDecoding {n} sampled latents: full VAE decoder {1e3 * full:.0f} ms ({params_full:,} parameters), tiny "
          f"decoder {1e3 * tiny:.0f} ms ({params_tiny:,}), {tiny / full:.2f}x; mean difference "
          f"{127.5 * diff.mean():.1f} of 255 levels")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
