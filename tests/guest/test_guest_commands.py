"""commands.* and pty.* through the unmodified Python SDK (process.Process RPCs)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from e2b import CommandExitException, PtySize, TimeoutException


def test_foreground_command_output_and_exit_code(sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2; exit 0")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_nonzero_exit_raises_with_output(sandbox) -> None:
    with pytest.raises(CommandExitException) as caught:
        sandbox.commands.run("echo partial; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "partial\n"


def test_envs_cwd_and_home(sandbox, agent) -> None:
    agent.scratch.joinpath("work").mkdir(exist_ok=True)
    result = sandbox.commands.run(
        'echo "$GREETING" && pwd && echo "$HOME"',
        envs={"GREETING": "hi there"},
        cwd=str(agent.scratch / "work"),
    )
    assert result.stdout.splitlines() == ["hi there", str(agent.scratch / "work"), str(agent.home)]


def test_command_env_vars_stay_with_their_command(sandbox) -> None:
    assert sandbox.commands.run('echo "$SCOPED"', envs={"SCOPED": "secret"}).stdout == "secret\n"
    background = sandbox.commands.run('sleep 0.2; echo "$SCOPED"', envs={"SCOPED": "bg"}, background=True)
    assert sandbox.commands.run('echo "[$SCOPED]"').stdout == "[]\n"
    assert (
        sandbox.commands.run("python3 -c \"import os; print(os.environ.get('SCOPED'))\"").stdout == "None\n"
    )
    assert background.wait().stdout == "bg\n"
    assert sandbox.commands.run('echo "[$SCOPED]"').stdout == "[]\n"


def test_default_cwd_is_the_users_home(sandbox, agent) -> None:
    assert sandbox.commands.run("pwd").stdout.strip() == str(agent.home)


def test_multibyte_output_split_across_chunks(sandbox) -> None:
    text = "é" * 100_000
    result = sandbox.commands.run(f"python3 -c \"import sys; sys.stdout.write('{text[:1]}' * 100000)\"")
    assert result.stdout == text


def test_background_command_wait_and_list(sandbox) -> None:
    handle = sandbox.commands.run("sleep 0.3; echo done", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    result = handle.wait()
    assert result.stdout == "done\n" and result.exit_code == 0
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]


def test_kill_background_command_and_its_children(sandbox) -> None:
    # A duration no other test on this (shared) host runs: pgrep sees every process here.
    duration = f"100.{random.randrange(10**9)}"
    handle = sandbox.commands.run(f"sleep {duration} & sleep {duration}; wait", background=True)
    time.sleep(0.2)
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as caught:
        handle.wait()
    assert caught.value.exit_code == -1 and "killed" in caught.value.error
    # the whole process group went: no `sleep` of it is left behind
    survivors = sandbox.commands.run(f"pgrep -f '^sleep {duration}$' || true").stdout
    assert survivors == ""


def test_kill_unknown_pid_returns_false(sandbox) -> None:
    assert sandbox.commands.kill(999_999) is False


def test_stdin_send_and_close(sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "line one\n")
    handle.send_stdin("line two\n")
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "line one\nline two\n"


def test_stream_input(sandbox) -> None:
    handle = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, iter([b"abc", "def", b"\n"]))
    handle.close_stdin()
    assert handle.wait().stdout.strip() == "7"


def test_connect_to_running_command(sandbox) -> None:
    handle = sandbox.commands.run("sleep 0.5; echo after-reconnect", background=True)
    handle.disconnect()
    reconnected = sandbox.commands.connect(handle.pid)
    assert reconnected.wait().stdout == "after-reconnect\n"


def test_timeout_kills_the_command(sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30.0137", timeout=1)  # a duration no other process on the host sleeps
    assert time.monotonic() - started < 10
    assert "sleep 30.0137" not in sandbox.commands.run("ps -eo args").stdout


def test_run_as_root_via_basic_auth(sandbox) -> None:
    # On a test host the agent's own user stands in for missing users; root exists everywhere.
    assert sandbox.commands.run("id -u", user="root").stdout.strip() in ("0", str(__import__("os").getuid()))


def test_pty_create_send_resize(sandbox) -> None:
    output = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), envs={"PS1": "$ "})
    sandbox.pty.send_stdin(terminal.pid, b"stty size; tty\n")
    # The shell exits only after the resize: resizing a terminal whose shell is gone is a 404.
    sandbox.pty.resize(terminal.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(terminal.pid, b"exit\n")
    result = terminal.wait(on_pty=lambda data: output.extend(data))
    text = output.decode(errors="replace")
    assert "/dev/pts/" in text
    assert "24 80" in text or "40 120" in text
    assert result.exit_code == 0


def test_pty_resize_is_seen_by_the_program(sandbox) -> None:
    output = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.resize(terminal.pid, PtySize(rows=33, cols=99))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; exit\n")
    terminal.wait(on_pty=lambda data: output.extend(data))
    assert "33 99" in output.decode(errors="replace")


def test_the_agents_own_import_path_is_not_inherited(sandbox) -> None:
    agent_import_root = str(Path(__file__).resolve().parents[2])  # the agent runs with it on PYTHONPATH
    assert agent_import_root not in sandbox.commands.run("echo ${PYTHONPATH:-}").stdout
