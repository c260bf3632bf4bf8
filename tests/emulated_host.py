"""The appliance ISO booted in qemu (software emulation) and driven from this machine
(tests/kvm_host, tests/iso).

With `-cpu qemu64,+svm,+npt` (the default) it is an emulated KVM host: qemu emulates AMD
SVM with nested paging, the appliance's stock Debian kernel loads kvm_amd there and the
appliance picks the `kvm` runtime by itself, as on a server.

- `appliance_iso()`: the ISO of this checkout (`image/iso/build.sh`), its kernel and
  initrd, cached in /var/cache/cube/kvm-host/iso-<key> where the key is a digest of
  everything that goes into it (the checkout's appliance, cffi_kvm, image, systemd
  trees and packaging, the template image and the kernels it ships). Its default
  template is built from this checkout too (the guest agent is in it), in
  /var/cache/cube/kvm-host/template-state, cached by recipe and agent digest. The Debian
  base and the template layer have their own caches (/var/cache/cube/iso).
- `EmulatedHost`: boots that ISO's kernel and root filesystem directly (no firmware, no
  boot menu: faster), its CUBE-DATA on a fresh sparse disk, first-boot configuration by
  fw_cfg (no `runtime` key: the appliance chooses), the API port forwarded to a loopback
  port of this machine. Its user-mode network is `restrict=on`: the only way in is the
  forward, there is no way out (no route to anything outside this machine).
  A test-only control channel (a virtio-serial port whose outer end is a unix socket in
  the host's private directory) runs shell commands inside: `emulated_host_control.py`,
  handed over by fw_cfg and started by the kernel command line's `systemd.run`. Nothing
  of it is in the ISO.
- Every wait is bounded; `stop()` kills qemu and the machine's directory is deleted.
  qemu runs under `nice`: the machine is shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from freeports import free_port

from appliance.config import Config, load_config

SOURCE = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CUBE_KVM_HOST_CACHE", "/var/cache/cube/kvm-host"))
CONTROL_AGENT = Path(__file__).with_name("emulated_host_control.py")
SVM_CPU = "qemu64,+svm,+npt"
# What goes into the ISO from the checkout (image/iso/build.sh copies these).
ISO_INPUTS = ("appliance", "cffi_kvm", "image", "systemd", "pyproject.toml", "setup.py", "README.md")
BUILD_TIMEOUT_S = 90 * 60  # a cold Debian base layer and guest kernel on two busy cores
MEMORY_MB = 6144
# One emulated CPU. With two (MTTCG), ten sandboxes created at once hung the emulated host:
# a TLB-shootdown IPI to the CPU that was running a nested guest (svm_vcpu_run) went
# unanswered for 21 s (RCU stall), then "corrupted stack end detected inside scheduler"
# panicked it (qemu 7.2's TCG nested SVM). On one CPU no shootdown needs an IPI.
CPUS = int(os.environ.get("CUBE_KVM_HOST_CPUS", "1"))
# Bounds, not expectations: the ISO under TCG reached /health in ~3 min on an idle
# 2-core host and in 17-28 min at load 10-24 (tests/iso).
BOOT_TIMEOUT_S = 45 * 60
CONTROL_PORT = "cube.test"
# First-boot configuration: no `runtime` key (auto: the appliance picks kvm by itself), no
# warm pool (the emulated CPUs boot only what a test asks for) and the guest limits an
# emulated host needs (a kvm guest boots in minutes under TCG; so does a UML guest).
SEED_CONFIG = """\
api_host = "0.0.0.0"
api_port = 3000
default_template = "code-interpreter"
pool_size = 0
kvm_boot_timeout_s = 3600
uml_first_output_timeout_s = 3600
uml_boot_timeout_s = 3600
guest_agent_timeout_s = 600
"""


def _digest_tree(digest: hashlib._Hash, path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if "__pycache__" in file.parts or file.suffix in (".so", ".pyc"):
            continue
        digest.update(str(file.relative_to(SOURCE)).encode() + b"\0" + file.read_bytes())


def template_config() -> Config:
    """Where the ISO's default template is built from this checkout (its guest agent included),
    apart from the host's own template store."""
    return Config(state_dir=CACHE / "template-state", cache_dir=load_config().cache_dir)


