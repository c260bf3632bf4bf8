"""`python3 -m appliance.guest [--host H] [--envd-port P] [--interpreter-port P]
[--default-user U] [--no-interpreter]`."""

from __future__ import annotations

import argparse

import trio

from appliance.guest.agent import AgentOptions, run_agent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m appliance.guest", description="Cube sandbox agent")
    parser.add_argument("--host", default="0.0.0.0", help="address both servers listen on")
    parser.add_argument("--envd-port", type=int, default=49983)
    parser.add_argument("--interpreter-port", type=int, default=49999)
    parser.add_argument("--default-user", default="user", help="user for calls that name none")
    parser.add_argument("--no-interpreter", action="store_true", help="serve envd only (no kernels)")
    args = parser.parse_args()
    options = AgentOptions(
        host=args.host,
        envd_port=args.envd_port,
        interpreter_port=args.interpreter_port,
        default_user=args.default_user,
        interpreter=not args.no_interpreter,
    )
    trio.run(run_agent, options)


if __name__ == "__main__":
    main()
