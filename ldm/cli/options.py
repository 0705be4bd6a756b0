"""The txt2img/img2img command line: the original's flags and defaults, our additions, and a config's own
`txt2img:` defaults. Parsing only; `ldm.cli.txt2img` validates and runs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ldm.generation.generate import SAMPLER_NAMES, VAES
from ldm.generation.load import load_config, resolve_config_path
from ldm.speed.runtime import PRECISIONS

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"


class UsageError(ValueError):
    """Bad command-line input, reported as one line before any heavy work."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2) instead of usage text + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


# torch.manual_seed's range (negative seeds wrap, as they always did here).
SEED_RANGE = (-(2**63), 2**64 - 1)
PATH_FLAGS = ("outdir", "from_file", "config", "ckpt", "lora_dir", "embeddings_dir")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Generate images from a text prompt with Stable Diffusion v1.")
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
    p.add_argument(
        "--vae",
        choices=VAES,
        default="full",
        help="full: the model's VAE; taesd: the tiny autoencoder (--taesd or the config's taesd: section), a fraction "
        "of the decode time for a little less detail (img2img also encodes with it)",
    )
    p.add_argument(
        "--taesd",
        action="append",
        default=[],
        metavar="PATH",
        help="the tiny autoencoder's files for --vae taesd: taesd_decoder.pth (+ taesd_encoder.pth for img2img), "
        ".safetensors of either, or diffusers' diffusion_pytorch_model.safetensors; repeat for two files",
    )
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
        "--channels_last",
        action="store_true",
        default=None,
        help="hold convolution weights and activations in NHWC order (faster on CPUs and GPUs; on a CPU each "
        "weight is also packed once for oneDNN; changes float32 results in the last bits; default: the config's "
        "runtime.channels_last, whose 'auto' means on for bf16 arithmetic on a CPU)",
    )
    p.add_argument(
        "--no_channels_last",
        dest="channels_last",
        action="store_false",
        help="keep the original NCHW layout even where runtime.channels_last is auto or true",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet, after a compile of a minute or more in each new process; meant for GPUs: "
        "on a CPU the default path measured as fast or faster (docs/performance.md), and compiling needs a C++ "
        "compiler there (default: the config's runtime.compile)",
    )
    p.add_argument(
        "--vae_tile",
        type=int,
        default=None,
        help="decode the image in overlapping tiles of this many pixels (e.g. 512) to bound the VAE's memory; "
        "for large images (changes pixels slightly at the tile seams)",
    )
    p.add_argument(
        "--low_memory",
        action="store_true",
        help="free each part of the model once the run is done with it: the VAE encoder at once, the text "
        "encoder after encoding every prompt first, the UNet before the last decode; the images are unchanged",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        default=0,
        metavar="N",
        help="run the full UNet only every N-th call and reuse its deep features in between (DeepCache; "
        "about N times fewer full calls, changes the image a little; try 3)",
    )
    p.add_argument(
        "--tome",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="merge this share of the tokens before each full-resolution self-attention (token merging, ToMe; "
        "faster at 512 pixels and up, changes the image; try 0.5)",
    )
    p.add_argument(
        "--no-watermark",
        dest="watermark",
        action="store_false",
        help='do not embed the invisible "StableDiffusionV1" watermark',
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--negative_prompt",
        type=str,
        default="",
        help="what to steer away from: replaces the empty prompt of the unconditional branch "
        "(in --from-file, a tab after a prompt starts that line's own negative prompt)",
    )
    p.add_argument(
        "--long_prompts",
        action="store_true",
        help="encode prompts past 75 tokens in extra 75-token windows instead of cutting them off "
        "(always on for prompts with (word:1.3)-style weighting)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="merge this LoRA (kohya or diffusers .safetensors, or .pt) into the model at WEIGHT (default 1) for "
        "the run; repeat for several. <lora:NAME:WEIGHT> in a prompt does the same with --lora_dir/NAME",
    )
    p.add_argument("--lora_dir", default="models/lora", help="where <lora:NAME:WEIGHT> prompt tags find NAME")
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH",
        help="textual-inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds); its file name (or "
        "stored token) is the word that triggers it in prompts; repeat for several",
    )
    p.add_argument(
        "--embeddings_dir",
        default="models/embeddings",
        help="embeddings here are used when their file name appears as a word in a prompt or negative prompt",
    )
    return p


def parse_args(argv: Sequence[str] | None = None, builder=None) -> argparse.Namespace:
    """Flags, with the defaults of the config's `txt2img:` section in place of the original's: a small
    model names its own checkpoint, size and sampler there. Flags given on the command line still win."""
    parser = (builder or build_parser)()
    opt = parser.parse_args(argv)
    if not os.path.isfile(opt.config):
        return opt  # validate() reports it
    try:
        section = load_config(opt.config).get("txt2img", None)
    except Exception as e:  # a malformed YAML file
        raise UsageError(f"cannot read config {opt.config}: {str(e).splitlines()[0]}") from None
    if not section:
        return opt
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UsageError(f"config {opt.config}: unknown txt2img defaults {', '.join(unknown)} (use flag names)")
    defaults = dict(section)
    if "ckpt" in defaults:
        defaults["ckpt"] = resolve_config_path(str(defaults["ckpt"]), opt.config)
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)
