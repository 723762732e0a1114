"""Error responses: OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) everywhere but under
`/sdapi/`, where AUTOMATIC1111's shape (`{"error", "detail", "body", "errors"}`) is what its clients read."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffrt.serve.jobs import ServeError

logger = logging.getLogger(__name__)
A1111_PREFIX = "/sdapi/"


def error_response(request: Request, error: ServeError) -> JSONResponse:
    if request.url.path.startswith(A1111_PREFIX):
        body: dict[str, Any] = {"error": error.code or error.kind, "detail": error.message, "body": "",
                                "errors": error.message}
    else:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form")]
        param = ".".join(location) or None
        message = f"`{param}`: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", error))
        return error_response(request, ServeError(422, message, param=param, code="invalid_type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(request, ServeError(error.status_code, str(error.detail), code=kind, kind=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request, ServeError(500, f"internal error: {type(error).__name__}", kind="server_error",
                                                  code="internal_error"))
