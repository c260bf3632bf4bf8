"""A small HTTP/1.1 server on Trio and h11: streamed request bodies, streamed responses.

Both agent ports (envd and the code interpreter) are served by this module. It is
deliberately explicit: the SDKs depend on details that frameworks hide, such as
chunked request bodies on Connect streams and one flush per streamed envelope.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

RECEIVE_SIZE = 256 * 1024
# Unread request bodies larger than this are not drained; the connection is closed instead.
DRAIN_LIMIT = 1024 * 1024


class ClientGone(Exception):
    """The client closed the connection or broke the protocol mid-request."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    _connection: HttpConnection = field(repr=False)

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives (h11 undoes chunked transfer encoding)."""
        while True:
            event = await self._connection.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ClientGone(f"unexpected {type(event).__name__} in request body")

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])


class Response:
    """Writes one response: either whole (`send`) or streamed (`start`, `write`, `finish`)."""

    def __init__(self, connection: HttpConnection) -> None:
        self._connection = connection
        self.started = False
        self.finished = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        await self._connection.send(h11.Response(status_code=status, headers=headers))

    async def write(self, data: bytes) -> None:
        if data:
            await self._connection.send(h11.Data(data=data))

    async def finish(self) -> None:
        self.finished = True
        await self._connection.send(h11.EndOfMessage())

    async def client_gone(self) -> None:
        """Return once the client has closed the connection (call only after reading the body).

        A long response with nothing to write for a while (a silent cell) otherwise only
        notices a departed client at its next write.
        """
        await self._connection.wait_for_eof()

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


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpConnection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientGone(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from exc
            self.h11.receive_data(data)

    async def wait_for_eof(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.h11.receive_data(data)  # a pipelined next request: kept for the next cycle

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from exc


def is_client_gone(exc: BaseException) -> bool:
    """True for ClientGone, also when it reached us inside a nursery's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(ClientGone) is not None
    return isinstance(exc, ClientGone)


async def serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    connection = HttpConnection(stream)
    try:
        while await _serve_one(connection, handler):
            connection.h11.start_next_cycle()
    except Exception as exc:
        if not is_client_gone(exc):
            traceback.print_exc(file=sys.stderr)
    finally:
        await stream.aclose()


async def _serve_one(connection: HttpConnection, handler: Handler) -> bool:
    """Serve one request; True if the connection can carry another."""
    event = await connection.next_event()
    if not isinstance(event, h11.Request):
        return False
    target = urlsplit(event.target.decode("latin-1"))
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    request = Request(
        method=event.method.decode("ascii"),
        path=target.path,
        query=parse_qs(target.query, keep_blank_values=True),
        headers=headers,
        _connection=connection,
    )
    response = Response(connection)
    if headers.get("expect", "").lower() == "100-continue":
        # curl waits (about a second) for this before sending a large body; h11 leaves it to us.
        await connection.send(h11.InformationalResponse(status_code=100, headers=[]))
    try:
        await handler(request, response)
    except Exception as exc:
        if is_client_gone(exc):
            raise ClientGone(str(exc)) from exc
        traceback.print_exc(file=sys.stderr)
        if response.started:
            return False  # a half-sent response cannot be repaired; h11 would reject more events
        await response.send_json(500, {"code": 500, "message": "internal error"})
    if not response.finished:
        if not response.started:
            await response.send(204)
        else:
            await response.finish()
    if connection.h11.their_state is h11.SEND_BODY:
        drained = 0
        async for chunk in request.body_chunks():
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                return False
    return connection.h11.our_state is h11.DONE and connection.h11.their_state is h11.DONE


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port and serve every connection in its own task until cancelled."""

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_connection(stream, handler)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started()
    await trio.serve_listeners(on_connection, listeners)
