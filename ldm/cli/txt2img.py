"""`txt2img`: the original CompVis script's flags, defaults and output layout, on our library."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.adapters import AdapterError, apply_adapters
from ldm.adapters.prompt_tags import AdapterPlan, plan_adapters
from ldm.cli.options import DEFAULT_CKPT, PATH_FLAGS, SEED_RANGE, UsageError, parse_args
from ldm.files.checkpoints import CheckpointError, prefer_safetensors
from ldm.files.image_output import OutputWriter, Watermarker, grid_to_uint8, make_grid, to_uint8_images, to_unit_range
from ldm.files.infotext import format_infotext, legacy_model_hash
from ldm.generation.checks import (
    NonFiniteError,
    available_memory,
    estimate_peak_bytes,
    format_bytes,
    model_widths,
    unwritable_dir_reason,
)
from ldm.generation.generate import (
    SampleSettings,
    check_sampler,
    describe_samplers,
    generate,
    prompt_batches,
)
from ldm.generation.load import attach_tiny_autoencoder, load_config, load_model
from ldm.generation.prompts import dropped_words
from ldm.speed.runtime import RuntimeChoiceError, resolve_runtime


def read_batches(opt: argparse.Namespace) -> list[list[str]]:
    """The prompt n_samples times, or the file's prompts in batches of n_samples, as the original."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    try:
        with open(opt.from_file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = f"not UTF-8 text ({e})" if isinstance(e, UnicodeDecodeError) else e.strerror or e
        raise UsageError(f"cannot read --from-file {opt.from_file}: {reason}") from None
    if not any(line.strip() for line in lines):
        raise UsageError(f"--from-file {opt.from_file} has no prompts (expected one prompt per line)")
    # Every line is a prompt, blank ones included (as empty prompts), as the original batches them.
    return prompt_batches(lines, opt.n_samples)


def split_negatives(batches: list[list[str]], default: str) -> tuple[list[list[str]], list[list[str]]]:
    """Prompt lines of the form "prompt<TAB>negative prompt" carry their own negative prompt."""
    prompts = [[line.split("\t", 1)[0] for line in batch] for batch in batches]
    negatives = [[line.split("\t", 1)[1] if "\t" in line else default for line in batch] for batch in batches]
    return prompts, negatives


def plan_run_adapters(
    opt: argparse.Namespace, batches: list[list[str]], negatives: list[list[str]]
) -> tuple[list[list[str]], list[list[str]], AdapterPlan, list[list[str]]]:
    """Prompts and negative prompts without their <lora:...> tags, the run's LoRAs and embeddings, and the prompts
    as the PNG records them: as given, plus a tag for each --lora flag, so the file says which LoRAs at what
    weight (AUTOMATIC1111 reads them back the same way)."""
    texts = [t for batch in (*batches, *negatives) for t in batch]
    stripped, plan = plan_adapters(
        texts, getattr(opt, "lora", []), getattr(opt, "embedding", []),
        getattr(opt, "lora_dir", "models/lora"), getattr(opt, "embeddings_dir", "models/embeddings"),
    )  # fmt: skip
    shown = [[f"{p} {plan.flag_tags}" if plan.flag_tags else p for p in batch] for batch in batches]
    return [[stripped[p] for p in b] for b in batches], [[stripped[p] for p in b] for b in negatives], plan, shown


def warn_truncated(model, batches: list[list[str]], chunking: bool | None) -> None:
    """The original cuts prompts at 75 tokens without a word; we keep its cut (and so its images) but say
    what was dropped."""
    window = model.cond_stage_model.max_length - 2
    for prompt in dict.fromkeys(p for batch in batches for p in batch):
        dropped = dropped_words(model.cond_stage_model, prompt, chunking=chunking)
        if dropped:
            warnings.warn(
                f"prompt longer than {window} tokens, cut as the original does; dropped: {dropped!r} "
                "(--long_prompts keeps them)",
                stacklevel=2,
            )


def sampler_name(opt: argparse.Namespace) -> str:
    return opt.sampler or ("plms" if opt.plms else "ddim")


def validate(opt: argparse.Namespace) -> None:
    """Reject bad input before the model is loaded (and before anything is created)."""
    if opt.prompt is None and not opt.from_file:
        raise UsageError("--prompt needs a value (or use --from-file)")
    if opt.prompt is not None:
        try:
            opt.prompt.encode("utf-8")
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 on the command line arrive as lone surrogates.
            raise UsageError("--prompt is not valid UTF-8 text (check the terminal's encoding)") from None
    for flag in PATH_FLAGS:
        value = getattr(opt, flag)
        if flag == "outdir" and not value:
            raise UsageError("--outdir needs a value (a directory to write images to)")
        if value is not None and "\0" in value:
            raise UsageError(f"--{flag.replace('_', '-')} holds a NUL character, which no path can contain")
    if opt.plms and opt.sampler not in (None, "plms"):
        raise UsageError(f"--plms and --sampler {opt.sampler!r} disagree; give one of them")
    try:
        check_sampler(sampler_name(opt), "karras" if opt.karras else "discrete", opt.ddim_steps)
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
    if not opt.ddim_eta >= 0 or opt.ddim_eta == float("inf"):
        raise UsageError(f"--ddim_eta must be a finite number >= 0, got {opt.ddim_eta}")
    if opt.C < 1:
        raise UsageError(f"--C must be at least 1, got {opt.C}")
    if not SEED_RANGE[0] <= opt.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed {opt.seed} is out of range (use 0 to {SEED_RANGE[1]})")
    if opt.vae_tile is not None and (opt.vae_tile < 8 * opt.f or opt.vae_tile % opt.f):
        raise UsageError(f"--vae_tile must be a multiple of --f {opt.f} and at least {8 * opt.f} pixels (e.g. 512)")
    if opt.deepcache < 0:
        raise UsageError(f"--deepcache must be 0 (off) or a number of UNet calls >= 1, got {opt.deepcache}")
    if not 0.0 <= opt.tome < 1.0:
        raise UsageError(f"--tome must be a share of the tokens in [0, 1), e.g. 0.5, got {opt.tome}")
    if opt.compile and opt.deepcache > 1:
        raise UsageError("--compile and --deepcache do not combine (feature reuse re-traces every step); choose one")
    if sampler_name(opt) == "plms" and opt.ddim_eta != 0:
        raise UsageError("PLMS needs --ddim_eta 0 (it is deterministic); use DDIM for eta > 0")
    check_model_files(opt)
    for directory in (opt.outdir, os.path.join(opt.outdir, "samples")):
        reason = unwritable_dir_reason(directory)
        if reason:
            raise UsageError(f"cannot write to --outdir {opt.outdir}: {reason}")


def check_model_files(opt: argparse.Namespace) -> None:
    """--config and --ckpt name files (the usual mistake: a folder, or the checkpoint not downloaded yet)."""
    if not os.path.isfile(opt.config):
        raise UsageError(f"config file not found: {opt.config}")
    if not os.path.exists(opt.ckpt):
        hint = "download sd-v1-4.ckpt and put it there" if opt.ckpt == DEFAULT_CKPT else "check the path"
        raise UsageError(f"checkpoint not found: {opt.ckpt} ({hint}, or pass --ckpt PATH)")
    if os.path.isdir(opt.ckpt):
        raise UsageError(f"checkpoint path is a directory: {opt.ckpt}; pass the model file inside it")


def check_fits(opt: argparse.Namespace, config, runtime, ckpt: str) -> None:
    """Refuse what the model or the memory cannot take, from the config alone (before loading weights)."""
    if not OmegaConf.select(config, "model.target", default=None):
        raise UsageError(f"config {opt.config} has no model.target: is it a model config (see configs/)?")
    channels = OmegaConf.select(config, "model.params.channels", default=None)
    if channels is None:
        channels = OmegaConf.select(config, "model.params.unet_config.params.in_channels", default=None)
    if isinstance(channels, int) and opt.C != channels:
        raise UsageError(f"--C {opt.C} does not match the model's {channels} latent channels; use --C {channels}")
    unet, vae, text = model_widths(config)
    # The file size, taken as float32 weights (an upper side: EMA copies and optimizer state count too),
    # scaled to the dtype they are held in.
    weight_bytes = os.path.getsize(ckpt) * runtime.weight_dtype.itemsize // 4 if os.path.isfile(ckpt) else 0
    need = estimate_peak_bytes(
        opt.H,
        opt.W,
        factor=opt.f,
        n_samples=opt.n_samples,
        guidance=opt.scale != 1.0,
        unet_channels=unet,
        vae_channels=vae,
        text_channels=text,
        weight_bytes=weight_bytes,
        dtype_bytes=runtime.arithmetic_dtype.itemsize,
        vae_tile=getattr(opt, "vae_tile", None),
    )
    have, what = available_memory(runtime.device)
    if have is not None and need > have:
        raise UsageError(
            f"--H {opt.H} --W {opt.W} with --n_samples {opt.n_samples} needs about {format_bytes(need)} of memory "
            f"(weights {format_bytes(weight_bytes)}), but {format_bytes(have)} is {what}; "
            "use a smaller --H/--W or --n_samples"
        )


@contextlib.contextmanager
def finish_before_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives while a file is written until the file is complete and in place.

    OutputWriter already removes its temp file when interrupted, but a signal landing between creating the
    temp file and entering its cleanup could still leave one behind; deferring it closes that gap, so an
    interrupted run keeps every image it started to write and leaves nothing partial.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored (SIG_IGN) or installed outside Python: leave it alone
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def prepare(opt: argparse.Namespace):
    """Config, runtime and checkpoint path, with every check that needs the config but not the weights."""
    config = load_config(opt.config)
    runtime = resolve_runtime(config, opt.device, opt.precision, opt.channels_last, opt.compile)
    ckpt = prefer_safetensors(opt.ckpt)
    check_fits(opt, config, runtime, ckpt)
    return config, runtime, ckpt


def settings_from(opt: argparse.Namespace) -> SampleSettings:
    return SampleSettings(
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
        chunking=True if opt.long_prompts else None,
        vae_tile=opt.vae_tile,
        reuse_interval=opt.deepcache,
        token_merge=opt.tome,
        vae=opt.vae,
    )


def load_for_run(
    opt: argparse.Namespace,
    config,
    runtime,
    ckpt: str,
    batches: list[list[str]],
    settings: SampleSettings,
    plan: AdapterPlan | None = None,
):
    """The model (with the plan's LoRAs merged and embeddings added), the image writer, and the PNG fields that
    name the LoRAs and embeddings."""
    if ckpt != opt.ckpt:
        print(f"Using {ckpt} in place of {opt.ckpt}: a .safetensors file needs no unpickling")
    model = load_model(config, ckpt, runtime)
    if opt.vae == "taesd":
        try:
            attach_tiny_autoencoder(model, config, runtime, opt.taesd, opt.config)
        except ValueError as e:  # a missing, unsafe or misfit file: one line, as every bad input
            raise UsageError(str(e)) from None
    fields: dict[str, str] = {}
    if plan:
        fields = apply_adapters(model, plan.loras, plan.embeddings).infotext_fields()
        print(f"Applied {len(plan.loras)} LoRA(s) and {len(plan.embeddings)} embedding(s)")
    warn_truncated(model, batches, settings.chunking)
    # Only now that the model loaded: a run that fails before this leaves no new directory behind.
    try:
        os.makedirs(opt.outdir, exist_ok=True)
        writer = OutputWriter(opt.outdir, Watermarker() if opt.watermark else None)
    except OSError as e:
        raise UsageError(f"cannot write to --outdir {opt.outdir}: {e.strerror or e}") from None
    print(f"Sampling on {runtime.describe()}", flush=True)
    return model, writer, fields


def infotext_fields(settings: SampleSettings, ckpt: str) -> dict[str, object]:
    fields: dict[str, object] = {
        "Steps": settings.steps,
        "Sampler": settings.sampler + (" karras" if settings.schedule == "karras" else ""),
        "CFG scale": settings.scale,
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": legacy_model_hash(ckpt),
        "Model": os.path.splitext(os.path.basename(ckpt))[0],
    }
    if settings.sampler == "ddim" and settings.eta:
        fields["Eta"] = settings.eta
    if settings.reuse_interval > 1:
        fields["DeepCache interval"] = settings.reuse_interval
    if settings.token_merge:
        fields["Token merging ratio"] = settings.token_merge
    if settings.vae_tile is not None:
        fields["VAE tile"] = settings.vae_tile
    if settings.vae != "full":
        fields["VAE"] = settings.vae
    return fields


def save_runs(
    opt: argparse.Namespace,
    runs,
    writer: OutputWriter,
    fields: dict[str, object],
    negatives: list[list[str]],
    finish=None,
    shown: list[list[str]] | None = None,
) -> list[str]:
    """Write each batch's samples (with their parameters) and the grid; `finish` maps a batch's uint8 images
    to the ones to save (inpainting's composite), and the grid then shows those. `shown` are the prompts to
    record, batch by batch (default: the ones sampled)."""
    written: list[str] = []
    grid_parts = []
    for b, batch in enumerate(runs):
        rgbs = to_uint8_images(batch.decoded)
        if finish is None:
            unit = to_unit_range(batch.decoded).float().cpu()  # the original's grid arithmetic
        else:
            rgbs = finish(rgbs)
            unit = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() / 255.0
        if not opt.skip_save:
            negs = negatives[b % len(negatives)]
            prompts = batch.prompts if shown is None else shown[b % len(shown)][: len(batch.prompts)]
            for i, (prompt, rgb) in enumerate(zip(prompts, rgbs, strict=True)):
                # Seed plus iteration and batch position identify the image within the run.
                extra = {"Iteration": batch.iteration, "Batch pos": i}
                info = format_infotext(prompt, {**fields, **extra}, negative_prompt=negs[i])
                with finish_before_interrupt():
                    written.append(str(writer.save_sample(rgb, {"parameters": info})))
        if not opt.skip_grid:
            grid_parts.append(unit)
    if grid_parts:
        grid = make_grid(torch.cat(grid_parts), nrow=opt.n_rows if opt.n_rows > 0 else opt.n_samples)
        with finish_before_interrupt():
            written.append(str(writer.save_grid(grid_to_uint8(grid))))
    print(f"Your samples are ready and waiting for you here: {opt.outdir}")
    return written


def run(opt: argparse.Namespace) -> list[str]:
    validate(opt)
    config, runtime, ckpt = prepare(opt)
    if OmegaConf.select(config, "model.params.conditioning_key", default=None) == "hybrid":
        raise UsageError(f"{opt.config} is an inpainting model: use scripts/img2img.py with --init-img and --mask")
    batches, shown_negatives = split_negatives(read_batches(opt), opt.negative_prompt)
    batches, negatives, plan, shown = plan_run_adapters(opt, batches, shown_negatives)
    settings = settings_from(opt)
    model, writer, adapter_fields = load_for_run(opt, config, runtime, ckpt, batches, settings, plan)
    runs = generate(
        model,
        batches,
        settings,
        runtime,
        progress=not opt.quiet,
        negative_prompt=negatives,
        low_memory=opt.low_memory,
    )
    fields = {**infotext_fields(settings, ckpt), **adapter_fields}
    return save_runs(opt, runs, writer, fields, shown_negatives, shown=shown)


def one_line(text: object) -> str:
    """`text` as one printable line: line breaks and other control characters (from a path or a prompt the
    user gave) are shown as escapes, so a message can never span lines."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def _fail(message: object, code: int) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one `warning: ...` line (not Python's two-line file:line format)."""
    print(f"warning: {one_line(' '.join(str(message).split()))}", file=file or sys.stderr)


def _route_warnings() -> None:
    """Show ldm's own warnings, one line each; hide libraries' (torch, transformers, ... deprecation notes
    and the like), which would turn a one-line error into a screenful. -W / PYTHONWARNINGS still win."""
    warnings.showwarning = _show_warning
    if not sys.warnoptions:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"ldm(\.|$)")
    warnings.filterwarnings("ignore", message=".*Disabling autocast.*")


OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)


def main(argv: Sequence[str] | None = None, parse=None, runner=None) -> int:
    """Exit codes: 0 done, 2 bad input (one `error:` line, nothing written), 1 the run failed (NaN/inf,
    out of memory), 130 interrupted (finished images are kept, no partial file is left).
    `parse` and `runner` let img2img share this handling."""
    with warnings.catch_warnings():
        _route_warnings()
        try:
            return _main(argv, parse or parse_args, runner or run)
        except KeyboardInterrupt:
            print("interrupted: images already written are complete; nothing partial was left", file=sys.stderr)
            return 130


def _main(argv: Sequence[str] | None, parse, runner) -> int:
    try:
        opt = parse(argv)
    except UsageError as e:
        return _fail(e, 2)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    if opt.sampler == "list":
        print(describe_samplers())
        return 0
    try:
        runner(opt)
    except (UsageError, CheckpointError, RuntimeChoiceError, AdapterError) as e:
        return _fail(e, 2)
    except NonFiniteError as e:
        return _fail(e, 1)
    except OUT_OF_MEMORY:
        size = f"{opt.n_samples} image(s) of {opt.W}x{opt.H}"
        return _fail(f"out of memory generating {size}; use a smaller --H/--W or --n_samples", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
