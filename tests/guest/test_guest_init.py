"""POST /init: sandbox env vars for every process and kernel, the access token, signed URLs."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest


def test_init_env_vars_reach_commands_running_and_new_kernels(sandbox, agent) -> None:
    assert agent.init({"envVars": {"CUBE_SANDBOX_VAR": "from-init"}}).status_code == 204
    assert sandbox.commands.run("echo $CUBE_SANDBOX_VAR").stdout == "from-init\n"
    code = "import os; print(os.environ['CUBE_SANDBOX_VAR'])"
    assert sandbox.run_code(code).logs.stdout == ["from-init\n"]  # the kernel started at boot
    context = sandbox.create_code_context()
    assert sandbox.run_code(code, context=context).logs.stdout == ["from-init\n"]
    sandbox.remove_code_context(context)
    assert httpx.get(f"{agent.envd_url}/envs").json()["CUBE_SANDBOX_VAR"] == "from-init"


def test_metrics(agent) -> None:
    """envd's sample: what the host turns into E2B's SandboxMetric (cpu, memory, page cache, disk)."""
    metrics = httpx.get(f"{agent.envd_url}/metrics").json()
    assert metrics["cpu_count"] >= 1 and metrics["mem_total"] > metrics["mem_used"] > 0
    assert 0 <= metrics["mem_cache"] < metrics["mem_total"]
    assert 0 < metrics["disk_used"] <= metrics["disk_total"]
    assert abs(metrics["ts"] - time.time()) < 60


def test_access_token_is_enforced(agent, token_set) -> None:
    assert httpx.get(f"{agent.envd_url}/health").status_code == 204  # liveness is open, as in E2B's envd
    assert httpx.get(f"{agent.envd_url}/files", params={"path": "/etc/hostname"}).status_code == 401
    rpc = httpx.post(
        f"{agent.envd_url}/process.Process/List", json={}, headers={"Content-Type": "application/json"}
    )
    assert rpc.status_code == 401 and rpc.json()["code"] == "unauthenticated"
    assert httpx.post(f"{agent.interpreter_url}/execute", json={"code": "1"}).status_code == 401
    assert httpx.get(f"{agent.interpreter_url}/contexts").status_code == 401
    assert agent.init({"envVars": {"X": "y"}}).status_code == 401


def test_sdk_code_contexts_pass_with_the_traffic_token(secure_sandbox, token_set) -> None:
    """The SDKs send X-Access-Token only on /execute; /contexts calls carry the traffic token."""
    context = secure_sandbox.create_code_context()
    assert context.id in {c.id for c in secure_sandbox.list_code_contexts()}
    assert secure_sandbox.run_code("21 * 2", context=context).text == "42"
    secure_sandbox.restart_code_context(context)
    secure_sandbox.remove_code_context(context)


def test_sdk_without_tokens_cannot_touch_code_contexts(sandbox, token_set) -> None:
    """The same calls from a client that holds neither token: refused, not served."""
    from e2b import SandboxException

    with pytest.raises(SandboxException, match="401"):
        sandbox.create_code_context()
    with pytest.raises(SandboxException, match="401"):
        sandbox.list_code_contexts()


def test_sdk_with_token_and_signed_urls(secure_sandbox, agent) -> None:
    path = str(agent.scratch / "signed.txt")
    secure_sandbox.files.write(path, "signed")
    assert secure_sandbox.commands.run("echo ok").stdout == "ok\n"
    assert secure_sandbox.run_code("1 + 2").text == "3"
    assert httpx.get(secure_sandbox.download_url(path)).text == "signed"
    assert httpx.get(secure_sandbox.download_url(path, use_signature_expiration=60)).text == "signed"
    upload = secure_sandbox.upload_url(str(agent.scratch / "up.txt"))
    assert httpx.post(upload, files={"file": ("up.txt", b"uploaded")}).status_code == 200
    assert (agent.scratch / "up.txt").read_bytes() == b"uploaded"
    forged = secure_sandbox.download_url(path).replace("signature=v1_", "signature=v1_x")
    assert httpx.get(forged).status_code == 401


def test_expired_tampered_or_unsigned_urls_are_refused(secure_sandbox, agent) -> None:
    path = str(agent.scratch / "expiring.txt")
    secure_sandbox.files.write(path, "expiring")
    expired = httpx.get(secure_sandbox.download_url(path, use_signature_expiration=-120))
    assert (expired.status_code, expired.json()) == (
        401,
        {"code": 401, "message": "signature is already expired"},
    )
    upload = secure_sandbox.upload_url(str(agent.scratch / "late.txt"), use_signature_expiration=-120)
    assert httpx.post(upload, files={"file": ("late.txt", b"late")}).status_code == 401
    assert not (agent.scratch / "late.txt").exists()
    # An expiry pushed into the future breaks the signature that covered it.
    valid = secure_sandbox.download_url(path, use_signature_expiration=60)
    stamp = valid.split("signature_expiration=")[1].split("&")[0]
    extended = valid.replace(f"signature_expiration={stamp}", f"signature_expiration={int(stamp) + 3600}")
    refused = httpx.get(extended)
    assert (refused.status_code, refused.json()["message"]) == (401, "invalid signature")
    malformed = httpx.get(
        extended.replace(f"signature_expiration={int(stamp) + 3600}", "signature_expiration=--5")
    )
    assert malformed.status_code == 400
    unsigned = httpx.get(f"{agent.envd_url}/files", params={"path": path})
    assert (unsigned.status_code, unsigned.json()["message"]) == (401, "missing signature query parameter")


def test_a_running_kernel_draws_new_random_numbers_after_an_init_with_a_new_seed(sandbox, agent) -> None:
    """A kvm template snapshot holds its default kernel running: every clone starts with the
    same `random` state. The clone's /init brings its own seed: the kernel reseeds before
    its next run, so clones do not draw the same numbers."""
    draw = "print(random.random())"
    sandbox.run_code("import random; random.seed(1234)")
    first = sandbox.run_code(draw).logs.stdout
    sandbox.run_code("random.seed(1234)")  # the state every clone of the snapshot has
    assert sandbox.run_code(draw).logs.stdout == first  # the control: same state, same draw
    sandbox.run_code("random.seed(1234)")
    assert agent.init({"rngSeed": secrets.token_hex(32)}).status_code == 204
    assert sandbox.run_code(draw).logs.stdout != first
