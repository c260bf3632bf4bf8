"""What tests that boot real UML guests share (tests/uml, tests/virtio, tests/net).

- `default_template()`: the built default template of this host's config, the one the
  installer built (built here, minutes, cached by recipe hash, only when missing); the
  calling test is skipped with the reason when not root or when it cannot be built.
- `private_config(prefix, host_network, uid_base, ...)`: a Config whose state and run
  directories are a fresh short temporary directory (unix socket paths such as the
  mconsole's must fit in 107 bytes; pytest's tmp_path is too deep), with the host's
  cache directory (the built UML kernel) and a test-only sandbox network and uid range,
  so nothing collides with a running `cube serve`; removed afterwards.
- `claim(instance)`: `/init` with the guest's boot token, as the cubelet claims a pooled
  guest, and no access token: its agent is then open to the raw calls below (an unclaimed
  agent answers nothing but /health without its boot token).
- `execute_code(host, code)`: Python in a guest's default kernel, as the E2B SDKs run it,
  over raw HTTP: the code interpreter's `POST /execute` (its NDJSON events). Commands go
  through envd with `appliance.cubelet.envd_client.run_command`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from appliance.config import Config, load_config
from appliance.records import TemplateManifest
from appliance.runtime.base import CODE_INTERPRETER_PORT, ENVD_PORT, Instance


def default_template() -> TemplateManifest:
    if os.geteuid() != 0:
        pytest.skip("real UML guests need root (namespaces, cgroups, taps)")
    from appliance.templates.default import build_default_template

    try:
        return trio.run(build_default_template, load_config())
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"the default template is not built and cannot be built here: {exc}")


@contextmanager
def private_config(
    prefix: str, host_network: str, uid_base: int, *, allow_unenforced_network: bool = True
) -> Iterator[Config]:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield Config(
            state_dir=work / "state",
            run_dir=work / "run",
            cache_dir=load_config().cache_dir,
            host_network=host_network,
            uid_base=uid_base,
            allow_unenforced_network=allow_unenforced_network,
        )
    finally:
        shutil.rmtree(work)


async def claim(instance: Instance, body: dict[str, object] | None = None) -> None:
    host, port = instance.endpoint(ENVD_PORT)
    headers = {"X-Access-Token": instance.agent_token}
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        response = await client.post(f"http://{host}:{port}/init", json=body or {}, headers=headers)
    assert response.status_code == 204, response.text


async def execute_code(host: str, code: str, timeout: float = 60.0) -> list[dict[str, object]]:
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        response = await client.post(f"http://{host}:{CODE_INTERPRETER_PORT}/execute", json={"code": code})
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]
