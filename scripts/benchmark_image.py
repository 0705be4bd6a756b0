#!/usr/bin/env python
"""Whole images, end to end, for several recipes side by side in one process on one full-size SD v1 model.

Each row times one image: text encoding, sampling, decoding and the watermarked PNG written (model loading
excluded), with
the process's peak resident memory during it. The model has random full-size weights (`scripts/make_fake_ckpt.py`'s
rule, drawn in the target precision) or `--ckpt`; a random LCM-LoRA in kohya's format (rank `--lora_rank` over the
UNet's attention and ResNet layers, as the published LCM-LoRA) is merged, so the LCM rows run on merged weights as
they would with the real file; the tiny autoencoder has random weights in the published TAESD architecture.

    python scripts/benchmark_image.py                       # recommended 20-step recipe vs the fast LCM recipes
    python scripts/benchmark_image.py --recipes lcm-taesd --size 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from benchmark import DEFAULT_CONFIG, GIB, Memory, machine, random_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.adapters import apply_adapters  # noqa: E402
from ldm.files.image_output import OutputWriter, Watermarker, to_uint8_images  # noqa: E402
from ldm.generation.generate import SampleSettings, generate  # noqa: E402
from ldm.generation.load import build_model, load_config  # noqa: E402
from ldm.models.taesd import TinyAutoencoder  # noqa: E402
from ldm.speed.runtime import resolve_runtime  # noqa: E402

# name: (settings, what it is)
RECIPES = {
    "recommended": (
        dict(sampler="dpmpp_2m", schedule="karras", steps=20, scale=7.5, reuse_interval=3),
        "dpmpp_2m Karras, 20 steps, guidance 7.5, --deepcache 3, full VAE (today's recommended CPU command)",
    ),
    "lcm-taesd": (dict(sampler="lcm", steps=4, scale=1.0, vae="taesd"), "LCM, 4 steps, guidance 1, tiny decoder"),
    "lcm-vae": (dict(sampler="lcm", steps=4, scale=1.0), "LCM, 4 steps, guidance 1, full VAE decoder"),
}
PROMPT = "a photograph of an astronaut riding a horse"


def random_lcm_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """kohya-format factors for every Linear/Conv2d of the UNet's transformers and ResNet blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in unet.named_modules():
        if not isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if not any(s in path for s in ("transformer_blocks", "proj_in", "proj_out", "in_layers", "out_layers")):
            continue
        w = m.weight
        stem = "lora_unet_" + path.replace(".", "_")
        shape = (rank, w.shape[1], *w.shape[2:]) if w.ndim == 4 else (rank, w.shape[1])
        sd[f"{stem}.lora_down.weight"] = torch.randn(shape, generator=g) / w[0].numel() ** 0.5
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        sd[f"{stem}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.01
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    return sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--ckpt", help="a real checkpoint instead of random weights")
    p.add_argument("--precision", default="bf16", help="full, bf16 or fp16 (default bf16, the recommended)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the recipes (default 1)")
    p.add_argument("--lora_rank", type=int, default=64, help="rank of the random LCM-LoRA (the published one: 64)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or set(recipes) - set(RECIPES):
        p.error(f"--recipes: choose from {', '.join(RECIPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    runtime = resolve_runtime(config, "cpu", args.precision)
    memory = Memory(runtime.device)
    t0 = time.perf_counter()
    if args.ckpt:
        from ldm.files.checkpoints import read_state_dict

        sd, _ = read_state_dict(args.ckpt)
    else:
        sd = random_state_dict(config["model"], args.seed, runtime.weight_dtype)
    model, _ = build_model(config["model"], sd, runtime)
    del sd
    model.tiny_autoencoder = TinyAutoencoder().eval().requires_grad_(False).to(runtime.arithmetic_dtype)
    print(f"model built in {time.perf_counter() - t0:.0f} s on {runtime.describe()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        lora = os.path.join(tmp, "random-lcm-lora.safetensors")
        save_file(random_lcm_lora(model.model.diffusion_model, args.lora_rank, args.seed), lora)
        handle = apply_adapters(model, [(lora, 1.0)])
        writer = OutputWriter(os.path.join(tmp, "out"), Watermarker())  # as txt2img writes an SD image
        times: dict[str, list[float]] = {r: [] for r in recipes}
        peaks: dict[str, float] = {r: 0.0 for r in recipes}
        for _ in range(args.repeats):
            for name in recipes:
                settings = SampleSettings(height=args.size, width=args.size, n_samples=1, seed=args.seed,
                                          **RECIPES[name][0])  # fmt: skip
                memory.push()
                start = time.perf_counter()
                (batch,) = generate(model, [[PROMPT]], settings, runtime, progress=False)
                writer.save_sample(to_uint8_images(batch.decoded)[0], {"parameters": PROMPT})
                times[name].append(time.perf_counter() - start)
                peaks[name] = max(peaks[name], memory.pop())
                print(f"{name}: {times[name][-1]:.1f} s", file=sys.stderr)
        handle.remove()
    base = min(times[recipes[0]])
    print("\n".join(machine(runtime.device, torch.get_num_threads())))
    print(f"\n{args.size}x{args.size}, {args.precision}, a random rank-{args.lora_rank} LCM-LoRA merged; "
          f"best of {args.repeats}\n")  # fmt: skip
    print(f"| recipe | what | seconds per image | vs {recipes[0]} | peak resident |\n|---|---|---|---|---|")
    for name in recipes:
        t = min(times[name])
        print(f"| {name} | {RECIPES[name][1]} | {t:.1f} | {t / base:.2f} | {peaks[name] / GIB:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
