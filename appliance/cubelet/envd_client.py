"""The host's client for a guest agent's envd `process.Process/Start`.

A Connect server stream in JSON: the request is one envelope, the answer a stream
of envelopes (1 flag byte, 4 length bytes, JSON; framing from
`appliance.guest.connect`, the agent's own) carrying the process's output and
its end, then an end-of-stream envelope that may carry an error. Used by
template builds (Dockerfile RUN steps), the service's carry-over and the tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.guest.connect import ENVELOPE_HEADER, FLAG_END_STREAM, envelope
from appliance.runtime.base import ENVD_PORT


class EnvdError(Exception):
    pass


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


async def start_process(
    http: httpx.AsyncClient,
    base: str,
    user: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    stdout: Callable[[bytes], Any],
    stderr: Callable[[bytes], Any],
) -> int:
    """Run `argv` as `user` in the guest at `base` (http://host:port), streaming its output
    to the callbacks as it comes; its exit status (-1: killed by a signal). `cwd` None: the
    user's default working directory."""
    process: dict[str, object] = {"cmd": argv[0], "args": argv[1:], "envs": env}
    if cwd is not None:
        process["cwd"] = cwd
    body = json.dumps({"process": process, "stdin": False}).encode()
    headers = {
        "Content-Type": "application/connect+json",
        "Connect-Protocol-Version": "1",
        "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
    }
    exit_code: int | None = None
    buffer = b""
    async with http.stream(
        "POST", f"{base}/process.Process/Start", content=envelope(body), headers=headers
    ) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:500]
            raise EnvdError(f"guest agent answered {response.status_code}: {text}")
        async for chunk in response.aiter_bytes():
            buffer += chunk
            while len(buffer) >= ENVELOPE_HEADER.size:
                flags, length = ENVELOPE_HEADER.unpack_from(buffer)
                if len(buffer) < ENVELOPE_HEADER.size + length:
                    break
                message = json.loads(buffer[ENVELOPE_HEADER.size : ENVELOPE_HEADER.size + length] or b"{}")
                buffer = buffer[ENVELOPE_HEADER.size + length :]
                if flags & FLAG_END_STREAM:
                    if message.get("error"):
                        error = message["error"]
                        raise EnvdError(f"guest agent: {error.get('message', error)}")
                    continue
                event = message.get("event") or {}
                data = event.get("data") or {}
                if data.get("stdout"):
                    stdout(base64.b64decode(data["stdout"]))
                if data.get("stderr"):
                    stderr(base64.b64decode(data["stderr"]))
                if "end" in event:
                    end = event["end"] or {}
                    exit_code = int(end.get("exitCode", end.get("exit_code", 0)) or 0)
                    if not end.get("exited", True) and exit_code == 0:
                        exit_code = -1  # killed by a signal
    if exit_code is None:
        raise EnvdError("the guest agent's stream ended without the command's exit status")
    return exit_code


async def run_command(
    host: str, command: str, user: str = "user", timeout: float = 60.0, token: str | None = None
) -> CommandResult:
    """`/bin/sh -c command` as `user` in the guest whose envd is at `host`; waits for it to end.
    `token`: the agent's boot token before /init, the sandbox's after (none: an open agent)."""
    out, err = bytearray(), bytearray()
    headers = {"X-Access-Token": token} if token is not None else {}
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as http:
        code = await start_process(
            http,
            f"http://{host}:{ENVD_PORT}",
            user,
            ["/bin/sh", "-c", command],
            {},
            None,
            out.extend,
            err.extend,
        )
    return CommandResult(code, out.decode(errors="replace"), err.decode(errors="replace"))
