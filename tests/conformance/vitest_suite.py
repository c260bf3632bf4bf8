"""The JS SDK's suite (vitest) for run_e2b_suites.py: node modules, listing, safety scan, run.

E2B's JS tests import the SDK's own source (`../src`) at the suite's commit, so they
run that source (with its npm dependencies, from the npm registry) against the
appliance. Node ids are `<test file>::<describe > ... > test name>`. Deselected tests
are left out with a test-name pattern and the result checked with `vitest list`:
what is deselected is not even listed, so it cannot run.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

# What E2B's package.json gives the SDK at run time, plus the dev packages its tests and
# its source import (vitest, msw, dotenv, error-stack-parser-es); never its browser,
# cloudflare or build tooling.
DEV_PACKAGES = ("vitest", "msw", "dotenv", "@types/node", "error-stack-parser-es")
CONFIG = "vitest.cube-conformance.mts"
REPORTER = "cube-conformance-reporter.mjs"
# One JSON line per finished test, appended as it finishes: a run stopped by its timeout keeps
# the tests it finished (vitest's own JSON report is written only at the end).
REPORTER_SOURCE = """// Written by tests/conformance/vitest_suite.py (Cube appliance).
import { appendFileSync } from 'node:fs'
import { relative } from 'node:path'

export default class CubeConformanceReporter {
  onTestCaseResult(testCase) {
    const result = testCase.result()
    const message = (result.errors ?? []).map((e) => e.message ?? String(e)).join(' | ')
    const line = {
      node: `${relative(process.cwd(), testCase.module.moduleId)}::${testCase.fullName}`,
      outcome: result.state,
      message: message.split('\\n')[0].slice(0, 300),
    }
    appendFileSync(process.env.CUBE_CONFORMANCE_RESULTS, JSON.stringify(line) + '\\n')
  }
}
"""
STAMP = "node_modules/.cube-conformance"
NPM_TIMEOUT_S = 900

_TEST_START = re.compile(
    r"^\s*(?:sandboxTest|test|it)(?:\.\w+(?:\([^()]*\))?)*\(\s*(?:(['\"`])(?P<name>.*?)\1)?\s*,?\s*$|"
    r"^\s*(?:sandboxTest|test|it)(?:\.\w+(?:\([^()]*\))?)*\(\s*(['\"`])(?P<inline>.*?)\3"
)
_NAME_LINE = re.compile(r"^\s*(['\"`])(?P<name>.*?)\1")


def archive_paths() -> tuple[str, ...]:
    return ("src", "tests", "tsconfig.json", "package.json")


def prepare(root: Path, theirs: dict[str, object]) -> None:
    """Our package.json beside their source, and its node_modules (npm install when it changed)."""
    deps = dict(theirs.get("dependencies", {}))  # type: ignore[call-overload]
    dev_all = dict(theirs.get("devDependencies", {}))  # type: ignore[call-overload]
    dev = {name: dev_all[name] for name in DEV_PACKAGES if name in dev_all}
    dev.setdefault("error-stack-parser-es", "^2.0.1")
    package = {
        "name": "e2b-js-sdk-conformance",
        "private": True,
        "dependencies": deps,
        "devDependencies": dev,
    }
    text = json.dumps(package, indent=1, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    stamp = root / STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return
    (root / "package.json").write_text(text)
    print(f"npm install in {root}", flush=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-package-lock"],
        cwd=root,
        check=True,
        timeout=NPM_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
    )
    stamp.write_text(digest)


def write_config(
    root: Path, selection: Iterable[str], excluded_files: Iterable[str], test_timeout_s: int, workers: int = 2
) -> None:
    include = [f"{path}/**/*.test.ts" for path in selection]
    # Bun's and Deno's runtime tests (code-interpreter's tests/runtimes) do not run under node.
    exclude = sorted({*excluded_files, "tests/runtimes/**"})
    setup = [f for f in ("tests/globalFetchFallback.setup.ts",) if (root / f).exists()]
    config = f"""import {{ defineConfig }} from 'vitest/config'
