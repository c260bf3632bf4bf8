"""Dockerfile parsing: instructions, line continuations, JSON (exec) and shell forms, `$VAR` expansion.

Supported: FROM (several: multi-stage, `FROM x AS name`), RUN, COPY (`--from=stage`),
ADD (context files, local tar archives unpacked, http(s) URLs), ENV, ARG (also
before the first FROM), WORKDIR, USER, EXPOSE, ENTRYPOINT, CMD, SHELL, LABEL and
MAINTAINER (into the template's labels), VOLUME (the directories are made; a
template's disk is one filesystem), and HEALTHCHECK and STOPSIGNAL, which are
accepted with a warning in the build log because a template has its own
readiness probe (`--probe`) and sandboxes are killed, not signalled. ONBUILD is
refused.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

SUPPORTED = frozenset(
    {
        "FROM",
        "RUN",
        "COPY",
        "ADD",
        "ENV",
        "ARG",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "SHELL",
        "LABEL",
        "MAINTAINER",
        "VOLUME",
        "HEALTHCHECK",
        "STOPSIGNAL",
    }
)
# Accepted without effect on the template: (keyword, why), logged as a warning.
IGNORED = {
    "HEALTHCHECK": "the template's readiness is its --probe / --probe-path",
    "STOPSIGNAL": "sandboxes are stopped by killing their VM, not by a signal",
}
REFUSED = {
    "ONBUILD": "ONBUILD triggers are not supported (a template used in FROM runs none); "
    "write the instructions into the Dockerfile that builds on it",
}
_EXEC_FORM = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME", "HEALTHCHECK"})
_FLAGGED = {
    "COPY": {"chown", "chmod", "from"},
    "ADD": {"chown", "chmod"},
    "FROM": {"platform"},
    "RUN": set(),
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
_DIRECTIVE_RE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")
_VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+])(?P<word>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class DockerfileError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Dockerfile line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class Instruction:
    keyword: str
    text: str  # everything after the keyword and its flags, continuations joined
    line: int
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: tuple[str, ...] | None = None  # the JSON array form, when used

    def __str__(self) -> str:
        flags = "".join(f"--{k}={v} " for k, v in sorted(self.flags.items()))
        return f"{self.keyword} {flags}{self.text}".strip()


def expand(text: str, variables: dict[str, str], line: int = 0) -> str:
    """Docker's word expansion: $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative}; `\\$` is a literal $."""
    out = []
    i = 0
    while i < len(text):
        if text.startswith("\\$", i):
            out.append("$")
            i += 2
            continue
        match = _VAR_RE.match(text, i) if text[i] == "$" else None
        if match is None:
            if text.startswith("${", i):
                raise DockerfileError(line, f"bad variable substitution in {text!r}")
            out.append(text[i])
            i += 1
            continue
        name = match.group("braced") or match.group("plain")
        value = variables.get(name)
        op = match.group("op")
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                value = expand(match.group("word"), variables, line)
        elif op in (":+", "+"):
            present = value is not None and (op == "+" or value != "")
            value = expand(match.group("word"), variables, line) if present else ""
        out.append(value or "")
        i = match.end()
    return "".join(out)


def split_flags(keyword: str, text: str, line: int) -> tuple[dict[str, str], str]:
    allowed = _FLAGGED.get(keyword)
    flags: dict[str, str] = {}
    while allowed is not None and text.startswith("--"):
        word, _, rest = text.partition(" ")
        name, equals, value = word[2:].partition("=")
        if name not in allowed or not equals:
            raise DockerfileError(line, f"unsupported flag {word!r} for {keyword}")
        flags[name] = value
        text = rest.lstrip()
    return flags, text


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) per instruction, after parser directives."""
    lines = text.splitlines()
    escape = "\\"
    start = 0
    for number, raw in enumerate(lines):
        match = _DIRECTIVE_RE.match(raw.strip())
        if not match:
            break
        if match.group(1).lower() == "escape":
            if match.group(2) not in ("\\", "`"):
                raise DockerfileError(number + 1, "escape must be \\ or `")
            escape = match.group(2)
        start = number + 1
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for number in range(start, len(lines)):
        stripped = lines[number].strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines may sit inside a continuation too
        if not pending:
            first = number + 1
        body = lines[number].rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        result.append((first, " ".join(part.strip() for part in pending)))
        pending = []
    if pending:
        result.append((first, " ".join(part.strip() for part in pending)))
    return result


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        if keyword in REFUSED:
            raise DockerfileError(line, REFUSED[keyword])
        if keyword not in SUPPORTED:
            raise DockerfileError(line, f"unsupported instruction {keyword}")
        flags, rest = split_flags(keyword, rest.strip(), line)
        exec_form = None
        if keyword in _EXEC_FORM and rest.startswith("["):
            try:
                parsed = json.loads(rest)
            except ValueError:
                parsed = None  # not JSON: Docker treats it as shell form
            if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed):
                exec_form = tuple(parsed)
        if keyword not in ("ARG", "FROM") and not any(i.keyword == "FROM" for i in instructions):
            raise DockerfileError(line, f"{keyword} before FROM")
        if not rest and keyword not in ("CMD", "ENTRYPOINT"):
            raise DockerfileError(line, f"{keyword} needs arguments")
        instructions.append(Instruction(keyword, rest, line, flags, exec_form))
    if not any(i.keyword == "FROM" for i in instructions):
        raise DockerfileError(1, "no FROM instruction")
    return instructions


def parse_key_values(text: str, line: int, keyword: str) -> list[tuple[str, str]]:
    """ENV/LABEL arguments: `k=v k2="v 2"`, or the legacy `ENV key value with spaces`."""
    try:
        words = shlex.split(text, posix=True)
    except ValueError as exc:
        raise DockerfileError(line, f"{keyword}: {exc}") from exc
    if keyword == "ENV" and words and "=" not in words[0]:
        key, _, value = text.partition(" ")
        return [(key, " ".join(shlex.split(value)) if value.strip() else "")]
    pairs = []
    for word in words:
        key, equals, value = word.partition("=")
        if not key or not equals:
            raise DockerfileError(line, f"{keyword}: expected KEY=VALUE, got {word!r}")
        pairs.append((key, value if equals else ""))
    return pairs


def command_words(instruction: Instruction, shell: tuple[str, ...]) -> tuple[str, ...]:
    """RUN/CMD/ENTRYPOINT argv: the JSON form as is, the shell form through SHELL."""
    if instruction.exec_form is not None:
        return instruction.exec_form
    return (*shell, instruction.text) if instruction.text else ()
