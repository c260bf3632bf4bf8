"""The default template `code-interpreter` in a real UML sandbox, through the unmodified SDK: the
languages, libraries, tools and fonts E2B's template gives agents (root only; the template this
host's installer built, built here when missing).

A `cube serve` of the test's own (umlguests.uml_service: uml runtime, guest DNS going nowhere)
serves the installed template read-only through a symlink in its private templates directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import umlguests

pytestmark = [pytest.mark.uml, pytest.mark.root]


@pytest.fixture
def template_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[umlguests.UmlService]:
    with umlguests.uml_service(start_service, monkeypatch) as service:
        monkeypatch.setenv("E2B_API_KEY", service.key("t"))
        yield service


@pytest.fixture
def sandbox(template_service: Any) -> Iterator[Any]:
    from e2b_code_interpreter import Sandbox

    created = Sandbox.create(template="code-interpreter", timeout=600, envs={"TEST_ENV_VAR": "supertest"})
    try:
        yield created
    finally:
        created.kill()


def test_every_language_runs_in_home_with_the_sandbox_env(sandbox: Any) -> None:
    # E2B's suite expects the first execution of a fresh sandbox to be number 1.
    assert sandbox.run_code("!pwd").execution_count == 1
    cases = {
        "python": ("import os; print(os.getcwd(), os.environ['TEST_ENV_VAR'])", "/home/user supertest"),
        "javascript": ("console.log(process.cwd(), process.env.TEST_ENV_VAR)", "/home/user supertest"),
        "typescript": ("const where: string = process.cwd(); console.log(where)", "/home/user"),
        "r": ("cat(getwd(), Sys.getenv('TEST_ENV_VAR'))", "/home/user supertest"),
        "java": (
            'System.out.print(System.getProperty("user.dir") + " " + System.getProperty("TEST_ENV_VAR"))',
            "/home/user supertest",
        ),
        "bash": ("echo $(pwd) $TEST_ENV_VAR", "/home/user supertest"),
    }
    for language, (code, printed) in cases.items():
        execution = sandbox.run_code(code, language=language, timeout=240)
        assert execution.error is None, (language, execution.error)
        assert "".join(execution.logs.stdout).strip() == printed, language
    java = sandbox.run_code('System.getProperty("FOO")', language="java", envs={"FOO": "bar"})
    assert java.text == "bar"
    r = sandbox.run_code("Sys.getenv('FOO', unset = 'default')", language="r")
    assert r.results[0].text == '[1] "default"'


def test_scientific_stack_and_charts_on_the_templates_matplotlib(sandbox: Any) -> None:
    imports = (
        "import numpy, pandas, scipy, sklearn, matplotlib, seaborn, plotly, bokeh, openpyxl, docx, "
        "requests, bs4, sympy, statsmodels, skimage, xarray, nltk, PIL, lxml\nprint('ok')"
    )
    execution = sandbox.run_code(imports, timeout=240)
    assert execution.error is None and execution.logs.stdout == ["ok\n"], execution.error
    box = (
        sandbox.run_code(
            "import matplotlib.pyplot as plt\n"
            "data = {'Class A': [85, 90, 78, 92, 88], 'Class B': [95, 89, 76, 91, 84, 87]}\n"
            "fig, ax = plt.subplots()\nax.boxplot(data.values(), labels=data.keys(), patch_artist=True)\n"
            "ax.legend()\nplt.show()"
        )
        .results[0]
        .chart
    )
    assert [(e.label, e.min, e.median, e.max, e.outliers) for e in box.elements] == [
        ("Class A", 78, 88, 92, []),
        ("Class B", 84, 88, 95, [76]),
    ]
    frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2, 3]})").results[0]
    assert frame.data == {"a": [1, 2, 3]}


def test_tools_sudo_and_cjk_fonts(sandbox: Any) -> None:
    tools = sandbox.commands.run(
        "sudo -n id -u && jq --version && git --version && gcc --version && curl --version && java -version",
        timeout=120,
    )
    assert tools.stdout.splitlines()[0] == "0"
    cjk = sandbox.run_code(
        "import warnings, matplotlib.pyplot as plt\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    plt.title('売上 매출 销售')\n"
        "    plt.gcf().canvas.draw()\n"
        "print([str(w.message) for w in caught if 'missing from' in str(w.message)])"
    )
    assert cjk.error is None and cjk.logs.stdout == ["[]\n"]  # every glyph has a font
