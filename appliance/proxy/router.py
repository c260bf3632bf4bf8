"""CubeProxy: the ASGI layer in front of the control plane that routes sandbox traffic.

A request is sandbox traffic when it carries `E2b-Sandbox-Id` (and
`E2b-Sandbox-Port`) headers, or when its Host is `<port>-<sandbox id>.<domain>`.
Such requests never reach Quart: they are forwarded to the guest port the
runtime exposes (`instance.endpoint(port)`), streaming both ways: request bodies
chunk by chunk as the client sends them, response bodies flushed per chunk, for
as long as the stream lives. WebSocket upgrades are relayed frame by frame.
Everything else goes to the control-plane app.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import trio
import wsproto
import wsproto.events as ws_events

from appliance.cubelet.cubelet import Cubelet
from appliance.master.store import PAUSED
from appliance.runtime.base import ENVD_PORT

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
CONNECT_TIMEOUT_S = 5.0
WS_READ_SIZE = 65536
AUTO_RESUME_TIMEOUT_S = 300
# Idle connections to guests are reused for this long: under the 5 s idle timeout
# common HTTP servers (hypercorn's default) use, so a reused one is rarely stale.
GUEST_KEEPALIVE_S = 4.0


class ClientDisconnected(Exception):
    pass


def not_found_message(sandbox_id: str) -> str:
    return f"The sandbox {sandbox_id} was not found"


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
        if scope["type"] in ("http", "websocket"):
            target = self.target(scope)
            if target is not None:
                sandbox_id, port = target
                if scope["type"] == "http":
                    await self._forward_http(scope, receive, send, sandbox_id, port)
                else:
                    await self._forward_websocket(scope, receive, send, sandbox_id, port)
                return
        await self.control_plane(scope, receive, send)

    def target(self, scope: Scope) -> tuple[str, int] | None:
        """(sandbox id, guest port) if this request is for a sandbox, else None."""
        sandbox_id = port_text = host = None
        for name, value in scope["headers"]:
            if name == SANDBOX_ID_HEADER:
                sandbox_id = value.decode("latin-1").strip()
            elif name == SANDBOX_PORT_HEADER:
                port_text = value.decode("latin-1").strip()
            elif name == b"host":
                host = value.lower()
        if sandbox_id:
            return sandbox_id, int(port_text) if port_text and port_text.isdigit() else ENVD_PORT
        if host is not None:
            match = self._host_pattern.match(host)
            if match:
                return match.group(2).decode(), int(match.group(1))
        return None

    async def _guest_address(self, sandbox_id: str, port: int) -> tuple[str, int] | str:
        """Where the guest port is, or why there is nowhere to go (a 502 message)."""
        live = self.cubelet.live(sandbox_id)
        if live is None or live.instance is None or live.record is None:
            return not_found_message(sandbox_id)
        if live.state == PAUSED:
            if not live.record.auto_resume:
                return f"The sandbox {sandbox_id} is paused and was not found running; connect to resume it"
            await self.cubelet.connect(sandbox_id, AUTO_RESUME_TIMEOUT_S)
        return live.instance.endpoint(port)

    async def _forward_http(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int
    ) -> None:
        address = await self._guest_address(sandbox_id, port)
        if isinstance(address, str):
            await _send_json_error(send, 502, address)
            return
        host, guest_port = address
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]) or (
            scope.get("http_version") == "2" and scope["method"] not in ("GET", "HEAD", "OPTIONS", "DELETE")
        )
        body_done = trio.Event()
        content: AsyncIterator[bytes] | bytes = _request_body(receive, body_done) if has_body else b""
        if not has_body:
            body_done.set()
        path = scope["raw_path"] or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = f"http://{host}:{guest_port}{path.decode('latin-1')}" + (
            f"?{query.decode('latin-1')}" if query else ""
        )
        request = self._client.build_request(scope["method"], url, headers=headers, content=content)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, body_done, nursery.cancel_scope)
            try:
                response = await self._client.send(request, stream=True)
            except ClientDisconnected:
                nursery.cancel_scope.cancel()
                return
            except httpx.HTTPError as exc:
                log.info("sandbox %s port %d unreachable: %r", sandbox_id, port, exc)
                await _send_json_error(send, 502, f"The sandbox {sandbox_id} is running but port is not open")
                nursery.cancel_scope.cancel()
                return
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
                    }
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except httpx.HTTPError as exc:
                log.info("stream from sandbox %s port %d broke: %r", sandbox_id, port, exc)
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
            nursery.cancel_scope.cancel()

    async def _forward_websocket(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int
    ) -> None:
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        address = await self._guest_address(sandbox_id, port)
        if isinstance(address, str):
            await _deny_websocket(send, 502, address)
            return
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError:
            await _deny_websocket(send, 502, f"The sandbox {sandbox_id} is running but port is not open")
            return
        async with stream:
            guest = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            path = (scope["raw_path"] or scope["path"].encode()).decode("latin-1")
            query = scope.get("query_string", b"").decode("latin-1")
            extra = [
                (k, v)
                for k, v in scope["headers"]
                if k not in HOP_BY_HOP and not k.startswith(b"sec-websocket") and k != b"host"
            ]
            await stream.send_all(
                guest.send(
                    ws_events.Request(
                        host=f"{address[0]}:{address[1]}",
                        target=path + (f"?{query}" if query else ""),
                        subprotocols=list(scope.get("subprotocols", [])),
                        extra_headers=extra,
                    )
                )
            )
            accepted = await _read_handshake(stream, guest)
            if not isinstance(accepted, ws_events.AcceptConnection):
                status = accepted.status_code if isinstance(accepted, ws_events.RejectConnection) else 502
                await _deny_websocket(send, status, f"sandbox {sandbox_id} port {port} refused the WebSocket")
                return
            await send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_client_to_guest, receive, stream, guest, nursery.cancel_scope)
                nursery.start_soon(_guest_to_client, send, stream, guest, nursery.cancel_scope)


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


async def _send_json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _deny_websocket(send: Send, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def _read_handshake(stream: trio.SocketStream, guest: wsproto.WSConnection) -> ws_events.Event | None:
    while True:
        data = await stream.receive_some(WS_READ_SIZE)
        guest.receive_data(data or None)
        for event in guest.events():
            if isinstance(event, ws_events.AcceptConnection | ws_events.RejectConnection):
                return event
        if not data:
            return None


async def _client_to_guest(
    receive: Receive, stream: trio.SocketStream, guest: wsproto.WSConnection, scope: trio.CancelScope
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


async def _guest_to_client(
    send: Send, stream: trio.SocketStream, guest: wsproto.WSConnection, scope: trio.CancelScope
) -> None:
    while True:
        data = await stream.receive_some(WS_READ_SIZE)
        guest.receive_data(data or None)
        for event in guest.events():
            if isinstance(event, ws_events.TextMessage):
                await send({"type": "websocket.send", "text": event.data})
            elif isinstance(event, ws_events.BytesMessage):
                await send({"type": "websocket.send", "bytes": bytes(event.data)})
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
