"""Who may talk to an agent: its boot token until /init, then only the sandbox's tokens.

Each test starts its own agent on ports of its own, unclaimed as a pooled, template-build
or probe guest is (the session agent of conftest.py is claimed at start). The attacks:
anyone who reaches an unclaimed guest's envd must not start a process, touch a file or
claim it; once claimed, the boot token (shared by every clone of a kvm snapshot) is dead.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
from collections.abc import Iterator

import httpx
import pytest
from connect_wire import envelope, parse_envelopes

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import AgentProcess, running_agent

ENVD_PORT = 49873
INTERPRETER_PORT = 49874
ENVD = f"http://127.0.0.1:{ENVD_PORT}"
INTERPRETER = f"http://127.0.0.1:{INTERPRETER_PORT}"
SANDBOX_TOKEN = "sandbox-envd-token"
TRAFFIC_TOKEN = "sandbox-traffic-token"
STREAM_HEADERS = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}
UNARY_HEADERS = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


@pytest.fixture
def unclaimed() -> Iterator[AgentProcess]:
    """A fresh agent (envd only) nobody has sent /init yet: a pooled guest's."""
    with running_agent("--envd-port", str(ENVD_PORT), "--no-interpreter") as agent:
        agent.wait_for_line(READY_LINE)
        yield agent


@pytest.fixture
def unclaimed_with_interpreter() -> Iterator[AgentProcess]:
    ports = ("--envd-port", str(ENVD_PORT), "--interpreter-port", str(INTERPRETER_PORT))
    with running_agent(*ports) as agent:
        agent.wait_for_line(INTERPRETER_READY_LINE)
        yield agent


Headers = dict[str, str | bytes]


def _token(value: str | bytes) -> Headers:
    return {"X-Access-Token": value}


def _start(command: str, headers: Headers) -> httpx.Response:
    body = envelope({"process": {"cmd": "/bin/sh", "args": ["-c", command]}, "stdin": False})
    return httpx.post(f"{ENVD}/process.Process/Start", content=body, headers={**STREAM_HEADERS, **headers})


