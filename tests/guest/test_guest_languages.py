"""run_code in every language E2B's template has (Python, JavaScript, TypeScript, R, Java, Bash),
through the unmodified Python SDK against the agent on this host.

The host has what the default template has for them (installer/install.sh --dev): R with
IRkernel, a JDK with jshell, bash_kernel, Node.js with Debian's typescript and acorn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from freeports import free_ports
from hostprocs import descendants

from appliance.guest import INTERPRETER_READY_LINE, READY_LINE
from appliance.guest.launcher import running_agent

# language → (code printing "Hello, World!", what it prints, code whose value is the working directory)
HELLO = {
    "python": ("print('Hello, World!')", ["Hello, World!\n"], "import os; os.getcwd()"),
    "javascript": ("console.log('Hello, World!')", ["Hello, World!\n"], "process.cwd()"),
    "typescript": (
        "const greeting: string = 'Hello, World!'; console.log(greeting)",
        ["Hello, World!\n"],
        "const here: string = process.cwd(); here",
    ),
    "r": ('print("Hello, World!")', ['[1] "Hello, World!"\n'], "cat(getwd())"),
    # println's text and its line break arrive apart, as from E2B's Java kernel.
    "java": (
        'System.out.println("Hello, World!")',
        ["Hello, World!", "\n"],
        'System.getProperty("user.dir")',
    ),
    "bash": ("echo 'Hello, World!'", ["Hello, World!\n"], "pwd"),
}
# language → (code reading env var NAME, code reading NAME with "default" when unset, how it answers)
READ_ENV = {
    "python": ("import os; os.getenv('{name}')", "import os; os.getenv('{name}', 'default')", "text"),
    "javascript": ("process.env.{name}", "process.env.{name} || 'default'", "text"),
    "typescript": ("process.env.{name} as string", "process.env.{name} ?? 'default'", "text"),
    "r": ("Sys.getenv('{name}')", "Sys.getenv('{name}', unset = 'default')", "r"),
    # Java cannot change its environment: env vars are system properties there, as in E2B's template.
    "java": ('System.getProperty("{name}")', 'System.getProperty("{name}", "default")', "text"),
    "bash": ("echo ${name}", "echo ${{{name}:-default}}", "stdout"),
}
# R, Java and bash run a second or more per cell (IRkernel, jshell, bash_kernel's prompt
# round trips): the per-language tests run them outside the developer loop; the error and
# quoting tests below keep all six in it.
HEAVY = ("r", "java", "bash")
LANGUAGES = [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name for name in HELLO]


def _answer(execution, how: str) -> str:
    assert execution.error is None, execution.error
    if how == "stdout":
        return "".join(execution.logs.stdout).strip()
    if how == "r":  # IRkernel shows values as display data: `[1] "value"`
        return execution.results[0].text.removeprefix("[1] ").strip('"')
    return execution.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_hello_world_in_each_language(sandbox, language: str) -> None:
    code, printed, _ = HELLO[language]
    execution = sandbox.run_code(code, language=language)
    assert execution.error is None, execution.error
    assert execution.logs.stdout == printed


@pytest.mark.parametrize("language", LANGUAGES)
def test_context_runs_in_its_cwd_and_counts_its_executions(sandbox, agent, language: str) -> None:
    directory = agent.scratch / f"cwd-{language}"
    directory.mkdir(exist_ok=True)
    context = sandbox.create_code_context(language=language, cwd=str(directory))
    try:
        assert (context.language, context.cwd) == (language, str(directory))
        assert context.id in [c.id for c in sandbox.list_code_contexts()]
        execution = sandbox.run_code(HELLO[language][2], context=context)
        assert execution.error is None, execution.error
        shown = execution.text or "".join(execution.logs.stdout).strip()
        assert shown == str(directory)
        assert execution.execution_count == 1
        assert sandbox.run_code(HELLO[language][0], context=context).execution_count == 2
    finally:
        sandbox.remove_code_context(context)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]


@pytest.mark.parametrize("language", LANGUAGES)
def test_env_vars_for_one_execution_and_for_the_sandbox(sandbox, agent, language: str) -> None:
    name = f"CUBE_{language.upper()}_VAR"
    read, read_or_default, how = (template.format(name=name) for template in READ_ENV[language])
    context = sandbox.create_code_context(language=language)  # started before /init: gets it live
    try:
        assert _answer(sandbox.run_code(read, context=context, envs={name: "bar"}), how) == "bar"
        assert _answer(sandbox.run_code(read_or_default, context=context), how) == "default"
        assert agent.init({"envVars": {name: "sandbox-wide"}}).status_code == 204
        assert _answer(sandbox.run_code(read, context=context), how) == "sandbox-wide"
        overridden = sandbox.run_code(read, context=context, envs={name: "overwrite"})
        assert _answer(overridden, how) == "overwrite"
        assert _answer(sandbox.run_code(read, context=context), how) == "sandbox-wide"
        # A context started after /init has it from the start.
        assert _answer(sandbox.run_code(read, language=language), how) == "sandbox-wide"
    finally:
        sandbox.remove_code_context(context)


def test_env_values_are_data_not_code(sandbox) -> None:
    """A value full of each language's quoting characters arrives as it was sent, and runs nothing."""
    value = "a'b\"c`$(touch /tmp/cube-pwned)\\n${HOME};\n--"
    printers = {
        "python": ("import os; print(os.environ['CUBE_QUOTED'], end='')", ""),
        "javascript": ("console.log(process.env.CUBE_QUOTED)", "\n"),
        "typescript": ("console.log(process.env.CUBE_QUOTED as string)", "\n"),
        "r": ("cat(Sys.getenv('CUBE_QUOTED'))", ""),
        "java": ('System.out.print(System.getProperty("CUBE_QUOTED"))', ""),
        "bash": ('echo "$CUBE_QUOTED"', "\n"),
    }
    for language, (code, end) in printers.items():
        # A name no language can have: skipped where it cannot be set, never run.
        envs = {"CUBE_QUOTED": value, "BAD;$(touch /tmp/cube-pwned)'\")": "x"}
        execution = sandbox.run_code(code, language=language, envs=envs)
        assert execution.error is None, (language, execution.error)
        assert "".join(execution.logs.stdout) == value + end, language
    assert not os.path.exists("/tmp/cube-pwned")


