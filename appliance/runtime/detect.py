"""What isolation this host can offer, and which runtime a sandbox gets (and why).

`cube doctor` prints `detect_host().as_dict()`; the bench reports record it.
KVM's flavour is read from the loaded module (kvm_intel → VMX, kvm_amd → SVM,
kvm_pvm → PVM): on PVM an ordinary guest kernel's ring 0 is emulated (~1000x
slower), so only a kernel built with CONFIG_PVM_GUEST is worth booting there.
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


def detect_host(config: Config | None = None, *, kvm_device: Path = Path("/dev/kvm")) -> HostVirt:
    config = config or load_config()
    kind = kvm_kind()
    usable = kvm_device.exists() and _kvm_usable(kvm_device)
    uml = find_uml_kernel(config)
    pvm_kernel = config.kvm_guest_kernel if kind == "PVM" else None

    if not usable:
        kvm_ok, why = False, f"{kvm_device} is missing or not read-write for this user"
    elif kind in ("VMX", "SVM"):
        kvm_ok, why = True, f"hardware virtualization ({kind}) through {kvm_device}"
    elif kind == "PVM":
        if pvm_kernel is not None and pvm_kernel.exists():
            kvm_ok, why = True, f"KVM is PVM and a PVM guest kernel is configured ({pvm_kernel})"
        else:
            kvm_ok = False
            why = (
                "KVM is PVM: an ordinary guest kernel's ring 0 is emulated (~1000x slower) and no "
                "PVM guest kernel (CONFIG_PVM_GUEST) is configured as kvm_guest_kernel"
            )
    else:
        kvm_ok, why = False, f"{kvm_device} exists but no KVM module (kvm_intel/kvm_amd/kvm_pvm) is loaded"

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
        pvm_guest_kernel=str(pvm_kernel) if pvm_kernel else None,
        runtime=runtime,
        reason=reason,
    )