def default_template() -> Path:
    """The default template of this checkout: cached by its recipe and agent digest (a rebuild
    unpacks the cached Debian tree and writes the ext4 image: minutes)."""
    from appliance.templates.default import build_default_template

    return trio.run(build_default_template, template_config()).directory


def iso_key(template: Path) -> str:
    digest = hashlib.sha256()
    for name in ISO_INPUTS:
        _digest_tree(digest, SOURCE / name)
    config = load_config()
    for path in (template / "template.json", template / "rootfs.ext4"):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for kernel in sorted((config.cache_dir / "kernels").glob("uml-*/linux")):
        digest.update(f"{kernel}:{kernel.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class IsoArtifacts:
    iso: Path
    kernel: Path  # the ISO's /live/vmlinuz
    initrd: Path  # the ISO's /live/initrd.img


def appliance_iso() -> IsoArtifacts:
    """The ISO of this checkout and its kernel and initrd: from the cache, else built (slow)."""
    template = default_template()
    directory = CACHE / f"iso-{iso_key(template)}"
    artifacts = IsoArtifacts(directory / "cube.iso", directory / "vmlinuz", directory / "initrd.img")
    if all(p.exists() for p in (artifacts.iso, artifacts.kernel, artifacts.initrd)):
        return artifacts
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="iso-building-", dir=CACHE))
    try:
        config = load_config()
        env = {
            **os.environ,
            "CUBE_ISO_CACHE": str(config.cache_dir / "iso"),
            "CUBE_CACHE_DIR": str(config.cache_dir),
            "CUBE_TEMPLATES_DIR": str(template.parent),
            "CUBE_PYTHON": sys.executable,
        }
        started = time.monotonic()
        build = [
            "nice",
            "-n",
            "10",
            "bash",
            str(SOURCE / "image" / "iso" / "build.sh"),
            str(staging / "cube.iso"),
        ]
        subprocess.run(build, env=env, check=True, timeout=BUILD_TIMEOUT_S)
        extract = ["xorriso", "-osirrox", "on", "-indev", str(staging / "cube.iso")]
        extract += ["-extract", "/live/vmlinuz", str(staging / "vmlinuz")]
        extract += ["-extract", "/live/initrd.img", str(staging / "initrd.img")]
        subprocess.run(extract, check=True, capture_output=True, timeout=600)
        print(f"appliance ISO built in {time.monotonic() - started:.0f} s: {directory}")
        for old in CACHE.glob("iso-*"):  # one ISO at a time: each is ~1 GB
            if old.is_dir() and old != directory and not old.name.startswith("iso-building-"):
                shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return artifacts


# What running pytest inside needs beside the appliance's own environment (trio, httpx...).
PYTEST_PACKAGES = ("pytest", "pytest-trio", "pluggy", "iniconfig", "packaging", "pygments")


