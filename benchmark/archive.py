"""Keep a sweep's results in the repository: copy the small files of every completed run into an archive.

    python benchmark/archive.py sweeps/ablation/qflex_N5 docs/results/archive/ablation/qflex_N5   # keep
    python benchmark/archive.py docs/results/archive/ablation/qflex_N5 sweeps/ablation/qflex_N5   # continue elsewhere

A run.py sweep directory lives outside version control (checkpoints are MBs per run), so it is lost with the machine
that ran it. The archive keeps what the analyses read and what run.py needs to skip a run: per completed run, its
status record and runs/{run_name}/ with config.json, final_eval.json, the TensorBoard events and stdout.log; no
checkpoints, no attempt logs (about 60 KB per run of the ChainReach sweeps). It is itself a sweep directory, so
plot.py and analysis.py read it like the sweep, and copying it back (the second line) into a new sweep directory lets
run.py continue the sweep: it skips the completed runs and runs the rest.

Only completed runs are copied; each run directory is copied under a temp name and renamed, and its status record is
written after it, so an archive cut short never lists a run it does not hold. Copying again adds the runs completed
since; a run already in the destination is left alone; a destination that holds another run of the same
(algo, env, seed) with other arguments, or a sweep running right now, is an error. Machine paths in the records are
made relative to the repository (the interpreter becomes `python`), in the records and in stdout.log.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, SweepDir, SweepError  # noqa: E402

KEPT_FILES = ("config.json", "final_eval.json", "stdout.log")
KEPT_GLOBS = ("events.out.tfevents.*",)


def portable_command(command: list[str]) -> list[str]:
    """The run's command without this machine's paths: `python algos/x.py ...`."""
    if not command:
        return command
    rest = []
    for part in command[1:]:
        path = Path(part)
        rest.append(str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else part)
    return ["python", *rest]


def portable_log(text: str, command: list[str]) -> str:
    """stdout.log's attempt lines without this machine's interpreter and repository paths."""
    if command:
        text = text.replace(command[0] + " ", "python ")
    return text.replace(f"{REPO}/", "")


def kept_files(run_dir: Path) -> list[Path]:
    files = [run_dir / name for name in KEPT_FILES if (run_dir / name).is_file()]
    return files + sorted(p for pattern in KEPT_GLOBS for p in run_dir.glob(pattern) if p.is_file())


def archive(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy src's completed runs into dst: (keys copied, keys already there)."""
    source, target = SweepDir(src), SweepDir(dst)
    if not source.status_dir.is_dir():
        raise SweepError(f"{src} is not a run.py sweep directory (it has no status/)")
    target.make()
    lock = target.lock()  # a sweep running in dst would race with the records written here
    copied, present = [], []
    try:
        for record in source.all_status():
            if record.get("status") != "completed":
                continue
            key, run_name = record["key"], record["run_name"]
            there = target.read_status(key)
            if there and there.get("status") == "completed":
                if there.get("run_name") != run_name and there.get("extra_args") != record.get("extra_args"):
                    raise SweepError(f"{dst} already holds {key} with other arguments ({there.get('run_name')}); "
                                     "archive into another directory")  # fmt: skip
                present.append(key)
                continue
            run_dir = src / record.get("run_dir", f"runs/{run_name}")
            files = kept_files(run_dir)
            if not any(f.name == "final_eval.json" for f in files):
                raise SweepError(f"{key} is recorded as completed but {run_dir} has no final_eval.json")
            final = target.runs / run_name
            tmp = target.runs / f".{run_name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in files:
                shutil.copy2(f, tmp / f.name)
                if f.name == "stdout.log":
                    log = tmp / f.name
                    log.write_text(portable_log(log.read_text(errors="replace"), record.get("command", [])))
            shutil.rmtree(final, ignore_errors=True)  # a copy cut short before its status record was written
            tmp.rename(final)
            kept = dict(record, command=portable_command(record.get("command", [])), run_dir=f"runs/{run_name}")
            target.write_status(kept)
            copied.append(key)
        target.write_manifest()
    finally:
        lock.close()
    return copied, present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a run.py sweep directory (or an archive)")
    parser.add_argument("dst", help="the archive (or a new sweep directory); created if missing")
    args = parser.parse_args(argv)
    try:
        copied, present = archive(Path(args.src), Path(args.dst))
    except SweepError as error:
        print(f"archive.py: error: {error}", file=sys.stderr)
        return 2
    print(f"[archive.py] {len(copied)} run(s) copied, {len(present)} already there, into {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
