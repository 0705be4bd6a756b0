"""TAESD, the tiny autoencoder (Ollin Boer Bohan): a 1.2M-parameter stand-in for SD's 84M-parameter VAE.

It encodes to and decodes from the UNet's own latents (already multiplied by the VAE's scale factor), at a
small cost in fine detail, in a fraction of the time: cheap final images on a CPU, and per-step previews.
The encoder and decoder are plain `nn.Sequential`s whose indices are the keys of the published
`taesd_encoder.pth` / `taesd_decoder.pth` files (`1.weight`, `3.conv.0.weight`, ...), so those load as they are;
`load_taesd` also reads the diffusers layout (`encoder.layers.N...`, `decoder.layers.N...`, one index lower in the
decoder, which has no clamp layer). Images are in [-1, 1] at this class's edges, as for `AutoencoderKL`.

Each stage of `encoder_blocks` / `decoder_blocks` after the first halves / doubles the resolution: the published
SD model has four stages (8x); the digits demo's has three (4x).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): the decoder never sees values it was not trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int = 4, channels: int = 64, blocks: Sequence[int] = (1, 3, 3, 3)) -> nn.Sequential:
    layers: list[nn.Module] = [conv(3, channels)]
    for i, n in enumerate(blocks):
        if i:
            layers.append(conv(channels, channels, stride=2, bias=False))
        layers += [Block(channels, channels) for _ in range(n)]
    return nn.Sequential(*layers, conv(channels, latent_channels))


def make_decoder(latent_channels: int = 4, channels: int = 64, blocks: Sequence[int] = (3, 3, 3, 1)) -> nn.Sequential:
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, channels), nn.ReLU()]
    for i, n in enumerate(blocks):
        layers += [Block(channels, channels) for _ in range(n)]
        if i < len(blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), conv(channels, channels, bias=False)]
    return nn.Sequential(*layers, conv(channels, 3))


class TinyAutoencoder(nn.Module):
    def __init__(
        self,
        latent_channels: int = 4,
        channels: int = 64,
        encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        decoder_blocks: Sequence[int] = (3, 3, 3, 1),
    ):
        super().__init__()
        self.encoder = make_encoder(latent_channels, channels, encoder_blocks)
        self.decoder = make_decoder(latent_channels, channels, decoder_blocks)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the UNet's latents."""
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder: give taesd_encoder.pth too (img2img encodes with it)")
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(x.to(dtype).add(1).div(2)).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's latents to images in [-1, 1] (not clamped, as the full VAE's output)."""
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(z.to(dtype)).mul(2).sub(1).to(z.dtype)


def split_halves(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) state dicts in the published numbering, from a file in any layout: diffusers'
    (`encoder.layers.N`, `decoder.layers.N` = published N + 1), this class's (`encoder.N`, `decoder.N`), or one
    published half (told apart by the first convolution: the encoder's takes 3 image channels, the decoder's
    the latents)."""
    if any(k.startswith(("encoder.", "decoder.")) for k in sd) and not any(".layers." in k for k in sd):
        # this class's own state dict (what our training writes): the published numbering under two prefixes
        return (
            {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")},
            {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")},
        )
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.layers.")}
        dec = {}
        for k, v in sd.items():
            if k.startswith("decoder.layers."):
                index, _, rest = k.removeprefix("decoder.layers.").partition(".")
                dec[f"{int(index) + 1}.{rest}"] = v
        return enc, dec
    if "0.weight" in sd and sd["0.weight"].shape[1] == 3:
        return sd, {}
    if "1.weight" in sd:
        return {}, sd
    first = next(iter(sd), "(empty)")
    raise ValueError(f"not a TAESD file: key {first!r} is neither the published layout nor diffusers'")


def load_taesd(paths: Sequence[str | os.PathLike], **config) -> TinyAutoencoder:
    """A `TinyAutoencoder` from one diffusers-layout file, or the published encoder and decoder files (either may
    be left out: a decoder alone serves txt2img). Read with the safe checkpoint reader: no pickle code runs."""
    from ldm.files.checkpoints import read_state_dict

    enc: dict[str, torch.Tensor] = {}
    dec: dict[str, torch.Tensor] = {}
    for path in paths:
        e, d = split_halves(read_state_dict(path, mmap=False)[0])
        enc.update(e)
        dec.update(d)
    if not dec:
        raise ValueError(f"no TAESD decoder among {', '.join(map(str, paths))} (give taesd_decoder.pth or similar)")
    latent_channels = dec["1.weight"].shape[1]
    model = TinyAutoencoder(latent_channels, dec["1.weight"].shape[0], **config)
    if not enc:
        model.encoder = None  # a decoder alone: encode() says what is missing
    for name, part, sd in (("encoder", model.encoder, enc), ("decoder", model.decoder, dec)):
        if part is None:
            continue
        missing, unexpected = part.load_state_dict(sd, strict=False)
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise ValueError(f"TAESD {name} does not fit this layout ({what}); check encoder/decoder_blocks")
    return model.eval().requires_grad_(False)
