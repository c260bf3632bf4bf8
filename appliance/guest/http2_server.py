"""HTTP/2 over cleartext (h2c) for the agent's servers, on the `h2` state machine.

Reached from http_server.py either with prior knowledge (the connection starts with the HTTP/2
preface) or through `Upgrade: h2c` on an HTTP/1.1 request, which becomes stream 1.
Each stream is one Exchange served by the same handlers as HTTP/1.1: Connect unary
and streaming calls need nothing else (Connect puts end-of-stream in the body, not in
trailers).

One task reads the socket and feeds h2; each stream's handler runs in its own task.
Writers take h2's pending bytes under one lock, so frames leave in the order h2 made
them, and wait for flow-control window updates instead of buffering without bound.
A departed client (EOF, RST_STREAM, GOAWAY) makes writes and body reads raise
ClientGone and `wait_closed` return, as on HTTP/1.1; handlers are not cancelled.
"""

from __future__ import annotations

import math
import sys
import traceback

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from appliance.guest.http import (
    RECEIVE_SIZE,
    ClientGone,
    Handler,
    Response,
    Upgrade,
    make_request,
    run_handler,
)

# Hop-by-hop headers are not allowed in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
# A larger receive window than the default 64 KiB: uploads would otherwise stall on every window.
RECEIVE_WINDOW = 16 * 1024 * 1024


