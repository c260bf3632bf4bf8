"""The build API blueprint, and `tpl create-from-image` / `watch` / `build` against a served app."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio
from registry_world import Images
from served_builds import Served, run_cli

from appliance.cli.templates import build, create_from_image, watch
from appliance.config import Config


async def test_api_errors_are_json(served: Served) -> None:
    client = served.app.test_client()
    response = await client.post("/templates/builds", json={"image": ""})
    assert response.status_code == 400
    assert (await response.get_json())["error_code"] == "invalid_request"
    response = await client.post("/templates/builds", json={"image": "x/y:z", "writable_layer_size": "1M"})
    assert "at least 16M" in (await response.get_json())["message"]
    response = await client.post("/templates/builds", json={"image": "UPPER/Case"})
    assert response.status_code == 400
    response = await client.get("/templates/builds/job-nope")
    assert response.status_code == 404 and (await response.get_json())["error_code"] == "not_found"
    response = await client.post(
        "/templates/builds/dockerfile",
        query_string={"options": json.dumps({"dockerfile": "RUN true"})},
        data=b"\0" * 10240,  # an empty tar
    )
    assert response.status_code == 400 and "before FROM" in (await response.get_json())["message"]
    response = await client.post("/templates/builds/dockerfile", data=b"not a tar")
    assert response.status_code == 400 and (await response.get_json())["error_code"] == "invalid_context"
    response = await client.post("/templates/builds/dockerfile", data=b"\0" * 10240)
    assert "no Dockerfile 'Dockerfile'" in (await response.get_json())["message"]


@pytest.mark.root
async def test_api_job_view_pages_the_log(served: Served, images: Images) -> None:
    client = served.app.test_client()
    response = await client.post(
        "/templates/builds", json={"image": images.multiarch, "writable_layer_size": "32M"}
    )
    assert response.status_code == 202
    job_id = (await response.get_json())["job_id"]
    with trio.fail_after(60):
        while (job := await (await client.get(f"/templates/builds/{job_id}")).get_json())["phase"] != "READY":
            assert job["phase"] != "FAILED", job["reason"]
            await trio.sleep(0.05)
    tail = await (await client.get(f"/templates/builds/{job_id}", query_string={"log_since": 3})).get_json()
    assert tail["log_start"] == 3 and tail["log"] == job["log"][3:]
    listing = await (await client.get("/templates/builds")).get_json()
    assert [j["job_id"] for j in listing] == [job_id] and "log" not in listing[0]


@pytest.mark.root
async def test_seed_commands_create_and_watch(served: Served, config: Config, images: Images) -> None:
    created = await trio.to_thread.run_sync(
        run_cli,
        served,
        config,
        create_from_image,
        [
            "--image",
            images.multi,
            "--writable-layer-size",
            "1G",
            "--expose-port",
            "49999",
            "--expose-port",
            "49983",
            "--probe",
            "49999",
            "--allow-out-cidr",
            "10.0.0.0/8",
            "--no-internet-access",
        ],
    )
    assert created.exit_code == 0, created.output
    job_id = created.output.strip().removeprefix("job_id: ")
    watched = await trio.to_thread.run_sync(run_cli, served, config, watch, ["--job-id", job_id])
    assert watched.exit_code == 0, watched.output
    assert "PULLING: resolving" in watched.output and "[READY] 100.0%" in watched.output
    template_id = watched.output.strip().splitlines()[-1].removeprefix("template_id: ")
    manifest = json.loads((config.templates_dir / template_id / "template.json").read_text())
    assert manifest["expose_ports"] == [49999, 49983] and manifest["probe_port"] == 49999
    assert manifest["writable_layer_mb"] == 1024
    assert manifest["network_defaults"] == {"allow_internet_access": False, "allow_out": ["10.0.0.0/8"]}


async def test_watch_of_a_failed_build_exits_non_zero_with_the_reason(
    served: Served, config: Config, images: Images
) -> None:
    created = await trio.to_thread.run_sync(
        run_cli, served, config, create_from_image, ["--image", images.arm64]
    )
    job_id = created.output.strip().removeprefix("job_id: ")
    watched = await trio.to_thread.run_sync(run_cli, served, config, watch, ["--job-id", job_id])
    assert watched.exit_code == 1
    assert "FAILED: image" in watched.output and "linux/amd64 only" in watched.output


@pytest.mark.root
async def test_build_command_uploads_the_context(
    served: Served, config: Config, images: Images, scratch: Path
) -> None:
    context = scratch / "ctx"
    (context / "big").mkdir(parents=True)
    (context / "hello.txt").write_text("hello")
    (context / "big" / "blob.bin").write_bytes(b"\0" * 1000)
    (context / ".dockerignore").write_text("big\n")
    dockerfile = scratch / "Dockerfile.cube"
    dockerfile.write_text(
        f'FROM {images.multiarch}\nARG WHO\nCOPY hello.txt /srv/$WHO.txt\nCOPY . /ctx/\nCMD ["sleep", "1"]\n'
    )
    result = await trio.to_thread.run_sync(
        run_cli,
        served,
        config,
        build,
        [
            "-f",
            str(dockerfile),
            "--build-arg",
            "WHO=world",
            "--writable-layer-size",
            "32M",
            str(context),
        ],
    )
    assert result.exit_code == 0, result.output
    template_id = result.output.strip().splitlines()[-1].removeprefix("template_id: ")
    manifest = json.loads((config.templates_dir / template_id / "template.json").read_text())
    assert manifest["start_cmd"] == ["sleep", "1"]
    listing = subprocess.run(
        ["debugfs", "-R", "ls /ctx", manifest["directory"] + "/rootfs.ext4"], capture_output=True, text=True
    ).stdout
    assert "hello.txt" in listing and "big" not in listing and ".cube-dockerfile" not in listing
    job = served.builds.jobs()[-1]
    assert any("COPY hello.txt /srv/$WHO.txt" in line for line in job.log)


@pytest.mark.root
async def test_build_command_with_the_dockerfile_in_the_context(
    served: Served, config: Config, images: Images, scratch: Path
) -> None:
    context = scratch / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {images.multiarch}\nENV FROM_CONTEXT=1\n")
    (context / ".dockerignore").write_text("Dockerfile\n")  # still sent: the build needs it
    result = await trio.to_thread.run_sync(
        run_cli, served, config, build, ["--writable-layer-size", "32M", "--detach", str(context)]
    )
    assert result.exit_code == 0, result.output
    job = served.builds.job(result.output.strip().removeprefix("job_id: "))
    assert job is not None and job.request["dockerfile_path"] == "Dockerfile"
    with trio.fail_after(60):
        while not job.finished:
            await trio.sleep(0.05)
    assert job.phase == "READY", job.reason
