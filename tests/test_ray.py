"""Batch generation and the image service on a local Ray instance (2 CPUs, one per test module): `ldm-batch --ray`
spreads rows over two actors and gives the single-process run's pixels; the service on Ray Serve with two replicas
answers A1111 and OpenAI clients from both replicas with the single-process server's images, and a replica killed in
the middle of a job loses nothing (the other replica reruns it, same images)."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import ray
import webuiapi
from fastapi.testclient import TestClient
from ray import serve

from ldm.batch.run import main as batch_main
from ldm.serve import ray_serve
from ldm.serve.settings import parse_settings

from .conftest import REPO
from .serve_util import app_for, free_port, pixels, wait_ready, wait_status

DIGITS = str(REPO / "configs" / "demo" / "digits.yaml")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def manifest(outdir) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def test_batch_on_two_actors_equals_the_single_process_run(local_ray, tmp_path):
    prompts = tmp_path / "p.jsonl"
    own = {"seed": 100, "sampler": "euler_a"}  # some rows with their own seed and sampler
    rows = [{"prompt": f"a handwritten digit {i % 10}"} | (own | {"seed": 100 + i} if i % 3 == 0 else {})
            for i in range(12)]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--config", DIGITS, "--from-file", str(prompts), "--n_samples", "1", "--ddim_steps", "6", "--quiet"]
    assert batch_main([*common, "--outdir", str(tmp_path / "ray"), "--ray", "--actors", "2",
                       "--cpus_per_actor", "1"]) == 0  # fmt: skip
    assert batch_main([*common, "--outdir", str(tmp_path / "local"), "--threads", "1"]) == 0
    lines = manifest(tmp_path / "ray")
    assert sorted(x["row"] for x in lines) == list(range(12))  # every row once
    workers = {x["worker"] for x in lines}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers), workers  # both actors
    for x in lines:
        assert x["seed"] == rows[x["row"]].get("seed", 42 + x["row"])
        assert np.array_equal(pixels(tmp_path / "ray" / x["file"]), pixels(tmp_path / "local" / x["file"])), x


@pytest.fixture(scope="module")
def service(local_ray, tmp_path_factory):
    """The service on Ray Serve: 2 replicas of the digits model (half a CPU each), a 2 s lease."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    data_dir = tmp_path_factory.mktemp("ray-serve")
    settings = parse_settings(["--data_dir", str(data_dir), "--replicas", "2", "--cpus_per_replica", "0.5",
                               "--threads", "1", "--lease", "2", "--max_steps", "1000"])  # fmt: skip
    serve.run(ray_serve.bind(settings), name="ldm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.2)
    yield url
    serve.delete("ldm")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process server (in this process) that the replicas' images must equal."""
    with TestClient(app_for(tmp_path_factory.mktemp("single"), max_steps=1000)) as client:
        wait_ready(client)
        yield client


def get(url: str, timeout: float = 120.0) -> dict:
    """GET that rides out a replica restarting (its requests may fail until Serve replaces it)."""
    end = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url, timeout=30)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, url
        time.sleep(0.1)


def expected_images(single: TestClient, request: dict) -> list[np.ndarray]:
    """The single-process server's images for a stored request."""
    body = {k: request[k] for k in ("prompt", "negative_prompt", "sampler", "steps", "scale", "seed", "width",
                                    "height", "n", "n_iter")}  # fmt: skip
    body["karras"] = request["schedule"] == "karras"
    view = wait_status(single, single.post("/v1/jobs", json=body).json()["id"])
    assert view["status"] == "succeeded", view
    return [pixels(single.get(path).content) for path in view["images"]]


def test_a1111_and_openai_clients_are_served_by_both_replicas(service, single):
    host, port = service.removeprefix("http://").split(":")
    a1111 = webuiapi.WebUIApi(host=host, port=int(port))
    client = openai.OpenAI(base_url=f"{service}/v1", api_key="unused", max_retries=0)
    answers: dict[str, list[np.ndarray]] = {}

    def a1111_call(k: int) -> None:
        result = a1111.txt2img(prompt=f"a handwritten digit {k}", seed=10 + k, steps=60, cfg_scale=3.0, width=32,
                               height=32, batch_size=2)  # fmt: skip
        answers[f"a1111-{k}"] = [pixels(im) for im in result.images]

    def openai_call(k: int) -> None:
        result = client.images.generate(prompt=f"a handwritten digit {k}", n=2, size="32x32",
                                        response_format="b64_json")  # fmt: skip
        answers[f"openai-{k}"] = [pixels(base64.b64decode(d.b64_json)) for d in result.data]

    calls = [threading.Thread(target=f, args=(k,)) for k in range(3) for f in (a1111_call, openai_call)]
    for t in calls:
        t.start()
    for t in calls:
        t.join(300)
    assert len(answers) == 6
    jobs = get(f"{service}/v1/jobs?limit=6")["jobs"]
    assert sorted(j["request"]["api"] for j in jobs) == ["a1111"] * 3 + ["openai"] * 3
    workers = {j["id"]: get(f"{service}/v1/jobs/{j['id']}/worker")["worker"] for j in jobs}
    assert len(set(workers.values())) == 2, workers  # both replicas ran jobs
    for job in jobs:
        api, k = job["request"]["api"], int(job["request"]["prompt"][-1])
        got = answers[f"{api}-{k}"]
        want = expected_images(single, job["request"])
        assert len(got) == len(want) == 2
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), job["id"]


def test_a_replica_killed_mid_job_loses_no_job(service, single):
    body = {"prompt": "a handwritten digit 6", "seed": 77, "steps": 200, "n": 2}
    job_id = httpx.post(f"{service}/v1/jobs", json=body, timeout=30).json()["id"]
    end = time.monotonic() + 120
    while (info := get(f"{service}/v1/jobs/{job_id}/worker"))["status"] != "running":
        assert info["status"] == "queued" and time.monotonic() < end, info
        time.sleep(0.05)
    killed = info["worker"]
    time.sleep(1.0)  # into the sampling loop
    assert get(f"{service}/v1/jobs/{job_id}/worker")["status"] == "running"
    os.kill(int(killed.split(":")[1]), signal.SIGKILL)  # the replica's process, in the middle of sampling
    end = time.monotonic() + 240
    while (info := get(f"{service}/v1/jobs/{job_id}/worker"))["status"] != "succeeded":
        assert info["status"] in ("queued", "running") and time.monotonic() < end, info
        time.sleep(0.2)
    assert info["attempts"] == 2 and info["worker"] != killed, info  # rerun by another replica
    view = get(f"{service}/v1/jobs/{job_id}")
    got = [pixels(httpx.get(f"{service}{path}", timeout=30).content) for path in view["images"]]
    want = expected_images(single, view["request"])
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_serve_config_file_builds_the_app_it_describes(tmp_path, monkeypatch):
    """configs/serve/digits.yaml (for `serve run`): its args are valid ldm-serve flags and give 2 replicas."""
    import yaml

    monkeypatch.chdir(REPO)  # its paths are relative to the repository, where `serve run` is started
    (app,) = yaml.safe_load((REPO / "configs" / "serve" / "digits.yaml").read_text())["applications"]
    assert app["import_path"] == "ldm.serve.ray_serve:app_builder"
    built = ray_serve.app_builder({**app["args"], "data_dir": str(tmp_path / "data")})
    deployment = built._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 1
    (settings,) = deployment.init_args
    assert settings.config == str(REPO / "configs" / "demo" / "digits.yaml") and settings.threads == 1
