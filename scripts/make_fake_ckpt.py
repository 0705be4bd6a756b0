#!/usr/bin/env python
"""Write a deterministic full-size SD v1 checkpoint with random weights, in the original's layout.

The weight rule is `ldm.files.fake_checkpoint`'s; `<out>.digest.json` records the sha256 of every tensor, so
two runs or two machines can be compared (`tests/reference/fake-ckpt-seed0-digest.json` is seed 0's).
About a minute and 5 GB of memory for the fp32 file (4.27 GB):

    python scripts/make_fake_ckpt.py --out /tmp/sd-fake-s0.ckpt --seed 0
    python scripts/make_fake_ckpt.py --out /tmp/sd-fake-s0.safetensors --safetensors --fp16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.files.fake_checkpoint import GLOBAL_STEP, SCHEDULE_BUFFERS, fake_state_dict, tensor_digest  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "stable-diffusion", "v1-inference.yaml")


def lightning_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """The top level of the real sd-v1-4.ckpt: besides the weights, Lightning's bookkeeping, with a
    `callbacks` dict keyed by the ModelCheckpoint class (so torch.load(weights_only=True) refuses it)."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    callback = {
        "monitor": None,
        "best_model_score": None,
        "best_model_path": "",
        "current_score": None,
        "dirpath": "logs/checkpoints",
    }
    return {
        "epoch": 0,
        "global_step": GLOBAL_STEP,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: callback},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="the model config whose keys and shapes to write")
    ap.add_argument("--fp16", action="store_true", help="cast every float32 tensor to float16")
    ap.add_argument("--safetensors", action="store_true", help="write .safetensors (flat state_dict)")
    ap.add_argument(
        "--exact-instantiation",
        action="store_true",
        help="only the model's own keys (omit the position_ids / model_ema.* a real file also holds)",
    )
    ap.add_argument(
        "--lightning-pickle",
        action="store_true",
        help="also store epoch / pytorch-lightning_version / callbacks like the real file",
    )
    args = ap.parse_args(argv)
    if args.safetensors and args.lightning_pickle:
        ap.error("--lightning-pickle describes a pickle; it does not combine with --safetensors")

    config = OmegaConf.load(args.config)
    sd = fake_state_dict(config.model, args.seed, fp16=args.fp16, exact_instantiation=args.exact_instantiation)
    total, per_key = tensor_digest(sd)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.safetensors:
        meta = {"format": "pt", "fake_sd_v1_seed": str(args.seed), "fp16": str(args.fp16)}
        save_file({k: v.contiguous() for k, v in sd.items()}, args.out, metadata=meta)
    else:
        ckpt = lightning_checkpoint(sd) if args.lightning_pickle else {"state_dict": sd, "global_step": GLOBAL_STEP}
        torch.save(ckpt, args.out)
    n_params = sum(
        v.numel()
        for k, v in sd.items()
        if k not in SCHEDULE_BUFFERS and v.is_floating_point() and not k.startswith("model_ema.")
    )
    info = {
        "file": os.path.basename(args.out),
        "seed": args.seed,
        "fp16": args.fp16,
        "safetensors": args.safetensors,
        "exact_instantiation": args.exact_instantiation,
        "lightning_pickle": args.lightning_pickle,
        "keys": len(sd),
        "parameters": n_params,
        "torch": torch.__version__,
        "sha256_all_tensors": total,
        "sha256_16_per_key": per_key,
    }
    with open(args.out + ".digest.json", "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {args.out}: {len(sd)} keys, {n_params} parameters, tensors sha256 {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
