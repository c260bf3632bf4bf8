"""Import the compiled `cffi_kvm._kvm`, building it into a cache on first use.

`pip install .` builds the extension through setuptools' `cffi_modules`; an
editable checkout (or a checkout run from source) has no compiled module, so it
is built once into `$CUBE_CFFI_CACHE` (default ~/.cache/cube/cffi_kvm, or
/var/cache/cube/cffi_kvm for root) under a name keyed by the binding source, the
installed kernel headers and the Python ABI, then loaded from there.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType


def _cache_dir() -> Path:
    configured = os.environ.get("CUBE_CFFI_CACHE")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/cube/cffi_kvm")
    return Path.home() / ".cache" / "cube" / "cffi_kvm"


def _load_from(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("cffi_kvm._kvm", str(path))
    spec = importlib.util.spec_from_file_location("cffi_kvm._kvm", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["cffi_kvm._kvm"] = module
    return module


def build_cached() -> Path:
    """Compile the extension into the cache (if not there yet) and return its path."""
    from cffi_kvm.build import make_builder, source_fingerprint

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    cache = _cache_dir()
    target = cache / f"_kvm-{source_fingerprint()}{suffix}"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as workdir:
        built = Path(make_builder().compile(tmpdir=workdir, verbose=False))
        # rename is atomic: concurrent builders never load a half-written file.
        os.replace(built, target)
    return target


def load() -> ModuleType:
    try:
        return importlib.import_module("cffi_kvm._kvm")  # present after `pip install .`
    except ImportError:
        return _load_from(build_cached())
