"""Text-to-image generation as the original txt2img does it, batch by batch, as a library.

The order of random draws is the original's, so a seed gives the original's image: after seeding,
an optional fixed start code, then per batch the start noise followed by the sampler's per-step draws.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ldm.files.mapped_file import trim_heap
from ldm.generation.checks import check_finite
from ldm.generation.prompts import encode_pair, uses_custom_path
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling_common import DiscreteSampler, ddim_timesteps, guided_eps
from ldm.samplers.common import denoiser_from_eps
from ldm.samplers.lcm import lcm_denoiser, lcm_sigmas, lcm_timesteps
from ldm.samplers.registry import CONSISTENCY_SAMPLERS, SamplerInfo
from ldm.samplers.registry import SAMPLERS as K_SAMPLERS
from ldm.samplers.schedules import discrete_sigmas, karras_sigmas, sigmas_from_alphas_cumprod
from ldm.speed.feature_reuse import reuse_features
from ldm.speed.runtime import Runtime, dtype_name
from ldm.speed.token_merge import merge_tokens
from ldm.speed.weight_cast import compute_in
from ldm.util import is_compiled, seed_everything

# The original's samplers, exact to its images; they run on the DDIM sub-schedule of the model's steps.
ORIGINAL_SAMPLERS: dict[str, type[DiscreteSampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler}
ORIGINAL_DESCRIPTIONS = {
    "ddim": "DDIM as the original txt2img runs it (--ddim_eta adds noise); 1 UNet call per step",
    "plms": "PLMS as the original txt2img runs it (--plms); 1 UNet call per step, 2 on the first",
}
# The k-diffusion-style solvers (their DDIM/PLMS reference versions are left to the tests), and LCM.
SOLVERS: dict[str, SamplerInfo] = {
    **{k: v for k, v in K_SAMPLERS.items() if k not in ("ddim", "plms_sigma")},
    **CONSISTENCY_SAMPLERS,
}
SAMPLER_NAMES = (*ORIGINAL_SAMPLERS, *SOLVERS)
SCHEDULES = ("discrete", "karras")
# Called after each sampling step of a batch with (step index, steps in this batch, the step's estimate of the
# clean latents, for previews); it may raise to stop the run there (the image service cancels and enforces time
# limits that way). It must not change the latents and draws no random numbers.
StepCallback = Callable[[int, int, torch.Tensor], None]


def describe_samplers() -> str:
    """One line per sampler, for `--sampler list`."""
    lines = [f"{name:<13} {text}" for name, text in ORIGINAL_DESCRIPTIONS.items()]
    for name, info in SOLVERS.items():
        kind = "stochastic" if info.stochastic else f"order {info.order}"
        lines.append(f"{name:<13} {info.description} ({kind}, {info.evals_per_step} UNet call(s) per step)")
    return "\n".join(lines)


@dataclass
class SampleSettings:
    steps: int = 50
    sampler: str = "plms"
    eta: float = 0.0
    scale: float = 7.5
    height: int = 512
    width: int = 512
    channels: int = 4
    factor: int = 8
    n_samples: int = 1
    n_iter: int = 1
    seed: int = 42
    fixed_code: bool = False
    schedule: str = "discrete"
    # Long prompts in 75-token windows (None: only when a prompt uses weighting syntax), see ldm.generation.prompts.
    chunking: bool | None = None
    # Decode in tiles of this many pixels (None: the whole image at once), see ldm.speed.tiling.
    vae_tile: int | None = None
    # One full UNet call every `reuse_interval` calls, deep features reused between (<= 1: off), see
    # ldm.speed.feature_reuse.
    reuse_interval: int = 0
    # Share of tokens merged before each full-resolution self-attention (0: off), see ldm.speed.token_merge.
    token_merge: float = 0.0
    # "full": the model's VAE; "taesd": the tiny autoencoder attached with `attach_tiny_autoencoder` (ldm.models.taesd).
    vae: str = "full"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height // self.factor, self.width // self.factor)


@dataclass
class BatchResult:
    iteration: int
    prompts: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor | None
    x_T: torch.Tensor
    latents: torch.Tensor
    decoded: torch.Tensor


def check_sampler(name: str, schedule: str = "discrete", steps: int | None = None) -> None:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)} (or --sampler list)")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if name in ORIGINAL_SAMPLERS and schedule != "discrete":
        raise ValueError(f"{name} runs the original's own step selection; --karras needs one of {', '.join(SOLVERS)}")
    if name in CONSISTENCY_SAMPLERS and schedule != "discrete":
        raise ValueError(f"{name} runs on the grid its model was distilled on; drop --karras")
    if name in CONSISTENCY_SAMPLERS and steps is not None:
        lcm_timesteps(steps)  # its step count is bounded by that grid: say so before any work


def solver_sigmas(
    model, steps: int, schedule: str, device: torch.device, sampler: str = "", strength: float = 1.0
) -> torch.Tensor:
    """steps + 1 noise levels ending at 0: the model's own spacing, or Karras et al.'s over its range; for a
    consistency sampler, its distillation grid (cut to the lower `strength` part for img2img)."""
    if sampler in CONSISTENCY_SAMPLERS:
        return lcm_sigmas(model.alphas_cumprod, steps, strength=strength, device=device)
    if schedule == "karras":
        trained = sigmas_from_alphas_cumprod(model.alphas_cumprod)
        return karras_sigmas(steps, float(trained[0]), float(trained[-1]), device=device)
    return discrete_sigmas(model.alphas_cumprod, steps, device=device)


def embeds_guidance(model) -> bool:
    """Whether the model's UNet takes the guidance scale as an input (LCM-distilled, `time_cond_proj_dim`)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return bool(getattr(unet, "time_cond_proj_dim", None))


