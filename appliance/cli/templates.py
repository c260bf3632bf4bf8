"""Template build verbs of `cube tpl` / `cubemastercli tpl`, talking to the running service over HTTP.

cli/main.py adds them to its `tpl` group: `for c in BUILD_COMMANDS: tpl.add_command(c)`.
Credentials and the service URL come the way appliance.api.client finds them.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import trio

from appliance.api.client import ApiClient
from appliance.cli.common import api_key_option, emit, json_option
from appliance.config import Config, load_config
from appliance.progress import shown
from appliance.templates import default
from appliance.templates.browser import browser_recipe_template
from appliance.templates.build_context import OUTSIDE_DOCKERFILE
from appliance.templates.desktop import desktop_recipe_template
from appliance.templates.dockerignore import IgnoreRules

_POLL_INTERVAL_S = 0.5


def _client(api_key: str | None) -> ApiClient:
    config = click.get_current_context().find_object(Config) or load_config()
    return ApiClient.from_config(config, api_key)


def template_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Flags shared by create-from-image and build: what the template is, not where its files come from."""
    options = [
        click.option(
            "--writable-layer-size", default="1G", show_default=True, help="Space a sandbox may write."
        ),
        click.option("--expose-port", "expose_ports", type=int, multiple=True, help="Guest port to expose."),
        click.option("--probe", "probe_port", type=int, help="Guest port that answers when ready."),
        click.option("--probe-path", help="HTTP path to GET on the probe port (default: TCP connect)."),
        click.option("--probe-timeout", "probe_timeout_s", type=float, default=120.0, show_default=True),
        click.option("--probe-period", "probe_period_s", type=float, default=1.0, show_default=True),
        click.option("--cpu", type=int, default=1, show_default=True),
        click.option("--memory", default="512M", show_default=True),
        click.option("--env", multiple=True, help="KEY=VALUE for the start command and sandboxes."),
        click.option("--cmd", help="Replaces the image's ENTRYPOINT (shell words)."),
        click.option("--arg", "args", multiple=True, help="Replaces the image's CMD (repeatable)."),
        click.option("--dns", multiple=True, help="Nameserver for the guest's resolv.conf."),
        click.option(
            "--allow-internet-access/--no-internet-access", default=None, help="Sandbox network default."
        ),
        click.option("--allow-out-cidr", "allow_out", multiple=True, help="Egress CIDR allowed by default."),
        click.option("--deny-out-cidr", "deny_out", multiple=True, help="Egress CIDR denied by default."),
        click.option("--alias", help="Name for the template; a rebuild under it becomes a new version."),
        click.option("--registry-username"),
        click.option("--registry-password"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _request_body(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v not in (None, ())}


def watch_job(client: ApiClient, job_id: str, out: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """Print the job's log and progress until it ends; returns the final job."""
    log_since = 0
    shown = ""
    while True:
        job = client.json("GET", f"/templates/builds/{job_id}", params={"log_since": log_since})
        for line in job["log"]:
            out(f"  {line}")
        log_since = job["log_start"] + len(job["log"])
        status = f"[{job['phase']}] {job['progress']:5.1f}% {job['message']}"
        if status != shown:
            out(status)
            shown = status
        if job["phase"] in ("READY", "FAILED"):
            return job
        time.sleep(_POLL_INTERVAL_S)


def _finish_watch(job: dict[str, Any]) -> None:
    if job["phase"] == "FAILED":
        if job.get("console_tail"):
            click.echo("--- guest console (tail) ---", err=True)
            click.echo(job["console_tail"], err=True)
        raise click.ClickException(f"build {job['job_id']} FAILED: {job['reason']}")
    click.echo(f"template_id: {job['template_id']}")


@click.command("create-from-image")
@click.option(
    "--image", required=True, help="REGISTRY/NAME:TAG, oci:DIR, oci-archive:PATH or docker-archive:PATH"
)
@template_options
@api_key_option
def create_from_image(image: str, api_key: str | None, **options: Any) -> None:
    """Start a template build from an OCI image; prints the job_id."""
    body = _request_body({"image": image, **options})
    job = _client(api_key).json("POST", "/templates/builds", json=body)
    click.echo(f"job_id: {job['job_id']}")


@click.command("watch")
@click.option("--job-id", required=True)
@api_key_option
def watch(job_id: str, api_key: str | None) -> None:
    """Follow a build until READY (prints the template_id) or FAILED (exit 1 with the reason)."""
    _finish_watch(watch_job(_client(api_key), job_id))


def _context_tar(context: Path, dockerfile: Path) -> tuple[Path, str]:
    """The build context as a tar file, without what .dockerignore excludes but with the Dockerfile
    (added as .cube-dockerfile when it lives outside the context); and its path in the tar."""
    ignore = IgnoreRules.load(context)
    try:
        dockerfile_path = dockerfile.resolve().relative_to(context.resolve()).as_posix()
    except ValueError:
        dockerfile_path = OUTSIDE_DOCKERFILE
    handle, name = tempfile.mkstemp(prefix="cube-context-", suffix=".tar")
    os.close(handle)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        relative = info.name.removeprefix("./")
        if relative in (".", "", ".dockerignore", dockerfile_path):
            return info
        return None if ignore.ignored(relative) else info

    with tarfile.open(name, "w") as tar:
        tar.add(context, arcname=".", filter=keep)
        if dockerfile_path == OUTSIDE_DOCKERFILE:
            tar.add(dockerfile, arcname=OUTSIDE_DOCKERFILE)
    return Path(name), dockerfile_path


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


@click.command("build")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Dockerfile (default: CONTEXT/Dockerfile).",
)
@click.option("--build-arg", "build_args", multiple=True, help="NAME=VALUE for an ARG.")
@click.option("--detach", is_flag=True, help="Print the job_id and return instead of watching.")
@template_options
@api_key_option
@click.argument("context", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".")
def build(
    dockerfile: Path | None,
    build_args: tuple[str, ...],
    detach: bool,
    context: Path,
    api_key: str | None,
    **options: Any,
) -> None:
    """Build a template from a Dockerfile; RUN steps run in sandboxes, steps are cached."""
    dockerfile = dockerfile or context / "Dockerfile"
    if not dockerfile.is_file():
        raise click.ClickException(f"no Dockerfile at {dockerfile}")
    args = {}
    for item in build_args:
        name, equals, value = item.partition("=")
        args[name] = value if equals else os.environ.get(name, "")
    archive, dockerfile_path = _context_tar(context, dockerfile)
    body = _request_body({"dockerfile_path": dockerfile_path, "build_args": args, **options})
    try:
        client = _client(api_key)
        job = client.json(
            "POST",
            "/templates/builds/dockerfile",
            params={"options": json.dumps(body)},
            content=_file_chunks(archive),
        )
        click.echo(f"job_id: {job['job_id']}")
        if not detach:
            _finish_watch(watch_job(client, job["job_id"]))
    finally:
        archive.unlink()


def _size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size = float(size_bytes)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _cache_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**e, "name": e["name"][:23], "size": _size(e["size_bytes"]), "in_use": "yes" if e["in_use"] else ""}
        for e in entries
    ]


