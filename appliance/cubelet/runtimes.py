"""Builds the isolation runtime `cube serve` hands to the cubelet, from config.

The runtime modules are imported lazily so that the control plane, the CLI and
the API tests work on hosts (and checkouts) without them. `open_runtime` is an
async context manager: it starts CubeVS (the sandbox network service, started
once per `cube serve`), builds the runtime over it and tears both down on exit.

Which runtime: the host detector's pick (`cube doctor` prints it and why). A host
where no runtime can run refuses to start with that reason; a kvm host gets uml as
well, for the templates kvm cannot serve (`KvmWithUmlFallback`): a create never
fails because kvm could not boot a template.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from appliance.config import Config
from appliance.cubelet.cubelet import NetworkPolicyService
from appliance.net.policy import NetworkPolicy
from appliance.records import TemplateManifest
from appliance.runtime.base import AdoptingRuntime, BootFailed, BootSpec, Instance, KeptGuest, Runtime

if TYPE_CHECKING:
    from appliance.runtime.kvm.runtime import KvmRuntime, KvmSandbox
    from appliance.runtime.uml.instance import UmlInstance
    from appliance.runtime.uml.runtime import UmlRuntime

    def _satisfy_the_protocols(
        uml: UmlRuntime,
        kvm: KvmRuntime,
        fallback: KvmWithUmlFallback,
        uml_guest: UmlInstance,
        kvm_guest: KvmSandbox,
    ) -> tuple[AdoptingRuntime, AdoptingRuntime, AdoptingRuntime, Instance, Instance]:
        """Never called: mypy checks here that the runtimes offer all the cubelet calls."""
        return uml, kvm, fallback, uml_guest, kvm_guest


log = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """The configured runtime cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class RuntimeBundle:
    runtime: Runtime
    network: NetworkPolicyService | None


RuntimeFactory = Callable[[Config], AbstractAsyncContextManager[RuntimeBundle]]


