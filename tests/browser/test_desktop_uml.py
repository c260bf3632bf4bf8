"""The unmodified e2b-desktop SDK drives a `desktop` sandbox: screenshot, mouse, keyboard, noVNC.

The SDK starts Xvfb, Xfce, x11vnc and noVNC itself (commands in the sandbox). Its stream URL
names the public E2B domain (single-port mode): the noVNC page and its WebSocket are reached at
the router's address with E2b-Sandbox-Id / E2b-Sandbox-Port: 6080. Opt-in: conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import umlguests
import wsproto
import wsproto.events
from e2b_desktop import Sandbox
from PIL import Image

from appliance.config import Config, load_config
from appliance.records import TemplateManifest

pytestmark = [pytest.mark.uml, pytest.mark.root]

NOVNC_PORT = 6080


@pytest.fixture(scope="session")
def desktop_template() -> TemplateManifest:
    from appliance.templates.desktop import build_desktop_template

    cache_dir = load_config().cache_dir
    return trio.run(
        build_desktop_template, Config(state_dir=cache_dir / "test-templates", cache_dir=cache_dir)
    )


@pytest.fixture
def desktop_service(
    start_service: Any, monkeypatch: pytest.MonkeyPatch, desktop_template: TemplateManifest
) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch, template=desktop_template) as service:
        yield service


def _rfb_handshake(router: str, sandbox_id: str) -> tuple[bytes, bytes]:
    """noVNC's /websockify relaying x11vnc, through the router: the server's version greeting, and
    its security types once the client answered with its version (RFB 3.8: count, then one byte
    each: 1 none, 2 VNC password)."""
    address = urlsplit(router)
    headers = [(b"E2b-Sandbox-Id", sandbox_id.encode()), (b"E2b-Sandbox-Port", str(NOVNC_PORT).encode())]
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        request = wsproto.events.Request(
            host=address.netloc, target="/websockify", subprotocols=["binary"], extra_headers=headers
        )
        sock.sendall(ws.send(request))
        greeting = _next_message(sock, ws)
        sock.sendall(ws.send(wsproto.events.BytesMessage(data=b"RFB 003.008\n")))
        return greeting, _next_message(sock, ws)


def _next_message(sock: socket.socket, ws: wsproto.WSConnection) -> bytes:
    data = b""
    while True:
        for event in ws.events():
            if isinstance(event, wsproto.events.RejectConnection):
                raise AssertionError(f"the WebSocket was refused: {event.status_code}")
            if isinstance(event, wsproto.events.BytesMessage):
                data += event.data
                if event.message_finished:
                    return data
        received = sock.recv(65536)
        if not received:
            raise AssertionError("the WebSocket closed")
        ws.receive_data(received)


def test_the_e2b_desktop_sdk_sees_moves_types_and_streams(desktop_service: umlguests.UmlService) -> None:
    key = desktop_service.key("desktop")
    desktop = Sandbox.create(timeout=600, api_key=key)
    try:
        png = desktop.screenshot()
        assert bytes(png).startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(bytes(png))).size == (1024, 768)

        desktop.move_mouse(321, 234)
        assert desktop.get_cursor_position() == (321, 234)
        assert desktop.get_screen_size() == (1024, 768)

        # Typed into a window: xterm running `cat` into a file.
        desktop.commands.run("xterm -e 'cat > /tmp/typed.txt'", background=True)
        window = ""
        for _ in range(60):  # bounded: the window's appearance is awaited
            window = desktop.commands.run(
                "xdotool search --sync --onlyvisible --class xterm | head -1"
            ).stdout
            if window.strip():
                break
        desktop.commands.run(f"xdotool windowactivate --sync {window.strip()}")
        desktop.write("typed through e2b-desktop")
        desktop.press("enter")
        desktop.press(["ctrl", "d"])
        typed = desktop.commands.run(
            "for i in $(seq 50); do [ -s /tmp/typed.txt ] && break; sleep 0.2; done; cat /tmp/typed.txt"
        )
        assert typed.stdout.strip() == "typed through e2b-desktop"

        desktop.stream.start()
        page = _novnc_page(desktop_service, desktop.sandbox_id)
        assert page.status_code == 200 and "noVNC" in page.text
        greeting, security = _rfb_handshake(desktop_service.url, desktop.sandbox_id)
        assert greeting.startswith(b"RFB 003.") and security[0] >= 1 and 1 in security[1:]
        desktop.stream.stop()
    finally:
        desktop.kill()


def _novnc_page(service: umlguests.UmlService, sandbox_id: str) -> httpx.Response:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(NOVNC_PORT)}
    return httpx.get(f"{service.url}/vnc.html", headers=headers, timeout=60)


def _await_window(desktop: Sandbox, search: str) -> str:
    """The first visible window `xdotool search` finds. Bounded: the window's appearance is awaited
    (polled: `--sync` dies on an X error when a window it looks at goes away, as Chromium's
    start-up windows do)."""
    found = desktop.commands.run(
        f"for i in $(seq 240); do w=$(xdotool search --onlyvisible {search} 2>/dev/null | head -1);"
        ' [ -n "$w" ] && echo "$w" && exit 0; sleep 1; done; exit 1',
        timeout=300,
    )
    return found.stdout.strip()


def test_the_e2b_desktop_sdk_launches_opens_and_finds_windows(desktop_service: umlguests.UmlService) -> None:
    desktop = Sandbox.create(timeout=900, api_key=desktop_service.key("desktop"))
    try:
        desktop.launch("xfce4-terminal")
        terminal = _await_window(desktop, "--class xfce4-terminal")
        assert desktop.get_application_windows("xfce4-terminal") == [terminal]
        assert "Terminal" in desktop.get_window_title(terminal)
        desktop.commands.run(f"xdotool windowactivate --sync {terminal}")
        assert desktop.get_current_window_id() == terminal

        # open(file): Xfce's default for HTML (Chromium, --no-sandbox from /etc/chromium.d/cube).
        desktop.files.write("/home/user/opened.html", "<html><head><title>opened-file</title></head></html>")
        desktop.open("/home/user/opened.html")
        browser = _await_window(desktop, "--name opened-file")
        assert desktop.get_window_title(browser).startswith("opened-file")
        assert browser in desktop.get_application_windows("chromium")

        # open(url): a page served inside the sandbox, in the browser already running.
        desktop.files.write("/home/user/site/url.html", "<html><head><title>opened-url</title></head></html>")
        desktop.commands.run(
            "python3 -m http.server 8000 --bind 127.0.0.1 --directory /home/user/site", background=True
        )
        served = "curl -sf -o /dev/null http://127.0.0.1:8000/url.html"
        desktop.commands.run(f"for i in $(seq 100); do {served} && exit 0; sleep 0.2; done; exit 1")
        desktop.open("http://127.0.0.1:8000/url.html")
        assert desktop.get_window_title(_await_window(desktop, "--name opened-url")).startswith("opened-url")

        # launch(application, uri): the editor opens the file named.
        desktop.files.write("/home/user/note.txt", "a note")
        desktop.launch("org.xfce.mousepad", "/home/user/note.txt")
        assert "note.txt" in desktop.get_window_title(_await_window(desktop, "--name note.txt"))

        # The stream with a password: stopped, no VNC server runs; started again with
        # require_auth, x11vnc offers VNC authentication only.
        desktop.stream.start()
        assert _novnc_page(desktop_service, desktop.sandbox_id).status_code == 200
        desktop.stream.stop()
        assert desktop.commands.run("pgrep -x x11vnc || echo none").stdout.strip() == "none"
        desktop.stream.start(require_auth=True)
        key = desktop.stream.get_auth_key()
        assert f"password={key}" in desktop.stream.get_url(auth_key=key)
        greeting, security = _rfb_handshake(desktop_service.url, desktop.sandbox_id)
        assert greeting.startswith(b"RFB 003.") and list(security[1:]) == [2]
        desktop.stream.stop()
    finally:
        desktop.kill()


def test_the_js_desktop_sdk_sees_moves_and_types(
    desktop_service: umlguests.UmlService, js_sdk_dir: Path
) -> None:
    env = {**os.environ, "E2B_API_KEY": desktop_service.key("desktop-js")}
    env.pop("E2B_DEBUG", None)
    result = subprocess.run(
        ["node", "desktop_sdk.mjs"], cwd=js_sdk_dir, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["pngHead"] == b"\x89PNG\r\n\x1a\n".hex() and seen["pngSize"] == [1024, 768]
    assert seen["cursor"] == {"x": 345, "y": 123} and seen["screen"] == {"width": 1024, "height": 768}
    assert seen["typed"] == "typed through @e2b/desktop"
