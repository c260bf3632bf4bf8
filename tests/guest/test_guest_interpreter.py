"""run_code and code contexts through the unmodified Python SDK (port 49999, NDJSON)."""

from __future__ import annotations

import base64
import re
import time

import httpx
import pytest


def test_print_and_main_result(sandbox) -> None:
    execution = sandbox.run_code(
        "import math\nroots = [math.sqrt(x) for x in [1, 4, 9]]\nprint(roots)\nroots\n"
    )
    assert execution.logs.stdout == ["[1.0, 2.0, 3.0]\n"]
    assert execution.text == "[1.0, 2.0, 3.0]"
    assert execution.error is None and execution.execution_count >= 1


def test_stderr_and_state_across_calls(sandbox) -> None:
    sandbox.run_code("x = 42")
    execution = sandbox.run_code("import sys\nprint(x)\nprint('warn', file=sys.stderr)")
    assert execution.logs.stdout == ["42\n"] and execution.logs.stderr == ["warn\n"]


def test_error_with_traceback(sandbox) -> None:
    execution = sandbox.run_code("def f():\n    raise ValueError('test error')\nf()")
    assert execution.error.name == "ValueError" and execution.error.value == "test error"
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", execution.error.traceback)  # IPython colours it
    assert "ValueError" in traceback and "f()" in traceback


def test_matplotlib_figure_is_a_png_result(sandbox) -> None:
    execution = sandbox.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert execution.error is None
    png = next(result.png for result in execution.results if result.png)
    assert base64.b64decode(png).startswith(b"\x89PNG")


def test_pandas_dataframe_is_an_html_result(sandbox) -> None:
    execution = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert "<table" in execution.results[0].html and execution.results[0].is_main_result


def test_env_vars_for_one_execution(sandbox) -> None:
    def printed(**options: object) -> str:
        # Joined: under load, ipykernel may flush one print() as two stream messages.
        code = "import os; print(os.environ.get('CUBE_RUN_VAR'))"
        return "".join(sandbox.run_code(code, **options).logs.stdout)

    assert printed(envs={"CUBE_RUN_VAR": "once"}) == "once\n"
    assert printed() == "None\n"
    failed = sandbox.run_code("raise RuntimeError('boom')", envs={"CUBE_RUN_VAR": "leak?"})
    assert failed.error.name == "RuntimeError"
    assert printed() == "None\n"  # restored after a failing cell too


def test_contexts_create_list_restart_remove(sandbox, agent) -> None:
    (agent.scratch / "ctx").mkdir(exist_ok=True)
    context = sandbox.create_code_context(cwd=str(agent.scratch / "ctx"))
    assert context.cwd == str(agent.scratch / "ctx") and context.language == "python"
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == repr(
        str(agent.scratch / "ctx")
    )
    sandbox.run_code("y = 1", context=context)
    assert sandbox.run_code("y", context=context).text == "1"
    assert sandbox.run_code("'y' in dir()").text == "False"  # the default context is separate
    assert context.id in [c.id for c in sandbox.list_code_contexts()]
    sandbox.restart_code_context(context)
    assert sandbox.run_code("'y' in dir()", context=context).text == "False"
    sandbox.remove_code_context(context)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]


def test_kernel_death_is_an_error_then_restarts(sandbox) -> None:
    context = sandbox.create_code_context()
    died = sandbox.run_code("import os; os._exit(1)", context=context)
    assert died.error is not None and died.error.name == "DeadKernelError"
    assert sandbox.run_code("1 + 1", context=context).text == "2"
    sandbox.remove_code_context(context)


def test_javascript_context(sandbox) -> None:
    execution = sandbox.run_code("const a = 20; console.log('js', a + 1); a * 2", language="javascript")
    assert execution.logs.stdout == ["js 21\n"] and execution.text == "40"
    assert sandbox.run_code("a + 1", language="javascript").text == "21"
    failed = sandbox.run_code("null.x", language="javascript")
    assert failed.error.name == "TypeError"


