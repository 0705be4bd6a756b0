"""The float32 VAE fallback: when a reduced-precision decode overflows, decode again in float32.

No GPU here, so CUDA fp16 autocast is stood in for by CPU bf16 autocast through a Runtime whose
autocast is that, and a VAE that overflows whenever autocast is on (as SD's does in fp16 on some latents).
"""

from __future__ import annotations

import pytest
import torch

from ldm.generation.checks import NonFiniteError
from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime


class ReducedPrecisionRuntime(Runtime):
    @property
    def autocast_dtype(self):
        return torch.bfloat16

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def overflowing_when_autocast(model, always=False):
    real = model.decode_first_stage

    def decode(z, **kwargs):
        out = real(z, **kwargs)
        if always or torch.is_autocast_enabled("cpu"):
            return out + float("inf")
        return out

    model.decode_first_stage = decode


S = SampleSettings(steps=2, sampler="ddim", height=64, width=64, n_samples=1, seed=1)


def test_overflowing_reduced_precision_decode_is_redone_in_float32(tiny_config, tiny_ckpt):
    model = load_model(tiny_config, tiny_ckpt, Runtime(torch.device("cpu")), verbose=False)
    (reference,) = generate(model, [["a cat"]], S, Runtime(torch.device("cpu")), progress=False)
    overflowing_when_autocast(model)
    with pytest.warns(UserWarning, match="decoding again in float32"):
        (batch,) = generate(model, [["a cat"]], S, ReducedPrecisionRuntime(torch.device("cpu")), progress=False)
    assert torch.isfinite(batch.decoded).all()
    # The retry decodes the same latents without autocast: the float32 decode of them.
    with torch.no_grad():
        assert torch.equal(batch.decoded, model.first_stage_model.decode(1.0 / model.scale_factor * batch.latents))
    assert reference.decoded.shape == batch.decoded.shape


def test_a_decode_that_stays_non_finite_is_a_clear_error(tiny_config, tiny_ckpt):
    model = load_model(tiny_config, tiny_ckpt, Runtime(torch.device("cpu")), verbose=False)
    overflowing_when_autocast(model, always=True)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="decoding produced NaN/inf pixels"):
        list(generate(model, [["a cat"]], S, ReducedPrecisionRuntime(torch.device("cpu")), progress=False))
