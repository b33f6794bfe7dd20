"""Env steps per second of the vector envs a training script can use, against the env-only ceiling.

For each env id, at E envs (random actions in [-1, 1], pre-drawn, so no sampling cost is measured):
  * ceiling W: the E envs split into W independent processes (the EnvPool slices) that step their envs with no
    communication at all; the sum of their rates is the most any W-process vector env can reach;
  * pool W: envs.pool.EnvPool with W workers (shared memory, one tiny message per worker per step);
  * sync / async: gymnasium's SyncVectorEnv / AsyncVectorEnv (E processes, shared memory) from make_vector_env.
`/ ceiling` divides a row by the ceiling with the same number of processes (sync: W = 1; async: the largest W).
`start-up s` is construction plus the first reset (for the ceiling: building the envs in the W processes).
Each row is the median of --rounds runs, the rows taken in a rotated order each round (a shared machine's load moves).

    python benchmark/env_speed.py --env-ids myoLegWalk-v0 ChainReach16-v0 --num-envs 16 --workers 1 2 --seconds 3

Run it on an otherwise idle machine; prints a markdown table with the CPU name and load average for the docs.
"""

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import envs  # noqa: E402
from envs.pool import EnvPool, default_start_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import cpu_name  # noqa: E402  (benchmark/speed.py, standard library only)


def random_actions(num_envs: int, act_dim: int, seed: int = 0, count: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (count, num_envs, act_dim)).astype(np.float32)


def _ceiling_worker(env_id, seed, lo, hi, seconds, barrier, results):
    built = time.perf_counter()
    env_list = [envs.make_env(env_id, seed + i, i, False, "")() for i in range(lo, hi)]
    for i, env in enumerate(env_list):
        env.reset(seed=seed + lo + i)
    built = time.perf_counter() - built
    actions = random_actions(hi - lo, env_list[0].action_space.shape[0], seed=lo)
    barrier.wait()
    steps, start = 0, time.perf_counter()
    while True:
        batch = actions[steps % len(actions)]
        for env, action in zip(env_list, batch, strict=True):
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        steps += 1
        if steps % 4 == 0 and time.perf_counter() - start >= seconds:
            break
    results.put((steps * (hi - lo) / (time.perf_counter() - start), built))


def ceiling(env_id: str, num_envs: int, num_workers: int, seconds: float) -> tuple[float, float]:
    """Total env steps/s of `num_workers` processes stepping their slices with no communication; start-up seconds."""
    ctx = mp.get_context(default_start_method())
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(num_envs), num_workers)])
    barrier, results = ctx.Barrier(num_workers + 1), ctx.Queue()
    start = time.perf_counter()
    processes = [
        ctx.Process(target=_ceiling_worker, args=(env_id, 0, int(lo), int(hi), seconds, barrier, results), daemon=True)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for p in processes:
        p.start()
    barrier.wait()
    startup = time.perf_counter() - start
    rates = [results.get(timeout=600)[0] for _ in processes]
    for p in processes:
        p.join()
    return sum(rates), startup


def vector_rate(vector_env, seconds: float, start: float) -> tuple[float, float]:
    vector_env.reset(seed=0)
    startup = time.perf_counter() - start
    num_envs = vector_env.num_envs
    actions = random_actions(num_envs, vector_env.single_action_space.shape[0])
    for k in range(5):  # warm-up
        vector_env.step(actions[k])
    steps, begin = 0, time.perf_counter()
    while True:
        vector_env.step(actions[steps % len(actions)])
        steps += 1
        if steps % 4 == 0 and time.perf_counter() - begin >= seconds:
            break
    rate = steps * num_envs / (time.perf_counter() - begin)
    vector_env.close()
    return rate, startup


def pool_rate(env_id, args, num_workers, method) -> tuple[float, float]:
    start = time.perf_counter()
    return vector_rate(EnvPool(env_id, args.num_envs, 0, num_workers, start_method=method), args.seconds, start)


def gym_rate(env_id, args, kind) -> tuple[float, float]:
    start = time.perf_counter()
    vector_env = envs.make_vector_env(env_id, args.num_envs, 0, async_envs=kind == "async")
    return vector_rate(vector_env, args.seconds, start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-ids", nargs="+", default=["myoLegWalk-v0", "ChainReach16-v0"])
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed stepping per row (after the start-up)")
    parser.add_argument("--start-methods", nargs="+", default=[default_start_method()],
                        help="EnvPool start methods to time (the extra ones at the largest W)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="each row is the median of this many runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sync", "async"], help="rows to leave out")
    args = parser.parse_args()

    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for env_id in args.env_ids:
        runners = [
            (f"ceiling W={w}", w, lambda w=w, e=env_id: ceiling(e, args.num_envs, w, args.seconds)) for w in args.workers
        ]
        for method in args.start_methods:
            for w in args.workers if method == args.start_methods[0] else [max(args.workers)]:
                runners.append((f"pool W={w} ({method})", w, lambda w=w, m=method, e=env_id: pool_rate(e, args, w, m)))
        for kind in ("sync", "async"):
            if kind not in args.skip:
                w = 1 if kind == "sync" else max(args.workers)
                label = f"{kind} ({'1 process' if w == 1 else f'{args.num_envs} processes'})"
                runners.append((label, w, lambda kind=kind, e=env_id: gym_rate(e, args, kind)))
        results = {label: [] for label, _, _ in runners}
        for r in range(args.rounds):  # rows rotate, so a load change on a shared machine does not hit one row only
            for label, _, run in runners[r % len(runners) :] + runners[: r % len(runners)]:
                results[label].append(run())
        ceilings = {w: np.median([rate for rate, _ in results[f"ceiling W={w}"]]) for w in args.workers}
        for label, w, _ in runners:
            rate, startup = (float(np.median(x)) for x in zip(*results[label], strict=True))
            rows.append((env_id, label, startup, rate, rate / ceilings[w]))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nEnv steps/s at E = {args.num_envs}, median of {args.rounds} x {args.seconds:g} s per row, on CPU {cpu_name()} "
          f"({os.cpu_count()} cores; load average {load_before} before, {load} after)\n")  # fmt: skip
    print("| env | runner | start-up s | steps/s | / ceiling |\n|---|---|---|---|---|")
    for env_id, runner, startup, rate, ratio in rows:
        print(f"| {env_id} | {runner} | {startup:.2f} | {rate:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
