"""--compile: torch.compile of the UNet, decided by the runtime policy and applied once when the model is built."""

from __future__ import annotations

import pytest
import torch

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.feature_reuse import reuse_features
from ldm.speed.runtime import Runtime, resolve_runtime
from ldm.util import is_compiled

S = SampleSettings(steps=3, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=11)
PROMPTS = [["a red cube", "a blue ball"]]


def test_policy():
    cpu = {"runtime": {"device": "cpu"}}
    assert resolve_runtime(cpu).compile is False  # off unless asked
    assert resolve_runtime({"runtime": {"device": "cpu", "compile": True}}).compile is True
    assert resolve_runtime({"runtime": {"device": "cpu", "compile": True}}, compile=False).compile is False
    on = resolve_runtime(cpu, precision="bf16", compile=True)
    assert on.compile and "UNet compiled" in on.describe()
    with pytest.raises(ValueError, match="true or false"):
        resolve_runtime({"runtime": {"device": "cpu", "compile": "fast"}})


def test_compiled_unet_draws_the_same_picture(tiny_config, tiny_ckpt):
    eager_rt = Runtime(torch.device("cpu"))
    compiled_rt = Runtime(torch.device("cpu"), compile=True)
    eager = load_model(tiny_config, tiny_ckpt, eager_rt, verbose=False)
    model = load_model(tiny_config, tiny_ckpt, compiled_rt, verbose=False)
    unet = model.model.diffusion_model
    assert is_compiled(unet) and not is_compiled(eager.model.diffusion_model)
    assert torch._inductor.config.freezing  # on a CPU the gain comes from weights packed for oneDNN
    assert list(model.state_dict()) == list(eager.state_dict())  # the checkpoint's keys, no _orig_mod prefix

    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]
    before = frames["ok"]
    (ours,) = generate(model, PROMPTS, S, compiled_rt, progress=False)
    assert frames["ok"] > before  # the UNet's calls really went through the compiler
    (ref,) = generate(eager, PROMPTS, S, eager_rt, progress=False)
    for name in ("latents", "decoded"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a - b).norm() / b.norm() < 1e-4, name

    with pytest.raises(ValueError, match="do not combine"), reuse_features(model, 3):
        pass

    # --low_memory frees the compiled UNet too (its compiled code is dropped with it), same picture
    (low,) = generate(model, PROMPTS, S, compiled_rt, progress=False, low_memory=True)
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert (low.latents - ref.latents).norm() / ref.latents.norm() < 1e-4
