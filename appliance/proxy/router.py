"""CubeProxy: the ASGI layer in front of the control plane that routes sandbox traffic.

A request is sandbox traffic when it carries `E2b-Sandbox-Id` (and
`E2b-Sandbox-Port`) headers, or when its Host is `<port>-<sandbox id>.<domain>`.
Such requests never reach Quart: they are forwarded to the guest port the
runtime exposes (`instance.endpoint(port)`), streaming both ways: request bodies
chunk by chunk as the client sends them, response bodies flushed per chunk, for
as long as the stream lives. WebSocket upgrades are relayed frame by frame.
Everything else goes to the control-plane app.
What a request must carry to get through: appliance/proxy/access.py.

A forward lives no longer than its sandbox: when the sandbox ends (killed, timed
out, crashed) its in-flight forwards end at once, as E2B's proxy does, instead of
waiting on a guest that will never answer. One whose response has not started gets
the 502 "was not found" answer; one whose response is streaming is cut off (over
HTTP/1.1 the connection is closed mid-body, which the SDKs read as the sandbox
having gone away and confirm with a /health that gets that 502; over HTTP/2 the
stream ends, since the server cannot reset it from ASGI). A pause ends them the same
way: the frozen guest would answer nothing until a resume that may never come.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

import httpx
import trio
import wsproto
import wsproto.events as ws_events

from appliance.cubelet.cubelet import Cubelet
from appliance.cubelet.state import USER_VISIBLE
from appliance.proxy.access import (
    HOP_BY_HOP,
    SANDBOX_ID_HEADER,
    SANDBOX_PORT_HEADER,
    FileSignature,
    Refused,
    Scope,
    Target,
    check_credentials,
    file_url_signature,
    forwarded_headers,
    header,
    not_found_message,
    parse_port,
)
from appliance.records import PAUSED
from appliance.runtime.base import ENVD_PORT

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONNECT_TIMEOUT_S = 5.0
WS_READ_SIZE = 65536
# The largest message relayed from a guest (hypercorn's default limit for the other direction).
WS_MAX_MESSAGE_BYTES = 16 << 20
WS_MESSAGE_TOO_BIG = 1009
WS_GOING_AWAY = 1001  # the close code a WebSocket gets when its sandbox ends
AUTO_RESUME_TIMEOUT_S = 300
# Idle connections to guests are reused for this long: under the 5 s idle timeout
# common HTTP servers (hypercorn's default) use, so a reused one is rarely stale.
GUEST_KEEPALIVE_S = 4.0


class ClientDisconnected(Exception):
    pass


def port_not_open_message(sandbox_id: str) -> str:
    """What the SDKs read as "the sandbox runs but this port does not answer" (E2B's wording)."""
    return f"The sandbox {sandbox_id} is running but port is not open"


def upstream_url(host: str, port: int, scope: Scope) -> httpx.URL:
    """The guest's URL for this request, assembled from parts: the target can only add a path."""
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return httpx.URL(scheme="http", host=host, port=port, raw_path=path + (b"?" + query if query else b""))


class SandboxRouter:
    def __init__(self, control_plane: ASGIApp, cubelet: Cubelet, domain: str) -> None:
        self.control_plane = control_plane
        self.cubelet = cubelet
        self._host_pattern = re.compile(
            rb"^(\d+)-([0-9a-z]+)\." + re.escape(domain.encode()) + rb"(?::\d+)?$"
        )
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=None, write=None, pool=None),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=256, keepalive_expiry=GUEST_KEEPALIVE_S
            ),
            trust_env=False,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.control_plane(scope, receive, send)
            return
        try:
            target = self.target(scope)
            if target is None:
                await self.control_plane(scope, receive, send)
                return
            if not (scope.get("raw_path") or scope["path"].encode()).startswith(b"/"):
                raise Refused(400, "the request target must be a path starting with '/'")
            upstream = await self._upstream(scope, target)
        except Refused as refused:
            if scope["type"] == "http":
                await send_json_error(send, refused.status, refused.message)
            elif (await receive())["type"] == "websocket.connect":
                await deny_websocket(send, refused.status, refused.message)
            return
        if scope["type"] == "http":
            await self._forward_http(scope, receive, send, upstream)
        else:
            await self._forward_websocket(scope, receive, send, upstream)

    def target(self, scope: Scope) -> Target | None:
        """Which sandbox port this request is for; None for the control plane. Raises Refused (a bad port)."""
        sandbox_id = header(scope, SANDBOX_ID_HEADER)
        if sandbox_id is not None and sandbox_id.strip():
            port_text = (header(scope, SANDBOX_PORT_HEADER) or "").strip()
            return Target(sandbox_id.strip(), parse_port(port_text) if port_text else ENVD_PORT)
        host = header(scope, b"host")
        match = self._host_pattern.match(host.lower().encode("latin-1")) if host is not None else None
        if match:
            return Target(match.group(2).decode(), parse_port(match.group(1).decode()))
        signed = file_url_signature(scope)
        if signed is not None and (signer := self._signer(signed)) is not None:
            return Target(signer, ENVD_PORT)
        return None

    def _signer(self, signed: FileSignature) -> str | None:
        """The sandbox whose envd token signed this /files URL (single-port mode's download and upload
        URLs name no sandbox); None if no sandbox's did. Costs one hash per sandbox on this node."""
        for live in self.cubelet.sandboxes:
            record = live.record
            if live.state in USER_VISIBLE and record is not None and record.envd_access_token:
                if signed.signed_with(record.envd_access_token):
                    return record.sandbox_id
        return None

    async def _upstream(self, scope: Scope, target: Target) -> Upstream:
        """Where the guest port is, once the request shows it may go there; Refused otherwise."""
        live = self.cubelet.live(target.sandbox_id)
        if live is None or live.instance is None or live.record is None:
            raise Refused(502, not_found_message(target.sandbox_id))
        check_credentials(scope, live.record, target.port)
        if live.state == PAUSED:
            if not live.record.auto_resume:
                message = f"The sandbox {target.sandbox_id} is paused and was not found running"
                raise Refused(502, message + "; connect to resume it")
            await self.cubelet.connect(target.sandbox_id, AUTO_RESUME_TIMEOUT_S)
        # (after a resume: the new run's `stopped`)
        return Upstream(target.sandbox_id, target.port, live.instance.endpoint(target.port), live.stopped)

    async def _forward_http(self, scope: Scope, receive: Receive, send: Send, to: Upstream) -> None:
        sandbox_id, port, address, stopped = to
        headers = forwarded_headers(scope)
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]) or (
            scope.get("http_version") == "2" and scope["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE")
        )
        body_done = trio.Event()
        content: AsyncIterator[bytes] | bytes = _request_body(receive, body_done) if has_body else b""
        if not has_body:
            body_done.set()
        url = upstream_url(*address, scope)
        request = self._client.build_request(scope["method"], url, headers=headers, content=content)
        progress = _Progress()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, body_done, nursery.cancel_scope)
            nursery.start_soon(_cancel_when_set, stopped, nursery.cancel_scope)
            try:
                response = await self._client.send(request, stream=True)
            except ClientDisconnected:
                nursery.cancel_scope.cancel()
                return
            except httpx.HTTPError as exc:
                log.info("sandbox %s port %d unreachable: %r", sandbox_id, port, exc)
                if not stopped.is_set():
                    await send_json_error(send, 502, port_not_open_message(sandbox_id))
                    progress.finished = True
                nursery.cancel_scope.cancel()
            else:
                await _relay_response(send, response, progress, sandbox_id, port)
                nursery.cancel_scope.cancel()
        if stopped.is_set() and not progress.finished:
            live = self.cubelet.live(sandbox_id)
            paused = live is not None and live.state == PAUSED
            message = f"The sandbox {sandbox_id} was paused" if paused else not_found_message(sandbox_id)
            await _end_for_stopped(scope, send, message, progress)

    async def _forward_websocket(self, scope: Scope, receive: Receive, send: Send, to: Upstream) -> None:
        sandbox_id, port, address, stopped = to
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError:
            await deny_websocket(send, 502, port_not_open_message(sandbox_id))
            return
        async with stream:
            headers = [(k, v) for k, v in forwarded_headers(scope) if k != b"host"]
            refused = f"sandbox {sandbox_id} port {port} refused the WebSocket"
            await relay_websocket(
                scope, receive, send, stream, f"{address[0]}:{address[1]}", headers, refused, stopped
            )


