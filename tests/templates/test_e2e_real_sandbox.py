"""Template builds end to end in a real `cube serve` with real UML guests (root only).

The test image is made here: a Python rootfs (the default template's /usr and /etc,
read with debugfs and pruned) as one plain layer, then a gzip layer with an HTTP
entrypoint and a file that a third layer whiteouts. skopeo pushes it to the
loopback registry; the seed's own commands (`cubemastercli tpl create-from-image`,
`tpl watch`, `tpl build`) build templates from it in a service whose runtime is
real UML, and the E2B SDK starts sandboxes from them.

Guest networking stays on the host: the service's resolver forwards to a dead
loopback port and nothing the guests run reaches out (pip installs a local wheel).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from registry_world import PASSWORD, USER
from uml_world import SERVER_PORT, PushedImage

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]


def cli(
    service: Any, *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "CUBE_API_PORT": service.url.rsplit(":", 1)[1],
        "CUBE_STATE_DIR": str(service.config.state_dir),
        "CUBE_CONFIG": "/nonexistent",
        "CUBE_API_KEY": service.admin_token,
    }
    result = subprocess.run(
        ["cubemastercli", *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def job_id_of(output: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("job_id:"))


def template_id_of(output: str) -> str:
    return next(word for word in output.replace(":", " ").split() if word.startswith("tpl-"))


def job(service: Any, job_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{service.url}/templates/builds/{job_id}", headers={"X-API-KEY": service.admin_token}
    )
    response.raise_for_status()
    return dict(response.json())


def seed_create(service: Any, image: str, *extra: str) -> str:
    created = cli(
        service,
        "tpl", "create-from-image",
        "--image", image,
        "--writable-layer-size", "1G",
        "--expose-port", "49999",
        "--expose-port", "49983",
        "--probe", "49999",
        *extra,
    )  # fmt: skip
    return job_id_of(created.stdout)


def assert_entrypoint_serves(service: Any, sandbox_id: str) -> None:
    """The image's entrypoint (an HTTP server) answers through the service's sandbox proxy."""
    answer = httpx.get(
        f"{service.url}/",
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(SERVER_PORT)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.text == "hello from the entrypoint, GREETING=hi"


def test_image_template_serves_its_entrypoint(uml_service: Any, test_image: PushedImage) -> None:
    from e2b import Sandbox

    job_id = seed_create(uml_service, test_image.ref)
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id)
    template_id = template_id_of(watched.stdout.strip().splitlines()[-1])
    built = job(uml_service, job_id)
    assert built["phase"] == "READY", built["reason"]
    assert any(line.startswith("probe answered") for line in built["log"]), built["log"]
    assert template_id in cli(uml_service, "tpl", "list").stdout

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        assert_entrypoint_serves(uml_service, sandbox.sandbox_id)
        result = sandbox.commands.run(
            "cat /app/kept.txt; echo; test -e /app/gone.txt && echo present || echo gone; pwd; id -un",
            user="root",
        )
        assert result.stdout.split() == ["still", "here", "gone", "/app", "root"]
    finally:
        sandbox.kill()


def test_manifest_list_with_zstd_layers_from_a_token_registry(
    uml_service: Any, test_image: PushedImage
) -> None:
    """The seed's lifecycle on an index (arm64 listed first) of zstd layers behind token auth:
    create, watch, info, a sandbox, delete refused while it runs, delete."""
    from e2b import Sandbox

    credentials = ("--registry-username", USER, "--registry-password", PASSWORD)
    job_id = seed_create(uml_service, test_image.token_list_ref, *credentials)
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id)
    template_id = template_id_of(watched.stdout.strip().splitlines()[-1])
    built = job(uml_service, job_id)
    assert built["phase"] == "READY", built["reason"]
    assert any(line.startswith("probe answered") for line in built["log"]), built["log"]
    assert PASSWORD not in json.dumps(built)
    info = json.loads(cli(uml_service, "tpl", "info", "--template-id", template_id, "--json").stdout)
    assert info["templateID"] == template_id

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        assert_entrypoint_serves(uml_service, sandbox.sandbox_id)
        result = sandbox.commands.run(
            "cat /app/layer-compression.txt; echo; "
            "test -e /app/gone.txt && echo present || echo gone; uname -m",
            user="root",
        )
        assert result.stdout.split() == ["zstd", "gone", "x86_64"]
        refused = cli(uml_service, "tpl", "delete", "--template-id", template_id, check=False)
        assert refused.returncode != 0 and "1 live sandboxes" in refused.stderr, refused
    finally:
        sandbox.kill()
    cli(uml_service, "tpl", "delete", "--template-id", template_id)
    assert template_id not in cli(uml_service, "tpl", "list").stdout
    assert not (uml_service.config.templates_dir / template_id).exists()


def test_probe_that_never_answers_fails_the_build(uml_service: Any, test_image: PushedImage) -> None:
    job_id = seed_create(uml_service, test_image.ref, "--probe", "49998", "--probe-timeout", "4")
    watched = cli(uml_service, "tpl", "watch", "--job-id", job_id, check=False)
    assert watched.returncode != 0
    failed = job(uml_service, job_id)
    assert failed["phase"] == "FAILED"
    assert "49998" in failed["reason"] or "probe" in failed["reason"].lower(), failed["reason"]
    assert failed["console_tail"].strip(), "the guest's console tail is part of the failure"
    templates_dir = uml_service.config.templates_dir
    assert not (templates_dir / failed["template_id"]).exists()
    assert failed["template_id"] not in cli(uml_service, "tpl", "list").stdout


def _wheel(directory: Path) -> str:
    """A pure-Python wheel of package `cubepkg`, made by hand (no build tools, no network)."""
    name = "cubepkg-1.0-py3-none-any.whl"
    files = {
        "cubepkg/__init__.py": b"VALUE = 'installed by RUN pip install'\n",
        "cubepkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: cubepkg\nVersion: 1.0\n",
        "cubepkg-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cube-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n" for path, data in files.items()
    )
    files["cubepkg-1.0.dist-info/RECORD"] = (record + "cubepkg-1.0.dist-info/RECORD,,\n").encode()
    with zipfile.ZipFile(directory / name, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return name


def test_dockerfile_with_run_pip_install_and_cache(
    uml_service: Any, test_image: PushedImage, tmp_path: Path
) -> None:
    from e2b import Sandbox

    context = tmp_path / "context"
    context.mkdir()
    wheel = _wheel(context)
    (context / "settings.txt").write_text("copied from the context\n")
    (context / "Dockerfile").write_text(
        f"FROM {test_image.ref}\n"
        f"COPY {wheel} settings.txt /tmp/\n"
        f"RUN pip install --no-index --no-cache-dir /tmp/{wheel} && rm /tmp/{wheel}\n"
        "ENV BUILT=yes\n"
    )
    options = ("--probe", "49999", "--expose-port", "49999", "--expose-port", "49983")
    first = cli(uml_service, "tpl", "build", *options, str(context))
    template_id = template_id_of(first.stdout.strip().splitlines()[-1])
    first_job = job(uml_service, job_id_of(first.stdout))
    assert any("Successfully installed cubepkg-1.0" in line for line in first_job["log"]), first_job["log"]

    sandbox = Sandbox.create(template=template_id, timeout=120)
    try:
        result = sandbox.commands.run(
            "python3 -c 'import cubepkg; print(cubepkg.VALUE)'; cat /tmp/settings.txt; "
            "ls /tmp/*.whl 2>/dev/null | wc -l; echo $BUILT"
        )
        assert result.stdout.splitlines() == [
            "installed by RUN pip install",
            "copied from the context",
            "0",
            "yes",
        ]
    finally:
        sandbox.kill()

    second = cli(uml_service, "tpl", "build", *options, str(context))
    second_job = job(uml_service, job_id_of(second.stdout))
    assert second_job["phase"] == "READY"
    run_lines = [line for line in second_job["log"] if "RUN pip install" in line]
    assert run_lines and all("(cached)" in line for line in run_lines), second_job["log"]
    assert not any("Successfully installed" in line for line in second_job["log"])
