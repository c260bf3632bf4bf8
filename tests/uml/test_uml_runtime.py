"""Real UML guests from the real default template: boot, agent, isolation, teardown, pause.

Traffic goes only to the sandboxes' host_ip addresses inside netns this test's
CubeVS created (test-only host_network), and DNS to a dead loopback port.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from hostprocs import processes_of_uid
from umlguests import execute_code

from appliance.config import load_config
from appliance.cubelet.envd_client import run_command
from appliance.net.addressing import Addressing
from appliance.runtime.base import ENVD_PORT, BootSpec, BootStalled, GuestExited
from appliance.runtime.detect import find_uml_kernel
from appliance.runtime.uml.cgroups import CGROUP_ROOT
from appliance.runtime.uml.runtime import UmlRuntime

if TYPE_CHECKING:
    from conftest import Boot

    from appliance.config import Config
    from appliance.net.service import CubeVS
    from appliance.records import TemplateManifest

pytestmark = [pytest.mark.uml, pytest.mark.slow]


def leftovers(config: Config, spec: BootSpec) -> list[str]:
    """Everything of a sandbox that must be gone once its run() has returned."""
    uid = config.uid_base + spec.slot
    plan = Addressing(config.host_network).plan(spec.sandbox_id, spec.slot)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found = [f"process {pid} of uid {uid}" for pid in processes_of_uid(uid)]
    if plan.netns in netns.split():
        found.append(f"netns {plan.netns}")
    if f" {plan.host_veth}@" in links or f" {plan.host_veth}:" in links:
        found.append(f"veth {plan.host_veth}")
    found += [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"*/cube/{spec.sandbox_id}")]
    if spec.sandbox_dir.exists():
        found.append(f"directory {spec.sandbox_dir}")
    return found


async def test_boot_runs_commands_and_python(boot: Boot) -> None:
    async with boot() as (instance, _spec):
        print(f"cold boot to agent ready: {instance.boot_seconds * 1000:.0f} ms")
        host, port = instance.endpoint(ENVD_PORT)
        assert port == ENVD_PORT
        result = await run_command(host, "uname -s && id -un && pwd")
        assert result.exit_code == 0, result
        assert result.stdout.startswith("Linux\nuser\n"), result
        events = await execute_code(host, "import numpy, pandas\nprint(numpy.arange(4).sum())")
        assert "6\\n" in json.dumps(events), events
        assert instance.memory_usage_bytes() > 16 << 20
        # The execution waited for the default kernel; the console says so, in order.
        with trio.fail_after(60):
            await instance.wait_fully_ready()
        print(f"cold boot to interpreter ready: {instance.interpreter_seconds * 1000:.0f} ms")
        assert instance.boot_seconds < instance.interpreter_seconds
        console = instance.console_log.read_text()
        assert 0 <= console.index("CUBE-AGENT-READY") < console.index("CUBE-INTERPRETER-READY")


async def test_sandboxes_cannot_see_each_other(boot: Boot) -> None:
    async with boot(slot=0) as (first, _), boot(slot=1) as (second, _):
        host_a, _ = first.endpoint(ENVD_PORT)
        host_b, _ = second.endpoint(ENVD_PORT)
        assert host_a != host_b
        made = await run_command(
            host_a, "echo private > /tmp/only-in-a && (nohup sleep 6061 >/dev/null 2>&1 &) && echo ok"
        )
        assert made.exit_code == 0 and made.stdout == "ok\n", made
        assert (await run_command(host_a, "cat /tmp/only-in-a")).stdout == "private\n"
        seen = await run_command(host_b, "ls -a /tmp; ps -eo args")
        assert seen.exit_code == 0, seen
        assert "only-in-a" not in seen.stdout and "sleep 6061" not in seen.stdout, seen.stdout
        assert "sleep 6061" in (await run_command(host_a, "ps -eo args")).stdout


async def test_guest_cannot_read_host_files_or_processes(boot: Boot, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.write_text("host secret")
    async with boot() as (instance, _spec):
        host, _ = instance.endpoint(ENVD_PORT)
        attempt = await run_command(
            host,
            "mkdir -p /mnt/host && mount -t hostfs none /mnt/host 2>&1; echo rc=$?; "
            f"cat /mnt/host{marker} /mnt/host/etc/hostname 2>&1; ls /mnt/host 2>&1",
            user="root",
        )
        assert "host secret" not in attempt.stdout, attempt
        if "rc=0" in attempt.stdout:  # Debian's linux.uml has hostfs: it must find nothing of the host
            assert "etc" not in attempt.stdout.split("rc=0", 1)[1].split(), attempt
        processes = await run_command(host, "ps -eo args; cat /proc/1/cmdline")
        assert "cube-init" in processes.stdout
        assert "pytest" not in processes.stdout and "bwrap" not in processes.stdout, processes.stdout


async def test_kill_leaves_nothing_behind(boot: Boot, uml_config: Config) -> None:
    async with boot(slot=2) as (instance, spec):
        assert processes_of_uid(uml_config.uid_base + 2)
        assert spec.sandbox_dir.exists() and instance.console_log.exists()
    assert leftovers(uml_config, spec) == []


async def test_guest_exit_is_reported_and_cleaned_up(
    runtime: UmlRuntime, uml_config: Config, default_template: TemplateManifest
) -> None:
    spec = BootSpec.for_template(uml_config, default_template, "cubetest-uml-exit", 3, cpu_count=1)
    errors: list[GuestExited] = []

    async def run_recording(*, task_status: trio.TaskStatus[object]) -> None:
        try:
            await runtime.run(spec, task_status=task_status)
        except GuestExited as exc:
            errors.append(exc)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            instance = await nursery.start(run_recording)
            host, _ = instance.endpoint(ENVD_PORT)  # type: ignore[attr-defined]
            # The init powers the guest off when its agent dies.
            try:
                await run_command(
                    host, "kill -9 $(pgrep -x cube-agent)", user="root", timeout=5, token=spec.agent_token
                )
            except httpx.HTTPError:
                pass  # the agent died mid-answer
    assert len(errors) == 1 and "powering off" in errors[0].console_tail, errors
    assert leftovers(uml_config, spec) == []


async def http_status(host: str, port: int, timeout: float = 1.0) -> int | None:
    """The status of envd's `GET /health`, or None when nothing answered within `timeout`."""
    with trio.move_on_after(timeout):
        async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
            return (await client.get(f"http://{host}:{port}/health")).status_code
    return None


