"""The `cube` (and `cubemastercli`) command line.

Talks to the running service over HTTP (URL from config); credentials are the
local admin token in the state dir, or `--api-key` / CUBE_API_KEY. Tables for
people, `--json` for scripts. Other modules register their commands on the
groups below (`tpl.add_command`, `bench.add_command`, `main.add_command`).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio

from appliance import __version__
from appliance.api.client import ApiClient
from appliance.bench.agent import agent as agent_bench
from appliance.bench.all import all_bench
from appliance.bench.api import api_bench
from appliance.bench.cluster import cluster_bench
from appliance.bench.create import create_bench
from appliance.bench.density import density_bench
from appliance.bench.exec import exec_bench
from appliance.bench.files import files_bench
from appliance.bench.floor import floor_command
from appliance.bench.kvm import kvm_command
from appliance.bench.net import net_bench
from appliance.bench.restart import restart_bench
from appliance.bench.rl import rl_bench
from appliance.bench.snapshot import snapshot_bench
from appliance.cli.common import api_key_option, emit, json_option, print_table
from appliance.cli.node import node as node_commands
from appliance.cli.templates import BUILD_COMMANDS, build_default
from appliance.config import load_config
from appliance.errors import first_leaf
from appliance.master.upgrade import upgrade_command
from appliance.runtime.kvm.kernel import build_kvm_kernel
from appliance.runtime.uml.kernel import build_uml_kernel


@click.group()
@click.version_option(__version__, prog_name="cube")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="CUBE_CONFIG",
    default=None,
    help="Config file (default /etc/cube/appliance.toml).",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Cube appliance: self-hosted, E2B-compatible sandboxes."""
    ctx.obj = load_config(config_path)


@main.command()
@click.option(
    "--end-sandboxes",
    is_flag=True,
    help="Take over the sandboxes a previous service left running, end them all, and exit "
    "(what the uninstaller runs).",
)
@click.pass_obj
def serve(config: Any, end_sandboxes: bool) -> None:
    """Run the appliance: API, sandbox router, state store and cubelet."""
    from appliance.net.addressing import Addressing
    from appliance.net.ebpf import compile_ahead, pin_dir_of

    # The eBPF compile (a second of clang) runs beside the rest of the start-up from here.
    compile_ahead(pin_dir_of(Addressing(config.host_network)))
    from appliance.cluster.node import ClusterConfigError
    from appliance.cubelet.runtimes import RuntimeUnavailable
    from appliance.master.service import serve_until_signalled
    from appliance.master.store import DatabaseTooNew

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: guest health probes and /init calls would
    # drown the service log (and /init bodies must never be logged).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        trio.run(partial(serve_until_signalled, config, end_sandboxes=end_sandboxes))
    except BaseExceptionGroup as group:
        matching, _ = group.split((RuntimeUnavailable, DatabaseTooNew, ClusterConfigError))
        if matching is None:
            raise
        raise click.ClickException(str(first_leaf(matching))) from group


@main.command()
@json_option
@click.pass_obj
def doctor(config: Any, as_json: bool) -> None:
    """What this host supports, and which runtime sandboxes get and why."""
    from appliance.cubelet.doctor import diagnose

    diagnosis = diagnose(config)
    if as_json:
        click.echo(json.dumps(diagnosis.as_dict(), indent=2))
    else:
        rows = [
            {"check": c.name, "ok": "yes" if c.ok else "NO", "detail": c.detail} for c in diagnosis.checks
        ]
        print_table(rows, ["check", "ok", "detail"])
        click.echo(f"\nruntime: {diagnosis.runtime or 'none'} ({diagnosis.reason})")
    if diagnosis.runtime is None:
        raise SystemExit(1)


# Sandboxes.


@main.group()
def sandbox() -> None:
    """Inspect and kill sandboxes."""


SANDBOX_COLUMNS = ["sandboxID", "templateID", "state", "startedAt", "endAt", "endReason"]


@sandbox.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include sandboxes that have ended.")
@json_option
@api_key_option
@click.pass_obj
def sandbox_list(config: Any, show_all: bool, as_json: bool, api_key: str | None) -> None:
    """Running and paused sandboxes (with --all, also ended ones and why)."""
    params = {"all": "1"} if show_all else {}
    rows = ApiClient.from_config(config, api_key).json("GET", "/cube/sandboxes", params=params)
    emit(rows, as_json, SANDBOX_COLUMNS if show_all else SANDBOX_COLUMNS[:5])


