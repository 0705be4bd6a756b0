"""The FastAPI application: one router per API family, behind auth, body limits and access logs; the lifespan
starts the worker (which loads the model) and, at shutdown, drains it."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from ldm.serve import api_a1111, api_native, api_openai, api_ops, api_web, errors
from ldm.serve.engine import Engine
from ldm.serve.security import AccessLogMiddleware, Authenticator, AuthMiddleware, BodyLimitMiddleware
from ldm.serve.service import Service
from ldm.serve.settings import Settings


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app for `settings`; `engine` is a model already loaded (tests share one), else the worker loads it."""
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.drain(settings.grace)
            service.close()

    app = FastAPI(title="ldm-serve", version="1", lifespan=lifespan)
    app.state.service = service
    errors.install(app)
    for module in (api_native, api_openai, api_a1111, api_ops, api_web):
        app.include_router(module.router)
    app.include_router(api_native.catalog)
    # Added innermost first: the access log sees every answer, CORS answers preflights before auth.
    app.add_middleware(BodyLimitMiddleware, limit=settings.limits.max_body)
    app.add_middleware(AuthMiddleware, auth=Authenticator(settings), service=service)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])  # fmt: skip
    app.add_middleware(AccessLogMiddleware)
    return app
