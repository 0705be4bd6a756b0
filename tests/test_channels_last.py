"""--channels_last: convolution weights and activations in NHWC order, decided once by the runtime policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime, resolve_runtime
from ldm.speed.weight_cast import compute_in

S = SampleSettings(steps=3, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=7)
PROMPTS = [["a red cube", "a blue ball"]]
CL = torch.channels_last


def is_channels_last(t: torch.Tensor) -> bool:
    """NHWC and not also plain NCHW (a 1x1 or one-channel tensor is both)."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_policy_flag_wins_over_config():
    on = {"runtime": {"device": "cpu", "precision": "full", "channels_last": True}}
    assert resolve_runtime(on).channels_last
    assert not resolve_runtime(on, channels_last=False).channels_last
    assert resolve_runtime({"runtime": {"device": "cpu"}}, channels_last=True).memory_format == CL
    assert resolve_runtime({}, device="cpu").memory_format == torch.contiguous_format  # off unless asked
    assert "channels last" in resolve_runtime(on).describe()
    with pytest.raises(ValueError, match="true, false or auto"):
        resolve_runtime({"runtime": {"device": "cpu", "channels_last": "yes"}})


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_is_on_only_for_bf16_arithmetic_on_a_cpu(monkeypatch, has_bf16):
    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: has_bf16)
    for cfg in ({"runtime": {"device": "cpu"}}, {"runtime": {"device": "cpu", "channels_last": "auto"}}):
        assert resolve_runtime(cfg, precision="bf16").channels_last is has_bf16  # measured to pay there
        # float32 keeps the original's layout (and so its bits); fp16 and bf16 without the instructions
        # compute in float32 through the cast buffer
        for precision in ("full", "autocast", "fp16"):
            assert resolve_runtime(cfg, precision=precision).channels_last is False
        assert resolve_runtime(cfg, precision="bf16", channels_last=False).channels_last is False
    forced = {"runtime": {"device": "cpu", "channels_last": False}}
    assert resolve_runtime(forced, precision="bf16").channels_last is False


def conv_outputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    seen: list[torch.Tensor] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in convs]
    return seen, hooks


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_same_picture_with_nhwc_activations(tiny_config, tiny_ckpt, precision):
    base = Runtime(torch.device("cpu"))
    if precision == "bf16":  # 16-bit weights computed in float32 through the cast buffer
        base = Runtime(torch.device("cpu"), "bf16", torch.bfloat16, torch.float32)
    nhwc = Runtime(base.device, base.precision, base.weight_dtype, base.compute_dtype, channels_last=True)
    ref_model = load_model(tiny_config, tiny_ckpt, base, verbose=False)
    model = load_model(tiny_config, tiny_ckpt, nhwc, verbose=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(is_channels_last(m.weight) for m in convs)
    assert all(m.weight.dtype == base.weight_dtype for m in convs)

    seen, hooks = conv_outputs(model.model.diffusion_model)
    (ours,) = generate(model, PROMPTS, S, nhwc, progress=False)
    for h in hooks:
        h.remove()
    # The layout reaches the activations (the point of it), also through the bf16 weights' float32 buffer.
    spatial = [o for o in seen if o.shape[-1] > 1]
    assert spatial and sum(is_channels_last(o) for o in spatial) >= 0.9 * len(spatial)

    (ref,) = generate(ref_model, PROMPTS, S, base, progress=False)
    for name in ("latents", "decoded"):
        a, b = getattr(ours, name).float(), getattr(ref, name).float()
        assert (a - b).norm() / b.norm() < 1e-4, name
    assert torch.equal(ours.cond, ref.cond)  # the text encoder has no convolutions


def test_cast_buffer_keeps_the_layout():
    conv = nn.Conv2d(4, 6, 3).bfloat16().to(memory_format=CL).requires_grad_(False)  # frozen: the buffer path
    compute_in(conv, torch.float32)
    x = torch.randn(1, 4, 9, 9)  # plain NCHW, as the UNet's input is: the weight's layout must carry over
    out = conv(x)
    assert is_channels_last(out)
    expected = nn.functional.conv2d(x, conv.weight.float(), conv.bias.float())
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_cli_flag(tmp_path, tiny_ckpt):
    from PIL import Image

    from .test_cli import txt2img

    images = {}
    for name, flags in (("plain", []), ("nhwc", ["--channels_last"])):
        out = tmp_path / name
        common = ["--prompt", "a dog", "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1"]
        proc = txt2img(*common, "--n_iter", "1", "--skip_grid", "--outdir", str(out), *flags, ckpt=tiny_ckpt)
        assert proc.returncode == 0, proc.stderr
        assert ("channels last" in proc.stdout) == bool(flags)
        images[name] = torch.from_numpy(np.asarray(Image.open(out / "samples" / "00000.png")).astype(np.int16))
    assert (images["plain"] - images["nhwc"]).abs().max() <= 2
