"""The developer loop (README): `pytest -m "not uml and not kvm and not root and not slow"` keeps
every test that needs root, a guest or a registry out, and the pure tests in.

tests/run.sh runs that selection as `nobody`, which is what keeps it green; this checks what it
selects, so that a lost marker rule shows here, at collection, not as a hang in a user's loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEV_LOOP = "not uml and not kvm and not root and not slow"
CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def selected() -> set[str]:
    """The node ids the developer loop runs (collected once: collecting the suite takes seconds)."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only", "-m", DEV_LOOP],
        cwd=CHECKOUT,
        env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return {line for line in collected.stdout.splitlines() if "::" in line}


def test_the_loop_leaves_out_what_needs_root_a_guest_or_a_registry(selected: set[str]) -> None:
    needs_more = (
        "tests/uml/",
        "tests/e2e/",
        "tests/iso/",
        "tests/net/test_enforcement.py::",  # CubeVS
        "tests/guest/test_guest_users.py::",  # other users
        "tests/templates/test_unpack.py::test_tree_never_opens_what_is_not_a_regular_file",  # chown
        "tests/kvm/test_kvm_machine.py::",  # /dev/kvm
        "tests/shipping/test_packaging.py::",  # PyPI
        "tests/shipping/test_systemd_unit.py::test_cube_serve_",  # the real service
        "tests/guest/test_guest_template.py::",  # a UML guest of the default template
        "tests/kvm/test_kvm_fallback.py::",  # a UML guest serves the create
        "tests/kvm/test_kvm_detect.py::test_pvm_boots_only_a_configured_pvm_kernel",  # mknod
    )
    assert [test for test in selected if test.startswith(needs_more)] == []
    assert not any(test.endswith("_uml.py") or "_uml.py::" in test for test in selected)


def test_the_loop_keeps_the_pure_tests(selected: set[str]) -> None:
    for folder in ("api", "cubelet", "guest", "templates", "net", "bench", "shipping"):
        assert any(test.startswith(f"tests/{folder}/") for test in selected), folder
    assert "tests/net/test_policy.py::test_limit_per_list" in selected
    assert len(selected) > 300
