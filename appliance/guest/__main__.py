"""`python3 -m appliance.guest [--host H] [--envd-port P] [--interpreter-port P]
[--default-user U] [--no-interpreter] [--lazy-default-kernel]`; the guest's init calls `start()` directly.

The boot token is never an argument (argv is world-readable): the kernel command line, or
CUBE_AGENT_TOKEN for an agent run as a host process (options.host_boot_token)."""

from __future__ import annotations

import gc

from appliance.guest.lazy_imports import import_lazily
from appliance.guest.options import AgentOptions, host_boot_token


def start(options: AgentOptions) -> None:
    """Run the agent until it is stopped.

    The cyclic GC stays off until the host has seen the agent ready (agent.py turns it back
    on): start-up only allocates what lives for good, and each collection would walk it all,
    at UML's page-fault prices (init freezes its own objects before forking, for the same reason).
    """
    gc.disable()
    import_lazily()
    import trio

    from appliance.guest.agent import run_agent

    trio.run(run_agent, options)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m appliance.guest", description="Cube sandbox agent")
    parser.add_argument("--host", default="0.0.0.0", help="address both servers listen on")
    parser.add_argument("--envd-port", type=int, default=49983)
    parser.add_argument("--interpreter-port", type=int, default=49999)
    parser.add_argument("--default-user", default="user", help="user for calls that name none")
    parser.add_argument("--no-interpreter", action="store_true", help="serve envd only (no kernels)")
    parser.add_argument(
        "--lazy-default-kernel", action="store_true", help="start the default kernel at its first execution"
    )
    args = parser.parse_args()
    start(
        AgentOptions(
            host=args.host,
            envd_port=args.envd_port,
            interpreter_port=args.interpreter_port,
            default_user=args.default_user,
            interpreter=not args.no_interpreter,
            lazy_default_kernel=args.lazy_default_kernel,
            boot_token=host_boot_token(),
        )
    )


if __name__ == "__main__":
    main()
