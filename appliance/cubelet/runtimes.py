"""Builds the isolation runtime `cube serve` hands to the cubelet, from config.

The runtime modules are imported lazily so that the control plane, the CLI and
the API tests work on hosts (and checkouts) without them. `open_runtime` is an
async context manager: it starts CubeVS (the sandbox network service, started
once per `cube serve`), builds the runtime over it and tears both down on exit.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import Config
from appliance.cubelet.cubelet import NetworkPolicyService
from appliance.net.policy import NetworkPolicy
from appliance.runtime.base import Instance, Runtime

if TYPE_CHECKING:
    from appliance.runtime.kvm.runtime import KvmInstance, KvmRuntime
    from appliance.runtime.uml.instance import UmlInstance
    from appliance.runtime.uml.runtime import UmlRuntime

    def _satisfy_the_protocols(
        uml: UmlRuntime, kvm: KvmRuntime, uml_guest: UmlInstance, kvm_guest: KvmInstance
    ) -> tuple[Runtime, Runtime, Instance, Instance]:
        """Never called: mypy checks here that both runtimes offer all the cubelet calls."""
        return uml, kvm, uml_guest, kvm_guest


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

    def counters(self, sandbox_id: str) -> dict[str, int]:
        try:
            return dict(self._cubevs.counters(sandbox_id))
        except KeyError:
            return {}


def choose_runtime_name(config: Config) -> str:
    """`auto` asks the host detector (kvm only where a full guest kernel can run), else uml."""
    if config.runtime != "auto":
        return config.runtime
    try:
        detect_host = importlib.import_module("appliance.runtime.detect").detect_host
    except (ImportError, AttributeError):
        return "uml"
    host = detect_host(config)
    if host.runtime == "none":
        raise RuntimeUnavailable(f"no sandbox runtime on this host: {host.reason}")
    return str(host.runtime)


@asynccontextmanager
async def open_runtime(config: Config) -> AsyncIterator[RuntimeBundle]:
    name = choose_runtime_name(config)
    cubevs_class = _import("appliance.net.service", "CubeVS", "sandbox networking (CubeVS)")
    if name == "uml":
        runtime_class = _import("appliance.runtime.uml.runtime", "UmlRuntime", "the uml runtime")
    elif name == "kvm":
        runtime_class = _import("appliance.runtime.kvm.runtime", "KvmRuntime", "the kvm runtime")
    else:
        raise RuntimeUnavailable(f"unknown runtime {config.runtime!r} in config; expected auto, uml or kvm")
    async with cubevs_class.start(config) as cubevs:
        runtime = runtime_class(config, cubevs)
        try:
            yield RuntimeBundle(runtime=runtime, network=CubeVSPolicies(cubevs))
        finally:
            runtime.close()  # e.g. the kvm runtime's pooled VM shells
