"""The image service with LoRAs, embeddings, the tiny autoencoder, LCM and step previews (in-process, the digits
model): each request equals the CLI with the same flags, names are looked up in the server's own folders only,
and the shared model is the base model again after every job."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from ldm.files.infotext import parse_infotext
from ldm.serve.errors import ApiError
from ldm.serve.schemas import JobSpec, build_job
from ldm.serve.settings import Limits

from .adapter_models import make_lora
from .serve_util import app_for, cli_outputs, pixels, shared_engine, wait_ready, wait_status

DIGIT = "a handwritten digit 7"
RUN = {"seed": 11, "steps": 6, "sampler": "euler", "n": 1}
CLI = ("--seed", "11", "--ddim_steps", "6", "--sampler", "euler", "--n_samples", "1", "--n_iter", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A LoRA folder with `ink` (and `sub/ink2`), an embeddings folder with the word `mystyle`."""
    root = tmp_path_factory.mktemp("adapters")
    model = shared_engine().model
    text = model.cond_stage_model.transformer.text_model
    (root / "lora" / "sub").mkdir(parents=True)
    save_file(make_lora("kohya_ldm", model.model.diffusion_model, text, seed=3), root / "lora" / "ink.safetensors")
    save_file(make_lora("kohya_ldm", model.model.diffusion_model, text, seed=4), root / "lora" / "sub/ink2.safetensors")
    (root / "emb").mkdir()
    width = text.embeddings.token_embedding.weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(1))
    torch.save({"string_to_param": {"*": vectors}}, root / "emb" / "mystyle.pt")
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory, folders):
    app = app_for(tmp_path_factory.mktemp("serve"), lora_dir=folders / "lora", embeddings_dir=folders / "emb")
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def run_job(client, **body) -> tuple[dict, list[bytes]]:
    r = client.post("/v1/jobs", json={**RUN, **body})
    assert r.status_code == 202, r.text
    view = wait_status(client, r.json()["id"])
    assert view["status"] == "succeeded", view
    return view, [client.get(url).content for url in view["images"]]


def info(png: bytes) -> tuple[str, dict]:
    prompt, _, fields = parse_infotext(Image.open(io.BytesIO(png)).info["parameters"])
    return prompt, fields


def test_a_lora_tag_and_the_loras_field_equal_the_cli_flag_and_come_off_after_the_job(client, folders, tmp_path):
    _, (base,) = run_job(client, prompt=DIGIT)
    _, (tagged,) = run_job(client, prompt=f"{DIGIT} <lora:ink:0.8>")
    _, (field,) = run_job(client, prompt=DIGIT, loras=[{"name": "ink", "weight": 0.8}])
    lora = folders / "lora" / "ink.safetensors"
    (cli,) = cli_outputs(tmp_path, "--prompt", DIGIT, "--lora", f"{lora}:0.8", *CLI)
    assert (pixels(tagged) == pixels(cli)).all() and (pixels(field) == pixels(cli)).all()
    assert not (pixels(tagged) == pixels(base)).all()  # the LoRA did something
    prompt, fields = info(tagged)
    assert prompt == f"{DIGIT} <lora:ink:0.8>" and fields["Lora hashes"].startswith("ink: ")
    assert info(field) == info(cli.read_bytes())  # the flag is recorded as the CLI records --lora
    _, (again,) = run_job(client, prompt=DIGIT)
    assert (pixels(again) == pixels(base)).all()  # unmerged: the next job has the base weights


def test_a1111_prompt_tags_and_the_listings(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": f"{DIGIT} <lora:sub/ink2:1>", "seed": 11, "steps": 6,
                                                "sampler_name": "Euler", "batch_size": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["images"][0])
    _, (native,) = run_job(client, prompt=f"{DIGIT} <lora:sub/ink2:1>")
    assert (pixels(png) == pixels(native)).all()
    assert info(png)[1]["Lora hashes"].startswith("ink2: ")  # the file name, as A1111 writes it
    assert client.get("/v1/loras").json() == {"loras": [{"name": "ink"}, {"name": "sub/ink2"}]}
    a1111 = client.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in a1111] == ["ink", "sub/ink2"] and all(x["path"] is None for x in a1111)
    width = shared_engine().model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.shape[1]
    assert client.get("/v1/embeddings").json()["embeddings"] == [{"word": "mystyle", "vectors": 2, "width": width}]
    assert client.get("/sdapi/v1/embeddings").json()["loaded"]["mystyle"]["vectors"] == 2