async def relay_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    stream: trio.abc.Stream,
    host: str,
    headers: list[tuple[bytes, bytes]],
    refused: str,
    stopped: trio.Event | None = None,
) -> None:
    """The client's WebSocket (its websocket.connect received) opened on `stream` as `host` with
    `headers` (no Sec-WebSocket ones: wsproto makes its own), then relayed both ways until either
    side closes (or `stopped` is set: the client gets 1001). Refused there: the client is denied
    with that status and `refused`."""
    upstream = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    path = (scope["raw_path"] or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    extra = [(k, v) for k, v in headers if not k.lower().startswith(b"sec-websocket")]
    await stream.send_all(
        upstream.send(
            ws_events.Request(
                host=host,
                target=path + (f"?{query}" if query else ""),
                subprotocols=list(scope.get("subprotocols", [])),
                extra_headers=extra,
            )
        )
    )
    accepted = await _read_handshake(stream, upstream)
    if not isinstance(accepted, ws_events.AcceptConnection):
        status = accepted.status_code if isinstance(accepted, ws_events.RejectConnection) else 502
        await deny_websocket(send, status, refused)
        return
    await send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_client_to_guest, receive, stream, upstream, nursery.cancel_scope)
        nursery.start_soon(_guest_to_client, send, stream, upstream, nursery.cancel_scope)
        if stopped is not None:
            nursery.start_soon(_cancel_when_set, stopped, nursery.cancel_scope)
    if stopped is not None and stopped.is_set():
        await send({"type": "websocket.close", "code": WS_GOING_AWAY})


