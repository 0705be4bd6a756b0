"""Every sampler end to end through txt2img on a tiny random model: finite, and the same seed gives
the same image on every run (stochastic solvers draw from a seeded generator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.txt2img import main
from ldm.generation.generate import SAMPLER_NAMES, SOLVERS, SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime

from .conftest import TINY_CONFIG

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def latents(model, sampler: str, seed: int, schedule: str = "discrete") -> torch.Tensor:
    s = SampleSettings(steps=6, sampler=sampler, schedule=schedule, height=64, width=64, n_samples=2, seed=seed)
    (batch,) = generate(model, [["a red cube", "a blue ball"]], s, CPU, progress=False)
    return batch.latents


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_finite_and_reproducible(tiny_model, sampler):
    a, b = latents(tiny_model, sampler, seed=3), latents(tiny_model, sampler, seed=3)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, latents(tiny_model, sampler, seed=4))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_sde"])
def test_karras_schedule_changes_the_result(tiny_model, sampler):
    a = latents(tiny_model, sampler, seed=3, schedule="karras")
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, latents(tiny_model, sampler, seed=3))


def test_solvers_agree_with_each_other_at_many_steps(tiny_model):
    """Different deterministic solvers of the same ODE converge to the same latents."""
    s = dict(height=32, width=32, n_samples=1, seed=5, scale=3.0)
    outs = {}
    for name in ("euler", "heun", "dpmpp_2m"):
        steps = 200 if name == "euler" else 60
        (batch,) = generate(tiny_model, [["x"]], SampleSettings(steps=steps, sampler=name, **s), CPU, progress=False)
        outs[name] = batch.latents
    ref = outs["dpmpp_2m"]
    for name in ("euler", "heun"):
        assert (outs[name] - ref).norm() / ref.norm() < 0.02, name


@pytest.mark.parametrize("sampler", sorted(SOLVERS))
def test_cli_same_seed_same_png(tmp_path, tiny_ckpt, sampler):
    args = [
        "--config",
        str(TINY_CONFIG),
        "--ckpt",
        str(tiny_ckpt),
        "--prompt",
        "a cat",
        "--H",
        "64",
        "--W",
        "64",
        "--ddim_steps",
        "4",
        "--n_samples",
        "1",
        "--n_iter",
        "1",
        "--skip_grid",
        "--quiet",
        "--sampler",
        sampler,
    ]
    for run in ("a", "b"):
        assert main([*args, "--outdir", str(tmp_path / run)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / run / "samples" / "00000.png")) for run in ("a", "b"))
    assert np.array_equal(a, b)


def test_cli_rejects_karras_for_the_original_samplers(capsys, tiny_ckpt):
    assert main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--plms", "--karras"]) == 2
    assert "--karras" in capsys.readouterr().err
    assert main(["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--sampler", "nope"]) == 2
    assert "unknown sampler 'nope'" in capsys.readouterr().err
