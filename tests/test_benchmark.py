"""benchmark/: resumable sweeps (kill, rerun, failures, --retry-failed, submitit), plots and tables, openrlbenchmark export.

The real runs (a tiny sweep on ChainReach4-v0: sac plus one other existing algorithm, 2 seeds) all happen in one test,
test_sweep_end_to_end, so that pytest-xdist never runs them twice; the helpers and the exporter have their own tests.
A fake `broken` algorithm (a script that exits 3) provides the failing run; the sweep reads algorithms from a temporary
folder of symlinks (--algos-dir) so that the fake never enters algos/.
"""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_ENV, load_script, run_script

OTHER_ALGOS = [a for a in ("crossq", "qflex", "dacer", "sdac") if (REPO / "algos" / f"{a}.py").is_file()]
ALGOS = OTHER_ALGOS[:1] + ["sac"]  # falls back to sac alone while the other scripts do not exist yet
ENV = "ChainReach4-v0"
TINY = (
    "--num-envs 2 --total-timesteps 600 --learning-starts 200 --batch-size 32 --eval-freq 300 --eval-episodes 1 "
    "--final-eval-episodes 2 --hidden-dim 32 --buffer-size 5000 --save-model --checkpoint-every 200"
).split()
BROKEN = """import sys
print("broken.py: error: fails on purpose")
sys.exit(3)
"""


