"""`cube bench rl`: reinforcement-learning rollouts, the way a trainer drives sandboxes.

Each episode, through the unmodified E2B SDK: create a sandbox from a small task
template (the default one plus a repository whose test fails), apply a candidate patch
(half the candidates fix the bug, half do not), run `pytest`, reward = 1 if it passes,
delete the sandbox. N workers run M episodes in all. Reported: episodes/s, create
p50/p95, the whole episode and its phases, and failures (an episode that could not
produce a reward: a create, command or kill that raised; a wrong reward counts too).

The task template is built once with the SDK's template builder (`Template.build`;
cached by its steps afterwards); it asks for its default Python kernel at first use
(appliance/guest/options.py), so its guests boot without one. `examples/rl_rollouts.py`
runs the same rollouts as a script.
"""

from __future__ import annotations

import itertools
import posixpath
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from appliance.api.client import ApiClient
from appliance.bench.live import SANDBOX_TIMEOUT_S, progress, sdk_pointed_at, target
from appliance.bench.options import api_key_option, json_dir_option
from appliance.bench.report import Report, percentiles
from appliance.config import Config
from appliance.guest.options import LAZY_DEFAULT_KERNEL_MARKER

TASK_TEMPLATE = "cube-rl-task"
TASK_DIR = "/home/user/task"
# The task: a repository whose test fails until `mean` divides by the length, not a constant.
TASK_FILES = {
    "stats.py": "def mean(values):\n    return sum(values) / 2\n",
    "test_stats.py": (
        "from stats import mean\n\n\n"
        "def test_mean():\n    assert mean([1, 2, 3]) == 2\n    assert mean([4]) == 4\n"
    ),
}
# The policy's candidates: episode i applies CANDIDATES[i % 2]; the first fixes the bug.
CANDIDATES = (
    ("-    return sum(values) / 2\n", "+    return sum(values) / len(values)\n", 1.0),
    ("-    return sum(values) / 2\n", "+    return sum(values) // 2\n", 0.0),
)
PATCH_HEADER = "--- a/stats.py\n+++ b/stats.py\n@@ -1,2 +1,2 @@\n def mean(values):\n"
CALL_TIMEOUT_S = 120.0


def task_template_builder() -> Any:
    """The task template, with the SDK's builder: the default template plus the repository,
    committed (git apply needs no repository, but a trainer's tasks usually are one). Its
    default Python kernel starts at first use (the marker file): episodes run commands only,
    and its guests boot in about a third of the CPU."""
    from e2b import Template

    writes = [f"printf %s {_shell_quote(text)} > {name}" for name, text in TASK_FILES.items()]
    marker = LAZY_DEFAULT_KERNEL_MARKER
    return (
        Template()
        .from_template("code-interpreter")
        .run_cmd(f"mkdir -p {posixpath.dirname(marker)} && touch {marker}", user="root")
        .run_cmd(
            [
                f"mkdir -p {TASK_DIR}",
                f"cd {TASK_DIR}",
                *writes,
                "git init -q",
                "git add -A",
                "git -c user.name=task -c user.email=task@example.invalid commit -qm task",
            ],
            user="user",
        )
    )


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def ensure_task_template(log: Callable[[str], None] = lambda line: None) -> float:
    """Build (or find in the build cache) the task template; the seconds it took."""
    from e2b import Template

    started = time.perf_counter()
    Template.build(task_template_builder(), TASK_TEMPLATE, on_build_logs=lambda entry: log(entry.message))
    return time.perf_counter() - started


def candidate_patch(episode: int) -> tuple[str, float]:
    """The unified diff episode `episode` applies, and the reward it should earn."""
    removed, added, reward = CANDIDATES[episode % len(CANDIDATES)]
    return PATCH_HEADER + removed + added, reward


@dataclass
class Episode:
    number: int
    reward: float | None = None
    error: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds


