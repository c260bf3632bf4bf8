"""The unmodified e2b-desktop SDK drives a `desktop` sandbox: screenshot, mouse, keyboard, noVNC.

The SDK starts Xvfb, Xfce, x11vnc and noVNC itself (commands in the sandbox). Its stream URL
names the public E2B domain (single-port mode): the noVNC page and its WebSocket are reached at
the router's address with E2b-Sandbox-Id / E2b-Sandbox-Port: 6080. Opt-in: conftest.py.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
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


def _rfb_greeting(router: str, sandbox_id: str) -> bytes:
    """The first WebSocket message noVNC's /websockify relays from x11vnc (through the router)."""
    address = urlsplit(router)
    headers = [(b"E2b-Sandbox-Id", sandbox_id.encode()), (b"E2b-Sandbox-Port", str(NOVNC_PORT).encode())]
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        request = wsproto.events.Request(
            host=address.netloc, target="/websockify", subprotocols=["binary"], extra_headers=headers
        )
        sock.sendall(ws.send(request))
        data = b""
        while True:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, wsproto.events.RejectConnection):
                    raise AssertionError(f"the WebSocket was refused: {event.status_code}")
                if isinstance(event, wsproto.events.BytesMessage):
                    data += event.data
                    if event.message_finished:
                        return data


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
        page = httpx.get(
            f"{desktop_service.url}/vnc.html",
            headers={"E2b-Sandbox-Id": desktop.sandbox_id, "E2b-Sandbox-Port": str(NOVNC_PORT)},
            timeout=60,
        )
        assert page.status_code == 200 and "noVNC" in page.text
        assert _rfb_greeting(desktop_service.url, desktop.sandbox_id).startswith(b"RFB 003.")
        desktop.stream.stop()
    finally:
        desktop.kill()