def bench(script: str, *args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script(f"benchmark/{script}", *args, cwd=cwd, check=check, timeout=timeout)


def statuses(sweep: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((sweep / "status").glob("*.json"))}


def sweep_args(sweep: Path, algos_dir: Path, algos, seeds, *extra: str) -> list[str]:
    return [
        "--algos",
        *algos,
        "--env-ids",
        ENV,
        "--seeds",
        *map(str, seeds),
        "--workers",
        "2",
        "--runs-dir",
        str(sweep),
        "--algos-dir",
        str(algos_dir),
        *extra,
        "--",
        *TINY,
    ]


def run_killed_and_rerun(root: Path) -> dict:
    """Run the sweep, SIGKILL it after its first completion, rerun it; snapshots for the checks."""
    algos_dir = root / "algos"
    algos_dir.mkdir()
    for algo in ALGOS:
        (algos_dir / f"{algo}.py").symlink_to(REPO / "algos" / f"{algo}.py")
    (algos_dir / "broken.py").write_text(BROKEN)
    sweep_dir = root / "sweep"
    args = sweep_args(sweep_dir, algos_dir, ALGOS, [1, 2])

    first = subprocess.Popen(
        [sys.executable, str(REPO / "benchmark" / "run.py"), *args],
        cwd=root,
        env=dict(os.environ, **TEST_ENV),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if any(s.get("status") == "completed" for s in statuses(sweep_dir).values()):
            break
        time.sleep(0.2)
    killed = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(0.5)  # PR_SET_PDEATHSIG: the orphaned runs get SIGTERM and exit
    after_kill = statuses(sweep_dir)

    rerun = bench("run.py", *args, cwd=root)
    return dict(
        root=root,
        algos_dir=algos_dir,
        dir=sweep_dir,
        killed=killed,
        after_kill=after_kill,
        rerun=rerun,
        after_rerun=statuses(sweep_dir),
    )


def test_sweep_end_to_end(tmp_path):
    """One sweep for everything that needs real runs (a single test, so pytest-xdist never runs it twice)."""
    sweep = run_killed_and_rerun(tmp_path)
    check_kill_and_rerun(sweep)
    check_failure_submitit_and_retry(sweep)
    check_plot(sweep, tmp_path / "plots")


def check_kill_and_rerun(sweep):
    assert sweep["killed"], "the sweep finished before it could be killed"
    after_kill, after = sweep["after_kill"], sweep["after_rerun"]
    completed_before = {k: s for k, s in after_kill.items() if s["status"] == "completed"}
    assert completed_before
    for key, record in completed_before.items():  # completed means finished: final eval written, log copied
        run_dir = sweep["dir"] / record["run_dir"]
        assert (run_dir / "final_eval.json").is_file() and (run_dir / "stdout.log").is_file()
        assert after[key]["run_name"] == record["run_name"] and after[key]["attempts"] == 1  # not repeated
    assert len(after) == 2 * len(ALGOS)
    assert all(s["status"] == "completed" and s["exit_code"] == 0 for s in after.values()), after
    # runs/ holds exactly one finished run per (algo, seed); partial attempts were moved out
    runs = sorted(p.name for p in (sweep["dir"] / "runs").iterdir())
    assert runs == sorted(s["run_name"] for s in after.values())
    for record in after.values():
        assert (sweep["dir"] / record["run_dir"] / "final_eval.json").is_file()
        assert (sweep["dir"] / record["log"]).is_file()
    for key, record in after_kill.items():  # cut short: a second attempt, resumed from its checkpoint if it had one
        if record["status"] == "running":
            assert after[key]["attempts"] == 2
            if after[key]["resumed_from"]:
                assert after[key]["run_name"] == record["run_name"]
                assert after[key]["command"][-2:] == ["--resume", f"models/{record['run_name']}/checkpoint.pt"]
    rerun_log = sweep["rerun"].stdout
    for key in completed_before:
        assert f"skip {key}: completed" in rerun_log
    manifest = list(csv.DictReader(open(sweep["dir"] / "manifest.csv")))
    assert {r["key"] for r in manifest} == set(after)
    assert all(
        r["status"] == "completed" and r["run_dir"].startswith("runs/") and float(r["wall_time_s"]) > 0 for r in manifest
    )
    assert json.loads((sweep["dir"] / "manifest.json").read_text())[0]["extra_args"] == TINY


def check_failure_submitit_and_retry(sweep):
    """A failing algorithm does not stop the others (through submitit's local executor); --retry-failed reruns it only."""
    args = sweep_args(sweep["dir"], sweep["algos_dir"], ["sac", "broken"], [3], "--launcher", "local-submitit")
    proc = bench("run.py", *args, cwd=sweep["root"], check=False)
    assert proc.returncode == 1, proc.stdout
    records = statuses(sweep["dir"])
    assert records["sac__ChainReach4-v0__3"]["status"] == "completed", proc.stdout
    assert records["sac__ChainReach4-v0__3"]["launcher"] == "local-submitit"
    broken = records["broken__ChainReach4-v0__3"]
    assert broken["status"] == "failed" and broken["exit_code"] == 3 and broken["attempts"] == 1
    assert "fails on purpose" in broken["error"] and "fails on purpose" in (sweep["dir"] / broken["log"]).read_text()
    assert "FAILED broken__ChainReach4-v0__3 exit 3" in proc.stdout

    plain = bench(
        "run.py", *sweep_args(sweep["dir"], sweep["algos_dir"], ["sac", "broken"], [3]), cwd=sweep["root"], check=False
    )
    assert plain.returncode == 1 and "skip broken__ChainReach4-v0__3: failed" in plain.stdout
    assert statuses(sweep["dir"])["broken__ChainReach4-v0__3"]["attempts"] == 1

    retry_args = sweep_args(sweep["dir"], sweep["algos_dir"], ["sac", "broken"], [3], "--retry-failed")
    retry = bench("run.py", *retry_args, cwd=sweep["root"], check=False)
    assert retry.returncode == 1
    after = statuses(sweep["dir"])
    assert after["broken__ChainReach4-v0__3"]["attempts"] == 2
    assert after["broken__ChainReach4-v0__3"]["previous_logs"] == [broken["log"]]
    assert after["sac__ChainReach4-v0__3"] == records["sac__ChainReach4-v0__3"]  # completed: untouched
    assert "skip sac__ChainReach4-v0__3: completed" in retry.stdout

    other = sweep_args(sweep["dir"], sweep["algos_dir"], ["sac"], [3])
    other[other.index("--") + 2] = "4"  # --num-envs 4: a completed run with other arguments is an error
    clash = bench("run.py", *other, cwd=sweep["root"], check=False)
    assert clash.returncode == 2 and "already completed" in clash.stdout and "Traceback" not in clash.stdout


def check_plot(sweep, out: Path):
    ours = ALGOS[0]
    out.mkdir()
    bench("plot.py", "--runs-dir", str(sweep["dir"]), "--out", str(out), "--name", "tiny", "--reps", "20",
          "--curve-reps", "20", "--ours", ours, cwd=out)  # fmt: skip
    rows = list(csv.DictReader(open(out / "tiny.csv")))
    assert sorted(r["algo"] for r in rows) == sorted(ALGOS)
    records = [s for s in statuses(sweep["dir"]).values() if s["status"] == "completed"]
    for row in rows:
        assert row["env_id"] == ENV and int(row["transitions"]) == 600
        mine = [s for s in records if s["algo"] == row["algo"]]
        assert int(row["seeds"]) == len(mine) == (3 if row["algo"] == "sac" else 2)
        finals = [json.loads((sweep["dir"] / s["run_dir"] / "final_eval.json").read_text()) for s in mine]
        mean = sum(f["eval/episodic_return"] for f in finals) / len(finals)
        assert float(row["final_return_mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["normalized_score_mean"]) == pytest.approx((mean + 102.8) / 102.8, abs=1e-4)
        assert float(row["wall_time_mean_s"]) > 0
    md = (out / "tiny.md").read_text()
    assert f"## {ENV} (600 transitions" in md and "| sac |" in md and "IQM" in md and "Normalisation references" in md
    for suffix in (".png", "-time.png", "_aggregate.png", "_performance_profile.png"):
        assert (out / f"tiny{suffix}").stat().st_size > 1000
    if len(ALGOS) > 1:
        assert (out / "tiny_probability_of_improvement.png").is_file()
        assert f"{ours},sac" in (out / "tiny_probability_of_improvement.csv").read_text()


def test_normalisation_and_bootstrap_helpers():
    import numpy as np

    plot = load_script("benchmark/plot.py", "bench_plot")
    ref = plot.reference_for("ChainReach64-v0")
    assert plot.normalize(ref.low, ref) == 0.0 and plot.normalize(0.0, ref) == 1.0
    assert plot.reference_for("myoLegWalk-v0").metric == "success" and plot.reference_for("Ant-v5") is None
    values = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    mean, lo, hi = plot.bootstrap_mean_ci(values, 200, np.random.default_rng(0))
    assert np.allclose(mean, [2.0, 3.0]) and np.all(lo <= mean) and np.all(mean <= hi) and np.all(lo >= 0) and np.all(hi <= 5)
    assert plot.iqm([0, 1, 2, 3, 100, -100, 4, 5]) == pytest.approx(2.5)
    envs = ["ChainReach64-v0", "ChainReach16-v0", "myoLegWalk-v0", "ChainReach4-v0"]
    assert plot.env_order(envs + envs) == ["ChainReach4-v0", "ChainReach16-v0", "ChainReach64-v0", "myoLegWalk-v0"]


def test_export_openrlbenchmark(tmp_path):
    """Synthetic TensorBoard runs -> openrlbenchmark's offline cache (sqlite index, run.json, run_df.csv)."""
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    for seed in (1, 2):
        name = f"ChainReach4-v0__fake__{seed}__{1700000000 + seed}"
        writer = SummaryWriter(str(runs / name))
        for step in (100, 200, 300):
            writer.add_scalar("eval/episodic_return", -100.0 + step / 10 + seed, step)
            writer.add_scalar("charts/episodic_return", -120.0 + seed, step)
        writer.close()
        config = {"exp_name": "fake", "env_id": "ChainReach4-v0", "seed": seed, "run_name": name}
        (runs / name / "config.json").write_text(json.dumps(config))
    dest = tmp_path / "dataset"
    proc = bench("export_openrlbenchmark.py", "--runs-dir", str(runs), "--dest", str(dest), "--entity", "ent",
                 "--project", "proj", cwd=tmp_path)  # fmt: skip
    assert "exported 2 run(s)" in proc.stdout
    project = dest / "ent" / "proj"
    db = sqlite3.connect(project / "offline.sqlite")
    for path in ("$.env_id.value", '$."env_id.value"'):  # peewee 3.x and newer spell rlops' filter differently
        rows = db.execute(
            "SELECT id, state, path FROM offlinerun WHERE json_extract(config, ?) = ? AND json_extract(config, ?) = ?",
            (path, "ChainReach4-v0", path.replace("env_id", "exp_name"), "fake"),
        ).fetchall()
        assert len(rows) == 2 and all(r[1] == "finished" for r in rows)
    tagged = db.execute(
        "SELECT COUNT(*) FROM offlinerun JOIN tag_offlinerun_through t ON t.offlinerun_id = offlinerun.id "
        "JOIN tag ON tag.id = t.tag_id WHERE tag.name = 'offline-export'"
    ).fetchone()[0]
    assert tagged == 2
    run_id = rows[0][0]
    assert json.loads(rows[0][2]) == ["ent", "proj", run_id]
    record = json.loads((project / run_id / "run.json").read_text())
    assert record["config"]["env_id"]["value"] == "ChainReach4-v0" and record["user"]["username"] == "offline"
    assert set(record) >= {"id", "name", "state", "url", "project", "entity", "config", "tags", "path", "user"}
    table = list(csv.DictReader(open(project / run_id / "run_df.csv")))
    evals = [r for r in table if r["eval/episodic_return"]]
    assert [int(r["global_step"]) for r in evals] == [100, 200, 300] and len(table) == 6
    assert all(float(r["_runtime"]) >= 0 for r in table)
    # exporting again replaces, never duplicates
    bench("export_openrlbenchmark.py", "--runs-dir", str(runs), "--dest", str(dest), "--entity", "ent", "--project", "proj",
          cwd=tmp_path)  # fmt: skip
    db = sqlite3.connect(project / "offline.sqlite")
    assert db.execute("SELECT COUNT(*) FROM offlinerun").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM tag_offlinerun_through").fetchone()[0] == 2


# ---------------------------------------------------------------------------------------------------------------
# killed in the first seconds of a run: a fake algorithm (no torch, starts in milliseconds) that behaves like the real
# scripts on disk: runs/{run_name}/ once its arguments are valid, then models/{run_name}/checkpoint.pt, and on
# `--resume PATH` the checkpoint's run name and arguments (other flags than the budget are refused, as the scripts do)

FAKE = r"""import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--env-id")
parser.add_argument("--seed", type=int)
parser.add_argument("--total-timesteps", type=int)
parser.add_argument("--num-envs", type=int)
parser.add_argument("--resume")
args = parser.parse_args()
given = {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
hold = os.environ.get("FAKE_HOLD")  # "checkpoint": wait after the first checkpoint; "early": wait before it
if args.resume:
    if given - {"--resume", "--total-timesteps"}:
        sys.exit(f"fake.py: error: a resumed run keeps the checkpoint's arguments; {sorted(given)} cannot change")
    ckpt = json.load(open(args.resume))
    run_name, saved, step = ckpt["run_name"], ckpt["args"], ckpt["step"]
    total = args.total_timesteps or saved["total_timesteps"]
    if total <= step:
        sys.exit(f"fake.py: error: --total-timesteps {total} is not past the checkpoint's step {step}")
else:
    run_name, saved, step = f"{args.env_id}__fake__{args.seed}__{int(time.time())}", vars(args), 0
    total = args.total_timesteps
os.makedirs(f"runs/{run_name}", exist_ok=True)
json.dump(dict(saved, total_timesteps=total), open(f"runs/{run_name}/config.json", "w"))
with open(f"runs/{run_name}/progress.txt", "a") as f:
    f.write(f"start {step}\n")
os.makedirs(f"models/{run_name}", exist_ok=True)
if hold == "early":  # cut short while writing its first checkpoint: a temp file, no checkpoint.pt
    open(f"models/{run_name}/checkpoint.pt.tmp", "w").close()
    time.sleep(120)
if step == 0:
    step = 100
    json.dump(dict(run_name=run_name, args=saved, step=step), open(f"models/{run_name}/checkpoint.pt.tmp", "w"))
    os.replace(f"models/{run_name}/checkpoint.pt.tmp", f"models/{run_name}/checkpoint.pt")
    if hold == "checkpoint":
        time.sleep(120)
json.dump(dict(resumed_from=args.resume, step=total), open(f"runs/{run_name}/final_eval.json", "w"))
print("fake.py: done")
"""


def fake_sweep(tmp_path: Path) -> tuple[Path, list[str]]:
    algos_dir = tmp_path / "algos"
    algos_dir.mkdir(parents=True)
    (algos_dir / "fake.py").write_text(FAKE)
    sweep_dir = tmp_path / "sweep"
    args = ["--algos", "fake", "--env-ids", ENV, "--seeds", "1", "--runs-dir", str(sweep_dir), "--algos-dir", str(algos_dir),
            "--", "--num-envs", "2", "--total-timesteps", "300"]  # fmt: skip
    return sweep_dir, args


def start_and_kill_early(tmp_path: Path, hold: str, kill: str) -> tuple[Path, list[str], dict, str]:
    """Start a one-run sweep, kill it (the sweep with SIGKILL, or the run's process) within its first second, as soon as
    the run wrote its first checkpoint (hold="checkpoint") or its run directory (hold="early"); the record and run name
    left behind."""
    sweep_dir, args = fake_sweep(tmp_path)
    first = subprocess.Popen([sys.executable, str(REPO / "benchmark" / "run.py"), *args], cwd=tmp_path,
                             env=dict(os.environ, **TEST_ENV, FAKE_HOLD=hold), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    wanted = "checkpoint.pt" if hold == "checkpoint" else "checkpoint.pt.tmp"
    deadline = time.time() + 60
    while time.time() < deadline and not list((sweep_dir / "models").glob(f"*/{wanted}")):
        time.sleep(0.02)
    (written,) = (sweep_dir / "models").glob(f"*/{wanted}")
    run_name = written.parent.name
    if kill == "sweep":
        first.send_signal(signal.SIGKILL)
    else:
        os.killpg(statuses(sweep_dir)["fake__ChainReach4-v0__1"]["pid"], signal.SIGKILL)
    first.wait(timeout=60)
    time.sleep(1.1)  # a fresh attempt would get another run name (its time stamp is in seconds)
    return sweep_dir, args, statuses(sweep_dir)["fake__ChainReach4-v0__1"], run_name


def leftover_names(sweep_dir: Path) -> dict[str, list[str]]:
    return {d: sorted(p.name for p in (sweep_dir / d).iterdir()) if (sweep_dir / d).is_dir() else []
            for d in ("runs", "models", "incomplete", "failed", "videos")}  # fmt: skip


@pytest.mark.parametrize("kill", ["sweep", "run"])
def test_killed_right_after_first_checkpoint_resumes(tmp_path, kill):
    sweep_dir, args, after_kill, run_name = start_and_kill_early(tmp_path, "checkpoint", kill)
    assert after_kill["status"] in ("running", "interrupted"), after_kill
    rerun = bench("run.py", *args, cwd=tmp_path)
    record = statuses(sweep_dir)["fake__ChainReach4-v0__1"]
    checkpoint = f"models/{run_name}/checkpoint.pt"
    assert record["status"] == "completed" and record["attempts"] == 2, (record, rerun.stdout)
    assert record["run_name"] == run_name and record["resumed_from"] == checkpoint
    assert record["command"][2:] == ["--resume", checkpoint]  # the checkpoint holds every other argument
    assert json.loads((sweep_dir / "runs" / run_name / "final_eval.json").read_text())["resumed_from"] == checkpoint
    assert (sweep_dir / "runs" / run_name / "progress.txt").read_text() == "start 0\nstart 100\n"  # continued, not redone
    left = leftover_names(sweep_dir)
    assert left["runs"] == left["models"] == [run_name] and not left["incomplete"] and not left["failed"], left
    again = bench("run.py", *args, cwd=tmp_path)  # completed: skipped
    assert "skip fake__ChainReach4-v0__1: completed" in again.stdout
    assert statuses(sweep_dir)["fake__ChainReach4-v0__1"] == record


@pytest.mark.parametrize("kill", ["sweep", "run"])
def test_killed_before_first_checkpoint_restarts_cleanly(tmp_path, kill):
    sweep_dir, args, after_kill, run_name = start_and_kill_early(tmp_path, "early", kill)
    rerun = bench("run.py", *args, cwd=tmp_path)
    record = statuses(sweep_dir)["fake__ChainReach4-v0__1"]
    assert record["status"] == "completed" and record["attempts"] == 2, (record, rerun.stdout)
    assert record["resumed_from"] is None and "--resume" not in record["command"]
    assert record["run_name"] != run_name  # a fresh run; the partial directories of the first attempt are gone
    left = leftover_names(sweep_dir)
    assert left["runs"] == left["models"] == [record["run_name"]] and not left["incomplete"], left
    assert (sweep_dir / "runs" / record["run_name"] / "progress.txt").read_text() == "start 0\n"
    assert len(record["previous_logs"]) == 1 and (sweep_dir / record["previous_logs"][0]).is_file()


def test_real_run_killed_after_first_checkpoint_resumes(tmp_path):
    """The same with sac: the sweep is SIGKILLed as soon as models/{run_name}/checkpoint.pt appears (step 200 of 600);
    the rerun continues that run with nothing but `--resume PATH`, which the real script accepts."""
    algos_dir = tmp_path / "algos"
    algos_dir.mkdir()
    (algos_dir / "sac.py").symlink_to(REPO / "algos" / "sac.py")
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(sweep_dir, algos_dir, ["sac"], [1])
    command = [sys.executable, str(REPO / "benchmark" / "run.py"), *args]
    first = subprocess.Popen(command, cwd=tmp_path, env=dict(os.environ, **TEST_ENV), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not list((sweep_dir / "models").glob("*/checkpoint.pt")):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    (written,) = (sweep_dir / "models").glob("*/checkpoint.pt")
    run_name = written.parent.name
    time.sleep(1.1)
    bench("run.py", *args, cwd=tmp_path)
    record = statuses(sweep_dir)["sac__ChainReach4-v0__1"]
    checkpoint = f"models/{run_name}/checkpoint.pt"
    assert record["status"] == "completed" and record["attempts"] == 2 and record["run_name"] == run_name, record
    assert record["command"][2:] == ["--resume", checkpoint] and record["resumed_from"] == checkpoint
    assert json.loads((sweep_dir / "runs" / run_name / "final_eval.json").read_text())["global_step"] == 600
    left = leftover_names(sweep_dir)
    assert left["runs"] == left["models"] == [run_name] and not left["incomplete"], left


def test_resume_budget_changed_arguments_and_no_resume(tmp_path):
    """A rerun with a larger budget passes it alongside --resume; other changed flags are an error while a checkpoint
    would be resumed; --no-resume starts afresh and keeps the old attempt (checkpoint included) out of runs/ and
    models/, under incomplete/{run_name}.superseded/."""
    sweep_dir, args, _, run_name = start_and_kill_early(tmp_path, "checkpoint", "sweep")
    bigger = [a if a != "300" else "500" for a in args]
    changed = bench("run.py", *bigger[:-4], "--num-envs", "3", "--total-timesteps", "500", cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "was interrupted with other arguments" in changed.stdout, changed.stdout
    assert "Traceback" not in changed.stdout
    dry = bench("run.py", *bigger[:-5], "--dry-run", *bigger[-5:], cwd=tmp_path)
    assert f"resumes models/{run_name}/checkpoint.pt" in dry.stdout
    bench("run.py", *bigger, cwd=tmp_path)
    record = statuses(sweep_dir)["fake__ChainReach4-v0__1"]
    assert record["status"] == "completed" and record["run_name"] == run_name
    assert record["command"][2:] == ["--total-timesteps", "500", "--resume", f"models/{run_name}/checkpoint.pt"]
    assert json.loads((sweep_dir / "runs" / run_name / "final_eval.json").read_text())["step"] == 500

    sweep_dir, args, _, run_name = start_and_kill_early(tmp_path / "fresh", "checkpoint", "run")
    bench("run.py", *args[:-5], "--no-resume", *args[-5:], cwd=tmp_path)
    record = statuses(sweep_dir)["fake__ChainReach4-v0__1"]
    assert record["status"] == "completed" and record["resumed_from"] is None and record["run_name"] != run_name
    assert record["superseded"] == [f"incomplete/{run_name}.superseded"]
    assert (sweep_dir / record["superseded"][0] / "models" / "checkpoint.pt").is_file()
    left = leftover_names(sweep_dir)
    assert left["runs"] == left["models"] == [record["run_name"]] and left["incomplete"] == [f"{run_name}.superseded"]


def test_archive_keeps_completed_runs_and_lets_a_new_sweep_continue(tmp_path):
    """benchmark/archive.py copies only completed runs' small files; copied back, a new sweep skips them."""
    sweep_dir, args = fake_sweep(tmp_path)
    bench("run.py", *args, cwd=tmp_path)
    (run_name,) = [r["run_name"] for r in statuses(sweep_dir).values()]
    (sweep_dir / "runs" / run_name / "events.out.tfevents.1.host").write_bytes(b"events")  # as the real scripts write
    kept = tmp_path / "archive"
    assert "1 run(s) copied, 0 already there" in bench("archive.py", str(sweep_dir), str(kept), cwd=tmp_path).stdout
    assert sorted(p.name for p in (kept / "runs" / run_name).iterdir()) == [
        "config.json", "events.out.tfevents.1.host", "final_eval.json", "stdout.log"]  # fmt: skip
    assert not (kept / "models").exists() and not any((kept / "logs").iterdir())
    record, archived = statuses(sweep_dir)["fake__ChainReach4-v0__1"], statuses(kept)["fake__ChainReach4-v0__1"]
    assert archived["command"][0] == "python" and archived["command"][1:] == record["command"][1:]
    assert {k: v for k, v in archived.items() if k != "command"} == {k: v for k, v in record.items() if k != "command"}

    seeds_at = args.index("--seeds") + 1
    two_seeds = args[:seeds_at] + ["1", "2"] + args[seeds_at + 1 :]
    two_seeds[two_seeds.index("--") : two_seeds.index("--")] = ["--archive", str(kept)]
    out = bench("run.py", *two_seeds, cwd=tmp_path).stdout  # seed 2 completes later: --archive adds it as it completes
    assert "archived fake__ChainReach4-v0__2 into" in out and "archived fake__ChainReach4-v0__1" not in out, out
    assert "0 run(s) copied, 2 already there" in bench("archive.py", str(sweep_dir), str(kept), cwd=tmp_path).stdout

    fresh = tmp_path / "elsewhere"  # another machine: the archive copied back, then the sweep with a third seed
    assert "2 run(s) copied" in bench("archive.py", str(kept), str(fresh), cwd=tmp_path).stdout
    three_seeds = [str(fresh) if a == str(sweep_dir) else a for a in args[:seeds_at] + ["1", "2", "3"] + args[seeds_at + 1 :]]
    out = bench("run.py", *three_seeds, cwd=tmp_path).stdout
    assert "1 run(s) to go, 2 skipped" in out and "skip fake__ChainReach4-v0__1: completed" in out, out
    assert statuses(fresh)["fake__ChainReach4-v0__3"]["status"] == "completed"

    other = [{"300": "400", str(sweep_dir): str(tmp_path / "other")}.get(a, a) for a in args]  # other arguments: refused
    bench("run.py", *other, cwd=tmp_path)
    clash = bench("archive.py", str(tmp_path / "other"), str(kept), cwd=tmp_path, check=False)
    assert clash.returncode == 2 and clash.stdout.startswith("archive.py: error:") and "other arguments" in clash.stdout
    not_a_sweep = bench("archive.py", str(tmp_path / "algos"), str(kept), cwd=tmp_path, check=False)
    assert not_a_sweep.returncode == 2 and "not a run.py sweep directory" in not_a_sweep.stdout


def test_archived_runs_are_not_ignored_by_git():
    """The archive's runs/ folders must reach the repository although runs/ is ignored everywhere else."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    kept = "docs/results/archive/ablation/qflex_N5/runs/some_run/final_eval.json"
    elsewhere = "sweeps/ablation/qflex_N5/runs/some_run/final_eval.json"
    ignored = subprocess.run(["git", "check-ignore", kept, elsewhere], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == [elsewhere], ignored
