"""Reference case made by running the original CompVis txt2img (CPU, float32) on the shared tool's
seed-0 checkpoint: our tokens, conditioning, start noise, latents and PNGs must match it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_config, load_model
from ldm.speed.runtime import resolve_runtime

from .conftest import CPU_CONFIG, ORACLE, REPO, fake_full_ckpt

pytestmark = pytest.mark.slow

CASE = json.loads((ORACLE / "args.json").read_text())
OPTS = CASE["txt2img_opts"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def result(all_threads):
    cfg = load_config(CPU_CONFIG)
    runtime = resolve_runtime(cfg, precision="full")
    model = load_model(cfg, fake_full_ckpt(), runtime, verbose=False)
    s = SampleSettings(
        steps=OPTS["ddim_steps"],
        sampler="plms" if OPTS["plms"] else "ddim",
        eta=OPTS["ddim_eta"],
        scale=OPTS["scale"],
        height=OPTS["H"],
        width=OPTS["W"],
        n_samples=OPTS["n_samples"],
        n_iter=OPTS["n_iter"],
        seed=OPTS["seed"],
        fixed_code=OPTS["fixed_code"],
    )
    (batch,) = generate(model, [[OPTS["prompt"]] * OPTS["n_samples"]], s, runtime, progress=False)
    tokens = model.cond_stage_model.tokenize([OPTS["prompt"]])
    tokens_uc = model.cond_stage_model.tokenize([""])
    return batch, tokens, tokens_uc


def test_tokens(result):
    _, tokens, tokens_uc = result
    np.testing.assert_array_equal(tokens.numpy(), np.load(ORACLE / "tokens.npy"))
    np.testing.assert_array_equal(tokens_uc.numpy(), np.load(ORACLE / "tokens_uc.npy"))


@pytest.mark.parametrize("name", ["cond", "uncond", "x_T", "latents"])
def test_tensors(result, name):
    batch = result[0]
    ours, ref = getattr(batch, name).float().numpy(), np.load(ORACLE / f"{name}.npy")
    assert ours.shape == ref.shape
    if name == "x_T":
        np.testing.assert_array_equal(ours, ref)  # same generator, same draw order: bit-identical
    else:
        assert rel_err(ours, ref) < (1e-5 if name != "latents" else 1e-4)


def test_decoded(result):
    ref = np.load(ORACLE / "decoded0.npy")  # the top-left crop of the first decoded image, before clamping
    ours = result[0].decoded[0, :, : ref.shape[1], : ref.shape[2]].numpy()
    assert rel_err(ours, ref) < 1e-4


def differing_fraction(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert x.shape == y.shape
    return float((np.abs(x - y) > 2).any(axis=-1).mean())


@pytest.mark.parametrize("watermark", [True, False], ids=["watermarked", "no-watermark"])
def test_cli_pngs(tmp_path, watermark):
    """Through the real CLI with the CPU config, CUDA hidden; `--precision autocast` for one of the two
    runs, since on a CPU the original's autocast("cuda") changes nothing."""
    argv = CASE["txt2img_argv"][1:]
    argv[argv.index("--ckpt") + 1] = str(fake_full_ckpt())
    precision = "full" if watermark else "autocast"
    argv += ["--config", str(CPU_CONFIG), "--precision", precision, "--outdir", str(tmp_path), "--quiet"]
    if not watermark:
        argv.append("--no-watermark")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "txt2img.py"), *argv],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    produced = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in produced] == ["00000.png"]
    assert not list(tmp_path.glob("grid-*.png"))  # --skip_grid
    ref_dir = "txt2img" if watermark else "nowm"
    ours, ref = Image.open(produced[0]), Image.open(ORACLE / ref_dir / "samples" / "00000.png")
    assert ours.size == ref.size and ours.mode == ref.mode
    assert differing_fraction(ours, ref) <= 0.005
    other = Image.open(ORACLE / ("nowm" if watermark else "txt2img") / "samples" / "00000.png")
    # The watermark itself moves many pixels by more than 2 levels, so this comparison has teeth.
    assert differing_fraction(ours, other) > 0.05
