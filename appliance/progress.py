"""Progress of long builds, for people: an in-place bar on a terminal, plain lines in a log.

Builders take a `Progress` callback, `progress(phase, fraction)`, with `fraction` None for
a phase whose length is unknown; `shown(label)` makes the one the CLI passes them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

Progress = Callable[[str, float | None], None]
# Without a terminal (a log file, CI): a line per phase and per this many percent of it.
LOG_STEP_PERCENT = 10


@contextmanager
def shown(label: str) -> Iterator[Progress]:
    if sys.stdout.isatty():
        with click.progressbar(length=100, label=label, show_eta=False) as bar:
            phase = {"name": ""}

            def show(name: str, fraction: float | None) -> None:
                if name != phase["name"]:
                    bar.label = f"{label}: {name}"
                    phase["name"] = name
                if fraction is not None:
                    bar.update(int(fraction * 100) - bar.pos)
                else:
                    bar.render_progress()

            yield show
        return

    logged_phase, logged_step = "", -1

    def log(name: str, fraction: float | None) -> None:
        nonlocal logged_phase, logged_step
        step = -1 if fraction is None else int(fraction * 100) // LOG_STEP_PERCENT
        if name == logged_phase and step <= logged_step:
            return
        percent = "" if fraction is None else f" {fraction:.0%}"
        click.echo(f"{label}: {name}{percent}")
        logged_phase, logged_step = name, step

    yield log