def run_episode(number: int, template: str = TASK_TEMPLATE) -> Episode:
    """One rollout: create → patch → pytest → reward → delete. Never raises: errors are kept."""
    from e2b import CommandExitException, Sandbox

    episode = Episode(number)
    patch, expected = candidate_patch(number)
    sandbox = None
    started = time.perf_counter()
    try:
        sandbox = Sandbox.create(template=template, timeout=SANDBOX_TIMEOUT_S, request_timeout=CALL_TIMEOUT_S)
        created = time.perf_counter()
        sandbox.files.write(f"{TASK_DIR}/candidate.patch", patch)
        sandbox.commands.run("git apply candidate.patch", cwd=TASK_DIR, timeout=CALL_TIMEOUT_S)
        patched = time.perf_counter()
        try:
            sandbox.commands.run(
                "python3 -m pytest -q -p no:cacheprovider", cwd=TASK_DIR, timeout=CALL_TIMEOUT_S
            )
            episode.reward = 1.0
        except CommandExitException as exc:
            episode.reward = 0.0 if exc.exit_code == 1 else None  # 1: tests failed; else pytest broke
            if episode.reward is None:
                episode.error = f"pytest exited {exc.exit_code}: {exc.stderr[-200:]}"
        tested = time.perf_counter()
        sandbox.kill()
        sandbox = None
        ended = time.perf_counter()
        episode.phases = {
            "create": created - started,
            "patch": patched - created,
            "pytest": tested - patched,
            "delete": ended - tested,
            "episode": ended - started,
        }
        if episode.reward is not None and episode.reward != expected:
            episode.error = f"reward {episode.reward} for a candidate worth {expected}"
    except Exception as exc:  # counted as a failed episode; the rollouts go on
        episode.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if sandbox is not None:
            try:
                sandbox.kill()
            except Exception:  # the episode already failed; the sandbox times out anyway
                pass
    return episode


@dataclass
class Rollouts:
    episodes: list[Episode]
    wall_s: float

    @property
    def failures(self) -> list[Episode]:
        return [e for e in self.episodes if e.error]

    def rate(self) -> float:
        return len(self.episodes) / self.wall_s if self.wall_s else 0.0


def run_rollouts(workers: int, episodes: int, template: str = TASK_TEMPLATE, on_done: Any = None) -> Rollouts:
    """`episodes` episodes on `workers` threads (each one episode at a time, as a trainer's workers)."""
    numbers = itertools.count()
    lock = threading.Lock()
    done: list[Episode] = []

    def worker() -> None:
        while True:
            with lock:
                number = next(numbers)
            if number >= episodes:
                return
            episode = run_episode(number, template)
            with lock:
                done.append(episode)
                if on_done is not None:
                    on_done(episode)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return Rollouts(sorted(done, key=lambda e: e.number), time.perf_counter() - started)


def rollouts_report(rollouts: Rollouts, workers: int, build_s: float) -> Report:
    report = Report("rl")
    succeeded = [e for e in rollouts.episodes if not e.error]
    for phase in ("episode", "create", "patch", "pytest", "delete"):
        samples = [e.phases[phase] for e in succeeded if phase in e.phases]
        report.samples[phase] = samples
        report.add(metric=phase if phase == "episode" else f"  phase: {phase}", **percentiles(samples))
    rewards = [e.reward for e in succeeded if e.reward is not None]
    report.add(
        metric="rollouts",
        workers=workers,
        episodes=len(rollouts.episodes),
        failures=len(rollouts.failures),
        wall_s=round(rollouts.wall_s, 2),
        episodes_per_s=round(rollouts.rate(), 3),
        mean_reward=round(sum(rewards) / len(rewards), 3) if rewards else "",
    )
    report.notes.append(f"task template {TASK_TEMPLATE} built (or found cached) in {build_s:.1f} s")
    report.notes.extend(f"episode {e.number}: {e.error}" for e in rollouts.failures[:5])
    return report


def run_rl_bench(api: ApiClient, workers: int, episodes: int) -> Report:
    with sdk_pointed_at(api):
        click.echo(f"  building the task template {TASK_TEMPLATE} (cached after the first build)", err=True)
        build_s = ensure_task_template()
        with progress(episodes, f"episodes, {workers} at once") as bar:
            rollouts = run_rollouts(workers, episodes, on_done=lambda _episode: bar.update(1))
    return rollouts_report(rollouts, workers, build_s)


@click.command("rl")
@click.option("--workers", default=10, show_default=True, help="parallel episodes")
@click.option("--episodes", default=100, show_default=True, help="episodes in all")
@json_dir_option("rl.json")
@api_key_option
@click.pass_obj
def rl_bench(config: Config, workers: int, episodes: int, json_dir: Path | None, api_key: str | None) -> None:
    """RL rollouts: create → patch → pytest → reward → delete, N at once, through the E2B SDK."""
    run_rl_bench(target(config, api_key), workers, episodes).show(json_dir)
