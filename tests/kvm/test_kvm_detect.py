"""Host detection: which KVM flavour, and which runtime a host gets and why.

The inputs are real, only relocated: a /sys/module tree with the KVM module the kernel
would list, a device node with /dev/kvm's numbers (opening it opens this host's real
KVM device) or a node no driver serves, and kernel files in the cache layout the
builds write. `auto` must pick kvm only where it can boot a sandbox (KVM usable and a
guest kernel to boot), fall back to uml otherwise with a reason that says what to do,
and a config that asks for kvm where it cannot run must be refused at start.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Config, load_config
from appliance.cubelet.runtimes import RuntimeUnavailable, choose_runtime_name
from appliance.runtime import detect

KVM_DEVICE = os.makedev(10, 232)  # misc device 232: /dev/kvm
NO_DRIVER = os.makedev(10, 253)  # a misc minor nothing registers: open() fails with ENODEV


def config_for(tmp_path: Path, **overrides: object) -> Config:
    values: dict[str, object] = {"cache_dir": tmp_path / "cache", "uml_kernel": None, **overrides}
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
def sys_module(tmp_path: Path) -> Path:
    (tmp_path / "sys-module" / "kvm").mkdir(parents=True)
    return tmp_path / "sys-module"


def device_node(tmp_path: Path, numbers: int) -> Path:
    """A device node for `numbers`; under /dev when tmp_path's filesystem is mounted nodev (a
    live system's /tmp), where a node could not be opened at all."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    name = f"cubetest-{os.getpid()}-{os.major(numbers)}-{os.minor(numbers)}"
    directory = Path("/dev") if os.statvfs(tmp_path).f_flag & os.ST_NODEV else tmp_path
    path = directory / name
    os.mknod(path, 0o600 | stat.S_IFCHR, numbers)
    NODES.append(path)
    return path


NODES: list[Path] = []


@pytest.fixture(autouse=True)
def remove_device_nodes() -> Iterator[None]:
    yield
    while NODES:
        NODES.pop().unlink(missing_ok=True)


def built_guest_kernel(cache_dir: Path) -> Path:
    """Where image/kernel/build.py puts the microVM kernel."""
    vmlinux = cache_dir / "kernels" / "microvm-0123456789abcdef" / "vmlinux"
    vmlinux.parent.mkdir(parents=True)
    vmlinux.write_bytes(b"\x7fELF")
    return vmlinux


def uml_kernel(tmp_path: Path) -> Path:
    path = tmp_path / "linux"
    path.write_bytes(b"\x7fELF")
    return path


@pytest.mark.parametrize(("module", "kind"), [("kvm_intel", "VMX"), ("kvm_amd", "SVM"), ("kvm_pvm", "PVM")])
def test_kvm_kind_from_the_loaded_module(tmp_path: Path, module: str, kind: str) -> None:
    (tmp_path / module).mkdir()
    assert detect.kvm_kind(tmp_path) == kind


def test_no_kvm_module_means_none(tmp_path: Path) -> None:
    assert detect.kvm_kind(tmp_path) == "none"


def test_svm_host_with_the_guest_kernel_gets_kvm(tmp_path: Path, sys_module: Path) -> None:
    (sys_module / "kvm_amd").mkdir()
    config = config_for(tmp_path, uml_kernel=uml_kernel(tmp_path))
    vmlinux = built_guest_kernel(config.cache_dir)
    host = detect.detect_host(config, kvm_device=device_node(tmp_path, KVM_DEVICE), sys_module=sys_module)
    assert (host.kvm, host.kvm_usable, host.runtime, host.guest_kernel) == ("SVM", True, "kvm", str(vmlinux))
    assert "hardware virtualization, SVM" in host.reason
    assert choose_runtime_name(config, host) == "kvm"


