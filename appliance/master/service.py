"""`cube serve`: control plane, sandbox router, state store and local cubelet in one nursery tree.

Start-up: refuse unsafe config, record the pid, open (and migrate) the store, make
sure the admin token and TLS files exist, open the runtime, start the cubelet, which
first takes over the guests the previous service left running (their supervisors kept
them: uml), report every other sandbox the store still has running or paused as dead
with the reason, boot again the sandboxes a release before supervisors carried over
(carryover.py), then Hypercorn with the plain API port and the TLS port.

Shutdown: stop accepting, then either let the sandboxes run on for the next start
(`RunningService.keep_sandboxes`: SIGTERM, which is how systemd stops and restarts the
service, and SIGUSR2, how `cube upgrade` asks) or end every one, recording why
(SIGINT, an interactive stop, and `RunningService.stop` alone). Sandboxes a runtime
cannot keep (kvm, whose guests live in this process) end either way, saying so. Then
tear the runtime down and remove the pid file.

Template builds (`tpl create-from-image`, `tpl build`) always run here: the build
service is a task in the nursery, its blueprint is registered, its sandbox steps
boot guests through the cubelet, and a published template is picked up by the
registry (and the warm pools) right away.

Other modules add control-plane routes through `blueprint_factories`: callables
that get the `Services` (config, store, cubelet, templates) and return a Quart
blueprint that declares who may call it (`appliance.api.auth.protect`), served
with the same JSON errors.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import Blueprint

from appliance.api.app import build_app
from appliance.api.auth import Access, Authenticator, check_local_dev_allowed, ensure_admin_token, protect
from appliance.api.services import Services
from appliance.cluster.node import ClusterNode, ClusterSettings
from appliance.cluster.tls import ListenerConfig
from appliance.config import Config
from appliance.cubelet.cubelet import Cubelet
from appliance.cubelet.runtimes import CubeVSPolicies, RuntimeFactory, open_runtime
from appliance.cubelet.template_sandboxes import CubeletTemplateSandboxes
from appliance.dashboard import blueprints as dashboard_blueprints
from appliance.master import sdnotify
from appliance.master.carryover import restore_carried
from appliance.master.secrets import SECRETS_DB, SecretStore, sandbox_secret_values
from appliance.master.store import SqliteStore, checkpoint_wal
from appliance.master.templates import TemplateRegistry
from appliance.master.volumes import VolumeStore
from appliance.proxy.complete_close import CompleteClose
from appliance.proxy.node_hop import NodeHop
from appliance.proxy.router import ASGIApp, SandboxRouter
from appliance.proxy.tls import TlsFiles, ensure_tls_files
from appliance.records import DEAD, LIVE_STATES, SandboxQuery
from appliance.runtime.base import AdoptingRuntime, Runtime
from appliance.templates.api import create_blueprint as create_build_blueprint
from appliance.templates.builds import TemplateBuilds

log = logging.getLogger(__name__)

PID_FILE = "cube.pid"
RESTART_REASON = "service restarted: it was running when the previous `cube serve` stopped"
STOP_REASON = "service stopped"
GRACEFUL_TIMEOUT_S = 2.0


@dataclass
class RunningService:
    api_url: str
    tls_url: str
    cubelet: Cubelet
    services: Services
    stop: trio.Event = field(default_factory=trio.Event)
    reported_dead_at_start: list[str] = field(default_factory=list)
    adopted_at_start: list[str] = field(default_factory=list)
    restored_at_start: list[str] = field(default_factory=list)
    # Set before `stop`: sandboxes whose runtime can keep them run on, for the next start.
    keep_sandboxes: bool = False
    cluster: ClusterNode | None = None  # this node's part in a cluster (None: a single node)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hypercorn_config(config: Config, tls: TlsFiles) -> HypercornConfig:
    hconfig = HypercornConfig()
    hconfig.insecure_bind = [_hostport(config.api_host, config.api_port)]
    hconfig.bind = [_hostport(config.api_host, config.tls_port)]
    hconfig.certfile = str(tls.server_cert)
    hconfig.keyfile = str(tls.server_key)
    hconfig.graceful_timeout = GRACEFUL_TIMEOUT_S
    hconfig.accesslog = None
    hconfig.keep_alive_timeout = 75
    return hconfig


async def _serve(
    nursery: trio.Nursery, app: SandboxRouter | NodeHop, hconfig: HypercornConfig, stop: trio.Event
) -> tuple[str, str]:
    """Serve `app` until `stop` is set; (the plain HTTP URL, the HTTPS URL) once listening."""
    binds = await nursery.start(
        partial(
            hypercorn.trio.serve,
            cast(Any, CompleteClose(app)),  # hypercorn's ASGI types are TypedDicts; ours: mappings
            hconfig,
            shutdown_trigger=stop.wait,
        )
    )
    return next(b for b in binds if b.startswith("http://")), next(
        b for b in binds if b.startswith("https://")
    )


async def _serve_nodes(nursery: trio.Nursery, hop: NodeHop, config: Config, stop: trio.Event) -> None:
    """The cluster listener (cluster/tls.py): the other nodes' calls, over mutual TLS, until `stop`."""
    hconfig = ListenerConfig(hop.node.tls, _hostport(config.api_host, config.cluster_port))
    hconfig.graceful_timeout = GRACEFUL_TIMEOUT_S
    hconfig.accesslog = None
    hconfig.keep_alive_timeout = 75
    binds = await nursery.start(
        partial(
            hypercorn.trio.serve, cast(Any, CompleteClose(hop.peers)), hconfig, shutdown_trigger=stop.wait
        )
    )
    hop.node.listening(binds[0])


