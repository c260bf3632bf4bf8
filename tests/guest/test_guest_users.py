"""Acting as another Linux user: setuid/setgid for processes and kernels, ownership of written files.

The guest's users are `user` and `root`; a test host has neither `user` nor a spare account,
so `nobody` stands in (the agent must be root to switch, as it is in the guest).
"""

from __future__ import annotations

import base64
import os
import pwd
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from connect_wire import envelope, parse_envelopes
from e2b import CommandExitException, SandboxException

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` user here")


def test_command_runs_as_the_named_user(sandbox, nobody) -> None:
    result = sandbox.commands.run("id -un; echo $HOME; pwd", user="nobody")
    # nobody's home does not exist, so the command starts in /
    assert result.stdout.splitlines() == ["nobody", nobody.pw_dir, "/"]


def _basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


@pytest.fixture
def root_only(agent) -> Path:
    """A directory `nobody` may enter but not write, holding a file only root may read."""
    directory = agent.scratch / "root-only"
    directory.mkdir(exist_ok=True)
    (directory / "secret").write_text("root's secret")
    (directory / "secret").chmod(0o600)
    private = directory / "private"
    private.mkdir(exist_ok=True)
    private.chmod(0o700)
    return directory


@pytest.fixture
def nobody_home(agent, nobody) -> Path:
    """A directory that belongs to `nobody`."""
    directory = agent.scratch / "nobody-home"
    directory.mkdir(exist_ok=True)
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    return directory


def test_files_written_for_a_user_are_theirs(sandbox, nobody_home, nobody) -> None:
    path = nobody_home / "owned/by-nobody.txt"
    sandbox.files.write(str(path), "mine", user="nobody")
    assert path.stat().st_uid == nobody.pw_uid and path.parent.stat().st_uid == nobody.pw_uid
    assert path.stat().st_gid == nobody.pw_gid
    sandbox.files.write_files([{"path": str(nobody_home / "multi/a.txt"), "data": "A"}], user="nobody")
    assert (nobody_home / "multi/a.txt").stat().st_uid == nobody.pw_uid
    entry = sandbox.files.make_dir(str(nobody_home / "made"), user="nobody")
    assert entry and (nobody_home / "made").stat().st_uid == nobody.pw_uid
    assert sandbox.files.get_info(str(nobody_home / "made"), user="nobody").owner == "nobody"


def test_a_user_cannot_read_what_only_root_may_and_root_can(sandbox, agent, root_only) -> None:
    secret = str(root_only / "secret")
    with pytest.raises(SandboxException, match="403"):
        sandbox.files.read(secret, user="nobody")
    assert sandbox.files.read(secret, user="root") == "root's secret"
    raw = httpx.get(f"{agent.envd_url}/files", params={"path": secret, "username": "nobody"})
    assert raw.status_code == 403 and raw.json()["code"] == 403
    assert "Permission denied" in raw.json()["message"]
    as_root = httpx.get(f"{agent.envd_url}/files", params={"path": secret}, headers=_basic("root"))
    assert as_root.status_code == 200 and as_root.text == "root's secret"


def test_a_user_cannot_write_or_remove_where_only_root_may(sandbox, agent, root_only) -> None:
    target = root_only / "planted.txt"
    with pytest.raises(SandboxException, match="403"):
        sandbox.files.write(str(target), "no", user="nobody")
    raw = httpx.post(
        f"{agent.envd_url}/files",
        params={"path": str(root_only / "private/new/file.txt"), "username": "nobody"},
        content=b"no",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert raw.status_code == 403
    assert not target.exists() and not (root_only / "private/new").exists()
    with pytest.raises(SandboxException, match="PERMISSION_DENIED"):
        sandbox.files.remove(str(root_only / "secret"), user="nobody")
    assert (root_only / "secret").exists()
    with pytest.raises(SandboxException, match="PERMISSION_DENIED"):
        sandbox.files.rename(str(root_only / "secret"), str(root_only / "stolen"), user="nobody")
    with pytest.raises(SandboxException, match="PERMISSION_DENIED"):
        sandbox.files.make_dir(str(root_only / "mine"), user="nobody")
    sandbox.files.write(str(target), "yes", user="root")
    assert target.read_text() == "yes" and target.stat().st_uid == 0


def test_filesystem_rpcs_act_as_the_user(sandbox, agent, root_only) -> None:
    private = str(root_only / "private")
    with pytest.raises(SandboxException, match="PERMISSION_DENIED"):
        sandbox.files.list(private, user="nobody")
    assert sandbox.files.list(private, user="root") == []
    # Connect's code for it, over raw HTTP: permission_denied with HTTP 403.
    raw = httpx.post(
        f"{agent.envd_url}/filesystem.Filesystem/ListDir",
        json={"path": private, "depth": 1},
        headers={"Connect-Protocol-Version": "1", **_basic("nobody")},
    )
    assert raw.status_code == 403 and raw.json()["code"] == "permission_denied"
    with pytest.raises(SandboxException, match="PERMISSION_DENIED"):
        sandbox.files.watch_dir(private, user="nobody")
    # Stat of an entry below an unreadable directory fails too, rather than leaking it.
    (root_only / "private/hidden").write_text("x")
    raw = httpx.post(
        f"{agent.envd_url}/filesystem.Filesystem/Stat",
        json={"path": f"{private}/hidden"},
        headers={"Connect-Protocol-Version": "1", **_basic("nobody")},
    )
    assert raw.status_code == 403 and raw.json()["code"] == "permission_denied"
    assert sandbox.files.exists(f"{private}/hidden", user="root")


def test_concurrent_users_do_not_leak_identity(sandbox, agent, root_only, nobody_home, nobody) -> None:
    """Root's and nobody's calls interleaved on the agent's worker threads keep their own identity."""
    secret = str(root_only / "secret")

    def as_root(i: int) -> str:
        return httpx.get(f"{agent.envd_url}/files", params={"path": secret, "username": "root"}).text

    def as_nobody(i: int) -> int:
        path = str(nobody_home / f"c{i}.txt")
        written = httpx.post(
            f"{agent.envd_url}/files",
            params={"path": path, "username": "nobody"},
            content=b"x",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert written.status_code == 200
        return httpx.get(f"{agent.envd_url}/files", params={"path": secret, "username": "nobody"}).status_code

    with ThreadPoolExecutor(8) as pool:
        roots = [pool.submit(as_root, i) for i in range(20)]
        nobodies = [pool.submit(as_nobody, i) for i in range(20)]
        assert {f.result() for f in roots} == {"root's secret"}
        assert {f.result() for f in nobodies} == {403}
    assert {(nobody_home / f"c{i}.txt").stat().st_uid for i in range(20)} == {nobody.pw_uid}


def _tmp_entries_of(uid: int) -> set[str]:
    found = set()
    for entry in os.scandir("/tmp"):
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                found.add(entry.name)
        except FileNotFoundError:
            pass
    return found


def test_kernels_run_as_the_default_user(sandbox, agent, nobody) -> None:
    """... and one whose home is not writable (nobody's) leaves nothing behind in /tmp: IPython and
    matplotlib would make their directories there."""
    before = _tmp_entries_of(nobody.pw_uid)
    assert agent.init({"defaultUser": "nobody"}).status_code == 204
    try:
        context = sandbox.create_code_context()
        code = (
            "import os, IPython, matplotlib\nprint(os.getuid(), os.getcwd(), IPython.paths.get_ipython_dir())"
        )
        execution = sandbox.run_code(code, context=context)
        uid, cwd, ipython_dir = execution.logs.stdout[0].split()
        assert (uid, cwd) == (str(nobody.pw_uid), "/")
        assert ipython_dir.startswith(str(agent.home)), "IPython's directory is the kernel's own"
        sandbox.remove_code_context(context)
    finally:
        agent.init({"defaultUser": pwd.getpwuid(os.geteuid()).pw_name})  # the session agent's default
    assert _tmp_entries_of(nobody.pw_uid) - before == set()


def test_a_signed_url_cannot_be_raised_to_another_user(
    secure_sandbox, token_set, agent, root_only, nobody_home, nobody
) -> None:
    """A signed URL acts as the user it was signed for (the default user when it names none),
    whatever Authorization header comes with it."""
    secret = str(root_only / "secret")
    download = secure_sandbox.download_url(secret, user="nobody")
    assert httpx.get(download).status_code == 403
    assert httpx.get(download, headers=_basic("root")).status_code == 403
    planted = str(root_only / "planted-by-url.txt")
    upload = secure_sandbox.upload_url(planted, user="nobody")
    assert httpx.post(upload, files={"file": ("x", b"x")}, headers=_basic("root")).status_code == 403
    assert not os.path.exists(planted)
    assert agent.init({"defaultUser": "nobody"}, token=token_set).status_code == 204
    try:
        unnamed = secure_sandbox.download_url(secret)  # signed for the default user: nobody now
        assert httpx.get(unnamed, headers=_basic("root")).status_code == 403
        mine = str(nobody_home / "by-url.txt")
        written = httpx.post(
            secure_sandbox.upload_url(mine), files={"file": ("x", b"x")}, headers=_basic("root")
        )
        assert written.status_code == 200 and os.stat(mine).st_uid == nobody.pw_uid
    finally:
        own_name = pwd.getpwuid(os.geteuid()).pw_name
        assert agent.init({"defaultUser": own_name}, token=token_set).status_code == 204


def _start_as(agent, user: str, argv: list[str]) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Start `argv` as `user` over raw Connect: its events, its end-of-stream message."""
    request = envelope({"process": {"cmd": argv[0], "args": argv[1:]}, "stdin": False})
    headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1", **_basic(user)}
    url = f"{agent.envd_url}/process.Process/Start"
    response = httpx.post(url, content=request, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    messages = parse_envelopes(response.content)
    return [message["event"] for flags, message in messages if flags == 0], messages[-1][1]  # type: ignore[misc]


def _stdout(events: list[dict[str, object]]) -> str:
    chunks = [event["data"].get("stdout", "") for event in events if "data" in event]  # type: ignore[attr-defined]
    return b"".join(base64.b64decode(chunk) for chunk in chunks).decode()


# What a process holds after the switch: every uid and gid, the groups, the capabilities.
IDENTITY_SCRIPT = "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb):' /proc/self/status; " + (
    "python3 -c 'import os; os.setuid(0)'"
)


def _assert_holds_only(status_lines: str, account: pwd.struct_passwd) -> None:
    fields = {
        line.split(":")[0]: line.split(":")[1].split() for line in status_lines.splitlines() if ":" in line
    }
    assert fields["Uid"] == [str(account.pw_uid)] * 4 and fields["Gid"] == [str(account.pw_gid)] * 4
    assert sorted(map(int, fields["Groups"])) == sorted(set(os.getgrouplist(account.pw_name, account.pw_gid)))
    assert {fields[name][0] for name in ("CapPrm", "CapEff", "CapAmb")} == {"0000000000000000"}


def test_a_users_command_cannot_take_root_back(sandbox, nobody) -> None:
    """Commands of system binaries (the SDK's /bin/bash) start through setpriv, not CPython's
    switch: real, effective, saved and filesystem ids all the user's, root's groups and
    capabilities gone, so setuid(0) fails."""
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run(IDENTITY_SCRIPT, user="nobody")
    _assert_holds_only(failed.value.stdout, nobody)
    assert "PermissionError" in failed.value.stderr


def test_a_command_outside_the_system_dirs_switches_user_too(agent, nobody) -> None:
    """A script in a scratch directory keeps CPython's own switch (fork): the same identity."""
    script = agent.scratch / "whoami.sh"
    script.write_text(f"#!/bin/sh\n{IDENTITY_SCRIPT}\n")
    script.chmod(0o755)
    events, _end = _start_as(agent, "nobody", [str(script)])
    assert events[-1]["end"]["exitCode"] == 1  # type: ignore[index]
    _assert_holds_only(_stdout(events), nobody)


def test_a_missing_command_still_fails_its_start(agent, nobody) -> None:
    """Exec failures stay errors of the call (not exit 127 of a wrapper), in and out of the system dirs."""
    for command in ("/usr/bin/cube-no-such-command", str(agent.scratch / "no-such-script")):
        events, end = _start_as(agent, "nobody", [command])
        assert events == [] and end["error"]["code"] == "invalid_argument"  # type: ignore[index]
