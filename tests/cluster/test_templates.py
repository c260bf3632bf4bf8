"""Templates across nodes (appliance/cluster/templates.py): a template made on node A only is
pulled by node B for a create through B that lands on B (A drained), verified by its digest; the
endpoints that serve it attacked (no token, a wrong token, a name that is no digest), an image
that no longer matches its digest refused, an image that is a symlink never followed, another
team's template never pulled."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from cluster_nodes import (
    as_node,
    cluster_of,
    cube_node,
    make_template,
    new_key,
    publish_templates,
    wait_for,
)

from appliance.cluster.forwarding import TOKEN_HEADER
from appliance.cluster.templates import BLOBS_PATH, DIGEST_SIDECAR, RESOLVE_PATH
from appliance.records import ROOTFS_NAME, TemplateManifest

if TYPE_CHECKING:
    from conftest import ServiceHarness

MIB = 1 << 20


def test_a_template_made_on_a_is_pulled_by_b_for_a_create_through_b(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str],
) -> None:
    a, b, _key = two_nodes
    owner, other = new_key(b, "owner"), new_key(b, "other team")
    image = make_template(a, "tpl-small", "small", owner["team"])
    publish_templates(a)
    cube_node(a, "drain", "a")
    wait_for(b, lambda c: "a" in c.view.drained and "small" in c.view.nodes["a"].templates)
    assert not (b.config.templates_dir / "tpl-small").exists()

    # Another team's key: A does not describe the template to it, B pulls nothing.
    refused = httpx.post(
        f"{b.url}/sandboxes",
        json={"templateID": "small"},
        headers={"X-API-KEY": other["key"]},
        trust_env=False,
    )
    assert refused.json() == {"code": 404, "message": "template 'small' not found"}
    assert not (b.config.templates_dir / "tpl-small").exists()

    with httpx.Client(
        base_url=b.url, headers={"X-API-KEY": owner["key"]}, timeout=60, trust_env=False
    ) as api:
        created = api.post("/sandboxes", json={"templateID": "small"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        assert created.json()["templateID"] == "tpl-small"
        live = b.run_sync_in_service(lambda: b.running.cubelet.live(sandbox_id))  # type: ignore[union-attr]
        assert live is not None and live.template.template_id == "tpl-small"  # it runs on B

        pulled = b.config.templates_dir / "tpl-small" / ROOTFS_NAME
        assert pulled.read_bytes() == image.read_bytes()
        assert pulled.stat().st_blocks * 512 < pulled.stat().st_size  # the hole stayed a hole
        assert TemplateManifest.load(pulled.parent).owner == owner["team"]
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        assert f'"sha256": "{digest}"' in (pulled.parent / DIGEST_SIDECAR).read_text()
        inode = pulled.stat().st_ino

        again = api.post("/sandboxes", json={"templateID": "small"})
        assert again.status_code == 201, again.text
        assert pulled.stat().st_ino == inode  # used as it is, not pulled again
        assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204

    # B now has it: it serves it on, to a node (its cluster listener, the cluster token) only.
    blob = f"{BLOBS_PATH}{digest}"
    with as_node(a, b) as from_a:
        served = from_a.get(blob)
        assert served.status_code == 200 and served.content == image.read_bytes()
        wrong = from_a.get(blob, headers={TOKEN_HEADER: "x" * 64})
        assert wrong.json() == {"code": 401, "message": "invalid cluster token"}
        for name in ("../tpl-small/rootfs.ext4", "0" * 64, digest.upper()):
            stray = from_a.get(f"{BLOBS_PATH}{name}")
            assert stray.status_code == 404, (name, stray.text)
    assert httpx.get(b.url + blob, trust_env=False).status_code in (
        401,
        404,
    )  # no token: the API's own answer
    plain = httpx.get(b.url + blob, headers={TOKEN_HEADER: cluster_of(a).token}, trust_env=False)
    assert plain.json() == {
        "code": 401,
        "message": "the cluster token is taken only on the cluster's TLS listener",
    }


def test_an_image_that_does_not_match_its_digest_or_is_a_symlink_is_not_pulled(
    two_nodes: tuple[ServiceHarness, ServiceHarness, str], tmp_path: Path
) -> None:
    a, b, _key = two_nodes
    owner = new_key(b, "owner")
    changed = make_template(a, "tpl-changed", "changed", owner["team"])
    # A computes (and keeps) the digest when it first describes the template...
    with as_node(b, a, owner["team"]) as from_b:
        described = from_b.get(RESOLVE_PATH, params={"name": "changed"})
    assert described.status_code == 200, described.text
    # ...then the image changes under it with its size and times kept: A describes and serves
    # what it no longer has, and B must not keep it.
    st = changed.stat()
    with changed.open("r+b") as image:
        image.write(b"tampered")
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))

    secret = tmp_path / "secret"
    secret.write_bytes(b"a file of A's host that is no template image")
    linked = make_template(a, "tpl-linked", "linked", owner["team"])
    linked.unlink()
    linked.symlink_to(secret)

    publish_templates(a)
    cube_node(a, "drain", "a")
    wait_for(b, lambda c: "a" in c.view.drained and {"changed", "linked"} <= set(c.view.nodes["a"].templates))
    with httpx.Client(
        base_url=b.url, headers={"X-API-KEY": owner["key"]}, timeout=60, trust_env=False
    ) as api:
        tampered = api.post("/sandboxes", json={"templateID": "changed"})
        assert tampered.status_code == 503, tampered.text
        message = tampered.json()["message"]
        assert message.startswith("template 'changed' could not be fetched: node a: the image's digest is")
        assert "not kept" in message
        assert not (b.config.templates_dir / "tpl-changed").exists()

        symlinked = api.post("/sandboxes", json={"templateID": "linked"})
        assert symlinked.status_code == 503, symlinked.text
        assert symlinked.json()["message"] == (
            "template 'linked' could not be fetched: node a: it answered 500:"
            " template 'linked': its image cannot be read: Too many levels of symbolic links"
        )
        assert not (b.config.templates_dir / "tpl-linked").exists()
        assert api.get("/sandboxes").json() == []  # no sandbox was made of either
