"""Fingerprint of every algorithm: a short fixed-seed CPU run per (algorithm, preset) on ChainReach4-v0.

A refactor must not change results. Run this before and after (the algorithm files can come from another checkout
with --algos-dir), then compare the two output folders with --compare: final_eval.json (wall time excluded) and every
TensorBoard scalar except charts/SPS must match bit for bit.

    python benchmark/fingerprint.py --out /tmp/fp_before --algos-dir /path/to/old/checkout/algos
    python benchmark/fingerprint.py --out /tmp/fp_after
    python benchmark/fingerprint.py --compare /tmp/fp_before /tmp/fp_after
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--env-id", "ChainReach4-v0", "--seed", "3", "--num-envs", "2", "--learning-starts", "256",
          "--total-timesteps", "1200", "--batch-size", "64", "--hidden-dim", "64", "--eval-freq", "600",
          "--eval-episodes", "2", "--final-eval-episodes", "3", "--log-every", "10", "--no-cuda"]  # fmt: skip
# (name, algorithm file, extra flags): every preset each file has, with its own cost kept small.
RUNS = [
    ("sac-qflex-protocol", "sac", ["--preset", "qflex-protocol"]),
    ("sac-paper", "sac", ["--preset", "paper"]),
    ("qflex", "qflex", ["--flow-steps", "5", "--euler-steps", "5"]),
    ("crossq-qflex-protocol", "crossq", ["--preset", "qflex-protocol"]),
    ("crossq-paper", "crossq", ["--preset", "paper", "--critic-hidden-dim", "64"]),
    ("dacer", "dacer", ["--alpha-every", "100", "--entropy-samples", "50", "--num-timesteps", "5"]),
    ("sdac", "sdac", ["--num-particles", "4", "--num-timesteps", "5", "--alpha-every", "50"]),
]


def read_scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag != "charts/SPS"}


def fingerprint(name: str, algo: str, flags: list[str], algos_dir: Path, out: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    with tempfile.TemporaryDirectory() as cwd:
        start = time.time()
        proc = subprocess.run([sys.executable, str(algos_dir / f"{algo}.py"), *COMMON, *flags], cwd=cwd, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode != 0:
            return f"{name}: FAILED ({proc.returncode})\n{proc.stdout[-2000:]}"
        (run_dir,) = (Path(cwd) / "runs").iterdir()
        final = json.loads((run_dir / "final_eval.json").read_text())
        final.pop("wall_time", None)
        record = dict(final_eval=final, scalars=read_scalars(run_dir), command=[algo, *COMMON, *flags])
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        return f"{name}: return {final['eval/episodic_return']:.6f} ({time.time() - start:.0f} s)"


def compare(before: Path, after: Path) -> int:
    failures = 0
    for path in sorted(before.glob("*.json")):
        other = after / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {after}")
            failures += 1
            continue
        a, b = json.loads(path.read_text()), json.loads(other.read_text())
        diffs = [k for k in a["final_eval"] if a["final_eval"][k] != b["final_eval"].get(k)]
        common = sorted(set(a["scalars"]) & set(b["scalars"]))
        diffs += [k for k in common if a["scalars"][k] != b["scalars"][k]]
        only = sorted(set(a["scalars"]) ^ set(b["scalars"]))
        status = "identical" if not diffs else "DIFFERENT: " + ", ".join(diffs)
        print(f"{path.stem}: {status} ({len(common)} scalar tags compared; only in one: {only or 'none'})")
        failures += bool(diffs)
    return failures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the fingerprints")
    parser.add_argument("--algos-dir", type=Path, default=REPO / "algos", help="where the algorithm files are")
    parser.add_argument("--only", nargs="*", help="run names to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    cli = parser.parse_args()
    if cli.compare:
        sys.exit(1 if compare(*cli.compare) else 0)
    cli.out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not cli.only or r[0] in cli.only]
    with ThreadPoolExecutor(cli.workers) as pool:
        for line in pool.map(lambda r: fingerprint(*r, cli.algos_dir.resolve(), cli.out), runs):
            print(line, flush=True)
