"""What `POST /init` configures and every service reads: env vars, token, default user and workdir."""

from __future__ import annotations

import os

# Constant-time comparison without loading OpenSSL (hmac imports _hashlib): slow under UML.
from _operator import _compare_digest as compare_digest
from dataclasses import dataclass, field

from appliance.guest.users import User, lookup_user

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
    access_token: str | None = None
    # Bumped by each /init that reseeds the kernel's RNG (a clone of a snapshot gets its own
    # seed): running interpreter kernels reseed their own generators before their next run.
    rng_generation: int = 0

    def user(self, name: str | None = None) -> User:
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
        if self.access_token is None:
            return True
        return compare_digest(headers.get("x-access-token", ""), self.access_token)