async def test_pause_freezes_and_resume_unfreezes(boot: Boot) -> None:
    async with boot() as (instance, _spec):
        host, port = instance.endpoint(ENVD_PORT)
        assert await http_status(host, port) == 204
        await instance.pause()
        assert await http_status(host, port, timeout=1.0) is None  # frozen: nobody answers
        answered: list[int | None] = []

        async def ask() -> None:
            answered.append(await http_status(host, port, timeout=20.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.5)
            assert answered == []  # still waiting while paused
            await instance.resume()
        assert answered == [204]  # the request made while paused is answered after resume
        assert (await run_command(host, "echo alive")).stdout == "alive\n"


def test_boot_limits_are_config_keys_with_env_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "appliance.toml"
    config_file.write_text("uml_boot_timeout_s = 1200\n")
    defaults = load_config(tmp_path / "absent.toml", {})
    assert (defaults.uml_first_output_timeout_s, defaults.uml_boot_timeout_s) == (20, 60)
    config = load_config(config_file, {"CUBE_UML_FIRST_OUTPUT_TIMEOUT_S": "600"})
    assert (config.uml_first_output_timeout_s, config.uml_boot_timeout_s) == (600, 1200)


@pytest.mark.parametrize("limit", ["uml_first_output_timeout_s", "uml_boot_timeout_s"])
async def test_boot_limits_from_config_reach_the_runtime(
    limit: str, uml_config: Config, cubevs: CubeVS, default_template: TemplateManifest
) -> None:
    """A zero limit (either key: the first-output wait never outlasts the whole boot's) ends a
    real boot as stalled before the guest can write anything, and it is torn down like any other."""
    config = dataclasses.replace(uml_config, **{limit: 0})
    runtime = UmlRuntime(config, cubevs)
    spec = BootSpec.for_template(config, default_template, "cubetest-uml-limit", 4, cpu_count=1)
    with trio.fail_after(60), pytest.raises(BootStalled, match="wrote nothing within 0 s"):
        await runtime.run(spec)  # would run the guest until cancelled, had it booted
    assert leftovers(config, spec) == []


def test_kernel_stacks_are_not_in_vmalloc_space(uml_config: Config) -> None:
    """The intermittent silent boot stall: with CONFIG_VMAP_STACK, ubd_open of the COW disk calls
    flush_tlb_kernel_vm(), which munmaps and re-mmaps every vmalloc page, the running task's own
    stack too; a host signal (timer, SIGIO) arriving in between makes UML's signal entry read the
    unmapped stack base, and the nested SIGSEGV handler returns to the same fault forever."""
    kernel = find_uml_kernel(uml_config)
    assert kernel is not None
    config = subprocess.run([str(kernel), "--showconfig"], capture_output=True, text=True, timeout=30).stdout
    assert "CONFIG_HAVE_ARCH_VMAP_STACK" in config  # the kernel printed its configuration
    assert "CONFIG_VMAP_STACK=y" not in config, (
        f"{kernel} has vmalloc'd kernel stacks (boots stall at random): "
        "rebuild it from image/uml/sandbox.config with `cube image build-uml-kernel`"
    )
