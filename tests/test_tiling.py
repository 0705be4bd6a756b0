"""Tiled VAE decode (ldm.speed.tiling): placement and blending checked on a decoder whose exact tiled
answer is known, then the real (tiny) VAE and the CLI flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli.txt2img import main
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime
from ldm.speed.tiling import decode_tiled, tile_starts

from .conftest import TINY_CONFIG

CPU = Runtime(torch.device("cpu"))


@pytest.mark.parametrize("size,tile,overlap", [(64, 64, 16), (100, 64, 16), (129, 32, 8), (17, 8, 2), (5, 8, 2)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = torch.zeros(size, dtype=torch.int32)
    for s in starts:
        covered[s : s + tile] += 1
    assert (covered >= 1).all() and starts[0] == 0 and min(starts[-1] + tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def pointwise_decoder(z: torch.Tensor) -> torch.Tensor:
    """A decoder whose output at a pixel depends only on the latent under it (8x nearest upsampling of a
    fixed channel mix): tiling must then reproduce the whole-image decode up to rounding."""
    mix = torch.tensor([[0.5, -1.0, 0.25, 2.0], [1.0, 0.0, -0.5, 0.1], [-0.3, 0.7, 0.2, 0.0]])
    return F.interpolate(torch.einsum("oc,bchw->bohw", mix, z), scale_factor=8, mode="nearest")


@pytest.mark.parametrize("shape,tile", [((2, 4, 24, 40), 16), ((1, 4, 33, 17), 8), ((1, 4, 9, 9), 4)])
def test_blending_reproduces_a_local_decoder(shape, tile):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    whole = pointwise_decoder(z)
    tiled = decode_tiled(pointwise_decoder, z, tile)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def test_blending_cross_fades_where_tiles_disagree():
    """Each tile adds its own offset: inside a tile's exclusive area the result is that tile's, and across an
    overlap it moves monotonically from one tile's value to the next (no seam, no overshoot)."""
    offsets = iter(range(100))

    def decoder(z):
        return pointwise_decoder(torch.zeros_like(z)) + next(offsets)

    z = torch.zeros(1, 4, 8, 24)  # tiles of 8 with overlap 2: starts 0, 6, 12, 16
    out = decode_tiled(decoder, z, 8)[0, 0, 0]  # one pixel row, 192 wide
    assert out[:48].eq(0).all()  # first tile alone
    assert (out[1:] - out[:-1] >= -1e-6).all()  # offsets only grow left to right
    assert out[-1] == 3 and out.max() <= 3


@pytest.fixture(scope="module")
def tiny_model(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def test_tile_covering_the_image_is_the_plain_decode(tiny_model):
    z = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_model.decode_first_stage(z, tile=12), tiny_model.decode_first_stage(z))


def test_tiled_vae_decode_stays_near_the_whole_decode(tiny_model):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = tiny_model.decode_first_stage(z)
        tiled = tiny_model.decode_first_stage(z, tile=12)
    assert tiled.shape == whole.shape
    rel = ((tiled - whole).norm() / whole.norm()).item()
    # Per-tile GroupNorm statistics make it differ, but not as a different image would.
    other = tiny_model.decode_first_stage(torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3)))
    assert 0 < rel < 0.5 * ((other - whole).norm() / whole.norm()).item()


def test_cli_vae_tile(tmp_path, tiny_ckpt, capsys):
    def args(out, *extra):
        base = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--H", "128"]
        return base + ["--W", "96", "--ddim_steps", "2", "--skip_grid", "--quiet", "--outdir", str(out), *extra]

    assert main(args(tmp_path / "bad", "--vae_tile", "12")) == 2
    assert "--vae_tile must be a multiple" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(args(tmp_path / "whole", "--n_samples", "1")) == 0
    assert main(args(tmp_path / "tiled", "--n_samples", "1", "--vae_tile", "64")) == 0
    whole, tiled = (np.asarray(Image.open(tmp_path / d / "samples" / "00000.png")) for d in ("whole", "tiled"))
    assert whole.shape == tiled.shape == (128, 96, 3)
    assert (whole != tiled).any()
    assert Image.open(tmp_path / "tiled" / "samples" / "00000.png").text["parameters"].count("VAE tile: 64") == 1


def test_in_place_decoder_ops_keep_the_values(tiny_model):
    """Outside autograd the decoder's swish and residual adds write into fresh tensors to save memory; the
    pixels must equal the out-of-place computation's exactly (and the encoder's too)."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    vae = tiny_model.first_stage_model
    with torch.enable_grad():
        out_of_place, moments = vae.decode(z), vae.encode(x).mean
    with torch.no_grad():
        assert torch.equal(vae.decode(z), out_of_place)
        assert torch.equal(vae.encode(x).mean, moments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swish_keeps_float32_bits_and_rounds_once_in_16_bits(dtype):
    """float32: the original's x * sigmoid(x), bit for bit (F.silu differs in the last bit). 16 bits: F.silu,
    computed in float32 and rounded once, so nearer the exact value than the two ops' double rounding."""
    from ldm.modules.diffusionmodules.model import swish

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    two_ops = x * torch.sigmoid(x)
    expected = two_ops if dtype == torch.float32 else F.silu(x)
    with torch.enable_grad():
        assert torch.equal(swish(x.clone()), expected)
    with torch.no_grad():
        y = x.clone()
        assert torch.equal(swish(y), expected) and torch.equal(y, expected)  # in place outside autograd
    if dtype != torch.float32:
        exact = x.double() * torch.sigmoid(x.double())
        assert (expected.double() - exact).abs().mean() < (two_ops.double() - exact).abs().mean()
