"""`cube doctor` checks for CubeVS: can this host build and enforce sandbox networks?"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import uuid
from pathlib import Path

from appliance.net import netns
from appliance.net.ebpf import BPF_FS

Check = tuple[str, bool, str]


def _headers() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if (build / "include").is_dir():
        target = os.path.realpath(build)
        return "kernel headers", True, f"{build} -> {target}"
    return (
        "kernel headers",
        False,
        f"{build} missing: run appliance/net/install_headers.sh (links Debian's cloud-amd64 headers)",
    )


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        hint = "apt install python3-bpfcc; the venv needs system site-packages"
        return "bcc", False, f"cannot import bcc ({e}): {hint}"
    return "bcc", True, "python3-bpfcc importable"


def _bpf_fs() -> Check:
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == str(BPF_FS) and line.split()[2] == "bpf" for line in f)
    if mounted:
        return "bpf fs", True, f"bpffs mounted on {BPF_FS}"
    return "bpf fs", BPF_FS.is_dir(), f"bpffs not mounted on {BPF_FS} (CubeVS mounts it at start)"


def _binary(name: str, args: list[str]) -> Check:
    path = shutil.which(name)
    if path is None:
        return name, False, f"{name} not found"
    result = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
    detail = (result.stdout or result.stderr).strip().splitlines()[0:1]
    return name, result.returncode == 0, detail[0] if detail else path


def _netns() -> Check:
    name = f"cube-doctor-{uuid.uuid4().hex[:8]}"
    try:
        netns.prepare_netns_dir()
        with netns.created(name):
            pass
    except OSError as e:
        return "netns", False, f"cannot create a network namespace: {e}"
    finally:
        netns.remove(name)
    return "netns", True, "network namespaces can be created"


def doctor_checks() -> list[Check]:
    """(name, ok, detail) for everything CubeVS needs; eBPF enforcement needs all but `nft`."""
    return [
        _headers(),
        _bcc(),
        _bpf_fs(),
        _binary("tc", ["-V"]),
        _binary("nft", ["--version"]),
        _netns(),
    ]
