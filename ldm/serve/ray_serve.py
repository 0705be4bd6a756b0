"""The image service on Ray Serve: the same FastAPI app (`create_app`: native, A1111 and OpenAI APIs) as a Serve
ingress deployment with N replicas, each holding its own model and worker thread.

The replicas share one data directory (one node, one SQLite file): each opens the job store in shared mode
(`store.use_leases`), so a job is claimed by one replica at a time under a lease its heartbeat renews; when a replica
dies its lease runs out and another replica claims the job and makes the same images (the seed is in the stored
request). Any replica answers any request: a job may be accepted by one and run by another, so every replica wakes
its worker and its waiting requests, and looks for cancel requests, a few times a second (`Service`, in shared
mode) to see the others' changes. `serve run
configs/serve/digits.yaml` uses `app_builder`; `ldm-serve --ray` uses `serve_forever`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import APIRouter, FastAPI, Request
from ray import serve

from ldm.serve.api_common import find_job
from ldm.serve.settings import Settings, parse_settings
from ldm.serve.store import DataDirBusy, use_leases

worker_router = APIRouter(tags=["cluster"])


@worker_router.get("/v1/jobs/{job_id}/worker")
async def job_worker(request: Request, job_id: str) -> dict[str, Any]:
    """Which replica ran (or runs) a job, and how many attempts it took ("host:pid:replica")."""
    job = find_job(request.app.state.service, job_id)
    return {"id": job.id, "status": job.status, "worker": job.owner, "attempts": job.attempts}


@worker_router.get("/v1/replica")
async def replica(request: Request) -> dict[str, Any]:
    """The replica that answered: its name and process, and the job its worker is running."""
    current = request.app.state.service.worker.current
    return {"replica": request.app.state.replica, "pid": os.getpid(), "running": current and current.job_id}


@serve.deployment(name="ImageService", health_check_period_s=2, health_check_timeout_s=10)
@serve.ingress()
class ImageService:
    """One replica: its settings now, its app (model, worker, shared store) when Serve builds the ASGI app."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        import torch

        from ldm.serve.app import create_app

        s = self.settings
        torch.set_num_threads(s.threads or max(1, int(s.cpus_per_replica)))
        context = serve.get_replica_context()
        name = f"{socket.gethostname()}:{os.getpid()}:{context.replica_id.unique_id}"
        use_leases(name, s.lease)
        app = create_app(s)
        app.state.replica = name
        app.include_router(worker_router)
        return app


def absolute(settings: Settings) -> Settings:
    """Paths made absolute (replicas may start in another folder), and the URL-signing key created once, before the
    replicas start, so every replica signs image URLs with the same key."""
    from ldm.serve.service import Service

    s = dataclasses.replace(settings, config=os.path.abspath(settings.config),
                            ckpt=settings.ckpt and os.path.abspath(settings.ckpt),
                            data_dir=Path(settings.data_dir).absolute(), lora_dir=Path(settings.lora_dir).absolute(),
                            embeddings_dir=Path(settings.embeddings_dir).absolute(),
                            taesd=[os.path.abspath(t) for t in settings.taesd])  # fmt: skip
    s.data_dir.mkdir(parents=True, exist_ok=True)
    with open(s.data_dir / "lock", "a+b") as lock:  # a lone ldm-serve holds it exclusively: refuse before deploying
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise DataDirBusy(f"another ldm-serve is using --data_dir {s.data_dir} (stop it, or choose another "
                              "directory)") from None  # fmt: skip
    Service._load_secret(s.data_dir / "url-secret")
    return s


def bind(settings: Settings):
    """The Serve application for `settings`: `replicas` replicas with their CPUs/GPUs."""
    s = absolute(settings)
    options = {"num_cpus": s.cpus_per_replica, **({"num_gpus": s.gpus_per_replica} if s.gpus_per_replica else {})}
    return ImageService.options(num_replicas=s.replicas, ray_actor_options=options).bind(s)


def app_builder(args: dict[str, Any]):
    """For `serve run` and Serve config files: `args` are ldm-serve's flags without the dashes ({"config": ...,
    "replicas": 2}); `true` stands for a flag without a value."""
    argv: list[str] = []
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            for item in value if isinstance(value, list) else [value]:
                argv += [f"--{key}", str(item)]
    return bind(parse_settings(argv))


def serve_forever(settings: Settings) -> int:
    """`ldm-serve --ray`: join (or start) Ray, serve on --host/--port until SIGTERM/SIGINT, then shut the app down
    (each replica drains: its running job finishes within --grace or goes back to the queue)."""
    ray.init(address=settings.ray or None, include_dashboard=False)
    try:
        app = bind(settings)
    except DataDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(app, name="ldm", route_prefix="/")
    print(f"ldm-serve: {settings.replicas} replica(s) on Ray Serve at http://{settings.host}:{settings.port}/ "
          f"(data {settings.data_dir})", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        time.sleep(0)
    serve.delete("ldm")
    return 0
