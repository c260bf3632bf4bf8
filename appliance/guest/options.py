"""What the agent serves, and where: set by `python3 -m appliance.guest` or the guest's init."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AgentOptions:
    host: str = "0.0.0.0"
    envd_port: int = 49983
    interpreter_port: int = 49999
    default_user: str = "user"
    interpreter: bool = True
