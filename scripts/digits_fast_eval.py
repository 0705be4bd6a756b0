#!/usr/bin/env python
"""The fast path on the digits demo: few-step recipes with and without the demo's LCM-LoRA, judged by the digits
classifier, with the full VAE and the tiny autoencoder, and how long each decoder takes (docs/performance.md).

    python scripts/digits_fast_eval.py --threads 1            # a few minutes on a busy 2-core VM

Per recipe and step count: prompt adherence (the SVM judge's label equals the prompted digit), the judge's mean
probability of the prompted digit (Platt-scaled, so it keeps moving where adherence is at 100%), and the Frechet
distance of the samples to the real digits in the judge's own input space (8x8 grey levels, 64 numbers an image;
lower is closer; the first row is 100 real digits, the floor at this sample size). UNet evaluations are per image:
classifier-free guidance costs two a step, guidance 1 one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.adapters import apply_adapters  # noqa: E402
from ldm.data.digit_eval import fit_classifier, sample_digits  # noqa: E402
from ldm.data.digits import downsample_to_8x8, load_digits_8x8  # noqa: E402
from ldm.generation.generate import SampleSettings, generate  # noqa: E402
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "demo", "digits.yaml")
LCM_LORA = os.path.join(REPO, "models", "demo", "digits-lcm-lora.safetensors")
STEPS = (1, 2, 4)
RECIPES = [  # name, sampler, guidance scale, with the LCM-LoRA, decoder
    ("LCM + LCM-LoRA", "lcm", 1.0, True, "full"),
    ("LCM + LCM-LoRA, tiny decoder", "lcm", 1.0, True, "taesd"),
    ("LCM, no LoRA", "lcm", 1.0, False, "full"),
    ("LCM, no LoRA", "lcm", 3.0, False, "full"),
    ("dpmpp_2m", "dpmpp_2m", 3.0, False, "full"),
    ("unipc", "unipc", 3.0, False, "full"),
    ("euler_a", "euler_a", 3.0, False, "full"),
    ("ddim", "ddim", 3.0, False, "full"),
]
REFERENCE = ("dpmpp_2m (the demo's default)", "dpmpp_2m", 3.0, False, "full", 20)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and b (FID's formula, on any features)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # + 1e-3 I: the border pixels of the real digits never vary, so their covariance is singular (as FID's offset)
    eye = 1e-3 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class Judge:
    """The adherence classifier (ldm.data.digit_eval), a Platt-scaled twin for its confidence, and the real digits."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.svm import SVC

        self.classifier = fit_classifier(seed)
        images8, labels = load_digits_8x8()
        self.real = images8.reshape(len(labels), 64).astype(np.float64)
        self.labels = labels
        self.prob = SVC(gamma=0.001, C=10.0, probability=True, random_state=seed).fit(self.real, labels)

    def real_floor(self, per_digit: int, seed: int) -> float:
        rng = np.random.default_rng(seed)
        classes = [np.flatnonzero(self.labels == d) for d in range(10)]
        pick = np.concatenate([rng.choice(c, per_digit, replace=False) for c in classes])
        return frechet_distance(self.real[pick], self.real)

    def scores(self, images: torch.Tensor, intended: np.ndarray) -> tuple[float, float, float]:
        """(adherence, mean probability of the intended digit, Frechet distance to the real digits)."""
        x = downsample_to_8x8(images).reshape(len(images), 64).astype(np.float64)
        adherence = float(np.mean(self.classifier.predict(x) == intended))
        p = self.prob.predict_proba(x)[np.arange(len(x)), np.searchsorted(self.prob.classes_, intended)]
        return adherence, float(p.mean()), frechet_distance(x, self.real)


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_recipe(model, runtime, judge: Judge, recipe, steps: int, args) -> str:
    name, sampler, scale, lora, vae = recipe[:5]
    handle = apply_adapters(model, loras=[(args.lora, 1.0)]) if lora else None
    try:
        t0 = time.perf_counter()
        samples = sample_digits(model, runtime, sampler=sampler, steps=steps, scale=scale,
                                per_digit=args.per_digit, seed=args.seed, vae=vae)  # fmt: skip
        seconds = time.perf_counter() - t0
    except ValueError as e:  # a step count the sampler does not take
        return f"| {name} | {steps} | {scale:g} | | n/a: {e} | | | |"
    finally:
        if handle is not None:
            handle.remove()
    evals = steps * (1 if scale == 1.0 else 2)
    acc, prob, fd = judge.scores(samples.images, samples.intended)
    return f"| {name} | {steps} | {scale:g} | {evals} | {100 * acc:.0f}% | {prob:.3f} | {fd:.1f} | {seconds:.1f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per_digit", type=int, default=10, help="samples per digit (default 10: 100 per recipe)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora", default=LCM_LORA, help="the LCM-LoRA (default: the demo's committed one)")
    p.add_argument("--steps", type=int, nargs="*", default=list(STEPS), help="step counts (default 1 2 4)")
    p.add_argument("--skip_decoder_timing", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG)
    runtime = resolve_runtime(config)
    model = load_model(config, os.path.join(REPO, config.txt2img.ckpt), runtime, verbose=False)
    attach_tiny_autoencoder(model, config, runtime, [], CONFIG)
    judge = Judge()
    n = 10 * args.per_digit
    print(f"| recipe | steps | scale | UNet evals per image | adherence ({n} samples) | judge p(prompted digit) "
          f"| FD to real digits (8x8) | seconds |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    print(f"| {n} real digits | | | | | | {judge.real_floor(args.per_digit, args.seed):.1f} | |")
    print(run_recipe(model, runtime, judge, REFERENCE, REFERENCE[5], args), flush=True)
    for recipe in RECIPES:
        for steps in args.steps:
            print(run_recipe(model, runtime, judge, recipe, steps, args), flush=True)
    if args.skip_decoder_timing:
        return 0
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
