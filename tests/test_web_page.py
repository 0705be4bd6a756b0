"""The web page (`GET /`, ldm/serve/web/) in a real headless Chromium against a real `ldm-serve` process: it loads
clean, makes the API's images for the same settings, follows progress, explains refusals (422, 429), cancels, runs
img2img and inpainting from a result, asks for a key and says when it is wrong, keeps its gallery across a reload
and a server restart, and writes the screenshot in the README. The browser tests share one server (restarted once,
then with --api_key), one browser and one tab, in order; each also runs alone.

Chromium is Debian's (`apt-get install chromium`; .ci/run installs it), driven by Playwright; nothing is
downloaded (never `playwright install`)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm.serve.api_web import ASSETS, WEB
from ldm.serve.app import create_app

from .conftest import REPO
from .serve_util import SERVER_ENV, free_port, pixels, settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOT = REPO / "docs" / "images" / "web-page.png"
KEY = "web-page-test-key"
PROMPT = "a handwritten digit 3"
TIMEOUT_MS = 60_000  # a 2-core machine shared with other work is slow, not stuck


# --- without a browser -----------------------------------------------------------------------------------------


def test_page_and_assets_are_public_and_self_contained(tmp_path):
    """The page's files load without the key (it must be able to ask for it); the API behind it does not; the files
    name no other host, so the page works offline."""
    client = TestClient(create_app(settings(tmp_path, api_keys=["k"])))  # no lifespan: no model is loaded
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<script src="/web/app.js"' in page.text and 'href="/web/style.css"' in page.text
    for name, media_type in ASSETS.items():
        r = client.get(f"/web/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type and len(r.content) > 1000
    assert client.get("/web/nothing.js").status_code == 401  # only the page's own files are public
    assert client.get("/web/nothing.js", headers={"Authorization": "Bearer k"}).status_code == 404
    for path in ("/web/defaults", "/v1/jobs"):
        assert client.get(path).status_code == 401
    defaults = client.get("/web/defaults", headers={"Authorization": "Bearer k"}).json()
    assert (defaults["width"], defaults["height"], defaults["sampler"]) == (32, 32, "dpmpp_2m")
    assert sorted(p.name for p in WEB.iterdir()) == sorted(["index.html", *ASSETS])
    for path in WEB.iterdir():
        text = path.read_text()
        assert not re.findall(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), f"{path.name} names another host"
        assert "@import" not in text and "url(http" not in text


# --- servers and the browser ------------------------------------------------------------------------------------


class Server:
    """An ldm-serve process on a free port, its output in a file (an unread pipe would fill and stall it)."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.port, self.extra, self.proc = data_dir, free_port(), (), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> Server:
        self.extra = extra
        argv = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(self.port), "--data_dir",
                str(self.data_dir), "--threads", "1", *extra]  # fmt: skip
        self.log = open(self.data_dir.with_suffix(".log"), "a")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=SERVER_ENV)
        return self

    def wait_ready(self, timeout: float = 180.0) -> Server:
        end = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.data_dir.with_suffix(".log").read_text()[-3000:]
            try:
                if self.api("GET", "/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "ldm-serve did not get ready"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)  # SIGTERM drains: with nothing running, it exits at once
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc is not None:
            self.log.close()

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"} if "--api_key" in self.extra else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while (view := self.api("GET", f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < end, view
            time.sleep(0.05)
        return view


def open_page(browser, url: str, problems: list[str]):
    """A fresh tab (its own sessionStorage) on `url`, collecting console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.goto(url)
    return page


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server (no key at first), one browser and one tab on it, and what the tests learn on the way."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    server = Server(tmp_path_factory.mktemp("web") / "data").start("--max_queue", "1")
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)  # while the server starts
            page = open_page(browser, server.wait_ready().url, problems)
            yield {"page": page, "problems": problems, "server": server}
            browser.close()
    finally:
        server.stop(signal.SIGKILL)  # a failed test may leave a job running


def wait_until(page, expression: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Poll a JavaScript expression (page.wait_for_function evaluates a string, which the page's CSP forbids)."""
    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < end, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


def refused(shared, status: int) -> None:
    """The console errors so far are Chromium's notes of the refusals a test caused (`status`), and only those."""
    note = f"console error: Failed to load resource: the server responded with a status of {status} "
    assert shared["problems"] and all(p.startswith(note) for p in shared["problems"]), shared["problems"]
    shared["problems"].clear()


def settle(page) -> None:
    """The form's defaults and the gallery have come from the server."""
    page.wait_for_selector("#sampler option", state="attached")
    page.wait_for_selector("#gallery li")


def fill(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def use_seed(page, seed: int) -> None:
    page.uncheck("#random-seed")
    page.fill("#seed", str(seed))


def finished(page, previous: str | None = None, status: str = "succeeded") -> str:
    """The id of the job the result area shows once it has `status` (and is not `previous`), images decoded."""
    selector = f'#results[data-status="{status}"]' + (f':not([data-job-id="{previous}"])' if previous else "")
    page.wait_for_selector(selector)
    if status == "succeeded":
        wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0) "
                         "&& document.querySelectorAll('#results pre').length > 0")  # fmt: skip
    return page.get_attribute("#results", "data-job-id")