def test_svm_host_without_a_guest_kernel_falls_back_to_uml_and_says_how_to_build_it(
    tmp_path: Path, sys_module: Path
) -> None:
    (sys_module / "kvm_amd").mkdir()
    uml = uml_kernel(tmp_path)
    kvm_device = device_node(tmp_path, KVM_DEVICE)
    host = detect.detect_host(
        config_for(tmp_path, uml_kernel=uml), kvm_device=kvm_device, sys_module=sys_module
    )
    assert (host.kvm, host.kvm_usable, host.runtime, host.guest_kernel) == ("SVM", True, "uml", None)
    assert "no microVM guest kernel" in host.reason and "cube image build-kvm-kernel" in host.reason
    assert str(uml) in host.reason

    # Asking for kvm there is refused at start, with the same reason (never a 500 per create).
    config = config_for(tmp_path, uml_kernel=uml, runtime="kvm")
    host = detect.detect_host(config, kvm_device=kvm_device, sys_module=sys_module)
    assert host.runtime == "none"
    with pytest.raises(RuntimeUnavailable, match="cube image build-kvm-kernel"):
        choose_runtime_name(config, host)


def test_a_kvm_device_that_does_not_open_falls_back_to_uml(tmp_path: Path, sys_module: Path) -> None:
    (sys_module / "kvm_intel").mkdir()
    config = config_for(tmp_path, uml_kernel=uml_kernel(tmp_path))
    built_guest_kernel(config.cache_dir)
    host = detect.detect_host(config, kvm_device=device_node(tmp_path, NO_DRIVER), sys_module=sys_module)
    assert (host.kvm, host.kvm_usable, host.runtime) == ("VMX", False, "uml")
    assert "not read-write" in host.reason


def test_pvm_boots_only_a_configured_pvm_kernel(tmp_path: Path, sys_module: Path) -> None:
    (sys_module / "kvm_pvm").mkdir()
    uml = uml_kernel(tmp_path)
    config = config_for(tmp_path, uml_kernel=uml)
    built_guest_kernel(config.cache_dir)  # a microVM kernel: no PVM guest, never booted on PVM
    kvm_device = device_node(tmp_path, KVM_DEVICE)
    host = detect.detect_host(config, kvm_device=kvm_device, sys_module=sys_module)
    assert (host.kvm, host.runtime, host.uml_kernel, host.guest_kernel) == ("PVM", "uml", str(uml), None)
    assert "CONFIG_PVM_GUEST" in host.reason
    assert host.as_dict()["runtime"] == "uml"

    pvm_kernel = tmp_path / "vmlinux-pvm"
    pvm_kernel.touch()
    config = config_for(tmp_path, uml_kernel=uml, kvm_guest_kernel=pvm_kernel)
    host = detect.detect_host(config, kvm_device=kvm_device, sys_module=sys_module)
    assert (host.runtime, host.pvm_guest_kernel, host.guest_kernel) == (
        "kvm",
        str(pvm_kernel),
        str(pvm_kernel),
    )


def test_no_kvm_and_no_uml_is_refused_at_start(
    tmp_path: Path, sys_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detect, "DEBIAN_UML", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))  # no linux.uml on it
    config = config_for(tmp_path)
    host = detect.detect_host(config, kvm_device=tmp_path / "no-kvm", sys_module=sys_module)
    assert host.runtime == "none" and "user-mode-linux" in host.reason
    with pytest.raises(RuntimeUnavailable, match="user-mode-linux"):
        choose_runtime_name(config, host)


def test_this_hosts_own_inputs() -> None:
    """This host as it is: whatever it has, `auto` never picks kvm without a kernel to boot."""
    config = load_config()
    host = detect.detect_host(config)
    if host.runtime == "kvm":
        assert host.kvm_usable and host.guest_kernel is not None
    if host.kvm == "PVM" and config.kvm_guest_kernel is None:
        assert host.runtime != "kvm"
        # The reason names what ruled kvm out: PVM, or (the developer loop runs as an
        # unprivileged user) a /dev/kvm this user cannot open.
        assert "PVM" in host.reason if host.kvm_usable else "/dev/kvm" in host.reason
