"""The fast path in generation: `--sampler lcm` and `--vae taesd` do what they say, and change nothing else."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.cli.txt2img import main
from ldm.files.infotext import parse_infotext
from ldm.generation.generate import SampleSettings, generate
from ldm.generation.img2img import generate_img2img
from ldm.generation.load import attach_tiny_autoencoder, load_model
from ldm.models.taesd import TinyAutoencoder
from ldm.samplers.lcm import lcm_timesteps
from ldm.speed.runtime import Runtime

from .conftest import TINY_CONFIG

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def taesd_file(tmp_path_factory) -> str:
    """A tiny autoencoder with random weights for the tiny config's f = 8 latents, in our own file layout."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("taesd") / "tiny-taesd.safetensors"
    save_file({k: v.contiguous() for k, v in TinyAutoencoder(channels=16).state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_with_taesd(tiny_config, tiny_ckpt, taesd_file):
    return attach_tiny_autoencoder(
        load_model(tiny_config, tiny_ckpt, CPU, verbose=False), tiny_config, CPU, [taesd_file]
    )


def run(model, **kw):
    s = SampleSettings(**{"steps": 4, "height": 64, "width": 64, "n_samples": 2, "seed": 3, "sampler": "euler", **kw})
    (batch,) = generate(model, [["a red cube", "a blue ball"]], s, CPU, progress=False)
    return batch


def test_taesd_decodes_the_same_latents(model_with_taesd):
    """Only the decoder changes: the latents are those of the full-VAE run, bit for bit."""
    full, tiny = run(model_with_taesd), run(model_with_taesd, vae="taesd")
    assert torch.equal(full.latents, tiny.latents)
    assert torch.equal(tiny.decoded, model_with_taesd.tiny_autoencoder.decode(full.latents))
    assert not torch.allclose(tiny.decoded, full.decoded)


def test_lcm_at_guidance_1_makes_one_unet_call_per_step(model_with_taesd, monkeypatch):
    calls = []
    inner = model_with_taesd.apply_model
    monkeypatch.setattr(
        model_with_taesd, "apply_model", lambda x, t, c: calls.append((x.shape[0], t)) or inner(x, t, c)
    )
    batch = run(model_with_taesd, sampler="lcm", scale=1.0, steps=4)
    assert torch.isfinite(batch.latents).all()
    assert [n for n, _ in calls] == [2, 2, 2, 2]  # batch 2, no unconditional half
    assert [int(t[0]) for _, t in calls] == lcm_timesteps(4)  # integer timesteps of the distillation grid


def test_lcm_img2img_runs_all_its_steps_below_strength(model_with_taesd, monkeypatch):
    """As diffusers' LCM img2img: `steps` steps on the part of the 50-step grid below `strength`."""
    calls = []
    inner = model_with_taesd.apply_model
    monkeypatch.setattr(model_with_taesd, "apply_model", lambda x, t, c: calls.append(int(t[0])) or inner(x, t, c))
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = SampleSettings(steps=4, sampler="lcm", scale=1.0, height=64, width=64, n_samples=1, seed=1, vae="taesd")
    (batch,) = generate_img2img(model_with_taesd, [["a cat"]], s, CPU, init, 0.6, progress=False)
    assert calls == lcm_timesteps(4, strength=0.6) and max(calls) < 600
    assert torch.isfinite(batch.decoded).all()


def test_cli_fast_command_writes_what_it_did(tmp_path, tiny_ckpt, taesd_file):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--H", "64", "--W", "64",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--quiet", "--outdir", str(tmp_path)]  # fmt: skip
    assert main([*args, "--sampler", "lcm", "--ddim_steps", "4", "--scale", "1", "--vae", "taesd",
                 "--taesd", taesd_file]) == 0  # fmt: skip
    (png,) = sorted((tmp_path / "samples").glob("*.png"))
    _, _, fields = parse_infotext(Image.open(png).text["parameters"])
    assert fields["Sampler"] == "lcm" and fields["Steps"] == "4" and fields["VAE"] == "taesd"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vae", "taesd"], "--vae taesd needs the tiny autoencoder's files"),
        (["--sampler", "lcm", "--karras"], "drop --karras"),
        (["--sampler", "lcm", "--ddim_steps", "60"], "LCM takes 1 to 50 steps"),
        (["--vae", "taesd", "--taesd", "no/such/file.pth"], "no/such/file.pth"),
    ],
)
def test_cli_fast_path_errors_are_one_line(tmp_path, tiny_ckpt, capsys, extra, message):
    args = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--H", "64", "--W", "64",
            "--n_samples", "1", "--n_iter", "1", "--outdir", str(tmp_path / "out"), *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
