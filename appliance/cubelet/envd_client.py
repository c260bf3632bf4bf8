"""The host's clients for a guest agent's envd.

- `GuestAgent`: the cubelet's own calls to one guest (`/init`, `/health`,
  `/metrics`), over one HTTP client per guest, from boot until the guest is gone.
- `start_process` / `run_command`: envd's `process.Process/Start`, a Connect server
  stream in JSON: the request is one envelope, the answer a stream of envelopes
  (framing: `appliance.guest.connect_framing`, the agent's own) carrying the
  process's output and its end, then an end-of-stream envelope that may carry an
  error. Used by template builds (Dockerfile RUN steps), the service's carry-over
  and the tests.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.guest.connect_framing import EnvelopeDecoder, FramingError, envelope
from appliance.runtime.base import ENVD_PORT

# envd's /metrics keys and the E2B SandboxMetric keys the cubelet's samples give them.
METRIC_KEYS = {
    "cpu_count": "cpuCount",
    "cpu_used_pct": "cpuUsedPct",
    "mem_used": "memUsed",
    "mem_total": "memTotal",
    "mem_cache": "memCache",
    "disk_used": "diskUsed",
    "disk_total": "diskTotal",
}
METRICS_TIMEOUT_S = 1.0
# What the host holds of a guest's answers at once: a guest is untrusted, and one that streams an
# endless body or announces a huge envelope must not fill the service's memory.
MAX_REPLY_BYTES = 1 << 20  # a whole small answer (/metrics, /health, an error body)
MAX_ENVELOPE_BYTES = 4 << 20  # one Connect envelope (envd sends output in chunks of ~32 KiB)


class EnvdError(Exception):
    pass


async def read_bounded(response: httpx.Response, limit: int = MAX_REPLY_BYTES) -> bytes:
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


class GuestAgent:
    """The cubelet's client for one guest's envd. Its own connection pool: the connection the
    health probes keep open is the one a claim's /init reuses (a new one costs the guest's vCPU
    ~4 ms under UML), and closing it with the guest leaves no idle connection for the next
    guest at that address."""

    def __init__(self, endpoint: tuple[str, int], timeout: float, boot_token: str) -> None:
        host, port = endpoint
        self._http = httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(keepalive_expiry=None),  # envd never closes an idle connection
            trust_env=False,
            verify=False,  # plain HTTP: the default TLS context would load the CA bundle, ~0.1 s per guest
        )
        # The guest's boot token (`BootSpec.agent_token`): the only key its agent takes until `/init`.
        self._boot_token = boot_token
        # The sandbox's access token, once `/init` handed it over: envd then takes only that one
        # (the boot token dies at `/init`: clones of one kvm snapshot all know it).
        self.access_token: str | None = None

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def headers(self) -> dict[str, str]:
        """Auth for the host's own envd calls (/init included): the boot token until `/init`
        succeeded, the sandbox's access token after (appliance/guest/state.py)."""
        return {"X-Access-Token": self.access_token or self._boot_token}

    async def init(
        self,
        *,
        access_token: str,
        traffic_token: str | None,
        env_vars: dict[str, str],
        user: str,
        workdir: str,
        timestamp: str,
    ) -> None:
        """Hand the guest its user's settings (envd's `/init`); raises EnvdError if it refuses.
        `traffic_token` opens the code interpreter's port too (what the SDKs send on /contexts)."""
        body = {
            "envVars": env_vars,
            "accessToken": access_token,
            "trafficAccessToken": traffic_token,
            "timestamp": timestamp,
            # Guests cloned from one snapshot share its CRNG state: each gets its own seed.
            "rngSeed": secrets.token_hex(32),
            "defaultUser": user,
            "defaultWorkdir": workdir,
        }
        try:
            response = await self._http.post("/init", json=body, headers=self.headers())
        except httpx.HTTPError as exc:
            raise EnvdError(f"guest agent /init failed: {exc!r}") from exc
        if response.status_code >= 300:
            raise EnvdError(f"guest agent /init answered {response.status_code}")
        self.access_token = access_token

    async def healthy(self, timeout: float) -> bool:
        try:
            # Read to its end (so the connection is kept for /init), but bounded: a guest is untrusted.
            health = self._http.stream("GET", "/health", headers=self.headers(), timeout=timeout)
            async with health as response:
                await read_bounded(response)
                return response.status_code < 300
        except (httpx.HTTPError, EnvdError):
            return False

    async def metrics(self) -> dict[str, object]:
        """envd's view of the guest, in the E2B SandboxMetric shape; {} when it does not answer."""
        try:
            async with self._http.stream(
                "GET", "/metrics", headers=self.headers(), timeout=METRICS_TIMEOUT_S
            ) as response:
                ok = response.status_code == 200
                data = json.loads(await read_bounded(response)) if ok else {}
        except (httpx.HTTPError, ValueError, EnvdError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            e2b: data[envd] for envd, e2b in METRIC_KEYS.items() if isinstance(data.get(envd), int | float)
        }

    async def run(
        self,
        argv: list[str],
        user: str,
        env: dict[str, str],
        cwd: str,
        stdout: Callable[[bytes], Any] | None = None,
    ) -> int:
        """`argv` as `user` in the guest, its output dropped (or stdout to `stdout`); its exit status
        (EnvdError: the agent failed). For the host's own checks (a template's ready command), before
        `/init` too, and the host's own work in a guest (volume mounts)."""
        # No read timeout: a command may be silent as long as it runs (the caller bounds it).
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        return await start_process(
            self._http, "", user, argv, env, cwd, stdout or _drop, _drop, auth=self.headers(), timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def _drop(_chunk: bytes) -> None:
    pass


async def start_process(
    http: httpx.AsyncClient,
    base: str,
    user: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    stdout: Callable[[bytes], Any],
    stderr: Callable[[bytes], Any],
    auth: dict[str, str] | None = None,
    timeout: httpx.Timeout | None = None,
) -> int:
    """Run `argv` as `user` in the guest at `base` (http://host:port), streaming its output
    to the callbacks as it comes; its exit status (-1: killed by a signal). `cwd` None: the
    user's default working directory. `auth`: headers for the agent (X-Access-Token) when the
    client `http` sends none of its own; `timeout`: instead of the client's."""
    process: dict[str, object] = {"cmd": argv[0], "args": argv[1:], "envs": env}
    if cwd is not None:
        process["cwd"] = cwd
    body = json.dumps({"process": process, "stdin": False}).encode()
    headers = {
        "Content-Type": "application/connect+json",
        "Connect-Protocol-Version": "1",
        "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
        **(auth or {}),
    }
    exit_code: int | None = None
    decoder = EnvelopeDecoder(max_message=MAX_ENVELOPE_BYTES)
    stream = http.stream(
        "POST",
        f"{base}/process.Process/Start",
        content=envelope(body),
        headers=headers,
        timeout=timeout or httpx.USE_CLIENT_DEFAULT,
    )
    async with stream as response:
        if response.status_code != 200:
            try:
                text = (await read_bounded(response)).decode(errors="replace")[:500]
            except EnvdError as exc:
                text = str(exc)
            raise EnvdError(f"guest agent answered {response.status_code}: {text}")
        try:
            async for chunk in response.aiter_bytes():
                for message in decoder.feed(chunk):
                    exit_code = _process_event(
                        json.loads(message.payload or b"{}"), message.end_stream, stdout, stderr, exit_code
                    )
            decoder.close()
        except FramingError as exc:
            raise EnvdError(f"the guest agent's stream is broken: {exc}") from exc
    if exit_code is None:
        raise EnvdError("the guest agent's stream ended without the command's exit status")
    return exit_code


def _process_event(
    message: dict[str, Any],
    end_stream: bool,
    stdout: Callable[[bytes], Any],
    stderr: Callable[[bytes], Any],
    exit_code: int | None,
) -> int | None:
    """Hand one stream message's output to the callbacks; the exit status once it says so."""
    if end_stream:
        if message.get("error"):
            error = message["error"]
            raise EnvdError(f"guest agent: {error.get('message', error)}")
        return exit_code
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
