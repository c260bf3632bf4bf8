"""The default template's build step that adds the host's CAs leaves Java working (root only).

`update-ca-certificates` in the image runs ca-certificates-java's dpkg trigger, which imports the
new CAs into Java's cacerts with the JDK's keytool. Chrooted without a /proc that trigger failed
("java: error while loading shared libraries: libjli.so"), left ca-certificates-java half
configured and the CAs out of Java's trust store. This runs the real step on the real bootstrap
root filesystem (the installer's cached mmdebstrap tarball) with a CA made here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from appliance.config import load_config
from appliance.templates import default

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount need root"),
]


@pytest.fixture
def image_tree() -> Iterator[Path]:
    """The default recipe's bootstrap root filesystem, unpacked into a temporary directory."""
    tarball = load_config().cache_dir / "rootfs" / f"{default.load_recipe().digest()}.tar"
    if not tarball.is_file():
        pytest.skip(f"no bootstrap tarball {tarball} (installer/install.sh builds the default template)")
    work = Path(tempfile.mkdtemp(prefix="cube-java-ca-"))
    try:
        subprocess.run(["tar", "-xpf", str(tarball), "--numeric-owner", "-C", str(work)], check=True)
        yield work
    finally:
        shutil.rmtree(work)


def _in_image(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    script = 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"'
    unshare = ["unshare", "--mount", "--fork", "--propagation", "private"]
    command = [*unshare, "sh", "-c", script, "sh", str(root), str(root), *argv]
    return subprocess.run(command, text=True, capture_output=True, check=False)


def test_host_cas_reach_javas_cacerts_and_leave_dpkg_clean(
    image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "cube-java-test-ca.crt"
    make_ca = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    make_ca += ["-subj", "/CN=cube-java-test-ca", "-keyout", str(tmp_path / "key"), "-out", str(ca)]
    subprocess.run(make_ca, check=True, capture_output=True)
    monkeypatch.setattr(default, "host_cas", lambda: [ca])

    trio.run(default.add_host_cas, image_tree)

    audit = _in_image(image_tree, "dpkg", "--audit")
    assert audit.returncode == 0 and audit.stdout == "", audit.stdout + audit.stderr
    pending = image_tree / "var/lib/ca-certificates-java/pending"
    assert not pending.exists() or pending.read_text() == "", pending.read_text()
    keystore = _in_image(image_tree, "keytool", "-list", "-cacerts", "-storepass", "changeit")
    assert keystore.returncode == 0, keystore.stderr
    assert "debian:cube-java-test-ca.pem" in keystore.stdout, keystore.stdout[-2000:]
    version = _in_image(image_tree, "java", "-version")
    assert version.returncode == 0 and "openjdk" in version.stderr.lower(), version.stderr
