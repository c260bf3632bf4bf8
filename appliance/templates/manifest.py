"""What a built template is on disk: `<state_dir>/templates/<template_id>/template.json`.

The directory holds `rootfs.ext4` (read-only, shared by every sandbox of the
template) and per-runtime artifacts. The state store mirrors the manifest so the
API can list templates; the file is the source of truth for the cubelet.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "template.json"
ROOTFS_NAME = "rootfs.ext4"


@dataclass(frozen=True)
class TemplateManifest:
    template_id: str
    directory: Path
    aliases: tuple[str, ...] = ()
    memory_mb: int = 512
    cpu_count: int = 1
    writable_layer_mb: int = 1024  # how much a sandbox may write over the image
    envs: dict[str, str] = field(default_factory=dict)
    start_cmd: tuple[str, ...] = ()  # the image's entrypoint + cmd, started by the guest init
    workdir: str = "/"
    user: str = "user"  # default user for processes and files
    expose_ports: tuple[int, ...] = (49983, 49999)
    probe_port: int = 49983
    probe_path: str | None = "/health"
    network_defaults: dict[str, object] = field(default_factory=dict)
    source: str = ""  # recipe hash or image digest it was built from
    labels: dict[str, str] = field(default_factory=dict)  # the image's / Dockerfile's LABELs
    created_at: str = ""

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS_NAME

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["directory"] = str(self.directory)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TemplateManifest:
        data = json.loads(text)
        data["directory"] = Path(data["directory"])
        for key in ("aliases", "start_cmd", "expose_ports"):
            data[key] = tuple(data.get(key, ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (MANIFEST_NAME + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(self.directory / MANIFEST_NAME)

    @classmethod
    def load(cls, directory: Path) -> TemplateManifest:
        """The template in `directory`: there, whatever directory it was built in (the ISO
        mounts templates built elsewhere; a restored backup may live elsewhere too)."""
        manifest = cls.from_json((directory / MANIFEST_NAME).read_text())
        return dataclasses.replace(manifest, directory=directory)