def _import(module: str, attribute: str, purpose: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise RuntimeUnavailable(
            f"{purpose} is unavailable: cannot import {module}.{attribute} ({exc}). "
            "Run `cube doctor` to see what this host supports."
        ) from exc


class CubeVSPolicies:
    """CubeVS as the cubelet's NetworkPolicyService (a sandbox CubeVS does not know has no counters)."""

    def __init__(self, cubevs: Any) -> None:
        self._cubevs = cubevs

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        await self._cubevs.update_policy(sandbox_id, policy)

    def resolve_secrets_with(self, values: Callable[[str, str], str | None]) -> None:
        """What the egress proxy resolves `${e2b.secrets.NAME}` with: (sandbox id, name) → value."""
        self._cubevs.secret_values = values

    def counters(self, sandbox_id: str) -> dict[str, int]:
        try:
            return dict(self._cubevs.counters(sandbox_id))
        except KeyError:
            return {}


def choose_runtime_name(config: Config, host: Any = None) -> str:
    """The runtime the host detector picks for this config (`auto`: kvm only where it can boot
    a sandbox, else uml); RuntimeUnavailable with its reason where none can run. `host` is a
    detection already made (`detect_host`), else this host is inspected."""
    if config.runtime not in ("auto", "uml", "kvm"):
        raise RuntimeUnavailable(f"unknown runtime {config.runtime!r} in config; expected auto, uml or kvm")
    if host is None:
        try:
            detect_host = importlib.import_module("appliance.runtime.detect").detect_host
        except (ImportError, AttributeError):
            return "uml" if config.runtime == "auto" else config.runtime
        host = detect_host(config)
    if host.runtime == "none":
        raise RuntimeUnavailable(f"no sandbox runtime on this host: {host.reason} (see `cube doctor`)")
    log.info("sandbox runtime: %s (%s)", host.runtime, host.reason)
    return str(host.runtime)


class KvmWithUmlFallback:
    """The kvm runtime, and uml for the templates kvm cannot serve.

    kvm boots a template once to snapshot it; when that boot fails (the template's
    image does not boot under the microVM kernel, its agent never answers), that create
    and every later one of the template version go to uml instead of failing, and the
    service logs why once. kvm raises TemplateUnservable only before it hands an
    instance out, having torn down what it set up. A sandbox stays on the runtime it started on.
    """

    name = "kvm"
    snapshots_templates = True

    def __init__(self, kvm: Runtime, uml: Runtime) -> None:
        self.kvm = kvm
        self.uml = uml
        self._told: set[str] = set()
        self._kept_by: dict[str, AdoptingRuntime] = {}  # a kept guest's runtime, until adopted
        unservable = importlib.import_module("appliance.runtime.kvm.template_snapshots").TemplateUnservable
        self._unservable: type[BootFailed] = unservable  # a BootFailed: its `reason` says why

    async def run(
        self, spec: BootSpec, *, task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        try:
            await self.kvm.run(spec, task_status=task_status)
        except self._unservable as exc:  # raised before the instance was handed out
            reason = exc.reason
        if spec.template.template_id not in self._told:
            self._told.add(spec.template.template_id)
            log.warning("template %s runs on uml: %s", spec.template.template_id, reason)
        await self.uml.run(spec, task_status=task_status)

    async def kept_guests(self) -> tuple[list[KeptGuest], dict[str, str]]:
        """Both runtimes' kept guests. Each sweeps what no guest of its own owns (directories,
        networks) but what the other may keep: the sandboxes with a control directory of the other."""
        runtimes = [r for r in (self.kvm, self.uml) if isinstance(r, AdoptingRuntime)]
        if len(runtimes) == 2:
            control_dirs = importlib.import_module("appliance.runtime.supervisor.client").control_dirs
            run_dir = self.kvm.config.run_dir  # type: ignore[attr-defined]
            vmms = importlib.import_module("appliance.runtime.kvm.runtime").VMMS_DIR
            self.kvm.also_kept = {d.name for d in control_dirs(run_dir)}  # type: ignore[attr-defined]
            self.uml.also_kept = {d.name for d in control_dirs(run_dir, vmms)}  # type: ignore[attr-defined]
        kept: list[KeptGuest] = []
        gone: dict[str, str] = {}
        for runtime in runtimes:
            its_kept, its_gone = await runtime.kept_guests()
            kept += its_kept
            gone.update(its_gone)
            self._kept_by.update((guest.sandbox_id, runtime) for guest in its_kept)
        return kept, gone

    async def adopt(
        self,
        sandbox_id: str,
        spec: BootSpec,
        *,
        task_status: trio.TaskStatus[Instance] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        await self._kept_by.pop(sandbox_id).adopt(sandbox_id, spec, task_status=task_status)
        raise AssertionError("adopt returned")

    async def finalize_template(self, template: TemplateManifest, instance: Instance) -> None:
        """A build's probe guest is kvm's (builds never fall back): kvm's finalize."""
        await self.kvm.finalize_template(template, instance)

    def forget_template(self, template_id: str) -> None:
        self.kvm.forget_template(template_id)
        self.uml.forget_template(template_id)
        self._told.discard(template_id)

    def close(self) -> None:
        self.kvm.close()
        self.uml.close()


def _runtime_class(name: str) -> Any:
    if name == "uml":
        return _import("appliance.runtime.uml.runtime", "UmlRuntime", "the uml runtime")
    return _import("appliance.runtime.kvm.runtime", "KvmRuntime", "the kvm runtime")


def build_runtime(name: str, config: Config, cubevs: Any) -> Any:
    """The named runtime over `cubevs`; kvm with the uml fallback where uml can run too."""
    runtime = _runtime_class(name)(config, cubevs)
    if name != "kvm":
        return runtime
    try:
        uml = _runtime_class("uml")(config, cubevs)
    except (RuntimeUnavailable, RuntimeError) as exc:
        log.warning("kvm runtime without a uml fallback: %s", exc)
        return runtime
    return KvmWithUmlFallback(runtime, uml)


@asynccontextmanager
async def open_runtime(config: Config) -> AsyncIterator[RuntimeBundle]:
    name = choose_runtime_name(config)
    cubevs_class = _import("appliance.net.service", "CubeVS", "sandbox networking (CubeVS)")
    _runtime_class(name)  # a missing runtime module is reported before CubeVS starts
    async with cubevs_class.start(config) as cubevs:
        runtime = build_runtime(name, config, cubevs)
        try:
            yield RuntimeBundle(runtime=runtime, network=CubeVSPolicies(cubevs))
        finally:
            runtime.close()  # e.g. the kvm runtime's pooled VM shells
