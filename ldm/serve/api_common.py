"""What the API routers share: reading a typed JSON body, submitting a checked job, finding a job by id."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from ldm.serve.errors import ApiError, validation_message
from ldm.serve.schemas import JobSpec, build_job, check_content_type
from ldm.serve.service import Service
from ldm.serve.store import Job

JOB_ID = re.compile(r"[0-9a-f]{32}")
M = TypeVar("M", bound=BaseModel)


def service_of(request: Request) -> Service:
    return request.app.state.service


async def read_json(request: Request, model: type[M]) -> M:
    """The body as `model`: 415 unless it is JSON, 422 naming the first bad field."""
    check_content_type(request.headers.get("content-type"), "application/json")
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        field, message = validation_message(e.errors())
        raise ApiError(422, message, field) from None


async def submit(request: Request, spec: JobSpec) -> tuple[Job, bool]:
    """Check `spec` (images decoded off the event loop) and queue it; (job, created)."""
    service = service_of(request)
    service.check_room(request.headers.get("idempotency-key"))
    kind, stored, inputs = await run_in_threadpool(
        build_job, spec, service.limits, service.defaults, service.adapters, service.tiny
    )
    return service.submit(kind, stored, inputs, request.headers.get("idempotency-key"))


def find_job(service: Service, job_id: str) -> Job:
    """The job, or 422 (not a job id: no client string ever reaches a path), 404, 410 (expired)."""
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(422, f"job_id: must be 32 hexadecimal digits, got {job_id[:80]!r}", "job_id")
    job = service.store.get(job_id)
    if job is None:
        raise ApiError(404, f"job_id: no job {job_id}", "job_id")
    if job.expired:
        raise ApiError(410, f"job_id: job {job_id} has expired: finished jobs are kept for --keep "
                            f"{service.settings.keep:g} s, then deleted", "job_id")  # fmt: skip
    return job


def image_paths(service: Service, job: Job) -> list[Path]:
    folder = service.store.images_dir(job.id)
    return [folder / "samples" / f"{k:05d}.png" for k in range(job.images)]


def read_b64(paths: list[Path]) -> list[str]:
    return [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]
