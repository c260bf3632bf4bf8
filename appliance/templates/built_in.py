"""The built-in recipe templates by every name a sandbox is created from, and the command that
builds each: `Sandbox.create("browser")` on an appliance that has not built it yet is answered
404 with that command in the E2B error body, so the user knows what to run (the build takes many
minutes and downloads packages: an operator's decision, never started by a create request)."""

from __future__ import annotations

from appliance.templates import browser, default, desktop

BUILD_DEFAULT = "cube tpl build-default"
BUILD_ALL = "cube tpl build-default --all"

BUILD_COMMANDS: dict[str, str] = {
    name: command
    for names, command in (
        ((default.TEMPLATE_ID, *default.ALIASES), BUILD_DEFAULT),
        ((browser.TEMPLATE_ID, *browser.ALIASES), BUILD_ALL),
        ((desktop.TEMPLATE_ID, *desktop.ALIASES), BUILD_ALL),
    )
    for name in names
}


def template_not_found_message(name: str) -> str:
    """What a create naming a template nobody can see is told (a built-in one: how to build it)."""
    command = BUILD_COMMANDS.get(name)
    if command is None:
        return f"template '{name}' not found"
    return (
        f"template '{name}' is not built on this appliance yet; an operator builds it with "
        f"`{command}` (once, cached; it takes minutes)"
    )
