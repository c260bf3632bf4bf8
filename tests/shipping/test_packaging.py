"""Packaging that matches the imports: the wheel, installed the way the installer installs it
(a fresh `--system-site-packages` venv, for Debian's bcc, with the bench extra), imports every
module of appliance and cffi_kvm from its declared dependencies, and its commands run.

A new user following the README once met `cube bench exec` failing with
`ModuleNotFoundError: e2b_code_interpreter`, and template builds needed h2 that only the test
extra brought: these tests fail on any such undeclared import. The wheel and its venv are
made once for the module, in pytest's tmp; pip fetches the dependencies from PyPI (its cache
makes a second run quick).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from wheel_builds import build_wheel, copy_checkout

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 1800  # every dependency of a fresh venv on a shared, slow machine
# Guest modules that need packages only the guest has (appliance/guest/DEBIAN_PACKAGES):
# module -> the packages whose absence is the only acceptable import failure.
GUEST_ONLY = {
    "appliance.guest.jupyter": {"zmq"},  # the Jupyter wire protocol over ZMQ (python3-zmq)
    "appliance.guest.python_kernel": {"zmq"},  # starts ipykernel and talks to it over ZMQ
    "appliance.guest.kernel_charts": {"IPython", "traitlets"},  # runs inside each IPython kernel
}
# Third-party modules that come from the system, not from the venv: bcc is Debian's
# python3-bpfcc (installer/install.sh), the reason the venv sees system site-packages.
FROM_THE_SYSTEM = {"bcc"}

# Run by the venv's python: every module of both packages, imported one by one.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import appliance, cffi_kvm
failures = {}
for package in (appliance, cffi_kvm):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name.rsplit(".", 1)[-1] == "__main__":
            continue  # runs the agent when imported: `python -m appliance.guest` only
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            failures[module.name] = [type(exc).__name__, getattr(exc, "name", None), str(exc)]
print(json.dumps({"file": appliance.__file__, "failures": failures}))
"""

# Run by the venv's python: where each third-party module the host code imports comes from.
# The host code: every module but the guest's (which runs on the guest's own packages).
ORIGINS = """
import ast, importlib.util, json, pathlib, sys
import appliance, cffi_kvm
from appliance.templates.guest_setup import AGENT_DEPENDENCIES
names = set(AGENT_DEPENDENCIES)  # template builds copy these from the host's installation
for package in (appliance, cffi_kvm):
    root = pathlib.Path(package.__file__).parent
    for path in root.rglob("*.py"):
        if "guest" in path.relative_to(root).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
names -= set(sys.stdlib_module_names) | {"__future__", "appliance", "cffi_kvm"}
origins = {}
for name in sorted(names):
    spec = importlib.util.find_spec(name)
    origins[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations)[0])
print(json.dumps({"prefix": sys.prefix, "origins": origins}))
"""


def _clean_env() -> dict[str, str]:
    """This process's environment without what would put the checkout on the venv's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("packaging")
    tree = work / "src"
    copy_checkout(tree)
    wheel = build_wheel(tree, work / "wheel")
    target = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(target)], check=True)
    installed = subprocess.run(
        [str(target / "bin/pip"), "install", "-q", "--disable-pip-version-check", f"{wheel}[bench]"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=work,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    yield target


def _run_in(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # From the venv's own directory: the checkout must not be what gets imported.
    return subprocess.run(
        argv, capture_output=True, text=True, env=_clean_env(), cwd=venv, timeout=300, check=False
    )


def test_every_module_imports_from_the_installed_wheel(venv: Path) -> None:
    ran = _run_in(venv, str(venv / "bin/python"), "-c", IMPORT_ALL)
    assert ran.returncode == 0, ran.stderr[-4000:]
    result = json.loads(ran.stdout)
    assert result["file"].startswith(str(venv)), result["file"]  # the wheel's copy, not the checkout
    unexpected = {
        module: failure
        for module, failure in result["failures"].items()
        if not (failure[0] == "ModuleNotFoundError" and failure[1] in GUEST_ONLY.get(module, set()))
    }
    assert unexpected == {}


def test_every_third_party_import_is_a_declared_dependency(venv: Path) -> None:
    """Installed into the venv by pip from the wheel's metadata: not found on the system by luck."""
    ran = _run_in(venv, str(venv / "bin/python"), "-c", ORIGINS)
    assert ran.returncode == 0, ran.stderr[-4000:]
    result = json.loads(ran.stdout)
    origins: dict[str, str | None] = result["origins"]
    assert {"e2b_code_interpreter", "h2", "werkzeug", "wsproto", "quart"} <= origins.keys()
    undeclared = {
        name: origin
        for name, origin in origins.items()
        if name not in FROM_THE_SYSTEM and (origin is None or not origin.startswith(result["prefix"]))
    }
    assert undeclared == {}


def test_the_commands_run_from_the_installed_wheel(venv: Path) -> None:
    cube = venv / "bin/cube"
    top = _run_in(venv, str(cube), "--help")
    assert top.returncode == 0, top.stderr
    assert "bench" in top.stdout and "sandbox" in top.stdout
    bench = _run_in(venv, str(cube), "bench", "--help")
    assert bench.returncode == 0, bench.stderr
    for command in ("exec", "agent", "files", "all"):
        assert f"  {command} " in bench.stdout, bench.stdout
    assert _run_in(venv, str(venv / "bin/cubemastercli"), "--version").returncode == 0
