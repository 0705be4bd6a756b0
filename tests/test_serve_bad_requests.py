"""Bad requests, each answered 4xx with a one-line message naming the field, while the server keeps serving; and
the decompression bomb that the CLI and the service share a reader for (one-line error, not a traceback)."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .conftest import REPO
from .serve_util import SERVER_ENV, app_for, wait_ready, wait_status

MAX_BODY = 3 * 1024 * 1024
DIGIT = "a handwritten digit 6"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A valid greyscale PNG of side x side black pixels: 1.7 MB on disk, 400 million pixels decoded."""
    z = zlib.compressobj(1)
    row = b"\0" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def png(size=(32, 32), mode="RGB", value=128) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(app_for(tmp_path_factory.mktemp("bad"), max_body=MAX_BODY)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def finished(client, expired) -> dict:
    """A succeeded job (made after `expired` has expired, so that it is not)."""
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 2}).json()
    return wait_status(client, job["id"])


IMG = {"kind": "img2img", "prompt": DIGIT}
PARENT = "/".join([".."] * 2)  # (built, so that no file of the repository names a path outside it)
CASES = [
    # (method, path, json body or None, status, the field named)
    ("POST", "/v1/jobs", {"prompt": DIGIT, "width": 30}, 422, "width"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "width": 2048, "height": 2048}, 422, "width"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "steps": 0}, 422, "steps"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "steps": 100000}, 422, "steps"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "steps": "many"}, 422, "steps"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "n": 0}, 422, "n"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "n": 1000}, 422, "n"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "sampler": "Euler b"}, 422, "sampler"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "sampler": "ddim", "karras": True}, 422, "sampler"),
    ("POST", "/v1/jobs", {"prompt": "x" * 1_000_000}, 422, "prompt"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "seed": 2**70}, 422, "seed"),
    ("POST", "/v1/jobs", {"prompt": DIGIT + " <lora:secret:1>"}, 422, "prompt"),
    ("POST", "/v1/jobs", {"prompt": DIGIT, "colour": "red"}, 422, "colour"),
    ("POST", "/v1/jobs", {**IMG, "init_image": "not base64 at all!"}, 422, "init_image"),
    ("POST", "/v1/jobs", {**IMG, "init_image": base64.b64encode(b"hello, no image").decode()}, 422, "init_image"),
    ("POST", "/v1/jobs", {**IMG, "init_image": "BOMB"}, 422, "init_image"),
    ("POST", "/v1/jobs", {**IMG, "init_image": png(), "strength": 1.5}, 422, "strength"),
    ("POST", "/v1/jobs", {**IMG, "init_image": png(), "mask": png((96, 32), "L", 255)}, 422, "mask"),
    ("POST", "/v1/jobs", {**IMG, "kind": "inpaint", "init_image": png()}, 422, "mask"),
    ("POST", "/v1/jobs", {"kind": "img2img", "prompt": DIGIT}, 422, "init_image"),
    ("POST", "/v1/jobs", "TEXT", 415, "Content-Type"),
    ("POST", "/v1/jobs", "BROKEN JSON", 422, "body"),
    ("POST", "/v1/jobs", "BIG", 413, "body"),
    ("GET", f"/v1/jobs/{PARENT}/etc/passwd", None, 404, None),
    ("GET", "/v1/jobs/" + PARENT.replace("/", "%2F") + "%2Fetc%2Fpasswd", None, 404, None),
    ("GET", "/v1/jobs/..%2e", None, 422, "job_id"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef", None, 404, "job_id"),
    ("GET", "/v1/jobs/FINISHED/images/..%2F..%2Fjobs.sqlite3", None, 404, None),
    ("GET", "/v1/jobs/FINISHED/images/7.png", None, 404, "image"),
    ("DELETE", "/v1/jobs/FINISHED", None, 409, "job_id"),
    ("GET", "/v1/jobs/EXPIRED", None, 410, "job_id"),
    ("POST", "/sdapi/v1/txt2img", {"prompt": DIGIT, "sampler_name": "Euler b"}, 422, "sampler_name"),
    ("POST", "/sdapi/v1/txt2img", {"prompt": DIGIT, "cfg_scale": "high"}, 422, "cfg_scale"),
    ("POST", "/sdapi/v1/txt2img", {"prompt": DIGIT, "batch_size": 1000}, 422, "batch_size"),
    ("POST", "/sdapi/v1/txt2img", {"prompt": DIGIT, "scheduler": "Exponential-ish"}, 422, "scheduler"),
    ("POST", "/sdapi/v1/img2img", {"prompt": DIGIT, "init_images": ["%%%"]}, 422, "init_images"),
    ("POST", "/sdapi/v1/png-info", {"image": base64.b64encode(b"GIF89a-no").decode()}, 422, "image"),
    ("POST", "/v1/images/generations", {"prompt": DIGIT, "size": "100x100"}, 422, "size"),
    ("POST", "/v1/images/generations", {"prompt": DIGIT, "size": "huge"}, 422, "size"),
    ("POST", "/v1/images/generations", {"prompt": DIGIT, "n": 0}, 422, "n"),
    ("POST", "/v1/images/generations", {"n": 1}, 422, "prompt"),
]