def _write_pid_file(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PID_FILE
    if path.exists():
        try:
            other = int(path.read_text().strip())
            os.kill(other, 0)
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            raise SystemExit(f"another cube serve (pid {path.read_text().strip()}) is running") from None
        else:
            if other != os.getpid():
                raise SystemExit(f"another cube serve (pid {other}) is running; see {path}")
    path.write_text(f"{os.getpid()}\n")
    return path


def _report_ended(store: SqliteStore, adopted: list[str], ended: dict[str, str]) -> list[str]:
    """Record as dead every sandbox the store has running or paused that did not run on: why,
    where the runtime knows (its guest ended while no service ran, its supervisor is gone)."""
    marked = []
    for record in store.query_sandboxes(SandboxQuery(states=LIVE_STATES, limit=1 << 30)):
        if record.sandbox_id in adopted:
            continue
        why = ended.get(record.sandbox_id)
        reason = RESTART_REASON if why is None else f"service restarted: {why}"
        record.state, record.ended_at, record.end_reason = DEAD, time.time(), reason
        store.put_sandbox(record)
        store.add_event(record.sandbox_id, "dead", reason)
        marked.append(record.sandbox_id)
    if marked:
        log.warning("%d sandboxes from the previous run are gone: %s", len(marked), marked)
    return marked


async def _take_over(
    cubelet: Cubelet, registry: TemplateRegistry, store: SqliteStore, state_dir: Path
) -> tuple[list[str], list[str], list[str]]:
    """What this start made of the previous run's sandboxes (the cubelet has adopted the guests
    that ran on): those adopted, those recorded dead, those carried over and booted again."""
    adopted = cubelet.adoption.adopted
    if adopted:
        log.info("%d sandboxes run on from the previous start: %s", len(adopted), adopted)
    reported_dead = _report_ended(store, adopted, cubelet.adoption.ended)
    restored = await restore_carried(cubelet, registry, store, state_dir)
    if restored:
        log.info("%d sandboxes carried over the restart are back: %s", len(restored), restored)
    return adopted, reported_dead, restored


async def _shut_down(
    running: RunningService, runtime: Runtime, router: SandboxRouter, front: SandboxRouter | NodeHop
) -> None:
    """End the sandboxes (or, with `keep_sandboxes`, leave those running whose runtime can keep
    them), the router's connections and, in a cluster, the node hop's and this node's membership."""
    reason = STOP_REASON
    if running.keep_sandboxes and not isinstance(runtime, AdoptingRuntime):
        reason += f" (the {runtime.name} runtime's sandboxes cannot outlive the service)"
    kept = await running.cubelet.shutdown(reason, detach=running.keep_sandboxes)
    if kept:
        log.info("%d sandboxes run on for the next start: %s", len(kept), kept)
    await router.aclose()
    if isinstance(front, NodeHop):
        await front.aclose()
        await front.node.leave()


async def _watch_cluster(
    settings: ClusterSettings | None,
    cubelet: Cubelet,
    registry: TemplateRegistry,
    services: Services,
    store: SqliteStore,
    nursery: trio.Nursery,
) -> ClusterNode | None:
    """In a cluster (etcd_endpoints set): this node's watched view of the others, loaded before
    the API serves, and the other nodes' forwarded calls believed only with the cluster token."""
    if settings is None:
        return None
    cluster = ClusterNode(settings, cubelet, registry.all, registry.resolve)
    services.auth.cluster_token_check = cluster.verify_token
    services.cluster = cluster
    await nursery.start(cluster.watch)
    # API keys are the cluster's (cluster/keys.py): this node's own join them, then every
    # node's work here.
    published = await cluster.keys.publish(store.api_keys_with_hashes())
    if published:
        log.info("cluster: this node's %d API keys published to the cluster", published)
    services.auth.keys = cluster.keys
    return cluster


BlueprintFactory = Callable[[Services], Blueprint]


def _team_of(cubelet: Cubelet) -> Callable[[str], str | None]:
    """A live user sandbox's team (None for any other id): whose secrets its egress may use."""

    def team_of(sandbox_id: str) -> str | None:
        live = cubelet.live(sandbox_id)
        return None if live is None or live.record is None else live.record.team_id

    return team_of


async def run_service(
    config: Config,
    runtime_factory: RuntimeFactory = open_runtime,
    blueprint_factories: Iterable[BlueprintFactory] = (),
    *,
    task_status: trio.TaskStatus[RunningService] = trio.TASK_STATUS_IGNORED,
) -> None:
    check_local_dev_allowed(config)
    cluster_settings = ClusterSettings.from_config(config)  # a bad cluster config stops us here
    for directory in (config.state_dir, config.templates_dir, config.sandboxes_dir):
        directory.mkdir(parents=True, exist_ok=True)
    pid_file = _write_pid_file(config.run_dir)
    try:
        store = SqliteStore(config.db_path)  # migrates the schema; refuses a newer one
    except BaseException:
        pid_file.unlink(missing_ok=True)
        raise
    secret_store: SecretStore | None = None
    try:
        admin_token = ensure_admin_token(config.state_dir)
        tls = ensure_tls_files(config.state_dir, config.domain)
        registry = TemplateRegistry(config, store)
        registry.refresh()
        secret_store = SecretStore(config.state_dir / SECRETS_DB)
        async with runtime_factory(config) as bundle, trio.open_nursery() as nursery:
            cubelet = Cubelet(config, bundle.runtime, store, bundle.network, templates=registry.refresh)
            if isinstance(bundle.network, CubeVSPolicies):
                bundle.network.resolve_secrets_with(sandbox_secret_values(secret_store, _team_of(cubelet)))
            await nursery.start(cubelet.run)
            nursery.start_soon(checkpoint_wal, store)
            adopted, reported_dead, restored = await _take_over(cubelet, registry, store, config.state_dir)
            builds = TemplateBuilds(
                config, CubeletTemplateSandboxes(config, cubelet, on_published=registry.refresh)
            )
            await nursery.start(builds.run)
            services = Services(
                config=config,
                store=store,
                cubelet=cubelet,
                templates=registry,
                auth=Authenticator(config, store, admin_token),
                secrets=secret_store,
                volumes=VolumeStore(config.state_dir, config.volume_max_mb << 20),
                builds=builds,
            )
            cluster = await _watch_cluster(cluster_settings, cubelet, registry, services, store, nursery)
            # Any key may build; what a build sees and makes is its team's (templates/api.py).
            blueprints = [protect(create_build_blueprint(builds), Access.KEY), *dashboard_blueprints()]
            blueprints += [make_blueprint(services) for make_blueprint in blueprint_factories]
            control_plane = cast(ASGIApp, build_app(services, blueprints))
            router = SandboxRouter(control_plane, cubelet, config.domain)
            front: SandboxRouter | NodeHop = (
                router
                if cluster is None
                else NodeHop(router, router.target, cluster, services.auth.authenticate)
            )
            stop = trio.Event()
            api_url, tls_url = await _serve(nursery, front, _hypercorn_config(config, tls), stop)
            if isinstance(front, NodeHop):
                await _serve_nodes(nursery, front, config, stop)
                await nursery.start(front.node.publish, api_url)
            running = RunningService(
                api_url,
                tls_url,
                cubelet,
                services,
                stop,
                reported_dead_at_start=reported_dead,
                adopted_at_start=adopted,
                restored_at_start=restored,
                cluster=cluster,
            )
            task_status.started(running)
            await stop.wait()
            with trio.CancelScope(shield=True):
                await _shut_down(running, bundle.runtime, router, front)
            nursery.cancel_scope.cancel()
    finally:
        if secret_store is not None:
            secret_store.close()
        store.close()
        pid_file.unlink(missing_ok=True)


async def serve_until_signalled(
    config: Config,
    runtime_factory: RuntimeFactory = open_runtime,
    blueprint_factories: Iterable[BlueprintFactory] = (),
    *,
    end_sandboxes: bool = False,
) -> None:
    """Run until SIGTERM, SIGUSR2 or SIGINT (caught from before start-up, so none is lost), then
    shut down. SIGTERM (systemd's stop and restart) and SIGUSR2 (`cube upgrade`) leave the
    sandboxes running for the next start; SIGINT (an interactive stop) ends them.
    `end_sandboxes`: stop as SIGINT does as soon as started, so every sandbox a previous service
    left running is taken over and ended, with all it holds on the host (the uninstaller's)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningService = await nursery.start(
                run_service, config, runtime_factory, blueprint_factories
            )
            if end_sandboxes:
                log.info("ending every sandbox: %s", running.adopted_at_start)
                running.stop.set()
                return
            log.info("cube serve: API on %s, TLS on %s", running.api_url, running.tls_url)
            # What start-up made (modules, the app, the store) lives as long as the service: frozen
            # out of the cyclic GC's reach, a full collection no longer walks it. Each one walked
            # ~100k objects (30 ms on an idle core) on the event loop, stalling whatever was in
            # flight, e.g. a burst of creates. Everything made from here on is collected as before.
            gc.freeze()
            sdnotify.notify("READY=1")
            watchdog_s = sdnotify.watchdog_interval_s()
            if watchdog_s is not None:
                nursery.start_soon(sdnotify.ping_watchdog_until, running.stop, watchdog_s)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1")
                running.keep_sandboxes = signum != signal.SIGINT
                running.stop.set()
                break
