"""run_code through the unmodified E2B SDK into a real UML guest of the default template: what the
guest's Python engine (appliance/guest/python_shell.py) gives an SDK user, on the guest's own
Debian IPython, matplotlib and pandas (tests/guest runs the same engine on the test venv's)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import umlguests
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real UML guests need root"),
]


@pytest.fixture
def sandbox(start_service: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    with umlguests.uml_service(start_service, monkeypatch) as service:
        created = Sandbox.create(api_key=service.key("interp"), timeout=300)
        try:
            yield created
        finally:
            created.kill()


def test_sdk_results_charts_errors_streams_and_contexts_in_a_guest(sandbox: Sandbox) -> None:
    arrivals: list[float] = []
    streamed = sandbox.run_code(
        "import os, time\nprint('first', flush=True)\ntime.sleep(2)\nos.system('echo from-shell')\n6 * 7",
        on_stdout=lambda message: arrivals.append(time.monotonic()),
    )
    assert "".join(streamed.logs.stdout) == "first\nfrom-shell\n" and streamed.text == "42"
    assert time.monotonic() - arrivals[0] > 1  # the first line came while the cell still ran

    figure = sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.title('Sales')\nplt.show()"
    ).results[0]
    assert figure.png and figure.chart is not None
    assert figure.chart.title == "Sales" and [e.value for e in figure.chart.elements] == [3, 5]

    frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})").results[0]
    assert frame.html and "<table" in frame.html and frame.data == {"a": [1, 2]}

    failed = sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert failed.error is not None and (failed.error.name, failed.error.value) == ("ValueError", "bad value")
    assert "----> 3 f()" in failed.error.traceback

    context = sandbox.create_code_context(cwd="/tmp")
    sandbox.run_code("kept = 'state'", context=context)
    cell = "import os; os.getcwd() + ' ' + os.environ.get('CUBE_VAR', '-')"
    assert sandbox.run_code(cell, context=context, envs={"CUBE_VAR": "v"}).text == "/tmp v"
    assert sandbox.run_code(cell, context=context).text == "/tmp -"
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\nwhile True: time.sleep(0.1)", context=context, timeout=2)
    assert sandbox.run_code("kept", context=context, timeout=30).text == "state"  # interrupted, not restarted
    assert sandbox.run_code("'kept' in dir()").text == "False"  # the default context is another
