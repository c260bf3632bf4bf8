"""`python3 -m appliance.guest [--host H] [--envd-port P] [--interpreter-port P]
[--default-user U] [--no-interpreter]`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types

# Imported by trio (TLS and DTLS streams) but used by the agent only inside calls, if ever:
# their C parts load OpenSSL, which costs ~0.3-1 s of a UML guest's boot. Loaded on first use.
LAZY_MODULES = ("ssl", "hmac", "hashlib")


class _LazyModule(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then forwards to it.

    (importlib.util.LazyLoader does not help here: `import name` itself reads the
    module's `__spec__`, which makes LazyLoader load it at once.)
    """

    def __getattr__(self, attribute: str) -> object:
        real = self.__dict__.get("_real_module")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__dict__["_real_module"] = real
        return getattr(real, attribute)


def import_lazily(names: tuple[str, ...] = LAZY_MODULES) -> None:
    """Register stand-ins that import these modules only when first used."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        module = _LazyModule(name)
        module.__spec__ = spec
        sys.modules[name] = module


def main() -> None:
    import_lazily()
    import trio

    from appliance.guest.agent import AgentOptions, run_agent

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