// Written by tests/conformance/run_e2b_suites.py (Cube appliance), not E2B's own config.
export default defineConfig({{
  test: {{
    include: {json.dumps(include)},
    exclude: {json.dumps(exclude)},
    isolate: true,
    maxWorkers: {workers},  // test files at once, like the pytest suites' xdist processes
    globals: false,
    testTimeout: {test_timeout_s * 1000},
    hookTimeout: {test_timeout_s * 1000},
    environment: 'node',
    setupFiles: {json.dumps(setup)},
    deps: {{ interopDefault: true }},
  }},
}})
"""
    (root / CONFIG).write_text(config)


def name_filter(deselected_names: Iterable[str]) -> list[str]:
    """vitest arguments that leave out tests by full name (vitest joins the names with spaces)."""
    names = sorted({n.replace(" > ", " ") for n in deselected_names})
    if not names:
        return []
    alternatives = "|".join(re.escape(n).replace("/", "\\/") for n in names)
    return ["--testNamePattern", f"^(?!(?:{alternatives})$)"]


def listed(root: Path, env: dict[str, str], extra: list[str]) -> list[str]:
    """Node ids vitest would run with these arguments."""
    out = root / "vitest-list.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        ["npx", "--no-install", "vitest", "list", "--config", CONFIG, f"--json={out}", *extra],
        cwd=root,
        env=env,
        text=True,
        capture_output=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"js-sdk: vitest list failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return sorted(f"{Path(t['file']).relative_to(root)}::{t['name']}" for t in json.loads(out.read_text()))


def flagged_tests(root: Path, ids: list[str], danger: Iterable[re.Pattern[str]]) -> dict[str, str]:
    """Collected node id (or file, for code outside tests) -> the first line that could leave the machine."""
    patterns = list(danger)
    by_file: dict[str, list[str]] = {}
    for node in ids:
        by_file.setdefault(node.split("::", 1)[0], []).append(node)
    flagged: dict[str, str] = {}
    for rel, nodes in by_file.items():
        lines = (root / rel).read_text().splitlines()
        current: str | None = None  # the test whose body the line is in (None: outside any test)
        for number, line in enumerate(lines, 1):
            name = _test_name(lines, number - 1)
            if name is not None:
                current = name
            if not any(p.search(line) for p in patterns):
                continue
            hit = f"line {number}: {line.strip()[:120]}"
            if current is None:
                flagged.setdefault(rel, hit)
                continue
            for node in nodes:
                if node.split("::", 1)[1].split(" > ")[-1] == current:
                    flagged.setdefault(node, hit)
    return flagged


def _test_name(lines: list[str], index: int) -> str | None:
    match = _TEST_START.match(lines[index])
    if match is None:
        return None
    name = match.group("name") or match.group("inline")
    if name is None and index + 1 < len(lines):
        following = _NAME_LINE.match(lines[index + 1])
        name = following.group("name") if following else None
    return name


def run(
    root: Path, env: dict[str, str], extra: list[str], results: Path, timeout_s: int, log: Path
) -> subprocess.Popen[bytes]:
    """Starts vitest (the caller waits and stops it) with a JSON report to `results`."""
    (root / REPORTER).write_text(REPORTER_SOURCE)
    results.unlink(missing_ok=True)
    reporters = ["--reporter=default", f"--reporter=./{REPORTER}"]
    cmd = ["npx", "--no-install", "vitest", "run", "--config", CONFIG, *reporters, *extra]
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            cwd=root,
            env={**env, "CUBE_CONFORMANCE_RESULTS": str(results)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def read_results(results: Path) -> dict[str, dict[str, str]]:
    """node id -> {outcome, message} from the reporter's lines (only tests that finished)."""
    found: dict[str, dict[str, str]] = {}
    if not results.exists():
        return found
    for line in results.read_text().splitlines():
        entry = json.loads(line)
        outcome = entry["outcome"] if entry["outcome"] in ("passed", "failed") else "skipped"
        found[entry["node"]] = {"outcome": outcome, "message": entry["message"]}
    return found
