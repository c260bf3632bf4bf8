"""Two real UML guests attached through CubeVS, booted once and shared by a test module.

pytest-trio gives every test its own `trio.run`, and a UML boot costs ~7 s of
CPU here, so `RealGuests` runs CubeVS (with the world's host_network and a
test DNS upstream on loopback), the UML runtime and both guests in a Trio loop
of its own on a background thread. Tests reach into that loop with `call()`
(policy updates, counters) and drive the guests through their agent (envd's
`process.Process/Start` over plain HTTP on host_ip:49983), where python3 opens
the sockets: `probe()` sends TCP connects and UDP datagrams from inside a guest.

Traffic stays inside namespaces the tests created: the guests' packets leave
through the world's policy-routing table (world hosts only, `unreachable`
otherwise), and DNS goes to the test's own upstream on 127.0.0.1.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
import umlguests
from hostprocs import processes_of_uid
from networld import dns_upstream_server

from appliance.config import Config, load_config
from appliance.cubelet.envd_client import run_command
from appliance.net import CubeVS, NetworkPolicy
from appliance.net.addressing import Addressing, Plan
from appliance.net.ebpf import PIN_ROOT
from appliance.records import TemplateManifest
from appliance.runtime.base import BootSpec
from appliance.runtime.uml.cgroups import CGROUP_ROOT
from appliance.runtime.uml.instance import UmlInstance
from appliance.runtime.uml.runtime import UmlRuntime

T = TypeVar("T")
BOOT_WAIT_S = 300.0  # two cold boots on a busy 2-core host, with margin


# --- talking to a guest's agent ------------------------------------------------


# Runs in the guest: every probe at once (one thread each), a JSON list of results.
# A probe: {"ip" | "name", "port", "udp": payload or None, "tcp": bool, "timeout": s}.
_PROBE = r"""
import json, socket, sys, threading
probes = json.loads(sys.argv[1])
results = [None] * len(probes)
def run(i, p):
    out = {}
    ip = p.get("ip")
    if p.get("name"):
        try:
            infos = socket.getaddrinfo(p["name"], p["port"], socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            out.update(resolved=[], error=str(e))
            results[i] = out
            return
        out["resolved"] = sorted({info[4][0] for info in infos})
        ip = out["resolved"][0]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    if p.get("udp"):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(p["udp"].encode(), (ip, p["port"]))
            except OSError as e:
                out["udp_error"] = str(e)
    if p.get("tcp", True):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(p.get("timeout", 1.0))
            try:
                s.connect((ip, p["port"]))
                out["tcp"] = True
            except OSError as e:
                out.update(tcp=False, tcp_error=repr(e))
    results[i] = out
threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""

# Runs in the guest, in the background: a UDP datagram and a TCP connect to ip:port
# every ~50 ms until the stop file exists (at most 60 s).
_TICKER = r"""
import os, socket, sys, time
ip, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
end, n = time.monotonic() + 60, 0
while time.monotonic() < end and not os.path.exists(stop):
    n += 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.sendto(b"tick-%d" % n, (ip, port))
        except OSError:
            pass
    with socket.socket() as s:
        s.settimeout(0.2)
        try:
            s.connect((ip, port))
        except OSError:
            pass
    time.sleep(0.05)
"""

# Runs in the guest, in the background: TCP and UDP on 0.0.0.0:port; one line per
# arrival ("tcp <peer>" / "udp <payload> <peer>") in the log file; at most 120 s.
_LISTENER = r"""
import socket, sys, threading, time
port, log = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
def note(line):
    with lock, open(log, "a") as f:
        f.write(line + "\n")
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen(16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
def accept():
    while True:
        conn, peer = tcp.accept(); note("tcp %s" % peer[0]); conn.close()
def receive():
    while True:
        data, peer = udp.recvfrom(2048); note("udp %s %s" % (data.decode(errors="replace"), peer[0]))
for f in (accept, receive):
    threading.Thread(target=f, daemon=True).start()
note("ready")
time.sleep(120)
"""


def python_command(script: str, *args: str, background: bool = False) -> str:
    command = " ".join(shlex.quote(a) for a in ("python3", "-c", script, *args))
    return f"(nohup {command} >/dev/null 2>&1 &)" if background else command


async def probe(host: str, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run `probes` inside the guest whose agent is at host (see _PROBE); their results."""
    result = await run_command(host, python_command(_PROBE, json.dumps(probes)))
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def ticker_command(ip: str, port: int, stop_file: str) -> str:
    return python_command(_TICKER, ip, str(port), stop_file, background=True)


def listener_command(port: int, log_file: str) -> str:
    return python_command(_LISTENER, str(port), log_file, background=True)


# --- the two guests, on a loop of their own ----------------------------------


@dataclass
class Booted:
    name: str
    spec: BootSpec
    instance: UmlInstance
    plan: Plan

    @property
    def sandbox_id(self) -> str:
        return self.spec.sandbox_id

    @property
    def host_ip(self) -> str:
        return self.instance.host_ip


class RealGuests:
    """CubeVS + UmlRuntime + guests booted with `policies` ({name: E2B create body}), on a thread."""

    def __init__(
        self, host_network: str, uid_base: int, tag: str, policies: dict[str, dict[str, object]]
    ) -> None:
        # Short paths: unix socket paths (mconsole) must fit in 107 bytes.
        self.work = Path(tempfile.mkdtemp(prefix="cubetest-rg-"))
        self.config = Config(
            state_dir=self.work / "state",
            run_dir=self.work / "run",
            cache_dir=load_config().cache_dir,  # the built UML kernel
            host_network=host_network,
            uid_base=uid_base,
            allow_unenforced_network=False,
        )
        self.addressing = Addressing(host_network)
        self.tag = tag
        self.policies = policies
        self.guests: dict[str, Booted] = {}
        self.vs: CubeVS | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="cubetest-real-guests", daemon=True)

    def start(self, template: TemplateManifest) -> None:
        self._template = template
        self._thread.start()
        if not self._ready.wait(BOOT_WAIT_S):
            raise RuntimeError(f"the guests did not boot within {BOOT_WAIT_S:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"the guests did not boot: {self.error!r}") from self.error

    def stop(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(120)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await `fn(*args)` in the guests' loop (CubeVS lives there)."""
        token = self._token
        assert token is not None

        def hop() -> T:
            return trio.from_thread.run(fn, *args, trio_token=token)

        return await trio.to_thread.run_sync(hop)

    async def set_policy(self, name: str, policy: NetworkPolicy) -> float:
        """Replace a guest's policy at runtime; seconds until update_policy returned (in the guests' loop)."""
        vs = self.vs
        assert vs is not None

        async def update() -> float:
            started = trio.current_time()
            await vs.update_policy(self.guests[name].sandbox_id, policy)
            return trio.current_time() - started

        return await self.call(update)

    async def counters(self, name: str) -> dict[str, int]:
        vs = self.vs
        assert vs is not None

        async def read() -> dict[str, int]:
            return vs.counters(self.guests[name].sandbox_id)

        return await self.call(read)

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:  # reported by start() or the fixture's teardown
            self.error = e
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with (
            dns_upstream_server() as upstream,
            CubeVS.start(self.config, dns_upstreams=[upstream.address]) as vs,
        ):
            self.vs = vs
            runtime = UmlRuntime(self.config, vs)
            async with trio.open_nursery() as nursery:
                # One after the other: two concurrent cold boots on 2 busy cores risk the boot timeout.
                for slot, (name, policy) in enumerate(self.policies.items()):
                    sandbox_id = f"cubetest-rg-{self.tag}-{name}"
                    spec = BootSpec.for_template(
                        self.config,
                        self._template,
                        sandbox_id,
                        slot,
                        memory_mb=256,
                        cpu_count=1,
                        network_policy=NetworkPolicy.from_e2b(policy),
                    )
                    instance = await nursery.start(runtime.run, spec)
                    assert isinstance(instance, UmlInstance)
                    await umlguests.claim(instance)  # opens its agent to run_command
                    self.guests[name] = Booted(name, spec, instance, self.addressing.plan(sandbox_id, slot))
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
            self.vs = None

    def leftovers(self) -> list[str]:
        """Whatever of the guests, their networks and the service is still there (must be nothing)."""
        found: list[str] = []
        if self._thread.is_alive():
            found.append("the guests' thread")
        links = _run("ip", "-o", "link", "show")
        namespaces = _run("ip", "netns", "list").split()
        tables = _run("nft", "list", "tables")
        for slot, name in enumerate(self.policies):
            sandbox_id = f"cubetest-rg-{self.tag}-{name}"
            plan = self.addressing.plan(sandbox_id, slot)
            uid = self.config.uid_base + slot
            found += [f"process {pid} of uid {uid}" for pid in processes_of_uid(uid)]
            if plan.netns in namespaces:
                found.append(f"netns {plan.netns}")
            if f" {plan.host_veth}@" in links or f" {plan.host_veth}:" in links:
                found.append(f"veth {plan.host_veth}")
            found += [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"*/cube/{sandbox_id}")]
            directory = self.config.sandboxes_dir / sandbox_id
            if directory.exists():
                found.append(f"directory {directory}")
        if (PIN_ROOT / self.addressing.tag).exists():
            found.append(f"bpf pins {PIN_ROOT / self.addressing.tag}")
        if f" {self.addressing.nft_table}" in tables:
            found.append(f"nft table {self.addressing.nft_table}")
        if self.addressing.resolver_label in _run("ip", "-o", "addr", "show", "dev", "lo"):
            found.append(f"resolver address {self.addressing.resolver_label}")
        return found

    def remove_work_dir(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
