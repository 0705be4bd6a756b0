"""The web page: `GET /` and its two static files (plain HTML, CSS and JavaScript shipped in the package, no build
step, nothing fetched from elsewhere), and `GET /web/defaults`, what an empty form means on this server.

The page's files hold no data, so they load without a key (`PUBLIC_PATHS`, which the auth middleware lets through):
the page must be able to ask for the key. Everything the page shows comes from the API, with the key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ldm.generation.generate import SAMPLER_NAMES
from ldm.serve.api_common import service_of
from ldm.serve.errors import ApiError

router = APIRouter(tags=["web page"])
WEB = Path(__file__).with_name("web")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = frozenset({"/", *(f"/web/{name}" for name in ASSETS)})
# The page loads only its own files and talks only to this server: a stray external reference fails loudly.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the package is seen at the next load
}


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/web/defaults")
async def defaults(request: Request) -> dict:
    """The form's defaults and bounds: the model config's txt2img defaults, the sampler names and the limits, so the
    page shows what an empty field will mean and refuses out-of-range values before sending them."""
    service = service_of(request)
    d, limits = service.defaults, service.limits
    return {
        "model": Path(service.settings.config).stem,
        "sampler": d["sampler"],
        "samplers": list(SAMPLER_NAMES),
        "steps": int(d["ddim_steps"]),
        "scale": float(d["scale"]),
        "width": int(d["W"]),
        "height": int(d["H"]),
        "factor": int(d["f"]),
        "limits": {name: getattr(limits, name) for name in ("max_steps", "max_images", "max_pixels", "max_prompt")},
    }


@router.get("/web/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, f"no such file: /web/{name[:80]}")
    return FileResponse(WEB / name, media_type=ASSETS[name], headers=HEADERS)
