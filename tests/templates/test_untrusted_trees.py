"""Attacks on the host through the trees a template build works on (#14 items 1-4 and 14).

The build service runs as root over trees an API caller controls: the uploaded context, the
image's layers, the rootfs a Dockerfile builds, an earlier stage. Each test plants symlinks,
hardlinks, `..` and absolute names aimed at `HostFiles` (stand-ins outside every tree) and checks
that nothing of them was written, replaced, chmodded or chowned, through the same entry points
the service uses (the HTTP API, the build service, prepare_rootfs).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from host_standins import HostFiles, build_context_dir, debugfs
from registry_world import Entry, Images, OciLayout, layer_tar
from sandbox_doubles import LoopbackSandboxes
from served_builds import Served, finished

from appliance.config import Config
from appliance.templates.build_context import extract_context
from appliance.templates.builds import TemplateBuilds
from appliance.templates.catalog import resolve_template
from appliance.templates.guest_setup import prepare_rootfs
from appliance.templates.jobs import Phase
from appliance.templates.requests import ImageBuildRequest


@pytest.fixture
def host(scratch: Path) -> HostFiles:
    return HostFiles(scratch / "host")


def _up(path: str) -> str:
    """A relative path from deep inside any tree up to `path` on the host."""
    return "../" * 24 + path.lstrip("/")


# Item 1: the uploaded build context. (name, tar entries aimed at the host, expected error code)
ContextAttack = Callable[[str], list[Entry]]
CONTEXT_ATTACKS: dict[str, tuple[ContextAttack, str]] = {
    "symlink, then a file below it": (
        lambda h: [Entry("a", "symlink", link=f"{h}/dir"), Entry("a/sub/planted", data=b"x")],
        "invalid_context",
    ),
    "chain of symlinks, then a file below them": (
        lambda h: [
            Entry("a", "symlink", link=h),
            Entry("b", "symlink", link="a/dir"),
            Entry("b/sub/planted", data=b"x"),
        ],
        "invalid_context",
    ),
    "symlink, then a setuid file of the same name": (
        lambda h: [Entry("s", "symlink", link=f"{h}/victim.txt"), Entry("s", data=b"pwned", mode=0o4777)],
        "invalid_request",
    ),
    "symlink, then a directory of the same name": (
        lambda h: [Entry("d", "symlink", link=f"{h}/dir"), Entry("d", "dir", mode=0o777)],
        "invalid_request",
    ),
    "symlink, then a device node of the same name": (
        lambda h: [Entry("s", "symlink", link=f"{h}/victim.txt"), Entry("s", "chr", devmajor=1, devminor=3)],
        "invalid_request",
    ),
    "relative symlink up and out": (
        lambda h: [Entry("up", "symlink", link=_up(h)), Entry("up/victim.txt", data=b"pwned")],
        "invalid_context",
    ),
    "hardlink to an absolute host path": (
        lambda h: [Entry("h", "hardlink", link=f"{h}/victim.txt"), Entry("h2", data=b"x")],
        "invalid_context",
    ),
    "hardlink up and out": (
        lambda h: [Entry("h", "hardlink", link=_up(f"{h}/victim.txt"))],
        "invalid_context",
    ),
    "hardlink through a symlink": (
        lambda h: [Entry("s", "symlink", link=h), Entry("h", "hardlink", link="s/victim.txt")],
        "invalid_context",
    ),
    "member name with ..": (
        lambda h: [Entry(_up(f"{h}/victim.txt"), data=b"pwned")],
        "invalid_context",
    ),
    "absolute member name": (
        lambda h: [Entry(f"{h}/victim.txt", data=b"pwned")],
        "invalid_context",
    ),
}


@pytest.mark.parametrize("attack", CONTEXT_ATTACKS)
async def test_context_upload_never_writes_outside_the_context(
    served: Served, host: HostFiles, attack: str
) -> None:
    entries, expected_code = CONTEXT_ATTACKS[attack]
    response = await served.app.test_client().post(
        "/templates/builds/dockerfile",
        # An unparsable Dockerfile: the upload is extracted, then refused before any build.
        query_string={"options": json.dumps({"dockerfile": "NOT A DOCKERFILE"})},
        data=layer_tar(entries(str(host))),
    )
    assert response.status_code == 400
    assert host.unchanged(), attack
    assert (await response.get_json())["error_code"] == expected_code
    # (The API keeps the uploaded .tar of a refused context until the service restarts: api.py's.)
    leftovers = [p for p in served.builds.context_root().iterdir() if p.suffix != ".tar"]
    assert not leftovers, "a refused upload leaves no tree behind"


def test_context_keeps_no_device_nodes_or_fifos(scratch: Path) -> None:
    archive = scratch / "context.tar"
    archive.write_bytes(
        layer_tar(
            [
                Entry("null", "chr", mode=0o666, devmajor=1, devminor=3),
                Entry("pipe", "fifo"),
                Entry("tool", data=b"#!/bin/sh\n", mode=0o4755),
            ]
        )
    )
    dest = scratch / "context"
    dest.mkdir()
    extract_context(archive, dest)
    assert sorted(os.listdir(dest)) == ["tool"]
    assert stat.S_ISREG((dest / "tool").lstat().st_mode)


# Item 2: COPY sources and the Dockerfile path, read through the context's symlinks.
@pytest.mark.parametrize(
    "copy",
    ["COPY h{host}/secret.txt /stolen.txt", "COPY h{host}/sec* /stolen/", "ADD h{host}/ /stolen/"],
)
async def test_copy_never_reads_host_files_through_context_symlinks(
    builds: TemplateBuilds, host: HostFiles, scratch: Path, copy: str
) -> None:
    context = scratch / "ctx"
    context.mkdir()
    (context / "h").symlink_to("/")
    job = await build_context_dir(builds, context, f"FROM scratch\n{copy.format(host=host)}\n")
    assert job.phase == Phase.FAILED
    assert "not found in the build context" in job.reason
    assert host.unchanged()


@pytest.mark.root
async def test_a_context_symlink_to_a_host_file_is_copied_as_a_link(
    builds: TemplateBuilds, config: Config, host: HostFiles, scratch: Path
) -> None:
    context = scratch / "ctx"
    context.mkdir()
    (context / "s").symlink_to(f"{host}/secret.txt")
    job = await build_context_dir(builds, context, "FROM scratch\nCOPY s /copied\n")
    assert job.phase == Phase.READY, job.reason
    copied = debugfs(resolve_template(config, job.template_id).rootfs, "stat /copied")
    assert "Type: symlink" in copied and "host secret" not in copied


@pytest.mark.parametrize("dockerfile_path", ["h{host}/Dockerfile", "Dockerfile"])
async def test_dockerfile_path_is_never_read_through_a_symlink(
    served: Served, host: HostFiles, dockerfile_path: str
) -> None:
    entries = [Entry("h", "symlink", link="/"), Entry("Dockerfile", "symlink", link=f"{host}/Dockerfile")]
    response = await served.app.test_client().post(
        "/templates/builds/dockerfile",
        query_string={"options": json.dumps({"dockerfile_path": dockerfile_path.format(host=host)})},
        data=layer_tar(entries),
    )
    assert response.status_code == 400
    assert "no Dockerfile" in (await response.get_json())["message"]


# Item 3: ADD of an archive, COPY --from and COPY into a destination that is (or goes through) a
# symlink the build itself put into the rootfs.
@pytest.mark.parametrize(
    "step",
    [
        "ADD bundle.tar /evil/",
        "ADD bundle.tar /evil",
        "ADD bundle.tar /evil/sub/",
        "COPY --from=src /payload.txt /evil/",
        "COPY --from=src /payload.txt /evil",
        "COPY --from=src /payload.txt /evil/sub/x",
        "COPY --from=src / /evil/",
        "COPY payload.txt /evil/",
        "COPY payload.txt /evil",
        "COPY tree /evil",
    ],
)
@pytest.mark.root
async def test_writes_into_a_symlinked_destination_stay_in_the_rootfs(
    builds: TemplateBuilds, config: Config, host: HostFiles, scratch: Path, step: str
) -> None:
    context = scratch / "ctx"
    (context / "bundle" / "sub").mkdir(parents=True)
    (context / "bundle" / "inside.txt").write_text("from the tar")
    (context / "bundle" / "sub" / "deep.txt").write_text("deep")
    subprocess.run(
        ["tar", "-cf", str(context / "bundle.tar"), "-C", str(context / "bundle"), "."], check=True
    )
    (context / "payload.txt").write_text("payload")
    (context / "tree").mkdir()
    (context / "tree" / "victim.txt").write_text("pwned")
    (context / "evil").symlink_to(f"{host}/dir")
    dockerfile = f"FROM scratch AS src\nCOPY payload.txt /payload.txt\nFROM scratch\nCOPY evil /\n{step}\n"
    job = await build_context_dir(builds, context, dockerfile)
    assert host.unchanged(), step
    assert job.phase == Phase.READY, job.reason
    image = resolve_template(config, job.template_id).rootfs
    if step == "ADD bundle.tar /evil/":
        # The link is followed inside the image, as the guest would: to its own {host}/dir.
        assert "from the tar" in debugfs(image, f"cat {host}/dir/inside.txt")


@pytest.mark.root
async def test_copy_from_a_stage_never_follows_its_symlinks_to_the_host(
    builds: TemplateBuilds, host: HostFiles, scratch: Path
) -> None:
    context = scratch / "ctx"
    context.mkdir()
    (context / "evil").symlink_to(str(host))
    dockerfile = "FROM scratch AS src\nCOPY evil /\nFROM scratch\nCOPY --from=src /evil/* /got/\n"
    job = await build_context_dir(builds, context, dockerfile)
    assert job.phase == Phase.FAILED and "does not exist in the source stage" in job.reason
    assert host.unchanged()


# Item 4: preparing an image's rootfs (agent, init, accounts, /tmp, DNS files).
ROOTFS_ATTACKS: dict[str, Callable[[Path, str], None]] = {
    "/tmp to a host directory": lambda r, h: (r / "tmp").symlink_to(f"{h}/dir"),
    "/tmp up and out": lambda r, h: (r / "tmp").symlink_to(_up(f"{h}/dir")),
    "/etc to a host directory": lambda r, h: (r / "etc").symlink_to(h),
    "/etc/passwd and /etc/group to host files": lambda r, h: (
        (r / "etc").mkdir(),
        (r / "etc/passwd").symlink_to(f"{h}/passwd"),
        (r / "etc/group").symlink_to(f"{h}/group"),
    ),
    "/home/user to a host directory": lambda r, h: (
        (r / "home").mkdir(),
        (r / "home/user").symlink_to(f"{h}/dir"),
    ),
    "/home to a host directory": lambda r, h: (r / "home").symlink_to(h),
    "the agent directory to a new host directory": lambda r, h: (
        (r / "opt/cube").mkdir(parents=True),
        (r / "opt/cube/agent").symlink_to(f"{h}/agent"),
    ),
    "the agent directory to a host directory": lambda r, h: (
        (r / "opt/cube").mkdir(parents=True),
        (r / "opt/cube/agent").symlink_to(f"{h}/dir"),
    ),
    "/sbin/cube-init and the DNS files to a host file": lambda r, h: (
        (r / "sbin").mkdir(),
        (r / "etc").mkdir(),
        (r / "sbin/cube-init").symlink_to(f"{h}/victim.txt"),
        (r / "etc/resolv.conf").symlink_to(f"{h}/victim.txt"),
        (r / "etc/hosts").symlink_to(f"{h}/victim.txt"),
    ),
    "/etc/passwd as a hardlink's twin inside": lambda r, h: (
        (r / "etc").mkdir(),
        (r / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n"),
        os.link(r / "etc/passwd", r / "keep-passwd"),
    ),
}


@pytest.mark.parametrize("attack", ROOTFS_ATTACKS)
@pytest.mark.root
def test_preparing_a_rootfs_never_changes_host_files(scratch: Path, host: HostFiles, attack: str) -> None:
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    ROOTFS_ATTACKS[attack](rootfs, str(host))
    prepare_rootfs(rootfs, ("/bin/app",), {}, "/", "root", ())
    assert host.unchanged(), attack
    tmp = (rootfs / "tmp").lstat()
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == 0o1777
    if (rootfs / "keep-passwd").exists():
        assert (rootfs / "keep-passwd").read_text() == "root:x:0:0::/root:/bin/sh\n", "written in place"


@pytest.mark.root
async def test_image_with_symlinks_to_host_files_builds_without_touching_them(
    builds: TemplateBuilds, config: Config, host: HostFiles, scratch: Path
) -> None:
    layout = OciLayout(scratch / "layout")
    entries = [
        Entry("tmp", "symlink", link=f"{host}/dir"),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", "symlink", link=f"{host}/passwd"),
        Entry("etc/group", "symlink", link=_up(f"{host}/group")),
        Entry("home", "symlink", link=str(host)),
        Entry("opt/cube", "dir", mode=0o755),
        Entry("opt/cube/agent", "symlink", link=f"{host}/agent"),
    ]
    layout.tag(layout.image([(entries, "gzip")]), "evil")
    request = ImageBuildRequest.from_json({"image": f"oci:{layout.root}:evil", "writable_layer_size": "32M"})
    job = await finished(builds.submit_image(request, {}))
    assert job.phase == Phase.READY, job.reason
    assert host.unchanged()
    image = resolve_template(config, job.template_id).rootfs
    assert "Type: directory" in debugfs(image, "stat /tmp") and "Mode:  01777" in debugfs(image, "stat /tmp")
    assert "user:x:1000" in debugfs(image, "cat /etc/passwd")


# Item 14: unpacked trees (setuid files, device nodes) and the caches only root may enter.
@pytest.mark.root
async def test_caches_and_build_scratch_space_are_private(
    config: Config, sandboxes: LoopbackSandboxes, scratch: Path, images: Images
) -> None:
    for name in ("layers", "build-steps", "build-work"):
        (config.cache_dir / name).mkdir(parents=True, mode=0o755)  # as an older version left them
        (config.cache_dir / name).chmod(0o755)
    builds = TemplateBuilds(config, sandboxes)
    async with trio.open_nursery() as nursery:
        await nursery.start(builds.run)
        context = scratch / "ctx"
        context.mkdir()
        (context / "f.txt").write_text("f")
        job = await build_context_dir(builds, context, f"FROM {images.multi}\nCOPY f.txt /f.txt\nRUN true\n")
        nursery.cancel_scope.cancel()
    assert job.phase == Phase.READY, job.reason
    for name in ("layers", "build-steps", "build-work"):
        mode = stat.S_IMODE((config.cache_dir / name).stat().st_mode)
        assert mode == 0o700, f"{name} is {mode:o}"
    assert any((config.cache_dir / "layers").rglob("*")) and any((config.cache_dir / "build-steps").iterdir())
    assert sandboxes.rootfs_paths and all(
        path.is_relative_to(config.cache_dir / "build-work") for path in sandboxes.rootfs_paths
    ), "RUN steps work on a tree below build-work"
