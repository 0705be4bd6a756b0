"""The Python API on the committed digits model: PIL images out, the CLI's pictures for the same seed,
img2img and inpainting through the same code, settings from the config."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.digit_eval import classify, fit_classifier
from ldm.generation.pipeline import DEMO_CONFIG, Pipeline
from ldm.generation.pipeline import to_tensor as pil_to_tensor

from .conftest import REPO


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_config(DEMO_CONFIG)


def test_txt2img_gives_the_cli_picture_for_the_same_seed(pipe, tmp_path):
    # One thread in both (the tests run on one): thread counts change float summation order.
    images = pipe.txt2img("a handwritten digit 5", n=2, seed=11)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    argv = [
        sys.executable,
        str(REPO / "scripts" / "txt2img.py"),
        "--config",
        str(DEMO_CONFIG),
        "--prompt",
        "a handwritten digit 5",
        "--n_samples",
        "2",
        "--seed",
        "11",
        "--outdir",
        str(tmp_path),
        "--quiet",
        "--skip_grid",
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    for i, im in enumerate(images):
        with Image.open(tmp_path / "samples" / f"{i:05}.png") as cli:
            assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(im))


def test_same_seed_same_images_other_seed_other_images(pipe):
    a = pipe.txt2img("a handwritten digit 2", seed=1)[0]
    b = pipe.txt2img("a handwritten digit 2", seed=1)[0]
    c = pipe.txt2img("a handwritten digit 2", seed=2)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.cat([pil_to_tensor(im) for im in images])


def test_img2img_turns_a_digit_into_the_prompted_one(pipe):
    seven = pipe.txt2img("a handwritten digit 7", n=1, seed=3)[0]
    clf = fit_classifier()
    light = pipe.img2img(seven, "a handwritten digit 7", strength=0.3, n=4, seed=5)
    heavy = pipe.img2img(seven, "a handwritten digit 0", strength=0.9, n=4, seed=5, sampler="ddim")
    assert (classify(clf, as_batch(light)) == 7).all()
    assert (classify(clf, as_batch(heavy)) == 0).mean() >= 0.75


def test_inpaint_keeps_the_unmasked_half(pipe):
    seven = pipe.txt2img("a handwritten digit 7", seed=3)[0]
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    out = pipe.inpaint(seven, Image.fromarray(mask), "a handwritten digit 1", n=2, seed=4)
    for im in out:
        a, b = np.asarray(im), np.asarray(seven)
        assert np.array_equal(a[:, :16], b[:, :16])
        assert not np.array_equal(a[:, 16:], b[:, 16:])


def test_settings_come_from_the_config_and_are_checked(pipe):
    s = pipe.settings()
    assert (s.height, s.width, s.factor, s.sampler, s.steps) == (32, 32, 4, "dpmpp_2m", 20)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.settings(sampler="nope")
