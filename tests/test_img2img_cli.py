"""scripts/img2img.py on the committed digits model: outputs, inpainting exactness, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO

DEMO = REPO / "configs" / "demo" / "digits.yaml"


def img2img(*args, cwd=None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "scripts" / "img2img.py"), "--config", str(DEMO), "--quiet", *map(str, args)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "seven.png"
    from ldm.generation.pipeline import Pipeline

    Pipeline.from_config(DEMO).txt2img("a handwritten digit 7", seed=3)[0].save(path)
    return path


def test_variations_and_parameters(init_png, tmp_path):
    proc = img2img(
        "--init-img", init_png, "--prompt", "a handwritten digit 7", "--strength", "0.5", "--outdir", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert len(samples) == 8 and len(list(tmp_path.glob("grid-*.png"))) == 1  # the config sets n_samples 8
    with Image.open(samples[0]) as im:
        assert im.size == (32, 32) and "Denoising strength: 0.5" in im.text["parameters"]


def test_inpainting_keeps_every_unmasked_pixel(init_png, tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    proc = img2img(
        "--init-img",
        init_png,
        "--mask",
        tmp_path / "mask.png",
        "--prompt",
        "a handwritten digit 0",
        "--strength",
        "1.0",
        "--outdir",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    src = np.asarray(Image.open(init_png).convert("RGB"))
    keep = mask == 0
    for path in sorted((out / "samples").glob("*.png")):
        got = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(got[keep], src[keep])
        assert not np.array_equal(got[~keep], src[~keep])


@pytest.mark.parametrize(
    "args,words",
    [
        (["--prompt", "x"], "--init-img is required"),
        (["--init-img", "nope.png"], "not found"),
        (["--strength", "1.5"], "--strength must be between 0 and 1"),
        (["--mask", "nope.png"], "mask not found"),
        (["--broken"], "cannot read image"),
    ],
)
def test_bad_input_is_one_line(init_png, tmp_path, args, words):
    if args == ["--broken"]:
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        args = ["--init-img", tmp_path / "broken.png"]
    elif "--init-img" not in args and args[0] != "--prompt":
        args = ["--init-img", init_png, *args]
    out = tmp_path / "out"
    proc = img2img(*args, "--outdir", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert not out.exists()


def test_low_memory_reaches_img2img_and_keeps_the_images(init_png, tmp_path, monkeypatch):
    import ldm.cli.img2img as cli

    seen = []
    real = cli.generate_img2img

    def spy(*args, **kw):
        seen.append(kw.get("low_memory"))
        return real(*args, **kw)

    monkeypatch.setattr(cli, "generate_img2img", spy)
    common = ["--config", str(DEMO), "--quiet", "--init-img", str(init_png), "--prompt", "a handwritten digit 1"]
    for name, flags in (("plain", []), ("low", ["--low_memory"])):
        assert cli.main([*common, "--n_samples", "2", "--outdir", str(tmp_path / name), *flags]) == 0
    assert seen == [False, True]
    plain, low = (sorted((tmp_path / d / "samples").glob("*.png")) for d in ("plain", "low"))
    assert len(plain) == len(low) == 2
    for a, b in zip(plain, low, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
