"""The service as real processes, where the process is the point: SIGKILL in the middle of a job and a restart lose
nothing (images equal to an uninterrupted run's), a small load test, and SIGTERM draining (503 for new jobs, the
running one finishes, queued ones wait in the database for the next start). The tests share servers, in order."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import REPO
from .serve_util import (
    SERVER_ENV,
    free_port,
    pixels,
    shared_engine,
    start_process,
    stop_process,
    wait_process_ready,
)

JOBS = [  # (prompt, seed, n, steps): the first runs long enough to be killed in the middle
    ("a handwritten digit 5", 101, 4, 30),
    ("a handwritten digit 6", 102, 2, 8),
    ("a handwritten digit 7", 103, 1, 8),
]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    s = {"data": tmp_path_factory.mktemp("data"), "port": free_port(), "procs": []}
    s["url"] = f"http://127.0.0.1:{s['port']}"
    yield s
    for proc in s["procs"]:
        stop_process(proc)


def start(state, *extra):
    proc = start_process(state["data"], state["port"], "--max_queue", "4", *extra)
    state["procs"].append(proc)
    wait_process_ready(state["url"], proc)
    return proc


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}").json()


def wait(url: str, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=180.0) -> dict:
    end = time.monotonic() + timeout
    while (view := job(url, job_id))["status"] not in statuses:
        assert time.monotonic() < end, view
        time.sleep(0.05)
    return view


def test_sigkill_in_the_middle_of_a_job_then_restart_loses_nothing(state, tmp_path):
    url = state["url"]
    first = start(state)
    ids = []
    for prompt, seed, n, steps in JOBS:
        r = httpx.post(f"{url}/v1/jobs", json={"prompt": prompt, "seed": seed, "n": n, "steps": steps})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    while (view := job(url, ids[0])).get("progress", {}).get("step") in (None, 0, 1, 2):
        assert view["status"] in ("queued", "running")
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    start(state)
    views = [wait(url, i) for i in ids]
    assert [v["status"] for v in views] == ["succeeded"] * 3
    assert views[0]["started"] is not None
    with sqlite3.connect(state["data"] / "jobs.sqlite3") as db:
        assert db.execute("SELECT attempts FROM jobs WHERE id = ?", (ids[0],)).fetchone()[0] == 2
    state["ids"] = ids
    state["expected"] = []
    engine = shared_engine()  # an uninterrupted run of the same requests, in this process (one thread, as the server)
    for k, ((_, _, n, _), view) in enumerate(zip(JOBS, views, strict=True)):
        count = engine.run("txt2img", view["request"], {}, tmp_path / str(k), lambda i, steps, denoised: None)
        expected = [engine.image_path(tmp_path / str(k), j) for j in range(count)]
        assert len(view["images"]) == len(expected) == n
        for image_url, png in zip(view["images"], expected, strict=True):
            assert (pixels(httpx.get(url + image_url).content) == pixels(png)).all()
        state["expected"].append(expected)


def test_small_load_test(state):
    """scripts/loadtest.py against the running server: 2xx or 429 with Retry-After, no 5xx, every job done."""
    argv = [sys.executable, str(REPO / "scripts" / "loadtest.py"), "--url", state["url"], "--requests", "40",
            "--clients", "10", "--steps", "2"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=SERVER_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"429"' in proc.stdout and '"problems": []' in proc.stdout


def test_sigterm_drains_and_queued_jobs_wait_for_the_next_start(state):
    url = state["url"]
    server = state["procs"][-1]
    long = httpx.post(f"{url}/v1/jobs", json={"prompt": "a handwritten digit 8", "n": 8, "steps": 20}).json()["id"]
    queued = httpx.post(f"{url}/v1/jobs", json={"prompt": "a handwritten digit 9", "steps": 2}).json()["id"]
    while job(url, long).get("progress", {}).get("step") in (None, 0):
        time.sleep(0.02)
    server.send_signal(signal.SIGTERM)
    refused = None
    for _ in range(100):
        refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "too late"})
        if refused.status_code == 503:
            break
        time.sleep(0.01)
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    assert server.wait(120) == 0
    with sqlite3.connect(state["data"] / "jobs.sqlite3") as db:
        status = dict(db.execute("SELECT id, status FROM jobs WHERE id IN (?, ?)", (long, queued)).fetchall())
    assert status == {long: "succeeded", queued: "queued"}
    start(state)
    assert wait(url, queued)["status"] == "succeeded"
    for job_id, expected in zip(state["ids"], state["expected"], strict=True):  # images survive restarts
        view = job(url, job_id)
        for image_url, png in zip(view["images"], expected, strict=True):
            assert (pixels(httpx.get(url + image_url).content) == pixels(png)).all()
    assert len(job(url, long)["images"]) == 8
    state["procs"][-1].send_signal(signal.SIGTERM)
    assert state["procs"][-1].wait(60) == 0
