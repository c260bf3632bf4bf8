"""Every control-plane error is JSON `{"code": int, "message": str}` (PROTOCOL.md §2.1)."""

from __future__ import annotations

import json
import logging

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


def error_response(status: int, message: str, *, error_code: str | None = None) -> Response:
    body: dict[str, object] = {"code": status, "message": message}
    if error_code:
        body["error_code"] = error_code
    response = Response(json.dumps(body), status=status, content_type="application/json")
    if status >= 500:
        # Our 5xx are not transient: tell the SDK not to retry them (§2.8).
        response.headers["Should-Retry"] = "false"
    return response


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.message, error_code=error.error_code)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        return error_response(status, error.description or error.name)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("control-plane request failed")
        return error_response(500, f"internal error: {type(error).__name__}")
