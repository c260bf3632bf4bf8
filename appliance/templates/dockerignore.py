""".dockerignore: which context paths COPY/ADD may not see (Docker's rules).

Patterns are matched against slash-separated paths relative to the context
root, Go `filepath.Match` style plus `**` for any number of directories.
The last matching pattern wins; `!pattern` re-includes. A pattern that matches
a directory excludes everything below it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

IGNORE_FILE = ".dockerignore"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # `**/` also matches no directory at all
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + "(?:/.*)?$")


@dataclass(frozen=True)
class IgnoreRules:
    rules: tuple[tuple[re.Pattern[str], bool], ...] = ()  # (pattern, is_exception)

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            if pattern in ("", "."):
                continue
            rules.append((_pattern_regex(pattern), exception))
        return cls(tuple(rules))

    @classmethod
    def load(cls, context: Path) -> IgnoreRules:
        """The client's own context directory (the build service reads an uploaded one through
        build_context.ignore_rules)."""
        path = context / IGNORE_FILE
        return cls.parse(path.read_text()) if path.is_file() else cls()

    def ignored(self, relative: str) -> bool:
        relative = posixpath.normpath(relative).lstrip("/")
        excluded = False
        for regex, exception in self.rules:
            if regex.match(relative):
                excluded = not exception
        return excluded
