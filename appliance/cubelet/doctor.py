"""`cube doctor`: what this host offers sandboxes, and which runtime it gets and why."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.config import Config
from appliance.runtime.detect import detect_host, find_uml_kernel
from appliance.runtime.uml.kernel import refuse_unsafe_kernel


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_kvm(config: Config) -> tuple[Check, str | None, str]:
    """(check, the runtime the host detector picks or None if it is unavailable, its reason)."""
    host = detect_host(config)
    detail = f"{host.kvm}, /dev/kvm {'usable' if host.kvm_usable else 'not usable'}"
    if host.kvm == "PVM":
        detail += f", PVM guest kernel: {host.pvm_guest_kernel or 'not configured'}"
    elif host.kvm in ("VMX", "SVM"):
        detail += f", guest kernel: {host.guest_kernel or 'none (cube image build-kvm-kernel)'}"
    return Check("kvm", host.runtime == "kvm", detail), host.runtime, host.reason


def check_kvm_templates(config: Config) -> Check:
    """The templates the running service's kvm runtime could not boot or restore, which it
    serves on uml instead (recorded in its snapshot store; cleared when it starts)."""
    try:
        unservable = importlib.import_module("appliance.runtime.kvm.template_snapshots").unservable_templates
    except (ImportError, AttributeError) as exc:
        return Check("kvm templates", False, f"cannot read the kvm snapshot store: {exc}")
    found: dict[str, str] = unservable(config.state_dir)
    if not found:
        return Check("kvm templates", True, "no template has fallen back to uml")
    detail = "; ".join(f"{template} runs on uml: {reason}" for template, reason in found.items())
    return Check("kvm templates", False, detail)


def check_uml(config: Config) -> Check:
    """The UML kernel the uml runtime would run (configured, built into the cache, or Debian's),
    and whether sandboxes may run it: a kernel with hostfs (Debian's linux.uml) is refused."""
    found = find_uml_kernel(config)
    if found is None or not os.access(found, os.X_OK):
        return Check("uml", False, "no UML kernel (cube image build-uml-kernel)")
    try:
        refuse_unsafe_kernel(found)
    except RuntimeError as e:
        return Check("uml", False, str(e))
    return Check("uml", True, str(found))


def check_bcc() -> Check:
    try:
        importlib.import_module("bcc")
    except Exception as exc:  # bcc raises assorted errors when libbcc is missing
        return Check("bpf (bcc)", False, f"cannot import bcc: {exc} (apt install python3-bpfcc)")
    return Check("bpf (bcc)", True, "bcc importable")


def check_netns() -> Check:
    unshare = shutil.which("unshare")
    if unshare is None:
        return Check("netns", False, "unshare(1) not found")
    result = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return Check("netns", False, f"cannot create a network namespace: {result.stderr.strip()}")
    return Check("netns", True, "network namespaces usable")


def check_headers() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if build.exists():
        return Check("kernel headers", True, f"{build} -> {build.resolve()}")
    return Check("kernel headers", False, f"{build} missing (bcc cannot compile the network policy)")


def check_cgroups() -> Check:
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if not controllers.exists():
        return Check("cgroups v2", False, "no unified cgroup hierarchy at /sys/fs/cgroup")
    present = controllers.read_text().split()
    missing = [c for c in ("cpu", "memory") if c not in present]
    detail = "controllers: " + " ".join(present)
    return Check("cgroups v2", not missing, detail + (f" (missing {', '.join(missing)})" if missing else ""))


@dataclass(frozen=True)
class Diagnosis:
    checks: list[Check]
    runtime: str | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"checks": [asdict(c) for c in self.checks], "runtime": self.runtime, "reason": self.reason}


def diagnose(config: Config) -> Diagnosis:
    kvm, detected_runtime, detected_reason = check_kvm(config)
    uml = check_uml(config)
    checks = [kvm, uml, check_bcc(), check_netns(), check_headers(), check_cgroups()]
    if detected_runtime == "kvm":
        checks.insert(1, check_kvm_templates(config))
    if detected_runtime is not None:
        return Diagnosis(checks, None if detected_runtime == "none" else detected_runtime, detected_reason)
    if config.runtime in ("auto", "uml") and uml.ok:
        return Diagnosis(checks, "uml", "user-mode Linux is available (KVM kind unknown)")
    return Diagnosis(checks, None, "neither KVM nor user-mode Linux is usable")
