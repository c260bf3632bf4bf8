"""A kvm host never answers a create with an error because kvm cannot serve a template:
the service's kvm runtime (`cubelet.runtimes.build_runtime("kvm", ...)`, what `cube serve`
builds where the detector picks kvm) sends that template's creates to uml.

Real parts on this host: the detector says kvm is usable (PVM with a guest kernel
configured), the kvm runtime tries to make the template's snapshot and its boot fails
(the configured kernel is a stand-in that no VMM can load, as a broken or foreign kernel
would be), and a real UML guest of the default template serves the create instead; the
next create goes straight to uml, with no second kvm boot.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

import httpx
import pytest
import trio
from umlguests import default_template, private_config

from appliance.config import Config, load_config
from appliance.cubelet.doctor import diagnose
from appliance.cubelet.runtimes import KvmWithUmlFallback, build_runtime, choose_runtime_name
from appliance.net.service import CubeVS
from appliance.records import ROOTFS_NAME, TemplateManifest
from appliance.runtime.base import ENVD_PORT, BootSpec
from appliance.runtime.detect import detect_host
from appliance.runtime.kvm.template_snapshots import SNAPSHOT_STORE, UNSERVABLE_DIR, SnapshotKey
from appliance.runtime.uml.instance import UmlInstance

TEST_HOST_NETWORK = "10.236.0.0/24"
TEST_UID_BASE = 340_000
DEAD_DNS_UPSTREAM = "127.0.0.1:9"
BOOT_TIMEOUT_S = 600  # a UML boot on a loaded 2-core host


def published_copy(installed: TemplateManifest, config: Config) -> TemplateManifest:
    """The installed template, published in the test's own state directory (same root image)."""
    directory = config.templates_dir / installed.template_id
    directory.mkdir(parents=True)
    try:
        os.link(installed.rootfs, directory / ROOTFS_NAME)
    except OSError:
        (directory / ROOTFS_NAME).symlink_to(installed.rootfs)
    template = dataclasses.replace(installed, directory=directory)
    template.save()
    return template


async def healthy(instance: UmlInstance) -> bool:
    host, port = instance.endpoint(ENVD_PORT)
    async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
        return (await http.get(f"http://{host}:{port}/health")).status_code < 300


def test_a_template_kvm_cannot_boot_is_served_by_uml() -> None:
    installed = default_template()
    with private_config("cubetest-kvmfb-", TEST_HOST_NETWORK, TEST_UID_BASE) as base:
        kernel = base.state_dir.parent / "vmlinux-stand-in"
        kernel.write_bytes(b"not a kernel")
        config = dataclasses.replace(
            base, runtime="kvm", kvm_guest_kernel=kernel, uml_kernel=load_config().uml_kernel
        )
        host = detect_host(config)
        if not host.kvm_usable or host.uml_kernel is None:
            pytest.skip(f"needs a usable /dev/kvm and a UML kernel: {host.reason}")
        assert choose_runtime_name(config, host) == "kvm"
        template = published_copy(installed, config)
        key = SnapshotKey.of(template, kernel, template.memory_mb, template.cpu_count)

        async def main() -> None:
            async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
                runtime = build_runtime("kvm", config, cubevs)
                assert isinstance(runtime, KvmWithUmlFallback)
                try:
                    async with trio.open_nursery() as nursery:
                        for slot in (1, 2):
                            spec = BootSpec.for_template(
                                config, template, f"cubetest-fb{slot}-{secrets.token_hex(2)}", slot
                            )
                            with trio.fail_after(BOOT_TIMEOUT_S):
                                instance = await nursery.start(runtime.run, spec)
                            assert isinstance(instance, UmlInstance)
                            assert await healthy(instance)
                            # kvm tried once (the first create) and recorded why it cannot serve it.
                            assert (
                                "neither an ELF vmlinux nor a bzImage"
                                in runtime.kvm.snapshots.unservable[key]
                            )
                        nursery.cancel_scope.cancel()
                finally:
                    runtime.close()

        trio.run(main)
        kept = [p for p in (config.state_dir / SNAPSHOT_STORE).iterdir() if p.name != UNSERVABLE_DIR]
        assert not kept, "no snapshot of a failed boot is kept"
        # `cube doctor` says which template runs on uml, and why.
        templates = next(c for c in diagnose(config).checks if c.name == "kvm templates")
        assert not templates.ok
        assert f"{template.template_id} runs on uml: " in templates.detail
        assert "neither an ELF vmlinux nor a bzImage" in templates.detail