def inner_test_tools() -> Path:
    """pytest and pytest-trio, at the versions this machine's tests use, installed (from PyPI)
    into a directory of their own that a share hands to the emulated host, with this
    machine's static busybox; cached."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in PYTEST_PACKAGES]
    contents = " ".join([*pins, f"busybox:{Path('/bin/busybox').stat().st_size}"])
    directory = CACHE / f"pytest-{hashlib.sha256(contents.encode()).hexdigest()[:16]}"
    if not directory.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="pytest-installing-", dir=CACHE))
        try:
            install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging)]
            subprocess.run([*install, *pins], check=True, timeout=600)
            # tests/kvm's initramfs guests need a static busybox; the appliance has Debian's dynamic one.
            shutil.copy2("/bin/busybox", staging / "busybox")
            for old in CACHE.glob("pytest-*"):
                if old.is_dir() and not old.name.startswith("pytest-installing-"):
                    shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        assert self.status == 0, f"exit status {self.status}\n{self.stdout}\n{self.stderr}"
        return self


@dataclass
class EmulatedHost:
    artifacts: IsoArtifacts
    workdir: Path
    # qemu64 (not max: ERMS makes the kernel's page copies byte loops under TCG); by default
    # with AMD SVM and nested paging: kvm_amd loads, /dev/kvm behaves like a server's.
    cpu: str = SVM_CPU
    seed_config: str = SEED_CONFIG  # first-boot appliance.toml, handed over by fw_cfg
    # Directories of this machine shown read-only inside, at /mnt/<tag> (9p).
    shares: dict[str, Path] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    # More for the appliance: kernel command-line words (cube.cluster=new), fw_cfg entries
    # (name under opt/cube/ -> file), options of the user-mode network (guestfwd, net=...).
    cmdline: tuple[str, ...] = ()
    fw_cfg: dict[str, Path] = field(default_factory=dict)
    nic_options: str = ""
    memory_mb: int = MEMORY_MB
    process: subprocess.Popen[bytes] | None = None
    _control: socket.socket | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _received: bytes = b""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    # ---- life -----------------------------------------------------------------

    def start(self) -> None:
        disk = self.workdir / "data.raw"
        with disk.open("wb") as sparse:  # CUBE-DATA: an empty 24 GiB disk, costs what is written
            sparse.truncate(24 << 30)
        seed = self.workdir / "appliance.toml"
        seed.write_text(self.seed_config)
        # The kernel command line's command runs as a oneshot job that boot waits for: it
        # starts the agent as a service of its own and returns.
        run_agent = (
            "/bin/sh -c 'modprobe qemu_fw_cfg; "
            "cp /sys/firmware/qemu_fw_cfg/by_name/opt/cube-test/control.py/raw /run/cube-test-control.py; "
            "systemd-run --unit=cube-test-control python3 /run/cube-test-control.py'"
        )
        cmdline = " ".join(
            [
                "boot=live components console=ttyS0,115200n8",
                # systemd.run alone would boot into kernel-command-line.target instead of the
                # appliance's multi-user.target: boot that, wanting the command's service.
                "systemd.unit=multi-user.target systemd.wants=kernel-command-line.service",
                "systemd.run_success_action=none systemd.run_failure_action=none",
                f'"systemd.run={run_agent}"',
                *self.cmdline,
            ]
        )
        api_forward = f"hostfwd=tcp:127.0.0.1:{self.port}-:3000"
        argv = [
            "nice", "-n", "10", "qemu-system-x86_64",
            "-machine", "q35", "-accel", "tcg,thread=multi",
            "-cpu", self.cpu, "-smp", str(CPUS), "-m", str(self.memory_mb),
            "-display", "none", "-vga", "none", "-no-reboot",
            "-serial", f"file:{self.serial_log}",
            "-monitor", f"unix:{self.workdir / 'monitor.sock'},server=on,wait=off",
            "-kernel", str(self.artifacts.kernel), "-initrd", str(self.artifacts.initrd), "-append", cmdline,
            "-device", "virtio-rng-pci",
            "-drive", f"file={self.artifacts.iso},if=virtio,format=raw,readonly=on",
            "-drive", f"file={disk},if=virtio,format=raw",
            "-nic", f"user,model=virtio-net-pci,restrict=on,{api_forward}{self.nic_options}",
            "-fw_cfg", f"name=opt/cube/appliance.toml,file={seed}",
            "-fw_cfg", f"name=opt/cube-test/control.py,file={CONTROL_AGENT}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=control,path={self.workdir / 'control.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=control,name={CONTROL_PORT}",
        ]  # fmt: skip
        for name, path in self.fw_cfg.items():
            argv += ["-fw_cfg", f"name=opt/cube/{name},file={path}"]
        for tag, path in self.shares.items():
            argv += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Until the control agent answers and the API's /health does."""
        deadline = time.monotonic() + timeout
        self.run("true", timeout=max(1.0, deadline - time.monotonic())).check()
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                if httpx.get(f"{self.url}/health", timeout=30, trust_env=False).status_code == 200:
                    for tag in self.shares:
                        mount = f"mount -t 9p -o trans=virtio,ro {tag} /mnt/{tag}"
                        self.run(f"mkdir -p /mnt/{tag} && {mount}").check()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(3)
        raise AssertionError(f"/health did not answer in {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """Kill qemu (its disk is deleted with the machine: no clean shutdown to wait for)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"qemu exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        text = self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- control channel ------------------------------------------------------

    def run(self, command: str, timeout: float = 600) -> Result:
        """`sh -c command` as root inside the emulated host."""
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout + 30
        sock = self._connect(deadline)
        request = {"id": request_id, "command": command, "timeout": timeout}
        sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            while b"\n" in self._received:
                line, self._received = self._received.split(b"\n", 1)
                answer = json.loads(line)
                if answer["id"] == request_id:
                    return Result(answer["status"], answer["stdout"], answer["stderr"])
            self.assert_running()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no answer to {command!r} in {timeout:.0f} s:\n{self.tail()}")
            sock.settimeout(min(remaining, 5.0))
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"the control channel closed:\n{self.tail()}")
            self._received += chunk

    def _connect(self, deadline: float) -> socket.socket:
        if self._control is None:
            path = str(self.workdir / "control.sock")
            while True:
                self.assert_running()
                sock = socket.socket(socket.AF_UNIX)
                try:
                    sock.connect(path)
                    break
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            self._control = sock
        return self._control

    # ---- the appliance ----------------------------------------------------------

    def api_key(self) -> str:
        key = json.loads(self.run("cube keys create --name kvm-host-test --json").check().stdout)["key"]
        return str(key)


