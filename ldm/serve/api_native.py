"""The native asynchronous jobs API: POST /v1/jobs (202 + id), status, server-sent events, images, cancel, list."""

from __future__ import annotations

import asyncio
import base64
import json
import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ldm.serve.api_common import find_job, image_paths, read_json, service_of, submit
from ldm.serve.errors import ApiError, field_error
from ldm.serve.schemas import JobSpec, NativeJob, decode_b64

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
catalog = APIRouter(prefix="/v1", tags=["adapters"])
IMAGE_NAME = re.compile(r"(\d{1,6})\.png")
KEEPALIVE = 15.0


@router.post("", status_code=202)
async def create_job(request: Request) -> JSONResponse:
    """Queue txt2img, img2img or inpaint; 202 with the id, status and queue position (200 for a repeated
    Idempotency-Key: the job it made the first time)."""
    body = await read_json(request, NativeJob)
    service = service_of(request)
    limit = service.limits.max_body
    if body.kind == "txt2img" and (body.init_image or body.mask):
        raise field_error("init_image" if body.init_image else "mask", "only for kind img2img or inpaint")
    if body.kind != "txt2img" and not body.init_image:
        raise field_error("init_image", f"kind {body.kind} needs an init image (base64 or a data URL)")
    if body.kind == "inpaint" and not body.mask:
        raise field_error("mask", "kind inpaint needs a mask (white = repaint)")
    spec = JobSpec(
        prompt=body.prompt, negative_prompt=body.negative_prompt, sampler=body.sampler, karras=body.karras,
        steps=body.steps, scale=body.scale, eta=body.eta, seed=body.seed, width=body.width, height=body.height,
        n=body.n, n_iter=body.n_iter, mask_blur=body.mask_blur, mask_dilate=body.mask_dilate,
        strength=body.strength if body.strength is not None else (1.0 if body.kind == "inpaint" else 0.75),
        init=None if body.init_image is None else decode_b64(body.init_image, "init_image", limit),
        mask=None if body.mask is None else decode_b64(body.mask, "mask", limit),
        loras=[(lora.name, lora.weight) for lora in body.loras], vae=body.vae, previews=body.previews,
        names={"init": "init_image"},
    )  # fmt: skip
    job, created = await submit(request, spec)
    view = service.view(job)
    return JSONResponse(view, 202 if created else 200, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("")
async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict:
    service = service_of(request)
    return {"jobs": [service.view(job) for job in service.store.recent(limit)]}


@router.get("/{job_id}")
async def get_job(request: Request, job_id: str) -> dict:
    service = service_of(request)
    return service.view(find_job(service, job_id))


@router.get("/{job_id}/images/{name}")
async def get_image(request: Request, job_id: str, name: str) -> FileResponse:
    """The k-th PNG, with its "parameters" text chunk, as the CLI writes it."""
    service = service_of(request)
    job = find_job(service, job_id)
    m = IMAGE_NAME.fullmatch(name)
    if not m:
        raise field_error("image", f"expected K.png with K a number, got {name[:80]!r}", 404)
    if job.status != "succeeded":
        raise ApiError(409, f"job_id: job {job.id} is {job.status}; its images exist once it has succeeded", "job_id")
    k = int(m.group(1))
    paths = image_paths(service, job)
    if k >= len(paths):
        raise field_error("image", f"job {job.id} has {len(paths)} images (0.png to {len(paths) - 1}.png)", 404)
    return FileResponse(paths[k], media_type="image/png")


@router.delete("/{job_id}")
async def cancel_job(request: Request, job_id: str) -> dict:
    """Cancel in any state: a queued job at once, a running one at its next step (no image of it is kept)."""
    service = service_of(request)
    job = find_job(service, job_id)
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, f"job_id: job {job.id} already {job.status}; there is nothing to cancel", "job_id")
    if job.status == "queued" and service.store.cancel_queued(job.id):
        service.notifier.notify(job.id)
    elif not service.store.get(job.id).done:
        service.store.request_cancel(job.id)  # for the replica that runs it, where several share the store
        service.worker.cancel(job.id)
        job = await service.wait_done(job.id)
        if job.status != "cancelled":
            raise ApiError(409, f"job_id: job {job.id} {job.status} before it could be stopped", "job_id")
    return service.view(service.store.get(job.id))


def current_preview(service, job_id: str) -> bytes | None:
    """The running job's latest step preview (JPEG), if it is `job_id` and asked for previews."""
    current = service.worker.current
    return current.preview if current is not None and current.job_id == job_id else None


@router.get("/{job_id}/preview")
async def job_preview(request: Request, job_id: str) -> Response:
    """The latest step's picture of a running job created with `"previews": true` (the tiny decoder's drawing of
    that step's estimate); 404 when there is none (not running, no step yet, or no previews asked for)."""
    service = service_of(request)
    find_job(service, job_id)
    preview = current_preview(service, job_id)
    if preview is None:
        raise ApiError(404, f"job_id: job {job_id} has no preview now (previews are kept while it runs, for jobs "
                            'created with "previews": true)', "job_id")  # fmt: skip
    return Response(preview, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@router.get("/{job_id}/events")
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: `progress` (status, step/steps, ETA, queue position) on every change, then `done`."""
    service = service_of(request)
    find_job(service, job_id)

    async def stream():
        last = None
        while True:
            fut = service.notifier.subscribe(job_id)
            job = service.store.get(job_id)
            view = service.view(job)
            brief = {k: view.get(k) for k in ("id", "status", "progress", "position", "error")}
            preview = current_preview(service, job_id)
            if preview is not None:
                brief["preview"] = "data:image/jpeg;base64," + base64.b64encode(preview).decode("ascii")
            if job.done:
                yield f"event: done\ndata: {json.dumps(brief)}\n\n"
                return
            if service.draining and job.status == "queued":
                yield f"event: shutdown\ndata: {json.dumps(brief)}\n\n"
                return
            if brief != last:
                yield f"event: progress\ndata: {json.dumps(brief)}\n\n"
                last = brief
            try:
                await asyncio.wait_for(fut, KEEPALIVE)
            except TimeoutError:
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@catalog.get("/loras")
async def list_loras(request: Request) -> dict:
    """The LoRAs requests may name (in `loras` or as `<lora:NAME:WEIGHT>` prompt tags): the server's --lora_dir."""
    names = await run_in_threadpool(lambda: sorted(service_of(request).adapters.loras()))
    return {"loras": [{"name": name} for name in names]}


@catalog.get("/embeddings")
async def list_embeddings(request: Request) -> dict:
    """The embeddings a prompt uses by writing their word: the server's --embeddings_dir."""
    loaded, skipped = await run_in_threadpool(service_of(request).adapters.embedding_shapes)
    return {
        "embeddings": [{"word": w, "vectors": n, "width": d} for w, (n, d) in sorted(loaded.items())],
        "skipped": skipped,
    }
