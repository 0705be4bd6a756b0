"""A config's `txt2img:` section replaces the original's flag defaults; flags still win."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.cli.options import DEFAULT_CKPT, UsageError, parse_args
from ldm.data.digit_eval import classify, fit_classifier
from ldm.generation.load import resolve_config_path

from .conftest import CPU_CONFIG, REPO

DEMO = REPO / "configs" / "demo" / "digits.yaml"


def test_demo_config_sets_its_own_defaults():
    opt = parse_args(["--config", str(DEMO)])
    section = OmegaConf.load(DEMO).txt2img
    assert (opt.H, opt.W, opt.f, opt.sampler, opt.ddim_steps) == (32, 32, 4, "dpmpp_2m", 20)
    assert opt.scale == section.scale and opt.watermark is False
    assert os.path.samefile(opt.ckpt, REPO / "models" / "demo" / "digits.safetensors")


def test_flags_win_over_config_defaults():
    opt = parse_args(["--config", str(DEMO), "--H", "64", "--sampler", "euler", "--ckpt", "x.ckpt", "--scale", "1"])
    assert (opt.H, opt.W, opt.sampler, opt.ckpt, opt.scale) == (64, 32, "euler", "x.ckpt", 1.0)


def test_configs_without_section_keep_the_original_defaults():
    opt = parse_args(["--config", str(CPU_CONFIG)])
    assert (opt.H, opt.W, opt.f, opt.ddim_steps, opt.scale, opt.ckpt) == (512, 512, 8, 50, 7.5, DEFAULT_CKPT)


def test_relative_checkpoint_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = resolve_config_path("models/demo/digits.safetensors", str(DEMO))
    assert os.path.isabs(found) and os.path.samefile(found, REPO / "models" / "demo" / "digits.safetensors")
    assert resolve_config_path("no/such/file.ckpt", str(DEMO)) == "no/such/file.ckpt"


def test_unknown_default_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("txt2img:\n  steps: 20\n")
    with pytest.raises(UsageError, match="unknown txt2img defaults steps"):
        parse_args(["--config", str(bad)])


def test_readme_command_draws_digits_from_a_fresh_directory(tmp_path):
    """The README's run command, from another working directory: eight 32x32 samples and a grid, no download."""
    script = REPO / "scripts" / "txt2img.py"
    out = tmp_path / "out"
    argv = [sys.executable, str(script), "--config", str(DEMO), "--prompt", "a handwritten digit 3",
            "--outdir", str(out), "--quiet"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 8
    with Image.open(samples[0]) as im:
        assert im.size == (32, 32)
        assert "a handwritten digit 3" in im.text["parameters"]
    assert len(list(out.glob("grid-*.png"))) == 1
    # And they are recognisably 3s to a classifier fitted on real digits.
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in samples])
    labels = classify(fit_classifier(), images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert (labels == 3).sum() >= 7, labels
