"""One HTTP exchange, whichever protocol carries it: the request, its response, the handler.

Both agent ports (envd and the code interpreter) are served by `http_server.py`
(HTTP/1.1 on h11) and `http2_server.py` (h2c); handlers see only these classes. It is
deliberately explicit: the SDKs depend on details that frameworks hide, such as
chunked request bodies on Connect streams and one flush per streamed envelope.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import h11

RECEIVE_SIZE = 256 * 1024


class HttpError(Exception):
    """Answer the request with this status and a JSON `{"code": status, "message": ...}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed the connection or broke the protocol mid-request."""


class Exchange(Protocol):
    """One request/response exchange on a connection: HTTP/1.1 (h11) or an HTTP/2 stream."""

    def body_chunks(self) -> AsyncIterator[bytes]: ...

    async def send_head(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_end(self) -> None: ...

    async def wait_closed(self) -> None: ...


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    _exchange: Exchange = field(repr=False)

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives (h11 undoes chunked transfer encoding)."""
        return self._exchange.body_chunks()

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])


def make_request(method: str, target: str, headers: dict[str, str], exchange: Exchange) -> Request:
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    return Request(method=method, path=parts.path, query=query, headers=headers, _exchange=exchange)


class Response:
    """Writes one response: either whole (`send`) or streamed (`start`, `write`, `finish`)."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self.started = False
        self.finished = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        await self._exchange.send_head(status, headers)

    async def write(self, data: bytes) -> None:
        if data:
            await self._exchange.send_data(data)

    async def finish(self) -> None:
        self.finished = True
        await self._exchange.send_end()

    async def client_gone(self) -> None:
        """Return once the client has closed the connection (call only after reading the body).

        A long response with nothing to write for a while (a silent cell) otherwise only
        notices a departed client at its next write.
        """
        await self._exchange.wait_closed()

    async def send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        all_headers = list(headers or [])
        if content_type:
            all_headers.append(("Content-Type", content_type))
        if status not in (204, 304):
            all_headers.append(("Content-Length", str(len(body))))
        await self.start(status, all_headers)
        await self.write(body)
        await self.finish()

    async def send_json(self, status: int, value: object) -> None:
        await self.send(status, json.dumps(value).encode(), "application/json")


async def run_handler(handler: Handler, request: Request, response: Response) -> bool:
    """Run the handler and complete its response; False if the response could not be completed
    (a half-sent response cannot be repaired: the exchange must be dropped)."""
    try:
        await handler(request, response)
    except Exception as exc:
        if is_client_gone(exc):
            raise ClientGone(str(exc)) from exc
        traceback.print_exc(file=sys.stderr)
        if response.started:
            return False
        await response.send_json(500, {"code": 500, "message": "internal error"})
    if not response.finished:
        if not response.started:
            await response.send(204)
        else:
            await response.finish()
    return True


Handler = Callable[[Request, Response], Awaitable[None]]


def is_client_gone(exc: BaseException) -> bool:
    """True for ClientGone, also when it reached us inside a nursery's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(ClientGone) is not None
    return isinstance(exc, ClientGone)


@dataclass
class Upgrade:
    """An HTTP/1.1 request that asked for h2c: it becomes stream 1 of the HTTP/2 connection."""

    request: h11.Request
    body: bytes
    settings: str
