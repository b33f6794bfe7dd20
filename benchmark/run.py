"""Seed sweeps: run every (algorithm, env, seed) of a grid as its own process, resumably and without losing runs.

    python benchmark/run.py --algos qflex sac --env-ids myoLegWalk-v0 ChainReach64-v0 --seeds 1 2 3 \\
        --workers 2 --runs-dir sweeps/demo -- --total-timesteps 200000   # flags after `--` go to every algorithm

Layout of a sweep directory (every algorithm process runs with cwd = the sweep directory, so the scripts' own
`runs/`, `models/` and `videos/` land inside it):

    DIR/runs/{run_name}/            completed runs only: TensorBoard events, config.json, final_eval.json, stdout.log
    DIR/logs/{key}.{attempt}.log    live output of every attempt (key = {algo}__{env}__{seed}); `tail -f` it
    DIR/status/{key}.json           one record per run, rewritten atomically (temp file + rename) at every change
    DIR/models/{run_name}/          checkpoints (--save-model) of completed runs and of interrupted ones to resume
    DIR/failed/{run_name}/          run directories of failed attempts (with their stdout.log and models/)
    DIR/incomplete/{run_name}/      run directories of interrupted attempts, until the next attempt resumes them
    DIR/incomplete/{run_name}.superseded/  an interrupted attempt with a checkpoint that was not resumed (models/ inside)
    DIR/manifest.json, manifest.csv every run of the directory: algo, env, seed, arguments, status, run directory,
                                    wall time, exit code, attempts, log (regenerated from status/ atomically)
    DIR/submitit/                   Slurm / submitit job files (--launcher slurm)

A run counts as completed only once its process exited with code 0 and its status record says so; the record is
the last thing written, so a sweep killed at any point never marks an unfinished run complete. On start the sweep
takes a lock on DIR, turns records left `running` by a dead sweep into `interrupted` and moves their partial run
directories out of `runs/`, so `runs/` only ever holds completed runs (or ones running right now) and plotting a
half-finished sweep is safe. Rerunning the same command skips completed runs, runs the unfinished (pending or
interrupted) ones and leaves failed ones alone; `--retry-failed` also reruns the failed ones. A run killed by
SIGKILL/SIGTERM/SIGINT/SIGHUP from outside counts as interrupted, not failed. An interrupted run that left a checkpoint
(`--save-model` after `--`) continues from its newest one in its old run directory, as `algos/<algo>.py --resume
models/{run_name}/checkpoint.pt` (plus `--total-timesteps` if the sweep's budget changed; the checkpoint holds every
other argument). The checkpoint is found on disk, so a sweep killed before it recorded the run's name still resumes
it. An interrupted run without a checkpoint restarts from scratch and its partial directories (runs/, incomplete/,
models/, videos/) are deleted; `--no-resume` restarts it even with a checkpoint and keeps that attempt under
incomplete/{run_name}.superseded/. A failed run always restarts from scratch. A completed run whose recorded arguments
differ from the current command is an error (use another DIR), never silently reused; so is an interrupted one that
would resume with other arguments than the budget.

Local launcher: at most --workers processes at a time, each `OMP_NUM_THREADS=1` (unless the caller set it), in its
own process group; SIGINT/SIGTERM stops them and records them as interrupted; on Linux the children also get
SIGTERM if the sweep itself is killed (PR_SET_PDEATHSIG). Order: seed-major (every algo x env for seed 1, then seed
2, ...), so a partial sweep already covers every cell.

Slurm launcher (`--launcher slurm`): the same runs are submitted through submitit, one job per run (partition,
time, GPUs, CPUs, memory from the --slurm-* flags), at most --workers jobs queued or running at once; each job runs
the same code as a local worker on the compute node (DIR must be on a shared filesystem) and writes its own status
record, refreshing a heartbeat every 60 s. The submitting process waits for its jobs; if it dies, the jobs still
record their results, and a rerun treats a `running` record whose heartbeat is fresher than 5 minutes as alive.
`--launcher local-submitit` runs the same path through submitit's LocalExecutor (for tests, no cluster needed).

Exit code: 0 if every run of the grid is completed, 1 if some failed or are still unfinished, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATUSES = ("pending", "running", "completed", "failed", "interrupted")
HEARTBEAT_S = 60.0
STALE_HEARTBEAT_S = 300.0
STOP_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a run killed by one is interrupted
MANIFEST_FIELDS = (
    "key",
    "algo",
    "env_id",
    "seed",
    "status",
    "exit_code",
    "attempts",
    "wall_time_s",
    "run_name",
    "run_dir",
    "log",
    "extra_args",
    "command",
    "launcher",
    "job_id",
    "host",
    "started",
    "finished",
    "error",
)


class SweepError(Exception):
    """A usage or state problem, reported in one line."""


# ---------------------------------------------------------------------------------------------------------------
# small pure helpers


def env_tag(env_id: str) -> str:
    """The env id as it appears in run names ('/' -> '-', so dm_control ids make no nested folder)."""
    return env_id.replace("/", "-")


def run_key(algo: str, env_id: str, seed: int) -> str:
    return f"{algo}__{env_tag(env_id)}__{seed}"


def exp_name_of(algo: str, extra_args: list[str]) -> str:
    """The exp_name the script will use: its file stem unless the extra flags override it."""
    name = algo
    for i, arg in enumerate(extra_args):
        for flag in ("--exp-name", "--exp_name"):
            if arg == flag and i + 1 < len(extra_args):
                name = extra_args[i + 1]
            elif arg.startswith(flag + "="):
                name = arg.split("=", 1)[1]
    return name


def run_dir_prefix(spec: dict) -> str:
    """Every run directory of this spec starts with this (run_name = env__exp_name__seed__time)."""
    return f"{env_tag(spec['env_id'])}__{spec['exp_name']}__{spec['seed']}__"


def run_name_time(spec: dict, name: str) -> int | None:
    """The time stamp of `name` if it is a run name of this spec (prefix + digits), else None."""
    prefix = run_dir_prefix(spec)
    rest = name[len(prefix) :]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


BUDGET_FLAGS = ("--total-timesteps", "--total_timesteps")


def budget_of(extra_args: list[str]) -> str | None:
    """The --total-timesteps value among the extra flags (the last one wins, as for argparse/tyro), or None."""
    value = None
    for i, arg in enumerate(extra_args):
        for flag in BUDGET_FLAGS:
            if arg == flag and i + 1 < len(extra_args):
                value = extra_args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    return value


def without_budget(extra_args: list[str]) -> list[str]:
    """The extra flags less --total-timesteps (the one flag a resumed run may change here)."""
    out, skip = [], False
    for arg in extra_args:
        if skip:
            skip = False
        elif arg in BUDGET_FLAGS:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in BUDGET_FLAGS):
            out.append(arg)
    return out


def same_number(a, b) -> bool:
    try:
        return int(str(a).replace("_", "")) == int(str(b).replace("_", ""))
    except ValueError:
        return str(a) == str(b)


def build_specs(algos, env_ids, seeds, extra_args, python: str, algos_dir: Path, resume: bool = True) -> list[dict]:
    """One spec per (algo, env, seed), seed-major so a partly finished sweep covers every (algo, env) cell."""
    specs = []
    for seed in seeds:
        for env_id in env_ids:
            for algo in algos:
                script = algos_dir / f"{algo}.py"
                command = [python, str(script), "--env-id", env_id, "--seed", str(seed), *extra_args]
                specs.append(
                    dict(
                        key=run_key(algo, env_id, seed),
                        algo=algo,
                        env_id=env_id,
                        seed=seed,
                        extra_args=list(extra_args),
                        exp_name=exp_name_of(algo, extra_args),
                        command=command,
                        resume=resume,
                    )
                )
    return specs


def spec_fields(spec: dict) -> dict:
    """The identity of a run as every status record carries it."""
    return {name: spec[name] for name in ("key", "algo", "env_id", "seed", "exp_name", "extra_args")}


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_parent_death_signal() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when the sweep dies (even by SIGKILL), so no orphan keeps running."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------------
# the sweep directory


class SweepDir:
    def __init__(self, root: Path):
        self.root = root
        self.runs = root / "runs"
        self.logs = root / "logs"
        self.status_dir = root / "status"
        self.failed = root / "failed"
        self.incomplete = root / "incomplete"
        self.models = root / "models"  # written by the scripts themselves (cwd = the sweep directory)
        self.videos = root / "videos"

    def make(self) -> None:
        for d in (self.root, self.runs, self.logs, self.status_dir):
            d.mkdir(parents=True, exist_ok=True)

    def status_path(self, key: str) -> Path:
        return self.status_dir / f"{key}.json"

    def read_status(self, key: str) -> dict | None:
        return read_json(self.status_path(key))

    def write_status(self, record: dict) -> None:
        atomic_write_json(self.status_path(record["key"]), record)

    def all_status(self) -> list[dict]:
        records = []
        if self.status_dir.is_dir():
            for path in sorted(self.status_dir.glob("*.json")):
                record = read_json(path)
                if record is not None:
                    records.append(record)
        return records

    def run_dirs_for(self, spec: dict) -> set[str]:
        prefix = run_dir_prefix(spec)
        if not self.runs.is_dir():
            return set()
        return {p.name for p in self.runs.iterdir() if p.is_dir() and p.name.startswith(prefix)}

    def names_in(self, folder: Path, spec: dict) -> set[str]:
        """Run names of `spec` (prefix + time stamp) among the directories of `folder`."""
        if not folder.is_dir():
            return set()
        return {p.name for p in folder.iterdir() if p.is_dir() and run_name_time(spec, p.name) is not None}

    def leftovers(self, spec: dict, record: dict | None) -> list[str]:
        """Run names of earlier unfinished attempts of `spec` that left directories behind (runs/, incomplete/,
        models/, videos/), oldest first; failed attempts (kept in failed/) and the completed run are not among them.
        Found on disk rather than in the record, so an attempt killed before its record named its run is found too."""
        names = set()
        for folder in (self.runs, self.incomplete, self.models, self.videos):
            names |= self.names_in(folder, spec)
        names -= self.names_in(self.failed, spec)
        if record and record.get("status") in ("completed", "running"):
            names.discard(record.get("run_name"))
        return sorted(names, key=lambda name: run_name_time(spec, name))

    def checkpoint_of(self, run_name: str) -> Path | None:
        path = self.models / run_name / "checkpoint.pt"
        return path if path.is_file() else None

    def resumable(self, spec: dict, record: dict | None) -> str | None:
        """The run an unfinished (interrupted or pending) spec continues: the leftover with the newest checkpoint."""
        if not spec.get("resume", True) or (record or {}).get("status") in ("failed", "completed", "running"):
            return None
        found = [(self.checkpoint_of(n).stat().st_mtime_ns, n) for n in self.leftovers(spec, record) if self.checkpoint_of(n)]
        return max(found)[1] if found else None

    def gather(self, run_name: str, dest: Path) -> None:
        """Move models/{run_name} and videos/{run_name} into dest/models and dest/videos (nothing left behind)."""
        for sub, folder in (("models", self.models), ("videos", self.videos)):
            src = folder / run_name
            if src.is_dir():
                target = dest / sub
                if target.exists():
                    target = dest / f"{sub}.{time.time_ns()}"
                os.replace(src, target)

    def retire(self, run_name: str) -> str | None:
        """An earlier attempt that will not be continued: without a checkpoint its partial directories are deleted
        (nothing in them can be continued; its log stays in logs/); with one (--no-resume, or an older checkpoint than
        the one resumed) everything of it moves to incomplete/{run_name}.superseded/ (models/ and videos/ inside).
        Returns the new directory relative to the sweep dir, or None when deleted."""
        places = [self.runs / run_name, self.incomplete / run_name, self.models / run_name, self.videos / run_name]
        if self.checkpoint_of(run_name) is None:
            for path in places:
                shutil.rmtree(path, ignore_errors=True)
            return None
        dest = self.incomplete / f"{run_name}.superseded"
        if dest.exists():
            dest = self.incomplete / f"{run_name}.superseded.{time.time_ns()}"
        self.incomplete.mkdir(parents=True, exist_ok=True)
        run_dir = next((p for p in places[:2] if p.is_dir()), None)
        if run_dir is not None:
            os.replace(run_dir, dest)
        else:
            dest.mkdir()
        self.gather(run_name, dest)
        return str(dest.relative_to(self.root))

    def move_out(self, run_name: str, where: Path) -> str | None:
        """Move runs/{run_name} to where/{run_name}; return the new path relative to the sweep dir."""
        src = self.runs / run_name
        if not src.is_dir():
            return None
        where.mkdir(parents=True, exist_ok=True)
        dst = where / run_name
        if dst.exists():
            dst = where / f"{run_name}.{int(time.time())}"
        os.replace(src, dst)
        return str(dst.relative_to(self.root))

    def write_manifest(self) -> list[dict]:
        records = sorted(self.all_status(), key=lambda r: (str(r.get("env_id")), str(r.get("algo")), int(r.get("seed", 0))))
        atomic_write_json(self.root / "manifest.json", records)
        lines = []

        class _Sink:
            def write(self, s):
                lines.append(s)

        writer = csv.DictWriter(_Sink(), fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            row = dict(record)
            row["extra_args"] = shlex.join(record.get("extra_args", []))
            row["command"] = shlex.join(record.get("command", []))
            writer.writerow(row)
        atomic_write_text(self.root / "manifest.csv", "".join(lines))
        return records

    def lock(self):
        """Exclusive lock on DIR, so two sweeps never launch the same runs at once."""
        handle = open(self.root / ".sweep.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SweepError(f"another sweep is running in {self.root} (lock held on .sweep.lock)") from None
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        handle.flush()
        return handle


def record_is_alive(record: dict) -> bool:
    """Whether a `running` record belongs to a live attempt.

    On this host: its owner (the sweep or submitit job that started it) is alive; the caller holds the sweep lock,
    so a live owner can only be a submitit job. On another host (Slurm): its heartbeat is fresher than 5 minutes.
    """
    if record.get("host") == socket.gethostname():
        return pid_alive(record.get("owner_pid"))
    heartbeat = record.get("heartbeat", 0) or 0
    return time.time() - float(heartbeat) < STALE_HEARTBEAT_S


def stop_orphan(record: dict) -> None:
    """A run whose owner died (e.g. a sweep killed with SIGKILL where PR_SET_PDEATHSIG is unavailable): stop it."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(int(pid), sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def discover_run_name(sweep: SweepDir, record: dict) -> str | None:
    """The run directory an attempt created, for a record written before the attempt named it (killed early): the
    newest leftover of its spec not older than the attempt's start."""
    started = record.get("start_time")
    if started is None and record.get("started"):
        try:
            started = datetime.datetime.fromisoformat(record["started"]).timestamp()
        except ValueError:
            started = None
    names = [n for n in sweep.leftovers(record, None) if started is None or run_name_time(record, n) >= int(started)]
    return names[-1] if names else None


