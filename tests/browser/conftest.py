"""tests/browser: the `browser` template with the real clients (Playwright on the host over CDP).

Opt-in (`CUBE_BROWSER_TEST=1`): the first run builds the template (mmdebstrap of the default
recipe + Chromium and Playwright: many minutes, network), cached under /var/cache/cube like the
default template's. Each test boots real UML guests: hold /tmp/cube-tests.lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import umlguests

from appliance.config import Config, load_config
from appliance.records import TemplateManifest

OPT_IN = os.environ.get("CUBE_BROWSER_TEST") == "1"
BUILDS = "builds the browser template"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent and item.get_closest_marker("uml"):
            if not OPT_IN:
                item.add_marker(
                    pytest.mark.skip(reason="opt-in: CUBE_BROWSER_TEST=1 (builds the browser template)")
                )
            elif os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="real UML guests need root"))


@pytest.fixture(scope="session")
def browser_template() -> TemplateManifest:
    """Built (or cached) under the build cache, not the installed service's templates: the tests'
    services use it through a symlink (umlguests.uml_service), the installed one never sees it."""
    from appliance.templates.browser import build_browser_template

    cache_dir = load_config().cache_dir
    return trio.run(
        build_browser_template, Config(state_dir=cache_dir / "test-templates", cache_dir=cache_dir)
    )


@pytest.fixture
def browser_service(
    start_service: Any, monkeypatch: pytest.MonkeyPatch, browser_template: TemplateManifest
) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch, template=browser_template) as service:
        yield service
