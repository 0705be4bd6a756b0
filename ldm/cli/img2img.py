"""`img2img`: the original CompVis script's flags, defaults and meaning, plus inpainting with `--mask`.

Shares txt2img's checks, outputs and error handling (`ldm.cli.txt2img`); the picture-making is
`ldm.generation.img2img`. As in the original, outputs are not watermarked (`--watermark` adds it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from omegaconf import OmegaConf

from ldm.cli import options
from ldm.cli import txt2img as t2i
from ldm.cli.options import UsageError
from ldm.files.image_input import MULTIPLE, ImageInputError, load_image_array, load_mask, to_model_range
from ldm.generation.img2img import composite, generate_img2img


def build_parser() -> argparse.ArgumentParser:
    p = options.build_parser()
    p.description = "Make variations of an image (img2img), or repaint part of it (--mask), with Stable Diffusion v1."
    p.set_defaults(outdir="outputs/img2img-samples", n_samples=2, n_iter=1, scale=5.0, watermark=False)
    for action in p._actions:
        if action.dest in ("H", "W"):
            action.help = argparse.SUPPRESS  # the init image decides the size
        if action.dest == "watermark":
            action.help = argparse.SUPPRESS
    p.add_argument("--watermark", dest="watermark", action="store_true", help="embed the invisible watermark")
    p.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="strength for noising/unnoising: 1.0 ignores the input image, 0.0 returns it",
    )
    p.add_argument("--mask", type=str, help="inpainting mask: white = repaint, black = keep (same size as the image)")
    p.add_argument("--mask_dilate", type=int, default=0, help="grow the repainted area by this many pixels")
    p.add_argument("--mask_blur", type=float, default=0.0, help="feather the mask edge (Gaussian radius, pixels)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return options.parse_args(argv, builder=build_parser)


def run(opt: argparse.Namespace) -> list[str]:
    if not opt.init_img:
        raise UsageError("--init-img is required: the path of the image to start from")
    if not 0.0 <= opt.strength <= 1.0:
        raise UsageError(f"--strength must be between 0 and 1, got {opt.strength}")
    if opt.mask_dilate < 0 or not opt.mask_blur >= 0:
        raise UsageError("--mask_dilate and --mask_blur must be >= 0")
    try:
        rgb = load_image_array(opt.init_img, MULTIPLE)
        h, w = rgb.shape[:2]
        mask = None if opt.mask is None else load_mask(opt.mask, (w, h), opt.mask_dilate, opt.mask_blur)
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    opt.H, opt.W = h, w
    t2i.validate(opt)
    config, runtime, ckpt = t2i.prepare(opt)
    if OmegaConf.select(config, "model.params.conditioning_key", default=None) == "hybrid" and mask is None:
        raise UsageError(f"{opt.config} is an inpainting model: give --mask (white = repaint)")
    batches, shown_negatives = t2i.split_negatives(t2i.read_batches(opt), opt.negative_prompt)
    if len({n for batch in shown_negatives for n in batch}) > 1:
        raise UsageError("img2img takes one negative prompt for the run (--negative_prompt), not one per line")
    batches, negatives, plan, shown = t2i.plan_run_adapters(opt, batches, shown_negatives)
    settings = t2i.settings_from(opt)
    model, writer, adapter_fields = t2i.load_for_run(opt, config, runtime, ckpt, batches, settings, plan)
    print(f"target t_enc is {int(opt.strength * opt.ddim_steps)} steps")
    runs = generate_img2img(
        model,
        batches,
        settings,
        runtime,
        to_model_range(rgb),
        opt.strength,
        mask=mask,
        negative_prompt=negatives[0][0],
        progress=not opt.quiet,
        low_memory=opt.low_memory,
    )
    fields = {**t2i.infotext_fields(settings, ckpt), "Denoising strength": opt.strength, **adapter_fields}
    if mask is not None:
        fields["Mask blur"] = opt.mask_blur

    def finish(images: np.ndarray) -> list[np.ndarray]:
        return [composite(rgb, im, mask[0]) for im in images]

    return t2i.save_runs(
        opt, runs, writer, fields, shown_negatives, finish=None if mask is None else finish, shown=shown
    )


def main(argv: Sequence[str] | None = None) -> int:
    return t2i.main(argv, parse=parse_args, runner=run)


if __name__ == "__main__":
    sys.exit(main())
