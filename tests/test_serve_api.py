"""The image service in-process (FastAPI's TestClient, the digits model): the native jobs API end to end, its
images equal to the CLI's, progress events, cancel, time limit, idempotency, expiry, queue limit, the A1111 helper
routes and the operations routes."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm.files.infotext import parse_infotext
from ldm.serve.store import DataDirBusy, JobStore

from .serve_util import app_for, cli_outputs, pixels, wait_ready, wait_status

DIGIT = "a handwritten digit 4"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(app_for(tmp_path_factory.mktemp("serve"), max_queue=4)) as c:
        wait_ready(c)
        yield c


def test_a_job_runs_and_gives_the_cli_images_with_their_parameters(client, tmp_path):
    body = {"prompt": DIGIT, "negative_prompt": "a handwritten digit 1", "n": 2, "n_iter": 2, "seed": 5, "steps": 8,
            "sampler": "euler_a", "scale": 4.0}  # fmt: skip
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = r.json()
    assert job["status"] in ("queued", "running") and job["request"]["seed"] == 5
    view = wait_status(client, job["id"])
    assert view["status"] == "succeeded", view
    assert len(view["images"]) == 4
    flags = {"--prompt": DIGIT, "--negative_prompt": "a handwritten digit 1", "--n_samples": 2, "--n_iter": 2,
             "--seed": 5, "--ddim_steps": 8, "--sampler": "euler_a", "--scale": 4.0}  # fmt: skip
    expected = cli_outputs(tmp_path, *[str(x) for kv in flags.items() for x in kv])
    assert len(expected) == 4
    for url, cli_png in zip(view["images"], expected, strict=True):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert (pixels(r.content) == pixels(cli_png)).all()
        served = Image.open(io.BytesIO(r.content)).info["parameters"]
        assert served == Image.open(cli_png).info["parameters"]
    assert any(j["id"] == job["id"] for j in client.get("/v1/jobs").json()["jobs"])


def test_events_stream_progress_then_done(client):
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 12, "n": 1}).json()
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "done":
                    break
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    steps = [e["progress"]["step"] for name, e in events if name == "progress" and e.get("progress")]
    assert steps and steps == sorted(steps) and max(steps) <= 12
    assert any(e["progress"]["eta_seconds"] is not None for name, e in events if e.get("progress") and e["status"]
               == "running")  # fmt: skip


def test_idempotency_key_returns_the_same_job(client):
    body = {"prompt": DIGIT, "steps": 2}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["request"]["seed"] == first.json()["request"]["seed"]  # random, fixed once
    other = client.post("/v1/jobs", json={**body, "steps": 3}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"]
    wait_status(client, first.json()["id"])


def test_cancel_a_running_job_stops_it_and_leaves_no_image(client):
    service = client.app.state.service
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 150, "n": 8}).json()
    wait_status(client, job["id"], ("running",))
    while (service.worker.current is None) or service.worker.current.step < 1:
        time.sleep(0.01)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert service.worker.current is None or service.worker.current.job_id != job["id"]
    assert not service.store.images_dir(job["id"]).exists()
    assert client.get(f"/v1/jobs/{job['id']}/images/0.png").status_code == 409


def test_cancel_a_queued_job_and_the_queue_limit(client):
    service = client.app.state.service
    running = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 150, "n": 8}).json()
    wait_status(client, running["id"], ("running",))
    queued = [client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 1}).json() for _ in range(4)]
    assert [q["position"] for q in queued] == [1, 2, 3, 4]
    full = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 1})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert "max_queue" in full.json()["detail"]
    assert client.get("/readyz").status_code == 503
    r = client.delete(f"/v1/jobs/{queued[1]['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    client.delete(f"/v1/jobs/{running['id']}")
    for q in queued:
        wait_status(client, q["id"])
    assert client.get(f"/v1/jobs/{queued[0]['id']}").json()["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{queued[1]['id']}").json()["status"] == "cancelled"
    assert service.metrics.rejected.labels("queue_full")._value.get() >= 1


def test_a_job_over_its_time_limit_fails_without_images(tmp_path):
    with TestClient(app_for(tmp_path, job_timeout=0.3)) as c:
        wait_ready(c)
        job = c.post("/v1/jobs", json={"prompt": DIGIT, "steps": 150, "n": 8}).json()
        view = wait_status(c, job["id"])
        assert view["status"] == "failed" and "--job_timeout" in view["error"]
        assert not c.app.state.service.store.images_dir(job["id"]).exists()


def test_finished_jobs_expire_with_their_images_410(tmp_path):
    with TestClient(app_for(tmp_path, keep=3600.0)) as c:
        wait_ready(c)
        job = c.post("/v1/jobs", json={"prompt": DIGIT, "steps": 2}).json()
        wait_status(c, job["id"])
        service = c.app.state.service
        assert service.store.expire(3600.0) == []  # kept for --keep
        assert service.store.expire(3600.0, now=time.time() + 3601) == [job["id"]]
        assert not service.store.images_dir(job["id"]).exists()
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/images/0.png", f"/v1/jobs/{job['id']}/events"):
            r = c.get(path)
            assert r.status_code == 410 and "expired" in r.json()["detail"], path


def test_a_drain_that_runs_out_of_grace_puts_the_running_job_back_in_the_queue(tmp_path):
    with TestClient(app_for(tmp_path)) as c:
        wait_ready(c)
        service = c.app.state.service
        job = c.post("/v1/jobs", json={"prompt": DIGIT, "steps": 150, "n": 8}).json()
        wait_status(c, job["id"], ("running",))
        service.drain(grace=0.2)
        assert service.store.get(job["id"]).status == "queued"
        assert not service.store.images_dir(job["id"]).exists()
        r = c.post("/v1/jobs", json={"prompt": DIGIT})
        assert r.status_code == 503 and r.headers["Retry-After"]


def test_a1111_helper_routes(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "PLMS", "UniPC"} <= set(names)
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert model["model_name"] == "digits" and "/" not in model["filename"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model["title"]}).status_code == 200
    wrong = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_base.safetensors"})
    assert wrong.status_code == 422 and "sd_model_checkpoint" in wrong.json()["detail"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    progress = client.get("/sdapi/v1/progress").json()
    assert 0.0 <= progress["progress"] <= 1.0 and "sampling_steps" in progress["state"]
    made = client.post("/sdapi/v1/txt2img", json={"prompt": DIGIT, "seed": 9, "steps": 3, "sampler_name": "DPM++ 2M"})
    info = client.post("/sdapi/v1/png-info", json={"image": made.json()["images"][0]}).json()
    prompt, _, fields = parse_infotext(info["info"])
    assert prompt == DIGIT and info["parameters"]["Seed"] == "9" and fields["Sampler"] == "dpmpp_2m"


def test_a1111_interrupt_stops_the_running_job(client):
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 150, "n": 8}).json()
    wait_status(client, job["id"], ("running",))
    assert client.post("/sdapi/v1/interrupt").json()["interrupted"] == job["id"]
    assert wait_status(client, job["id"])["status"] == "cancelled"


def test_operations_routes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "reasons": []}
    text = client.get("/metrics").text
    names = ("ldm_queue_length", 'ldm_jobs{status="succeeded"}', "ldm_job_seconds_bucket", "ldm_step_seconds_bucket",
             "ldm_images_total")  # fmt: skip
    for name in names:
        assert name in text, name
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "digits"
    assert client.get("/v1/models/dall-e-3").json()["error"]["code"] == "model_not_found"


def test_img2img_and_inpaint_jobs_give_the_cli_images(client, tmp_path):
    init = tmp_path / "init.png"
    mask = tmp_path / "mask.png"
    Image.fromarray(pixels(client.get(client_first_image(client)).content)).save(init)
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 16, 32))
    m.save(mask)
    b64 = {p: base64.b64encode(p.read_bytes()).decode() for p in (init, mask)}
    body = {"kind": "inpaint", "prompt": "a handwritten digit 8", "init_image": b64[init],
            "mask": "data:image/png;base64," + b64[mask], "strength": 0.8, "seed": 3, "steps": 10, "n": 2}  # fmt: skip
    view = wait_status(client, client.post("/v1/jobs", json=body).json()["id"])
    assert view["status"] == "succeeded", view
    expected = cli_outputs(tmp_path / "cli", "--init-img", init, "--mask", mask, "--prompt", "a handwritten digit 8",
                           "--strength", 0.8, "--seed", 3, "--ddim_steps", 10, "--n_samples", 2,
                           img2img=True)  # fmt: skip
    for url, cli_png in zip(view["images"], expected, strict=True):
        served = pixels(client.get(url).content)
        assert (served == pixels(cli_png)).all()
        assert (served[:, 16:] == pixels(init)[:, 16:]).all()  # kept where the mask is black


def client_first_image(client) -> str:
    job = client.post("/v1/jobs", json={"prompt": "a handwritten digit 2", "steps": 6, "seed": 1}).json()
    return wait_status(client, job["id"])["images"][0]


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.3), ("plms", 0.0)])
def test_the_original_samplers_report_their_steps_and_keep_the_cli_images(client, tmp_path, sampler, eta):
    """DDIM/PLMS run the original's step selection (7 asked: 8 run); the step callback changes no pixel."""
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "sampler": sampler, "eta": eta, "steps": 7, "seed": 8})
    steps = []
    with client.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if event.get("progress"):
                    steps.append((event["progress"]["step"], event["progress"]["steps"]))
                if event["status"] == "succeeded":
                    break
    assert steps[-1] == (8, 8)
    view = client.get(f"/v1/jobs/{job.json()['id']}").json()
    (expected,) = cli_outputs(tmp_path, "--prompt", DIGIT, "--sampler", sampler, "--ddim_eta", eta, "--ddim_steps", 7,
                              "--seed", 8, "--n_samples", 1)  # fmt: skip
    assert (pixels(client.get(view["images"][0]).content) == pixels(expected)).all()


def test_one_server_per_data_directory(tmp_path):
    """Two servers on one database would run the same queued jobs twice: the second one refuses to start."""
    first = JobStore(tmp_path)
    with pytest.raises(DataDirBusy):
        JobStore(tmp_path)
    first.close()
    JobStore(tmp_path).close()
