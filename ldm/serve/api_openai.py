"""The OpenAI-compatible images API: /v1/images/generations, /v1/images/edits (multipart), /v1/models; errors in
OpenAI's shape, so the `openai` client raises its own exception classes (AuthenticationError, BadRequestError...).

Edits follow OpenAI's masks: where the mask (or, without one, the image itself) is transparent is repainted
(inpainting at strength 1); an opaque image without a mask is redrawn as img2img at strength 0.75.
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ldm.files.image_input import ImageInputError, open_image
from ldm.serve.api_common import image_paths, read_b64, read_json, service_of, submit
from ldm.serve.errors import ApiError, field_error
from ldm.serve.schemas import JobSpec, OpenAIGeneration, check_content_type, parse_size, png_bytes

router = APIRouter(prefix="/v1", tags=["openai"])
NAMES = {"width": "size", "height": "size", "init": "image"}


def repaint_mask(image: bytes, mask: bytes | None, limit: int) -> bytes | None:
    """Our mask (white = repaint) from OpenAI's (transparent = repaint); None where nothing is transparent."""
    what, source = ("mask", mask) if mask is not None else ("image", image)
    try:
        img = open_image(source, what, max_pixels=limit)
    except ImageInputError as e:
        raise field_error(what, str(e)) from None
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"))
        if mask is None and alpha.min() == 255:
            return None
        return png_bytes(Image.fromarray(255 - alpha))
    return None if mask is None else png_bytes(img.convert("L"))


async def answer(request: Request, spec: JobSpec, response_format: str | None) -> dict:
    service = service_of(request)
    job, _ = await submit(request, spec)
    job = await service.wait_done(job.id)
    if job.status != "succeeded":
        raise ApiError(500, f"job {job.id} {job.status}: {job.error or 'no images'}", code=job.status)
    paths = image_paths(service, job)
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/v1/jobs/{job.id}/images/{k}.png?sig={service.sign(job.id, k)}"}
                for k in range(len(paths))]  # fmt: skip
    else:
        data = [{"b64_json": b} for b in await run_in_threadpool(read_b64, paths)]
    return {"created": int(job.created), "data": data}


@router.post("/images/generations")
async def generations(request: Request) -> dict:
    body = await read_json(request, OpenAIGeneration)
    width, height = parse_size(body.size)
    spec = JobSpec(prompt=body.prompt, n=body.n, width=width, height=height, names=NAMES, api="openai")
    return await answer(request, spec, body.response_format)


async def form_bytes(value, field: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, UploadFile):
        raise field_error(field, "must be a file part of the multipart form")
    return await value.read()


@router.post("/images/edits")
async def edits(request: Request) -> dict:
    check_content_type(request.headers.get("content-type"), "multipart/form-data")
    limits = service_of(request).limits
    async with request.form(max_files=4, max_fields=32, max_part_size=limits.max_body) as form:
        images = form.getlist("image") or form.getlist("image[]")
        if not images:
            raise field_error("image", "give the image to edit as a file part")
        image = await form_bytes(images[0], "image")
        mask = await form_bytes(form.get("mask"), "mask")
        prompt, n, size, fmt = (form.get(k) for k in ("prompt", "n", "size", "response_format"))
    if not isinstance(prompt, str):
        raise field_error("prompt", "required")
    try:
        count = 1 if n is None else int(n)
    except (TypeError, ValueError):
        raise field_error("n", f"must be an integer, got {str(n)[:40]!r}") from None
    if fmt not in (None, "b64_json", "url"):
        raise field_error("response_format", f"must be b64_json or url, got {str(fmt)[:40]!r}")
    width, height = parse_size(size if isinstance(size, str) else None)
    ours = await run_in_threadpool(repaint_mask, image, mask, limits.max_image_pixels)
    spec = JobSpec(prompt=prompt, n=count, width=width, height=height, init=image, mask=ours,
                   strength=1.0 if ours is not None else 0.75, resize_init=True, names=NAMES, api="openai")  # fmt: skip
    return await answer(request, spec, fmt)


def model_card(request: Request) -> dict:
    engine = service_of(request).worker.engine
    if engine is None:
        raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
    return {"id": engine.model_name, "object": "model", "created": int(os.path.getmtime(engine.ckpt)),
            "owned_by": "ldm"}  # fmt: skip


@router.get("/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(request)]}


@router.get("/models/{model_id}")
async def model(request: Request, model_id: str) -> dict:
    card = model_card(request)
    if model_id != card["id"]:
        raise ApiError(404, f"model: no model {model_id[:80]!r}; this server has {card['id']!r}", "model",
                       code="model_not_found")  # fmt: skip
    return card


