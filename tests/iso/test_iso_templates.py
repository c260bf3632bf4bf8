"""Templates on the ISO are built elsewhere (the build host's template store) and mounted
under the appliance's own store: a template is where it is loaded from."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.records import TemplateManifest


def test_a_template_mounted_elsewhere_is_where_it_is_loaded_from(tmp_path: Path) -> None:
    built = TemplateManifest(
        template_id="code-interpreter", directory=tmp_path / "build-host" / "code-interpreter"
    )
    built.save()
    built.rootfs.write_bytes(b"ext4")
    mounted = tmp_path / "var-lib-cube" / "templates" / "code-interpreter"
    shutil.copytree(built.directory, mounted)
    shutil.rmtree(built.directory)

    loaded = TemplateManifest.load(mounted)
    assert loaded.directory == mounted
    assert loaded.rootfs.read_bytes() == b"ext4"
