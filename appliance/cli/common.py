"""What every `cube` command shares: tables for people, JSON for scripts, and the options."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from appliance.bench.options import api_key_option

__all__ = ["api_key_option", "json_option", "print_table"]

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(row.get(c) if row.get(c) is not None else "") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def emit(data: Any, as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif isinstance(data, list):
        print_table(data, columns)
    else:
        for key, value in data.items():
            if not isinstance(value, list | dict):
                click.echo(f"{key}: {value}")
