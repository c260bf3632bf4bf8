"""What isolation this host can offer, and which runtime a sandbox gets (and why).

`cube doctor` prints `detect_host().as_dict()`; the bench reports record it.
KVM's flavour is read from the loaded module (kvm_intel → VMX, kvm_amd → SVM,
kvm_pvm → PVM): on PVM an ordinary guest kernel's ring 0 is emulated (~1000x
slower), so only a kernel built with CONFIG_PVM_GUEST is worth booting there.
`auto` picks kvm only where it can boot a sandbox: KVM usable and a guest kernel to
boot (a VMX/SVM host without the microVM kernel gets uml, and says how to build it).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.config import Config, load_config

log = logging.getLogger(__name__)

_KVM_MODULES = (("kvm_intel", "VMX"), ("kvm_amd", "SVM"), ("kvm_pvm", "PVM"))
DEBIAN_UML = Path("/usr/bin/linux.uml")


@dataclass(frozen=True)
class HostVirt:
    kvm: str  # VMX | SVM | PVM | none
    kvm_usable: bool  # /dev/kvm opens read-write for this process
    uml_available: bool
    uml_kernel: str | None  # the UML kernel the uml runtime would run
    pvm_guest_kernel: str | None  # configured kvm_guest_kernel, when the host is PVM
    guest_kernel: str | None  # the kernel the kvm runtime would boot (None: it cannot boot any)
    runtime: str  # kvm | uml | none
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def kvm_kind(sys_module: Path = Path("/sys/module")) -> str:
    for module, kind in _KVM_MODULES:
        if (sys_module / module).exists():
            return kind
    return "none"


def _kvm_usable(device: Path) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def find_uml_kernel(config: Config) -> Path | None:
    """Configured kernel, else the one built from this linux-source and image/uml/sandbox.config,
    else (stale, with a warning) the newest one in the cache, else Debian's linux.uml."""
    if config.uml_kernel is not None:
        return config.uml_kernel if config.uml_kernel.exists() else None
    from appliance.runtime.uml.kernel import find_kernel_source, kernel_key, kernel_path

    try:
        current: Path | None = kernel_path(config.cache_dir, kernel_key(find_kernel_source()))
    except (RuntimeError, OSError):
        current = None  # no linux-source here (e.g. the ISO): whatever was built for it
    if current is not None and current.exists():
        return current
    built = sorted((config.cache_dir / "kernels").glob("uml-*/linux"), key=lambda p: p.stat().st_mtime)
    if built:
        if current is not None:
            # An older config's kernel lacks what the current one fixes (e.g. the boot stall).
            log.warning("UML kernel %s is stale: run `cube image build-uml-kernel`", built[-1])
        return built[-1]
    if DEBIAN_UML.exists():
        return DEBIAN_UML
    on_path = shutil.which("linux.uml")
    return Path(on_path) if on_path else None


def find_guest_kernel(config: Config) -> Path | None:
    """The kvm runtime's guest kernel: the configured one, else the newest microVM kernel
    image/kernel/build.py put into the cache (`cube image build-kvm-kernel`)."""
    if config.kvm_guest_kernel is not None:
        return config.kvm_guest_kernel if config.kvm_guest_kernel.exists() else None
    built = sorted((config.cache_dir / "kernels").glob("microvm-*/vmlinux"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else None


def _kvm_verdict(kind: str, usable: bool, device: Path, guest_kernel: Path | None) -> tuple[bool, str]:
    """Whether the kvm runtime can boot sandboxes here, and why (not)."""
    if not usable:
        return False, f"{device} is missing or not read-write for this user"
    if kind == "PVM":
        # The microVM kernel built here is no PVM guest: only a configured kernel counts.
        if guest_kernel is None:
            return False, (
                "KVM is PVM: an ordinary guest kernel's ring 0 is emulated (~1000x slower) and no "
                "PVM guest kernel (CONFIG_PVM_GUEST) is configured as kvm_guest_kernel"
            )
        return True, f"KVM is PVM and a PVM guest kernel is configured ({guest_kernel})"
    if kind not in ("VMX", "SVM"):
        return False, f"{device} exists but no KVM module (kvm_intel/kvm_amd/kvm_pvm) is loaded"
    if guest_kernel is None:
        return False, (
            f"KVM is usable (hardware virtualization, {kind}) but there is no microVM guest kernel: "
            "build it with `cube image build-kvm-kernel` or set kvm_guest_kernel"
        )
    return True, (
        f"KVM is usable (hardware virtualization, {kind}) through {device}; guest kernel: {guest_kernel}"
    )


def detect_host(
    config: Config | None = None,
    *,
    kvm_device: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
) -> HostVirt:
    """What this host offers and which runtime `runtime = auto` gets. Inputs are read for
    real: the loaded KVM module under `sys_module`, whether `kvm_device` opens read-write,
    the guest and UML kernels the config names or the cache holds."""
    config = config or load_config()
    kind = kvm_kind(sys_module)
    usable = kvm_device.exists() and _kvm_usable(kvm_device)
    uml = find_uml_kernel(config)
    if kind == "PVM":
        configured = config.kvm_guest_kernel
        guest_kernel = configured if configured is not None and configured.exists() else None
    else:
        guest_kernel = find_guest_kernel(config)
    kvm_ok, why = _kvm_verdict(kind, usable, kvm_device, guest_kernel)

    if config.runtime == "kvm":
        runtime, reason = (
            ("kvm", f"configured runtime=kvm; {why}") if kvm_ok else ("none", f"runtime=kvm but {why}")
        )
    elif config.runtime == "uml":
        runtime = "uml" if uml else "none"
        reason = f"configured runtime=uml ({uml})" if uml else "runtime=uml but no UML kernel was found"
    elif kvm_ok:
        runtime, reason = "kvm", why
    elif uml is not None:
        runtime, reason = "uml", f"{why}; using user-mode Linux ({uml})"
    else:
        runtime, reason = "none", f"{why}; and no UML kernel (install user-mode-linux)"

    return HostVirt(
        kvm=kind,
        kvm_usable=usable,
        uml_available=uml is not None,
        uml_kernel=str(uml) if uml else None,
        pvm_guest_kernel=str(guest_kernel) if kind == "PVM" and guest_kernel else None,
        guest_kernel=str(guest_kernel) if guest_kernel else None,
        runtime=runtime,
        reason=reason,
    )