def recover(sweep: SweepDir, specs_by_key: dict[str, dict]) -> None:
    """After a crash: stale `running` records -> `interrupted`; partial run dirs of unfinished runs leave runs/."""
    for record in sweep.all_status():
        if record.get("status") == "running" and not record_is_alive(record):
            stop_orphan(record)
            record["status"] = "interrupted"
            record["error"] = "the sweep or job running it stopped before it finished"
            record["finished"] = record.get("finished") or now_iso()
            if not record.get("run_name") and all(k in record for k in ("env_id", "exp_name", "seed")):
                record["run_name"] = discover_run_name(sweep, record)
            if record.get("run_name"):
                moved = sweep.move_out(record["run_name"], sweep.incomplete)
                if moved:
                    record["run_dir"] = moved
            sweep.write_status(record)
    for key, spec in specs_by_key.items():
        record = sweep.read_status(key)
        status = record.get("status") if record else None
        if status == "running":
            continue
        keep = record.get("run_name") if status == "completed" else None
        for name in sweep.run_dirs_for(spec):
            if name != keep:
                sweep.move_out(name, sweep.incomplete)


# ---------------------------------------------------------------------------------------------------------------
# executing one run (shared by the local loop and the submitit job function)


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class RunHandle:
    """One started attempt: its process, log file and status record."""

    def __init__(self, sweep: SweepDir, spec: dict, launcher: str, job_id: str | None = None):
        self.sweep, self.spec = sweep, spec
        previous = sweep.read_status(spec["key"]) or {}
        attempt = int(previous.get("attempts", 0)) + 1
        self.log_path = sweep.logs / f"{spec['key']}.{attempt}.log"
        command, run_name, checkpoint = list(spec["command"]), sweep.resumable(spec, previous), None
        superseded = []  # earlier attempts this one does not continue: deleted, or kept if they hold a checkpoint
        for name in sweep.leftovers(spec, previous):
            if name != run_name:
                kept = sweep.retire(name)
                if kept:
                    superseded.append(kept)
        if run_name:
            # the partial run directory goes back to runs/, where the resumed process appends to its event files
            checkpoint = f"models/{run_name}/checkpoint.pt"
            if (sweep.incomplete / run_name).is_dir() and not (sweep.runs / run_name).exists():
                os.replace(sweep.incomplete / run_name, sweep.runs / run_name)
            command = command[:2] + resume_budget(sweep, spec, run_name) + ["--resume", checkpoint]
        self.before = sweep.run_dirs_for(spec) - {run_name}
        self.start = time.time()  # before the process starts, so its run name's time stamp is never older
        self.log_file = open(self.log_path, "w")
        self.log_file.write(f"# {now_iso()} attempt {attempt}: (cd {sweep.root} && {shlex.join(command)})\n")
        self.log_file.flush()
        self.proc = subprocess.Popen(
            command,
            cwd=sweep.root,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=set_parent_death_signal if sys.platform.startswith("linux") else None,
        )
        self.record = dict(
            spec_fields(spec),
            command=command,
            status="running",
            exit_code=None,
            attempts=attempt,
            wall_time_s=None,
            run_name=run_name,
            run_dir=f"runs/{run_name}" if run_name else None,
            resumed_from=checkpoint,
            log=str(self.log_path.relative_to(sweep.root)),
            launcher=launcher,
            job_id=job_id,
            host=socket.gethostname(),
            pid=self.proc.pid,
            owner_pid=os.getpid(),
            started=now_iso(),
            start_time=self.start,
            finished=None,
            heartbeat=time.time(),
            error=None,
            previous_logs=previous.get("previous_logs", []) + ([previous["log"]] if previous.get("log") else []),
            superseded=previous.get("superseded", []) + superseded,
        )
        sweep.write_status(self.record)

    def find_run_name(self) -> str | None:
        new = sorted(self.sweep.run_dirs_for(self.spec) - self.before)
        return new[-1] if new else None

    def note_run_name(self) -> None:
        """Record the run directory as soon as it exists (polled often; writes only when it appears)."""
        if self.record["run_name"] is None:
            self.record["run_name"] = self.find_run_name()
            if self.record["run_name"]:
                self.record["run_dir"] = f"runs/{self.record['run_name']}"
                self.sweep.write_status(self.record)

    def heartbeat(self) -> None:
        """Record the run directory if it appeared, and refresh the heartbeat (Slurm liveness)."""
        self.note_run_name()
        self.record["heartbeat"] = time.time()
        self.sweep.write_status(self.record)

    def finish(self, returncode: int, interrupted: bool = False) -> dict:
        self.log_file.close()
        record = self.record
        record["exit_code"] = returncode
        record["wall_time_s"] = round(time.time() - self.start, 3)
        record["finished"] = now_iso()
        record["run_name"] = record["run_name"] or self.find_run_name()
        record["pid"] = record["owner_pid"] = None
        if interrupted:
            status, where = "interrupted", self.sweep.incomplete
            record["error"] = "stopped by a signal to the sweep"
        elif returncode < 0 and -returncode in STOP_SIGNALS:  # killed from outside (kill, OOM killer): not its failure
            status, where = "interrupted", self.sweep.incomplete
            record["error"] = f"killed by {signal.Signals(-returncode).name}"
        elif returncode == 0 and record["run_name"]:
            status, where = "completed", None
        else:
            status, where = "failed", self.sweep.failed
            record["error"] = last_line(self.log_path) if returncode != 0 else "exit code 0 but no run directory appeared"
        record["run_dir"] = f"runs/{record['run_name']}" if record["run_name"] else None
        if record["run_name"]:
            src = self.sweep.root / record["run_dir"]
            if src.is_dir():
                shutil.copyfile(self.log_path, src / "stdout.log")
            if where is not None:
                record["run_dir"] = self.sweep.move_out(record["run_name"], where)
            if status == "failed" and record["run_dir"]:  # a failed run restarts from scratch: its checkpoint goes too
                self.sweep.gather(record["run_name"], self.sweep.root / record["run_dir"])
        record["status"] = status
        self.sweep.write_status(record)  # the completion record is the very last write
        return record


