"""txt2img through the real command line on a tiny random model: output layout, numbering,
precision choices on a CUDA-less CPU, and one-line errors that leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, TINY_CONFIG

SCRIPT = REPO / "scripts" / "txt2img.py"


def txt2img(*args: str, ckpt: Path | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--config", str(TINY_CONFIG), "--quiet", *args]
    if ckpt is not None:
        argv += ["--ckpt", str(ckpt)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_layout_numbering_and_grid(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    args = (
        "--prompt",
        "a cat",
        "--H",
        "64",
        "--W",
        "64",
        "--ddim_steps",
        "3",
        "--n_samples",
        "2",
        "--n_iter",
        "2",
        "--outdir",
        str(out),
    )
    first = txt2img(*args, ckpt=tiny_ckpt)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{i:05}.png" for i in range(4)]
    grid = Image.open(out / "grid-0000.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))  # 2 per row, 4 images, padding 2
    before = {p.name: p.read_bytes() for p in (out / "samples").iterdir()}
    (out / "samples" / "00001.png").unlink()  # a gap must not make the next run reuse a name
    second = txt2img(*args, "--plms", ckpt=tiny_ckpt)
    assert second.returncode == 0, second.stderr
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == ["00000.png", "00002.png", "00003.png", "00004.png", "00005.png", "00006.png", "00007.png"]
    for name in ("00000.png", "00002.png", "00003.png"):
        assert (out / "samples" / name).read_bytes() == before[name]
    assert (out / "grid-0001.png").exists()


def test_same_seed_same_image_and_precisions_on_a_cuda_less_cpu(tmp_path, tiny_ckpt):
    images = {}
    for precision in ("full", "autocast", "full"):
        out = tmp_path / precision
        proc = txt2img(
            "--prompt",
            "a dog",
            "--H",
            "64",
            "--W",
            "48",
            "--ddim_steps",
            "4",
            "--n_samples",
            "1",
            "--n_iter",
            "1",
            "--skip_grid",
            "--precision",
            precision,
            "--seed",
            "7",
            "--outdir",
            str(out),
            ckpt=tiny_ckpt,
        )
        assert proc.returncode == 0, proc.stderr
        img = np.asarray(Image.open(out / "samples" / "00000.png"))
        assert img.shape == (64, 48, 3)
        if precision in images:
            assert np.array_equal(images[precision], img)
        images[precision] = img
    # On a CPU, "autocast" is the original's autocast("cuda"): it changes nothing.
    assert np.array_equal(images["full"], images["autocast"])
    other = tmp_path / "seed8"
    txt2img(
        "--prompt",
        "a dog",
        "--H",
        "64",
        "--W",
        "48",
        "--ddim_steps",
        "4",
        "--n_samples",
        "1",
        "--n_iter",
        "1",
        "--skip_grid",
        "--seed",
        "8",
        "--outdir",
        str(other),
        ckpt=tiny_ckpt,
    )
    assert not np.array_equal(np.asarray(Image.open(other / "samples" / "00000.png")), images["full"])


def test_from_file_with_a_short_last_batch(tmp_path, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cone\n")
    out = tmp_path / "out"
    proc = txt2img(
        "--from-file",
        str(prompts),
        "--H",
        "64",
        "--W",
        "64",
        "--ddim_steps",
        "2",
        "--n_samples",
        "2",
        "--n_iter",
        "1",
        "--outdir",
        str(out),
        ckpt=tiny_ckpt,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "samples").iterdir())) == 3


BAD_INPUTS = {
    "missing checkpoint": (["--ckpt", "{tmp}/nope.ckpt"], "checkpoint not found"),
    "H not a multiple of 8": (["--H", "100"], "multiples of --f"),
    "zero steps": (["--ddim_steps", "0"], "--ddim_steps"),
    "negative scale": (["--scale", "-1"], "--scale"),
    "plms with eta": (["--plms", "--ddim_eta", "0.5"], "PLMS"),
    "empty prompt file": (["--from-file", "{tmp}/empty.txt"], "no prompts"),
    "unreadable prompt file": (["--from-file", "{tmp}/missing.txt"], "cannot read"),
    "not a checkpoint": (["--ckpt", "{tmp}/empty.txt"], "empty.txt"),
    "missing config": (["--config", "{tmp}/nope.yaml"], "config file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(tmp_path, tiny_ckpt, case):
    extra, needle = BAD_INPUTS[case]
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    args = ["--prompt", "x", "--H", "64", "--W", "64", "--outdir", str(out)]
    proc = txt2img(*args, *extra, ckpt=None if "--ckpt" in extra else tiny_ckpt)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())


def test_png_carries_its_generation_parameters(tmp_path, tiny_ckpt):
    from ldm.files.infotext import legacy_model_hash, parse_infotext

    out = tmp_path / "out"
    prompt = 'a "quoted", comma\u2019d prompt'
    proc = txt2img(
        "--prompt",
        prompt,
        "--H",
        "64",
        "--W",
        "48",
        "--ddim_steps",
        "3",
        "--n_samples",
        "2",
        "--n_iter",
        "1",
        "--seed",
        "9",
        "--scale",
        "5.5",
        "--sampler",
        "euler_a",
        "--karras",
        "--outdir",
        str(out),
        ckpt=tiny_ckpt,
    )
    assert proc.returncode == 0, proc.stderr
    for pos, name in enumerate(("00000.png", "00001.png")):
        text = Image.open(out / "samples" / name).text["parameters"]
        got_prompt, negative, fields = parse_infotext(text)
        assert got_prompt == prompt and negative == ""
        assert fields == {
            "Steps": "3",
            "Sampler": "euler_a karras",
            "CFG scale": "5.5",
            "Seed": "9",
            "Size": "48x64",
            "Model hash": legacy_model_hash(tiny_ckpt),
            "Model": "tiny",
            "Iteration": "0",
            "Batch pos": str(pos),
        }
