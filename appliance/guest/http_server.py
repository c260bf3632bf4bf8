"""The agent's HTTP server: HTTP/1.1 on Trio and h11 (streamed request bodies, streamed
responses, 100-continue, client-gone detection), handing HTTP/2 connections (prior
knowledge or `Upgrade: h2c`) to http2_server.py.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import AsyncIterator, Iterable

import h11
import trio

from appliance.guest import http2
from appliance.guest.http import (
    RECEIVE_SIZE,
    ClientGone,
    Handler,
    Response,
    Upgrade,
    is_client_gone,
    make_request,
    run_handler,
)

# Unread request bodies larger than this are not drained; the connection is closed instead.
DRAIN_LIMIT = 1024 * 1024


class HttpConnection:
    """An HTTP/1.1 connection (h11); it is the Exchange of the request being served."""

    def __init__(self, stream: trio.abc.Stream, received: bytes = b"") -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        if received:
            self.h11.receive_data(received)

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
            self.h11.receive_data(bytes(data))

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ClientGone(f"unexpected {type(event).__name__} in request body")

    async def wait_closed(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.h11.receive_data(bytes(data))  # a pipelined next request: kept for the next cycle

    async def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self.send(h11.Response(status_code=status, headers=headers))

    async def send_data(self, data: bytes) -> None:
        await self.send(h11.Data(data=data))

    async def send_end(self) -> None:
        await self.send(h11.EndOfMessage())

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(str(exc)) from exc


async def serve_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    try:
        received = await _receive_preface(stream)
        if received.startswith(http2.PREFACE):
            await _serve_http2(stream, handler, received, upgrade=None)
            return
        connection = HttpConnection(stream, received)
        while True:
            served = await _serve_one(connection, handler)
            if isinstance(served, Upgrade):
                await _serve_http2(stream, handler, connection.h11.trailing_data[0], upgrade=served)
                return
            if not served:
                return
            connection.h11.start_next_cycle()
    except Exception as exc:
        if not is_client_gone(exc):
            traceback.print_exc(file=sys.stderr)
    finally:
        await stream.aclose()


async def _receive_preface(stream: trio.abc.Stream) -> bytes:
    """The first bytes of a connection: enough to tell HTTP/2's preface from an HTTP/1.1 request."""
    received = b""
    while len(received) < len(http2.PREFACE) and http2.PREFACE.startswith(received):
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone(str(exc)) from exc
        if not data:
            break
        received += data
    return received


async def _serve_http2(
    stream: trio.abc.Stream, handler: Handler, received: bytes, upgrade: Upgrade | None
) -> None:
    if not http2.available():
        return  # prior knowledge without h2 installed: nothing we can answer
    from appliance.guest.http2_server import serve_http2  # lazy: h2 and hpack cost start-up time

    await serve_http2(stream, handler, received, upgrade)


def _headers_of(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _wants_h2c(headers: dict[str, str]) -> bool:
    upgrade = [token.strip().lower() for token in headers.get("upgrade", "").split(",")]
    return "h2c" in upgrade and "http2-settings" in headers and http2.available()


async def _serve_one(connection: HttpConnection, handler: Handler) -> bool | Upgrade:
    """Serve one request; True if the connection can carry another, an Upgrade to switch to h2c."""
    event = await connection.next_event()
    if not isinstance(event, h11.Request):
        return False
    headers = _headers_of(event.headers)
    if _wants_h2c(headers):
        # RFC 7540 §3.2: the whole request body comes first, over HTTP/1.1; then 101 and HTTP/2.
        body = b"".join([chunk async for chunk in connection.body_chunks()])
        await connection.send(
            h11.InformationalResponse(
                status_code=101, headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")]
            )
        )
        return Upgrade(event, body, headers["http2-settings"])
    request = make_request(event.method.decode("ascii"), event.target.decode("latin-1"), headers, connection)
    response = Response(connection)
    if headers.get("expect", "").lower() == "100-continue":
        # curl waits (about a second) for this before sending a large body; h11 leaves it to us.
        await connection.send(h11.InformationalResponse(status_code=100, headers=[]))
    if not await run_handler(handler, request, response):
        return False  # h11 would reject more events after a half-sent response
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

    async def on_connection(stream: trio.abc.Stream) -> None:
        await serve_connection(stream, handler)

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started()
    await trio.serve_listeners(on_connection, listeners)
