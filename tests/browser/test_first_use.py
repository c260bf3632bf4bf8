"""Creating a sandbox of a built-in recipe template the appliance has not built yet: the E2B error
body names the command that builds it (no UML: the service with its fake runtime, the real SDKs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from e2b import Sandbox
from e2b_desktop import Sandbox as Desktop

from appliance.templates.built_in import BUILD_ALL

if TYPE_CHECKING:
    from conftest import ServiceHarness


@pytest.mark.parametrize("name", ["browser", "browser-v1", "desktop"])
def test_an_unbuilt_browser_template_names_the_build_command(sdk_env: ServiceHarness, name: str) -> None:
    response = httpx.post(
        f"{sdk_env.url}/sandboxes",
        json={"templateID": name},
        headers={"X-API-Key": sdk_env.key("test")},
    )
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == 404
    assert f"template '{name}' is not built on this appliance yet" in body["message"]
    assert f"`{BUILD_ALL}`" in body["message"]

    with pytest.raises(Exception, match=f"`{BUILD_ALL}`"):
        Sandbox.create(name)


def test_the_e2b_desktop_sdk_is_told_how_to_build_its_template(sdk_env: ServiceHarness) -> None:
    # e2b_desktop.Sandbox.create() names the template `desktop` itself.
    with pytest.raises(Exception, match=f"template 'desktop' is not built.*`{BUILD_ALL}`"):
        Desktop.create()


def test_an_unknown_template_is_simply_not_found(sdk_env: ServiceHarness) -> None:
    response = httpx.post(
        f"{sdk_env.url}/sandboxes",
        json={"templateID": "no-such-template"},
        headers={"X-API-Key": sdk_env.key("test")},
    )
    assert response.status_code == 404
    assert response.json() == {"code": 404, "message": "template 'no-such-template' not found"}
