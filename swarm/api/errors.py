"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Every failure the gateway answers goes through here, so clients (the openai package raises ``BadRequestError`` on
400, ``NotFoundError`` on 404, ...) always get a readable message and never a traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from swarm.api.generation import ShuttingDown
from swarm.api.schemas import FIELD_NAMES
from swarm.client.routing import MissingBlocksError
from swarm.rpc.client import PeerUnavailable, RemoteError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client as OpenAI does."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid_body(error: ValidationError) -> APIError:
    """A 400 naming the first invalid field, e.g. ``Invalid 'max_tokens': Input should be greater than or equal
    to 1 (got -5)``."""
    problems = error.errors(include_url=False)
    first = problems[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {first['msg']}", code="invalid_json")
    if not first["loc"]:  # the body itself: e.g. a list instead of an object
        return APIError(400, f"The request body must be a JSON object ({first['msg']})")
    # Union members appear in the location as type names ("list[str]"); keep only fields and list indexes.
    path = ""
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in FIELD_NAMES:
            path += f".{part}" if path else part
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] != "missing" and isinstance(got, str | int | float | bool) and len(repr(got)) <= 60:
        message += f" (got {got!r})"
    if len(problems) > 1 and len({p["loc"][:1] for p in problems}) > 1:
        message += f"; and {len(problems) - 1} more problems"
    return APIError(400, f"Invalid '{path}': {message}", param=path or None)


def generation_failed(error: BaseException) -> APIError:
    """What to answer when the swarm could not generate: 503 for the swarm's failures, 500 for anything else."""
    if isinstance(error, ShuttingDown):
        return APIError(503, "The gateway is shutting down", type="server_error", code="shutting_down")
    if isinstance(error, MissingBlocksError | RemoteError | PeerUnavailable | TimeoutError):
        return APIError(503, f"The swarm could not serve this request: {error}", type="server_error",
                        code="swarm_unavailable")
    logger.error("Generation failed", exc_info=error)
    return APIError(500, f"Internal error while generating: {type(error).__name__}: {error}", type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's format: ours, FastAPI's validation, unknown routes, and unexpected ones."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return APIError(400, message).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        else:
            message = str(error.detail)
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error(f"Unexpected error on {request.method} {request.url.path}", exc_info=error)
        return APIError(500, f"Internal error: {type(error).__name__}", type="server_error").response()