def test_javascript_last_expression_and_top_level_await(sandbox) -> None:
    context = sandbox.create_code_context(language="js")
    try:

        def run(code: str):
            execution = sandbox.run_code(code, context=context)
            assert execution.error is None, execution.error
            return execution

        assert run("const base = 5; base * 2").text == "10"
        assert run("await Promise.resolve(42)").text == "42"
        waited = run("let later = await new Promise((r) => setTimeout(() => r('later'), 10));\nlater")
        assert waited.text == "'later'" and waited.results[0].is_main_result
        assert run("later + '!'").text == "'later!'"  # declarations in an awaiting cell persist
        assert run("await null; base + 1").text == "6"
        assert run("Promise.resolve(9)").text == "9"  # a promise as the value: its result
        assert run("console.log('only output')").results == []  # undefined is no result
    finally:
        sandbox.remove_code_context(context)


def test_javascript_errors_have_name_value_and_the_users_traceback(sandbox) -> None:
    context = sandbox.create_code_context(language="js")
    try:
        failed = sandbox.run_code("function inner() { null.x }\ninner()", context=context)
        assert (failed.error.name, failed.error.value) == (
            "TypeError",
            "Cannot read properties of null (reading 'x')",
        )
        lines = failed.error.traceback.splitlines()
        assert (
            lines[0].startswith("TypeError") and "at inner (<cell>:1" in lines[1] and "<cell>:2" in lines[2]
        )
        assert "node:" not in failed.error.traceback and "node_kernel" not in failed.error.traceback
        rejected = sandbox.run_code("await Promise.reject(new RangeError('nope'))", context=context)
        assert (rejected.error.name, rejected.error.value) == ("RangeError", "nope")
        incomplete = sandbox.run_code("1 +", context=context)
        assert incomplete.error.name == "SyntaxError"
        thrown = sandbox.run_code("throw 'plain'", context=context)
        assert (thrown.error.name, thrown.error.value) == ("Error", "plain")
        assert sandbox.run_code("'still alive'", context=context).text == "'still alive'"
    finally:
        sandbox.remove_code_context(context)


def test_large_output_is_streamed_as_ndjson_lines(agent) -> None:
    code = "for i in range(20000):\n    print('line', i)"
    with httpx.stream(
        "POST", f"{agent.interpreter_url}/execute", json={"code": code}, timeout=60
    ) as response:
        lines = list(response.iter_lines())
    assert all(line.strip() for line in lines)  # never a blank line
    stdout = "".join(__import__("json").loads(line).get("text", "") for line in lines)
    assert stdout.count("\n") == 20000 and lines[-1] == '{"type": "end_of_execution"}'


def test_health_and_unknown_context(agent) -> None:
    assert httpx.get(f"{agent.interpreter_url}/health").status_code == 200
    response = httpx.post(f"{agent.interpreter_url}/execute", json={"code": "1", "context_id": "nope"})
    assert response.status_code == 404


def test_client_timeout_interrupts_the_cell_and_frees_the_context(sandbox) -> None:
    from e2b import TimeoutException

    context = sandbox.create_code_context()
    sandbox.run_code("kept = 'state'", context=context)
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\nwhile True: time.sleep(0.1)", context=context, timeout=1)
    started = time.monotonic()
    assert sandbox.run_code("kept", context=context, timeout=10).text == "'state'"
    assert time.monotonic() - started < 5
    sandbox.remove_code_context(context)


def test_stuck_javascript_cell_restarts_its_kernel_when_the_client_leaves(sandbox) -> None:
    from e2b import TimeoutException

    context = sandbox.create_code_context(language="javascript")
    with pytest.raises(TimeoutException):
        sandbox.run_code("while (true) {}", context=context, timeout=1)
    assert sandbox.run_code("1 + 1", context=context, timeout=20).text == "2"
    sandbox.remove_code_context(context)


def test_async_sdk_concurrent_runs_and_commands(agent, debug_sdk) -> None:
    import asyncio

    from e2b_code_interpreter import AsyncSandbox

    async def task(index: int) -> tuple[str, str]:
        sandbox = await AsyncSandbox.create()
        execution = await sandbox.run_code(f"print('task', {index} ** 2)")
        command = await sandbox.commands.run(f"echo command {index}")
        return "".join(execution.logs.stdout), command.stdout

    async def main() -> list[tuple[str, str]]:
        return await asyncio.gather(*(task(i) for i in range(6)))

    for index, (printed, echoed) in enumerate(asyncio.run(main())):
        assert (printed, echoed) == (f"task {index**2}\n", f"command {index}\n")