def resume_budget(sweep: SweepDir, spec: dict, run_name: str) -> list[str]:
    """`--total-timesteps N` for a resumed run when the sweep's budget differs from the checkpoint's, else nothing: a
    resumed script takes every other argument from its checkpoint (and refuses them if they differ)."""
    budget = budget_of(spec["extra_args"])
    if budget is None:
        return []
    config = read_json(sweep.runs / run_name / "config.json") or {}
    return [] if same_number(config.get("total_timesteps"), budget) else ["--total-timesteps", budget]


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def execute_run(root: str, spec: dict, launcher: str) -> dict:
    """Run one spec to the end in this process (the body of a submitit job); returns its final status record."""
    sweep = SweepDir(Path(root))
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    handle = RunHandle(sweep, spec, launcher, job_id=job_id)

    def stop(signum, frame):
        terminate_group(handle.proc)
        handle.finish(handle.proc.wait(), interrupted=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    last_beat = time.time()
    while True:
        try:
            returncode = handle.proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            handle.note_run_name()
            if time.time() - last_beat > HEARTBEAT_S:
                handle.heartbeat()
                last_beat = time.time()
    return handle.finish(returncode)


def terminate_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the run's whole process group (it may have vector-env workers), SIGKILL it after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------------------------
# planning and launching


def plan(sweep: SweepDir, specs: list[dict], retry_failed: bool) -> tuple[list[dict], dict[str, str]]:
    """Which specs to run now, and why the others are skipped."""
    todo, skipped = [], {}
    for spec in specs:
        record = sweep.read_status(spec["key"])
        status = record.get("status") if record else "pending"
        if record and status == "completed" and record.get("extra_args") != spec["extra_args"]:
            raise SweepError(
                f"{spec['key']} already completed in {sweep.root} with other arguments "
                f"({shlex.join(record.get('extra_args', []))!r} vs {shlex.join(spec['extra_args'])!r}); use another --runs-dir"
            )
        resume_from = sweep.resumable(spec, record) if status in ("pending", "interrupted") else None
        if resume_from and record and without_budget(record.get("extra_args", [])) != without_budget(spec["extra_args"]):
            raise SweepError(
                f"{spec['key']} was interrupted with other arguments ({shlex.join(record.get('extra_args', []))!r} vs "
                f"{shlex.join(spec['extra_args'])!r}) and would resume from models/{resume_from}/checkpoint.pt with "
                "them; rerun with its arguments (--total-timesteps may change), use --no-resume, or another --runs-dir"
            )
        if status == "completed":
            skipped[spec["key"]] = "completed"
        elif status == "running":
            skipped[spec["key"]] = "running elsewhere"
        elif status == "failed" and not retry_failed:
            skipped[spec["key"]] = "failed (use --retry-failed)"
        else:
            todo.append(spec)
    for spec in todo:  # the grid is known up front: every run is in the manifest before anything starts
        if sweep.read_status(spec["key"]) is None:
            sweep.write_status(
                dict(
                    spec_fields(spec),
                    command=spec["command"],
                    status="pending",
                    attempts=0,
                )
            )
    return todo, skipped


def run_local(sweep: SweepDir, todo: list[dict], workers: int, on_completed=None) -> None:
    pending = list(todo)
    running: list[RunHandle] = []
    stopping = {"signal": None}

    def on_signal(signum, frame):
        stopping["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        last_beat = time.time()
        while (pending or running) and stopping["signal"] is None:
            while pending and len(running) < workers and stopping["signal"] is None:
                spec = pending.pop(0)
                running.append(RunHandle(sweep, spec, "local"))
                print(f"[run.py] started {spec['key']} (log {running[-1].record['log']})", flush=True)
            for handle in list(running):
                returncode = handle.proc.poll()
                if returncode is None:
                    handle.note_run_name()
                else:
                    record = handle.finish(returncode)
                    running.remove(handle)
                    sweep.write_manifest()
                    print(
                        f"[run.py] {record['status']} {record['key']} exit {returncode} in {record['wall_time_s']:.1f}s",
                        flush=True,
                    )
                    if on_completed is not None and record["status"] == "completed":
                        on_completed()
            if time.time() - last_beat > 5.0:
                for handle in running:
                    handle.heartbeat()
                last_beat = time.time()
            time.sleep(0.2)
    finally:
        if stopping["signal"] is not None:
            print(f"[run.py] signal {stopping['signal']}: stopping {len(running)} running run(s)", flush=True)
        for handle in running:
            terminate_group(handle.proc)
            handle.finish(handle.proc.wait(), interrupted=True)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        sweep.write_manifest()
    if stopping["signal"] is not None:
        raise KeyboardInterrupt


def make_executor(args, sweep: SweepDir):
    try:
        import submitit
    except ImportError:
        raise SweepError("--launcher slurm needs submitit (pip install submitit)") from None

    folder = sweep.root / "submitit" / "%j"
    if args.launcher == "local-submitit":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.slurm_time)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(
        timeout_min=args.slurm_time,
        cpus_per_task=args.slurm_cpus_per_task,
        gpus_per_node=args.slurm_gpus,
        tasks_per_node=1,
        nodes=1,
        name="qflex-bench",
    )
    if args.slurm_mem_gb:
        params["mem_gb"] = args.slurm_mem_gb
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    if args.slurm_account:
        params["slurm_account"] = args.slurm_account
    if args.slurm_setup:
        params["slurm_setup"] = list(args.slurm_setup)
    executor.update_parameters(**params)
    return executor


def run_submitit(args, sweep: SweepDir, todo: list[dict]) -> None:
    try:
        executor = make_executor(args, sweep)
    except SweepError:
        raise
    except Exception as e:  # e.g. submitit finds no srun: not on a Slurm cluster
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SweepError(f"cannot use --launcher {args.launcher}: {type(e).__name__}: {first_line}") from None
    pending = list(todo)
    jobs = []  # (spec, job)
    try:
        while pending or jobs:
            while pending and len(jobs) < args.workers:
                spec = pending.pop(0)
                try:
                    job = executor.submit(execute_run, str(sweep.root), spec, args.launcher)
                except Exception as e:  # no sbatch, bad partition, ...: nothing of this run has started
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    raise SweepError(f"cannot submit {spec['key']}: {type(e).__name__}: {first_line}") from None
                jobs.append((spec, job))
                print(f"[run.py] submitted {spec['key']} as job {job.job_id}", flush=True)
            for spec, job in list(jobs):
                if not job.done():
                    continue
                jobs.remove((spec, job))
                try:
                    record = job.result()
                except Exception as e:  # cancelled, timed out, node failure: the job could not record its own end
                    record = sweep.read_status(spec["key"]) or dict(spec, attempts=0)
                    if record.get("status") in (None, "pending", "running"):
                        record.update(
                            status="failed",
                            error=f"submitit job {job.job_id}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}",
                            job_id=str(job.job_id),
                            finished=now_iso(),
                            pid=None,
                        )
                        sweep.write_status(record)
                sweep.write_manifest()
                print(f"[run.py] {record['status']} {spec['key']} (job {job.job_id})", flush=True)
            time.sleep(1.0 if args.launcher == "local-submitit" else 15.0)
    except KeyboardInterrupt:
        print(f"[run.py] interrupted; {len(jobs)} job(s) keep running and record their own results", flush=True)
        raise
    finally:
        sweep.write_manifest()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        prog="benchmark/run.py",
        description="Run every (algo, env, seed) of a grid as its own `algos/<algo>.py` process; resumable. "
        "Flags after `--` are passed to every algorithm script.",
    )
    parser.add_argument("--algos", nargs="+", required=True, help="algorithm names: algos/<name>.py")
    parser.add_argument("--env-ids", nargs="+", required=True, help="environment ids")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (default 1 2 3)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (Slurm: jobs queued at a time)")
    parser.add_argument("--runs-dir", default="sweep", help="sweep directory; the scripts run with it as cwd")
    parser.add_argument("--retry-failed", action="store_true", help="also rerun runs recorded as failed")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="restart interrupted runs from scratch even when they left a checkpoint (--save-model)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run and what is skipped, run nothing")
    parser.add_argument(
        "--archive",
        default=None,
        help="copy every completed run (without checkpoints) into this archive as soon as it completes "
        "(benchmark/archive.py; local launcher; other launchers at the end)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the algorithm scripts")
    parser.add_argument("--algos-dir", default=str(REPO / "algos"), help="folder with the algorithm scripts")
    parser.add_argument(
        "--launcher",
        choices=["local", "slurm", "local-submitit"],
        default="local",
        help="local processes, or Slurm jobs through submitit (local-submitit: submitit's LocalExecutor, for tests)",
    )
    slurm = parser.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument("--slurm-partition", default=None, help="partition")
    slurm.add_argument("--slurm-account", default=None, help="account")
    slurm.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per job in minutes (default 1440)")
    slurm.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job (default 0)")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=2, help="CPUs per job (default 2)")
    slurm.add_argument("--slurm-mem-gb", type=int, default=None, help="memory per job in GB")
    slurm.add_argument("--slurm-setup", nargs="*", default=None, help="shell lines run in the job before Python")
    args = parser.parse_args(argv)
    args.extra = extra
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if len(set(args.algos)) != len(args.algos) or len(set(args.env_ids)) != len(args.env_ids):
        parser.error("--algos and --env-ids must not repeat names")
    missing = [a for a in args.algos if not (Path(args.algos_dir) / f"{a}.py").is_file()]
    if missing:
        parser.error(f"no algorithm script for {', '.join(missing)} in {args.algos_dir}")
    if len(args.algos) > 1 and any(exp_name_of(a, extra) != a for a in args.algos):
        parser.error("--exp-name after `--` would give several algorithms the same run names; sweep them separately")
    for flag in ("--env-id", "--env_id", "--seed"):
        if any(e == flag or e.startswith(flag + "=") for e in extra):
            parser.error(f"{flag} is set by the sweep; do not pass it after `--`")
    return args


