#!/usr/bin/python3
"""CDP front of the `browser` template: Chromium's DevTools endpoint, reachable through the router.

Chromium (remote debugging on 127.0.0.1:9223) refuses requests whose Host is not an IP address or
`localhost`, and its /json/version and /json/list name `ws://127.0.0.1:9223/...`: a client that came
through the router (`<port>-<id>.<domain>`, or the router's own address with E2b-Sandbox-* headers)
could neither fetch them nor follow them. This front listens on 0.0.0.0:9222, accepts any Host,
asks Chromium with `Host: 127.0.0.1:9223`, rewrites the WebSocket URLs in the JSON to the host (and
scheme) the client used, and relays every other request (the DevTools WebSocket) byte for byte.

When its last client disconnects, the browser goes back to one blank tab: a client that vanished
leaves no tabs (and their renderer processes) behind.

Standard library only (asyncio): it runs with the image's python3 and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import urllib.request

LISTEN = ("0.0.0.0", 9222)
CHROMIUM = ("127.0.0.1", 9223)
CHROMIUM_HTTP = f"http://{CHROMIUM[0]}:{CHROMIUM[1]}"
MAX_HEAD = 64 * 1024
JSON_PATHS = re.compile(rb"^/json(/version|/list)?/?(\?.*)?$")
# Headers the front sets itself toward Chromium. Origin is dropped: Chromium refuses WebSocket
# clients that send one unless started with --remote-allow-origins (a browser page elsewhere).
REPLACED = {b"host", b"origin", b"connection", b"keep-alive", b"proxy-connection", b"content-length"}


class Front:
    def __init__(self) -> None:
        self.clients = 0  # open DevTools WebSocket relays (upgraded requests)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *header_lines = head[:-4].split(b"\r\n")
        headers = [
            tuple(part.strip() for part in line.split(b":", 1)) for line in header_lines if b":" in line
        ]
        parts = request_line.split(b" ")
        target = parts[1] if len(parts) == 3 else b""
        try:
            if parts[0] == b"GET" and JSON_PATHS.match(target):
                await self.answer_json(writer, target, dict((k.lower(), v) for k, v in headers))
            else:
                await self.relay(reader, writer, request_line, headers)
        except (ConnectionError, OSError) as exc:
            print(f"cdp-front: {exc}", file=sys.stderr, flush=True)
        finally:
            writer.close()

    async def answer_json(
        self, writer: asyncio.StreamWriter, target: bytes, headers: dict[bytes, bytes]
    ) -> None:
        """/json/version or /json/list from Chromium, WebSocket URLs naming where the client came from."""
        try:
            body = await asyncio.to_thread(fetch, target.decode("latin-1"))
        except OSError as exc:
            await respond(writer, b"502 Bad Gateway", json.dumps({"error": f"chromium: {exc}"}).encode())
            return
        host = headers.get(b"x-forwarded-host") or headers.get(b"host") or b"%s:%d" % LISTEN
        secure = headers.get(b"x-forwarded-proto", b"").lower() == b"https"
        await respond(writer, b"200 OK", rewrite(body, host.decode("latin-1"), secure))

    async def relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_line: bytes,
        headers: list[tuple[bytes, ...]],
    ) -> None:
        """Any other request (the DevTools WebSocket) to Chromium, then bytes both ways till one closes."""
        upstream_reader, upstream_writer = await asyncio.open_connection(*CHROMIUM)
        kept = [b"%s: %s" % (k, v) for k, v in headers if k.lower() not in REPLACED]
        upgrade = any(k.lower() == b"upgrade" for k, _ in headers)
        connection = b"Connection: Upgrade" if upgrade else b"Connection: close"
        head = [request_line, b"Host: %s:%d" % (CHROMIUM[0].encode(), CHROMIUM[1]), connection, *kept]
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None:
            head.append(b"Content-Length: " + length)
        upstream_writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        self.clients += upgrade
        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()
            self.clients -= upgrade
            if upgrade and self.clients == 0:
                await asyncio.to_thread(reset_tabs)


def fetch(path: str) -> bytes:
    with urllib.request.urlopen(CHROMIUM_HTTP + path, timeout=30) as response:
        return bytes(response.read())


def rewrite(body: bytes, host: str, secure: bool) -> bytes:
    """Chromium's ws://127.0.0.1:9223/... URLs (and the frontend's ws= parameter) → the client's host."""
    scheme = "wss" if secure else "ws"
    text = body.decode()
    text = text.replace(f"ws://{CHROMIUM[0]}:{CHROMIUM[1]}/", f"{scheme}://{host}/")
    text = text.replace(f"ws={CHROMIUM[0]}:{CHROMIUM[1]}/", f"{scheme}={host}/")
    return text.encode()


async def respond(writer: asyncio.StreamWriter, status: bytes, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=UTF-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(body), body)
    )
    await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass


def reset_tabs() -> None:
    """One blank tab and nothing else: what the browser looked like before any client came."""
    try:
        pages = [t for t in json.loads(fetch("/json/list")) if t.get("type") == "page"]
        if len(pages) == 1 and pages[0].get("url") == "about:blank":
            return
        request = urllib.request.Request(CHROMIUM_HTTP + "/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30):
            pass
        for page in pages:
            with urllib.request.urlopen(f"{CHROMIUM_HTTP}/json/close/{page['id']}", timeout=30):
                pass
    except (OSError, ValueError) as exc:
        print(f"cdp-front: could not reset the tabs: {exc}", file=sys.stderr, flush=True)


async def main() -> None:
    front = Front()
    server = await asyncio.start_server(front.handle, *LISTEN, limit=MAX_HEAD)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