class Upstream(NamedTuple):
    """A request's way to its guest port: where it is, and the event set when the sandbox stops
    serving (paused or gone: a frozen guest answers nothing, so the forward ends with a 502 like
    a request to a paused sandbox)."""

    sandbox_id: str
    port: int
    address: tuple[str, int]
    stopped: trio.Event


class _Progress:
    """How far a forwarded response got to the client."""

    def __init__(self) -> None:
        self.started = False  # http.response.start sent
        self.finished = False  # the whole answer sent


async def _relay_response(
    send: Send, response: httpx.Response, progress: _Progress, sandbox_id: str, port: int
) -> None:
    """The guest's response to the client, chunk by chunk as it comes."""
    try:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
            }
        )
        progress.started = True
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        progress.finished = True
    except httpx.HTTPError as exc:
        log.info("stream from sandbox %s port %d broke: %r", sandbox_id, port, exc)
    finally:
        with trio.CancelScope(shield=True):
            await response.aclose()


async def _end_for_stopped(scope: Scope, send: Send, message: str, progress: _Progress) -> None:
    """The sandbox ended or was paused while its request was in flight: say so if nothing was answered yet,
    else cut the answer off (HTTP/1.x: returning mid-body makes the server close the connection)."""
    if not progress.started:
        await send_json_error(send, 502, message)
    elif scope.get("http_version") == "2":
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _request_body(receive: Receive, done: trio.Event) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            done.set()
            return


async def _cancel_on_disconnect(receive: Receive, body_done: trio.Event, scope: trio.CancelScope) -> None:
    """Once the request body is read, the next ASGI message can only be the client going away."""
    await body_done.wait()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def send_json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def deny_websocket(send: Send, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def _read_handshake(stream: trio.abc.Stream, guest: wsproto.WSConnection) -> ws_events.Event | None:
    while True:
        data = await stream.receive_some(WS_READ_SIZE)
        guest.receive_data(bytes(data) or None)
        for event in guest.events():
            if isinstance(event, ws_events.AcceptConnection | ws_events.RejectConnection):
                return event
        if not data:
            return None


async def _client_to_guest(
    receive: Receive, stream: trio.abc.Stream, guest: wsproto.WSConnection, scope: trio.CancelScope
) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            if guest.state == wsproto.ConnectionState.OPEN:
                await stream.send_all(guest.send(ws_events.CloseConnection(code=message.get("code", 1000))))
            scope.cancel()
            return
        if message.get("bytes") is not None:
            await stream.send_all(guest.send(ws_events.BytesMessage(data=message["bytes"])))
        elif message.get("text") is not None:
            await stream.send_all(guest.send(ws_events.TextMessage(data=message["text"])))


_TOO_BIG: dict[str, Any] = {}


def _whole_message(event: ws_events.Message[Any], pending: list[str | bytes]) -> dict[str, Any] | None:
    """wsproto hands over a message in pieces as its frames arrive; the client gets it whole (a CDP
    reply split in two would be two invalid JSON messages). None until the last piece; _TOO_BIG
    past WS_MAX_MESSAGE_BYTES (a guest cannot make the router buffer without bound)."""
    pending.append(event.data)
    if sum(len(piece) for piece in pending) > WS_MAX_MESSAGE_BYTES:
        return _TOO_BIG
    if not event.message_finished:
        return None
    if isinstance(event, ws_events.TextMessage):
        message: dict[str, Any] = {"type": "websocket.send", "text": "".join(str(p) for p in pending)}
    else:
        message = {"type": "websocket.send", "bytes": b"".join(p for p in pending if not isinstance(p, str))}
    pending.clear()
    return message


async def _guest_to_client(
    send: Send, stream: trio.abc.Stream, guest: wsproto.WSConnection, scope: trio.CancelScope
) -> None:
    pending: list[str | bytes] = []
    while True:
        data = await stream.receive_some(WS_READ_SIZE)
        guest.receive_data(bytes(data) or None)
        for event in guest.events():
            if isinstance(event, (ws_events.TextMessage, ws_events.BytesMessage)):
                message = _whole_message(event, pending)
                if message is _TOO_BIG:
                    await send({"type": "websocket.close", "code": WS_MESSAGE_TOO_BIG})
                    scope.cancel()
                    return
                if message is not None:
                    await send(message)
            elif isinstance(event, ws_events.Ping):
                await stream.send_all(guest.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                await send({"type": "websocket.close", "code": event.code})
                scope.cancel()
                return
        if not data:
            await send({"type": "websocket.close", "code": 1006})
            scope.cancel()
            return
