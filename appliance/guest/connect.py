"""Connect-RPC (protocol v1, JSON codec) over the agent's HTTP server.

Unary: one JSON body in, one JSON body out (errors: non-200 with a JSON error).
Streams: 5-byte envelopes (flags, big-endian length) in both directions; a server
stream always ends with one end-stream envelope (flags 0x02) carrying `{}` or
`{"error": ...}`, with HTTP 200 even on errors (PROTOCOL.md §3.2-3.3).
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import trio

from appliance.guest.connect_framing import (
    FLAG_END_STREAM,
    EnvelopeDecoder,
    MessageTooLarge,
    TruncatedEnvelope,
    envelope,
)
from appliance.guest.http import Request, Response
from appliance.guest.users import User

DEFAULT_KEEPALIVE_S = 50.0

HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


@dataclass
class CallContext:
    """What a handler knows about its call: the Linux user it acts as, the deadline, headers."""

    user: User
    headers: dict[str, str]
    deadline: float = math.inf  # trio clock

    def deadline_passed(self) -> bool:
        return trio.current_time() >= self.deadline


Message = dict[str, object]
Send = Callable[[Message], Awaitable[None]]
UnaryHandler = Callable[[CallContext, Message], Awaitable[Message]]
ServerStreamHandler = Callable[[CallContext, Message, Send], Awaitable[None]]
ClientStreamHandler = Callable[[CallContext, AsyncIterator[Message]], Awaitable[Message]]


@dataclass
class Router:
    """Maps `/<package>.<Service>/<Method>` paths to handlers of the three call shapes."""

    unary: dict[str, UnaryHandler] = field(default_factory=dict)
    server_streams: dict[str, tuple[ServerStreamHandler, Message]] = field(default_factory=dict)
    client_streams: dict[str, ClientStreamHandler] = field(default_factory=dict)
    # Services registered on their first call, by path prefix: their modules stay off the
    # agent's start-up path (every import is slow under UML, and /health needs none of them).
    lazy_services: dict[str, Callable[[Router], None]] = field(default_factory=dict)

    def handles(self, path: str) -> bool:
        for prefix in [prefix for prefix in self.lazy_services if path.startswith(prefix)]:
            self.lazy_services.pop(prefix)(self)
        return path in self.unary or path in self.server_streams or path in self.client_streams

    async def dispatch(self, request: Request, response: Response, context: CallContext) -> None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        timeout = _timeout_seconds(request.headers)
        if timeout is not None:
            context.deadline = trio.current_time() + timeout
        if request.method != "POST":
            await _send_unary_error(response, ConnectError("unimplemented", "use POST"), 405)
            return
        if request.path in self.unary:
            if content_type != "application/json":
                await _send_unary_error(
                    response, ConnectError("unimplemented", f"unsupported content-type {content_type}"), 415
                )
                return
            await self._serve_unary(self.unary[request.path], request, response, context)
            return
        if content_type != "application/connect+json":
            await _send_unary_error(
                response, ConnectError("unimplemented", f"unsupported content-type {content_type}"), 415
            )
            return
        if request.path in self.server_streams:
            handler, keepalive = self.server_streams[request.path]
            await _serve_server_stream(handler, keepalive, request, response, context)
        else:
            await _serve_client_stream(self.client_streams[request.path], request, response, context)

    async def _serve_unary(
        self, handler: UnaryHandler, request: Request, response: Response, context: CallContext
    ) -> None:
        try:
            message = _decode(await request.read_body())
            with trio.fail_at(context.deadline):
                reply = await handler(context, message)
        except trio.TooSlowError:
            await _send_unary_error(response, ConnectError("deadline_exceeded", "deadline exceeded"))
            return
        except ConnectError as error:
            await _send_unary_error(response, error)
            return
        await response.send(200, json.dumps(reply).encode(), "application/json")


def _timeout_seconds(headers: dict[str, str]) -> float | None:
    raw = headers.get("connect-timeout-ms")
    if not raw:
        return None
    try:
        return max(0, int(raw)) / 1000
    except ValueError:
        return None


def _decode(payload: bytes) -> Message:
    try:
        message = json.loads(payload or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConnectError("invalid_argument", f"invalid JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "message must be a JSON object")
    return message


async def _send_unary_error(response: Response, error: ConnectError, status: int | None = None) -> None:
    body = json.dumps({**error.as_json(), "details": []}).encode()
    await response.send(status or HTTP_STATUS.get(error.code, 500), body, "application/json")


async def read_envelopes(request: Request) -> AsyncIterator[Message]:
    """Decode request envelopes as they arrive (the body is usually chunked)."""
    decoder = EnvelopeDecoder()
    async for chunk in request.body_chunks():
        try:
            envelopes = decoder.feed(chunk)
        except MessageTooLarge as exc:
            raise ConnectError("resource_exhausted", "message too large") from exc
        for message in envelopes:
            if message.compressed:
                raise ConnectError("internal", "compressed messages are not supported")
            if not message.end_stream:
                yield _decode(message.payload)
    try:
        decoder.close()
    except TruncatedEnvelope as exc:
        raise ConnectError("invalid_argument", "truncated envelope") from exc


def _keepalive_interval(headers: dict[str, str]) -> float:
    try:
        return max(1.0, float(headers.get("keepalive-ping-interval", DEFAULT_KEEPALIVE_S)))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def _end_stream(error: ConnectError | None) -> bytes:
    body: Message = {"error": error.as_json()} if error else {}
    return envelope(json.dumps(body).encode(), FLAG_END_STREAM)


async def _serve_server_stream(
    handler: ServerStreamHandler,
    keepalive: Message,
    request: Request,
    response: Response,
    context: CallContext,
) -> None:
    error: ConnectError | None = None
    first: Message | None = None
    try:
        async for message in read_envelopes(request):
            if first is None:
                first = message
        if first is None:
            raise ConnectError("invalid_argument", "missing request message")
    except ConnectError as exc:
        error = exc
    await response.start(200, [("Content-Type", "application/connect+json")])
    if error is None and first is not None:
        error = await _pump_stream(handler, first, keepalive, response, context)
    await response.write(_end_stream(error))
    await response.finish()


async def _pump_stream(
    handler: ServerStreamHandler,
    first: Message,
    keepalive: Message,
    response: Response,
    context: CallContext,
) -> ConnectError | None:
    """Run the handler; write what it sends as envelopes, and keepalives while it is quiet."""
    interval = _keepalive_interval(context.headers)
    send_channel, receive_channel = trio.open_memory_channel[Message](16)
    error: ConnectError | None = None

    async def run_handler() -> None:
        nonlocal error
        async with send_channel:
            with trio.CancelScope(deadline=context.deadline) as deadline_scope:
                try:
                    await handler(context, first, send_channel.send)
                except ConnectError as exc:
                    error = exc
                except Exception as exc:
                    traceback.print_exc(file=sys.stderr)
                    error = ConnectError("internal", str(exc))
            if deadline_scope.cancelled_caught:
                error = ConnectError("deadline_exceeded", "deadline exceeded")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_handler)
        while True:
            # Only the wait is bounded: cancelling a write could leave half an envelope.
            message: Message = keepalive
            with trio.move_on_after(interval):
                try:
                    message = await receive_channel.receive()
                except trio.EndOfChannel:
                    break
            await response.write(envelope(json.dumps(message).encode()))
    return error


async def _serve_client_stream(
    handler: ClientStreamHandler, request: Request, response: Response, context: CallContext
) -> None:
    error: ConnectError | None = None
    reply: Message = {}
    with trio.CancelScope(deadline=context.deadline) as deadline_scope:
        try:
            reply = await handler(context, read_envelopes(request))
        except ConnectError as exc:
            error = exc
    if deadline_scope.cancelled_caught:
        error = ConnectError("deadline_exceeded", "deadline exceeded")
    await response.start(200, [("Content-Type", "application/connect+json")])
    if error is None:
        await response.write(envelope(json.dumps(reply).encode()))
    await response.write(_end_stream(error))
    await response.finish()
