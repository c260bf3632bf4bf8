"""tests/kvm_host: the kvm runtime end to end, inside an emulated KVM host (tests/emulated_host.py).

Opt-in (`CUBE_KVM_HOST_TEST=1 bash tests/run.sh tests/kvm_host`): the appliance ISO is built
(or taken from /var/cache/cube/kvm-host) and booted under qemu's software emulation of AMD
SVM, which takes minutes before the first test and runs every guest many times slower
than hardware. One emulated host serves the whole session; tests leave it as they found it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulated_host import SOURCE, EmulatedHost, emulated_host, inner_test_tools

OPT_IN = os.environ.get("CUBE_KVM_HOST_TEST") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reasons = []
    if not OPT_IN:
        reasons.append("opt-in: CUBE_KVM_HOST_TEST=1 (boots the appliance ISO in an emulated KVM host)")
    elif os.geteuid() != 0:
        reasons.append("building the appliance ISO needs root")
    elif shutil.which("qemu-system-x86_64") is None or shutil.which("xorriso") is None:
        reasons.append("needs qemu-system-x86 and xorriso")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.slow)
            for reason in reasons:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kvm_host() -> Iterator[EmulatedHost]:
    """The emulated KVM host with this checkout's appliance; the checkout and pytest are also
    mounted read-only inside, at /mnt/cubesrc and /mnt/cubepytest (to run tests/kvm there)."""
    with emulated_host(shares={"cubesrc": SOURCE, "cubepytest": inner_test_tools()}) as host:
        yield host


@pytest.fixture(scope="session")
def kvm_host_api_key(kvm_host: EmulatedHost) -> str:
    return kvm_host.api_key()


@pytest.fixture
def kvm_host_sdk(
    kvm_host: EmulatedHost, kvm_host_api_key: str, monkeypatch: pytest.MonkeyPatch
) -> EmulatedHost:
    """The E2B SDKs pointed at the emulated host's forwarded API port (single-port mode)."""
    monkeypatch.setenv("E2B_API_URL", kvm_host.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", kvm_host.url)
    monkeypatch.setenv("E2B_API_KEY", kvm_host_api_key)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return kvm_host
