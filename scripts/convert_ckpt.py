#!/usr/bin/env python
"""Convert an SD v1 checkpoint (.ckpt/.pt/.safetensors) into a .safetensors file that loads without unpickling.

examples:
  python scripts/convert_ckpt.py models/ldm/stable-diffusion-v1/model.ckpt   # -> model.safetensors beside it
  python scripts/convert_ckpt.py sd-v1-4-full-ema.ckpt --use-ema --fp16      # -> sd-v1-4-full-ema-fp16.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.files.checkpoints import CheckpointError  # noqa: E402
from ldm.files.convert import convert_checkpoint, describe  # noqa: E402


def default_dst(src: str, fp16: bool) -> str:
    """SRC with its suffix replaced, so the output sits beside the input where prefer_safetensors finds it."""
    stem = os.path.splitext(src)[0]
    return stem + ("-fp16.safetensors" if fp16 else ".safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="checkpoint to read (.ckpt, .pt, .pth or .safetensors)")
    parser.add_argument("dst", metavar="DST", nargs="?", help="output (default: SRC as .safetensors)")
    parser.add_argument("--fp16", action="store_true", help="store floating tensors as float16 (half the size)")
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights (model_ema.*) for the UNet")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    dst = args.dst or default_dst(args.src, args.fp16)
    try:
        summary = convert_checkpoint(args.src, dst, fp16=args.fp16, use_ema=args.use_ema, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