@click.group("cache")
def cache() -> None:
    """The build caches: layer blobs and Dockerfile step snapshots (LRU, size-capped)."""


_CACHE_COLUMNS = ["kind", "name", "size", "last_used", "in_use"]


@cache.command("list")
@json_option
@api_key_option
def cache_list(as_json: bool, api_key: str | None) -> None:
    """Cache entries, least recently used (first to be evicted) first."""
    data = _client(api_key).json("GET", "/templates/build-cache")
    if as_json:
        emit(data, True, [])
        return
    emit(_cache_rows(data["entries"]), False, _CACHE_COLUMNS)
    click.echo(f"total {_size(data['total_bytes'])} of {_size(data['max_bytes'])} allowed")


@cache.command("prune")
@click.option("--max-size", help="Evict least recently used entries down to this size (default: the cap).")
@click.option("--all", "everything", is_flag=True, help="Evict everything no running build uses.")
@json_option
@api_key_option
def cache_prune(max_size: str | None, everything: bool, as_json: bool, api_key: str | None) -> None:
    """Evict cache entries; what a running build uses stays."""
    body: dict[str, Any] = {"all": True} if everything else {"max_size": max_size} if max_size else {}
    data = _client(api_key).json("POST", "/templates/build-cache/prune", json=body)
    if as_json:
        emit(data, True, [])
        return
    emit(_cache_rows(data["removed"]), False, _CACHE_COLUMNS)
    click.echo(
        f"freed {_size(data['freed_bytes'])}; {_size(data['total_bytes'])} left"
        f" ({data['kept_in_use']} entries in use by running builds)"
    )


BUILD_COMMANDS = (create_from_image, watch, build, cache)


@click.command("build-default")
@click.option("--all", "build_all", is_flag=True, help="Also the `browser` and `desktop` templates.")
@click.pass_obj
def build_default(config: Config, build_all: bool) -> None:
    """Build the default template `code-interpreter` (cached by recipe and agent hash)."""
    specs = [default.default_recipe_template()]
    if build_all:
        specs += [browser_recipe_template(), desktop_recipe_template()]
    for spec in specs:
        with shown(spec.template_id) as progress:
            manifest = trio.run(default.build_recipe_template, config, spec, progress)
        click.echo(f"template {manifest.template_id} ready: {manifest.rootfs}")
