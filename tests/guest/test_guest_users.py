"""Acting as another Linux user: setuid/setgid for processes and kernels, ownership of written files.

The guest's users are `user` and `root`; a test host has neither `user` nor a spare account,
so `nobody` stands in (the agent must be root to switch, as it is in the guest).
"""

from __future__ import annotations

import os
import pwd

import pytest

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


def test_files_written_for_a_user_are_theirs(sandbox, agent, nobody) -> None:
    path = agent.scratch / "owned/by-nobody.txt"
    sandbox.files.write(str(path), "mine", user="nobody")
    assert path.stat().st_uid == nobody.pw_uid and path.parent.stat().st_uid == nobody.pw_uid


def test_kernels_run_as_the_default_user(sandbox, agent, nobody) -> None:
    assert agent.init({"defaultUser": "nobody"}).status_code == 204
    try:
        context = sandbox.create_code_context()
        execution = sandbox.run_code("import os; print(os.getuid(), os.getcwd())", context=context)
        assert execution.logs.stdout == [f"{nobody.pw_uid} /\n"]
        sandbox.remove_code_context(context)
    finally:
        agent.init({"defaultUser": "user"})