def _sandbox_id_argument(sandbox_id_option: str | None, sandbox_id_argument: str | None) -> str:
    sandbox_id = sandbox_id_option or sandbox_id_argument
    if not sandbox_id:
        raise click.UsageError("give the sandbox id (--sandbox-id ID)")
    return sandbox_id


@sandbox.command("kill")
@click.option("--sandbox-id", "sandbox_id_option", default=None)
@click.argument("sandbox_id_argument", required=False)
@api_key_option
@click.pass_obj
def sandbox_kill(
    config: Any, sandbox_id_option: str | None, sandbox_id_argument: str | None, api_key: str | None
) -> None:
    """Kill a sandbox."""
    sandbox_id = _sandbox_id_argument(sandbox_id_option, sandbox_id_argument)
    ApiClient.from_config(config, api_key).call("DELETE", f"/sandboxes/{sandbox_id}")
    click.echo(f"killed {sandbox_id}")


@sandbox.command("info")
@click.option("--sandbox-id", "sandbox_id_option", default=None)
@click.argument("sandbox_id_argument", required=False)
@json_option
@api_key_option
@click.pass_obj
def sandbox_info(
    config: Any,
    sandbox_id_option: str | None,
    sandbox_id_argument: str | None,
    as_json: bool,
    api_key: str | None,
) -> None:
    """A sandbox's record and its events (also for sandboxes that have ended)."""
    sandbox_id = _sandbox_id_argument(sandbox_id_option, sandbox_id_argument)
    info = ApiClient.from_config(config, api_key).json("GET", f"/cube/sandboxes/{sandbox_id}")
    emit(info, as_json, [])
    if not as_json:
        if info.get("network"):
            click.echo("network: " + ", ".join(f"{k}={v}" for k, v in info["network"].items()))
        click.echo("events:")
        for event in info["events"]:
            click.echo(f"  {event['at']}  {event['kind']:<8} {event['message']}")


@sandbox.command("logs")
@click.option("--sandbox-id", "sandbox_id_option", default=None)
@click.argument("sandbox_id_argument", required=False)
@click.option("--limit", default=1000, show_default=True)
@json_option
@api_key_option
@click.pass_obj
def sandbox_logs(
    config: Any,
    sandbox_id_option: str | None,
    sandbox_id_argument: str | None,
    limit: int,
    as_json: bool,
    api_key: str | None,
) -> None:
    """The sandbox's console output."""
    sandbox_id = _sandbox_id_argument(sandbox_id_option, sandbox_id_argument)
    logs = ApiClient.from_config(config, api_key).json(
        "GET", f"/v2/sandboxes/{sandbox_id}/logs", params={"limit": limit}
    )
    if as_json:
        click.echo(json.dumps(logs, indent=2))
    else:
        for entry in logs["logs"]:
            click.echo(entry["message"])


# Templates (build verbs are added by appliance.templates).


@main.group()
def tpl() -> None:
    """List, inspect and delete templates."""


TEMPLATE_COLUMNS = [
    "templateID",
    "aliases",
    "cpuCount",
    "memoryMB",
    "runningSandboxes",
    "warmInstances",
    "createdAt",
]


@tpl.command("list")
@json_option
@api_key_option
@click.pass_obj
def tpl_list(config: Any, as_json: bool, api_key: str | None) -> None:
    """Templates this appliance can start sandboxes from."""
    rows = ApiClient.from_config(config, api_key).json("GET", "/templates")
    if not as_json:
        for row in rows:
            row["aliases"] = ",".join(row["aliases"])
    emit(rows, as_json, TEMPLATE_COLUMNS)


@tpl.command("info")
@click.option("--template-id", required=True)
@json_option
@api_key_option
@click.pass_obj
def tpl_info(config: Any, template_id: str, as_json: bool, api_key: str | None) -> None:
    """One template."""
    emit(ApiClient.from_config(config, api_key).json("GET", f"/templates/{template_id}"), as_json, [])


