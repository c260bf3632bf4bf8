#!/usr/bin/env python3
"""Run E2B's own public SDK test suites against a Cube appliance: the conformance report.

    python3 tests/conformance/run_e2b_suites.py                      both suites, the installed service
    python3 tests/conformance/run_e2b_suites.py --suite python-sdk -- -k files
    python3 tests/conformance/run_e2b_suites.py --api-url http://127.0.0.1:3555 --api-key-file /tmp/x/key

The suites come from read-only git mirrors (`git archive`, never a work tree of ours):
`e2b-dev/code-interpreter` python/tests and `e2b-dev/E2B` packages/python-sdk/tests
(sync + async sandbox, commands, files, pty, api). They run in a venv of their own with
the SDK versions this project pins, pointed at the appliance by environment variables
only, with no proxy variables. Their code is never copied into this tree.

Safety: E2B's suites contain tests that reach the internet or open `get_host()` URLs
(which resolve publicly). Every such test is deselected by node id in deselected.txt.
Before running, each selected test function is scanned for anything that could leave
the machine (a get_host() call, a non-loopback URL or IPv4 literal, curl/wget/git
clone/pip install…); a flagged test must be deselected, or listed in reviewed.txt by a
person who read it and found it stays on loopback. Otherwise the run stops. A
deselect entry that matches no collected test stops the run too (the suite changed).

Prints passed/failed/skipped/deselected per suite and writes <work>/summary.json.
Not collected by pytest (no test_ prefix); needs only the standard library.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import vitest_suite

HERE = Path(__file__).resolve().parent
MIRRORS = Path("/work/.mirror")

# The SDK versions this project pins (pyproject.toml) and the test tooling E2B's
# pytest.ini files ask for (asyncio_mode, --numprocesses, timeout).
VENV_REQUIREMENTS = (
    "e2b==2.63.0",
    "e2b-code-interpreter==2.11.5",
    "pytest==9.2.0",
    "pytest-asyncio==1.5.0",
    "pytest-xdist==3.8.0",
    "pytest-timeout==2.4.0",
)


@dataclass(frozen=True)
class Suite:
    name: str
    mirror: Path  # a git directory (bare mirror)
    root: str  # the suite's directory in the repository (where its pytest.ini is)
    selection: tuple[str, ...]  # test paths under root that are in scope
    kind: str = "pytest"  # or "vitest"

    def archive_paths(self) -> tuple[str, ...]:
        return vitest_suite.archive_paths() if self.kind == "vitest" else ("pytest.ini", "tests")


def default_suites() -> dict[str, Suite]:
    ci = Path(os.environ.get("E2B_CI_MIRROR", MIRRORS / "e2b-dev+code-interpreter" / "repo"))
    sdk = Path(os.environ.get("E2B_SDK_MIRROR", MIRRORS / "e2b-dev+E2B" / "repo"))
    return {
        "code-interpreter": Suite("code-interpreter", ci, "python", ("tests",)),
        "python-sdk": Suite(
            "python-sdk",
            sdk,
            "packages/python-sdk",
            (
                "tests/sync/sandbox_sync",
                "tests/sync/api_sync",
                "tests/async/sandbox_async",
                "tests/async/api_async",
            ),
        ),
        "js-sdk": Suite("js-sdk", sdk, "packages/js-sdk", ("tests/sandbox", "tests/api"), kind="vitest"),
        "code-interpreter-js": Suite("code-interpreter-js", ci, "js", ("tests",), kind="vitest"),
    }


# What could make a test leave the machine. Loopback (127/8, localhost, 0.0.0.0 inside a
# sandbox) is fine; everything else needs a person's reading (reviewed.txt) or a deselect.
_LOOPBACK_HOST = r"(?:127\.\d{1,3}\.\d{1,3}\.\d{1,3}|localhost|0\.0\.0\.0|\[::1\])(?::\d+)?(?:[/'\"\s]|$)"
DANGER_PATTERNS = (
    re.compile(r"get_host\s*\("),
    re.compile(r"\b[a-z][a-z0-9+.-]*://(?!" + _LOOPBACK_HOST + ")", re.IGNORECASE),
    re.compile(r"(?<![\d.])(?!127\.)(?!0\.0\.0\.0)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\d.])"),
    re.compile(
        r"\b(?:curl|wget|ping|dig|nslookup|git\s+clone|pip3?\s+install|npm\s+(?:install|i)\b"
        r"|apt(?:-get)?\s+install|httpbin|connectivitycheck)\b"
    ),
)


@dataclass(frozen=True)
class Entry:
    suite: str
    node: str  # a node id, a file path (all its tests) or a directory (all its files' tests)
    reason: str

    def covers(self, node_id: str) -> bool:
        return node_id == self.node or node_id.startswith(
            (self.node + "::", self.node + "[", self.node + " > ", self.node.rstrip("/") + "/")
        )


def read_entries(path: Path) -> list[Entry]:
    """`<suite> <node id or test file> <reason>` per line, the node id in double quotes if it has
    spaces (vitest's names do); # starts a comment."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        suite, _, rest = line.strip().partition(" ")
        rest = rest.lstrip()
        if rest.startswith('"'):
            node, _, reason = rest[1:].partition('"')
        else:
            node, _, reason = rest.partition(" ")
        if not node or not reason.strip():
            raise SystemExit(f"{path}:{number}: want '<suite> <node id> <reason>', got {line!r}")
        entries.append(Entry(suite, node, reason.strip()))
    return entries


def run(cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def extract(suite: Suite, ref: str, work: Path) -> tuple[str, Path]:
    """`git archive` the suite's pytest.ini and tests into work; returns (commit, suite root)."""
    commit = run(["git", "-C", str(suite.mirror), "rev-parse", f"{ref}^{{commit}}"]).stdout.strip()
    dest = work / f"{suite.name}-{commit[:12]}"
    root = dest / suite.root
    if not (root / "tests").is_dir():  # extracted once per commit
        dest.mkdir(parents=True, exist_ok=True)
        paths = [f"{suite.root}/{path}" for path in suite.archive_paths()]
        archive = subprocess.run(
            ["git", "-C", str(suite.mirror), "archive", "--format=tar", commit, *paths],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit, root


def ensure_venv(venv: Path) -> Path:
    """The suites' own venv with the pinned SDKs; made or topped up as needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    frozen = run([str(python), "-m", "pip", "freeze"]).stdout.lower().splitlines()
    missing = [r for r in VENV_REQUIREMENTS if r.lower() not in frozen]
    if missing:
        print(f"conformance venv {venv}: installing {' '.join(missing)}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    return python


def suite_env(args: argparse.Namespace, api_key: str) -> dict[str, str]:
    """Only what the suites need: every E2B URL at the appliance, no proxies, no debug mode."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "E2B_API_KEY": api_key,
        "E2B_API_URL": args.api_url,
        "E2B_SANDBOX_URL": args.sandbox_url or args.api_url,
        "E2B_VOLUME_API_URL": args.api_url,
        # Unresolvable anywhere (RFC 6761): a get_host() URL that slipped through goes nowhere.
        "E2B_DOMAIN": "cube.invalid",
        "E2B_TESTS_TEMPLATE": args.template,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return env


def collect(python: Path, suite: Suite, root: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--numprocesses=0",
            "--collect-only",
            "-q",
            *suite.selection,
        ],
        cwd=root,
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode != 0 or not ids:
        raise SystemExit(f"{suite.name}: collection failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return ids


def _test_functions(tree: ast.Module) -> Iterable[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for inner in node.body:
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef) and inner.name.startswith(
                    "test"
                ):
                    yield f"{node.name}::{inner.name}", inner


def flagged_tests(root: Path, files: Iterable[str]) -> dict[str, str]:
    """node id (or file, for module-level code) -> the first line that could leave the machine."""
    flagged: dict[str, str] = {}
    for rel in sorted(set(files)):
        source = (root / rel).read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        in_tests: set[int] = set()
        for name, node in _test_functions(tree):
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            span = range(start, (node.end_lineno or node.lineno) + 1)
            in_tests.update(span)
            hit = _first_danger(lines, span)
            if hit is not None:
                flagged[f"{rel}::{name}"] = hit
        module_hit = _first_danger(lines, (n for n in range(1, len(lines) + 1) if n not in in_tests))
        if module_hit is not None:
            flagged[rel] = module_hit
    return flagged


def _first_danger(lines: Sequence[str], numbers: Iterable[int]) -> str | None:
    for n in numbers:
        if any(p.search(lines[n - 1]) for p in DANGER_PATTERNS):
            return f"line {n}: {lines[n - 1].strip()[:120]}"
    return None


@dataclass
class Plan:
    deselect: dict[str, str] = field(default_factory=dict)  # node id -> reason


def plan(
    suite: Suite, ids: list[str], flagged: dict[str, str], deselected: list[Entry], reviewed: list[Entry]
) -> Plan:
    """Which collected tests to deselect; stops on a stale entry or an unreviewed risky test
    (`flagged`: node id or file -> the line that could leave the machine)."""
    mine = [e for e in deselected if e.suite == suite.name]
    problems = [
        f"deselect entry matches nothing: {e.node}" for e in mine if not any(e.covers(i) for i in ids)
    ]
    result = Plan()
    for node_id in ids:
        entry = next((e for e in mine if e.covers(node_id)), None)
        if entry is not None:
            result.deselect[node_id] = entry.reason
    ok = [e for e in reviewed if e.suite == suite.name]
    for where, line in flagged.items():
        running = [i for i in ids if Entry(suite.name, where, "").covers(i) and i not in result.deselect]
        if running and not any(e.node == where for e in ok):
            problems.append(f"{where} may leave the machine ({line}): deselect it or review it")
    if problems:
        raise SystemExit(f"{suite.name}: refusing to run:\n  " + "\n  ".join(problems))
    return result


@dataclass
class Outcome:
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # node id -> first line of the failure
    skipped: dict[str, str] = field(default_factory=dict)


def read_outcome(recorded: dict[str, dict[str, str]]) -> Outcome:
    """Outcomes by node id (from cube_conformance_plugin or vitest's report; {} if the run never ended)."""
    outcome = Outcome()
    for node, entry in recorded.items():
        if entry["outcome"] == "failed":
            outcome.failed[node] = entry["message"]
        elif entry["outcome"] == "skipped":
            outcome.skipped[node] = entry["message"]
        else:
            outcome.passed.append(node)
    return outcome


def wait_bounded(args: argparse.Namespace, suite: Suite, process: subprocess.Popen[bytes]) -> int:
    """The suite's exit status; stopped (with all its children) after --suite-timeout or when the
    runner itself is interrupted or terminated."""
    try:
        return process.wait(timeout=args.suite_timeout)
    except subprocess.TimeoutExpired:
        print(f"{suite.name}: stopped after {args.suite_timeout}s (--suite-timeout)", flush=True)
        return -1
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class SuiteRun:
    ids: list[str]
    chosen: Plan
    rc: int = 0
    outcome: Outcome = field(default_factory=Outcome)


def run_pytest_suite(
    args: argparse.Namespace,
    suite: Suite,
    root: Path,
    env: dict[str, str],
    lists: tuple[list[Entry], list[Entry]],
) -> SuiteRun:
    python = ensure_venv(args.venv)
    ids = collect(python, suite, root, env)
    flagged = flagged_tests(root, {i.split("::", 1)[0] for i in ids})
    result = SuiteRun(ids, plan(suite, ids, flagged, *lists))
    # pytest's --deselect matches node id prefixes: test_fork would take test_fork_invalid_count too.
    if swept := [
        i for i in ids if i not in result.chosen.deselect and i.startswith(tuple(result.chosen.deselect))
    ]:
        raise SystemExit(f"{suite.name}: --deselect would also leave out (list them too): {swept}")
    if args.dry_run:
        return result
    results = args.work / f"{suite.name}.json"
    results.unlink(missing_ok=True)
    cmd = [
        str(python),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *suite.selection,
        f"--numprocesses={args.workers}",
        f"--timeout={args.test_timeout}",
        "-p",
        "cube_conformance_plugin",
        "-q",
        "-rfE",
        "--color=no",
        *(f"--deselect={node}" for node in sorted(result.chosen.deselect)),
        *args.pytest_args,
    ]
    print(f"== {suite.name}: pytest in {root} ({len(result.chosen.deselect)} deselected)", flush=True)
    env = {**env, "PYTHONPATH": str(HERE), "CUBE_CONFORMANCE_RESULTS": str(results)}
    with results.with_suffix(".log").open("w") as out:
        process = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        result.rc = wait_bounded(args, suite, process)
    result.outcome = read_outcome(json.loads(results.read_text()) if results.exists() else {})
    return result


def run_vitest_suite(
    args: argparse.Namespace,
    suite: Suite,
    root: Path,
    env: dict[str, str],
    lists: tuple[list[Entry], list[Entry]],
    commit: str,
) -> SuiteRun:
    theirs = json.loads(
        run(["git", "-C", str(suite.mirror), "show", f"{commit}:{suite.root}/package.json"]).stdout
    )
    vitest_suite.prepare(root, theirs)
    vitest_suite.write_config(root, suite.selection, (), args.test_timeout)
    ids = vitest_suite.listed(root, env, [])
    flagged = vitest_suite.flagged_tests(root, ids, DANGER_PATTERNS)
    result = SuiteRun(ids, plan(suite, ids, flagged, *lists))
    whole_files = {e.node for e in lists[0] if e.suite == suite.name and "::" not in e.node}
    by_name = [i.split("::", 1)[1] for i in result.chosen.deselect if i.split("::", 1)[0] not in whole_files]
    vitest_suite.write_config(root, suite.selection, whole_files, args.test_timeout, args.workers)
    extra = vitest_suite.name_filter(by_name)
    remaining = set(vitest_suite.listed(root, env, extra))
    if leaked := sorted(remaining & set(result.chosen.deselect)):
        raise SystemExit(f"{suite.name}: deselected tests would still run: {leaked}")
    for node in sorted(set(ids) - remaining - set(result.chosen.deselect)):  # vitest filters by name
        result.chosen.deselect[node] = "shares its name with a deselected test (vitest filters by name)"
    if args.dry_run:
        return result
    results = args.work / f"{suite.name}.jsonl"
    print(f"== {suite.name}: vitest in {root} ({len(result.chosen.deselect)} deselected)", flush=True)
    # After --: vitest's own arguments (e.g. a test file), as pytest's go to the pytest suites.
    cmd_extra = [*extra, *args.pytest_args]
    process = vitest_suite.run(root, env, cmd_extra, results, args.suite_timeout, results.with_suffix(".log"))
    result.rc = wait_bounded(args, suite, process)
    # vitest reports the tests its name filter left out as skipped: they are deselected.
    recorded = vitest_suite.read_results(results)
    result.outcome = read_outcome({k: v for k, v in recorded.items() if k not in result.chosen.deselect})
    return result


def cleanup_sandboxes(args: argparse.Namespace, api_key: str) -> int:
    """Kill sandboxes the suites left behind (their metadata carries sandbox_test_id)."""
    headers = {"X-API-KEY": api_key}
    request = urllib.request.Request(f"{args.api_url}/v2/sandboxes?limit=1000", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        listed = json.load(response)
    killed = 0
    for sandbox in listed:
        if "sandbox_test_id" in (sandbox.get("metadata") or {}):
            kill = urllib.request.Request(
                f"{args.api_url}/sandboxes/{sandbox['sandboxID']}", headers=headers, method="DELETE"
            )
            try:
                urllib.request.urlopen(kill, timeout=30).close()
                killed += 1
            except OSError:
                pass
    return killed


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", action="append", choices=sorted(default_suites()), help="default: all")
    parser.add_argument("--ref", default="HEAD", help="the mirrors' commit or ref to run (default HEAD)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cube-conformance")
    parser.add_argument("--venv", type=Path, default=Path("/opt/cube/conformance-venv"))
    parser.add_argument("--api-url", default=os.environ.get("CUBE_API_URL", "http://127.0.0.1:3000"))
    parser.add_argument("--sandbox-url", default=None, help="default: --api-url (single-port mode)")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=Path(os.environ.get("CUBE_API_KEY_FILE", "/var/lib/cube/default-api-key")),
    )
    parser.add_argument("--template", default="code-interpreter")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist processes")
    parser.add_argument("--test-timeout", type=int, default=180, help="seconds per test (pytest-timeout)")
    parser.add_argument("--suite-timeout", type=int, default=3600, help="seconds per suite, then killed")
    parser.add_argument(
        "--budget", type=int, default=0, help="seconds for all suites, shared out equally (default: none)"
    )
    parser.add_argument("--deselected", type=Path, default=HERE / "deselected.txt")
    parser.add_argument("--reviewed", type=Path, default=HERE / "reviewed.txt")
    parser.add_argument("--dry-run", action="store_true", help="extract, collect and check; run nothing")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    return parser.parse_args(argv)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_suite, which stops pytest


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    api_key = "" if args.dry_run else args.api_key_file.read_text().strip()
    suites = default_suites()
    lists = (read_entries(args.deselected), read_entries(args.reviewed))
    env = suite_env(args, api_key)
    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"api_url": args.api_url, "suites": {}}
    status = 0
    chosen = [suites[name] for name in (args.suite or sorted(suites))]
    deadline = time.monotonic() + args.budget if args.budget else None
    longest = args.suite_timeout
    for number, suite in enumerate(chosen):
        if deadline is not None:  # an equal share of what is left; time a suite leaves over goes on
            args.suite_timeout = int(min(longest, (deadline - time.monotonic()) / (len(chosen) - number)))
        commit, root = extract(suite, args.ref, args.work)
        if suite.kind == "vitest":
            done = run_vitest_suite(args, suite, root, env, lists, commit)
        else:
            done = run_pytest_suite(args, suite, root, env, lists)
        if args.dry_run:
            print(
                f"{suite.name} @ {commit[:12]}: {len(done.ids)} collected, {len(done.chosen.deselect)} "
                f"deselected, {len(done.ids) - len(done.chosen.deselect)} would run in {root}"
            )
            continue
        summary["suites"][suite.name] = report(args, suite, commit, done, cleanup_sandboxes(args, api_key))  # type: ignore[index]
        status |= 0 if done.rc == 0 else 1
        # After every suite: a run stopped later still leaves the suites it finished.
        (args.work / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    if not args.dry_run:
        print(f"summary: {args.work / 'summary.json'}")
    return status


def report(
    args: argparse.Namespace, suite: Suite, commit: str, done: SuiteRun, left: int
) -> dict[str, object]:
    """Prints the suite's counts and failures; returns its part of summary.json."""
    outcome = done.outcome
    ran = len(outcome.passed) + len(outcome.failed)
    pct = 100.0 * len(outcome.passed) / ran if ran else 0.0
    print(
        f"{suite.name} @ {commit[:12]}: {len(outcome.passed)} passed, {len(outcome.failed)} failed, "
        f"{len(outcome.skipped)} skipped, {len(done.chosen.deselect)} deselected of {len(done.ids)} "
        f"collected ({pct:.1f} % of those run passed; rc={done.rc}; {left} leftover sandboxes killed)",
        flush=True,
    )
    for node, message in sorted(outcome.failed.items()):
        print(f"  FAILED {node}: {message}")
    return {
        "repo": str(suite.mirror),
        "commit": commit,
        "root": suite.root,
        "selection": suite.selection,
        "collected": len(done.ids),
        "passed": sorted(outcome.passed),
        "failed": outcome.failed,
        "skipped": outcome.skipped,
        "deselected": done.chosen.deselect,
        "rc": done.rc,
        "stopped_by_timeout": done.rc == -1,
        "not_run": len(done.ids)
        - len(done.chosen.deselect)
        - len(outcome.passed)
        - len(outcome.failed)
        - len(outcome.skipped),
        "log": str(args.work / f"{suite.name}.log"),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