@contextlib.contextmanager
def emulated_host(
    shares: dict[str, Path] | None = None,
    cpu: str = SVM_CPU,
    seed_config: str = SEED_CONFIG,
    **options: Any,
) -> Iterator[EmulatedHost]:
    """A booted appliance (its API answering), stopped and deleted afterwards: an emulated
    KVM host unless `cpu` says otherwise; `options`: EmulatedHost's (cmdline, fw_cfg, ...)."""
    artifacts = appliance_iso()
    workdir = Path(tempfile.mkdtemp(prefix="cube-kvm-host-", dir=os.environ.get("CUBE_KVM_HOST_WORKDIR")))
    host = EmulatedHost(artifacts, workdir, cpu=cpu, seed_config=seed_config, shares=shares or {}, **options)
    started = time.monotonic()
    try:
        host.start()
        host.wait_ready()
        print(f"emulated KVM host ready in {time.monotonic() - started:.0f} s (port {host.port})")
        yield host
    finally:
        keep_logs(host)
        host.stop()
        print(f"--- emulated host serial console (last lines)\n{host.tail(40)}")
        shutil.rmtree(workdir, ignore_errors=True)


def keep_logs(host: EmulatedHost) -> None:
    """The last session's service journal and serial console, kept in CACHE/last-session for
    whoever reads a failure (the machine and its disk are gone once the session ends)."""
    logs = CACHE / "last-session"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    if host.serial_log.exists():
        shutil.copy2(host.serial_log, logs / "serial.log")
    if host.process is not None and host.process.poll() is None:
        with contextlib.suppress(AssertionError, OSError):
            journal = host.run("journalctl --no-pager -o short-precise -n 5000", timeout=300)
            (logs / "journal.txt").write_text(journal.stdout)
    print(f"emulated host logs: {logs}")
