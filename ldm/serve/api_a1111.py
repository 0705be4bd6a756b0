"""The AUTOMATIC1111-compatible API (/sdapi/v1/...), for the clients and tools built on it (webuiapi, ...).

txt2img/img2img answer when the job is done, as A1111 does, but go through the same persistent queue as every
other job. Sampler names are A1111's ('Euler a', 'DPM++ 2M Karras', with the separate `scheduler` field) mapped onto
ours; fields this server has no use for are ignored; the seed is the CLI's (one seed for the run), and `info` lists
it for every image.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ldm.files.infotext import parse_infotext
from ldm.generation.generate import SAMPLER_NAMES
from ldm.serve.api_common import image_paths, read_b64, read_json, service_of, submit
from ldm.serve.errors import ApiError, field_error
from ldm.serve.schemas import (
    A1111_SAMPLERS,
    A1111Img2Img,
    A1111Options,
    A1111PngInfo,
    A1111Txt2Img,
    JobSpec,
    decode_b64,
)

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
NAMES = {"scale": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "init": "init_images",
         "strength": "denoising_strength"}  # fmt: skip
DISPLAY = {ours: a1111 for a1111, ours in A1111_SAMPLERS.items()}
TITLES = {  # A1111's spelling of its sampler names
    "euler a": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpm2": "DPM2", "dpm2 a": "DPM2 a",
    "dpm++ 2s a": "DPM++ 2S a", "dpm++ 2m": "DPM++ 2M", "dpm++ sde": "DPM++ SDE", "dpm++ 2m sde": "DPM++ 2M SDE",
    "dpm++ 3m sde": "DPM++ 3M SDE", "ddim": "DDIM", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
}  # fmt: skip


def spec_from(body: A1111Txt2Img) -> JobSpec:
    return JobSpec(
        prompt=body.prompt, negative_prompt=body.negative_prompt, sampler=body.sampler_name or body.sampler_index,
        scheduler=body.scheduler, steps=body.steps, scale=body.cfg_scale, eta=body.eta, seed=body.seed,
        width=body.width, height=body.height, n=body.batch_size, n_iter=body.n_iter, eta_only_ddim=True,
        names=NAMES, api="a1111",
    )  # fmt: skip


def infotexts(paths) -> list[str]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.info.get("parameters", ""))
    return out


async def run_sync(request: Request, spec: JobSpec, params: dict[str, Any]) -> dict:
    """Queue, wait, answer A1111's {images, parameters, info}."""
    service = service_of(request)
    job, _ = await submit(request, spec)
    job = await service.wait_done(job.id)
    if job.status == "failed":
        raise ApiError(500, f"job {job.id} failed: {job.error}")
    paths = image_paths(service, job) if job.status == "succeeded" else []
    images, texts = await run_in_threadpool(lambda: (read_b64(paths), infotexts(paths)))
    r = job.request
    count = len(images)
    engine = service.worker.engine
    info = {
        "job_id": job.id, "prompt": r["prompt"], "all_prompts": count * [r["prompt"]],
        "negative_prompt": r["negative_prompt"], "all_negative_prompts": count * [r["negative_prompt"]],
        "seed": r["seed"], "all_seeds": count * [r["seed"]], "subseed": -1, "all_subseeds": count * [-1],
        "subseed_strength": 0, "width": r["width"], "height": r["height"],
        "sampler_name": TITLES.get(DISPLAY.get(r["sampler"], ""), r["sampler"]),
        "scheduler": "Karras" if r["schedule"] == "karras" else "Automatic", "cfg_scale": r["scale"],
        "steps": r["steps"], "batch_size": r["n"], "n_iter": r["n_iter"], "denoising_strength": r.get("strength"),
        "sd_model_name": engine.model_name if engine else None, "sd_model_hash": engine.model_hash if engine else None,
        "infotexts": texts, "interrupted": job.status == "cancelled", "index_of_first_image": 0,
        "restore_faces": False, "styles": [], "clip_skip": 1, "extra_generation_params": {},
        "note": "one seed for the run, as scripts/txt2img.py: image i is (seed, Iteration, Batch pos) in its infotext",
    }  # fmt: skip
    return {"images": images, "parameters": params, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request) -> dict:
    body = await read_json(request, A1111Txt2Img)
    return await run_sync(request, spec_from(body), body.model_dump())


