"""The committed digits demo model: it draws the digit it is asked for, and covers all ten without a prompt.

Independent judge: an SVM fitted on scikit-learn's real digits (`ldm.data.digit_eval`), about 99% accurate
on real data, labels the generated images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.digit_eval import adherence, classify, fit_classifier, label_histogram, sample_digits
from ldm.data.digits import load_digits_8x8, upsample
from ldm.generation.generate import SAMPLER_NAMES
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model
from ldm.speed.runtime import resolve_runtime

from .conftest import REPO

CONFIG = REPO / "configs" / "demo" / "digits.yaml"


@pytest.fixture(scope="module")
def demo():
    config = load_config(CONFIG)
    runtime = resolve_runtime(config)
    model = load_model(config, REPO / config.txt2img.ckpt, runtime, verbose=False)
    return model, runtime, float(config.txt2img.scale)


@pytest.fixture(scope="module")
def classifier():
    return fit_classifier()


def test_classifier_is_a_competent_judge(classifier):
    """On real digits passed through the same 32-pixel round trip as samples, it is nearly always right;
    on pure noise images it is not (so high adherence below is earned)."""
    images8, labels = load_digits_8x8()
    assert np.mean(classify(classifier, upsample(images8, 32)) == labels) > 0.98
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert np.bincount(classify(classifier, noise), minlength=10).max() > 100  # noise collapses on one label


def test_prompt_adherence_with_a_modern_sampler(demo, classifier):
    model, runtime, scale = demo
    samples = sample_digits(model, runtime, sampler="dpmpp_2m", steps=20, scale=scale, per_digit=10)
    assert len(samples.prompts) == 100
    assert adherence(classifier, samples) >= 0.9


def test_numeral_and_word_prompts_agree(demo, classifier):
    model, runtime, scale = demo
    samples = sample_digits(model, runtime, sampler="dpmpp_2m", steps=20, scale=scale, per_digit=5,
                            template="the number {word}", seed=7)
    assert adherence(classifier, samples) >= 0.9


def test_empty_prompt_without_guidance_covers_every_digit(demo, classifier):
    model, runtime, _ = demo
    samples = sample_digits(model, runtime, sampler="dpmpp_2m", steps=20, scale=1.0, per_digit=10,
                            unconditional=True)
    counts = label_histogram(classifier, samples)
    assert min(counts.values()) >= 1, counts  # all ten present
    assert max(counts.values()) <= 30, counts  # none dominates (uniform would be 10 each)


@pytest.mark.parametrize("sampler", [s for s in SAMPLER_NAMES if s != "dpmpp_2m"])
def test_every_sampler_follows_prompts(demo, classifier, sampler):
    model, runtime, scale = demo
    samples = sample_digits(model, runtime, sampler=sampler, steps=20, scale=scale, per_digit=3, seed=1)
    assert adherence(classifier, samples) >= 0.9


def test_prompt_adherence_with_feature_reuse(demo, classifier):
    """--deepcache 3 (7 full UNet calls of 20) still draws the prompted digits."""
    model, runtime, scale = demo
    samples = sample_digits(model, runtime, sampler="dpmpp_2m", steps=20, scale=scale, per_digit=5, reuse_interval=3)
    assert adherence(classifier, samples) >= 0.9


def test_the_fast_recipe_follows_prompts_with_our_tiny_decoder(demo, classifier):
    """4 LCM steps at guidance 1 (one UNet call each), decoded by the tiny autoencoder distilled for this model
    (configs/demo/digits-taesd.yaml): still the prompted digits, and the tiny decoder draws what the VAE draws."""
    model, runtime, _ = demo
    config = load_config(CONFIG)
    attach_tiny_autoencoder(model, config, runtime, [], CONFIG)
    tiny = sample_digits(model, runtime, sampler="lcm", steps=4, scale=1.0, per_digit=10, vae="taesd")
    assert len(tiny.prompts) == 100 and adherence(classifier, tiny) >= 0.9
    full = sample_digits(model, runtime, sampler="lcm", steps=4, scale=1.0, per_digit=10, vae="full")
    assert np.mean(classify(classifier, tiny.images) == classify(classifier, full.images)) >= 0.9
    assert (tiny.images - full.images).abs().mean() < 0.1  # a few 8-bit levels on average, in [-1, 1]
