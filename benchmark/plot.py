"""Learning curves, tables and rliable aggregates straight from the TensorBoard logs of `algos/*.py` runs.

    python benchmark/plot.py --runs-dir sweeps/demo --out results/demo --name demo [--reps 50000]

Inputs: every run directory (one holding `events.out.tfevents.*`) under each --runs-dir; a sweep directory of
`benchmark/run.py` is read through its `runs/` folder, which only holds completed runs. A run's algorithm is its
`exp_name`, its env and seed come from `config.json` (or, failing that, from the run name
`{env}__{exp_name}__{seed}__{time}`). Event files are read with EventAccumulator(size_guidance={"scalars": 0}), so
nothing is subsampled. If the same (algo, env, seed) appears twice, the most recent run is used (with a warning).

Per-run score: `eval/episodic_return` of `final_eval.json` (the final evaluation), falling back
to the last `eval/episodic_return` point of the events; `eval/success_rate` likewise.

Outputs (openrlbenchmark's names; OUT/<name>...):
  <name>.png                       eval return vs env transitions per env: mean over seeds, 95% bootstrap CI band
  <name>-time.png                  the same vs wall time (TensorBoard event time since the run's first event)
  <name>.csv, <name>.md            per (env, algo): final return mean ± std (ddof=0, as openrlbenchmark), IQM over
                                   seeds, mean of the last 3 periodic rounds, success rate, normalised score,
                                   transitions, seeds, wall time; the .md also has the aggregate tables
  <name>_aggregate.png/.csv        rliable Median, IQM, Mean, Optimality Gap of normalised scores, stratified
                                   bootstrap 95% CIs over runs within tasks
  <name>_performance_profile.png   rliable performance profiles (fraction of runs with normalised score > tau)
  <name>_probability_of_improvement.png/.csv
                                   P(--ours > baseline) for every other algorithm (only when --ours runs exist)
Every figure's title gives the budget (env transitions) and the number of seeds.

Normalisation (fixed per env, never relative to the plotted algorithms, as rliable advises), see REFERENCES:
  * ChainReach*: (return - random) / (0 - random). `random` is the mean return of uniform random actions in
    [-1, 1]^|A| over 100 episodes (reset seeds 10000..10099), measured with `--measure-random ChainReachJ-v0`;
    0 is a perfect reach from the first step (unreachable, since the tip starts away from the target), so 1 is an
    upper bound. For scale, the scripted `jacobian_transpose_action` controller scores about 0.83-0.86.
  * MyoSuite (`myo*`): the final evaluation's success rate, already in [0, 1] (random policies score ~0).
  * dm_control/*: return / 1000 (per-step rewards lie in [0, 1], 1000-step episodes).
  Envs without a reference are left out of the aggregates with a warning (curves and tables still include them).
Aggregates use the envs with a reference on which every included algorithm has runs; an algorithm missing one of
them is dropped from the aggregates (with a warning), and when an algorithm has different seed counts on different
envs its first k seeds (sorted) are used on each, k being its smallest count. `np.random.seed(--seed)` is called
before every rliable call (rliable 1.2.0 draws bootstrap indices from the global NumPy generator).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Random-policy returns measured with `python benchmark/plot.py --measure-random ChainReachJ-v0` (100 episodes).
CHAIN_REACH_RANDOM = {
    "ChainReach4-v0": -102.8,
    "ChainReach16-v0": -107.5,
    "ChainReach64-v0": -109.8,
    "ChainReach256-v0": -104.1,
}


@dataclass(frozen=True)
class Reference:
    """score = (value - low) / (high - low), where value is the final eval return or success rate."""

    metric: str  # "return" or "success"
    low: float
    high: float
    note: str


def reference_for(env_id: str) -> Reference | None:
    if env_id in CHAIN_REACH_RANDOM:
        return Reference("return", CHAIN_REACH_RANDOM[env_id], 0.0, "random-policy return -> 0, zero distance (0) -> 1")
    if env_id.startswith("myo"):
        return Reference("success", 0.0, 1.0, "success rate of the final evaluation")
    if env_id.startswith("dm_control/"):
        return Reference("return", 0.0, 1000.0, "return / 1000")
    return None


def normalize(value: float, ref: Reference) -> float:
    return (value - ref.low) / (ref.high - ref.low)


# ---------------------------------------------------------------------------------------------------------------
# reading runs


@dataclass
class Run:
    algo: str
    env_id: str
    seed: int
    path: Path
    created: float = 0.0
    eval_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eval_returns: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eval_times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # seconds since the run's first event
    success_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    success_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final_return: float = math.nan
    final_success: float = math.nan
    transitions: int = 0
    wall_time: float = math.nan
    last3_return: float = math.nan


RUN_NAME = re.compile(r"^(?P<env>.+)__(?P<exp>.+)__(?P<seed>-?\d+)__(?P<time>\d+)$")


def natural_key(text: str) -> list:
    """Sort key that orders numbers by value: ChainReach4 < ChainReach16 < ChainReach64 (plain sorting puts 16 first)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def env_order(env_ids) -> list[str]:
    """The distinct env ids in the order every table and figure uses."""
    return sorted(set(env_ids), key=natural_key)


