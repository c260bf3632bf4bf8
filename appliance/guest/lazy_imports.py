"""Modules the agent's start-up imports (through trio and the stdlib) but does not use before
envd's first /health answer: stand-ins in sys.modules until an attribute is read.

Under UML every module costs (syscalls, page faults and bytecode all run ~10x slower than on
a host), so readiness comes sooner without them. Two kinds:
- `RARE_MODULES` load OpenSSL (~0.3-1 s of a guest's boot) and serve rare calls only:
  they stay stand-ins until used.
- `DEFERRED_MODULES` are cheap but served requests need them: `preload()` loads them
  once the host has seen the agent ready (the warm pool's `/init` and the first user
  request must not pay for them).
Only top-level modules that none of the start-up imports reads an attribute of at import
time: a stand-in read during import loads at once, gaining nothing
(tests/guest/test_guest_startup.py checks that these stay stand-ins until `preload()`).
"""

from __future__ import annotations

import importlib.util
import sys
import types

RARE_MODULES = ("ssl", "hmac", "hashlib")
DEFERRED_MODULES = (
    "base64",  # Basic auth, /files
    "bz2",  # shutil's archive formats
    "datetime",  # /init's clock
    "fnmatch",
    "idna",  # trio's getaddrinfo
    "ipaddress",  # urllib.parse
    "json",  # every JSON body
    "locale",  # subprocess
    "lzma",  # shutil's archive formats
    "ntpath",  # pathlib's Windows flavour
    "pwd",  # user lookups
    "queue",  # trio's thread cache
    "shutil",
    "subprocess",  # trio.run_process: commands, kernels
    "tempfile",
    "unicodedata",  # idna
    "zlib",
)
# Modules that exist only when their C part was built (not in every image's Python): without it,
# the importers' own `try: import bz2 / except ImportError` must see the failure, not a stand-in.
C_PARTS = {"bz2": "_bz2", "lzma": "_lzma"}


class _LazyModule(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then forwards to it.

    (importlib.util.LazyLoader does not help here: `import name` itself reads the
    module's `__spec__`, which makes LazyLoader load it at once.)
    """

    def __getattr__(self, attribute: str) -> object:
        return getattr(_load(self), attribute)


def _load(module: _LazyModule) -> types.ModuleType:
    real = module.__dict__.get("_real_module")
    if real is None:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
        real = __import__(module.__name__)  # a top-level name: the module itself
        module.__dict__["_real_module"] = real
    return real


def import_lazily(names: tuple[str, ...] = RARE_MODULES + DEFERRED_MODULES) -> None:
    """Register stand-ins that import these modules only when first used."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or (name in C_PARTS and importlib.util.find_spec(C_PARTS[name]) is None):
            continue
        module = _LazyModule(name)
        module.__spec__ = spec
        sys.modules[name] = module


def is_stand_in(name: str) -> bool:
    """Whether `name` is still a stand-in that has not loaded its module."""
    module = sys.modules.get(name)
    return isinstance(module, _LazyModule) and "_real_module" not in module.__dict__


def preload(names: tuple[str, ...] = DEFERRED_MODULES) -> None:
    """Load the stand-ins of `names` now (the agent is idle, just after it was seen ready)."""
    for name in names:
        module = sys.modules.get(name)
        if isinstance(module, _LazyModule):
            try:
                _load(module)
            except ImportError as exc:  # an image's incomplete Python: its first user will say so
                print(f"cube-agent: module {name} not preloaded: {exc}", file=sys.stderr, flush=True)