def _stdout(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    out = b""
    for _flags, message in parse_envelopes(response.content):
        data = (message.get("event") or {}).get("data") or {}  # type: ignore[union-attr]
        if "stdout" in data:
            out += base64.b64decode(data["stdout"])
    return out.decode()


def _refused(response: httpx.Response) -> bool:
    return response.status_code == 401


def test_unclaimed_agent_refuses_every_call_without_its_boot_token(unclaimed: AgentProcess) -> None:
    planted = unclaimed.home / "planted"
    for headers in ({}, _token("wrong"), _token("é-not-ascii".encode()), _token(unclaimed.boot_token + "x")):
        started = _start(f"touch {planted}", headers)
        assert _refused(started) and started.json()["code"] == "unauthenticated"
        listed = httpx.post(
            f"{ENVD}/filesystem.Filesystem/ListDir", json={"path": "/"}, headers={**UNARY_HEADERS, **headers}
        )
        assert _refused(listed) and listed.json()["code"] == "unauthenticated"
        upload = httpx.post(
            f"{ENVD}/files", params={"path": str(planted)}, content=b"x",
            headers={"Content-Type": "application/octet-stream", **headers},
        )  # fmt: skip
        assert _refused(upload)
        assert _refused(httpx.get(f"{ENVD}/files", params={"path": "/etc/hostname"}, headers=headers))
        assert _refused(httpx.get(f"{ENVD}/envs", headers=headers))
        assert _refused(httpx.get(f"{ENVD}/metrics", headers=headers))
        # Claiming it with a token of one's own, before the host does: refused too.
        assert _refused(httpx.post(f"{ENVD}/init", json={"accessToken": "mine"}, headers=headers))
    # A "signed" URL before any sandbox token exists signs nothing.
    signed = {"path": "/etc/hostname", "signature": "v1_x", "signature_expiration": "9999999999"}
    assert _refused(httpx.get(f"{ENVD}/files", params=signed))
    assert not planted.exists()
    # Liveness alone stays open (E2B's envd: /health needs no token): the host's and a template's probe.
    assert httpx.get(f"{ENVD}/health").status_code == 204
    # The host's own claim still works: nothing above took the guest over.
    assert unclaimed.claim(ENVD_PORT, {"accessToken": SANDBOX_TOKEN}) == 204


def test_boot_token_works_until_init_then_only_the_sandbox_token(unclaimed: AgentProcess) -> None:
    boot = _token(unclaimed.boot_token)
    assert _stdout(_start("echo before-claim", boot)) == "before-claim\n"
    path = str(unclaimed.home / "by-host.txt")
    written = httpx.post(
        f"{ENVD}/files", params={"path": path}, content=b"host",
        headers={"Content-Type": "application/octet-stream", **boot},
    )  # fmt: skip
    assert written.status_code == 200
    assert unclaimed.claim(ENVD_PORT, {"accessToken": SANDBOX_TOKEN}) == 204

    # The boot token is dead: a kvm snapshot's clones all hold it, and their users can read it.
    assert _refused(_start("echo boot-token", boot))
    assert _refused(httpx.get(f"{ENVD}/files", params={"path": path}, headers=boot))
    assert _refused(httpx.post(f"{ENVD}/init", json={"accessToken": "taken-over"}, headers=boot))
    assert _refused(_start("echo anyone", {}))
    sandbox = _token(SANDBOX_TOKEN)
    assert _stdout(_start("echo owner", sandbox)) == "owner\n"
    assert httpx.get(f"{ENVD}/files", params={"path": path}, headers=sandbox).text == "host"
    # Re-init (E2B's resume) is the sandbox token holder's.
    assert httpx.post(f"{ENVD}/init", json={"envVars": {"A": "1"}}, headers=sandbox).status_code == 204


def test_an_agent_without_a_boot_token_refuses_everything_but_health() -> None:
    """No token on the kernel command line (a runtime that forgot it) fails closed, never open."""
    with running_agent("--envd-port", str(ENVD_PORT), "--no-interpreter", boot_token="") as agent:
        agent.wait_for_line(READY_LINE)
        assert "no boot token" in agent.stderr()
        assert _refused(_start("echo open", {}))
        assert _refused(_start("echo open", _token("")))
        assert _refused(httpx.post(f"{ENVD}/init", json={}, headers=_token("")))
        assert httpx.get(f"{ENVD}/health").status_code == 204


def _interpreter_calls(headers: Headers) -> dict[str, int]:
    """Every route of port 49999 with `headers`; the status of each."""
    statuses = {}
    created = httpx.post(f"{INTERPRETER}/contexts", json={}, headers=headers, timeout=60)
    statuses["create"] = created.status_code
    context_id = created.json()["id"] if created.status_code == 200 else "0" * 32
    statuses["list"] = httpx.get(f"{INTERPRETER}/contexts", headers=headers).status_code
    statuses["execute"] = httpx.post(
        f"{INTERPRETER}/execute",
        json={"code": "1 + 1", "context_id": context_id},
        headers=headers,
        timeout=60,
    ).status_code
    statuses["restart"] = httpx.post(
        f"{INTERPRETER}/contexts/{context_id}/restart", headers=headers, timeout=60
    ).status_code
    statuses["delete"] = httpx.delete(f"{INTERPRETER}/contexts/{context_id}", headers=headers).status_code
    return statuses


def test_every_code_interpreter_route_needs_a_token(unclaimed_with_interpreter: AgentProcess) -> None:
    agent = unclaimed_with_interpreter
    refused = {"create": 401, "list": 401, "execute": 401, "restart": 401, "delete": 401}
    allowed = {"create": 200, "list": 200, "execute": 200, "restart": 204, "delete": 204}
    assert _interpreter_calls({}) == refused
    assert _interpreter_calls({"E2B-Traffic-Access-Token": TRAFFIC_TOKEN}) == refused
    assert _interpreter_calls(_token(agent.boot_token)) == allowed  # the host, before the claim
    body = {"accessToken": SANDBOX_TOKEN, "trafficAccessToken": TRAFFIC_TOKEN}
    assert agent.claim(ENVD_PORT, body) == 204
    assert _interpreter_calls({}) == refused
    assert _interpreter_calls(_token(agent.boot_token)) == refused
    assert _interpreter_calls({"E2B-Traffic-Access-Token": "wrong"}) == refused
    # What the SDKs send: X-Access-Token on /execute, E2B-Traffic-Access-Token on every call.
    assert _interpreter_calls(_token(SANDBOX_TOKEN)) == allowed
    assert _interpreter_calls({"E2B-Traffic-Access-Token": TRAFFIC_TOKEN}) == allowed
    # The traffic token opens port 49999 only, never envd.
    assert _refused(_start("echo traffic", {"E2B-Traffic-Access-Token": TRAFFIC_TOKEN}))
    assert httpx.get(f"{INTERPRETER}/health").status_code == 200
    executed = httpx.post(f"{INTERPRETER}/execute", json={"code": "6 * 7"}, headers=_token(SANDBOX_TOKEN))
    results = [json.loads(line) for line in executed.text.splitlines()]
    assert {"type": "result", "text": "42"}.items() <= next(
        r for r in results if r["type"] == "result"
    ).items()


def test_unknown_users_are_refused_never_served_as_root(sandbox, agent) -> None:
    """A user name the system does not have (Basic auth, `username`, or the sandbox default) is
    an error: the agent (root in a guest) never stands in for it."""
    from e2b import AuthenticationException

    with pytest.raises(AuthenticationException, match="unknown user 'no-such-user'"):
        sandbox.commands.run("id -u > /tmp/ran-as", user="no-such-user")
    with pytest.raises(AuthenticationException):
        sandbox.files.write(str(agent.scratch / "unknown.txt"), "x", user="no-such-user")
    assert not (agent.scratch / "unknown.txt").exists()
    basic = {"Authorization": "Basic " + base64.b64encode(b"no-such-user:").decode()}
    listed = httpx.post(
        f"{agent.envd_url}/filesystem.Filesystem/ListDir",
        json={"path": "/"},
        headers={**UNARY_HEADERS, **basic},
    )
    assert (listed.status_code, listed.json()["code"]) == (401, "unauthenticated")
    read = httpx.get(f"{agent.envd_url}/files", params={"path": "/etc/hostname", "username": "no-such-user"})
    assert (read.status_code, read.json()) == (401, {"code": 401, "message": "unknown user 'no-such-user'"})
    own_name = pwd.getpwuid(os.geteuid()).pw_name
    assert agent.init({"defaultUser": "no-such-user"}).status_code == 204
    try:
        with pytest.raises(AuthenticationException, match="unknown user"):
            sandbox.commands.run("id -u")
        with pytest.raises(AuthenticationException):
            sandbox.files.read("/etc/hostname")
    finally:
        assert agent.init({"defaultUser": own_name}).status_code == 204
    assert sandbox.commands.run("id -un").stdout == f"{own_name}\n"
