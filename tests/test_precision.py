"""The precision policy (ldm.speed.runtime) and 16-bit weights computed in float32 (ldm.speed.weight_cast)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.files.mapped_file import MappedFile
from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import build_model, load_model
from ldm.speed.runtime import Runtime, resolve_runtime
from ldm.speed.weight_cast import compute_dtype, compute_in

CPU = Runtime(torch.device("cpu"))
CONFIG = {"runtime": {"device": "cpu", "precision": "full"}}
S = SampleSettings(steps=4, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=5)
PROMPTS = [["a red cube", "a blue ball"]]


@pytest.mark.parametrize("has_bf16", [False, True])
def test_policy(monkeypatch, has_bf16):
    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: has_bf16)
    full = resolve_runtime(CONFIG)
    assert (full.weight_dtype, full.arithmetic_dtype, full.casts_weights) == (torch.float32, torch.float32, False)
    bf16 = resolve_runtime(CONFIG, precision="bf16")
    assert bf16.weight_dtype == torch.bfloat16
    # bf16 arithmetic only where the CPU has it; otherwise float32 from bf16 weights
    assert bf16.arithmetic_dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert bf16.casts_weights is not has_bf16
    fp16 = resolve_runtime(CONFIG, precision="fp16")  # no CPU has fast fp16 convolutions
    assert (fp16.weight_dtype, fp16.arithmetic_dtype) == (torch.float16, torch.float32)
    assert "bfloat16" in bf16.describe() and "compute" in bf16.describe()
    assert resolve_runtime(CONFIG, precision="autocast").autocast_dtype is None  # as the original on a CPU


def _latents(model, runtime):
    (batch,) = generate(model, PROMPTS, S, runtime, progress=False)
    return batch


@pytest.fixture(scope="module")
def fp32_rounded_model(tiny_config, tiny_ckpt):
    """float32 weights holding bf16-rounded values: what bf16 weights computed in float32 must equal."""
    model = load_model(tiny_config, tiny_ckpt, CPU, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def test_bf16_weights_computed_in_float32_equal_float32_on_rounded_weights(tiny_config, tiny_ckpt, fp32_rounded_model):
    runtime = Runtime(torch.device("cpu"), "bf16", torch.bfloat16, torch.float32)
    model = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert compute_dtype(model.model.diffusion_model) == torch.float32
    ours = _latents(model, runtime)
    reference = _latents(fp32_rounded_model, CPU)
    assert ours.latents.dtype == torch.float32
    assert torch.equal(ours.latents, reference.latents)
    assert torch.equal(ours.decoded, reference.decoded)
    assert torch.equal(ours.cond, reference.cond)


def test_native_bf16_is_close_to_float32(tiny_config, tiny_ckpt):
    """Weights and arithmetic in bf16 (the path for CPUs with bf16 instructions, and CUDA)."""
    native = Runtime(torch.device("cpu"), "bf16", torch.bfloat16, None)
    model = load_model(tiny_config, tiny_ckpt, native, verbose=False)
    ours = _latents(model, native)
    reference = _latents(load_model(tiny_config, tiny_ckpt, CPU, verbose=False), CPU)
    assert ours.cond.dtype == torch.bfloat16 and ours.latents.dtype == torch.float32
    assert ours.decoded.dtype == torch.bfloat16
    rel = (ours.latents - reference.latents).norm() / reference.latents.norm()
    assert 0 < rel < 0.05


def test_vae_encode_returns_float32_posterior_from_bf16_weights(tiny_config, tiny_ckpt):
    native = Runtime(torch.device("cpu"), "bf16", torch.bfloat16, None)
    model = load_model(tiny_config, tiny_ckpt, native, verbose=False)
    posterior = model.encode_first_stage(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert posterior.mean.dtype == torch.float32


def test_compute_in_refuses_layers_it_cannot_run():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))

    model = nn.Sequential(nn.Linear(3, 3).bfloat16(), Odd())
    with pytest.raises(TypeError, match="Odd"):
        compute_in(model, torch.float32)


def test_compute_in_leaves_weights_and_state_dict_keys_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(36, 2)).bfloat16()
    keys = list(model.state_dict())
    compute_in(model, torch.float32)
    assert list(model.state_dict()) == keys
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(1, 3, 5, 5)
    rounded = [p.float() for p in model.parameters()]
    expected = nn.functional.conv2d(x, rounded[0], rounded[1])
    expected = nn.functional.group_norm(expected, 2, rounded[2], rounded[3])
    expected = nn.functional.linear(expected.flatten(1), rounded[4], rounded[5])
    assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------- giving back mapped pages


def test_release_leaves_ordinary_memory_alone():
    t = torch.arange(1 << 20, dtype=torch.float32)
    assert MappedFile("/proc/self/exe").release(t) == 0
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32))


def test_loading_to_16_bit_gives_back_the_files_pages(tmp_path, tiny_config, tiny_ckpt):
    """Converting a memory-mapped float32 file to bf16 weights: the process should end up holding about the
    bf16 copy, not the file's pages as well; and released pages still read back the file's values."""
    script = textwrap.dedent(
        f"""
        import torch
        from ldm.files.checkpoints import read_state_dict
        from ldm.files.mapped_file import MappedFile

        def rss():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024

        torch.save({{f"w{{i}}": torch.randn(512, 1024) for i in range(64)}}, {str(tmp_path / "w.ckpt")!r})
        for release in (False, True):
            base = rss()
            sd, _ = read_state_dict({str(tmp_path / "w.ckpt")!r})
            mapped = MappedFile({str(tmp_path / "w.ckpt")!r})
            out = {{}}
            for k, v in sd.items():
                out[k] = v.to(torch.bfloat16)
                if release:
                    mapped.release(v)
            print(release, (rss() - base) / 2**20)
            assert all(torch.equal(sd[k].to(torch.bfloat16), out[k]) for k in sd)
            del sd, out
        """
    )
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    kept, released = float(lines[1]), float(lines[3])
    # 128 MiB of float32 in the file, 64 MiB as bf16
    assert kept > 150
    assert released < 100


def test_build_model_releases_copied_sources(tiny_config, tiny_ckpt):
    from ldm.files.checkpoints import read_state_dict

    sd, _ = read_state_dict(tiny_ckpt)
    released = []
    runtime = Runtime(torch.device("cpu"), "bf16", torch.bfloat16, torch.float32)
    build_model(tiny_config.model, sd, runtime, release=released.append)
    floats = [k for k, v in sd.items() if v.is_floating_point() and k.startswith(("model.", "first_stage", "cond"))]
    assert len(released) >= len(floats) > 0
    released.clear()
    build_model(tiny_config.model, sd, CPU, release=released.append)  # float32 file, float32 weights: no copies
    assert len(released) < 5


def test_cli_bf16(tmp_path, tiny_ckpt, capsys, monkeypatch):
    from ldm.cli.txt2img import main

    from .conftest import TINY_CONFIG

    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: False)
    base = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--H", "64", "--W", "64"]
    base += ["--ddim_steps", "3", "--n_samples", "1", "--skip_grid", "--quiet", "--sampler", "euler"]
    assert main([*base, "--outdir", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert "weights bfloat16, compute float32" in capsys.readouterr().out
    assert main([*base, "--outdir", str(tmp_path / "full"), "--precision", "full"]) == 0
    a, b = (tmp_path / d / "samples" / "00000.png" for d in ("bf16", "full"))
    assert a.exists() and b.exists() and a.read_bytes() != b.read_bytes()


def test_low_memory_keeps_the_images(tiny_config, tiny_ckpt):
    """Encoding every batch first and dropping the parts of the model a run no longer needs (text and image
    encoders, then the UNet before the last decode) changes no image; the weights are really gone."""
    prompts = [["a red cube", "a blue ball"], ["a green cone"]]
    s = SampleSettings(steps=3, sampler="euler_a", height=64, width=64, n_samples=2, n_iter=2, seed=9)
    plain = [b.latents for b in generate(load_model(tiny_config, tiny_ckpt, CPU, verbose=False), prompts, s, CPU)]
    model = load_model(tiny_config, tiny_ckpt, CPU, verbose=False)
    runs = generate(model, prompts, s, CPU, progress=False, low_memory=True)
    freed = []
    for batch in runs:
        freed.append(batch.latents)
        assert all(p.is_meta for p in model.cond_stage_model.parameters())
        assert all(p.is_meta for p in model.first_stage_model.encoder.parameters())
        assert any(p.is_meta for p in model.model.parameters()) == (len(freed) == 4)  # only for the last decode
    assert len(freed) == len(plain) == 4
    assert all(torch.equal(a, b) for a, b in zip(freed, plain, strict=True))
    assert not any(p.is_meta for p in model.first_stage_model.decoder.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm32_in_16_bits(dtype):
    """bf16 runs the native kernel (float32 accumulation, no casts): within an output rounding of the float32
    computation. fp16 keeps the original's float32 detour (fp16's range), so it equals it exactly."""
    from ldm.modules.diffusionmodules.openaimodel import GroupNorm32

    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    norm = norm.to(dtype)
    x = (torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(0)) * 30 + 5).to(dtype)
    exact = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    out = norm(x)
    assert out.dtype == dtype
    if dtype == torch.float16:
        assert torch.equal(out, exact.half())
    else:
        ulp = exact.abs().clamp_min(1e-3) * 2**-7  # one bf16 step at the value's size
        assert ((out.float() - exact).abs() <= ulp).all()
