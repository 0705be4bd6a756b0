"""Does the digits demo draw what it is asked for? A classifier fitted on the real data labels its samples.

The classifier (an RBF SVM, about 99% accurate on held-out real digits) sees generated images the way it
saw the data: reduced to 8x8 grey levels in [0, 16]. Prompt adherence is the fraction of samples it labels
as the prompted digit; with an empty prompt and no guidance, the label histogram shows whether the model
covers all ten digits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ldm.data.digits import WORDS, downsample_to_8x8, load_digits_8x8
from ldm.generation.generate import SampleSettings, generate
from ldm.speed.runtime import Runtime


def fit_classifier(seed: int = 0):
    """An SVM fitted on all 1,797 real digits."""
    from sklearn.svm import SVC

    images8, labels = load_digits_8x8()
    return SVC(gamma=0.001, C=10.0, random_state=seed).fit(images8.reshape(len(labels), 64), labels)


@dataclass
class Samples:
    prompts: list[str]
    intended: np.ndarray  # the prompted digit, or -1 for an empty prompt
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]


def prompt_for(digit: int, template: str = "a handwritten digit {num}") -> str:
    return template.format(num=digit, word=WORDS[digit])


@torch.no_grad()
def sample_digits(
    model,
    runtime: Runtime,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    scale: float = 3.0,
    per_digit: int = 10,
    seed: int = 42,
    schedule: str = "discrete",
    template: str = "a handwritten digit {num}",
    unconditional: bool = False,
    size: int = 32,
    factor: int = 4,
    reuse_interval: int = 0,
    token_merge: float = 0.0,
    vae: str = "full",
) -> Samples:
    """`per_digit` samples for each of the ten digits in one batch (or 10 * per_digit for the empty prompt)."""
    if unconditional:
        prompts, intended = 10 * per_digit * [""], np.full(10 * per_digit, -1)
    else:
        intended = np.repeat(np.arange(10), per_digit)
        prompts = [prompt_for(int(d), template) for d in intended]
    settings = SampleSettings(
        steps=steps,
        sampler=sampler,
        scale=scale,
        height=size,
        width=size,
        factor=factor,
        channels=model.channels,
        n_samples=len(prompts),
        n_iter=1,
        seed=seed,
        schedule=schedule,
        reuse_interval=reuse_interval,
        token_merge=token_merge,
        vae=vae,
    )
    (batch,) = generate(model, [prompts], settings, runtime, progress=False)
    return Samples(prompts, intended, batch.decoded.float().clamp(-1, 1).cpu())


def classify(classifier, images: torch.Tensor) -> np.ndarray:
    return classifier.predict(downsample_to_8x8(images))


def adherence(classifier, samples: Samples) -> float:
    """Fraction of samples labelled as their prompted digit."""
    return float(np.mean(classify(classifier, samples.images) == samples.intended))


def label_histogram(classifier, samples: Samples) -> dict[int, int]:
    counts = Counter(int(c) for c in classify(classifier, samples.images))
    return {d: counts.get(d, 0) for d in range(10)}
