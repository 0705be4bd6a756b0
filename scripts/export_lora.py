#!/usr/bin/env python
"""Export the LoRA of a `main.py` LoRA run (ldm.training.lora) as a kohya-format .safetensors file, the format
the AUTOMATIC1111 web UI, ComfyUI, diffusers and our own `--lora` read.

example:
  python scripts/export_lora.py logs/digits-italic-lora/checkpoints/last.ckpt \
      models/demo/digits-italic-lora.safetensors --fp16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from ldm.files.checkpoints import CheckpointError, read_state_dict  # noqa: E402
from ldm.training.lora import export_kohya  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the run's checkpoint (e.g. logs/NAME/checkpoints/last.ckpt)")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--fp16", action="store_true", help="store the factors as float16 (half the size)")
    args = parser.parse_args(argv)
    if not args.dst.endswith(".safetensors"):
        print("error: the output must end in .safetensors", file=sys.stderr)
        return 2
    try:
        sd, info = read_state_dict(args.src)
        tensors = export_kohya(sd)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fp16:
        tensors = {k: v if k.endswith(".alpha") else v.half() for k, v in tensors.items()}
    step = info.get("global_step")
    metadata = {"ss_network_module": "networks.lora", "source": os.path.basename(args.src)}
    if step is not None:
        metadata["global_step"] = str(step)
    save_file(tensors, args.dst, metadata=metadata)
    layers = sum(k.endswith(".alpha") for k in tensors)
    print(f"wrote {args.dst}: {layers} layers, {os.path.getsize(args.dst) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
