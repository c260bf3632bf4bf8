"""The CDP front's rewrite of Chromium's DevTools URLs (image/rootfs-browser/cdp_front.py), pure."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

from appliance.templates.browser import RECIPE_DIR


def _front() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cdp_front", RECIPE_DIR / "cdp_front.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What Chromium's /json/list says (trimmed), with its own address in every URL.
CHROMIUM_LIST = [
    {
        "devtoolsFrontendUrl": "/devtools/inspector.html?ws=127.0.0.1:9223/devtools/page/AB12",
        "id": "AB12",
        "type": "page",
        "url": "about:blank",
        "webSocketDebuggerUrl": "ws://127.0.0.1:9223/devtools/page/AB12",
    }
]


def test_websocket_urls_name_the_host_the_client_used() -> None:
    front = _front()
    body = json.dumps(CHROMIUM_LIST).encode()
    plain = json.loads(front.rewrite(body, "127.0.0.1:3000", secure=False))
    assert plain[0]["webSocketDebuggerUrl"] == "ws://127.0.0.1:3000/devtools/page/AB12"
    tls = json.loads(front.rewrite(body, "9222-sbx.cube.test", secure=True))
    assert tls[0]["webSocketDebuggerUrl"] == "wss://9222-sbx.cube.test/devtools/page/AB12"
    assert (
        tls[0]["devtoolsFrontendUrl"] == "/devtools/inspector.html?wss=9222-sbx.cube.test/devtools/page/AB12"
    )
    assert "9223" not in json.dumps(tls)


def test_only_the_json_endpoints_are_answered_by_the_front() -> None:
    front = _front()
    for path in (b"/json", b"/json/", b"/json/version", b"/json/list", b"/json/list?t=1"):
        assert front.JSON_PATHS.match(path), path
    for path in (b"/devtools/browser/x", b"/json/new?about:blank", b"/json/close/AB12", b"/jsonx"):
        assert not front.JSON_PATHS.match(path), path