@pytest.fixture(scope="module")
def expired(client) -> str:
    service = client.app.state.service
    job = client.post("/v1/jobs", json={"prompt": DIGIT, "steps": 1}).json()
    wait_status(client, job["id"])
    assert service.store.expire(0.0, now=service.store.get(job["id"]).finished + 1) == [job["id"]]
    return job["id"]


@pytest.mark.parametrize("method,path,body,status,field", CASES, ids=[f"{c[1]} {str(c[2])[:40]}" for c in CASES])
def test_bad_request_is_4xx_naming_the_field(client, finished, expired, bomb, method, path, body, status, field):
    path = path.replace("FINISHED", finished["id"]).replace("EXPIRED", expired)
    kwargs = {}
    if body == "TEXT":
        kwargs = {"content": b'{"prompt": "x"}', "headers": {"Content-Type": "text/plain"}}
    elif body == "BROKEN JSON":
        kwargs = {"content": b'{"prompt": ', "headers": {"Content-Type": "application/json"}}
    elif body == "BIG":
        kwargs = {"content": b" " * (MAX_BODY + 1), "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        if body.get("init_image") == "BOMB":
            body = {**body, "init_image": base64.b64encode(bomb).decode()}
        kwargs = {"json": body}
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    payload = r.json()
    message = payload["error"]["message"] if "error" in payload else payload["detail"]
    assert "\n" not in message and "Traceback" not in message
    if field is not None:
        assert field in message, message
    if path.startswith("/v1/images"):
        assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == field
    assert "root:" not in r.text
    assert client.get("/healthz").status_code == 200


def test_the_server_keeps_serving_and_an_empty_prompt_is_valid(client):
    r = client.post("/v1/jobs", json={"prompt": "", "steps": 2})
    assert r.status_code == 202
    assert wait_status(client, r.json()["id"])["status"] == "succeeded"


def test_the_bomb_message_names_its_size(client, bomb):
    r = client.post("/v1/jobs", json={**IMG, "init_image": base64.b64encode(bomb).decode()})
    assert "400000000 pixels" in r.json()["detail"]


def test_the_cli_gives_one_line_for_a_decompression_bomb(tmp_path, bomb):
    """scripts/img2img.py on a 20000x20000 PNG: exit 2 and one `error:` line, where PIL used to end in a traceback."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    argv = [sys.executable, str(REPO / "scripts" / "img2img.py"), "--config", str(REPO / "configs/demo/digits.yaml"),
            "--init-img", str(path), "--prompt", DIGIT, "--outdir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=SERVER_ENV)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "decompression bomb" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "out").exists()
