"""The one thread that owns the model: it loads it, then runs queued jobs one at a time, oldest first.

Per step it records progress (step/steps, ETA) and checks whether the job was cancelled or ran out of time; either
stops sampling at that step and no image of the job is left. The event loop only reads this state.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from ldm.files.image_input import ImageInputError
from ldm.generation.checks import NonFiniteError
from ldm.generation.generate import StepCallback
from ldm.serve.adapters import AdapterCatalog
from ldm.serve.engine import Engine
from ldm.serve.metrics import Metrics
from ldm.serve.settings import Settings
from ldm.serve.store import Job, JobStore

log = logging.getLogger("ldm.serve.job")
SWEEP_SECONDS = 60.0  # how often finished jobs are checked for expiry while idle
PREVIEW_SHARE = 9.0  # after a preview that took d seconds, the next waits 9 d: previews cost at most ~10%


class Stop(Exception):
    """Raised from the step callback to end a job's sampling at that step."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Progress:
    job_id: str
    step: int = 0
    steps: int = 0
    started: float = 0.0
    sampling_started: float | None = None
    preview: bytes | None = None  # JPEG of the latest step's estimate (jobs that asked for previews)
    preview_step: int = 0

    def eta(self) -> float | None:
        """Seconds left: the mean step time so far times the steps left (None before the first step)."""
        if self.sampling_started is None or self.step == 0:
            return None
        per_step = (time.monotonic() - self.sampling_started) / self.step
        return round(per_step * (self.steps - self.step), 2)


def log_event(event: str, job: Job | str, **fields) -> None:
    job_id = job if isinstance(job, str) else job.id
    log.info(json.dumps({"event": event, "job": job_id, **fields}, default=str))


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        metrics: Metrics,
        notify: Callable[[str], None],
        engine: Engine | None = None,
    ):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.notify = notify
        self.engine = engine
        self.current: Progress | None = None
        self.adapters = AdapterCatalog(settings.lora_dir, settings.embeddings_dir)
        self.load_error: str | None = None
        self.mean_job_seconds: float | None = None
        self._cancel: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._requeue_current = False
        self._thread = threading.Thread(target=self._main, name="ldm-serve-worker", daemon=True)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """No new job starts; waits for the running one to end (at most `timeout` s, then it is requeued)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._requeue_current = True  # stops at its next step and goes back to the queue
            self._thread.join()

    def abort(self) -> None:
        """Stop now: the running job ends at its next step and goes back to the queue (a second SIGTERM)."""
        self._requeue_current = True
        self._stop.set()
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Ask a job that is (or is about to be) running to stop at its next step."""
        self._cancel.add(job_id)

    def interrupt(self) -> str | None:
        """Cancel whatever job is running (A1111's /interrupt); its id, or None."""
        current = self.current
        if current is not None:
            self._cancel.add(current.job_id)
            return current.job_id
        return None

    def _main(self) -> None:
        if self.engine is None:
            try:
                self.engine = Engine(self.settings)
            except Exception as e:  # reported by /readyz; the process stays up to say so
                self.load_error = f"{type(e).__name__}: {e}"
                log.error(json.dumps({"event": "model_load_failed", "error": self.load_error}))
                return
        for job_id in self.store.requeue_interrupted():
            log_event("requeued", job_id, reason="interrupted by a restart")
        last_sweep = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_sweep > min(SWEEP_SECONDS, self.settings.keep):
                for job_id in self.store.expire(self.settings.keep):
                    log_event("expired", job_id)
                last_sweep = time.monotonic()
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=min(SWEEP_SECONDS, max(self.settings.keep, 0.05)))
                self._wake.clear()
                continue
            self.run(job)

    def _step(self, job: Job, progress: Progress, deadline: float) -> StepCallback:
        batch = {"index": -1, "last": time.monotonic(), "next_preview": 0.0}
        previews = bool(job.request.get("previews"))

        def on_step(i: int, steps: int, denoised) -> None:
            now = time.monotonic()
            if i == 0:
                batch["index"] += 1
            if progress.sampling_started is None:
                progress.sampling_started = now
            self.metrics.step_seconds.observe(now - batch["last"])
            batch["last"] = now
            progress.steps = steps * job.request["n_iter"]
            progress.step = batch["index"] * steps + i + 1
            if previews and self.engine is not None and now >= batch["next_preview"]:
                progress.preview = self.engine.preview_jpeg(denoised)
                progress.preview_step = progress.step
                done = time.monotonic()  # skip steps so that previews take at most a tenth of the job's time
                batch["next_preview"] = done + PREVIEW_SHARE * (done - now)
            self.notify(job.id)
            if job.id in self._cancel:
                raise Stop("cancelled", "cancelled")
            if self._requeue_current:
                raise Stop("queued", "the server stopped before the job finished; it runs again at the next start")
            if now > deadline:
                raise Stop("failed", f"the job ran past the time limit of {self.settings.limits.job_timeout:g} s "
                                     "(--job_timeout)")  # fmt: skip

        return on_step

    def run(self, job: Job) -> None:
        engine = self.engine
        assert engine is not None
        out_dir = self.store.images_dir(job.id)
        progress = Progress(job.id, 0, engine.steps_per_batch(job.request) * job.request["n_iter"], time.monotonic())
        self.current = progress
        self.notify(job.id)
        log_event("started", job, kind=job.kind, attempt=job.attempts)
        status, error, images = "succeeded", None, 0
        try:
            if job.id in self._cancel:
                raise Stop("cancelled", "cancelled")
            deadline = time.monotonic() + self.settings.limits.job_timeout
            images = engine.run(job.kind, job.request, self.store.inputs(job.id), out_dir,
                                self._step(job, progress, deadline), self.adapters)  # fmt: skip
        except Stop as e:
            status, error = e.status, (None if e.status == "cancelled" else e.reason)
        except (ImageInputError, NonFiniteError, ValueError) as e:
            status, error = "failed", str(e)
        except MemoryError:
            status, error = "failed", "out of memory; ask for fewer or smaller images"
        except Exception as e:
            status, error = "failed", f"internal error: {type(e).__name__}: {e}"
            log.error(json.dumps({"event": "crashed", "job": job.id, "traceback": traceback.format_exc()}))
        if status != "succeeded":
            shutil.rmtree(out_dir, ignore_errors=True)  # no partial image is left
            images = 0
        seconds = time.monotonic() - progress.started
        if status == "queued":
            self.store.requeue(job.id)
        else:
            self.store.finish(job.id, status, error, images)
        self._cancel.discard(job.id)
        self.current = None
        self.metrics.job_finished(status, seconds, images)
        if status == "succeeded":
            m = self.mean_job_seconds
            self.mean_job_seconds = seconds if m is None else 0.8 * m + 0.2 * seconds
        log_event("finished", job, status=status, seconds=round(seconds, 3), images=images, error=error)
        self.notify(job.id)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one frees each time a job ends (the measured mean)."""
        mean = self.mean_job_seconds
        if mean is None:
            current = self.current
            mean = 10.0 if current is None or current.eta() is None else current.eta()
        return max(1, math.ceil(mean))
