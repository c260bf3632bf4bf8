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
    # A string result's text comes without its quotes, as from E2B's interpreter.
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == str(agent.scratch / "ctx")
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
        assert waited.text == "later" and waited.results[0].is_main_result
        assert run("later + '!'").text == "later!"  # declarations in an awaiting cell persist
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
        assert sandbox.run_code("'still alive'", context=context).text == "still alive"
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
    assert sandbox.run_code("kept", context=context, timeout=10).text == "state"
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


def test_execution_counts_start_at_one_per_context(sandbox) -> None:
    context = sandbox.create_code_context()
    try:
        failed = sandbox.run_code("echo 'not python'", context=context)  # a SyntaxError counts too
        assert failed.error.name == "SyntaxError" and failed.execution_count == 1
        assert sandbox.run_code("1", context=context).execution_count == 2
        # Env vars for one execution are set and restored around it, without counting.
        assert sandbox.run_code("2", context=context, envs={"A": "b"}).execution_count == 3
        assert sandbox.run_code("3", context=context).execution_count == 4
    finally:
        sandbox.remove_code_context(context)


def test_ipython_shell_escape_and_indented_cells(sandbox, agent) -> None:
    (agent.scratch / "bang").mkdir(exist_ok=True)
    context = sandbox.create_code_context(cwd=str(agent.scratch / "bang"))
    try:
        assert "".join(sandbox.run_code("!pwd", context=context).logs.stdout).strip() == str(
            agent.scratch / "bang"
        )
        # Code sent indented (as from a triple-quoted string in the caller) runs as written.
        indented = sandbox.run_code("\n        a = 20\n        a * 2\n        ", context=context)
        assert indented.error is None and indented.text == "40"
    finally:
        sandbox.remove_code_context(context)


def test_sandbox_env_var_overridden_for_one_execution_comes_back(sandbox, agent) -> None:
    assert agent.init({"envVars": {"CUBE_GLOBAL_VAR": "global"}}).status_code == 204
    code = "import os; os.getenv('CUBE_GLOBAL_VAR')"
    assert sandbox.run_code(code, envs={"CUBE_GLOBAL_VAR": "overwrite"}).text == "overwrite"
    assert sandbox.run_code(code).text == "global"


def test_default_contexts_are_listed_before_their_first_use(agent) -> None:
    contexts = httpx.get(f"{agent.interpreter_url}/contexts").json()
    languages = [context["language"] for context in contexts]
    assert "python" in languages and "javascript" in languages


def test_context_and_language_together_are_refused(agent) -> None:
    context = httpx.post(f"{agent.interpreter_url}/contexts", json={"language": "python"}).json()
    try:
        response = httpx.post(
            f"{agent.interpreter_url}/execute",
            json={"code": "1", "context_id": context["id"], "language": "javascript"},
        )
        assert response.status_code == 400 and "context_id" in response.json()["message"]
    finally:
        httpx.delete(f"{agent.interpreter_url}/contexts/{context['id']}")


def test_unknown_language_is_a_clear_400(agent) -> None:
    for path, body in (
        ("/execute", {"code": "1", "language": "cobol"}),
        ("/contexts", {"language": "cobol"}),
    ):
        response = httpx.post(f"{agent.interpreter_url}{path}", json=body)
        assert response.status_code == 400
        languages = "python, javascript, typescript, r, java, bash (or js, ts)"
        assert response.json() == {
            "code": 400,
            "message": f"unsupported language 'cobol'; use one of {languages}",
        }


def test_rich_results_data_json_latex_and_display_data(sandbox) -> None:
    frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': [0.5, None, 2.0]})")
    data = frame.results[0].data
    assert data == {"a": [1, 2, 3], "b": [0.5, None, 2.0]}  # NaN becomes null
    assert "<table" in frame.results[0].html and "data" in frame.results[0].formats()

    assert sandbox.run_code("{'k': [1, 2], 'n': None}").results[0].json == {"k": [1, 2], "n": None}

    latex = sandbox.run_code(
        "from IPython.display import display\ndisplay({'text/latex': r'\\text{Custom}'}, raw=True)"
    )
    assert latex.results[0].formats() == ["latex"] and latex.results[0].latex == r"\text{Custom}"
    assert latex.results[0].is_main_result is False

    class_code = (
        "class Card:\n"
        "    def _repr_html_(self): return '<b>card</b>'\n"
        "    def _repr_markdown_(self): return '**card**'\n"
        "    def _repr_json_(self): return {'card': True}\n"
        "Card()"
    )
    card = sandbox.run_code(class_code).results[0]
    assert (card.html, card.markdown, card.json, card.is_main_result) == (
        "<b>card</b>",
        "**card**",
        {"card": True},
        True,
    )

    figure = sandbox.run_code(
        "import matplotlib.pyplot as plt\nimport numpy as np\n"
        "x = np.linspace(0, 20, 100)\nplt.plot(x, np.sin(x))\nplt.show()"
    ).results[0]
    assert figure.png and figure.text and not figure.extra and figure.chart is not None


