"""Typed request bodies of the three API families, and their one checked form: the stored job request.

Every family is turned into the same dict (the CLI's settings under our names) by `build_job`, which applies the
limits and names the caller's own field in each refusal (`cfg_scale` for A1111, `scale` for the native API).
Image inputs arrive as bytes (base64, data URLs or multipart) and are decoded here only to be checked; no client
string is ever used as a path.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict

from ldm.cli.options import SEED_RANGE
from ldm.files.image_input import MULTIPLE, ImageInputError, load_image_array, load_mask
from ldm.generation.generate import SAMPLER_NAMES, check_sampler
from ldm.serve.adapters import MAX_LORAS, AdapterCatalog
from ldm.serve.errors import ApiError, field_error
from ldm.serve.settings import Limits

SIZE_MULTIPLE = 8
UNSUPPORTED_TAG = re.compile(r"<(lyco|hypernet):", re.IGNORECASE)

# A1111's sampler names (lower-cased) -> ours; "<name> Karras" and the separate `scheduler` field pick the schedule.
A1111_SAMPLERS = {
    "euler a": "euler_a",
    "euler": "euler",
    "lms": "lms",
    "heun": "heun",
    "dpm2": "dpm2",
    "dpm2 a": "dpm2_a",
    "dpm++ 2s a": "dpmpp_2s_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "ddim": "ddim",
    "plms": "plms",
    "unipc": "unipc",
    "lcm": "lcm",
}
A1111_SCHEDULERS = {"automatic": None, "uniform": "discrete", "normal": "discrete", "karras": "karras"}


def resolve_sampler(name: str | None, scheduler: str | None, karras: bool, default: str, field_name: str):
    """(our sampler, schedule) from our name or an A1111 one ('DPM++ 2M Karras', 'Euler a' ...)."""
    schedule = "karras" if karras else None
    if scheduler is not None:
        key = scheduler.strip().lower()
        if key not in A1111_SCHEDULERS:
            raise field_error("scheduler", f"unknown scheduler {scheduler!r}; one of Automatic, Uniform, Karras")
        schedule = A1111_SCHEDULERS[key] or schedule
    text = (name or default).strip()
    key = text.lower()
    if key.endswith(" karras"):
        key, schedule = key.removesuffix(" karras"), "karras"
    sampler = A1111_SAMPLERS.get(key, key if key in SAMPLER_NAMES else None)
    if sampler is None:
        names = ", ".join([*SAMPLER_NAMES, "or A1111's names (Euler a, DPM++ 2M Karras, ...)"])
        raise field_error(field_name, f"unknown sampler {text!r}; choose one of {names}")
    schedule = schedule or "discrete"
    try:
        check_sampler(sampler, schedule)
    except ValueError as e:
        raise field_error(field_name, str(e).replace("--karras", "the Karras schedule")) from None
    return sampler, schedule


def decode_b64(text: str, field_name: str, limit: int) -> bytes:
    """Base64 or a data URL ('data:image/png;base64,...') to bytes."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise field_error(field_name, "a data URL must be base64 ('data:image/png;base64,...')")
    if len(text) > limit * 4 // 3 + 4:
        raise field_error(field_name, f"image is larger than the {limit} bytes allowed", 413)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise field_error(field_name, "malformed base64 (expected a base64 PNG/JPEG or a data URL)") from None
    if not data:
        raise field_error(field_name, "empty image")
    return data


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class JobSpec:
    """A request in the caller's terms, before checking; `names` maps our keys to the caller's field names."""

    prompt: str = ""
    negative_prompt: str = ""
    sampler: str | None = None
    scheduler: str | None = None
    karras: bool = False
    steps: int | None = None
    scale: float | None = None
    eta: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    n_iter: int = 1
    strength: float = 0.75
    init: bytes | None = None
    mask: bytes | None = None
    mask_blur: float = 0.0
    mask_dilate: int = 0
    mask_invert: bool = False
    resize_init: bool = False  # A1111/OpenAI: an init image of another size is resized to width x height
    eta_only_ddim: bool = False  # A1111 clients send eta for every sampler; only DDIM uses it
    loras: list[tuple[str, float]] = field(default_factory=list)  # (NAME in --lora_dir, weight), besides tags
    vae: str = "full"  # or "taesd": the tiny autoencoder decodes (and encodes img2img's input)
    previews: bool = False  # keep a tiny-decoder picture of each step's estimate for the progress events
    names: dict[str, str] = field(default_factory=dict)
    api: str = "native"


