"""`txt2img`: the original CompVis script's flags, defaults and output layout, on our library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from ldm.checkpoint_io import CheckpointError
from ldm.generate import SAMPLER_NAMES, SampleSettings, check_sampler, describe_samplers, generate, prompt_batches
from ldm.image_io import OutputWriter, Watermarker, grid_to_uint8, make_grid, to_uint8_images, to_unit_range
from ldm.infotext import format_infotext, legacy_model_hash
from ldm.load import load_config, load_model
from ldm.runtime import PRECISIONS, RuntimeChoiceError, resolve_runtime

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


class UsageError(ValueError):
    """Bad command-line input, reported as one line before any heavy work."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images from a text prompt with Stable Diffusion v1.")
    p.add_argument(
        "--prompt",
        type=str,
        nargs="?",
        default="a painting of a virus monster playing guitar",
        help="the prompt to render",
    )
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    p.add_argument(
        "--sampler",
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(SAMPLER_NAMES)}; 'list' describes them (default ddim, or plms with --plms)",
    )
    p.add_argument("--karras", action="store_true", help="Karras et al. noise levels (not for ddim/plms)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting code for every batch")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 is deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    p.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=3, help="how many samples per prompt, i.e. the batch size")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument(
        "--scale",
        type=float,
        default=7.5,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))",
    )
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="path to the model config")
    p.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="path to the checkpoint (.ckpt or .safetensors)")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument(
        "--precision",
        type=str,
        choices=PRECISIONS,
        default=None,
        help="evaluate at this precision (default: the config's runtime.precision)",
    )
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    p.add_argument(
        "--no-watermark",
        dest="watermark",
        action="store_false",
        help='do not embed the invisible "StableDiffusionV1" watermark',
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def read_batches(opt: argparse.Namespace) -> list[list[str]]:
    """The prompt n_samples times, or the file's prompts in batches of n_samples, as the original."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    try:
        with open(opt.from_file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --from-file {opt.from_file}: {e.strerror or e}") from None
    if not any(line.strip() for line in lines):
        raise UsageError(f"--from-file {opt.from_file} has no prompts (expected one prompt per line)")
    # Every line is a prompt, blank ones included (as empty prompts), as the original batches them.
    return prompt_batches(lines, opt.n_samples)


def sampler_name(opt: argparse.Namespace) -> str:
    return opt.sampler or ("plms" if opt.plms else "ddim")


def validate(opt: argparse.Namespace) -> None:
    """Reject bad input before the model is loaded."""
    if opt.plms and opt.sampler not in (None, "plms"):
        raise UsageError(f"--plms and --sampler {opt.sampler} disagree; give one of them")
    try:
        check_sampler(sampler_name(opt), "karras" if opt.karras else "discrete")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if opt.f < 1 or opt.H % opt.f or opt.W % opt.f or opt.H < opt.f or opt.W < opt.f:
        raise UsageError(f"--H {opt.H} and --W {opt.W} must be positive multiples of --f {opt.f} (e.g. 512)")
    if not 1 <= opt.ddim_steps <= 1000:
        raise UsageError(f"--ddim_steps must be between 1 and 1000, got {opt.ddim_steps}")
    for flag in ("n_samples", "n_iter"):
        if getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if not opt.scale >= 0 or opt.scale == float("inf"):
        raise UsageError(f"--scale must be a finite number >= 0, got {opt.scale}")
    if not opt.ddim_eta >= 0:
        raise UsageError(f"--ddim_eta must be >= 0, got {opt.ddim_eta}")
    if sampler_name(opt) == "plms" and opt.ddim_eta != 0:
        raise UsageError("PLMS needs --ddim_eta 0 (it is deterministic); use DDIM for eta > 0")
    if not os.path.isfile(opt.config):
        raise UsageError(f"config file not found: {opt.config}")
    if not os.path.exists(opt.ckpt):
        raise UsageError(
            f"checkpoint not found: {opt.ckpt} (download sd-v1-4.ckpt and put it there, or pass --ckpt PATH)"
        )


def run(opt: argparse.Namespace) -> list[str]:
    validate(opt)
    batches = read_batches(opt)
    config = load_config(opt.config)
    runtime = resolve_runtime(config, opt.device, opt.precision)
    settings = SampleSettings(
        steps=opt.ddim_steps,
        sampler=sampler_name(opt),
        schedule="karras" if opt.karras else "discrete",
        eta=opt.ddim_eta,
        scale=opt.scale,
        height=opt.H,
        width=opt.W,
        channels=opt.C,
        factor=opt.f,
        n_samples=opt.n_samples,
        n_iter=opt.n_iter,
        seed=opt.seed,
        fixed_code=opt.fixed_code,
    )
    os.makedirs(opt.outdir, exist_ok=True)
    writer = OutputWriter(opt.outdir, Watermarker() if opt.watermark else None)
    model = load_model(config, opt.ckpt, runtime)
    print(f"Sampling on {runtime.describe()}")
    written: list[str] = []
    grid_parts = []
    fields = {
        "Steps": settings.steps,
        "Sampler": settings.sampler + (" karras" if settings.schedule == "karras" else ""),
        "CFG scale": settings.scale,
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": legacy_model_hash(opt.ckpt),
        "Model": os.path.splitext(os.path.basename(opt.ckpt))[0],
    }
    if settings.sampler == "ddim" and settings.eta:
        fields["Eta"] = settings.eta
    for batch in generate(model, batches, settings, runtime, progress=not opt.quiet):
        unit = to_unit_range(batch.decoded).float().cpu()
        if not opt.skip_save:
            for i, (prompt, rgb) in enumerate(zip(batch.prompts, to_uint8_images(batch.decoded), strict=True)):
                # Seed plus iteration and batch position identify the image within the run.
                info = format_infotext(prompt, {**fields, "Iteration": batch.iteration, "Batch pos": i})
                written.append(str(writer.save_sample(rgb, {"parameters": info})))
        if not opt.skip_grid:
            grid_parts.append(unit)
    if grid_parts:
        grid = make_grid(torch.cat(grid_parts), nrow=opt.n_rows if opt.n_rows > 0 else opt.n_samples)
        written.append(str(writer.save_grid(grid_to_uint8(grid))))
    print(f"Your samples are ready and waiting for you here: {opt.outdir}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    opt = build_parser().parse_args(argv)
    if opt.sampler == "list":
        print(describe_samplers())
        return 0
    warnings.filterwarnings("ignore", message=".*Disabling autocast.*")
    try:
        run(opt)
    except (UsageError, CheckpointError, RuntimeChoiceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: images already written are complete; nothing partial was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
