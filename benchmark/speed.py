"""Throughput of the algorithm scripts: env transitions per second, overall and once updates run.

Runs `algos/<algo>.py` for a short budget in a scratch directory, then reads its TensorBoard log:
  * `SPS` is the script's own `charts/SPS` at the end (CleanRL's definition: transitions / wall time, warm-up included);
  * `train SPS` is measured between the first and the last `charts/SPS` point, i.e. only while updates run, from the
    events' wall-clock stamps, so it shows the cost of acting + updating without the warm-up;
  * `ms/update` is the wall time per gradient update over the same window (acting and env stepping included).

    python benchmark/speed.py --algos sac qflex --env-id myoLegWalk-v0 --num-envs 1 4 -- --no-cuda

Extra flags after `--` go to every script. Prints a markdown table (with the machine's CPU/GPU name) for the docs.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_sps(run_dir: Path) -> tuple[float, float, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    sps = accumulator.Scalars("charts/SPS")
    updates = accumulator.Scalars("charts/updates")
    first, last = sps[0], sps[-1]
    elapsed = last.wall_time - first.wall_time
    train_sps = (last.step - first.step) / elapsed if elapsed > 0 else float("nan")
    ms_per_update = 1000 * elapsed / (updates[-1].value - updates[0].value) if len(updates) > 1 else float("nan")
    return last.value, train_sps, ms_per_update


def device_name(extra: list[str]) -> str:
    import torch

    if torch.cuda.is_available() and "--no-cuda" not in extra:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["sac"], help="algorithm file stems under algos/")
    parser.add_argument("--env-id", default="myoLegWalk-v0")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--total-timesteps", type=int, default=4000, help="per run; updates run after --learning-starts")
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=20, help="updates between SPS points")
    args = parser.parse_args(argv)

    rows = []
    for algo in args.algos:
        for num_envs in args.num_envs:
            with tempfile.TemporaryDirectory() as scratch:
                command = [sys.executable, str(REPO / "algos" / f"{algo}.py"), "--env-id", args.env_id, "--num-envs",
                           str(num_envs), "--total-timesteps", str(args.total_timesteps), "--learning-starts",
                           str(args.learning_starts), "--log-every", str(args.log_every), "--eval-freq", "0",
                           "--final-eval-episodes", "0", *extra]  # fmt: skip
                env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
                proc = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"speed.py: {algo} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                (run_dir,) = (Path(scratch) / "runs").iterdir()
                rows.append((algo, num_envs, *read_sps(run_dir)))
    print(f"{args.env_id}, {args.total_timesteps} transitions, {args.learning_starts} warm-up, on {device_name(extra)}\n")
    print("| algo | envs | SPS | train SPS | ms/update |\n|---|---|---|---|---|")
    for algo, num_envs, sps, train_sps, ms in rows:
        print(f"| {algo} | {num_envs} | {sps:.0f} | {train_sps:.0f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
