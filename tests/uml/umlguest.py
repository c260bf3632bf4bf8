"""Talking to a real guest agent from the host, the way the E2B SDKs do, over raw HTTP.

- `run_command`: envd's Connect server stream `process.Process/Start`
  (application/connect+json envelopes: 1 flag byte, 4 length bytes, JSON).
- `execute_code`: the code interpreter's `POST /execute` (NDJSON lines).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass

import httpx

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
END_STREAM = 0x02


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None
    stdout: str
    stderr: str


def _envelope(message: dict[str, object]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


def _messages(data: bytes) -> list[tuple[int, dict[str, object]]]:
    out = []
    while len(data) >= 5:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length] or b"{}")))
        data = data[5 + length :]
    return out


async def run_command(host: str, command: str, user: str = "user", timeout: float = 60.0) -> CommandResult:
    """`/bin/sh -c command` in the guest as `user`; waits for it to end."""
    headers = {
        "Content-Type": "application/connect+json",
        "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
    }
    request = {"process": {"cmd": "/bin/sh", "args": ["-c", command]}}
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.post(
            f"http://{host}:{ENVD_PORT}/process.Process/Start", content=_envelope(request), headers=headers
        )
    stdout, stderr, exit_code = b"", b"", None
    for flags, message in _messages(response.content):
        if flags & END_STREAM:
            if message.get("error"):
                raise RuntimeError(f"envd error: {message['error']}")
            continue
        event = message.get("event", {})
        assert isinstance(event, dict)
        data = event.get("data") or {}
        stdout += base64.b64decode(data.get("stdout", ""))
        stderr += base64.b64decode(data.get("stderr", ""))
        if "end" in event:
            end = event["end"] or {}
            exit_code = int(end.get("exitCode", end.get("exit_code", 0)))
    return CommandResult(exit_code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


async def execute_code(host: str, code: str, timeout: float = 60.0) -> list[dict[str, object]]:
    """Run Python in the guest's default kernel; the NDJSON events it streams back."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.post(f"http://{host}:{INTERPRETER_PORT}/execute", json={"code": code})
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]
