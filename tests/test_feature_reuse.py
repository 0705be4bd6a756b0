"""DeepCache-style feature reuse (ldm.speed.feature_reuse): shallow UNet calls reuse the deep features of the
last full call. A shallow call on the same inputs must give the full call's output exactly."""

from __future__ import annotations

import pytest
import torch

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.feature_reuse import FeatureReuse, reuse_features
from ldm.speed.runtime import Runtime

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500]), torch.randn(2, 77, 32, generator=g)


def count_middle_calls(unet) -> list[int]:
    calls = [0]
    unet.middle_block.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_shallow_call_on_unchanged_inputs_equals_the_full_call(tiny_model, depth):
    unet = tiny_model.model.diffusion_model
    x, t, ctx = inputs(0)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        unet.feature_reuse = FeatureReuse(interval=3, depth=depth)
        try:
            full = unet(x, t, ctx)
            shallow = unet(x, t, ctx)
            assert unet.feature_reuse.full_calls == 1
            # new inputs reach the outer blocks: the output changes, though the deep features are reused
            x2, t2, ctx2 = inputs(1)
            moved = unet(x2, t2, ctx2)
        finally:
            unet.feature_reuse = None
        assert torch.equal(full, plain)
        assert torch.equal(shallow, plain)
        assert not torch.allclose(moved, plain)
        assert not torch.equal(moved, unet(x2, t2, ctx2))  # and differs from a full call on them


def test_full_calls_follow_the_interval(tiny_model):
    unet = tiny_model.model.diffusion_model
    middle = count_middle_calls(unet)
    x, t, ctx = inputs(0)
    with torch.no_grad(), reuse_features(tiny_model, 3) as reuse:
        for _ in range(7):
            unet(x, t, ctx)
        assert reuse.full_calls == middle[0] == 3  # calls 0, 3, 6
        unet(x[:1], t[:1], ctx[:1])  # another batch size: nothing kept for it, so it runs in full
        assert middle[0] == 4
    assert unet.feature_reuse is None
    with torch.no_grad(), reuse_features(tiny_model, 1) as reuse:
        assert reuse is None


def test_generate_with_feature_reuse(tiny_model):
    def run(interval: int):
        s = SampleSettings(steps=9, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=3)
        s.reuse_interval = interval
        (batch,) = generate(tiny_model, [["a red cube", "a blue ball"]], s, CPU, progress=False)
        return batch.latents

    plain, reused, again = run(0), run(3), run(3)
    assert torch.equal(reused, again)
    assert torch.isfinite(reused).all() and not torch.equal(reused, plain)
    assert torch.equal(run(1), plain)


def test_in_place_feed_forward_keeps_the_values(tiny_model):
    """Outside autograd the transformer's GEGLU multiplies in place to save memory; the UNet output must equal
    the out-of-place computation's exactly."""
    unet = tiny_model.model.diffusion_model
    x, t, ctx = inputs(2)
    with torch.enable_grad():
        out_of_place = unet(x, t, ctx)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), out_of_place)