def shown_pixels(page) -> list[np.ndarray]:
    """The result images as the browser decoded them (drawn on a canvas, read back), RGB."""
    data = page.evaluate("""() => [...document.querySelectorAll('#results figure img')].map(img => {
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];
    })""")
    return [np.array(rgba, dtype=np.uint8).reshape(h, w, 4)[..., :3] for w, h, rgba in data]


def first_job(shared) -> str:
    """The txt2img job of test 2 (made here when that test was not run)."""
    if "first" not in shared:
        page = shared["page"]
        settle(page)
        fill(page, prompt=PROMPT, steps=8, n=4)
        use_seed(page, 7)
        page.click("#generate")
        shared["first"] = finished(page)
    return shared["first"]


# --- in the browser ---------------------------------------------------------------------------------------------


def test_page_loads_clean_labelled_and_fits_a_phone(shared):
    page = shared["page"]
    settle(page)
    assert page.title() == "ldm-serve"
    assert page.inner_text("#model") == "model: digits"
    assert page.input_value("#steps") == "20" and page.input_value("#sampler") == "dpmpp_2m"
    assert page.inner_text("#gallery") == "No jobs yet."
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.labels.length === 0).map(el => el.id)""")
    assert unlabelled == []
    assert shared["problems"] == []
    fill(page, steps=1000)  # over --max_steps: the refusal is shown in words, its field marked and focused
    page.click("#generate")
    page.wait_for_selector("#message:not([hidden])")
    assert "Refused: steps: must be between 1 and 150 (--max_steps), got 1000" in page.inner_text("#message")
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "steps"
    fill(page, steps=20)
    refused(shared, 422)
    page.set_viewport_size({"width": 375, "height": 800})
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing runs off a phone's screen
    finally:
        page.set_viewport_size({"width": 1280, "height": 800})


def test_a_prompt_shows_progress_then_the_apis_images(shared):
    page, server = shared["page"], shared["server"]
    settle(page)
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('progress-text').textContent))
            .observe(document.getElementById('progress-text'), {childList: true, characterData: true, subtree: true});
    }""")
    fill(page, prompt=PROMPT, steps=8, n=4)
    use_seed(page, 7)
    page.press("#prompt", "Control+Enter")  # the keyboard shortcut submits
    job_id = shared["first"] = finished(page)
    seen = page.evaluate("window.seen")
    assert any(re.fullmatch(r"Step [1-8] of 8( · about .* left)?", s) for s in seen), seen
    view = server.api("GET", f"/v1/jobs/{job_id}").json()
    assert view["kind"] == "txt2img" and view["request"]["seed"] == 7 and view["request"]["steps"] == 8
    assert page.inner_text("#progress-text") == "Done"
    # The same job through the API, as a client would send it: the page shows those pixels.
    body = {"prompt": PROMPT, "steps": 8, "seed": 7, "n": 4, "sampler": "dpmpp_2m", "scale": 3, "width": 32,
            "height": 32}  # fmt: skip
    api_view = server.wait_job(server.api("POST", "/v1/jobs", json=body).json()["id"])
    api_images = [pixels(server.api("GET", url).content) for url in api_view["images"]]
    shown = shown_pixels(page)
    assert len(shown) == 4 and all(np.array_equal(a, b) for a, b in zip(shown, api_images, strict=True))
    assert not np.array_equal(shown[0], shown[1])
    # Each image downloads as the server's PNG, "parameters" chunk included, which the page also shows.
    with page.expect_download() as download:
        page.locator("#results figure").first.get_by_text("Download PNG").click()
    data = Path(download.value.path()).read_bytes()
    assert data == server.api("GET", view["images"][0]).content
    text = Image.open(io.BytesIO(data)).text["parameters"]
    assert "Seed: 7" in text and page.locator("#results figure pre").first.text_content() == text


