"""The options the `cube bench` scenarios share (and `cube`'s commands: `api_key_option`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

api_key_option = click.option(
    "--api-key", envvar="CUBE_API_KEY", default=None, help="API key (default: admin token)."
)
template_option = click.option(
    "--template", default=None, help="Template (default: the config's default_template)."
)


def json_dir_option(written: str) -> Any:
    """`--json-dir`, none by default: where the scenario also writes `written` (e.g. exec.json)."""
    return click.option(
        "--json-dir", type=click.Path(path_type=Path), default=None, help=f"Also write {written} here."
    )


def results_dir_option(help: str) -> Any:
    """`--json-dir` of the commands that always write (`bench-results` by default)."""
    return click.option(
        "--json-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("bench-results"),
        show_default=True,
        help=help,
    )
