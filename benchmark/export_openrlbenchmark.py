"""Export TensorBoard runs to openrlbenchmark's offline cache, so `python -m openrlbenchmark.rlops --offline` can plot
them with no Weights & Biases account (recipe in docs/benchmark.md).

    python benchmark/export_openrlbenchmark.py --runs-dir sweeps/demo --dest openrlbenchmark-dataset \\
        --entity qflex-bench --project qflex-bench

writes, for every run directory (one holding `events.out.tfevents.*`; a run.py sweep is read through its `runs/`):

    DEST/<entity>/<project>/offline.sqlite           the index rlops queries (peewee tables offlinerun, tag,
                                                     tag_offlinerun_through)
    DEST/<entity>/<project>/<run_id>/run.json        id, name, state, url, project, entity, config, tags, path, user
    DEST/<entity>/<project>/<run_id>/run_df.csv      the W&B-history-like table: one row per scalar event with
                                                     `global_step`, `_runtime` (s since the run's first event),
                                                     `_timestamp`, `_step` and the event's tag as a column

DEST is then copied into the `dataset/` folder of the installed openrlbenchmark package (see the docs). The
format is openrlbenchmark's internal cache (openrlbenchmark/cache.py, offline_db.py, rlops.py of 0.2.1 - 0.3.x),
not a documented interface; the points it depends on:
  * rlops filters offline runs with `OfflineRun.config["<key>.value"] == ...` (key = ceik / cen of the filter,
    default env_id / exp_name). peewee 3.x turns that into the JSON path `$.env_id.value` and newer peewee into
    `$."env_id.value"`, so `config` holds every config.json entry both as W&B's raw `{"key": {"value": v}}` and as
    a flat `"key.value": v`.
  * with --scan-history, rlops reloads run.json as a DotMap and re-inserts its config, so run.json has the same
    config; `state` is "finished" (rlops skips "running" runs).
  * run_df.csv is read with pandas and filtered to `global_step`, `_runtime` and the metric, dropping NaNs.
Re-exporting a run replaces its rows and files; other runs in the cache are kept. Only the standard library,
pandas and tensorboard are needed here; openrlbenchmark itself lives in its own environment.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

# The DDL peewee generates for openrlbenchmark/offline_db.py (checked with peewee 3.16 and 4.5); IF NOT EXISTS, so
# rlops' own create_tables(safe=True) finds them in place.
SCHEMA = [
    'CREATE TABLE IF NOT EXISTS "offlinerun" ("id" VARCHAR(255) NOT NULL, "name" VARCHAR(255) NOT NULL, '
    '"state" VARCHAR(255) NOT NULL, "url" VARCHAR(255) NOT NULL, "path" TEXT NOT NULL, "username" VARCHAR(255) NOT NULL, '
    '"project" VARCHAR(255) NOT NULL, "entity" VARCHAR(255) NOT NULL, "config" TEXT NOT NULL)',
    'CREATE TABLE IF NOT EXISTS "tag" ("id" INTEGER NOT NULL PRIMARY KEY, "name" VARCHAR(255) NOT NULL)',
    'CREATE TABLE IF NOT EXISTS "tag_offlinerun_through" ("id" INTEGER NOT NULL PRIMARY KEY, "tag_id" INTEGER NOT NULL, '
    '"offlinerun_id" INTEGER NOT NULL, FOREIGN KEY ("tag_id") REFERENCES "tag" ("id"), '
    'FOREIGN KEY ("offlinerun_id") REFERENCES "offlinerun" ("id"))',
    'CREATE INDEX IF NOT EXISTS "tagofflinerunthrough_tag_id" ON "tag_offlinerun_through" ("tag_id")',
    'CREATE INDEX IF NOT EXISTS "tagofflinerunthrough_offlinerun_id" ON "tag_offlinerun_through" ("offlinerun_id")',
    'CREATE UNIQUE INDEX IF NOT EXISTS "tagofflinerunthrough_tag_id_offlinerun_id" '
    'ON "tag_offlinerun_through" ("tag_id", "offlinerun_id")',
]
RUN_NAME = re.compile(r"^(?P<env>.+)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)$")


def find_run_dirs(roots: list[str]) -> list[Path]:
    found = []
    for root in roots:
        base = Path(root)
        if (base / "runs").is_dir() and (base / "status").is_dir():
            base = base / "runs"
        events = glob.glob(str(base / "**" / "events.out.tfevents.*"), recursive=True)
        found.extend(sorted({Path(e).parent for e in events}))
    return found


def run_config(run_dir: Path) -> dict:
    """config.json (vars(args) + run_name); run-name fields fill in what is missing."""
    config = {}
    if (run_dir / "config.json").is_file():
        with open(run_dir / "config.json") as f:
            config = json.load(f)
    match = RUN_NAME.match(run_dir.name)
    if match:
        config.setdefault("env_id", match["env"])
        config.setdefault("exp_name", match["exp"])
        config.setdefault("seed", int(match["seed"]))
    config.setdefault("run_name", run_dir.name)
    return config


def wandb_style_config(config: dict) -> dict:
    """Every entry as W&B's raw {"value": v, "desc": None}, plus a flat "key.value" copy (see the module docstring)."""
    out = {}
    for key, value in config.items():
        out[key] = {"desc": None, "value": value}
        out[f"{key}.value"] = value
    return out