@tpl.command("delete")
@click.option("--template-id", required=True)
@click.option("--force", is_flag=True, help="Kill the template's sandboxes first.")
@api_key_option
@click.pass_obj
def tpl_delete(config: Any, template_id: str, force: bool, api_key: str | None) -> None:
    """Delete a template (refused while sandboxes run, unless --force)."""
    params = {"force": "true"} if force else {}
    ApiClient.from_config(config, api_key).call("DELETE", f"/templates/{template_id}", params=params)
    click.echo(f"deleted {template_id}")


# API keys.


for _build_command in BUILD_COMMANDS:
    tpl.add_command(_build_command)
tpl.add_command(build_default)


@main.group()
def image() -> None:
    """Build what sandboxes boot: kernels (cached in cache_dir, keyed by their inputs)."""


image.add_command(build_uml_kernel)
image.add_command(build_kvm_kernel)


@image.command("build-iso")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("cube-appliance.iso"),
    show_default=True,
    help="Where to write the ISO.",
)
@click.pass_obj
def build_iso(config: Any, output: Path) -> None:
    """Bootable appliance ISO (BIOS + UEFI); its Debian base and template are cached in cache_dir/iso."""
    import os
    import subprocess
    import sys

    from appliance.config import IMAGE_DIR

    env = {
        **os.environ,
        "CUBE_ISO_CACHE": str(config.cache_dir / "iso"),
        "CUBE_CACHE_DIR": str(config.cache_dir),
        "CUBE_TEMPLATES_DIR": str(config.templates_dir),
        "CUBE_PYTHON": sys.executable,
    }
    if subprocess.run(["bash", str(IMAGE_DIR / "iso" / "build.sh"), str(output)], env=env).returncode:
        raise click.ClickException("ISO build failed (see above)")


main.add_command(upgrade_command)
main.add_command(node_commands)


@main.group()
def keys() -> None:
    """Manage API keys (needs the admin token)."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option(
    "--team",
    default=None,
    help="Put the key in this existing team (it shares the team's sandboxes and templates); "
    "default: a new team of its own.",
)
@json_option
@click.pass_obj
def keys_create(config: Any, name: str, team: str | None, as_json: bool) -> None:
    """Create a key; it is shown once."""
    body = {"name": name} if team is None else {"name": name, "team": team}
    created = ApiClient.from_config(config).json("POST", "/cube/keys", json=body)
    if as_json:
        click.echo(json.dumps(created, indent=2))
    else:
        click.echo(f"id {created['id']} ({created['name']}, team {created['team']})\n{created['key']}")


@keys.command("list")
@json_option
@click.pass_obj
def keys_list(config: Any, as_json: bool) -> None:
    """Keys (never their secrets)."""
    rows = ApiClient.from_config(config).json("GET", "/cube/keys")
    emit(rows, as_json, ["id", "name", "team", "prefix", "createdAt", "lastUsedAt", "revokedAt"])


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(config: Any, key_id: str) -> None:
    """Revoke a key by id."""
    ApiClient.from_config(config).call("DELETE", f"/cube/keys/{key_id}")
    click.echo(f"revoked {key_id}")


# CA.


@main.group()
def ca() -> None:
    """The appliance's certificate authority."""


@ca.command("path")
@click.pass_obj
def ca_path(config: Any) -> None:
    """Print the CA certificate file (for SSL_CERT_FILE, appended to the system bundle)."""
    from appliance.proxy.tls import ca_cert_path

    path = ca_cert_path(config.state_dir)
    if not path.exists():
        raise click.ClickException(f"{path} does not exist yet; `cube serve` creates it on first start")
    click.echo(str(path))


# Benchmarks (other modules add theirs with bench.add_command).


@main.group()
def bench() -> None:
    """Benchmarks; tables for people, --json-dir for the record."""


bench.add_command(agent_bench)
bench.add_command(all_bench)
bench.add_command(api_bench)
bench.add_command(cluster_bench)
bench.add_command(create_bench)
bench.add_command(density_bench)
bench.add_command(exec_bench)
bench.add_command(files_bench)
bench.add_command(floor_command)
bench.add_command(kvm_command)
bench.add_command(net_bench)
bench.add_command(restart_bench)
bench.add_command(rl_bench)
bench.add_command(snapshot_bench)
