"""Volumes mounted into real UML sandboxes through the unmodified JS SDK (tests/js/volume_mounts.mjs):
a volume written by one sandbox is read by the next, and bad input meanwhile gets E2B's errors and
kills nothing (the Python SDK's side, in depth: test_volume_mounts_uml.py)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import umlguests

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]


@pytest.fixture
def uml_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch, volume_max_mb=16) as service:
        yield service


def test_a_volume_written_in_one_js_sandbox_is_read_by_the_next(
    uml_service: umlguests.UmlService, js_sdk_dir: Path
) -> None:
    env = {**os.environ, "E2B_API_KEY": uml_service.key("js-volumes")}
    env.pop("E2B_DEBUG", None)
    result = subprocess.run(
        ["node", "volume_mounts.mjs"], cwd=js_sdk_dir, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["seed"] == "from the js content client"
    assert seen["read"] == "written in js sandbox 1" and seen["destroyed"] is True
    bad = seen["bad"]
    assert bad["firstStillRuns"] == "written in js sandbox 1"  # no bad request touched it
    expected = {  # the JS SDK's error class, and what the message must say
        "outsideVolume": ("", "400"),
        "outsideMountRoot": ("SandboxError", "400"),
        "secondMount": ("SandboxError", "409"),
        "destroyWhileMounted": ("", "409"),
        "missingVolume": ("", "404"),
    }
    for name, (error_type, status) in expected.items():
        failure = bad[name]
        assert failure is not None, name
        assert failure["type"].startswith(error_type) and status in failure["message"], (name, failure)
    assert seen["afterDestroy"] is not None and "404" in seen["afterDestroy"]["message"], seen["afterDestroy"]