def test_pil_images_on_show_save_and_as_the_value(sandbox, agent) -> None:
    make = (
        "import numpy\nfrom PIL import Image\n"
        "image = Image.fromarray((numpy.random.rand(16, 16, 3) * 255).astype('uint8')).convert('RGBA')\n"
    )
    shown = sandbox.run_code(make + "image.show()\nprint('Image shown.')")
    assert shown.logs.stdout == ["Image shown.\n"]
    assert base64.b64decode(shown.results[0].png).startswith(b"\x89PNG")
    saved = sandbox.run_code(make + f"image.save({str(agent.scratch / 'saved.png')!r})")
    assert saved.results[0].png and (agent.scratch / "saved.png").read_bytes().startswith(b"\x89PNG")
    assert sandbox.run_code(make + "image").results[0].png


def test_javascript_esm_imports_and_typescript(sandbox) -> None:
    imported = sandbox.run_code(
        "\n    import { readFileSync } from 'fs'\n    import * as path from 'node:path'\n"
        "    console.log(typeof readFileSync, path.sep)\n    ",
        language="js",
    )
    assert imported.error is None and imported.logs.stdout == ["function /\n"]
    # A cell imports again when re-run (its imports are `var`s).
    assert sandbox.run_code("import { join } from 'path'\njoin('a', 'b')", language="js").text == "a/b"
    assert sandbox.run_code("import { join } from 'path'\njoin('c', 'd')", language="js").text == "c/d"
    assert sandbox.run_code("await Promise.resolve('Hello World!')", language="js").text == "Hello World!"

    typed = sandbox.run_code("const message: string = 'Hello, World!'; console.log(message)", language="ts")
    assert typed.error is None and typed.logs.stdout == ["Hello, World!\n"]
    generic = (
        "function first<T>(items: T[]): T { return items[0] }\nawait Promise.resolve(first<number>([7, 8]))"
    )
    assert sandbox.run_code(generic, language="typescript").text == "7"
    broken = sandbox.run_code("const x: = 1", language="ts")
    assert broken.error.name == "SyntaxError" and "expected" in broken.error.value


def test_output_of_subprocesses_and_c_code_is_captured_in_order(sandbox) -> None:
    """Descriptor-level writes (os.system, subprocesses, C extensions) come back as stdout/stderr,
    as ipykernel captures them, and before the cell's value."""
    execution = sandbox.run_code(
        "import os, subprocess, sys\n"
        "print('python', flush=True)\n"
        "os.system('echo shell')\n"
        "subprocess.run(['sh', '-c', 'echo child-err >&2'])\n"
        "os.write(1, b'raw\\n')\n"
        "'value'"
    )
    assert "".join(execution.logs.stdout) == "python\nshell\nraw\n"
    assert "".join(execution.logs.stderr) == "child-err\n"
    assert execution.text == "value"


def test_stdout_arrives_while_the_cell_still_runs(sandbox) -> None:
    arrivals: list[float] = []
    sandbox.run_code(
        "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')",
        on_stdout=lambda message: arrivals.append(time.monotonic()),
    )
    ended = time.monotonic()
    assert len(arrivals) == 2
    assert ended - arrivals[0] > 1.5  # the first line came seconds before the end, not with it


def test_user_code_cannot_read_or_forge_the_engine_protocol(sandbox) -> None:
    """stdin is not the request pipe (input() raises as ipykernel's does), and the reply pipe is
    neither in the environment nor inherited by subprocesses."""
    context = sandbox.create_code_context()
    try:
        refused = sandbox.run_code("input('?')", context=context)
        assert refused.error is not None and refused.error.name == "StdinNotImplementedError"
        assert sandbox.run_code("import sys; sys.stdin.read()", context=context).text == ""
        assert sandbox.run_code("import os; 'CUBE_REPLY_FD' in os.environ", context=context).text == "False"
        inherited = sandbox.run_code("import os; os.system('ls /proc/self/fd')", context=context)
        assert sorted("".join(inherited.logs.stdout).split()) == [
            "0",
            "1",
            "2",
            "3",
        ]  # 3: ls reading the directory
        assert sandbox.run_code("1 + 1", context=context).text == "2"
    finally:
        sandbox.remove_code_context(context)


FORGED_REPLIES = (
    b'not json\\n{"type": "done", "id": "999"}\\n[1]\\n{"type": 5}\\n{"type": "x", "id": []}\\n\\xff\\n'
)


@pytest.mark.parametrize(
    ("language", "attack"),
    [
        (
            "python",
            "import os\n"
            "for name in os.listdir('/proc/self/fd'):\n"
            "    try:\n"
            f"        os.write(int(name), {FORGED_REPLIES!r}) if int(name) > 2 else None\n"
            "    except OSError:\n"
            "        pass\n",
        ),
        (
            "javascript",
            "const fs = require('fs')\n"
            "for (const name of fs.readdirSync('/proc/self/fd')) {\n"
            "  try { if (+name > 2) fs.writeSync(+name, 'not json\\n[1]\\n{\"type\": 5}\\n') } catch (e) {}\n"
            "}\n",
        ),
    ],
)
def test_garbage_written_into_the_reply_pipe_never_stops_the_agent(sandbox, agent, language, attack) -> None:
    """User code runs inside the kernel, so it can find the pipe its replies travel on and write
    anything into it: its own results may suffer, the agent (envd and every other context) not."""
    context = sandbox.create_code_context(language=language)
    try:
        sandbox.run_code(attack, context=context, timeout=30)
        assert agent.process.poll() is None
        assert sandbox.commands.run("echo still here").stdout == "still here\n"
        assert sandbox.run_code("1 + 1", context=context, timeout=30).text == "2"
    finally:
        sandbox.remove_code_context(context)
