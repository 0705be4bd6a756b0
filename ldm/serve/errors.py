"""One error type for every refusal, rendered in the shape of the API family that was called: `{"detail": ...,
"field": ...}` for the native and AUTOMATIC1111 routes, OpenAI's `{"error": {"message", "type", "param", "code"}}`
under /v1/images and /v1/models. Messages are one line and name the field at fault."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PREFIXES = ("/v1/images", "/v1/models")
OPENAI_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.code = code


def field_error(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, f"{field}: {message}", field)


def error_body(path: str, status: int, message: str, field: str | None = None, code: str | None = None) -> dict:
    if path.startswith(OPENAI_PREFIXES):
        kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": field, "code": code}}
    return {"detail": message, "field": field}


def error_response(path: str, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, e.status, e.message, e.field, e.code), e.status, headers=e.headers)


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(field, one-line message) from pydantic's error list; the first error names the field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "form"):  # where it came from, not a field (a field may be "path")
        loc = loc[1:]
    field = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return field, f"{field}: {first.get('msg', 'invalid')}{more}"


def install(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        field, message = validation_message(list(e.errors()))
        return error_response(request.url.path, ApiError(422, message, field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(request.url.path, ApiError(e.status_code, message, headers=dict(e.headers or {})))