def test_use_as_input_runs_img2img_then_a_painted_mask_inpaints(shared):
    page, server = shared["page"], shared["server"]
    source = first_job(shared)
    page.click(f'.job[data-job-id="{source}"]')  # reopen it from the gallery
    page.wait_for_selector(f'#results[data-job-id="{source}"] figure img[src^="blob:"]')
    page.locator("#results figure").first.get_by_text("Use as input").click()
    page.wait_for_selector("#input-panel:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "strength"
    for _ in range(5):
        page.keyboard.press("ArrowLeft")  # 0.75 -> 0.5, from the keyboard
    assert page.inner_text("#strength-value") == "0.5"
    assert page.inner_text("#mode") == "img2img"
    sent = []

    def record(request):
        if request.method == "POST":
            sent.append(request.post_data_json)

    page.on("request", record)
    try:
        img2img, inpaint = run_img2img_then_inpaint(page, source)
    finally:
        page.remove_listener("request", record)
    view = server.api("GET", f"/v1/jobs/{img2img}").json()
    assert view["kind"] == "img2img" and view["request"]["strength"] == 0.5
    assert "Mask blur" not in Image.open(io.BytesIO(server.api("GET", view["images"][0]).content)).text["parameters"]
    assert (view["request"]["width"], view["request"]["height"]) == (32, 32)
    assert "mask" not in sent[0] and sent[0]["init_image"].startswith("data:image/png;base64,")
    assert sent[1]["kind"] == "inpaint" and sent[1]["init_image"] == sent[0]["init_image"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent[1]["mask"].partition(",")[2]))).convert("L"))
    assert mask.shape == (32, 32) and 0 < (mask > 127).mean() < 0.5  # painted along the drag, not everywhere
    assert mask[int(32 * 0.35), int(32 * 0.4)] > 127 and mask[28, 4] == 0
    # Masked: the job is an inpaint job, its PNG has a "Mask blur" field and its pixels outside the mask are the
    # input's.
    view = server.api("GET", f"/v1/jobs/{inpaint}").json()
    assert view["kind"] == "inpaint" and view["status"] == "succeeded"
    data = server.api("GET", view["images"][0]).content
    assert "Mask blur" in Image.open(io.BytesIO(data)).text["parameters"]
    source_image = server.api("GET", server.api("GET", f"/v1/jobs/{source}").json()["images"][0]).content
    made, source_pixels = pixels(data), pixels(source_image)
    assert np.array_equal(made[mask == 0], source_pixels[mask == 0]) and not np.array_equal(made, source_pixels)
    page.click("#remove-input")
    assert page.is_hidden("#input-panel") and page.is_enabled("#width")


def run_img2img_then_inpaint(page, source: str) -> tuple[str, str]:
    """Generate from the input image as it is (img2img), then again after a drag on it (inpaint)."""
    page.click("#generate")
    img2img = finished(page, previous=source)
    page.focus("#mask")  # the keyboard brush paints too; cleared again, so the mouse's mask is the one sent
    page.keyboard.press("Space")
    assert page.inner_text("#mode") == "inpaint" and page.is_visible("#brush-cursor")
    page.click("#clear-mask")
    assert page.inner_text("#mode") == "img2img"
    page.locator("#mask").scroll_into_view_if_needed()
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=6)
    page.mouse.up()
    assert page.inner_text("#mode") == "inpaint"
    page.click("#generate")
    return img2img, finished(page, previous=img2img)


