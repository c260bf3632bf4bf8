"""`cube bench` inside the emulated KVM host, for the kvm runtime and for the uml runtime,
on the same (software-emulated) machine: numbers to compare the two runtimes by ratio,
recorded in docs/BENCHMARKS.md. Under TCG every absolute number is many times what the
hardware gives; only the ratios between the runtimes mean something.

The benches run inside as `cube bench …` against the appliance's own service (uml: with
`runtime = "uml"` in its appliance.toml and the service restarted; the host is handed back
with its configuration as found). Round counts are small and bounded: everything is slow.
This asserts only that every bench completed and counted zero errors; the numbers are
printed, and written as JSON into $CUBE_KVM_BENCH_JSON_DIR on this machine if it is set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from emulated_host import EmulatedHost

from appliance.api.client import ApiClient
from appliance.bench.exec import run_exec_bench

CONFIG = "/etc/cube/appliance.toml"
SAVED = "/run/cube-bench-appliance.toml"
INSIDE_JSON = "/run/cube-bench-json"
BENCH_TIMEOUT_S = 3600  # a bound, not an expectation: a uml cold boot under TCG takes minutes
RESTART_TIMEOUT_S = 900
# name -> arguments, smallest useful rounds. The warm pool is off (pool_size = 0), so every
# create is what a pool would hide: a kvm snapshot restore, a uml cold boot.
INSIDE = {
    "create": "create --concurrency 1 --count 3 --sustain 0 --pool-wait 0",
    "density": "density --max 3 --reserve-mib 1024",
    "kvm": "kvm --rounds 5 --clones 3 --exits 200 --blk-mb 8",
}
KVM_ONLY = {"kvm"}
TEMPLATE = "code-interpreter"
EXEC_LOOPS, EXEC_SAMPLES = 2, 5


def restart_service(kvm_host: EmulatedHost) -> None:
    kvm_host.run("systemctl restart cube.service", timeout=RESTART_TIMEOUT_S).check()
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{kvm_host.url}/health", timeout=30, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the service did not answer /health after a restart"
        time.sleep(3)


def chosen_runtime(kvm_host: EmulatedHost) -> str:
    journal = kvm_host.run(
        "journalctl -u cube.service -o cat --no-pager | grep 'sandbox runtime:' | tail -n 1"
    ).check()
    return journal.stdout.split("sandbox runtime: ", 1)[1].split()[0]


@pytest.fixture(scope="module", params=["kvm", "uml"])
def runtime(request: pytest.FixtureRequest, kvm_host: EmulatedHost) -> Iterator[str]:
    """The service running with this runtime; uml is configured (kvm is what the host picks
    by itself), and the configuration is put back afterwards."""
    name: str = request.param
    if name == "uml":
        # Line 1: a top-level key, whatever tables the file may hold. (/etc/cube/appliance.toml
        # is a link to the data disk's copy: written through, never replaced.)
        kvm_host.run(
            f"cp {CONFIG} {SAVED} && sed -i --follow-symlinks '1i runtime = \"uml\"' {CONFIG}"
        ).check()
        restart_service(kvm_host)
    try:
        assert chosen_runtime(kvm_host) == name
        yield name
    finally:
        if name == "uml":
            kvm_host.run(f"cat {SAVED} > {CONFIG} && rm {SAVED}").check()
            restart_service(kvm_host)


def keep(runtime: str, name: str, text: str) -> None:
    directory = os.environ.get("CUBE_KVM_BENCH_JSON_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{runtime}-{name}.json").write_text(text)


def run_bench_inside(kvm_host: EmulatedHost, api_key: str, runtime: str, name: str) -> dict:
    """`cube bench <name> …` inside; its JSON report (printed, and kept if asked)."""
    arguments = INSIDE[name]
    directory = f"{INSIDE_JSON}/{runtime}"
    started = time.monotonic()
    command = f"CUBE_API_KEY={api_key} nice -n 10 cube bench {arguments} --json-dir {directory}"
    result = kvm_host.run(f"mkdir -p {directory} && {command}", timeout=BENCH_TIMEOUT_S)
    print(f"--- {runtime}: cube bench {arguments} ({time.monotonic() - started:.0f} s)\n{result.stdout}")
    result.check()
    text = kvm_host.run(f"cat {directory}/{name}.json && rm {directory}/{name}.json").check().stdout
    keep(runtime, name, text)
    report: dict = json.loads(text)
    return report


def run_exec_from_outside(kvm_host: EmulatedHost, api_key: str, runtime: str) -> dict:
    """`cube bench exec`'s measurement with its client, the E2B SDK, on this machine: the ISO
    installs the appliance without the `bench` extra (no E2B SDK inside). The sandboxes and
    the service are inside; every call crosses the forwarded loopback port."""
    started = time.monotonic()
    report = run_exec_bench(ApiClient(kvm_host.url, api_key), TEMPLATE, EXEC_LOOPS, EXEC_SAMPLES)
    report.host = {"runtime": runtime, "client": "the E2B SDK on the dev box, through the forwarded port"}
    print(f"--- {runtime}: bench exec from outside ({time.monotonic() - started:.0f} s)")
    report.print_table()
    text = json.dumps(asdict(report), indent=2, default=str)
    keep(runtime, "exec", text)
    result: dict = json.loads(text)
    return result


def errors_in(report: dict) -> list[dict]:
    return [row for row in report["rows"] if row.get("errors")]


@pytest.mark.parametrize("name", [*INSIDE, "exec"])
def test_bench_completes_without_errors(
    kvm_host: EmulatedHost, kvm_host_api_key: str, runtime: str, name: str
) -> None:
    if name in KVM_ONLY and runtime != "kvm":
        pytest.skip(f"`cube bench {name}` measures the kvm runtime's parts only")
    if name == "exec":
        report = run_exec_from_outside(kvm_host, kvm_host_api_key, runtime)
    else:
        report = run_bench_inside(kvm_host, kvm_host_api_key, runtime, name)
    assert report["rows"], report
    assert not errors_in(report), report
