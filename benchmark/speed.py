"""Speed of the env pool and of the five algorithm scripts, as one markdown table with the ratios side by side.

Three kinds of rows, every measurement in its own subprocess with a timeout (a failure is a row, never a crash):

  (a) env: the env-only ceiling (W processes stepping their E/W envs with no communication, benchmark/env_speed.py's
      `ceiling`), the EnvPool with W workers (`pool_rate`) and gymnasium's SyncVectorEnv in one process
      (`gym_rate`), at E = --num-envs, random actions; ratio = steps/s over the ceiling's.
  (b) SPS: the algorithm's default command shape on --env-id, i.e.
        python algos/<algo>.py --env-id ENV --num-envs E --learning-starts L --total-timesteps T --eval-freq 0 \\
            --final-eval-episodes 0 --log-every N [--env-workers W] [variant flag]
      read from its TensorBoard log: `train SPS` = transitions per wall-clock second between the logged
      charts/updates points after a burn-in (the first quarter of the points, at least one; so neither the random
      warm-up nor compilation is in it), `script SPS` = the script's own last charts/SPS (warm-up included);
      ratio = train SPS over the pool's steps/s (how much of the env throughput training keeps).
  (c) ms/update: the same script with 1 env stepped in-process and --updates-per-step U (default 8), so env stepping
      and acting are 1/U of a vector step per update; ms/update = wall time between the first logged point after
      the burn-in and the last one, over the updates between them (every logged point follows a host sync, so GPU
      work is finished). Each variant is a separate process: eager (no flag), --compile, --cudagraphs; compile time
      is excluded by the burn-in and shown as `first log at s`. ratio = eager ms / variant ms (speed-up).

  (d) twin ("twin" in --sections, at E in --twin-envs): MyoSuite's GPU twin (envs/twin.py, --env-backend mjlab) on
      the device, run with the Python of its own environment (--twin-python, default .venv-mjlab/bin/python):
      env-only steps/s of E worlds with random actions (after 3 warm-up steps, which compile the kernels), and with
      "twin-sps" in --sections each algorithm's SPS at the largest E (--env-backend mjlab; learning starts after 20 E
      transitions, or --learning-starts). ratio: over the CPU pool's steps/s of (a) when (a) ran.

A variant whose flag the script does not have, or refuses (--cudagraphs without CUDA), gives "n/a: <reason>".
A run that hits its timeout is stopped and still reported from the points it logged (its TensorBoard writer flushes
every 2 s: the script runs under a small wrapper that sets flush_secs), marked "timed out". --deadline bounds the
whole command: measurements that would start after it give "n/a: skipped".

    python benchmark/speed.py                                        # all five, eager/compile/cudagraphs, E = 16
    python benchmark/speed.py --algos sac --variants eager compile --out docs/speed-cpu.md
    python benchmark/speed.py --num-envs 80 --env-workers 16 --deadline 270 -- --no-cuda
    python benchmark/speed.py --sections env twin --twin-envs 4 16     # the twin on CPU Warp beside the CPU pool

Flags after `--` go to every algorithm script. OMP_NUM_THREADS is passed on as set by the caller (--threads sets it).
"""

import argparse
import json
import math
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGOS = ["sac", "qflex", "crossq", "dacer", "sdac"]
# "no-overlap" (SPS rows only): the default command with the update and the env step one after the other.
VARIANT_FLAGS = {"eager": [], "compile": ["--compile"], "cudagraphs": ["--cudagraphs"], "no-overlap": ["--overlap", "False"]}
CHILD_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
BOX = "│╭╮╰╯─┃━┏┓┗┛ \t"