def test_an_embedding_word_in_the_prompt_equals_the_cli(client, folders, tmp_path):
    _, (served,) = run_job(client, prompt=f"{DIGIT} in mystyle")
    (cli,) = cli_outputs(tmp_path, "--prompt", f"{DIGIT} in mystyle", "--embeddings_dir", folders / "emb", *CLI)
    (plain,) = cli_outputs(tmp_path / "plain", "--prompt", f"{DIGIT} in mystyle", *CLI)
    assert (pixels(served) == pixels(cli)).all() and not (pixels(served) == pixels(plain)).all()
    assert info(served)[1]["TI hashes"].startswith("mystyle: ")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": f"{DIGIT} <lora:secret:1>"}, "prompt"),
        ({"prompt": f"{DIGIT} <lora:{'/'.join(('..', 'lora', 'ink'))}:1>"}, "prompt"),  # a path, not a listed name
        ({"negative_prompt": "<lora:/etc/passwd:1>"}, "negative_prompt"),
        ({"prompt": f"{DIGIT} <lora:ink:x>"}, "prompt"),
        ({"loras": [{"name": "ink.safetensors"}]}, "loras[0].name"),
        ({"loras": [{"name": "ink", "weight": 1, "path": "/x"}]}, "loras.0.path"),
        ({"prompt": f"{DIGIT} <lyco:ink:1>"}, "prompt"),
        ({"vae": "tiny"}, "vae"),
    ],
)
def test_bad_adapter_requests_name_the_field_and_open_nothing(client, body, field):
    before = client.get("/v1/jobs").json()["jobs"]
    r = client.post("/v1/jobs", json={"prompt": DIGIT, **body})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["detail"].startswith(field), r.json()
    assert client.get("/v1/jobs").json()["jobs"] == before  # nothing queued


def test_previews_need_a_tiny_autoencoder():
    spec = JobSpec(prompt=DIGIT, previews=True)
    with pytest.raises(ApiError) as e:
        build_job(spec, Limits(), shared_engine().defaults, None, tiny=False)
    assert e.value.status == 422 and e.value.field == "previews"
    build_job(spec, Limits(), shared_engine().defaults, None, tiny=True)  # the digits config has one


def test_tiny_autoencoder_and_lcm_requests_equal_the_cli(client, tmp_path):
    _, (tiny,) = run_job(client, prompt=DIGIT, vae="taesd")
    (cli,) = cli_outputs(tmp_path / "t", "--prompt", DIGIT, "--vae", "taesd", *CLI)
    assert (pixels(tiny) == pixels(cli)).all() and info(tiny)[1]["VAE"] == "taesd"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": DIGIT, "seed": 11, "steps": 4, "cfg_scale": 1,
                                                "sampler_name": "LCM"})  # fmt: skip
    assert r.status_code == 200, r.text
    (lcm,) = cli_outputs(tmp_path / "l", "--prompt", DIGIT, "--seed", "11", "--ddim_steps", "4", "--scale", "1",
                         "--sampler", "lcm", "--n_samples", "1", "--n_iter", "1")  # fmt: skip
    assert (pixels(base64.b64decode(r.json()["images"][0])) == pixels(lcm)).all()
    assert any(s["name"] == "LCM" for s in client.get("/sdapi/v1/samplers").json())


def test_step_previews_come_with_progress_events_and_change_nothing(client):
    body = {"prompt": DIGIT, "steps": 12, "seed": 3, "sampler": "euler"}
    job = client.post("/v1/jobs", json={**body, "previews": True}).json()
    previews, polled = [], []

    def poll_a1111() -> None:  # A1111's /progress carries the same picture as current_image
        while not polled:
            image = client.get("/sdapi/v1/progress").json()["current_image"]
            if image:
                polled.append(base64.b64decode(image))
            if client.get(f"/v1/jobs/{job['id']}").json()["status"] in ("succeeded", "failed", "cancelled"):
                return

    poller = threading.Thread(target=poll_a1111)
    poller.start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "progress":
                data = json.loads(line[6:])
                if "preview" in data:
                    assert data["preview"].startswith("data:image/jpeg;base64,")
                    previews.append((data["progress"]["preview_step"], base64.b64decode(data["preview"][23:])))
            elif line.startswith("data: ") and name == "done":
                break
    poller.join()
    view = wait_status(client, job["id"])
    assert previews and view["status"] == "succeeded"
    steps = [s for s, _ in previews]
    assert steps == sorted(steps) and steps[-1] >= 6
    for _, jpeg in previews[-1:]:
        im = Image.open(io.BytesIO(jpeg))
        assert im.format == "JPEG" and im.size == (view["request"]["width"], view["request"]["height"])
    last = pixels(previews[-1][1]).astype(float)
    final = pixels(client.get(view["images"][0]).content).astype(float)
    first = pixels(previews[0][1]).astype(float)
    assert abs(last - final).mean() < abs(first - final).mean()  # the previews converge on the picture
    assert polled and Image.open(io.BytesIO(polled[0])).format == "JPEG"
    assert client.get(f"/v1/jobs/{job['id']}/preview").status_code == 404  # only while it runs
    plain = wait_status(client, client.post("/v1/jobs", json=body).json()["id"])
    assert (pixels(client.get(plain["images"][0]).content) == final).all()  # previews change no pixel