def history_rows(run_dir: Path) -> list[dict]:
    """One row per scalar event, in (step, time) order, like a W&B history scan."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = [(e.step, e.wall_time, tag, e.value) for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    try:
        start = accumulator.FirstEventTimestamp()
    except ValueError:
        start = min((e[1] for e in events), default=0.0)
    rows = []
    for i, (step, wall_time, tag, value) in enumerate(sorted(events, key=lambda e: (e[0], e[1]))):
        rows.append({"_step": i, "global_step": step, "_runtime": wall_time - start, "_timestamp": wall_time, tag: value})
    return rows


def safe_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def export_run(run_dir: Path, project_dir: Path, entity: str, project: str, tags: list[str], db: sqlite3.Connection):
    import pandas as pd

    config = run_config(run_dir)
    run_id = safe_id(config["run_name"])
    run_path = [entity, project, run_id]
    raw_config = wandb_style_config(config)
    record = dict(
        id=run_id,
        name=config["run_name"],
        state="finished",
        url=run_dir.resolve().as_uri(),
        project=project,
        entity=entity,
        config=raw_config,
        tags=tags,
        path=run_path,
        user={"username": "offline", "name": "offline"},
    )
    target = project_dir / run_id
    tmp = project_dir / f".{run_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pd.DataFrame(history_rows(run_dir)).to_csv(tmp / "run_df.csv")
    with open(tmp / "run.json", "w") as f:
        json.dump(record, f)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)

    db.execute('DELETE FROM "tag_offlinerun_through" WHERE "offlinerun_id" = ?', (run_id,))
    db.execute('DELETE FROM "offlinerun" WHERE "id" = ?', (run_id,))
    db.execute(
        'INSERT INTO "offlinerun" ("id", "name", "state", "url", "path", "username", "project", "entity", "config") '
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            record["name"],
            "finished",
            record["url"],
            json.dumps(run_path),
            "offline",
            project,
            entity,
            json.dumps(raw_config),
        ),
    )
    for tag in tags:
        row = db.execute('SELECT "id" FROM "tag" WHERE "name" = ?', (tag,)).fetchone()
        tag_id = row[0] if row else db.execute('INSERT INTO "tag" ("name") VALUES (?)', (tag,)).lastrowid
        db.execute(
            'INSERT OR IGNORE INTO "tag_offlinerun_through" ("tag_id", "offlinerun_id") VALUES (?, ?)', (tag_id, run_id)
        )
    return run_id, config


def export(roots: list[str], dest: str, entity: str, project: str, tags: list[str]) -> list[tuple[str, dict]]:
    run_dirs = find_run_dirs(roots)
    if not run_dirs:
        return []
    project_dir = Path(dest) / entity / project
    project_dir.mkdir(parents=True, exist_ok=True)
    db_path = project_dir / "offline.sqlite"
    tmp_db = project_dir / ".offline.sqlite.tmp"
    if db_path.exists():
        shutil.copyfile(db_path, tmp_db)
    elif tmp_db.exists():
        tmp_db.unlink()
    db = sqlite3.connect(tmp_db)
    try:
        for statement in SCHEMA:
            db.execute(statement)
        exported = [export_run(run_dir, project_dir, entity, project, tags, db) for run_dir in run_dirs]
        db.commit()
    finally:
        db.close()
    os.replace(tmp_db, db_path)  # the index changes all at once
    return exported


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark/export_openrlbenchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", nargs="+", default=["runs"], help="sweep or runs folders (default runs)")
    parser.add_argument(
        "--dest", default="openrlbenchmark-dataset", help="output folder (copy it into openrlbenchmark/dataset)"
    )
    parser.add_argument("--entity", default="qflex-bench", help="the `we=` of the rlops filter (default qflex-bench)")
    parser.add_argument("--project", default="qflex-bench", help="the `wpn=` of the rlops filter (default qflex-bench)")
    parser.add_argument("--tags", nargs="*", default=["offline-export"], help="run tags (filter with `?tag=`)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    exported = export(args.runs_dir, args.dest, args.entity, args.project, args.tags)
    if not exported:
        print(f"export_openrlbenchmark.py: error: no TensorBoard runs under {' '.join(args.runs_dir)}", file=sys.stderr)
        return 1
    cells = sorted({(c.get("exp_name"), c.get("env_id")) for _, c in exported})
    print(
        f"exported {len(exported)} run(s) to {Path(args.dest) / args.entity / args.project}: "
        + ", ".join(f"{e}/{a}" for a, e in cells)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
