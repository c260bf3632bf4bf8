"""The default template `code-interpreter` in a real UML sandbox, through the unmodified SDK: the
languages, libraries, tools and fonts E2B's template gives agents (root only; the template this
host's installer built, built here when missing).

A `cube serve` of the test's own (uml runtime, guest DNS going nowhere) serves the installed
template read-only through a symlink in its private templates directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import umlguests

from appliance.config import Config, load_config
from appliance.cubelet.runtimes import RuntimeBundle

pytestmark = [pytest.mark.uml, pytest.mark.root]

TEST_HOST_NETWORK = "10.217.0.0/24"
TEST_UID_BASE = 420_000
DEAD_DNS_UPSTREAM = "127.0.0.1:9"  # nothing listens: guest lookups fail fast, nothing leaves


@asynccontextmanager
async def _uml_runtime(config: Config) -> AsyncIterator[RuntimeBundle]:
    from appliance.cubelet.runtimes import CubeVSPolicies
    from appliance.net.service import CubeVS
    from appliance.runtime.uml.runtime import UmlRuntime

    async with CubeVS.start(config, dns_upstreams=[DEAD_DNS_UPSTREAM]) as cubevs:
        yield RuntimeBundle(UmlRuntime(config, cubevs), CubeVSPolicies(cubevs))


@pytest.fixture
def template_service(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    template = umlguests.default_template()
    work = Path(tempfile.mkdtemp(prefix="cubetest-ci-"))  # short: unix socket paths must fit
    try:
        (work / "state" / "templates").mkdir(parents=True)
        (work / "state" / "templates" / template.template_id).symlink_to(template.directory)
        config = Config(
            state_dir=work / "state",
            cache_dir=load_config().cache_dir,
            run_dir=work / "run",
            api_port=0,
            tls_port=0,
            runtime="uml",
            pool_size=0,
            memory_budget_mb=4096,
            host_network=TEST_HOST_NETWORK,
            uid_base=TEST_UID_BASE,
            allow_unenforced_network=True,
        )
        service = start_service(config, runtime_factory=_uml_runtime)
        key = httpx.post(
            f"{service.url}/cube/keys", json={"name": "t"}, headers={"X-API-KEY": service.admin_token}
        )
        assert key.status_code == 201, key.text
        for name, value in (("E2B_API_URL", service.url), ("E2B_SANDBOX_URL", service.url)):
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("E2B_API_KEY", key.json()["key"])
        monkeypatch.delenv("E2B_DOMAIN", raising=False)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        yield service
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