def summary(records: list[dict], keys: list[str]) -> dict[str, int]:
    by_key = {r["key"]: r for r in records}
    counts = {s: 0 for s in STATUSES}
    for key in keys:
        counts[by_key.get(key, {}).get("status", "pending")] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sweep = SweepDir(Path(args.runs_dir).resolve())
    specs = build_specs(
        args.algos, args.env_ids, args.seeds, args.extra, args.python, Path(args.algos_dir).resolve(), not args.no_resume
    )
    try:
        sweep.make()
        lock = sweep.lock()
        recover(sweep, {s["key"]: s for s in specs})
        if args.dry_run:
            todo, skipped = [], {}
            for spec in specs:
                record = sweep.read_status(spec["key"]) or {}
                status = record.get("status", "pending")
                run = status in ("pending", "interrupted") or (status == "failed" and args.retry_failed)
                (todo.append(spec) if run else skipped.__setitem__(spec["key"], status))
            for spec in todo:
                resume_from = sweep.resumable(spec, sweep.read_status(spec["key"]))
                how = f" (resumes models/{resume_from}/checkpoint.pt)" if resume_from else ""
                print(f"would run  {spec['key']}{how}: (cd {sweep.root} && {shlex.join(spec['command'])})")
            for key, why in skipped.items():
                print(f"would skip {key}: {why}")
            return 0
        todo, skipped = plan(sweep, specs, args.retry_failed)
        sweep.write_manifest()
        for key, why in skipped.items():
            print(f"[run.py] skip {key}: {why}", flush=True)
        print(f"[run.py] {len(todo)} run(s) to go, {len(skipped)} skipped, in {sweep.root}", flush=True)
        keep = None
        if args.archive:
            from archive import archive  # a sibling script; imported here because it imports this one

            def keep():
                try:
                    copied, _ = archive(sweep.root, Path(args.archive))
                except Exception as error:  # archive.py's SweepError is the class of module `run`, not of __main__
                    raise SweepError(f"--archive {args.archive}: {error}") from None
                if copied:
                    print(f"[run.py] archived {', '.join(copied)} into {args.archive}", flush=True)

        if todo:
            if args.launcher == "local":
                run_local(sweep, todo, args.workers, keep)
            else:
                run_submitit(args, sweep, todo)
        if keep is not None:
            keep()
    except SweepError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[run.py] stopped; rerun the same command to continue", flush=True)
        return 130
    records = sweep.write_manifest()
    counts = summary(records, [s["key"] for s in specs])
    print("[run.py] " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    failed = [r for r in records if r.get("status") == "failed" and r["key"] in {s["key"] for s in specs}]
    for record in failed:
        print(f"[run.py] FAILED {record['key']} exit {record.get('exit_code')}: {record.get('log')}: {record.get('error')}")
    lock.close()
    return 0 if counts["completed"] == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main())
