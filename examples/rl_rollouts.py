"""RL rollouts on Cube with the unmodified E2B SDK: N parallel episodes, each in a fresh sandbox.

    E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000 E2B_API_KEY=... \\
        python3 examples/rl_rollouts.py --workers 10 --episodes 100

Each episode creates a sandbox from a small task template (the default template plus a
repository whose test fails; built once with the SDK's template builder), applies a
candidate patch (a policy's output: here half fix the bug, half do not), runs `pytest`,
takes reward = 1 if the tests pass, and deletes the sandbox. Prints episodes/s, create
p50/p95 and failures. The episode is `appliance.bench.rl.run_episode`, plain E2B SDK calls;
`cube bench rl` runs the same rollouts as a benchmark.
"""

from __future__ import annotations

import argparse
import statistics

from appliance.bench.rl import ensure_task_template, run_rollouts


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args()

    print(f"task template ready in {ensure_task_template(print):.1f} s")
    rollouts = run_rollouts(args.workers, args.episodes)
    creates = [e.phases["create"] for e in rollouts.episodes if "create" in e.phases]
    rewards = [e.reward for e in rollouts.episodes if e.reward is not None and not e.error]
    print(f"episodes: {len(rollouts.episodes)} in {rollouts.wall_s:.1f} s = {rollouts.rate():.2f} episodes/s")
    print(
        f"create p50 {percentile(creates, 0.5) * 1000:.0f} ms, p95 {percentile(creates, 0.95) * 1000:.0f} ms"
    )
    print(f"mean reward {statistics.fmean(rewards) if rewards else float('nan'):.2f}")
    print(f"failures: {len(rollouts.failures)}")
    for episode in rollouts.failures[:5]:
        print(f"  episode {episode.number}: {episode.error}")


if __name__ == "__main__":
    main()