@router.post("/img2img")
async def img2img(request: Request) -> dict:
    body = await read_json(request, A1111Img2Img)
    if not body.init_images:
        raise field_error("init_images", "give one image (base64 or a data URL)")
    limit = service_of(request).limits.max_body
    spec = spec_from(body)
    spec.init = decode_b64(body.init_images[0], "init_images", limit)
    spec.mask = None if not body.mask else decode_b64(body.mask, "mask", limit)
    spec.strength, spec.mask_blur = body.denoising_strength, body.mask_blur
    spec.mask_invert, spec.resize_init = bool(body.inpainting_mask_invert), True
    params = body.model_dump() | {"init_images": None, "mask": None}
    return await run_sync(request, spec, params)


@router.get("/progress")
async def progress(request: Request) -> dict:
    service = service_of(request)
    current = service.worker.current
    step, steps, eta = (current.step, current.steps, current.eta()) if current else (0, 0, None)
    preview = current.preview if current is not None else None  # jobs created with "previews": true
    image = None if preview is None else base64.b64encode(preview).decode("ascii")
    queued = service.store.queued()
    return {
        "progress": step / steps if steps else 0.0, "eta_relative": eta or 0.0,
        "state": {"skipped": False, "interrupted": False, "job": current.job_id if current else "",
                  "job_count": queued + (1 if current else 0), "job_timestamp": "", "job_no": 0,
                  "sampling_step": step, "sampling_steps": steps},
        "current_image": image, "textinfo": None, "current_task": current.job_id if current else None,
    }  # fmt: skip


@router.post("/interrupt")
async def interrupt(request: Request) -> dict:
    """Stop the running job at its next step (it ends cancelled, with no image); queued jobs are untouched."""
    return {"interrupted": service_of(request).worker.interrupt()}


@router.get("/samplers")
async def samplers() -> list[dict]:
    listed = [{"name": TITLES[k], "aliases": [v], "options": {}} for k, v in A1111_SAMPLERS.items()]
    return listed + [{"name": s, "aliases": [], "options": {}} for s in SAMPLER_NAMES if s not in DISPLAY]


@router.get("/schedulers")
async def schedulers() -> list[dict]:
    return [{"name": n, "label": n.title(), "aliases": None} for n in ("automatic", "uniform", "karras")]


def model_entry(request: Request) -> dict:
    engine = service_of(request).worker.engine
    if engine is None:
        raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
    filename = engine.ckpt.rsplit("/", 1)[-1]
    title = f"{filename} [{engine.model_hash}]"
    return {"title": title, "model_name": engine.model_name, "hash": engine.model_hash, "sha256": None,
            "filename": filename, "config": None}  # fmt: skip


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict]:
    return [model_entry(request)]


@router.get("/options")
async def get_options(request: Request) -> dict:
    title = model_entry(request)["title"]
    return {"sd_model_checkpoint": title, "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0}


@router.post("/options")
async def set_options(request: Request) -> JSONResponse:
    """What applies: `sd_model_checkpoint` may name the loaded model (one model per process); other keys are
    accepted and have no effect."""
    check = await read_json(request, A1111Options)
    wanted = check.sd_model_checkpoint
    entry = model_entry(request)
    if wanted is not None and wanted not in (entry["title"], entry["model_name"], entry["filename"]):
        raise field_error("sd_model_checkpoint", f"this server has one model, {entry['title']!r}; start another "
                                                 "ldm-serve for another model")  # fmt: skip
    return JSONResponse(None)


@router.post("/png-info")
async def png_info(request: Request) -> dict:
    """The "parameters" text of a PNG (given as base64), parsed as A1111 does; the pixels are not decoded."""
    body = await read_json(request, A1111PngInfo)
    data = decode_b64(body.image, "image", service_of(request).limits.max_body)
    try:
        with Image.open(io.BytesIO(data)) as im:
            chunks = {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise field_error("image", "not an image this server can read (PNG, JPEG, ...)") from None
    text = chunks.pop("parameters", "")
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, fields = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **fields}
    return {"info": text, "items": chunks, "parameters": parameters}


@router.get("/loras")
async def loras(request: Request) -> list[dict]:
    """The LoRAs `<lora:NAME:WEIGHT>` may name (the server's --lora_dir; no server path is shown)."""
    names = await run_in_threadpool(lambda: sorted(service_of(request).adapters.loras()))
    return [{"name": n, "alias": n, "path": None, "metadata": {}} for n in names]


@router.get("/embeddings")
async def embeddings(request: Request) -> dict:
    """A1111's listing: the embeddings of the server's --embeddings_dir by word."""
    loaded, skipped = await run_in_threadpool(service_of(request).adapters.embedding_shapes)
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    return {"loaded": {w: entry | {"shape": d, "vectors": n} for w, (n, d) in loaded.items()},
            "skipped": {w: {"error": why} for w, why in skipped.items()}}  # fmt: skip


@router.get("/scripts")
async def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
async def script_info() -> list:
    return []
