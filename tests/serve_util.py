"""Helpers of the image-service tests: one digits model shared by the in-process servers, a server on a real
socket in a thread (for the real webuiapi and openai clients), server processes, and the CLI's own outputs to
compare with."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from ldm.cli import img2img as cli_img2img
from ldm.cli import txt2img as cli_txt2img
from ldm.serve.app import create_app
from ldm.serve.settings import DEMO_CONFIG, Limits, Settings

from .conftest import REPO

_ENGINE = None


def shared_engine():
    """The digits model, loaded once for all in-process servers (the worker would otherwise load its own)."""
    global _ENGINE
    if _ENGINE is None:
        from ldm.serve.engine import Engine

        _ENGINE = Engine(Settings())
    return _ENGINE


def settings(data_dir: Path, **kw) -> Settings:
    limit_fields = set(vars(Limits()))
    limits = Limits(**{k: v for k, v in kw.items() if k in limit_fields})
    return Settings(data_dir=Path(data_dir), limits=limits, **{k: v for k, v in kw.items() if k not in limit_fields})


def app_for(data_dir: Path, **kw):
    return create_app(settings(data_dir, **kw), engine=shared_engine())


def wait_ready(client, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.05)


def wait_status(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view.get("status") in statuses:
            return view
        assert time.monotonic() < end, view
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def threaded_server(data_dir: Path, **kw):
    """The app on 127.0.0.1:<free port> in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app_for(data_dir, **kw), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


SERVER_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def start_process(data_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--data_dir", str(data_dir),
            "--threads", "1", *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=SERVER_ENV)


def wait_process_ready(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "server process did not get ready"
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def pixels(source) -> np.ndarray:
    """RGB pixels of a PNG given as a path, bytes or PIL image."""
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return np.asarray(im.convert("RGB"))


def cli_outputs(tmp: Path, *args: str, img2img: bool = False) -> list[Path]:
    """Run scripts/txt2img.py (or img2img.py) in this process with the digits config; its sample PNGs."""
    argv = ["--config", str(DEMO_CONFIG), "--outdir", str(tmp), "--skip_grid", "--quiet", *map(str, args)]
    code = (cli_img2img.main if img2img else cli_txt2img.main)(argv)
    assert code == 0
    return sorted((tmp / "samples").glob("*.png"))
