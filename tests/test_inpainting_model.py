"""The 9-channel inpainting layout (sd-v1-5-inpainting): the UNet sees the mask and the masked image's latents,
so what it is given inside the repainted area must not matter, and what is outside must."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.files.image_input import to_model_range
from ldm.files.image_output import to_uint8_images
from ldm.generation.generate import SampleSettings
from ldm.generation.img2img import composite, generate_img2img, inpainting_concat
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime
from ldm.util import instantiate_from_config

from .conftest import REPO, random_state_dict
from .test_img2img import init_picture

CONFIG = REPO / "tests" / "configs" / "tiny-inpainting.yaml"
CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory):
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    path = tmp_path_factory.mktemp("inpaint") / "tiny-inpainting.ckpt"
    torch.save({"state_dict": random_state_dict(model, seed=3)}, path)
    return path


@pytest.fixture(scope="module")
def model(inpaint_ckpt):
    return load_model(OmegaConf.load(CONFIG), inpaint_ckpt, CPU, verbose=False)


def square_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    return mask


def inpaint(model, rgb, sampler="ddim"):
    s = SampleSettings(steps=4, sampler=sampler, scale=5.0, height=64, width=64, n_samples=2, seed=2)
    (batch,) = generate_img2img(
        model, [["a cat", "a cat"]], s, CPU, to_model_range(rgb), 1.0, mask=square_mask(), progress=False
    )
    return batch


def test_concat_input_is_mask_then_masked_image_latents(model):
    init = to_model_range(init_picture())
    torch.manual_seed(0)
    cc = inpainting_concat(model, init, square_mask(), 2)
    assert cc.shape == (2, 5, 8, 8) and model.concat_channels == 5
    assert torch.equal(cc[:, :1], torch.nn.functional.interpolate(square_mask(), size=(8, 8)).repeat(2, 1, 1, 1))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_only_pixels_outside_the_mask_condition_the_result(model, sampler):
    rgb = init_picture()
    inside, outside = rgb.copy(), rgb.copy()
    inside[20:44, 20:44] = 255 - inside[20:44, 20:44]  # within the repainted square
    outside[:8] = 255 - outside[:8]  # in the kept band
    base = inpaint(model, rgb, sampler).latents
    assert torch.equal(inpaint(model, inside, sampler).latents, base)
    assert not torch.equal(inpaint(model, outside, sampler).latents, base)


def test_kept_pixels_are_exact(model):
    rgb = init_picture()
    batch = inpaint(model, rgb)
    keep = square_mask()[0, 0].numpy() == 0
    for out in to_uint8_images(batch.decoded):
        final = composite(rgb, out, square_mask()[0])
        assert np.array_equal(final[keep], rgb[keep]) and not np.array_equal(final[~keep], rgb[~keep])


def test_cli_needs_a_mask_and_txt2img_points_to_img2img(inpaint_ckpt, tmp_path):
    Image.fromarray(init_picture()).save(tmp_path / "in.png")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    common = ["--config", str(CONFIG), "--ckpt", str(inpaint_ckpt), "--quiet", "--outdir", str(tmp_path / "out")]
    i2i = [sys.executable, str(REPO / "scripts" / "img2img.py"), "--init-img", str(tmp_path / "in.png"), *common]
    proc = subprocess.run(i2i, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "is an inpainting model: give --mask" in proc.stderr
    t2i = [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--H", "64", "--W", "64", *common]
    proc = subprocess.run(t2i, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "use scripts/img2img.py with --init-img and --mask" in proc.stderr
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    proc = subprocess.run(
        [*i2i, "--mask", str(tmp_path / "mask.png"), "--ddim_steps", "3", "--n_samples", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(tmp_path / "out" / "samples" / "00000.png").convert("RGB"))
    assert np.array_equal(out[mask == 0], init_picture()[mask == 0])
