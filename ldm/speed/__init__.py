"""Code that only makes runs faster or smaller, never different in kind: the device/precision policy
(`runtime`), the native bf16 attention kernel, packed convolutions, 16-bit weight casting, fused epilogues,
VAE tiling, token merging, feature reuse. Model code reaches it only through `ldm.speed.hooks`."""
