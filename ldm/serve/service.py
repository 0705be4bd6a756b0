"""The service as the routes see it: submit a job (or be told why not), wait for one, describe one. Holds the
store, the worker, the metrics and the per-job change notifications that wake waiting requests and event streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ldm.generation.load import load_config
from ldm.serve.adapters import AdapterCatalog
from ldm.serve.engine import Engine, config_defaults, offers_tiny_autoencoder
from ldm.serve.errors import ApiError
from ldm.serve.metrics import Metrics
from ldm.serve.settings import Settings
from ldm.serve.store import IdempotencyConflict, Job, JobStore
from ldm.serve.worker import Worker, log_event

WAIT_POLL = 5.0  # seconds between re-reads when no notification came (a backstop, not the mechanism)
SHARED_POLL = 0.25  # shared store: seconds between looks for other replicas' jobs, results and cancel requests


class Notifier:
    """Wakes coroutines waiting on a job from the worker thread (thread-safe, loop-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}

    def subscribe(self, job_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._waiters.setdefault(job_id, []).append((loop, fut))
        return fut

    def notify(self, job_id: str) -> None:
        with self._lock:
            waiters = self._waiters.pop(job_id, [])
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def notify_all(self) -> None:
        with self._lock:
            ids = list(self._waiters)
        for job_id in ids:
            self.notify(job_id)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Service:
    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.limits = settings.limits
        cfg = None if engine is not None else load_config(settings.config)
        self.defaults = engine.defaults if engine is not None else config_defaults(cfg)
        self.adapters = AdapterCatalog(settings.lora_dir, settings.embeddings_dir)
        if engine is not None:
            self.tiny = getattr(engine.model, "tiny_autoencoder", None) is not None
        else:
            self.tiny = offers_tiny_autoencoder(settings, cfg)
        self.store = JobStore(settings.data_dir)
        self.metrics = Metrics(self.store.counts)
        self.notifier = Notifier()
        self.worker = Worker(settings, self.store, self.metrics, self.notifier.notify, engine)
        self.draining = False
        self._stopped = threading.Event()
        self._secret = self._load_secret(Path(settings.data_dir) / "url-secret")

    @staticmethod
    def _load_secret(path: Path) -> bytes:
        """The key that signs image URLs (OpenAI's response_format=url); kept, so URLs survive restarts."""
        if not path.exists():
            fd = path.parent / f".{path.name}.{secrets.token_hex(4)}"
            fd.write_bytes(secrets.token_bytes(32))
            fd.chmod(0o600)
            fd.replace(path)
        return path.read_bytes()

    def start(self) -> None:
        self.worker.start()
        if self.store.leases is not None:
            threading.Thread(target=self._follow_shared_store, name="ldm-serve-shared", daemon=True).start()

    def _follow_shared_store(self) -> None:
        """Replicas sharing a store (Ray Serve) learn of each other's changes here, not from their own worker: jobs
        queued elsewhere or whose lease ran out (wake the worker), jobs finished elsewhere (wake waiting requests)
        and cancel requests for the job this replica runs."""
        while not self._stopped.wait(SHARED_POLL):
            self.worker.wake()
            self.notifier.notify_all()
            try:
                cancels = self.store.cancel_requests()
            except sqlite3.ProgrammingError:  # the store closed under us: the service is stopping
                return
            for job_id in cancels:
                self.worker.cancel(job_id)

    def drain(self, grace: float) -> None:
        """Stop taking jobs, let the running one finish within `grace` s (else it is requeued), stop the worker."""
        self.draining = True
        self.notifier.notify_all()
        self.worker.stop(timeout=grace)
        self.notifier.notify_all()

    def close(self) -> None:
        self._stopped.set()
        self.store.close()

    # --- submitting ---------------------------------------------------------------------------------------
    def check_room(self, key: str | None) -> None:
        """Refuse at once what `submit` would refuse for want of room (503 draining, 429 full), before the request's
        images are decoded; a known Idempotency-Key always gets its job back."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            message = "the server is shutting down; retry against the next start"
            raise ApiError(503, message, headers={"Retry-After": "5"})
        if self.store.queued() >= self.limits.max_queue and (key is None or self.store.by_key(key) is None):
            self.metrics.rejected.labels("queue_full").inc()
            retry = self.worker.retry_after()
            message = f"the queue is full ({self.limits.max_queue} jobs waiting, --max_queue); retry in {retry} s"
            raise ApiError(429, message, headers={"Retry-After": str(retry)}, code="rate_limit_exceeded")

    def submit(self, kind: str, request: dict[str, Any], inputs: dict[str, bytes], key: str | None) -> tuple[Job, bool]:
        """Queue a job (committed before this returns), or ApiError: 503 draining, 429 queue full, 422 key reuse."""
        if key is not None:
            if len(key) > 255:
                raise ApiError(422, "Idempotency-Key: at most 255 characters", "Idempotency-Key")
            old = self.store.by_key(key)
            if old is not None:
                if request.get("random_seed") and old.request.get("random_seed"):
                    request = request | {"seed": old.request["seed"]}  # a retry of a random-seed request
                try:
                    return self.store.add(kind, request, inputs, key)
                except IdempotencyConflict as e:
                    raise ApiError(422, f"Idempotency-Key: {e}", "Idempotency-Key") from None
        self.check_room(key)
        job, created = self.store.add(kind, request, inputs, key)
        log_event("queued", job, kind=kind, api=request.get("api"))
        self.worker.wake()
        return job, created

    async def wait_done(self, job_id: str) -> Job:
        """The job once it has ended; 503 if the server drains while it is still queued (it stays queued)."""
        while True:
            fut = self.notifier.subscribe(job_id)
            job = self.store.get(job_id)
            if job is None or job.done:
                return job
            if self.draining and job.status == "queued":
                raise ApiError(503, f"the server is shutting down; job {job_id} stays queued and runs after the "
                                    f"restart (GET /v1/jobs/{job_id})", headers={"Retry-After": "5"})  # fmt: skip
            try:
                await asyncio.wait_for(fut, WAIT_POLL)
            except TimeoutError:
                pass

    def check_ready(self) -> list[str]:
        """Why the service cannot take work now (empty: ready)."""
        reasons = []
        if self.worker.load_error:
            reasons.append(f"model failed to load: {self.worker.load_error}")
        elif not self.worker.ready:
            reasons.append("model loading")
        if self.draining:
            reasons.append("shutting down")
        if self.store.queued() >= self.limits.max_queue:
            reasons.append("queue full")
        return reasons

    # --- describing ---------------------------------------------------------------------------------------
    def sign(self, job_id: str, k: int) -> str:
        return hmac.new(self._secret, f"{job_id}/{k}".encode(), hashlib.sha256).hexdigest()[:32]

    def signature_ok(self, job_id: str, k: int, sig: str) -> bool:
        return hmac.compare_digest(self.sign(job_id, k).encode(), sig.encode())

    def view(self, job: Job) -> dict[str, Any]:
        """A job as the native API shows it."""
        out: dict[str, Any] = {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "error": job.error,
            "expired": job.expired,
            "request": job.request,
        }
        if job.owner is not None:  # shared store (Ray Serve): the replica that runs or ran it
            out["worker"] = job.owner
        current = self.worker.current
        if job.status == "queued":
            out["position"] = self.store.position(job)
        if current is not None and current.job_id == job.id:
            out["progress"] = {"step": current.step, "steps": current.steps, "eta_seconds": current.eta()}
            if current.preview is not None:
                out["progress"]["preview_step"] = current.preview_step
        if job.status == "succeeded" and not job.expired:
            out["images"] = [f"/v1/jobs/{job.id}/images/{k}.png" for k in range(job.images)]
        return out