class Http2Exchange:
    """One HTTP/2 stream: the request body as it arrives, the response as it is written."""

    def __init__(self, connection: Http2Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._body_in, self._body_out = trio.open_memory_channel[tuple[bytes, int]](math.inf)
        self.body_ended = False
        self.closed = trio.Event()

    # Fed by the connection's reader task.
    def receive(self, data: bytes, flow_controlled_length: int) -> None:
        self._body_in.send_nowait((data, flow_controlled_length))

    def end_body(self) -> None:
        self.body_ended = True
        self._body_in.close()

    def close(self) -> None:
        self._body_in.close()
        self.closed.set()

    # The Exchange protocol of http.py.
    async def body_chunks(self):  # type: ignore[no-untyped-def]
        async for data, length in self._body_out:
            await self.connection.acknowledge(self.stream_id, length)
            yield data
        if not self.body_ended:
            raise ClientGone("the stream was reset before its request body ended")

    async def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        fields = [(":status", str(status))]
        fields += [(name.lower(), value) for name, value in headers if name.lower() not in CONNECTION_HEADERS]
        self._check_open()
        self.connection.call(self.connection.h2.send_headers, self.stream_id, fields)
        await self.connection.flush()

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = await self.connection.sendable(self.stream_id, len(view), self.closed)
            self._check_open()
            self.connection.call(self.connection.h2.send_data, self.stream_id, view[:size].tobytes())
            view = view[size:]
            await self.connection.flush()

    async def send_end(self) -> None:
        self._check_open()
        self.connection.call(self.connection.h2.end_stream, self.stream_id)
        await self.connection.flush()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def _check_open(self) -> None:
        if self.closed.is_set():
            raise ClientGone(f"stream {self.stream_id} is closed")


class Http2Connection:
    def __init__(self, stream: trio.abc.Stream, handler: Handler) -> None:
        self.stream = stream
        self.handler = handler
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.exchanges: dict[int, Http2Exchange] = {}
        self._send_lock = trio.Lock()
        self._window_opened = trio.Event()
        self._terminated = False

    def call(self, method, *args):  # type: ignore[no-untyped-def]
        """An h2 call on behalf of a stream; h2's complaint about a closed stream means the client left."""
        try:
            return method(*args)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise ClientGone(str(exc)) from exc

    async def flush(self) -> None:
        async with self._send_lock:  # take the bytes under the lock: frames must leave in order
            data = self.h2.data_to_send()
            if not data:
                return
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._close_all()
                raise ClientGone(str(exc)) from exc

    async def acknowledge(self, stream_id: int, length: int) -> None:
        """Re-open the receive window for what a handler consumed (so a slow reader slows the client)."""
        if length:
            try:
                self.h2.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                return
            await self.flush()

    async def sendable(self, stream_id: int, wanted: int, closed: trio.Event) -> int:
        """How many bytes may go out now on the stream (waits for a window update, at least one byte)."""
        while True:
            if closed.is_set():
                raise ClientGone(f"stream {stream_id} is closed")
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise ClientGone(str(exc)) from exc
            if window > 0:
                return min(window, wanted, self.h2.max_outbound_frame_size)
            await self._window_opened.wait()

    def _wake_writers(self) -> None:
        self._window_opened.set()
        self._window_opened = trio.Event()

    def _close_all(self) -> None:
        for exchange in self.exchanges.values():
            exchange.close()
        self._wake_writers()

    async def run(self, received: bytes, upgrade: Upgrade | None) -> None:
        async with trio.open_nursery() as nursery:
            if upgrade is not None:
                self.h2.initiate_upgrade_connection(upgrade.settings.encode("ascii"))
                exchange = self._open(1, nursery, _h11_fields(upgrade))
                exchange.receive(upgrade.body, 0)
                exchange.end_body()
            else:
                self.h2.initiate_connection()
            self.h2.increment_flow_control_window(RECEIVE_WINDOW)
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW})
            try:
                await self._receive(received, nursery)
                while not self._terminated:
                    try:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                    await self._receive(data, nursery)
            except ClientGone:
                pass
            finally:
                self._close_all()  # handlers still running see a departed client

    async def _receive(self, data: bytes | bytearray, nursery: trio.Nursery) -> None:
        try:
            events = self.h2.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as exc:
            self._terminated = True
            await self.flush()  # h2 queued a GOAWAY
            raise ClientGone(str(exc)) from exc
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._open(event.stream_id, nursery, event.headers)
            elif isinstance(event, h2.events.DataReceived):
                exchange = self.exchanges.get(event.stream_id)
                if exchange is not None and not exchange.closed.is_set():
                    exchange.receive(event.data, event.flow_controlled_length)
                else:
                    await self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                if (exchange := self.exchanges.get(event.stream_id)) is not None:
                    exchange.end_body()
            elif isinstance(event, h2.events.StreamReset):
                if (exchange := self.exchanges.get(event.stream_id)) is not None:
                    exchange.close()
                self._wake_writers()
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._wake_writers()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._terminated = True
        await self.flush()

    def _open(
        self, stream_id: int, nursery: trio.Nursery, fields: list[tuple[bytes, bytes]]
    ) -> Http2Exchange:
        exchange = Http2Exchange(self, stream_id)
        self.exchanges[stream_id] = exchange
        nursery.start_soon(self._serve, exchange, fields)
        return exchange

    async def _serve(self, exchange: Http2Exchange, fields: list[tuple[bytes, bytes]]) -> None:
        pseudo: dict[str, str] = {}
        headers: dict[str, str] = {}
        for raw_name, raw_value in fields:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name.startswith(":"):
                pseudo[name] = value
            else:
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if ":authority" in pseudo:
            headers.setdefault("host", pseudo[":authority"])
        request = make_request(pseudo.get(":method", "GET"), pseudo.get(":path", "/"), headers, exchange)
        try:
            completed = await run_handler(self.handler, request, Response(exchange))
            if not completed or not exchange.body_ended:
                # A broken response, or one sent before the whole request arrived: stop the stream.
                code = h2.errors.ErrorCodes.NO_ERROR if completed else h2.errors.ErrorCodes.INTERNAL_ERROR
                self.call(self.h2.reset_stream, exchange.stream_id, code)
                await self.flush()
        except ClientGone:
            pass
        except Exception:
            traceback.print_exc(file=sys.stderr)
        finally:
            del self.exchanges[exchange.stream_id]


def _h11_fields(upgrade: Upgrade) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 upgrade request as HTTP/2 header fields."""
    request = upgrade.request
    fields = [(b":method", request.method), (b":path", request.target)]
    return fields + [(name.lower(), value) for name, value in request.headers]


async def serve_http2(
    stream: trio.abc.Stream, handler: Handler, received: bytes, upgrade: Upgrade | None
) -> None:
    await Http2Connection(stream, handler).run(received, upgrade)
