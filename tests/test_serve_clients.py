"""The real, unmodified clients against the service on a socket: webuiapi (A1111) gives the CLI's images pixel for
pixel, openai's client generates and edits and raises its own errors; and the security rules (keys on every route
but /healthz, constant-time comparison, no CORS unless configured, no public port without a key)."""

from __future__ import annotations

import base64
import hmac
import io
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from ldm.serve.settings import SettingsError, parse_settings

from .conftest import REPO
from .serve_util import SERVER_ENV, app_for, cli_outputs, free_port, pixels, threaded_server

KEY = "sk-test-0123456789"
USER, PASSWORD = "artist", "correct horse"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with threaded_server(tmp_path_factory.mktemp("clients"), api_keys=[KEY], api_auth=[(USER, PASSWORD)]) as u:
        yield u


@pytest.fixture(scope="module")
def a1111(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username=USER, password=PASSWORD)


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    from ldm.generation.pipeline import Pipeline

    Pipeline.from_config().txt2img("a handwritten digit 3", seed=4, steps=8)[0].save(folder / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def test_webuiapi_txt2img_equals_the_cli(a1111, tmp_path):
    # The client's default sampler is "Euler a"; batch_size and n_iter are the CLI's --n_samples and --n_iter.
    result = a1111.txt2img(prompt="a handwritten digit 2", negative_prompt="a handwritten digit 7", seed=21, steps=10,
                           cfg_scale=3.5, width=32, height=32, batch_size=2, n_iter=2)  # fmt: skip
    expected = cli_outputs(tmp_path, "--prompt", "a handwritten digit 2", "--negative_prompt", "a handwritten digit 7",
                           "--seed", 21, "--ddim_steps", 10, "--scale", 3.5, "--H", 32, "--W", 32, "--n_samples", 2,
                           "--n_iter", 2, "--sampler", "euler_a")  # fmt: skip
    assert len(result.images) == len(expected) == 4
    for got, want in zip(result.images, expected, strict=True):
        assert np.array_equal(pixels(got), pixels(want))
    assert result.info["seed"] == 21 and result.info["all_seeds"] == [21] * 4
    assert result.info["infotexts"][0] == Image.open(expected[0]).info["parameters"]


def test_webuiapi_karras_sampler_names_map_onto_ours(a1111, tmp_path):
    result = a1111.txt2img(prompt="a handwritten digit 9", seed=2, steps=6, width=32, height=32,
                           sampler_name="DPM++ 2M Karras")  # fmt: skip
    (expected,) = cli_outputs(tmp_path, "--prompt", "a handwritten digit 9", "--seed", 2, "--ddim_steps", 6, "--scale",
                              7.0, "--n_samples", 1, "--sampler", "dpmpp_2m", "--karras")  # fmt: skip
    assert np.array_equal(pixels(result.image), pixels(expected))


@pytest.mark.parametrize("with_mask", [False, True], ids=["img2img", "inpainting"])
def test_webuiapi_img2img_equals_the_cli(a1111, init_and_mask, tmp_path, with_mask):
    init, mask = init_and_mask
    extra = {"mask_image": Image.open(mask), "mask_blur": 4} if with_mask else {}
    result = a1111.img2img(images=[Image.open(init)], prompt="a handwritten digit 8", denoising_strength=0.6, seed=13,
                           steps=10, cfg_scale=3.0, width=32, height=32, sampler_name="DPM++ 2M", **extra)  # fmt: skip
    args = ["--init-img", init, "--prompt", "a handwritten digit 8", "--strength", 0.6, "--seed", 13, "--ddim_steps",
            10, "--scale", 3.0, "--n_samples", 1, "--sampler", "dpmpp_2m"]  # fmt: skip
    if with_mask:
        args += ["--mask", mask, "--mask_blur", 4]
    (expected,) = cli_outputs(tmp_path, *args, img2img=True)
    assert np.array_equal(pixels(result.image), pixels(expected))
    assert result.info["seed"] == 13
    if with_mask:
        assert np.array_equal(pixels(result.image)[:2], pixels(init)[:2])  # far from the mask: the input's pixels


def test_openai_generate_two_images(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    response = client.images.generate(prompt="a handwritten digit 1", n=2, response_format="b64_json", size="32x32")
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    signed = client.images.generate(prompt="a handwritten digit 1", response_format="url").data[0].url
    assert httpx.get(signed).status_code == 200  # the URL signs itself: no key needed
    assert httpx.get(signed[:-4] + "0000").status_code == 401


def test_openai_edit_repaints_only_the_transparent_part(url, init_and_mask, tmp_path):
    init, mask = init_and_mask
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    transparent.paste((0, 0, 0, 0), (8, 8, 24, 24))  # OpenAI's masks: transparent = repaint
    transparent.save(tmp_path / "mask.png")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with open(init, "rb") as image, open(tmp_path / "mask.png", "rb") as m:
        response = client.images.edit(image=image, mask=m, prompt="a handwritten digit 0", response_format="b64_json")
    out = pixels(base64.b64decode(response.data[0].b64_json))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(out[keep], pixels(init)[keep]) and not np.array_equal(out, pixels(init))


def test_openai_errors_are_its_own_exceptions(url):
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a handwritten digit 1")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as over:
        client.images.generate(prompt="a handwritten digit 1", n=1000)
    assert 400 <= over.value.status_code < 500 and "n:" in over.value.message
    with pytest.raises(openai.APIStatusError) as size:
        client.images.generate(prompt="a handwritten digit 1", size="4096x4096")
    assert size.value.status_code == 422 and "size" in size.value.message


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    with TestClient(app_for(tmp_path_factory.mktemp("locked"), api_keys=[KEY, "sk-second"],
                            api_auth=[(USER, PASSWORD)])) as c:  # fmt: skip
        yield c


def test_without_a_key_every_route_but_healthz_is_401(locked):
    job = "0" * 32
    routes = locked.app.openapi()["paths"]  # every route of every router
    paths = {(m.upper(), p.replace("{job_id}", job).replace("{name}", "0.png").replace("{model_id}", "digits"))
             for p, methods in routes.items() for m in methods}  # fmt: skip
    paths |= {("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no/such/path"), ("GET", f"/v1/jobs/{job}")}
    assert len(paths) > 25
    for method, path in sorted(paths):
        r = locked.request(method, path)
        if path == "/healthz":
            assert r.status_code == 200
            continue
        assert r.status_code == 401, (method, path)
        assert "Bearer" in r.headers["WWW-Authenticate"] and "Basic" in r.headers["WWW-Authenticate"]
        bad = locked.request(method, path, headers={"Authorization": "Bearer sk-almost"})
        assert bad.status_code == 401, (method, path)
    assert locked.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).status_code in (200, 503)
    assert locked.get("/readyz", auth=(USER, PASSWORD)).status_code in (200, 503)
    assert locked.get("/readyz", auth=(USER, "wrong")).status_code == 401
    openai_shape = locked.get("/v1/images/x", headers={"Authorization": "Bearer x"}).json()
    assert openai_shape["error"]["code"] == "invalid_api_key"


def test_keys_are_compared_in_constant_time_against_every_key(locked, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for given in (KEY, "sk-second", "sk-wrong"):
        calls.clear()
        locked.get("/readyz", headers={"Authorization": f"Bearer {given}"})
        assert sorted(b for _, b in calls) == sorted([KEY.encode(), b"sk-second"])  # no early exit
        assert all(a == given.encode() for a, _ in calls)


def test_no_cors_headers_unless_configured(locked, tmp_path):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = locked.options("/v1/jobs", headers=preflight)
    assert not any(h.lower().startswith("access-control-") for h in r.headers)
    r = locked.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with TestClient(app_for(tmp_path, cors_origins=["https://app.example"])) as c:
        ok = c.options("/v1/jobs", headers={**preflight, "Origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in c.get("/healthz", headers=preflight).headers


def test_a_public_address_without_a_key_refuses_to_start(tmp_path):
    port = free_port()
    argv = [sys.executable, str(REPO / "scripts" / "serve.py"), "--host", "0.0.0.0", "--port", str(port),
            "--data_dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**SERVER_ENV, "LDM_API_KEYS": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: refusing to serve on 0.0.0.0 without authentication")
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(SettingsError):
        parse_settings(["--host", "192.168.1.5"])
    assert parse_settings(["--host", "0.0.0.0", "--api_key", KEY]).api_keys == [KEY]
    assert parse_settings(["--host", "0.0.0.0", "--insecure_no_auth"]).insecure_no_auth
    assert parse_settings(["--host", "::1"]).host == "::1"
