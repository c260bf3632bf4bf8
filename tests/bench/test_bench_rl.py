"""`cube bench rl`'s task, checked without a sandbox: the repository's test fails as shipped, and
each candidate patch applies with `git apply` and earns the reward the bench expects of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from appliance.bench.rl import CANDIDATES, TASK_FILES, Episode, Rollouts, candidate_patch


def _task(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in TASK_FILES.items():
        (directory / name).write_text(text)
    return directory


def _tests_pass(task: Path) -> bool:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(task)],
        cwd=task, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 1: tests failed; anything else is broken
    return run.returncode == 0


def test_the_task_fails_as_shipped(tmp_path: Path) -> None:
    assert not _tests_pass(_task(tmp_path))


def test_each_candidate_applies_and_earns_its_reward(tmp_path: Path) -> None:
    for episode in range(len(CANDIDATES)):
        task = _task(tmp_path / str(episode))
        patch, reward = candidate_patch(episode)
        (task / "candidate.patch").write_text(patch)
        subprocess.run(["git", "apply", "candidate.patch"], cwd=task, check=True)
        assert _tests_pass(task) == (reward == 1.0)


def test_failures_are_the_episodes_with_an_error() -> None:
    rollouts = Rollouts([Episode(0, reward=1.0), Episode(1, error="ReadTimeout")], wall_s=2.0)
    assert [e.number for e in rollouts.failures] == [1] and rollouts.rate() == 1.0