def find_run_dirs(roots: list[str]) -> list[Path]:
    found = []
    for root in roots:
        base = Path(root)
        if (base / "runs").is_dir() and (base / "status").is_dir():  # a run.py sweep: completed runs only
            base = base / "runs"
        events = glob.glob(str(base / "**" / "events.out.tfevents.*"), recursive=True)
        found.extend(sorted({Path(e).parent for e in events}))
    return found


def load_scalars(run_dir: Path) -> tuple[dict[str, list], float]:
    """{tag: [(step, value, wall_time), ...]} and the first event's wall time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {
        tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
    try:
        first = accumulator.FirstEventTimestamp()
    except ValueError:
        first = min((s[0][2] for s in scalars.values() if s), default=0.0)
    return scalars, first


def read_run(run_dir: Path) -> Run | None:
    config = {}
    if (run_dir / "config.json").is_file():
        with open(run_dir / "config.json") as f:
            config = json.load(f)
    match = RUN_NAME.match(run_dir.name)
    algo = config.get("exp_name") or (match and match["exp"])
    env_id = config.get("env_id") or (match and match["env"])
    seed = config.get("seed", match and int(match["seed"]))
    if not algo or not env_id or seed is None:
        warnings.warn(f"skipping {run_dir}: no config.json and not a run name env__exp__seed__time", stacklevel=2)
        return None
    scalars, first = load_scalars(run_dir)
    run = Run(algo=str(algo), env_id=str(env_id), seed=int(seed), path=run_dir, created=first)
    evals = sorted(scalars.get("eval/episodic_return", []))
    if evals:
        run.eval_steps = np.array([e[0] for e in evals], dtype=float)
        run.eval_returns = np.array([e[1] for e in evals], dtype=float)
        run.eval_times = np.array([e[2] - first for e in evals], dtype=float)
    success = sorted(scalars.get("eval/success_rate", []))
    if success:
        run.success_steps = np.array([e[0] for e in success], dtype=float)
        run.success_values = np.array([e[1] for e in success], dtype=float)
    last_step = max((s[-1][0] for s in scalars.values() if s), default=0)
    last_time = max((max(e[2] for e in s) for s in scalars.values() if s), default=first)
    final = {}
    if (run_dir / "final_eval.json").is_file():
        with open(run_dir / "final_eval.json") as f:
            final = json.load(f)
    run.final_return = float(final.get("eval/episodic_return", run.eval_returns[-1] if len(run.eval_returns) else math.nan))
    run.final_success = float(final.get("eval/success_rate", run.success_values[-1] if len(run.success_values) else math.nan))
    run.transitions = int(final.get("global_step", last_step))
    run.wall_time = float(final.get("wall_time", last_time - first))
    periodic = run.eval_returns[run.eval_steps < run.transitions] if final else run.eval_returns[:-1]
    if len(periodic):
        run.last3_return = float(np.mean(periodic[-3:]))
    return run


def load_runs(roots: list[str]) -> list[Run]:
    """Every readable run; for a repeated (algo, env, seed) the most recent one."""
    runs: dict[tuple, Run] = {}
    for run_dir in find_run_dirs(roots):
        run = read_run(run_dir)
        if run is None:
            continue
        if not len(run.eval_returns) and math.isnan(run.final_return):
            warnings.warn(f"skipping {run_dir}: no eval/episodic_return", stacklevel=2)
            continue
        key = (run.algo, run.env_id, run.seed)
        if key in runs:
            older, newer = sorted([runs[key], run], key=lambda r: r.created)
            warnings.warn(f"{key} appears twice; using {newer.path}, ignoring {older.path}", stacklevel=2)
            run = newer
        runs[key] = run
    return sorted(runs.values(), key=lambda r: (natural_key(r.env_id), r.algo, r.seed))


# ---------------------------------------------------------------------------------------------------------------
# statistics (pure functions)


def bootstrap_mean_ci(values: np.ndarray, reps: int, rng: np.random.Generator, size: float = 0.95):
    """Mean over axis 0 (seeds) and its percentile bootstrap CI, resampling seeds with replacement."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    n = values.shape[0]
    if n < 2 or reps < 1:
        return mean, mean.copy(), mean.copy()
    idx = rng.integers(0, n, size=(reps, n))
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - size), 50 * (1 + size)], axis=0)
    return mean, lo, hi


