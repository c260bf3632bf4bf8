"""`cube serve` as a process would run it: signals, pid file, refused configurations."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from quart import Blueprint

from appliance.api.auth import Access, check_local_dev_allowed, protect
from appliance.api.services import Services
from appliance.config import Config
from appliance.errors import first_leaf
from appliance.master.service import serve_until_signalled

if TYPE_CHECKING:
    from conftest import FakeRuntime, ServiceHarness


async def test_sigterm_shuts_down_gracefully(
    service_config: Config, fake_runtime: FakeRuntime, fake_runtime_factory: Any
) -> None:
    config = dataclasses.replace(service_config, api_port=0, local_dev=True)
    pid_file = config.run_dir / "cube.pid"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_until_signalled, config, fake_runtime_factory(fake_runtime))
        with trio.fail_after(10):
            while not pid_file.exists():  # written after the signal receiver is in place
                await trio.sleep(0.05)
        assert pid_file.read_text().strip() == str(os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
    assert not pid_file.exists()


async def test_what_start_up_made_is_frozen_out_of_the_cyclic_gc(
    service_config: Config, fake_runtime: FakeRuntime, fake_runtime_factory: Any
) -> None:
    """Once serving, a full collection no longer walks the modules, the app and the store (it
    stalled bursts of creates on the event loop: docs/BENCHMARKS.md)."""
    gc.unfreeze()  # whatever an earlier test in this process froze
    config = dataclasses.replace(service_config, api_port=0, local_dev=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_until_signalled, config, fake_runtime_factory(fake_runtime))
        with trio.fail_after(10):
            while gc.get_freeze_count() == 0:
                await trio.sleep(0.05)
        assert gc.get_freeze_count() > 10_000
        os.kill(os.getpid(), signal.SIGTERM)


async def test_end_sandboxes_starts_ends_everything_and_returns(
    service_config: Config, fake_runtime: FakeRuntime, fake_runtime_factory: Any
) -> None:
    """`cube serve --end-sandboxes` (the uninstaller's): no signal needed, nothing left running."""
    config = dataclasses.replace(service_config, api_port=0, local_dev=True)
    with trio.fail_after(30):
        await serve_until_signalled(config, fake_runtime_factory(fake_runtime), end_sandboxes=True)
    assert fake_runtime.instances == {}
    assert not (config.run_dir / "cube.pid").exists()


async def test_sandboxes_die_with_the_service(
    service_config: Config, fake_runtime: FakeRuntime, fake_runtime_factory: Any
) -> None:
    from appliance.master.service import run_service

    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_service, service_config, fake_runtime_factory(fake_runtime))
        token = (service_config.state_dir / "admin-token").read_text().strip()
        async with httpx.AsyncClient(base_url=running.api_url, headers={"X-API-KEY": token}) as client:
            created = await client.post("/v2/sandboxes", json={})
            assert created.status_code == 201
        assert len(fake_runtime.instances) == 1
        running.stop.set()
    assert fake_runtime.instances == {}
    assert list(service_config.sandboxes_dir.iterdir()) == []


def test_local_dev_is_refused_off_loopback() -> None:
    with pytest.raises(SystemExit, match="loopback"):
        check_local_dev_allowed(Config(local_dev=True, api_host="0.0.0.0"))
    check_local_dev_allowed(Config(local_dev=True, api_host="127.0.0.1"))
    check_local_dev_allowed(Config(local_dev=False, api_host="0.0.0.0"))


def test_blueprints_from_other_modules_are_served_behind_auth(
    service_config: Config, start_service: Callable[..., ServiceHarness]
) -> None:
    def make_blueprint(services: Services) -> Blueprint:
        blueprint = protect(Blueprint("extra", __name__), Access.ADMIN)

        @blueprint.get("/extra/templates")
        async def extra() -> dict[str, object]:
            return {"templates": sorted(services.templates.all())}

        return blueprint

    harness = start_service(service_config, None, [make_blueprint])
    assert httpx.get(f"{harness.url}/extra/templates").status_code == 401
    key = httpx.post(
        f"{harness.url}/cube/keys", json={"name": "k"}, headers={"X-API-KEY": harness.admin_token}
    ).json()["key"]
    assert httpx.get(f"{harness.url}/extra/templates", headers={"X-API-KEY": key}).status_code == 403
    response = httpx.get(f"{harness.url}/extra/templates", headers={"X-API-KEY": harness.admin_token})
    assert response.json() == {"templates": ["code-interpreter"]}


def test_a_blueprint_that_declares_no_access_is_refused_at_start(
    service_config: Config, start_service: Callable[..., ServiceHarness]
) -> None:
    def make_blueprint(services: Services) -> Blueprint:
        blueprint = Blueprint("open", __name__)

        @blueprint.get("/open")
        async def wide_open() -> dict[str, object]:
            return {}

        return blueprint

    with pytest.raises(BaseException) as raised:
        start_service(service_config, None, [make_blueprint])
    assert "does not declare who may call it" in str(first_leaf(raised.value))


def test_cube_serve_without_a_runtime_says_why(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from appliance.cli import main

    env = {
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_STATE_DIR": str(tmp_path / "state"),
        "CUBE_RUN_DIR": str(tmp_path / "run"),
        "CUBE_RUNTIME": "no-such-runtime",
        "CUBE_HOST_NETWORK": "10.223.252.0/22",  # not the installed service's: its pinned maps are left alone
        "CUBE_API_PORT": "0",
        "CUBE_TLS_PORT": "0",
    }
    result = CliRunner(env=env).invoke(main, ["serve"])
    assert result.exit_code == 1
    assert "unknown runtime 'no-such-runtime'" in result.output
    assert not (tmp_path / "run" / "cube.pid").exists()
