"""`ldm-batch`: txt2img's flags (their definitions in `ldm.cli.options`, the config's `txt2img:` defaults included)
plus a prompt file and where to run. Without `--ray` every row runs in this process; with it, rows go to Ray actors
(`ldm.batch.ray_data`, the only module that imports Ray). Either way the driver writes the images and the manifest as
rows finish, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ldm.batch.make import MakeOptions, RowMaker
from ldm.batch.manifest import Output
from ldm.batch.rows import Row, read_rows
from ldm.cli.options import UsageError, build_parser, parse_args
from ldm.cli.txt2img import check_model_files

RAY_HINT = 'Ray is not installed; install it with: pip install -e ".[ray]"'


def ray_missing(error: ImportError) -> str:
    """The one line for `--ray` without a usable Ray."""
    if (error.name or "ray").split(".")[0] == "ray":
        return RAY_HINT
    return f'Ray cannot be imported ({error}); reinstall it with: pip install -e ".[ray]"'


def build_batch_parser() -> argparse.ArgumentParser:
    """txt2img's parser (so --config/--ckpt/--from-file/--outdir/--n_samples/--seed/--sampler/--ddim_steps/--scale/
    --H/--W mean the same) with the batch flags added. Flags that shape txt2img's grid or iterations are ignored."""
    p = build_parser()
    p.description = "Generate the images of every row of a prompt file, in this process or on a Ray cluster."
    p.set_defaults(outdir="outputs/batch")
    g = p.add_argument_group("batch")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run rows on Ray actors: alone, a new local Ray instance; 'auto' or ray://HOST:10001, a "
                        "running cluster (needs pip install -e '.[ray]')")  # fmt: skip
    g.add_argument("--actors", type=int, default=1, help="Ray actors, each holding one loaded model")
    g.add_argument("--cpus_per_actor", type=float, default=1.0, help="CPUs Ray reserves for each actor")
    g.add_argument("--gpus_per_actor", type=float, default=0.0, help="GPUs Ray reserves for each actor (e.g. 1)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per model (default: this process keeps torch's; an actor uses its CPUs)")
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    opt = parse_args(argv, builder=build_batch_parser)
    if not opt.from_file:
        raise UsageError("--from-file PROMPTS is required (a prompt a line, JSON lines or CSV with a 'prompt' column)")
    check_model_files(opt)
    for flag in ("n_samples", "actors"):
        if getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if opt.threads is not None and opt.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {opt.threads}")
    if opt.cpus_per_actor < 0 or opt.gpus_per_actor < 0:
        raise UsageError("--cpus_per_actor and --gpus_per_actor must be >= 0")
    return opt


def rows_of(opt: argparse.Namespace) -> list[Row]:
    defaults = {"negative_prompt": opt.negative_prompt, "W": opt.W, "H": opt.H, "steps": opt.ddim_steps,
                "sampler": opt.sampler or ("plms" if opt.plms else "ddim"), "scale": opt.scale}  # fmt: skip
    return read_rows(opt.from_file, defaults, opt.seed, opt.f)


def make_options(opt: argparse.Namespace) -> MakeOptions:
    from ldm.files.checkpoints import prefer_safetensors

    return MakeOptions(config=os.path.abspath(opt.config), ckpt=os.path.abspath(prefer_safetensors(opt.ckpt)),
                       n_samples=opt.n_samples, karras=opt.karras, eta=opt.ddim_eta, device=opt.device,
                       precision=opt.precision, watermark=opt.watermark, threads=opt.threads, deepcache=opt.deepcache,
                       tome=opt.tome, vae_tile=opt.vae_tile, vae=opt.vae)  # fmt: skip


def run_local(rows: Iterable[Row], options: MakeOptions) -> Iterator[dict[str, Any]]:
    """Every row in this process, one model."""
    maker = RowMaker(options)
    for row in rows:
        yield from maker.make(row)


def ray_runner(opt: argparse.Namespace):
    """The Ray path's generator function; UsageError with the install line when Ray is missing."""
    try:
        from ldm.batch.ray_data import run_on_ray  # the one module that imports Ray, loaded only for --ray
    except ImportError as e:
        raise UsageError(ray_missing(e)) from None

    def runner(rows: list[Row], options: MakeOptions) -> Iterator[dict[str, Any]]:
        return run_on_ray(rows, options, opt.ray, opt.actors, opt.cpus_per_actor, opt.gpus_per_actor)

    return runner


def run(opt: argparse.Namespace) -> dict[str, Any]:
    """Make every row not yet done; a summary (rows, images made now, seconds, images/s, workers)."""
    from tqdm import tqdm

    rows = rows_of(opt)
    runner = ray_runner(opt) if opt.ray is not None else run_local
    output = Output(opt.outdir, opt.n_samples)
    try:
        pending = output.resume(rows)
    except OSError as e:
        raise UsageError(f"cannot write to --outdir {opt.outdir}: {e.strerror or e}") from None
    skipped = len(rows) - len(pending)
    if skipped:
        print(f"Resuming: {skipped} of {len(rows)} rows are already done in {opt.outdir}", flush=True)
    start, made, workers = time.monotonic(), 0, set()
    bar = tqdm(total=len(pending) * opt.n_samples, unit="img", disable=opt.quiet or not pending, dynamic_ncols=True)
    first: float | None = None
    try:
        for record in runner(pending, make_options(opt)) if pending else ():
            output.add(record)
            first = first or time.monotonic()
            made += 1
            workers.add(record["worker"])
            bar.update(1)
    finally:
        bar.close()
        output.close()
    seconds = time.monotonic() - start
    summary = {"rows": len(rows), "skipped_rows": skipped, "images": made, "seconds": round(seconds, 3),
               "images_per_second": round(made / seconds, 4) if made else 0.0, "workers": sorted(workers),
               "first_image_seconds": round(first - start, 3) if first else None}  # fmt: skip
    print(f"{made} image(s) of {len(pending)} row(s) in {seconds:.1f} s; manifest: {output.manifest}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes as txt2img's: 0 done, 2 bad input (one `error:` line), 1 the run failed, 130 interrupted."""
    from ldm.cli.txt2img import _route_warnings, one_line
    from ldm.files.checkpoints import CheckpointError
    from ldm.speed.runtime import RuntimeChoiceError

    with warnings.catch_warnings():
        _route_warnings()
        try:
            run(parse(argv))
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        except (UsageError, CheckpointError, RuntimeChoiceError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: images in the manifest are complete; rerun the same command to resume", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