def iqm(values) -> float:
    """Interquartile mean (25% trimmed on each side), as rliable's aggregate_iqm for one task."""
    from scipy.stats import trim_mean

    values = np.asarray(values, dtype=float)
    return float(trim_mean(values, 0.25)) if len(values) else math.nan


def common_curve(runs: list[Run], x_of, grid_points: int | None = None):
    """Interpolate every run's eval curve onto one grid inside the x-range all runs cover: (grid, values[seed, x])."""
    xs = [x_of(r) for r in runs]
    lo, hi = max(x[0] for x in xs), min(x[-1] for x in xs)
    if grid_points is None:
        grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x in xs]))
    else:
        grid = np.linspace(lo, hi, grid_points)
    values = np.stack([np.interp(grid, x, r.eval_returns) for x, r in zip(xs, runs, strict=True)])
    return grid, values


def score_matrix(runs: list[Run], algos: list[str], tasks: list[str]) -> dict[str, np.ndarray]:
    """{algo: normalised final scores (num_runs, num_tasks)}, each algo's first k seeds per task."""
    scores = {}
    for algo in algos:
        per_task = []
        for env_id in tasks:
            ref = reference_for(env_id)
            task_runs = sorted((r for r in runs if r.algo == algo and r.env_id == env_id), key=lambda r: r.seed)
            values = [r.final_success if ref.metric == "success" else r.final_return for r in task_runs]
            per_task.append([normalize(v, ref) for v in values])
        k = min(len(v) for v in per_task)
        scores[algo] = np.array([v[:k] for v in per_task], dtype=float).T
    return scores


