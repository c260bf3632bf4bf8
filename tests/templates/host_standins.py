"""Harmless stand-ins for the host files an attack on a template build aims at.

`HostFiles` is a directory outside every tree a build touches, holding a file, a directory, a
fake /etc/passwd and /etc/group: what an image, a context or a Dockerfile tries to reach through
symlinks, hardlinks and `..`. `unchanged()` compares everything about them (names, types, modes,
owners, link counts, content) with how the test made them.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

from served_builds import finished

from appliance.templates.builds import TemplateBuilds
from appliance.templates.dockerfile_build import DockerfileBuildRequest
from appliance.templates.jobs import BuildJob
from appliance.templates.requests import TemplateSettings

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"


class HostFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "dir" / "sub").mkdir(parents=True)
        (root / "dir").chmod(0o755)
        (root / "victim.txt").write_text("original")
        (root / "victim.txt").chmod(0o644)
        (root / "secret.txt").write_text("host secret")
        (root / "secret.txt").chmod(0o600)
        (root / "passwd").write_text(PASSWD)
        (root / "group").write_text(GROUP)
        (root / "Dockerfile").write_text("FROM scratch\nLABEL read=from-the-host\n")
        self.before = self.state()

    def state(self) -> dict[str, tuple[object, ...]]:
        found: dict[str, tuple[object, ...]] = {}
        for directory, dirnames, filenames in os.walk(self.root):
            for name in [".", *dirnames, *filenames]:
                path = os.path.join(directory, name)
                info = os.lstat(path)
                digest = ""
                if stat.S_ISREG(info.st_mode):
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                key = os.path.relpath(path, self.root)
                found[key] = (info.st_mode, info.st_uid, info.st_gid, info.st_nlink, info.st_size, digest)
        return found

    def unchanged(self) -> bool:
        return self.state() == self.before

    def __str__(self) -> str:
        return str(self.root)


async def build_context_dir(
    builds: TemplateBuilds, context: Path, dockerfile: str, settings: TemplateSettings | None = None
) -> BuildJob:
    """A Dockerfile build of the directory `context`, uploaded as the API does (its own directory
    under the service's context root, removed when the job ends)."""
    upload = builds.context_root() / f"upload-{len(builds.jobs())}"
    subprocess.run(["cp", "-a", str(context), str(upload)], check=True)
    request = DockerfileBuildRequest(dockerfile, upload, settings or TemplateSettings(writable_layer_mb=32))
    return await finished(builds.submit_dockerfile(request, {"dockerfile": dockerfile}))


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True
    ).stdout