# ---------------------------------------------------------------------------------------------------------------------
# Children: `speed.py --child-env KIND ENV E W SECONDS` prints one JSON line; `speed.py --child-run SCRIPT FLAGS...`
# runs an algorithm script as __main__ with its TensorBoard writer flushing every 2 s.
def child_env(kind: str, env_id: str, num_envs: int, workers: int, seconds: float) -> None:
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "benchmark"))
    import env_speed

    from envs.pool import default_start_method

    ns = SimpleNamespace(num_envs=num_envs, seconds=seconds)
    if kind == "ceiling":
        rate, startup = env_speed.ceiling(env_id, num_envs, workers, seconds)
    elif kind == "pool":
        rate, startup = env_speed.pool_rate(env_id, ns, workers, default_start_method())
    else:
        rate, startup = env_speed.gym_rate(env_id, ns, "sync")
    print(json.dumps(dict(rate=rate, startup=startup)))


def child_twin(env_id: str, num_envs: int, seconds: float) -> None:
    """Env-only throughput of the twin: E worlds on CUDA when there is one, else CPU Warp, random policy actions."""
    import torch

    import envs
    from envs.twin import TwinVectorEnv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    cpu_env = envs.make_env(env_id, 0, 0, False, "")()
    wrapper = envs._policy_action_wrapper(cpu_env)
    twin = TwinVectorEnv(env_id, num_envs, device, wrapper.action_centre, wrapper.action_half_width)
    twin.reset(seed=0)
    generator = torch.Generator(device=device).manual_seed(0)
    act_dim = twin.single_action_space.shape[0]

    def step():
        twin.step(torch.rand((num_envs, act_dim), device=device, generator=generator) * 2 - 1)

    for _ in range(3):  # kernels compile on the first steps
        step()
    startup, steps, begin = time.perf_counter() - start, 0, time.perf_counter()
    while time.perf_counter() - begin < seconds or steps < 2:
        step()
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    rate = num_envs * steps / (time.perf_counter() - begin)
    print(json.dumps(dict(rate=rate, startup=startup, device=device)))