def select_aggregate(runs: list[Run], algos: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Tasks and algorithms that enter the aggregates, plus warnings about what was left out."""
    notes = []
    envs = env_order(r.env_id for r in runs)
    tasks = []
    for env_id in envs:
        ref = reference_for(env_id)
        if ref is None:
            notes.append(f"{env_id}: no normalisation reference, left out of the aggregates")
            continue
        if ref.metric == "success" and any(math.isnan(r.final_success) for r in runs if r.env_id == env_id):
            notes.append(f"{env_id}: some runs have no eval/success_rate, left out of the aggregates")
            continue
        tasks.append(env_id)
    included = []
    for algo in algos:
        missing = [t for t in tasks if not any(r.algo == algo and r.env_id == t for r in runs)]
        if missing:
            notes.append(f"{algo}: no runs on {', '.join(missing)}, left out of the aggregates")
        else:
            included.append(algo)
    return tasks, included, notes


# ---------------------------------------------------------------------------------------------------------------
# output


def fmt_steps(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


def seeds_text(counts) -> str:
    counts = sorted(set(counts))
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''}"
    return f"{counts[0]}-{counts[-1]} seeds"


def algo_colors(algos: list[str]) -> dict[str, tuple]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {algo: cmap(i % 10) for i, algo in enumerate(algos)}


def plot_curves(runs, algos, colors, out: Path, name: str, reps: int, rng, wall_time: bool) -> Path:
    import matplotlib.pyplot as plt

    envs = env_order(r.env_id for r in runs)
    ncols = min(3, len(envs))
    nrows = math.ceil(len(envs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 4.6 * ncols), 3.4 * nrows + 0.8), squeeze=False)
    for ax, env_id in zip(axes.flat, envs, strict=False):
        env_runs = [r for r in runs if r.env_id == env_id]
        budget = max(r.transitions for r in env_runs)
        seed_counts = []
        for algo in algos:
            group = [r for r in env_runs if r.algo == algo and len(r.eval_returns)]
            if not group:
                continue
            seed_counts.append(len(group))
            if wall_time:
                grid, values = common_curve(group, lambda r: r.eval_times / 60.0, grid_points=50)
            else:
                grid, values = common_curve(group, lambda r: r.eval_steps)
            mean, lo, hi = bootstrap_mean_ci(values, reps, rng)
            ax.plot(grid, mean, color=colors[algo], label=f"{algo} ({len(group)})")
            ax.fill_between(grid, lo, hi, color=colors[algo], alpha=0.2, linewidth=0)
        ax.set_title(f"{env_id}\n{fmt_steps(budget)} transitions, {seeds_text(seed_counts or [0])}", fontsize=9)
        ax.set_xlabel("wall time (min)" if wall_time else "env transitions")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(envs) :]:
        ax.remove()
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label.split(" (")[0] not in [x.split(" (")[0] for x in labels]:
                handles.append(h)
                labels.append(label)
    budget_all = max(r.transitions for r in runs)
    counts = [len([r for r in runs if r.algo == a and r.env_id == e]) for a in algos for e in envs]
    fig.suptitle(
        f"{name}: eval return vs {'wall time' if wall_time else 'env transitions'}\n"
        f"up to {fmt_steps(budget_all)} transitions, {seeds_text([c for c in counts if c])}; "
        f"mean and 95% bootstrap CI over seeds",
        fontsize=10,
    )
    fig.legend(handles, [label.split(" (")[0] for label in labels], loc="lower center", ncol=min(len(labels), 6))
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    path = out / f"{name}{'-time' if wall_time else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_cell_rows(runs: list[Run], algos: list[str]) -> list[dict]:
    rows = []
    for env_id in env_order(r.env_id for r in runs):
        ref = reference_for(env_id)
        for algo in algos:
            group = [r for r in runs if r.env_id == env_id and r.algo == algo]
            if not group:
                continue
            finals = np.array([r.final_return for r in group])
            success = np.array([r.final_success for r in group])
            last3 = np.array([r.last3_return for r in group])
            walls = np.array([r.wall_time for r in group])
            norm = math.nan
            if ref is not None:
                values = success if ref.metric == "success" else finals
                norm = float(np.mean([normalize(v, ref) for v in values]))
            rows.append(
                dict(
                    env_id=env_id,
                    algo=algo,
                    seeds=len(group),
                    transitions=int(max(r.transitions for r in group)),
                    final_return_mean=float(finals.mean()),
                    final_return_std=float(finals.std()),
                    final_return_iqm=iqm(finals),
                    last3_return_mean=float(np.nanmean(last3)) if not np.all(np.isnan(last3)) else math.nan,
                    success_rate_mean=float(np.nanmean(success)) if not np.all(np.isnan(success)) else math.nan,
                    normalized_score_mean=norm,
                    wall_time_mean_s=float(walls.mean()),
                    wall_time_std_s=float(walls.std()),
                    seed_list=" ".join(str(r.seed) for r in sorted(group, key=lambda r: r.seed)),
                )
            )
    return rows


def fmt(x: float, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (fmt(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def title_above(ax, text: str, x: float, ha: str, points: float, fontsize: float) -> None:
    """A title `points` above the top of `ax` at axes-fraction `x`: rliable's strips have their own axes titles at the top."""
    ax.annotate(text, xy=(x, 1.0), xycoords="axes fraction", xytext=(0, points), textcoords="offset points",
                fontsize=fontsize, ha=ha, va="bottom")  # fmt: skip


def aggregate(runs, algos, colors, out: Path, name: str, reps: int, seed: int, ours: str):
    """rliable aggregates; returns (markdown lines, notes)."""
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import metrics, plot_utils

    tasks, included, notes = select_aggregate(runs, algos)
    lines = []
    if not tasks or not included:
        notes.append("no env with a normalisation reference has runs of every algorithm: no aggregates")
        return lines, notes
    scores = score_matrix(runs, included, tasks)
    budget = fmt_steps(max(r.transitions for r in runs if r.env_id in tasks))
    seeds = seeds_text([s.shape[0] for s in scores.values()])
    header = f"{len(tasks)} task(s), {budget} transitions, {seeds} per task"
    metric_names = ["Median", "IQM", "Mean", "Optimality Gap"]

    def agg(x):
        return np.array(
            [
                metrics.aggregate_median(x),
                metrics.aggregate_iqm(x),
                metrics.aggregate_mean(x),
                metrics.aggregate_optimality_gap(x),
            ]
        )

    np.random.seed(seed)
    points, cis = rly.get_interval_estimates(scores, agg, reps=reps)
    fig, axes = plot_utils.plot_interval_estimates(
        points,
        cis,
        metric_names=metric_names,
        algorithms=included,
        colors=colors,
        xlabel="Normalized score",
        row_height=max(0.37, 1.2 / len(included)),
        xlabel_y_coordinate=-0.45 / (max(0.37, 1.2 / len(included)) * len(included)),
    )
    title = f"{name}: {header}; 95% stratified-bootstrap CIs ({reps} reps)"
    title_above(axes[0], title, x=0.0, ha="left", points=28, fontsize=10)
    fig.savefig(out / f"{name}_aggregate.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    agg_rows = []
    for algo in included:
        row = dict(algo=algo, runs_per_task=scores[algo].shape[0], tasks=len(tasks))
        for i, metric in enumerate(metric_names):
            key = metric.lower().replace(" ", "_")
            row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = (
                float(points[algo][i]),
                float(cis[algo][0, i]),
                float(cis[algo][1, i]),
            )
        agg_rows.append(row)
    write_csv(out / f"{name}_aggregate.csv", agg_rows)
    lines += [
        f"## Aggregates over normalised scores ({header})",
        "",
        f"Tasks: {', '.join(tasks)}. 95% stratified-bootstrap CIs, {reps} reps; optimality gap: lower is better.",
        "",
        "| algo | " + " | ".join(metric_names) + " |",
        "|---|" + "---|" * len(metric_names),
    ]
    for row in agg_rows:
        cells = []
        for metric in metric_names:
            key = metric.lower().replace(" ", "_")
            cells.append(f"{row[key]:.3f} [{row[key + '_ci_low']:.3f}, {row[key + '_ci_high']:.3f}]")
        lines.append(f"| {row['algo']} | " + " | ".join(cells) + " |")
    lines.append("")

    all_scores = np.concatenate([s.ravel() for s in scores.values()])
    taus = np.linspace(min(0.0, float(all_scores.min())), max(1.0, float(all_scores.max())), 81)
    np.random.seed(seed)
    profiles, profile_cis = rly.create_performance_profile(scores, taus, reps=reps)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_utils.plot_performance_profiles(
        profiles, taus, performance_profile_cis=profile_cis, colors=colors, xlabel=r"Normalized score $(\tau)$", ax=ax
    )
    ax.set_title(f"{name}: performance profiles\n{header}", fontsize=9)
    ax.legend([plt.Line2D([0], [0], color=colors[a]) for a in included], included, loc="best", fontsize=8)
    fig.savefig(out / f"{name}_performance_profile.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    baselines = [a for a in included if a != ours]
    if ours in included and baselines:
        pairs = {f"{ours},{b}": (scores[ours], scores[b]) for b in baselines}
        np.random.seed(seed)
        poi, poi_cis = rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps)
        ax = plot_utils.plot_probability_of_improvement(poi, poi_cis, figsize=(4.5, 0.6 + 0.5 * len(pairs)))
        title_above(ax, f"{name}: P({ours} > baseline)\n{header}", x=0.5, ha="center", points=24, fontsize=9)
        ax.figure.savefig(out / f"{name}_probability_of_improvement.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        poi_rows = [
            dict(
                pair=p,
                probability=float(np.ravel(poi[p])[0]),
                ci_low=float(np.ravel(poi_cis[p])[0]),
                ci_high=float(np.ravel(poi_cis[p])[-1]),
            )
            for p in pairs
        ]
        write_csv(out / f"{name}_probability_of_improvement.csv", poi_rows)
        lines += [
            f"## Probability of improvement of {ours} ({header})",
            "",
            "| X,Y | P(X > Y) | 95% CI |",
            "|---|---|---|",
        ]
        lines += [f"| {r['pair']} | {r['probability']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |" for r in poi_rows]
        lines.append("")
    elif ours not in included:
        notes.append(f"no {ours} runs in the aggregates: no probability of improvement")
    return lines, notes


def markdown_table(rows: list[dict], name: str) -> list[str]:
    lines = [
        f"# {name}",
        "",
        "Final evaluation return (final_eval.json; else the last eval point): mean ± std over seeds, IQM over seeds,",
        "mean of the last 3 periodic evaluations, success rate, normalised score (see the references below),",
        "env transitions, seeds, wall time per run (minutes, mean ± std).",
        "",
    ]
    for env_id in env_order(r["env_id"] for r in rows):
        group = [r for r in rows if r["env_id"] == env_id]
        budget = fmt_steps(max(r["transitions"] for r in group))
        lines += [
            f"## {env_id} ({budget} transitions, {seeds_text([r['seeds'] for r in group])})",
            "",
            "| algo | return mean ± std | IQM | last-3 mean | success | normalised | transitions | seeds | wall time (min) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group:
            lines.append(
                f"| {r['algo']} | {r['final_return_mean']:.2f} ± {r['final_return_std']:.2f} | {r['final_return_iqm']:.2f} "
                f"| {fmt(r['last3_return_mean'])} | {fmt(r['success_rate_mean'], 3)} | {fmt(r['normalized_score_mean'], 3)} "
                f"| {r['transitions']} | {r['seeds']} | {r['wall_time_mean_s'] / 60:.1f} ± {r['wall_time_std_s'] / 60:.1f} |"
            )
        lines.append("")
    return lines


def reference_lines(envs: list[str]) -> list[str]:
    lines = ["## Normalisation references", "", "| env | score | 0 | 1 |", "|---|---|---|---|"]
    for env_id in envs:
        ref = reference_for(env_id)
        if ref is None:
            lines.append(f"| {env_id} | none (left out of aggregates) | | |")
        else:
            lines.append(f"| {env_id} | {ref.note} | {ref.low:g} | {ref.high:g} |")
    return lines + [""]


def measure_random_return(env_id: str, episodes: int = 100, seed: int = 10_000) -> tuple[float, float]:
    """Mean and std of the return of uniform random actions in [-1, 1]^d (reset seeds seed..seed+episodes-1)."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers ChainReach*)

    env = gym.make(env_id)
    rng = np.random.default_rng(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)
            _, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="benchmark/plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", nargs="+", default=["runs"], help="sweep or runs folders to read (default runs)")
    parser.add_argument("--out", default="results", help="output folder (default results)")
    parser.add_argument("--name", default="benchmark", help="output file stem (default benchmark)")
    parser.add_argument("--algos", nargs="+", default=None, help="algorithms to include, in legend order (default all)")
    parser.add_argument("--env-ids", nargs="+", default=None, help="envs to include (default all)")
    parser.add_argument("--ours", default="qflex", help="algorithm compared with every other one by P(X > Y) (default qflex)")
    parser.add_argument("--reps", type=int, default=50_000, help="rliable bootstrap reps (aggregates, profiles, P(X>Y))")
    parser.add_argument("--curve-reps", type=int, default=2_000, help="bootstrap reps for the learning-curve CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed for every bootstrap")
    parser.add_argument("--measure-random", metavar="ENV_ID", default=None, help="print an env's random-policy return; exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.measure_random:
        mean, std = measure_random_return(args.measure_random)
        print(f"{args.measure_random}: random-policy return {mean:.2f} ± {std:.2f} (100 episodes)")
        return 0
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs(args.runs_dir)
    for w in caught:
        print(f"plot.py: warning: {w.message}", file=sys.stderr)
    if args.env_ids:
        runs = [r for r in runs if r.env_id in args.env_ids]
    algos = args.algos or sorted({r.algo for r in runs}, key=lambda a: (a != args.ours, a))
    runs = [r for r in runs if r.algo in algos]
    algos = [a for a in algos if any(r.algo == a for r in runs)]
    if not runs:
        print(f"plot.py: error: no runs with eval/episodic_return under {' '.join(args.runs_dir)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    colors = algo_colors(algos)
    rng = np.random.default_rng(args.seed)
    plot_curves(runs, algos, colors, out, args.name, args.curve_reps, rng, wall_time=False)
    plot_curves(runs, algos, colors, out, args.name, args.curve_reps, rng, wall_time=True)
    rows = per_cell_rows(runs, algos)
    write_csv(out / f"{args.name}.csv", rows)
    agg_lines, notes = aggregate(runs, algos, colors, out, args.name, args.reps, args.seed, args.ours)
    for note in notes:
        print(f"plot.py: warning: {note}", file=sys.stderr)
    envs = env_order(r.env_id for r in runs)
    lines = markdown_table(rows, args.name) + agg_lines + reference_lines(envs)
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print(f"plot.py: {len(runs)} runs ({len(algos)} algos x {len(envs)} envs) -> {out}/{args.name}.*")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
