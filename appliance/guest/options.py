"""What the agent serves, and where: set by `python3 -m appliance.guest` or the guest's init;
and the boot token the host gave this boot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The guest kernel's command-line word carrying the boot token (the runtimes put it there).
# A dotted word is a module parameter to the kernel: never handed to init as environment.
BOOT_TOKEN_PARAMETER = "cube.agent_token"
# Where an agent started as a host process (tests, `cube bench agent`) finds it instead.
BOOT_TOKEN_ENV = "CUBE_AGENT_TOKEN"
# A template that holds this file starts its default Python kernel at the first execution, not at
# boot: its guests are ready (and pooled) in about a third of the CPU (~1.4 s of ~5 s under UML),
# for templates that mostly run commands (RL tasks: docs/BENCHMARKS.md); its first run_code
# pays the kernel's start instead.
LAZY_DEFAULT_KERNEL_MARKER = "/etc/cube/lazy-default-kernel"


@dataclass(frozen=True)
class AgentOptions:
    host: str = "0.0.0.0"
    envd_port: int = 49983
    interpreter_port: int = 49999
    default_user: str = "user"
    interpreter: bool = True
    lazy_default_kernel: bool = False  # start the default Python kernel at its first execution
    # The host's secret for this boot: until /init, the only credential both ports accept.
    # None: the agent refuses everything but /health (fails closed).
    boot_token: str | None = field(default=None, repr=False)


def host_boot_token() -> str | None:
    """The boot token from the environment (taken out of it: children must not inherit it) or,
    in a guest, from the kernel command line; None if there is none."""
    token = os.environ.pop(BOOT_TOKEN_ENV, "")
    if token:
        return token
    try:
        with open("/proc/cmdline") as f:
            words = f.read().split()
    except OSError:
        return None
    for word in words:
        name, _, value = word.partition("=")
        if name == BOOT_TOKEN_PARAMETER and value:
            return value
    return None


def lazy_default_kernel_wanted() -> bool:
    """Whether this guest's template asks for its default kernel at first use (the marker file)."""
    return os.path.exists(LAZY_DEFAULT_KERNEL_MARKER)
