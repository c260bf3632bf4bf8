"""What `POST /init` configures and every service reads: env vars, tokens, default user and workdir.

Who may call the agent (both ports; `/health` is open, as E2B's envd's is):
- before `/init`, only the holder of the boot token: the host that booted this guest put it
  on the kernel command line (options.py). Pooled, template-build and probe guests are
  unclaimed: without it nobody can plant a process that would outlive the claim. No boot
  token at all: everything is refused.
- `/init` (sent with the boot token) hands over the sandbox's tokens, and the boot token is
  dead from then on: the clones of one kvm snapshot all hold the same boot token, and any
  sandbox user can read it from /proc/cmdline. After it, envd takes only the sandbox's
  access token (`X-Access-Token`), or none at all if `/init` set none (E2B's unsecured
  envd: what tests of the SDK's debug mode use; the cubelet always sets one). The code
  interpreter also takes the traffic token (`E2B-Traffic-Access-Token`): the SDKs send
  the access token only on `/execute`, the traffic token on every call.
"""

from __future__ import annotations

import os

# Constant-time comparison without loading OpenSSL (hmac imports _hashlib): slow under UML.
from _operator import _compare_digest as compare_digest
from dataclasses import dataclass, field

from appliance.guest.users import User, lookup_user

ACCESS_TOKEN_HEADER = "x-access-token"
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"

# The directory holding the `appliance` package the agent runs from. Init puts it (and, in
# images without them, copies of trio and h11) on the agent's PYTHONPATH; user processes
# and kernels must not inherit it, or those copies would shadow their own packages.
AGENT_IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _base_environment() -> dict[str, str]:
    env = dict(os.environ)
    entries = [e for e in env.pop("PYTHONPATH", "").split(os.pathsep) if e]
    kept = [e for e in entries if os.path.abspath(e) != AGENT_IMPORT_ROOT]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


@dataclass
class AgentState:
    default_user: str = "user"
    default_workdir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    boot_token: str | None = field(default=None, repr=False)
    initialized: bool = False  # /init has been accepted: the boot token is dead
    access_token: str | None = field(default=None, repr=False)
    traffic_token: str | None = field(default=None, repr=False)
    # Bumped by each /init that reseeds the kernel's RNG (a clone of a snapshot gets its own
    # seed): running interpreter kernels reseed their own generators before their next run.
    rng_generation: int = 0

    def user(self, name: str | None = None) -> User:
        """The named user, else the default one; raises UnknownUser (never falls back to root)."""
        return lookup_user(name or self.default_user)

    def workdir(self, user: User) -> str:
        """Where commands and kernels start: the configured workdir, else home (if it exists, e.g. not
        for `nobody`), else /."""
        if self.default_workdir:
            return self.default_workdir
        return user.home if os.path.isdir(user.home) else "/"

    def environment(self, user: User, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A child's environment: the agent's, the user's identity, sandbox env vars, then per-call ones."""
        env = _base_environment()
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        env.update(self.env_vars)
        if extra:
            env.update(extra)
        return env

    def token_accepted(self, headers: dict[str, str]) -> bool:
        """Whether a request's `X-Access-Token` lets it use envd (and the code interpreter)."""
        given = headers.get(ACCESS_TOKEN_HEADER)
        if not self.initialized:
            return same_secret(given, self.boot_token)
        return self.access_token is None or same_secret(given, self.access_token)

    def interpreter_accepted(self, headers: dict[str, str]) -> bool:
        """Whether a request may use the code interpreter's port: the access token or the traffic token."""
        if self.token_accepted(headers):
            return True
        return self.initialized and same_secret(headers.get(TRAFFIC_TOKEN_HEADER), self.traffic_token)

    def initialize(self, access_token: str | None, traffic_token: str | None) -> None:
        """What /init does to the credentials: the sandbox's tokens from now on, the boot token dead."""
        self.initialized = True
        self.boot_token = None
        self.access_token = access_token
        self.traffic_token = traffic_token


def same_secret(given: str | None, expected: str | None) -> bool:
    """Constant-time equality; a missing side never matches. Bytes, not str: compare_digest
    refuses non-ASCII strings, and a header may carry any byte."""
    if not given or not expected:
        return False
    return compare_digest(_bytes(given), _bytes(expected))


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
