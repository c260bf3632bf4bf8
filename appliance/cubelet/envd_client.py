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

# What the host holds of a guest's answers at once: a guest is untrusted, and one that streams an
# endless body or announces a huge envelope must not fill the service's memory.
MAX_REPLY_BYTES = 1 << 20  # a whole small answer (/metrics, an error body)
MAX_ENVELOPE_BYTES = 4 << 20  # one Connect envelope (envd sends output in chunks of ~32 KiB)


class EnvdError(Exception):
    pass


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed response, at most `limit` bytes (more: EnvdError)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise EnvdError(f"the guest agent's answer is larger than {limit} bytes")
    return bytes(body)


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
            try:
                text = (await read_bounded(response, MAX_REPLY_BYTES)).decode(errors="replace")[:500]
            except EnvdError as exc:
                text = str(exc)
            raise EnvdError(f"guest agent answered {response.status_code}: {text}")
        async for chunk in response.aiter_bytes():
            buffer += chunk
            while len(buffer) >= ENVELOPE_HEADER.size:
                flags, length = ENVELOPE_HEADER.unpack_from(buffer)
                if length > MAX_ENVELOPE_BYTES:
                    raise EnvdError(
                        f"the guest agent sent a {length}-byte message (at most {MAX_ENVELOPE_BYTES})"
                    )
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


async def run_command(host: str, command: str, user: str = "user", timeout: float = 60.0) -> CommandResult:
    """`/bin/sh -c command` as `user` in the guest whose envd is at `host`; waits for it to end."""
    out, err = bytearray(), bytearray()
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
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
