"""envd's HTTP surface on port 49983: Connect RPCs, `/files`, `/health`, `/init`, `/envs`, `/metrics`."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Awaitable, Callable

import trio

from appliance.guest import ENVD_VERSION
from appliance.guest.connect import CallContext, Router
from appliance.guest.http import HttpError, Request, Response
from appliance.guest.state import AgentState, same_secret
from appliance.guest.users import UnknownUser, User, user_from_basic_auth

EnvListener = Callable[[dict[str, str]], Awaitable[None]]
# Clock corrections smaller than this are noise (PROTOCOL: set it when off by more than 1 s).
CLOCK_TOLERANCE_S = 1.0
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def file_signature(path: str, operation: str, user: str, token: str, expiration: str | None) -> str:
    """The v1 signature the SDK puts on download/upload URLs (PROTOCOL.md §3.7)."""
    import hashlib  # lazy: loads OpenSSL, slow to import under UML and rarely needed

    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


class CpuSampler:
    """CPU use between two /metrics calls, from /proc/stat."""

    def __init__(self) -> None:
        self._previous = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(value) for value in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def used_percent(self) -> float:
        total, idle = self._sample()
        previous_total, previous_idle = self._previous
        self._previous = (total, idle)
        elapsed = total - previous_total
        return round(100.0 * (1 - (idle - previous_idle) / elapsed), 2) if elapsed > 0 else 0.0


class EnvdApp:
    def __init__(self, state: AgentState, router: Router, on_env_vars: EnvListener) -> None:
        self.state = state
        self.router = router
        self._on_env_vars = on_env_vars
        self._cpu = CpuSampler()
        # Set once /health has been answered: the host knows this guest is up.
        self.health_answered = trio.Event()

    async def handle(self, request: Request, response: Response) -> None:
        try:
            await self._route(request, response)
        except HttpError as exc:
            await response.send_json(exc.status, {"code": exc.status, "message": exc.message})

    async def _route(self, request: Request, response: Response) -> None:
        path = request.path
        if path == "/health" and request.method == "GET":  # liveness only: open, as in E2B's envd
            await response.send(204)
            self.health_answered.set()
            return
        if path == "/files" and request.method in ("GET", "POST"):
            user = self._files_user(request)
            # Imported on first use: not needed for the first /health (start-up time).
            from appliance.guest.files_endpoint import download, upload

            if request.method == "GET":
                await download(request, response, user)
            else:
                await upload(request, response, user)
            return
        is_rpc = self.router.handles(path)
        if not self.state.token_accepted(request.headers):
            await _refuse(response, is_rpc, "invalid or missing access token")
            return
        if is_rpc:
            try:
                user = self.state.user(self._basic_user(request))
            except UnknownUser as exc:
                await _refuse(response, is_rpc, str(exc))
                return
            await self.router.dispatch(request, response, CallContext(user=user, headers=request.headers))
        elif path.count("/") == 2 and path.split("/")[1].startswith(("process.", "filesystem.")):
            body = {"code": "unimplemented", "message": f"unknown method {path}", "details": []}
            await response.send_json(404, body)
        elif path == "/init" and request.method == "POST":
            await self._init(request, response)
        elif path == "/envs" and request.method == "GET":
            await response.send_json(200, self.state.env_vars)
        elif path == "/metrics" and request.method == "GET":
            await response.send_json(200, self._metrics())
        else:
            await response.send_json(404, {"code": 404, "message": f"no route for {request.method} {path}"})

    @staticmethod
    def _basic_user(request: Request) -> str | None:
        return user_from_basic_auth(request.headers.get("authorization"))

    def _files_user(self, request: Request) -> User:
        """Who an authorized `/files` call acts as (HttpError 401 if it is not authorized).

        With the access token: the `username` query, else the Basic header's user. With a
        signed URL: exactly the user it was signed for (`username`, else the default user);
        an Authorization header cannot raise it to another user.
        """
        username = request.query_value("username")
        if self.state.token_accepted(request.headers):
            username = username or self._basic_user(request)
        else:
            self._check_signature(request)
        try:
            return self.state.user(username)
        except UnknownUser as exc:
            raise HttpError(401, str(exc)) from None

    def _check_signature(self, request: Request) -> None:
        """A signed download/upload URL's signature (PROTOCOL.md §3.7); HttpError 401 says what is wrong."""
        token = self.state.access_token
        if not self.state.initialized or token is None:
            raise HttpError(401, "invalid or missing access token")  # nothing to sign with before /init
        signature = request.query_value("signature")
        if not signature:
            raise HttpError(401, "missing signature query parameter")
        expiration = request.query_value("signature_expiration")
        expires_at = None
        if expiration is not None:
            try:
                expires_at = int(expiration)
            except ValueError:
                raise HttpError(400, "signature_expiration must be an integer (unix seconds)") from None
        expected = file_signature(
            request.query_value("path") or "",
            "read" if request.method == "GET" else "write",
            request.query_value("username") or "",
            token,
            expiration,
        )
        if not same_secret(signature, expected):
            raise HttpError(401, "invalid signature")
        if expires_at is not None and expires_at < time.time():
            raise HttpError(401, "signature is already expired")

    async def _init(self, request: Request, response: Response) -> None:
        try:
            body = json.loads(await request.read_body() or b"{}")
        except ValueError:
            raise HttpError(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        env_vars = body.get("envVars") or {}
        if not isinstance(env_vars, dict):
            raise HttpError(400, "envVars must be an object")
        # Absent: unchanged (a later /init); null or "": none.
        access_token = _optional_token(body, "accessToken", self.state.access_token)
        traffic_token = _optional_token(body, "trafficAccessToken", self.state.traffic_token)
        self.state.initialize(access_token, traffic_token)
        if body.get("defaultUser"):
            self.state.default_user = str(body["defaultUser"])
        if body.get("defaultWorkdir"):
            self.state.default_workdir = str(body["defaultWorkdir"])
        if body.get("timestamp"):
            _set_clock(str(body["timestamp"]))
        if body.get("rngSeed"):
            _seed_rng(str(body["rngSeed"]))
            self.state.rng_generation += 1
        if env_vars:
            env_vars = {str(k): str(v) for k, v in env_vars.items()}
            self.state.env_vars.update(env_vars)
            await self._on_env_vars(env_vars)
        await response.send(204)

    def _metrics(self) -> dict[str, object]:
        """One sample in envd's shape (what the host turns into E2B's SandboxMetric)."""
        memory: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                memory[key] = int(rest.split()[0]) * 1024
        disk = os.statvfs("/")
        mem_total = memory.get("MemTotal", 0)
        mem_used = mem_total - memory.get("MemAvailable", 0)
        disk_total = disk.f_blocks * disk.f_frsize
        return {
            "ts": int(time.time()),
            "cpu_count": os.cpu_count(),
            "cpu_used_pct": self._cpu.used_percent(),
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_cache": memory.get("Cached", 0),
            "mem_total_mib": mem_total // (1024 * 1024),
            "mem_used_mib": mem_used // (1024 * 1024),
            "disk_total": disk_total,
            # What users may still write, as envd counts it (blocks reserved for root are used).
            "disk_used": disk_total - disk.f_bavail * disk.f_frsize,
            "envd_version": ENVD_VERSION,
        }


async def _refuse(response: Response, is_rpc: bool, message: str) -> None:
    """401 in the caller's error shape: Connect's `unauthenticated` for RPCs, E2B's JSON for the rest."""
    if is_rpc:
        await response.send_json(401, {"code": "unauthenticated", "message": message, "details": []})
    else:
        await response.send_json(401, {"code": 401, "message": message})


def _optional_token(body: dict[str, object], key: str, current: str | None) -> str | None:
    if key not in body:
        return current
    value = body[key]
    if value is not None and not isinstance(value, str):
        raise HttpError(400, f"{key} must be a string or null")
    return value or None


def _seed_rng(seed_hex: str) -> None:
    """Best effort (needs root): a guest cloned from a snapshot starts with the template's
    CRNG state; mixing in the sandbox's own seed and reseeding makes its randomness its own."""
    try:
        seed = bytes.fromhex(seed_hex)
    except ValueError:
        return
    if not seed or os.geteuid() != 0:
        return
    import fcntl  # lazy: only /init needs it
    import struct

    try:
        with open("/dev/urandom", "wb") as urandom:
            # struct rand_pool_info {int entropy_count (bits); int buf_size; u32 buf[];}
            fcntl.ioctl(urandom, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
            fcntl.ioctl(urandom, RNDRESEEDCRNG)
    except OSError:
        pass


def _set_clock(timestamp: str) -> None:
    """Best effort: a restored or long-paused guest's clock is stale; only root may fix it."""
    from datetime import datetime  # lazy: start-up time

    try:
        wanted = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return
    if abs(wanted - time.time()) > CLOCK_TOLERANCE_S and os.geteuid() == 0:
        try:
            time.clock_settime(time.CLOCK_REALTIME, wanted)
        except OSError:
            pass
