"""Shared fixtures: a runtime double whose guests are real HTTP servers on loopback,
and `cube serve` run in a background thread for tests that drive it with the
(synchronous) E2B SDK or plain HTTP.

Fixtures (tests use only these; other conftest modules share the name `conftest`,
so test modules must not import from this file, except under TYPE_CHECKING):
- `fake_runtime`: a `FakeRuntime` (see below); inspect `.boots`, `.instances`.
- `fake_runtime_factory`: turns a FakeRuntime into what `run_service` takes as runtime factory.
- `service_config`: a `Config` with every directory under tmp_path, ports 0 (free),
  one template `code-interpreter` (alias `ci`) installed, no warm pool.
- `start_service`: `start_service(config, runtime=None, blueprint_factories=(), runtime_factory=None)
  -> ServiceHarness`, stopped at teardown; `runtime_factory` (what `run_service` takes, e.g. a real
  runtime) replaces the FakeRuntime.
- `service`: a started `ServiceHarness` over `service_config` and `fake_runtime`.
- `api_key`: a fresh API key made through the admin API.
- `sdk_env`: E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY pointing the SDK at `service`.
- `private_service`: `private_service(**settings) -> PrivateService`, a private `cube serve`
  process over the host's built default template, real UML guests (appliance/bench/private.py),
  on ports picked free, a sandbox network and uid range of its own; not started. At teardown it
  is ended with its sandboxes (SIGINT) and removed, and nothing of them may be left: supervisors
  (their leaves, sockets), guests, cgroup leaves, network namespaces, processes of its uids.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import hypercorn.trio
import pytest
import trio
from freeports import free_ports
from hypercorn.config import Config as HypercornConfig

from appliance.bench.private import PrivateService, PrivateSettings
from appliance.config import Config, load_config
from appliance.cubelet.runtimes import RuntimeBundle
from appliance.guest.connect_framing import ENVELOPE_HEADER, FLAG_END_STREAM, envelope
from appliance.master.service import RunningService, run_service
from appliance.net.addressing import Addressing
from appliance.records import TemplateManifest
from appliance.runtime.base import BootSpec, GuestExited, Instance

FAKE_MEMORY_BYTES = 64 * 1024 * 1024

# What a test needs beyond an ordinary user's machine, as the markers pyproject.toml lists:
# `uml`, `kvm`, `root`, `slow`. The developer loop (README) deselects them all:
#     pytest -m "not uml and not kvm and not root and not slow"
# runs as any user in seconds; tests/run.sh runs it first, as an unprivileged user.
# A test module marks what only its tests know (`@pytest.mark.root`); these rules mark what
# follows from where a test lives or which fixture it uses, once for the whole suite.
NEEDS_BY_PATH: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tests/uml/*", ("uml", "root")),  # UML guests, their cgroups, seccomp, nftables
    ("tests/e2e/*", ("uml", "root")),  # the installed appliance and its guests
    ("tests/iso/*", ("root", "slow")),  # builds the ISO, boots it in qemu
    ("tests/virtio/test_virtio_*_uml.py::*", ("uml",)),  # boots linux.uml (as any user)
    ("tests/kvm/test_kvm_bench.py::*", ("kvm",)),
    ("tests/kvm/test_kvm_linux.py::*", ("kvm",)),
    ("tests/kvm/test_kvm_runtime.py::test_sandbox_taps_get_the_gateway_mac*", ("root",)),  # netns, tap
    ("tests/kvm/test_kvm_runtime.py::test_a_paused_sandboxs_nic_takes_no_frame*", ("root",)),  # netns, tap
    ("tests/kvm/test_kvm_fallback.py::*", ("uml", "root")),  # a real UML guest serves the create
    ("tests/kvm/test_kvm_faults.py::test_a_guest_bigger_than_the_hosts_free_memory*", ("kvm",)),
    # A device node with /dev/kvm's numbers (mknod).
    ("tests/kvm/test_kvm_detect.py::test_svm_host_with_the_guest_kernel_gets_kvm", ("root",)),
    ("tests/kvm/test_kvm_detect.py::test_svm_host_without_a_guest_kernel_falls_back*", ("root",)),
    ("tests/kvm/test_kvm_detect.py::test_a_kvm_device_that_does_not_open_falls_back_to_uml", ("root",)),
    ("tests/kvm/test_kvm_detect.py::test_pvm_boots_only_a_configured_pvm_kernel", ("root",)),
    ("tests/kvm/test_kvm_guest_kernel.py::test_fragment_survives_kconfig", ("slow",)),  # runs kconfig: ~20 s
    ("tests/net/test_service.py::test_doctor_checks_pass_here", ("root",)),  # makes a netns
    ("tests/guest/test_guest_users.py::*", ("root",)),  # runs as other users
    ("tests/guest/test_guest_js_sdk.py::*", ("slow",)),  # npm install into /var/cache/cube/npm
    ("tests/shipping/test_installer.py::*", ("root",)),  # apt, systemd, /etc
    # Volume files get the owner the SDK names (chown), as the service (root) does.
    ("tests/sdkextras/test_volumes.py::*", ("root",)),
    # A re-upload under a hash replaces an unpacked tree holding the archive's modes and owners.
    ("tests/templates/test_sdk_build_api.py::test_copy_files_must_be_uploaded_*", ("root",)),
    ("tests/shipping/test_systemd_unit.py::test_cube_serve_*", ("root",)),  # the real service
    ("tests/shipping/test_upgrade_sources.py::test_a_wheel_that_does_not_install*", ("slow",)),  # a venv, pip
)
NEEDS_BY_FIXTURE: dict[str, tuple[str, ...]] = {
    "kvm": ("kvm",),  # tests/kvm/conftest.py: an open /dev/kvm
    "kvm_runtime": ("kvm",),
    "world": ("root",),  # tests/net: CubeVS in network namespaces of its own
    "tap_in_netns": ("root",),
    "fake_guest": ("root",),  # tests/supervisor: a real supervisor process, cgroup leaves
    "private_service": ("uml", "root", "slow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = {mark for fixture in item.fixturenames for mark in NEEDS_BY_FIXTURE.get(fixture, ())}
        for pattern, marks in NEEDS_BY_PATH:
            if fnmatch.fnmatchcase(item.nodeid, pattern):
                needs.update(marks)
        for mark in sorted(needs):
            item.add_marker(mark)


class FakeGuestApp:
    """What a guest agent looks like from the host: /health, /init, /metrics, plus test endpoints.

    /stream?n=N&delay=S   N lines, one per chunk, S seconds apart
    /echo (POST)          streams the request body back chunk by chunk as it arrives
    /digest (POST)        sha256 and size of the request body, answered after reading all of it
    /headers              the request headers as JSON
    /contexts             [] (the code interpreter's context list)
    /service              204 while `service_up`, else 503 (a template's own service, its probe)
    /process.Process/Start  any command exits 0 while `service_up`, else 1 (a template's ready
                          command); recorded in `processes` as (argv, user, X-Access-Token)
    /ws (WebSocket)       echoes messages
    While paused, requests wait until resume (like a frozen UML guest).
    """

    def __init__(self) -> None:
        self.init_calls: list[dict[str, Any]] = []
        self.running = trio.Event()
        self.running.set()
        self.healthy = True
        self.fail_init = False
        self.answer_delay_s = 0.0  # /health and /init answer this late (a busy or emulated guest)
        self.open_streams = 0  # /stream responses in progress
        self.service_up = True  # /service: a template's own service (its probe) answers
        self.access_tokens: list[tuple[str, str | None]] = []  # (path, X-Access-Token) of host calls
        self.processes: list[tuple[list[str], str, str | None]] = []  # (argv, user, X-Access-Token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await self.running.wait()
        if scope["type"] == "websocket":
            await _echo_websocket(receive, send)
            return
        path = scope["path"]
        if path in ("/health", "/init", "/metrics"):
            token = dict(scope["headers"]).get(b"x-access-token")
            self.access_tokens.append((path, token.decode() if token is not None else None))
        if path in ("/health", "/init"):
            await trio.sleep(self.answer_delay_s)
        routes = {
            "/health": self._health,
            "/init": self._init,
            "/service": self._service,
            "/metrics": self._metrics,
            "/digest": self._digest,
            "/headers": self._headers,
            "/contexts": self._contexts,
            "/stream": self._stream,
            "/echo": self._echo,
            "/process.Process/Start": self._process,
        }
        route = routes.get(path)
        if route is None:
            await self._reply(send, 404, b"no such path")
        else:
            await route(scope, receive, send)

    async def _health(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._reply(send, 204 if self.healthy else 503, b"")

    async def _init(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.init_calls.append(json.loads(await _read_body(receive)))
        await self._reply(send, 500 if self.fail_init else 204, b"")

    async def _service(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._reply(send, 204 if self.service_up else 503, b"")

    async def _process(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        process = json.loads((await _read_body(receive))[ENVELOPE_HEADER.size :])["process"]
        user = base64.b64decode(headers[b"authorization"].split()[1]).decode().rstrip(":")
        token = headers.get(b"x-access-token")
        self.processes.append(([process["cmd"], *process["args"]], user, token.decode() if token else None))
        end = {"event": {"end": {"exitCode": 0 if self.service_up else 1, "exited": True}}}
        body = envelope(json.dumps(end).encode()) + envelope(b"{}", FLAG_END_STREAM)
        await self._reply(send, 200, body, b"application/connect+json")

    async def _metrics(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = {"cpu_count": 1, "cpu_used_pct": 12.5, "mem_used": 1234, "mem_total": 4321}
        await self._reply(send, 200, json.dumps(body).encode(), b"application/json")

    async def _digest(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        digest = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        await self._reply(send, 200, json.dumps(digest).encode(), b"application/json")

    async def _headers(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await self._reply(send, 200, json.dumps(headers).encode(), b"application/json")

    async def _contexts(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The code interpreter's, as `list_code_contexts()` reads it.
        await self._reply(send, 200, b"[]", b"application/json")

    async def _stream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = dict(p.split("=") for p in scope["query_string"].decode().split("&") if "=" in p)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        self.open_streams += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                for i in range(int(query.get("n", "3"))):
                    line = f"line {i}\n".encode()
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                    await trio.sleep(float(query.get("delay", "0")))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            self.open_streams -= 1

    async def _echo(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message.get("body"):
                await send({"type": "http.response.body", "body": message["body"], "more_body": True})
            if not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reply(self, send: Any, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
        )
        await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def _echo_websocket(receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})


async def _cancel_on_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@dataclass
class FakeInstance:
    sandbox_id: str
    console_log: Path
    port: int
    app: FakeGuestApp
    paused_count: int = 0
    crash: trio.Event = field(default_factory=trio.Event)
    agent_token: str = ""

    def endpoint(self, port: int) -> tuple[str, int]:
        return ("127.0.0.1", 1 if port == FakeRuntime.CLOSED_PORT else self.port)

    async def pause(self) -> None:
        self.paused_count += 1
        self.app.running = trio.Event()

    async def resume(self) -> None:
        self.app.running.set()

    def memory_usage_bytes(self) -> int:
        return FAKE_MEMORY_BYTES

    def memory_footprint(self) -> None:
        """Not measured: the budget charges a fake guest its template's memory_mb."""
        return None

    async def wait_fully_ready(self) -> None:
        """At once: a fake guest is fully ready when it is handed out."""

    def fully_ready(self) -> bool:
        return True


class FakeRuntime:
    """A `Runtime` whose guests are FakeGuestApp servers on 127.0.0.1 (one per sandbox)."""

    name = "fake"
    snapshots_templates = False
    CLOSED_PORT = 9  # a guest port the fake never serves: the proxy must say "port is not open"

    def __init__(self) -> None:
        self.boots = 0
        self.instances: dict[str, FakeInstance] = {}
        self.fail_next_boot = False
        self.fail_init = False  # guests booted from now on answer /init with 500
        self.answer_delay_s = 0.0  # guests booted from now on answer /health and /init this late
        self.service_up = True  # guests booted from now on answer /service (a template's probe path)
        self.forgotten: list[str] = []  # the templates deleted (forget_template)

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """Nothing to keep: fake guests start fast anyway."""

    def forget_template(self, template_id: str) -> None:
        self.forgotten.append(template_id)

    def close(self) -> None:
        """Nothing is kept between sandboxes."""

    async def run(self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance]) -> NoReturn:
        self.boots += 1
        if self.fail_next_boot:
            self.fail_next_boot = False
            raise RuntimeError("fake boot failure")
        spec.sandbox_dir.mkdir(parents=True, exist_ok=True)
        console = spec.sandbox_dir / "console.log"
        console.write_text(f"booting {spec.sandbox_id}\nslot {spec.slot}\nguest agent ready\n")
        app = FakeGuestApp()
        app.fail_init = self.fail_init
        app.answer_delay_s = self.answer_delay_s
        app.service_up = self.service_up
        hconfig = HypercornConfig()
        hconfig.bind = ["127.0.0.1:0"]
        hconfig.accesslog = None
        hconfig.graceful_timeout = 0.1
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(hypercorn.trio.serve, app, hconfig)
                port = int(binds[0].rsplit(":", 1)[1])
                instance = FakeInstance(spec.sandbox_id, console, port, app, agent_token=spec.agent_token)
                self.instances[spec.sandbox_id] = instance
                task_status.started(instance)
                await instance.crash.wait()
                nursery.cancel_scope.cancel()
            raise GuestExited(spec.sandbox_id, "kernel panic (simulated)")
        finally:
            self.instances.pop(spec.sandbox_id, None)
            shutil.rmtree(spec.sandbox_dir, ignore_errors=True)


def make_fake_runtime_factory(runtime: FakeRuntime) -> Any:
    @asynccontextmanager
    async def open_fake(config: Config) -> AsyncIterator[RuntimeBundle]:
        yield RuntimeBundle(runtime=runtime, network=None)

    return open_fake


def _install_template(config: Config, template_id: str, aliases: tuple[str, ...] = ()) -> TemplateManifest:
    manifest = TemplateManifest(
        template_id=template_id,
        directory=config.templates_dir / template_id,
        aliases=aliases,
        memory_mb=256,
        envs={"TEMPLATE_VAR": "1"},
        created_at="2026-01-01T00:00:00Z",
    )
    manifest.save()
    return manifest


class ServiceHarness:
    """`run_service` in its own thread and Trio loop; the test thread stays free for blocking SDK calls."""

    def __init__(
        self,
        config: Config,
        runtime: FakeRuntime,
        blueprint_factories: Sequence[Any] = (),
        runtime_factory: Any = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.blueprint_factories = blueprint_factories
        self.runtime_factory = runtime_factory or make_fake_runtime_factory(runtime)
        self.running: RunningService | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="cube-serve-test", daemon=True)

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.api_url

    @property
    def tls_url(self) -> str:
        assert self.running is not None
        return self.running.tls_url

    @property
    def admin_token(self) -> str:
        return (self.config.state_dir / "admin-token").read_text().strip()

    def key(self, name: str) -> str:
        """A new API key (a team of its own) made through the admin API."""
        response = httpx.post(
            f"{self.url}/cube/keys", json={"name": name}, headers={"X-API-KEY": self.admin_token}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def start(self) -> ServiceHarness:
        self._thread.start()
        self._started.wait(timeout=30)
        if self._error is not None:
            raise self._error
        assert self.running is not None, "service did not start"
        return self

    def stop(self) -> None:
        """Stop the service and join its thread; stopping twice is harmless."""
        if not self._thread.is_alive():
            return
        if self.running is not None:
            trio.from_thread.run_sync(self.running.stop.set, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "service did not stop"
        if self._error is not None:
            raise self._error

    def run_sync_in_service(self, fn: Any, *args: Any) -> Any:
        """Call `fn(*args)` on the service's Trio thread (to look at cubelet state safely)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.running = await nursery.start(
                run_service, self.config, self.runtime_factory, self.blueprint_factories
            )
            self._started.set()


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def service_config(tmp_path: Path) -> Config:
    config = Config(
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
        api_port=0,
        tls_port=0,
        domain="cube.test",
        pool_size=0,
        memory_budget_mb=4096,
        default_template="code-interpreter",
    )
    _install_template(config, "code-interpreter", aliases=("ci",))
    return config


@pytest.fixture
def fake_runtime_factory() -> Any:
    return make_fake_runtime_factory


@pytest.fixture
def start_service() -> Iterator[Any]:
    started: list[ServiceHarness] = []

    def start(
        config: Config,
        runtime: FakeRuntime | None = None,
        blueprint_factories: Sequence[Any] = (),
        runtime_factory: Any = None,
    ) -> ServiceHarness:
        harness = ServiceHarness(config, runtime or FakeRuntime(), blueprint_factories, runtime_factory)
        started.append(harness)
        return harness.start()

    yield start
    for harness in started:
        harness.stop()


@pytest.fixture
def service(service_config: Config, fake_runtime: FakeRuntime, start_service: Any) -> ServiceHarness:
    harness: ServiceHarness = start_service(service_config, fake_runtime)
    return harness


@pytest.fixture
def api_key(service: ServiceHarness) -> str:
    return service.key("test")


@pytest.fixture
def sdk_env(service: ServiceHarness, api_key: str, monkeypatch: pytest.MonkeyPatch) -> ServiceHarness:
    monkeypatch.setenv("E2B_API_URL", service.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", service.url)
    monkeypatch.setenv("E2B_API_KEY", api_key)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return service


JS_DIR = Path(__file__).resolve().parent / "js"
# node_modules live outside the checkout, installed once and reused by later runs.
NPM_CACHE = Path(os.environ.get("CUBE_NPM_CACHE", "/var/cache/cube/npm")) / "guest-js-sdk"


@pytest.fixture(scope="session")
def js_sdk_dir() -> Path:
    """The JS SDKs pinned in tests/js/package.json installed, with tests/js's scripts beside them."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JS SDK tests")
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    package = (JS_DIR / "package.json").read_text()
    installed = NPM_CACHE / "package.json"
    if not (NPM_CACHE / "node_modules/@e2b/code-interpreter").is_dir() or installed.read_text() != package:
        installed.write_text(package)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NPM_CACHE,
            check=True,
            timeout=600,
        )
    for script in JS_DIR.glob("*.mjs"):
        shutil.copy(script, NPM_CACHE / script.name)
    return NPM_CACHE


# `private_service`: a sandbox network and uid range no other test uses; ports picked free
# below the ephemeral range (outgoing connections never take them while it restarts).
PRIVATE_NETWORK = "10.224.0.0/22"
PRIVATE_UID_BASE = 540_000
_PRIVATE_PORTS = range(20_000, 32_000)


@pytest.fixture
def private_service() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("real UML guests need root (namespaces, cgroups, taps)")
    host = load_config()
    if not (host.templates_dir / "code-interpreter" / "rootfs.ext4").is_file():
        pytest.fail(f"{host.templates_dir}/code-interpreter is not built: run the installer")
    made: list[PrivateService] = []

    def make(**settings: Any) -> PrivateService:
        api_port, tls_port = free_ports(2, _PRIVATE_PORTS)
        values: dict[str, Any] = {
            "api_port": api_port,
            "tls_port": tls_port,
            "host_network": PRIVATE_NETWORK,
            "uid_base": PRIVATE_UID_BASE,
            **settings,
        }
        service = PrivateService(host, PrivateSettings(**values), prefix="cubesv-")
        made.append(service)
        return service

    yield make
    from hostprocs import sandbox_leftovers

    for service in made:
        ids = service.sandbox_ids()
        try:
            service.end()
            ids |= service.sandbox_ids()
            supervisors = service.run_dir / "supervisors"
            sockets = sorted(str(p) for p in supervisors.iterdir()) if supervisors.is_dir() else []
        finally:
            shutil.rmtree(service.root, ignore_errors=True)
        slots = Addressing(service.settings.host_network).max_slots
        left = sandbox_leftovers(ids, service.settings.uid_base, slots)
        assert sockets == [] and not any(left.values()), {"supervisor dirs": sockets, **left}
