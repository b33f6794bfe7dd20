"""Single-process ChainReach throughput (and reference returns) per chain length, as a markdown table for the docs.

    python benchmark/chain_reach_speed.py                      # J = 4, 16, 64, 256
    python benchmark/chain_reach_speed.py --links 16 --steps 50000 --episodes 0

"raw" steps the unwrapped env with one fixed random action (the env's own cost); "make" steps ``gym.make(id)`` with
fresh ``action_space.sample()`` actions and resets on truncation (what a training loop sees, wrapper overhead included).
Returns are over ``--episodes`` 100-step episodes with seeds 0..N-1: uniform random actions, and the scripted
damped-least-squares controller ``jacobian_transpose_action``.
"""

import argparse
import os
import platform
import time

import gymnasium as gym
import numpy as np

from envs.chain_reach import ChainReachEnv, jacobian_transpose_action, register_chain_reach


def raw_steps_per_second(num_links: int, steps: int, repeats: int) -> float:
    env = ChainReachEnv(num_links)
    env.reset(seed=0)
    action = env.action_space.sample()
    for _ in range(min(steps, 1000)):  # warm caches before timing
        env.step(action)
    best = 0.0
    # best of several runs: the minimum time is the least disturbed by other load on the machine
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            env.step(action)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def make_steps_per_second(num_links: int, steps: int) -> float | None:
    env_id = f"ChainReach{num_links}-v0"
    if env_id not in gym.registry:
        return None
    env = gym.make(env_id)
    env.action_space.seed(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def episode_returns(num_links: int, episodes: int, policy: str) -> np.ndarray:
    env = ChainReachEnv(num_links)
    rng = np.random.default_rng(0)
    returns = []
    for seed in range(episodes):
        obs, _ = env.reset(seed=seed)
        total = 0.0
        for _ in range(100):
            if policy == "random":
                action = rng.uniform(-1.0, 1.0, 2 * num_links)
            else:
                action = jacobian_transpose_action(obs, num_links)
            obs, reward, *_ = env.step(action)
            total += reward
        returns.append(total)
    return np.asarray(returns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", type=int, nargs="+", default=[4, 16, 64, 256], help="chain lengths J")
    parser.add_argument("--steps", type=int, default=20000, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for the raw number (best is reported)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes for the return columns (0 skips them)")
    args = parser.parse_args()
    register_chain_reach()

    print(
        f"ChainReach, single process: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, gymnasium {gym.__version__}\n"
    )
    header = "| env id | J | act dim | obs dim | raw steps/s | make steps/s |"
    rule = "|---|---|---|---|---|---|"
    if args.episodes:
        header += f" random return ({args.episodes} ep) | scripted return ({args.episodes} ep) |"
        rule += "---|---|"
    print(header)
    print(rule)
    for num_links in args.links:
        raw = raw_steps_per_second(num_links, args.steps, args.repeats)
        made = make_steps_per_second(num_links, args.steps)
        made_txt = "n/a (not registered)" if made is None else f"{made:,.0f}"
        row = f"| ChainReach{num_links}-v0 | {num_links} | {2 * num_links} | {6 * num_links + 6} | {raw:,.0f} | {made_txt} |"
        if args.episodes:
            for policy in ("random", "scripted"):
                ret = episode_returns(num_links, args.episodes, policy)
                row += f" {ret.mean():.1f} ± {ret.std():.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
