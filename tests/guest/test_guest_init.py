"""POST /init: sandbox env vars for every process and kernel, the access token, signed URLs."""

from __future__ import annotations

import httpx
import pytest
from packaging.version import Version

TOKEN = "test-access-token"


def test_init_env_vars_reach_commands_running_and_new_kernels(sandbox, agent) -> None:
    assert agent.init({"envVars": {"CUBE_SANDBOX_VAR": "from-init"}}).status_code == 204
    assert sandbox.commands.run("echo $CUBE_SANDBOX_VAR").stdout == "from-init\n"
    code = "import os; print(os.environ['CUBE_SANDBOX_VAR'])"
    assert sandbox.run_code(code).logs.stdout == ["from-init\n"]  # the kernel started at boot
    context = sandbox.create_code_context()
    assert sandbox.run_code(code, context=context).logs.stdout == ["from-init\n"]
    sandbox.remove_code_context(context)
    assert httpx.get(f"{agent.envd_url}/envs").json()["CUBE_SANDBOX_VAR"] == "from-init"


def test_metrics(agent) -> None:
    metrics = httpx.get(f"{agent.envd_url}/metrics").json()
    assert metrics["cpu_count"] >= 1 and metrics["mem_total"] > metrics["mem_used"] > 0


@pytest.fixture
def token_set(agent):
    assert agent.init({"accessToken": TOKEN}).status_code == 204
    yield TOKEN
    assert agent.init({"accessToken": None}, token=TOKEN).status_code == 204


@pytest.fixture
def secure_sandbox(token_set, debug_sdk):
    from e2b import ConnectionConfig
    from e2b_code_interpreter import Sandbox

    return Sandbox(
        sandbox_id="debug_sandbox_id",
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=token_set,
        traffic_access_token=None,
        # what Sandbox.create() builds when the control plane returns an envdAccessToken
        connection_config=ConnectionConfig(debug=True, extra_sandbox_headers={"X-Access-Token": token_set}),
    )


def test_access_token_is_enforced(agent, token_set) -> None:
    assert httpx.get(f"{agent.envd_url}/health").status_code == 401
    assert httpx.get(f"{agent.envd_url}/health", headers={"X-Access-Token": TOKEN}).status_code == 204
    assert httpx.get(f"{agent.envd_url}/files", params={"path": "/etc/hostname"}).status_code == 401
    rpc = httpx.post(
        f"{agent.envd_url}/process.Process/List", json={}, headers={"Content-Type": "application/json"}
    )
    assert rpc.status_code == 401 and rpc.json()["code"] == "unauthenticated"
    assert httpx.post(f"{agent.interpreter_url}/execute", json={"code": "1"}).status_code == 401
    assert httpx.get(f"{agent.interpreter_url}/contexts").status_code == 200  # never behind the token
    assert agent.init({"envVars": {"X": "y"}}).status_code == 401


def test_sdk_with_token_and_signed_urls(secure_sandbox, agent) -> None:
    path = str(agent.scratch / "signed.txt")
    secure_sandbox.files.write(path, "signed")
    assert secure_sandbox.commands.run("echo ok").stdout == "ok\n"
    assert secure_sandbox.run_code("1 + 2").text == "3"
    assert httpx.get(secure_sandbox.download_url(path)).text == "signed"
    assert httpx.get(secure_sandbox.download_url(path, use_signature_expiration=60)).text == "signed"
    upload = secure_sandbox.upload_url(str(agent.scratch / "up.txt"))
    assert httpx.post(upload, files={"file": ("up.txt", b"uploaded")}).status_code == 200
    assert (agent.scratch / "up.txt").read_bytes() == b"uploaded"
    forged = secure_sandbox.download_url(path).replace("signature=v1_", "signature=v1_x")
    assert httpx.get(forged).status_code == 401