@pytest.mark.parametrize(
    ("language", "code", "name", "value"),
    [
        ("r", "stop('boom')", "ERROR", "boom"),
        ("java", "int[] a = new int[1];\na[3] = 1;", "ArrayIndexOutOfBoundsException", "out of bounds"),
        ("java", "undefinedMethod()", "CompilationException", "cannot find symbol"),
        ("bash", "ls /nonexistent-dir", "", "2"),
        ("typescript", "throw new RangeError('too far')", "RangeError", "too far"),
    ],
)
def test_errors_have_name_and_value(sandbox, language: str, code: str, name: str, value: str) -> None:
    execution = sandbox.run_code(code, language=language)
    assert execution.error is not None and execution.error.name == name
    assert value in execution.error.value


@pytest.mark.slow  # a fresh R, Java and bash kernel each, and a client timeout: ~5 s apiece
@pytest.mark.parametrize(
    ("language", "setup", "stuck", "check", "expected"),
    [
        ("r", "kept <- 41", "Sys.sleep(300)", "cat(kept + 1)", "42"),
        ("java", "int kept = 41;", "while (true) {}", "kept + 1", "42"),
        ("bash", "KEPT=41", "sleep 300", "echo $((KEPT + 1))", "42"),
    ],
)
def test_client_timeout_interrupts_the_cell_and_keeps_state(
    sandbox, language: str, setup: str, stuck: str, check: str, expected: str
) -> None:
    from e2b import TimeoutException

    context = sandbox.create_code_context(language=language)
    try:
        assert sandbox.run_code(setup, context=context).error is None
        with pytest.raises(TimeoutException):
            sandbox.run_code(stuck, context=context, timeout=2)
        after = sandbox.run_code(check, context=context, timeout=30)
        assert after.error is None, after.error
        assert (after.text or "".join(after.logs.stdout)).strip() == expected
    finally:
        sandbox.remove_code_context(context)