def build_job(
    spec: JobSpec,
    limits: Limits,
    defaults: dict[str, Any],
    adapters: AdapterCatalog | None = None,
    tiny: bool = False,
) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """(kind, stored request, input images) for a request, or ApiError naming the field. Decodes images: call it
    off the event loop. `adapters` lists the LoRAs requests may name; `tiny`: a tiny autoencoder is loaded."""

    def name(key: str) -> str:
        return spec.names.get(key, key)

    for key in ("prompt", "negative_prompt"):
        text = getattr(spec, key)
        if len(text) > limits.max_prompt:
            raise field_error(name(key), f"{len(text)} characters, more than the {limits.max_prompt} allowed")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise field_error(name(key), "not valid UTF-8 text") from None
        if UNSUPPORTED_TAG.search(text):
            raise field_error(name(key), "<lyco:...> and <hypernet:...> tags are not supported; use <lora:NAME:W>")
    loras = check_loras(spec, adapters, name)
    if spec.vae not in ("full", "taesd"):
        raise field_error(name("vae"), f"must be 'full' or 'taesd', got {spec.vae!r}")
    if (spec.vae == "taesd" or spec.previews) and not tiny:
        raise field_error(name("vae" if spec.vae == "taesd" else "previews"), "this server has no tiny autoencoder: "
                          "start it with --taesd PATH (or a config with a taesd: section)")  # fmt: skip
    sampler, schedule = resolve_sampler(spec.sampler, spec.scheduler, spec.karras, defaults["sampler"],
                                        name("sampler"))  # fmt: skip
    steps = defaults["ddim_steps"] if spec.steps is None else spec.steps
    if not 1 <= steps <= limits.max_steps:
        raise field_error(name("steps"), f"must be between 1 and {limits.max_steps} (--max_steps), got {steps}")
    try:
        check_sampler(sampler, schedule, steps)  # LCM's step count is bounded by its distillation grid
    except ValueError as e:
        raise field_error(name("steps"), str(e)) from None
    scale = float(defaults["scale"] if spec.scale is None else spec.scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise field_error(name("scale"), f"must be a finite number >= 0, got {scale}")
    eta = 0.0 if spec.eta is None or (spec.eta_only_ddim and sampler != "ddim") else float(spec.eta)
    if not (math.isfinite(eta) and eta >= 0):
        raise field_error(name("eta"), f"must be a finite number >= 0, got {eta}")
    if sampler == "plms" and eta != 0:
        raise field_error(name("eta"), "PLMS needs eta 0 (it is deterministic); use DDIM for eta > 0")
    seed, random_seed = spec.seed, spec.seed is None or spec.seed == -1
    if random_seed:
        seed = secrets.randbelow(2**32)  # fixed now, so a re-run after a crash makes the same images
    elif not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise field_error(name("seed"), f"{seed} is out of range (0 to {SEED_RANGE[1]}, or -1 for a random one)")
    if spec.n < 1 or spec.n > limits.max_images:
        raise field_error(name("n"), f"must be between 1 and {limits.max_images} (--max_images), got {spec.n}")
    if spec.n_iter < 1 or spec.n * spec.n_iter > limits.max_images:
        raise field_error(name("n_iter"), f"{spec.n} x {spec.n_iter} images; at most {limits.max_images} per request")
    for key in ("width", "height"):
        value = getattr(spec, key)
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            raise field_error(name(key), f"must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
    request: dict[str, Any] = dict(
        prompt=spec.prompt, negative_prompt=spec.negative_prompt, sampler=sampler, schedule=schedule, steps=steps,
        scale=scale, eta=eta, seed=seed, random_seed=random_seed, n=spec.n, n_iter=spec.n_iter, api=spec.api,
    )  # fmt: skip
    if loras:
        request["loras"] = loras
    if spec.vae != "full":
        request["vae"] = spec.vae
    if spec.previews:
        request["previews"] = True
    inputs: dict[str, bytes] = {}
    if spec.init is None:
        if spec.mask is not None:
            raise field_error(name("mask"), "a mask needs an init image")
        kind = "txt2img"
        width = int(defaults["W"] if spec.width is None else spec.width)
        height = int(defaults["H"] if spec.height is None else spec.height)
        factor = int(defaults["f"])
        if width % factor or height % factor:
            raise field_error(name("width"), f"width and height must be multiples of the model's factor {factor}")
    else:
        kind = "img2img"
        if not 0.0 <= spec.strength <= 1.0:
            raise field_error(name("strength"), f"must be between 0 and 1, got {spec.strength}")
        if not (0 <= spec.mask_blur <= 64 and 0 <= spec.mask_dilate <= 256):
            raise field_error(name("mask_blur"), "mask_blur must be in [0, 64] and mask_dilate in [0, 256]")
        init = spec.init
        try:
            rgb = load_image_array(init, 1, max_pixels=limits.max_image_pixels)
        except ImageInputError as e:
            raise field_error(name("init"), str(e)) from None
        if spec.resize_init and spec.width and spec.height and (spec.width, spec.height) != rgb.shape[1::-1]:
            init = png_bytes(Image.fromarray(rgb).resize((spec.width, spec.height), resample=Image.LANCZOS))
        try:
            rgb = load_image_array(init, MULTIPLE, max_pixels=limits.max_image_pixels)
        except ImageInputError as e:
            raise field_error(name("init"), str(e)) from None
        height, width = rgb.shape[:2]
        inputs["init"] = init
        if spec.mask is not None:
            try:
                load_mask(spec.mask, (width, height), max_pixels=limits.max_image_pixels)
            except ImageInputError as e:
                raise field_error(name("mask"), str(e)) from None
            mask = spec.mask
            if spec.mask_invert:
                mask = png_bytes(Image.eval(Image.open(io.BytesIO(mask)).convert("L"), lambda v: 255 - v))
            inputs["mask"] = mask
            kind = "inpaint"
        request.update(strength=spec.strength, mask_blur=spec.mask_blur, mask_dilate=spec.mask_dilate)
    if width * height > limits.max_pixels:
        raise field_error(name("width"), f"{width}x{height} is more than the {limits.max_pixels} pixels allowed "
                                         "(--max_pixels)")  # fmt: skip
    request.update(kind=kind, width=width, height=height)
    return kind, request, inputs


def check_loras(spec: JobSpec, adapters: AdapterCatalog | None, name) -> list[list]:
    """The request's `loras` field as stored ([NAME, weight] each), after checking it and the prompts' tags
    against the server's listing; a tag or name that is not listed is refused (no file is opened for it)."""
    count = 0
    for key in ("prompt", "negative_prompt"):
        text = getattr(spec, key)
        if "<lora:" not in text.lower():
            continue
        if adapters is None:
            raise field_error(name(key), "this server offers no LoRAs; remove the <lora:...> tag")
        try:
            count += len(adapters.check_tags(text))
        except ValueError as e:
            raise field_error(name(key), str(e)) from None
    stored = []
    for i, (lora, weight) in enumerate(spec.loras):
        if adapters is None:
            raise field_error(name("loras"), "this server offers no LoRAs")
        if not math.isfinite(weight):
            raise field_error(f"{name('loras')}[{i}].weight", f"must be a finite number, got {weight}")
        try:
            adapters.check_name(lora)
        except ValueError as e:
            raise field_error(f"{name('loras')}[{i}].name", str(e)) from None
        stored.append([lora, float(weight)])
    if count + len(stored) > MAX_LORAS:
        raise field_error(name("loras"), f"{count + len(stored)} LoRAs; at most {MAX_LORAS} per request")
    return stored


class LoraRef(BaseModel):
    """One LoRA of the server's --lora_dir (its name as `GET /v1/loras` lists it) and its weight."""

    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class NativeJob(BaseModel):
    """POST /v1/jobs. Unknown fields are refused (a typo should not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str | None = None
    karras: bool = False
    steps: int | None = None
    scale: float | None = None
    eta: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    n_iter: int = 1
    strength: float | None = None
    init_image: str | None = None
    mask: str | None = None
    mask_blur: float = 0.0
    mask_dilate: int = 0
    loras: list[LoraRef] = []
    vae: Literal["full", "taesd"] = "full"
    previews: bool = False


class A1111Txt2Img(BaseModel):
    """/sdapi/v1/txt2img; fields this server has no use for (hires fix, scripts, ...) are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] = []
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: float = 4.0
    inpainting_mask_invert: int = 0


class A1111Options(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sd_model_checkpoint: str | None = None


class A1111PngInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


class OpenAIGeneration(BaseModel):
    """/v1/images/generations; quality, style, user ... are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    model: str | None = None


def parse_size(size: str | None, field_name: str = "size") -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.strip())
    if not m:
        raise field_error(field_name, f"expected WIDTHxHEIGHT such as 512x512, got {size!r}")
    return int(m.group(1)), int(m.group(2))


def check_content_type(content_type: str | None, expected: str) -> None:
    if (content_type or "").split(";")[0].strip().lower() != expected:
        raise ApiError(415, f"Content-Type: expected {expected}, got {content_type or 'none'}", "Content-Type")
