"""Who may call, and how much they may send: API keys (Bearer) and HTTP Basic users, checked in constant time
before any route runs (every route but /healthz and the web page's files, unknown paths and the docs included);
request bodies capped; one structured log line per request. Plain ASGI middleware, so nothing reaches a route
unchecked."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ldm.serve.api_web import PUBLIC_PATHS
from ldm.serve.errors import ApiError, error_body
from ldm.serve.service import Service
from ldm.serve.settings import Settings

OPEN_PATHS = {"/healthz", *PUBLIC_PATHS}  # the page holds no data; it must load to ask for the key
SIGNED_IMAGE = re.compile(r"/v1/jobs/([0-9a-f]{32})/images/(\d{1,6})\.png")
access_log = logging.getLogger("ldm.serve.access")


def any_equal(given: bytes, secrets_: list[bytes]) -> bool:
    """Whether `given` equals one of `secrets_`, comparing against every one in constant time (no early exit)."""
    found = False
    for s in secrets_:
        found |= hmac.compare_digest(given, s)
    return found


class Authenticator:
    def __init__(self, settings: Settings):
        self.keys = [k.encode() for k in settings.api_keys]
        self.pairs = [(u.encode(), p.encode()) for u, p in settings.api_auth]
        self.required = settings.auth_required
        challenges = ['Bearer realm="ldm-serve"'] + (['Basic realm="ldm-serve"'] if self.pairs else [])
        self.challenge = ", ".join(challenges)

    def check(self, authorization: str | None) -> bool:
        scheme, _, value = (authorization or "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.keys:
            return any_equal(value.encode(), self.keys)
        if scheme.lower() == "basic" and self.pairs:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
            ok = False
            for u, p in self.pairs:
                ok |= hmac.compare_digest(user.encode(), u) & hmac.compare_digest(password.encode(), p)
            return ok and bool(sep)
        return False


class AuthMiddleware:
    def __init__(self, app: ASGIApp, auth: Authenticator, service: Service):
        self.app = app
        self.auth = auth
        self.service = service

    def _signed(self, scope: Scope) -> bool:
        """An image URL handed out by the OpenAI route (response_format=url) carries its own signature."""
        m = SIGNED_IMAGE.fullmatch(scope["path"])
        if not m or scope["method"] != "GET":
            return False
        query = dict(p.partition("=")[::2] for p in scope.get("query_string", b"").decode("latin-1").split("&"))
        sig = query.get("sig", "")
        return bool(sig) and self.service.signature_ok(m.group(1), int(m.group(2)), sig)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.required or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.auth.check(Headers(scope=scope).get("authorization")) or self._signed(scope):
            return await self.app(scope, receive, send)
        self.service.metrics.rejected.labels("unauthorized").inc()
        message = "missing or wrong API key: send Authorization: Bearer KEY (or HTTP Basic user:password)"
        body = error_body(scope["path"], 401, message, "Authorization", code="invalid_api_key")
        await JSONResponse(body, 401, headers={"WWW-Authenticate": self.auth.challenge})(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over --max_body, whether it says so in Content-Length or streams it (chunked)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def too_large(self) -> ApiError:
        return ApiError(413, f"body: request body over the {self.limit} bytes allowed (--max_body)", "body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            e = self.too_large()
            return await JSONResponse(error_body(scope["path"], 413, e.message, e.field), 413)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self.too_large()
            return message

        await self.app(scope, limited, send)


class AccessLogMiddleware:
    """One JSON line per request: method, path (no query: it may hold a URL signature), status, time, client."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            client = scope.get("client")
            access_log.info(json.dumps({
                "event": "request", "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round(1000 * (time.monotonic() - start), 1), "client": client[0] if client else None,
            }))  # fmt: skip