def _kernel_processes(agent_pid: int) -> list[str]:
    """The command lines of every process below the agent (its kernels and theirs)."""
    return [command for _, _, command in descendants(agent_pid)]


@pytest.mark.slow  # an agent of its own, then R's and Java's kernels started
def test_other_languages_start_only_on_first_use() -> None:
    """An agent starts Python's kernel alone: R, Java, Node and bash_kernel cost a sandbox nothing
    until code in them runs. (An agent of its own, on other ports than the session's.)"""
    envd_port, interpreter_port = free_ports(2)
    ports = ("--envd-port", str(envd_port), "--interpreter-port", str(interpreter_port))
    url = f"http://127.0.0.1:{interpreter_port}"
    with running_agent(*ports) as started:
        started.wait_for_line(READY_LINE)
        assert started.claim(envd_port) == 204  # left open, as the SDK's debug mode has it
        started.wait_for_line(INTERPRETER_READY_LINE)
        kernels = _kernel_processes(started.process.pid)
        assert len(kernels) == 1 and "python_shell.py" in kernels[0], kernels  # shell_kernel.py's
        listed = httpx.get(f"{url}/contexts").json()
        assert sorted(context["language"] for context in listed) == ["javascript", "python"]
        assert len(_kernel_processes(started.process.pid)) == 1  # listed, not started

        def run(code: str, language: str) -> list[dict[str, object]]:
            response = httpx.post(f"{url}/execute", json={"code": code, "language": language}, timeout=120)
            return [json.loads(line) for line in response.text.splitlines()]

        assert {"type": "stdout", "text": "42"}.items() <= run("cat(6 * 7)", "r")[0].items()
        kernels = _kernel_processes(started.process.pid)
        assert len(kernels) == 2 and any("IRkernel" in args for args in kernels), kernels
        assert run("6 * 7", "java")[0]["text"] == "42"
        assert any("JavaKernel" in args for args in _kernel_processes(started.process.pid))


def test_typescript_and_javascript_contexts_are_separate(sandbox) -> None:
    ts = sandbox.create_code_context(language="ts")
    try:
        assert ts.language == "typescript"
        sandbox.run_code("const onlyHere: number = 1", context=ts)
        assert sandbox.run_code("typeof onlyHere", context=ts).text == "number"
        assert sandbox.run_code("typeof onlyHere", language="js").text == "undefined"
    finally:
        sandbox.remove_code_context(ts)


def test_javascript_requires_resolve_from_the_contexts_directory(sandbox, agent) -> None:
    package = agent.scratch / "js-project" / "node_modules" / "cube-local-package"
    package.mkdir(parents=True, exist_ok=True)
    (package / "index.js").write_text("module.exports = { answer: 42 };\n")
    context = sandbox.create_code_context(language="js", cwd=str(Path(package).parents[1]))
    try:
        assert sandbox.run_code("require('cube-local-package').answer", context=context).text == "42"
        imported = sandbox.run_code("import pkg from 'cube-local-package'\npkg.answer", context=context)
        assert imported.error is None and imported.text == "42"
    finally:
        sandbox.remove_code_context(context)


@pytest.mark.root
def test_kernels_run_as_the_default_user(sandbox, agent) -> None:
    """As root (the agent in a guest), kernels run as the sandbox's user: here `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    whoami = {
        "python": "import os, pwd; pwd.getpwuid(os.getuid()).pw_name",
        "javascript": "require('os').userInfo().username",
        "typescript": "const os2: any = require('os'); os2.userInfo().username",
        "r": "cat(Sys.info()[['effective_user']])",
        "java": "ProcessHandle.current().info().user().get()",
        "bash": "id -un",
    }
    assert agent.init({"defaultUser": "nobody"}).status_code == 204
    try:
        for language, code in whoami.items():
            context = sandbox.create_code_context(language=language)
            try:
                execution = sandbox.run_code(code, context=context)
                assert execution.error is None, (language, execution.error)
                assert (execution.text or "".join(execution.logs.stdout)).strip() == "nobody", language
            finally:
                sandbox.remove_code_context(context)
    finally:
        agent.init({"defaultUser": "nobody"})  # as the session agent started (conftest)