@contextmanager
def embedded_guidance(model, scale: float | None) -> Iterator[None]:
    """The guidance scale an LCM-distilled UNet embeds for the calls inside (None: the model's own setting)."""
    if scale is None:
        yield
        return
    unet = model.model.diffusion_model
    before, unet.guidance_scale = unet.guidance_scale, scale
    try:
        yield
    finally:
        unet.guidance_scale = before


def run_solver(
    model,
    s: SampleSettings,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator,
    progress: bool,
    wrap_denoiser: Callable | None = None,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the solver `s.sampler` from `x` along `sigmas`; guidance is applied inside the denoiser, which
    `wrap_denoiser` may wrap (inpainting pins the kept region's prediction to the known latents)."""
    consistency = s.sampler in CONSISTENCY_SAMPLERS  # such models only ever saw integer timesteps
    # An LCM-distilled UNet with a guidance input embeds the scale: one UNet pass per step, no guidance batch.
    embedded = consistency and embeds_guidance(model)
    eps = lambda x_, t: guided_eps(model, x_, t, cond, None if embedded else uncond, s.scale)  # noqa: E731
    denoiser = denoiser_from_eps(eps, model.alphas_cumprod, quantize=consistency)
    if consistency:
        denoiser = lcm_denoiser(denoiser, model.alphas_cumprod)
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)
    total = len(sigmas) - 1
    bar = tqdm(total=total, desc=f"{s.sampler} sampler", disable=not progress, leave=False)
    with bar, embedded_guidance(model, s.scale if embedded else None):

        def after_step(i: int, x_: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update(1)
            if step_callback is not None:
                step_callback(i, total, denoised)

        return SOLVERS[s.sampler].fn(denoiser, x, sigmas, generator=generator, callback=after_step)


def solve(
    model,
    s: SampleSettings,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    x_T: torch.Tensor,
    generator: torch.Generator,
    progress: bool,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """txt2img with a solver: from unit noise `x_T`, scaled to the schedule's first sigma (LCM: exactly the
    model's x_T, as its distillation and diffusers start, which is x_T * sqrt(1 + sigma^2) in this form)."""
    sigmas = solver_sigmas(model, s.steps, s.schedule, x_T.device, s.sampler)
    start = (1 + sigmas[0] ** 2).sqrt() if s.sampler in CONSISTENCY_SAMPLERS else sigmas[0]
    return run_solver(model, s, cond, uncond, x_T * start, sigmas, generator, progress, step_callback=step_callback)


def original_callback(step_callback: StepCallback | None, total: int):
    """The DDIM/PLMS samplers' `callback(i, x, pred_x0)` as a StepCallback call (None stays None)."""
    if step_callback is None:
        return None
    return lambda i, x, pred_x0: step_callback(i, total, pred_x0)


def original_steps(model, steps: int) -> int:
    """How many steps the original's DDIM/PLMS selection runs for `steps` (7 runs 8)."""
    return len(ddim_timesteps(steps, len(model.alphas_cumprod)))


def batch_place(s: SampleSettings, it: int, b: int, n_batches: int) -> str:
    return f"iteration {it + 1} of {s.n_iter}, batch {b + 1} of {n_batches}"


def nan_hint(s: SampleSettings, runtime: Runtime) -> str:
    """What to try when a batch goes NaN/inf: fp16 overflow first, then the settings that can blow up."""
    if runtime.reduced_precision:
        return f"{dtype_name(runtime.arithmetic_dtype)} overflowed: try --precision full"
    return (
        f"try a smaller --scale than {s.scale:g}, another sampler or step count than {s.sampler} at {s.steps}, "
        "or check that the checkpoint holds no NaN/inf weights"
    )


VAES = ("full", "taesd")


def tiny_autoencoder(model):
    """The tiny autoencoder attached to `model`, or a clear error naming how to give one."""
    tiny = getattr(model, "tiny_autoencoder", None)
    if tiny is None:
        raise ValueError(
            "--vae taesd needs the tiny autoencoder's files: give --taesd PATH (or a taesd: config section)"
        )
    return tiny


def decode(
    model,
    latents: torch.Tensor,
    runtime: Runtime,
    where: str,
    hint: str,
    tile: int | None = None,
    vae: str = "full",
) -> torch.Tensor:
    """Latents to pixels, both checked for NaN/inf. In reduced precision (autocast, fp16 weights) the SD VAE
    can overflow where float32 does not; then the decode is redone in float32 (a warning says so, and the
    VAE computes in float32 from then on) before giving up. `vae="taesd"` decodes with the tiny autoencoder."""
    check_finite(latents, f"sampling produced NaN/inf latents ({where})", hint)
    if vae == "taesd":
        decoded = tiny_autoencoder(model).decode(latents)
        check_finite(decoded, f"decoding produced NaN/inf pixels ({where})", hint)
        return decoded
    decoded = model.decode_first_stage(latents, tile=tile)
    if runtime.reduced_precision and not torch.isfinite(decoded).all():
        warnings.warn(
            f"the VAE overflowed in {dtype_name(runtime.arithmetic_dtype)} ({where}); decoding again in float32",
            stacklevel=2,
        )
        compute_in(model.first_stage_model, torch.float32)
        with torch.autocast(runtime.device.type, enabled=False):
            decoded = model.decode_first_stage(latents.float(), tile=tile)
    check_finite(decoded, f"decoding produced NaN/inf pixels ({where})", hint)
    return decoded


def free_weights(model, module: torch.nn.Module) -> None:
    """Drop `module`'s weights for good; pages of a memory-mapped checkpoint are given back too."""
    weights_file = getattr(model, "weights_file", None)
    if weights_file is not None:
        for t in (*module.parameters(), *module.buffers()):
            weights_file.release(t)
    module.to("meta")
    if any(is_compiled(m) for m in module.modules()):
        torch._dynamo.reset()  # the compiled code holds the frozen weights' packed copies
    gc.collect()
    trim_heap()


def latent_tile(s: SampleSettings) -> int | None:
    return None if s.vae_tile is None else max(1, s.vae_tile // s.factor)


def prompt_batches(prompts: Sequence[str], batch_size: int) -> list[list[str]]:
    """Group prompts into batches of `batch_size` (the last may be shorter)."""
    return [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def conditioning(
    model, prompts: Sequence[str], negatives: Sequence[str], s: SampleSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond) for a batch. Plain prompts take the original's path exactly: the unconditional
    batch is n_samples copies of the negative prompt (the original's "" by default), cut to the batch.
    Weighting syntax or `s.chunking` switch to `ldm.generation.prompts` (weighted tokens, 75-token windows)."""
    negatives = list(negatives)
    if any(uses_custom_path(t, s.chunking) for t in (*prompts, *negatives)):
        cond, uncond = encode_pair(model.cond_stage_model, list(prompts), negatives, chunking=s.chunking)
        return cond, (uncond if s.scale != 1.0 else None)
    uncond = None
    if s.scale != 1.0:
        if len(set(negatives)) == 1:
            uncond = model.get_learned_conditioning(s.n_samples * negatives[:1])[: len(prompts)]
        else:
            uncond = model.get_learned_conditioning(negatives)
    return model.get_learned_conditioning(list(prompts)), uncond


def encode_all_then_free(
    model, batches: Sequence[Sequence[str]], negative_prompt: str | Sequence[Sequence[str]], s: SampleSettings
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """--low_memory: free the VAE encoder, encode every batch's prompts, then free the text encoder. Encoding
    draws no random numbers, so doing it first changes no image."""
    free_weights(model, model.first_stage_model.encoder)
    encoded = [conditioning(model, p, _negatives_for(negative_prompt, b, len(p)), s) for b, p in enumerate(batches)]
    free_weights(model, model.cond_stage_model)
    return encoded


def _negatives_for(negative_prompt: str | Sequence[Sequence[str]], b: int, n: int) -> list[str]:
    if isinstance(negative_prompt, str):
        return n * [negative_prompt]
    negatives = list(negative_prompt[b])
    if len(negatives) != n:
        raise ValueError(f"batch {b + 1} has {n} prompts but {len(negatives)} negative prompts")
    return negatives


@torch.no_grad()
def generate(
    model,
    batches: Sequence[Sequence[str]],
    s: SampleSettings,
    runtime: Runtime,
    progress: bool = True,
    negative_prompt: str | Sequence[Sequence[str]] = "",
    low_memory: bool = False,
    step_callback: StepCallback | None = None,
) -> Iterator[BatchResult]:
    """Yield one decoded batch at a time: n_iter passes over `batches`.

    `negative_prompt` replaces the empty prompt of the unconditional branch: one for all, or per prompt
    in batches shaped like `batches`. A short last batch (prompts from a file not filling n_samples)
    samples as many images as it has prompts; the original crashed there.

    `low_memory` frees each part of the model once this run is done with it, for good (the model cannot be
    used afterwards): the VAE encoder at once, the text encoder after encoding every batch first, the UNet
    before the last decode. The images are the same.

    `step_callback(i, steps, denoised)` is called after every sampling step (see StepCallback); the images are the same.
    """
    check_sampler(s.sampler, s.schedule, s.steps)
    device = runtime.device
    sampler = ORIGINAL_SAMPLERS[s.sampler](model) if s.sampler in ORIGINAL_SAMPLERS else None
    seed_everything(s.seed)
    # Noise inside stochastic solvers comes from its own generator, so it never shifts the start noise.
    solver_noise = torch.Generator(device=device).manual_seed(s.seed)
    start_code = torch.randn((s.n_samples, *s.latent_shape), device=device) if s.fixed_code else None
    with runtime.autocast():
        encoded = encode_all_then_free(model, batches, negative_prompt, s) if low_memory else None
        for it in range(s.n_iter):
            for b, prompts in enumerate(batches):
                n = len(prompts)
                if encoded is not None:
                    cond, uncond = encoded[b]
                else:
                    cond, uncond = conditioning(model, prompts, _negatives_for(negative_prompt, b, n), s)
                x_T = start_code[:n] if start_code is not None else torch.randn((n, *s.latent_shape), device=device)
                with reuse_features(model, s.reuse_interval), merge_tokens(model, s.token_merge):
                    if sampler is not None:
                        latents = sampler.sample(
                            s.steps,
                            n,
                            s.latent_shape,
                            cond,
                            eta=s.eta,
                            unconditional_guidance_scale=s.scale,
                            unconditional_conditioning=uncond,
                            x_T=x_T,
                            progress=progress,
                            callback=original_callback(step_callback, original_steps(model, s.steps)),
                        )
                    else:
                        latents = solve(model, s, cond, uncond, x_T, solver_noise, progress, step_callback)
                if low_memory and it == s.n_iter - 1 and b == len(batches) - 1:
                    free_weights(model, model.model)
                where = batch_place(s, it, b, len(batches))
                decoded = decode(model, latents, runtime, where, nan_hint(s, runtime), latent_tile(s), s.vae)
                yield BatchResult(it, list(prompts), cond, uncond, x_T, latents, decoded)
