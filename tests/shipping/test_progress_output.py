"""Long builds' progress written to a log (no terminal): a line per phase and per 10 %, no
carriage-return bars repeated on one endless line."""

from __future__ import annotations

import pytest

from appliance.progress import shown


def test_progress_without_a_terminal_is_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with shown("UML kernel") as progress:
        progress("unpacking linux-source", None)
        progress("unpacking linux-source", None)
        for percent in range(101):
            progress("compiling", percent / 100)
        progress("built", 1.0)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "UML kernel: unpacking linux-source"
    assert lines[1:] == [f"UML kernel: compiling {p}%" for p in range(0, 101, 10)] + [
        "UML kernel: built 100%"
    ]