def test_a_full_queue_is_explained_then_a_queued_job_runs_and_cancel_stops_it(shared):
    """--max_queue 1: one job running and one waiting fill it; the page says so (429, Retry-After). Then its own job
    waits its turn, runs, and Cancel stops it in the middle."""
    page, server = shared["page"], shared["server"]
    settle(page)
    long = {"prompt": "a handwritten digit 1", "steps": 150, "n": 8, "width": 64, "height": 64}
    running = server.api("POST", "/v1/jobs", json=long).json()["id"]
    waiting = server.api("POST", "/v1/jobs", json=long | {"steps": 4, "n": 1}).json()["id"]
    fill(page, steps=150, n=8, width=64, height=64)
    try:
        page.click("#generate")
        page.wait_for_selector("#message:not([hidden])")
        message = page.inner_text("#message")
        assert message.startswith("Too many requests: the queue is full (1 jobs waiting, --max_queue)"), message
        assert re.search(r"retry in \d+ s", message)
        refused(shared, 429)
        server.api("DELETE", f"/v1/jobs/{waiting}")
        page.click("#generate")
        page.wait_for_selector("#progress-text:text('Queued (position 1)')")
        assert page.is_hidden("#message") and page.is_enabled("#cancel") and page.is_disabled("#generate")
        server.api("DELETE", f"/v1/jobs/{running}")
        wait_until(page, "/^Step [1-9]\\d* of 150/.test(document.getElementById('progress-text').textContent)")
        page.click("#cancel")
        job_id = finished(page, status="cancelled")
    finally:
        fill(page, steps=8, n=4, width=32, height=32)
    view = server.api("GET", f"/v1/jobs/{job_id}").json()
    assert view["status"] == "cancelled" and "images" not in view and view["request"]["steps"] == 150
    assert page.inner_text("#progress-text") == "Cancelled"
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    page.wait_for_selector(f'.job[data-job-id="{job_id}"][data-status="cancelled"]')


def restart_with_key(shared) -> None:
    """Stop the server and start it again on the same data_dir and port, now with --api_key (once)."""
    server = shared["server"]
    if "--api_key" not in server.extra:
        server.stop()
        server.start("--api_key", KEY).wait_ready()


def test_a_missing_or_wrong_key_is_asked_for_and_explained(shared):
    page, server = shared["page"], shared["server"]
    first_job(shared)
    restart_with_key(shared)
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    page.reload()  # the page itself loads without a key ...
    page.wait_for_selector("#key-dialog[open]")  # ... and its first API call, answered 401, asks for one
    assert "This server needs an API key" in page.inner_text("#message")
    assert "missing or wrong API key" in page.inner_text("#key-reason")
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    wait_until(page, "document.getElementById('message').textContent.includes('refused this API key')")
    assert "missing or wrong API key" in page.inner_text("#message")
    assert page.is_visible("#key-dialog[open]")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    settle(page)
    assert page.is_hidden("#key-dialog") and page.is_hidden("#message")
    fill(page, prompt="a handwritten digit 8", steps=4, n=1)
    page.click("#generate")
    job_id = finished(page)  # its events and images came with the key, which no URL carries
    assert server.api("GET", f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert urls and not [u for u in urls if KEY in u or "not-the-key" in u]
    page.reload()  # the key is kept for the tab: not asked again
    settle(page)
    assert page.is_hidden("#key-dialog") and page.is_hidden("#message")
    refused(shared, 401)  # the refusals are the only errors


def test_the_gallery_survives_a_reload_and_a_server_restart(shared):
    page = shared["page"]
    job_id = first_job(shared)
    if "--api_key" not in shared["server"].extra:  # the test above restarted it; alone, this one does
        restart_with_key(shared)
        page.evaluate(f"sessionStorage.setItem('ldm-serve.key', '{KEY}')")
    page.reload()
    settle(page)
    item = f'.job[data-job-id="{job_id}"][data-status="succeeded"]'
    wait_until(page, f"document.querySelector('{item} img')?.naturalWidth === 32")
    assert PROMPT in page.inner_text(item)
    statuses = page.eval_on_selector_all(".job", "jobs => jobs.map(j => j.dataset.status)")
    assert statuses.count("succeeded") >= 1 and len(statuses) == len(set(page.eval_on_selector_all(
        ".job", "jobs => jobs.map(j => j.dataset.jobId)")))  # fmt: skip


def test_screenshot_of_a_finished_job(shared):
    """docs/images/web-page.png, replaced only when it was taken from a page that shows a finished job."""
    page = shared["page"]
    job_id = first_job(shared)
    settle(page)
    page.click(f'.job[data-job-id="{job_id}"]')
    finished(page)
    fill(page, prompt=PROMPT, steps=8, n=4)
    page.evaluate("document.activeElement.blur()")
    tmp = SCREENSHOT.with_name(f".{SCREENSHOT.stem}-{os.getpid()}.png")
    try:
        page.screenshot(path=str(tmp), full_page=True)
        with Image.open(tmp) as shot:
            assert shot.width == 1280 and shot.height >= 600
        assert len(page.query_selector_all("#results figure img")) == 4
        page.set_viewport_size({"width": 375, "height": 800})  # images and gallery fit a phone too
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        assert shared["problems"] == []
        shutil.move(tmp, SCREENSHOT)
    finally:
        tmp.unlink(missing_ok=True)
