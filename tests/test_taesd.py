"""Our tiny autoencoder against diffusers' AutoencoderTiny, on random weights read from files in the layouts
that are published for it: the two `taesd_*.pth` halves (also as .safetensors) and diffusers' one file."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from ldm.files.checkpoints import CheckpointError
from ldm.models.taesd import TinyAutoencoder, load_taesd, split_halves


@pytest.fixture(scope="module")
def theirs() -> AutoencoderTiny:
    torch.manual_seed(0)
    model = AutoencoderTiny().eval()
    with torch.no_grad():  # non-trivial biases and scales, so a weight landing in the wrong layer shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def published_halves(theirs: AutoencoderTiny) -> tuple[dict, dict]:
    """diffusers' weights renamed to the published taesd_encoder / taesd_decoder numbering."""
    sd = theirs.state_dict()
    enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            i, _, rest = k.removeprefix("decoder.layers.").partition(".")
            dec[f"{int(i) + 1}.{rest}"] = v
    return enc, dec


@pytest.fixture(scope="module", params=["pth", "safetensors", "diffusers"])
def ours(request, theirs, tmp_path_factory) -> TinyAutoencoder:
    d = tmp_path_factory.mktemp(request.param)
    enc, dec = published_halves(theirs)
    if request.param == "pth":
        torch.save(enc, d / "taesd_encoder.pth")
        torch.save(dec, d / "taesd_decoder.pth")
        paths = [d / "taesd_encoder.pth", d / "taesd_decoder.pth"]
    elif request.param == "safetensors":
        save_file({k: v.contiguous() for k, v in dec.items()}, d / "taesd_decoder.safetensors")
        save_file({k: v.contiguous() for k, v in enc.items()}, d / "taesd_encoder.safetensors")
        paths = [d / "taesd_decoder.safetensors", d / "taesd_encoder.safetensors"]  # either order
    else:
        save_file(
            {k: v.contiguous() for k, v in theirs.state_dict().items()}, d / "diffusion_pytorch_model.safetensors"
        )
        paths = [d / "diffusion_pytorch_model.safetensors"]
    return load_taesd(paths)


@torch.no_grad()
def test_decoder_equals_diffusers(ours, theirs):
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1)) * 2
    expected = theirs.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 64, 96)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_encoder_equals_diffusers(ours, theirs):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = theirs.encode(x).latents
    torch.testing.assert_close(ours.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_the_published_models(theirs):
    """About 1.2M parameters per half (diffusers' count), against 49M in the full VAE's decoder."""
    model = TinyAutoencoder()
    for ours_half, their_half in ((model.encoder, theirs.encoder), (model.decoder, theirs.decoder)):
        n = sum(p.numel() for p in ours_half.parameters())
        assert n == sum(p.numel() for p in their_half.parameters()) and 1.1e6 < n < 1.3e6


def test_a_decoder_alone_decodes_and_says_what_encoding_needs(theirs, tmp_path):
    _, dec = published_halves(theirs)
    torch.save(dec, tmp_path / "taesd_decoder.pth")
    model = load_taesd([tmp_path / "taesd_decoder.pth"])
    assert model.decode(torch.zeros(1, 4, 2, 2)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no encoder: give taesd_encoder.pth"):
        model.encode(torch.zeros(1, 3, 16, 16))


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a TAESD file: key 'x'"):
        split_halves({"x": torch.zeros(1)})
    enc, dec = published_halves(AutoencoderTiny())
    save_file({k: v.contiguous() for k, v in enc.items()}, tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match="no TAESD decoder"):
        load_taesd([tmp_path / "enc.safetensors"])
    save_file({k: v.contiguous() for k, v in dec.items()}, tmp_path / "dec.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        load_taesd([tmp_path / "dec.safetensors"], decoder_blocks=(3, 3, 1))


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_malicious_pth_is_refused_with_nothing_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "taesd_decoder.pth"
    with open(path, "wb") as f:
        pickle.dump({"1.weight": _Boom()}, f)
    with pytest.raises(CheckpointError):
        load_taesd([path])
    assert not (tmp_path / "PWNED").exists()