def child_run(script: str, flags: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    original = SummaryWriter.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("flush_secs", 2)
        original(self, *args, **kwargs)

    SummaryWriter.__init__ = init
    sys.argv = [script, *flags]
    sys.path[0] = str(Path(script).parent)
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(extra: list[str], threads: int | None) -> str:
    import torch

    cuda = torch.cuda.is_available() and "--no-cuda" not in extra
    device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if cuda else "CPU only"
    threads = threads or os.environ.get("OMP_NUM_THREADS", f"unset (torch uses {torch.get_num_threads()})")
    return (
        f"device {device}; CPU {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"python {platform.python_version()}; OMP_NUM_THREADS {threads}"
    )


def last_line(text: str) -> str:
    """The last informative line of a failed process's output (tyro's boxes and help hints skipped)."""
    for line in reversed(text.splitlines()):
        line = line.strip(BOX)
        if line and any(c.isalnum() for c in line) and not line.startswith("For full helptext"):
            return line[:240]
    return "(no output)"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Runner:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.deadline if args.deadline else math.inf
        self.count, self.current = 0, None

    def kill_current(self) -> None:
        """Stop the measurement in flight with all its processes (it runs in its own session)."""
        if self.current is not None and self.current.poll() is None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def budget(self) -> float | None:
        """Seconds the next measurement may run, or None when the deadline leaves too little."""
        left = self.deadline - time.monotonic()
        return None if left < 15 else min(self.args.timeout, left)

    def run(self, command: list[str], name: str, cwd: Path, timeout: float) -> tuple[int | None, str, float]:
        """(exit code or None when timed out, output, seconds); the process group is stopped on timeout."""
        env = dict(os.environ, **CHILD_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        log = cwd / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.current = proc
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(proc.pid, sig)
                        proc.wait(timeout=wait)
                        break
                    except (subprocess.TimeoutExpired, ProcessLookupError):
                        continue
        self.current = None
        return rc, log.read_text(errors="replace"), time.monotonic() - start

    def scratch(self, name: str) -> Path:
        self.count += 1
        root = Path(self.args.logs_dir) if self.args.logs_dir else Path(self.tmp)
        path = root / f"{self.count:02d}_{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def read_points(cwd: Path) -> list[tuple[float, int, float, float]]:
    """(wall time, global step, updates, script SPS) at every logged charts/updates point of the run under cwd."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
    if not runs:
        return []
    accumulator = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    if "charts/updates" not in tags:
        return []
    sps = {e.step: e.value for e in accumulator.Scalars("charts/SPS")} if "charts/SPS" in tags else {}
    return [(e.wall_time, e.step, e.value, sps.get(e.step, math.nan)) for e in accumulator.Scalars("charts/updates")]


def steady(points):
    """The points after the burn-in (the first quarter, at least one point), or None when fewer than 2 remain."""
    skip = min(max(1, len(points) // 4), len(points) - 2)
    return points[skip:] if skip >= 0 and len(points) - skip >= 2 else None


def failure(algo: str, variant: str, rc: int | None, output: str, seconds: float, points: int) -> str:
    line = last_line(output)
    flag = (VARIANT_FLAGS[variant] or [""])[0]
    if flag and "Unrecognized option" in output and flag in output:
        return f"n/a: algos/{algo}.py has no {flag} flag"
    if flag and rc not in (None, 0) and flag in line and "error" in line.lower():
        return f"n/a: {line}"
    if rc is None:
        return f"failed: timed out after {seconds:.0f} s with {points} logged point(s); last output: {line}"
    if rc == 0:
        return f"n/a: only {points} logged point(s); raise the budget (last output: {line})"
    return f"failed (exit {rc}): {line}"


def algo_run(runner: Runner, algo: str, variant: str, kind: str, flags: list[str], extra: list[str], python=sys.executable):
    """Run one algorithm measurement; returns (steady points or None, note or error text, start-up seconds)."""
    timeout = runner.budget()
    if timeout is None:
        return None, f"n/a: skipped, the --deadline of {runner.args.deadline:g} s was reached", None
    cwd = runner.scratch(f"{kind}_{algo}_{variant}")
    script = str(REPO / "algos" / f"{algo}.py")
    command = [python, str(Path(__file__).resolve()), "--child-run", script, *flags, *VARIANT_FLAGS[variant], *extra]
    launched = time.time()
    rc, output, seconds = runner.run(command, "out", cwd, timeout)
    try:
        points = read_points(cwd)
    except Exception as e:  # a half-written event file
        points, output = [], output + f"\nreading the TensorBoard log failed: {e!r}"
    kept = steady(points)
    if kept is None or (rc not in (0, None)):
        return None, failure(algo, variant, rc, output, seconds, len(points)), None
    note = f"timed out after {seconds:.0f} s, from {len(points)} logged points" if rc is None else ""
    return kept, note, points[0][0] - launched


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}" if math.isfinite(x) else "nan"


class Table(list):
    """The rows (what, algo, variant, E, result, ratio, notes); --out is rewritten after every row, so a killed run
    still leaves the rows it measured."""

    def __init__(self, preamble: list[str], out: str | None):
        super().__init__()
        self.preamble, self.out = preamble, out

    def text(self, footer: str = "") -> str:
        lines = self.preamble + ["| what | algo | variant | E | result | ratio | notes |", "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in self]
        return "\n".join(lines + ([footer] if footer else [])) + "\n"

    def append(self, row) -> None:
        super().append(row)
        self.write(f"\n(in progress: {len(self)} rows so far)")

    def write(self, footer: str = "") -> None:
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(self.text(footer))


def child_json(runner: Runner, command: list[str], name: str, timeout: float) -> tuple[dict | None, str]:
    """Run a --child-* measurement; (its JSON line, "") or (None, why it failed)."""
    rc, output, seconds = runner.run(command, "out", runner.scratch(name), timeout)
    if rc == 0:
        try:
            return json.loads(output.strip().splitlines()[-1]), ""
        except (ValueError, IndexError):
            pass
    return None, f"timed out after {seconds:.0f} s" if rc is None else f"exit {rc}: {last_line(output)}"


def env_rows(rows: "Table", runner: Runner, args, E: int, W: int) -> float:
    """(a): the ceiling, the pool and the sync vector env; returns the pool's steps/s."""
    rates, w = {}, max(W, 1)
    for kind, label in (("ceiling", f"env-only ceiling, W = {w}"), ("pool", f"EnvPool, W = {w}"),
                        ("sync", "SyncVectorEnv, 1 process")):  # fmt: skip
        timeout = runner.budget()
        if timeout is None:
            rows.append((label, "-", "-", E, f"n/a: skipped, the --deadline of {args.deadline:g} s was reached", "", ""))
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--child-env", kind, args.env_id, str(E),
                   str(w if kind != "sync" else 1), str(args.env_seconds)]  # fmt: skip
        result, why = child_json(runner, command, f"env_{kind}", timeout)
        if result is None:
            rows.append((label, "-", "-", E, f"failed: {why}", "", ""))
            continue
        rates[kind] = result["rate"]
        ratio = f"{result['rate'] / rates['ceiling']:.2f} of ceiling" if "ceiling" in rates else ""
        notes = f"start-up {result['startup']:.2f} s; random actions"
        rows.append((label, "-", "-", E, f"{fmt(result['rate'])} steps/s", ratio, notes))
    return rates.get("pool", math.nan)


def sps_rows(rows: "Table", runner: Runner, args, algo: str, shape: dict, pool_rate: float, extra: list[str],
             twin: bool = False) -> None:  # fmt: skip
    """(b): the default command shape at E envs, per variant of --sps-variants; (d) with the twin (`twin`)."""
    eager_sps, E = math.nan, shape["E"]
    what = "SPS, twin (--env-backend mjlab)" if twin else "SPS, default command"
    flags = ["--env-id", args.env_id, "--num-envs", str(E), "--learning-starts", str(shape["L"]),
             "--total-timesteps", str(shape["T"]), "--eval-freq", "0", "--final-eval-episodes", "0",
             "--log-every", str(shape["log_every"])]  # fmt: skip
    if twin:
        flags += ["--env-backend", "mjlab"]
    elif args.env_workers is not None:
        flags += ["--env-workers", str(args.env_workers)]
    for variant in args.sps_variants:
        kept, note, first = algo_run(runner, algo, variant, "sps", flags, extra, args.twin_python if twin else sys.executable)
        if kept is None:
            rows.append((what, algo, variant, E, note, "", ""))
            continue
        (w0, s0, u0, _), (w1, s1, u1, script_sps) = kept[0], kept[-1]
        train_sps = (s1 - s0) / (w1 - w0) if w1 > w0 else math.nan
        eager_sps = train_sps if variant == "eager" else eager_sps
        ratios = [f"{train_sps / eager_sps:.2f}x eager"] if variant != "eager" and math.isfinite(eager_sps) else []
        ratios += [f"{train_sps / pool_rate:.2f} of {'env-only' if twin else 'pool'}"] if math.isfinite(pool_rate) else []
        ms = 1000 * (w1 - w0) / (u1 - u0) if u1 > u0 else math.nan
        notes = [f"script SPS {fmt(script_sps)}", f"{fmt(ms, 1)} ms wall per update", f"{int(u1 - u0)} updates timed",
                 f"first log at {first:.0f} s"] + ([note] if note else [])  # fmt: skip
        rows.append((what, algo, variant, E, f"{fmt(train_sps)} train SPS", ", ".join(ratios), "; ".join(notes)))


def update_rows(rows: "Table", runner: Runner, args, algo: str, shape: dict, extra: list[str]) -> None:
    """(c): ms per update with 1 env in-process and U updates per env step, per variant of --variants."""
    eager_ms, U = math.nan, shape["U"]
    flags = ["--env-id", args.env_id, "--num-envs", "1", "--env-workers", "0", "--updates-per-step", str(U),
             "--learning-starts", "256", "--total-timesteps", str(shape["T"]), "--eval-freq", "0",
             "--final-eval-episodes", "0", "--log-every", str(shape["log_every"])]  # fmt: skip
    for variant in args.variants:
        kept, note, first = algo_run(runner, algo, variant, "update", flags, extra)
        if kept is None:
            rows.append(("ms/update", algo, variant, 1, note, "", ""))
            continue
        (w0, _, u0, _), (w1, _, u1, _) = kept[0], kept[-1]
        ms = 1000 * (w1 - w0) / (u1 - u0) if u1 > u0 else math.nan
        eager_ms = ms if variant == "eager" else eager_ms
        ratio = f"{eager_ms / ms:.2f}x eager" if math.isfinite(eager_ms) and ms > 0 else ""
        notes = [f"{int(u1 - u0)} updates timed", f"U = {U}", f"first log at {first:.0f} s"] + ([note] if note else [])
        rows.append(("ms/update", algo, variant, 1, f"{fmt(ms, 2)} ms", ratio, "; ".join(notes)))


def twin_rows(rows: "Table", runner: Runner, args, pool_rate: float, extra: list[str]) -> None:
    """(d): the twin's env-only steps/s, then (with "sps" in --sections) every algorithm's SPS on it, per E."""
    for E in args.twin_envs:
        label, timeout = "env-only, twin (mjlab)", runner.budget()
        if timeout is None:
            rows.append((label, "-", "-", E, f"n/a: skipped, the --deadline of {args.deadline:g} s was reached", "", ""))
            continue
        if not os.path.exists(args.twin_python):
            rows.append((label, "-", "-", E, f"n/a: no twin environment at {args.twin_python}", "", ""))
            continue
        command = [args.twin_python, str(Path(__file__).resolve()), "--child-twin", args.env_id, str(E), str(args.env_seconds)]
        result, why = child_json(runner, command, f"twin_{E}", timeout)
        if result is None:
            rows.append((label, "-", "-", E, f"failed: {why}", "", ""))
            continue
        ratio = f"{result['rate'] / pool_rate:.2f}x the CPU pool" if math.isfinite(pool_rate) else ""
        notes = f"on {result['device']}; build and 3 warm-up steps {result['startup']:.1f} s; random actions"
        rows.append((label, "-", "-", E, f"{fmt(result['rate'])} steps/s", ratio, notes))
        if "twin-sps" in args.sections and E == max(args.twin_envs):
            L = args.learning_starts if args.learning_starts is not None else 20 * E
            T = L + E * args.sps_updates
            shape = dict(E=E, L=L, T=T, log_every=max(1, ((T - L) // E) // args.points))
            for algo in args.algos:
                sps_rows(rows, runner, args, algo, shape, result["rate"], extra, twin=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-twin":
        env_id, num_envs, seconds = sys.argv[2:5]
        return child_twin(env_id, int(num_envs), float(seconds))
    if len(sys.argv) > 1 and sys.argv[1] == "--child-env":
        kind, env_id, num_envs, workers, seconds = sys.argv[2:7]
        return child_env(kind, env_id, int(num_envs), int(workers), float(seconds))
    if len(sys.argv) > 1 and sys.argv[1] == "--child-run":
        return child_run(sys.argv[2], sys.argv[3:])

    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    parser.add_argument("--env-id", default="myoLegWalk-v0")
    parser.add_argument("--num-envs", type=int, default=16, help="E of the env rows (a) and the SPS rows (b)")
    parser.add_argument("--env-workers", type=int, default=None,
                        help="W of (a) and (b) (default: the scripts' own, one per core up to E from E = 8)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["eager", "compile", "cudagraphs"], choices=list(VARIANT_FLAGS),
                        help="variants of the ms/update rows (c)")  # fmt: skip
    parser.add_argument("--sps-variants", nargs="*", default=["eager"], choices=list(VARIANT_FLAGS),
                        help="variants of the SPS rows (b); the default command is eager")  # fmt: skip
    parser.add_argument("--sections", nargs="+", default=["env", "sps", "update"],
                        choices=["env", "sps", "update", "twin", "twin-sps"])  # fmt: skip
    parser.add_argument("--learning-starts", type=int, default=None, help="(b) warm-up transitions (default 20 E, >= 256)")
    parser.add_argument("--sps-updates", type=int, default=120, help="(b) vector steps with updates, if T is not given")
    parser.add_argument("--total-timesteps", type=int, default=None, help="(b) T (default L + E * --sps-updates)")
    parser.add_argument("--updates", type=int, default=240, help="(c) gradient updates per run")
    parser.add_argument("--updates-per-step", type=int, default=8, help="(c) U, updates per env step (1 env)")
    parser.add_argument("--points", type=int, default=12, help="logged points per run (sets --log-every)")
    parser.add_argument("--env-seconds", type=float, default=3.0, help="(a) timed stepping per row")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole command")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: inherited)")
    parser.add_argument("--logs-dir", default=None, help="keep every measurement's output and runs/ here")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--twin-envs", nargs="+", type=int, default=[80, 1024, 4096], help="(d) world counts E of the twin")
    parser.add_argument("--twin-python", default=str(REPO / ".venv-mjlab" / "bin" / "python"),
                        help="(d) the Python of the twin's environment (requirements-mjlab.txt)")  # fmt: skip
    args = parser.parse_args(argv)

    E = args.num_envs
    W = args.env_workers if args.env_workers is not None else min(os.cpu_count() or 1, E)
    L = args.learning_starts if args.learning_starts is not None else max(256, 20 * E)
    T = args.total_timesteps if args.total_timesteps is not None else L + E * args.sps_updates
    if T <= L:
        parser.error(f"--total-timesteps {T} must be above the warm-up {L}")
    sps_shape = dict(E=E, L=L, T=T, log_every=max(1, ((T - L) // E) // args.points))
    U = args.updates_per_step
    update_shape = dict(U=U, T=256 + math.ceil(args.updates / U), log_every=max(1, args.updates // args.points))

    runner = Runner(args)
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    workers = args.env_workers if args.env_workers is not None else "the script's default"
    preamble = [
        f"benchmark/speed.py on {header(extra, args.threads)}; load average {load_before} at the start",
        "",
        f"{args.env_id}. (a) env rows: E = {E}, {args.env_seconds:g} s each. (b) SPS rows: E = {E}, W = {workers}, "
        f"L = {L}, T = {T}, log every {sps_shape['log_every']} updates. (c) ms/update rows: 1 env in-process, U = {U}, "
        f"{args.updates} updates, log every {update_shape['log_every']}. Burn-in: the first quarter of the logged points"
        + (f". Script flags: {' '.join(extra)}" if extra else "."),
        "",
    ]
    rows, pool_rate = Table(preamble, args.out), math.nan
    rows.write("\n(in progress: no row yet)")

    def stop(signum, frame):  # e.g. an outer `timeout`: no measurement outlives this process, the rows so far stay
        runner.kill_current()
        rows.write(f"\n(stopped by signal {signum} after {len(rows)} rows)")
        print(rows.text(f"\n(stopped by signal {signum} after {len(rows)} rows)"), end="", flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with tempfile.TemporaryDirectory() as tmp:
        runner.tmp = tmp
        if "env" in args.sections:
            pool_rate = env_rows(rows, runner, args, E, W)
        for algo in args.algos:
            if "sps" in args.sections:
                sps_rows(rows, runner, args, algo, sps_shape, pool_rate, extra)
            if "update" in args.sections:
                update_rows(rows, runner, args, algo, update_shape, extra)
        if "twin" in args.sections or "twin-sps" in args.sections:
            twin_rows(rows, runner, args, pool_rate, extra)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows.preamble[0] = rows.preamble[0].replace("at the start", f"at the start, {load} at the end")
    rows.write()
    print(rows.text(), end="")


if __name__ == "__main__":
    main()
