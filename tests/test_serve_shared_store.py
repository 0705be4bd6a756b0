"""Two replicas sharing one job store (Ray Serve's mode, here without Ray: two apps in this process, each with its
own store in shared mode): a job queued through one is run by the other, and cancelling it through the replica
that does not run it stops it."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from ldm.serve import store

from .serve_util import app_for, wait_ready, wait_status


@pytest.fixture
def replicas(tmp_path):
    """(a, b): a runs jobs (its lifespan started its worker), b only answers requests (its worker never starts)."""
    try:
        store.use_leases("replica-a", 30.0)
        app_a = app_for(tmp_path, max_steps=1000)
        store.use_leases("replica-b", 30.0)
        app_b = app_for(tmp_path, max_steps=1000)
    finally:
        store.LEASES = None  # later stores in this process own their data directory again
    with TestClient(app_a) as a:
        wait_ready(a)
        yield a, TestClient(app_b)
    app_b.state.service.close()


def test_a_job_queued_through_one_replica_runs_on_the_other(replicas):
    a, b = replicas
    job = b.post("/v1/jobs", json={"prompt": "a handwritten digit 2", "steps": 4, "seed": 1}).json()
    view = wait_status(b, job["id"])
    assert view["status"] == "succeeded" and view["worker"] == "replica-a"
    assert b.get(view["images"][0]).status_code == 200


def test_cancel_through_the_replica_that_does_not_run_the_job(replicas):
    a, b = replicas
    body = {"prompt": "a handwritten digit 5", "steps": 1000, "n": 8, "sampler": "euler", "seed": 2}  # a minute
    job = a.post("/v1/jobs", json=body).json()
    while (view := a.get(f"/v1/jobs/{job['id']}").json()).get("progress", {}).get("step", 0) < 1:
        assert view["status"] in ("queued", "running"), view
        time.sleep(0.02)
    r = b.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.json()
    view = a.get(f"/v1/jobs/{job['id']}").json()
    assert view["status"] == "cancelled" and "images" not in view and view["worker"] == "replica-a"
