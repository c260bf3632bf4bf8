"""The build service's API blueprint served on a loopback port (sandbox steps from sandbox_doubles),
and the `cube tpl` build commands run against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.trio
import trio
from click.testing import CliRunner, Result
from hypercorn.config import Config as HypercornConfig
from quart import g
from quart_trio import QuartTrio
from sandbox_doubles import LoopbackSandboxes

from appliance.config import Config
from appliance.templates.api import create_blueprint
from appliance.templates.builds import TemplateBuilds
from appliance.templates.jobs import BuildJob
from appliance.tenancy import ADMIN


@dataclass
class Served:
    app: QuartTrio
    builds: TemplateBuilds
    port: int


@asynccontextmanager
async def serve_builds(config: Config, scratch: Path) -> AsyncIterator[Served]:
    builds = TemplateBuilds(config, LoopbackSandboxes(scratch))
    app = QuartTrio(__name__)

    @app.before_request
    async def _as_admin() -> None:  # the service authenticates; these tests act as its admin
        g.principal = ADMIN

    app.register_blueprint(create_blueprint(builds))
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = ["127.0.0.1:0"]
    hypercorn_config.accesslog = None
    async with trio.open_nursery() as nursery:
        await nursery.start(builds.run)
        binds = await nursery.start(partial(hypercorn.trio.serve, app, hypercorn_config, mode="asgi"))
        yield Served(app, builds, int(binds[0].rsplit(":", 1)[1]))
        nursery.cancel_scope.cancel()


def run_cli(served: Served, config: Config, command: object, args: list[str]) -> Result:
    env = {
        "CUBE_API_PORT": str(served.port),
        "CUBE_API_KEY": "test-key",
        "CUBE_STATE_DIR": str(config.state_dir),
        "CUBE_CONFIG": "/nonexistent",
    }
    return CliRunner().invoke(command, args, env=env, catch_exceptions=False)  # type: ignore[arg-type]


async def finished(job: BuildJob, timeout_s: float = 60.0) -> BuildJob:
    """The job once it is READY or FAILED."""
    with trio.fail_after(timeout_s):
        while not job.finished:
            await trio.sleep(0.05)
    return job
