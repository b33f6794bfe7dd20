"""The Qflex paper's claims, measured on our own runs: score vs the number of actuators, effort, the flow's Q gain,
and the correlation structure of exploratory actions.

    python benchmark/analysis.py dimension   --runs-dir sweeps/dimension/main sweeps/dimension/sac_paper --out docs/results
    python benchmark/analysis.py ablation    --runs-dir sweeps/dimension/main sweeps/ablation/* --out docs/results
    python benchmark/analysis.py effort      --runs-dir sweeps/dimension/main sweeps/dimension/sac_paper --out docs/results
    python benchmark/analysis.py flow        --runs-dir sweeps/dimension/main --out docs/results
    python benchmark/analysis.py correlation --runs-dir sweeps/dimension/main --env-id ChainReach16-v0 --out docs/results

* `dimension` (claim 1): per algorithm and ChainReach task, the normalised final score (benchmark/plot.py's fixed
  references) over seeds, its mean and 95 % percentile-bootstrap CI, drawn against |A| = 2J; a table with the
  wall time per run.
* `ablation` (claim 2, the paper's Fig. 5): Qflex's normalised final score on one task (default ChainReach64-v0)
  per setting of the flow, read from each run's config: N flow steps, the ascent step size eta, and --no-flow; a
  table with the wall time per run and a figure of score vs N and vs eta beside the no-flow level.
* `effort` (claim 4, the paper's Table 4): `eval/effort` of each run's final evaluation, the mean over evaluation
  steps of the summed muscle activations, per algorithm and task.
* `flow` (the flow's own diagnostics): `flow/q_gain` (Q of the flow target minus Q of the source sample) and
  `flow/superiority_ratio` (fraction of flowed actions with higher Q than their source) along training, from the
  Qflex runs' TensorBoard logs.
* `correlation` (claim 3, the paper's Fig. 9): from each run's final checkpoint, --samples exploratory actions at
  each of --states fixed states (evaluation resets), exactly as the run acts while training (SAC: a tanh-Gaussian
  sample; Qflex: a source sample moved by the learned velocity field); the actuator x actuator correlation matrix,
  averaged over states and seeds, drawn with actuators grouped by anatomy (ChainReach: the flexor/extensor pair of
  each joint; MyoSuite: each muscle's hinge joint with the largest moment arm at the reset pose), and mean |corr|
  within groups vs across groups.

Every command writes <out>/<name>.md (and .csv / .png) and prints the table.
"""

import argparse
import csv
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot  # noqa: E402  (benchmark/plot.py: reading runs, references, bootstrap)

REPO = Path(__file__).resolve().parents[1]
CHAIN_REACH = re.compile(r"^ChainReach(\d+)-v0$")


def actuator_count(env_id: str) -> int | None:
    """|A| of a ChainReach task (2 per joint), None for other envs."""
    match = CHAIN_REACH.match(env_id)
    return 2 * int(match[1]) if match else None


def write_outputs(out: Path, name: str, rows: list[dict], lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# claim 1: score vs |A|


def dimension_rows(runs: list[plot.Run], reps: int, seed: int) -> list[dict]:
    """One row per (algo, ChainReach task): seeds, normalised score mean and 95 % CI, raw return, wall time."""
    rng = np.random.default_rng(seed)
    rows = []
    cells = sorted({(r.algo, r.env_id) for r in runs if actuator_count(r.env_id)}, key=lambda c: (c[0], actuator_count(c[1])))
    for algo, env_id in cells:
        cell = sorted((r for r in runs if (r.algo, r.env_id) == (algo, env_id)), key=lambda r: r.seed)
        rows.append(dict(algo=algo, env_id=env_id, actuators=actuator_count(env_id), **score_summary(cell, rng, reps)))
    return rows


def score_summary(cell: list[plot.Run], rng: np.random.Generator, reps: int) -> dict:
    """Seeds, normalised final score (mean, 95 % bootstrap CI), raw return and wall time of one cell's runs."""
    ref = plot.reference_for(cell[0].env_id)
    scores = np.array([plot.normalize(r.final_return, ref) for r in cell])
    mean, lo, hi = plot.bootstrap_mean_ci(scores, reps, rng)
    returns = [r.final_return for r in cell]
    return dict(seeds=len(cell), score_mean=float(mean), score_ci_low=float(lo), score_ci_high=float(hi),
                return_mean=float(np.mean(returns)), return_std=float(np.std(returns)),
                wall_time_min=float(np.mean([r.wall_time for r in cell]) / 60))  # fmt: skip


def finished_runs(roots: list[str]) -> list[plot.Run]:
    """The runs that wrote their final_eval.json (a sweep in progress also has runs that have not)."""
    return [r for r in plot.load_runs(roots) if (r.path / "final_eval.json").is_file()]


def dimension(args) -> int:
    runs = finished_runs(args.runs_dir)
    rows = dimension_rows(runs, args.reps, args.seed)
    if not rows:
        sys.exit("analysis.py: error: no ChainReach runs under " + " ".join(args.runs_dir))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    sizes = sorted({r["actuators"] for r in rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plot.algo_colors(algos)
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in algos:
        mine = [r for r in rows if r["algo"] == algo]
        x = [r["actuators"] for r in mine]
        ax.plot(x, [r["score_mean"] for r in mine], "o-", color=colors[algo], label=algo)
        ax.fill_between(x, [r["score_ci_low"] for r in mine], [r["score_ci_high"] for r in mine], color=colors[algo],
                        alpha=0.2)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("|A| (ChainReach actuators)")
    ax.set_ylabel("normalised final score (random 0, reach 1)")
    ax.set_title("final score vs number of actuators (mean, 95 % bootstrap CI over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name}.png", dpi=130)
    plt.close(fig)
    lines = [f"| algo | {' | '.join(f'|A| = {s}' for s in sizes)} |", "|---|" + "---|" * len(sizes)]
    for algo in algos:
        cells = []
        for size in sizes:
            row = next((r for r in rows if r["algo"] == algo and r["actuators"] == size), None)
            cells.append("—" if row is None else f"{row['score_mean']:.2f} [{row['score_ci_low']:.2f}, "
                         f"{row['score_ci_high']:.2f}] (n={row['seeds']}, {row['return_mean']:.1f}, "
                         f"{row['wall_time_min']:.1f} min)")  # fmt: skip
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: normalised score mean [95 % bootstrap CI] (seeds, mean final return, mean wall time per run).",
              f"Figure: {args.name}.png"]  # fmt: skip
    write_outputs(args.out, args.name, rows, lines)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# claim 2: the flow-step ablation


def ablation_rows(runs: list[plot.Run], env_id: str, reps: int, seed: int) -> list[dict]:
    """One row per Qflex setting (flow on/off, N, eta) on env_id: seeds, normalised score mean and 95 % CI, wall time.

    The setting is read from each run's config.json, not from its exp name, so the default runs of another sweep
    (e.g. the dimension sweep's `qflex`) join the N = 20, eta = 0.01 row."""
    rng, cells = np.random.default_rng(seed), {}
    for run in runs:
        config_path = run.path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if run.env_id != env_id or "flow_steps" not in config:
            continue
        key = (bool(config.get("flow", True)), int(config["flow_steps"]), float(config["flow_step_size"]))
        cells.setdefault(key, []).append(run)
    rows = []
    for (flow_on, steps, step_size), cell in sorted(cells.items(), key=lambda c: (not c[0][0], c[0][2], c[0][1])):
        rows.append(dict(setting="no flow (source policy)" if not flow_on else f"N = {steps}, eta = {step_size:g}",
                         flow=flow_on, flow_steps=steps, flow_step_size=step_size,
                         exp_names=" ".join(sorted({r.algo for r in cell})), **score_summary(cell, rng, reps)))  # fmt: skip
    return rows


def ablation(args) -> int:
    rows = ablation_rows(finished_runs(args.runs_dir), args.env_id, args.reps, args.seed)
    if not rows:
        sys.exit(f"analysis.py: error: no Qflex run on {args.env_id} under " + " ".join(args.runs_dir))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    panels = ((axes[0], "flow_steps", lambda r: r["flow_step_size"] == 0.01, "N, flow steps (eta = 0.01)"),
              (axes[1], "flow_step_size", lambda r: r["flow_steps"] == 20, "eta, ascent step size (N = 20)"))  # fmt: skip
    no_flow = [r for r in rows if not r["flow"]]
    for ax, key, chosen, label in panels:
        mine = sorted((r for r in rows if r["flow"] and chosen(r)), key=lambda r: r[key])
        x = [r[key] for r in mine]
        err = [[r["score_mean"] - r["score_ci_low"] for r in mine], [r["score_ci_high"] - r["score_mean"] for r in mine]]
        ax.errorbar(x, [r["score_mean"] for r in mine], yerr=err, fmt="o-", capsize=3, label="qflex")
        for r in no_flow:
            ax.axhline(r["score_mean"], color="grey", ls="--", lw=1, label=f"--no-flow (n={r['seeds']})")
            ax.axhspan(r["score_ci_low"], r["score_ci_high"], color="grey", alpha=0.15)
        if key == "flow_step_size":
            ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xticks([], minor=True)  # a log axis labels its minor ticks too, over the settings
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("normalised final score")
    fig.suptitle(f"Qflex flow-step ablation on {args.env_id} (mean, 95 % bootstrap CI over seeds)", fontsize=9)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name}.png", dpi=130)
    plt.close(fig)
    lines = ["| setting | seeds | normalised score [95 % CI] | final return | wall time per run | exp names |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['setting']} | {r['seeds']} | {r['score_mean']:.2f} [{r['score_ci_low']:.2f}, {r['score_ci_high']:.2f}] | "
              f"{r['return_mean']:.1f} | {r['wall_time_min']:.1f} min | {r['exp_names']} |" for r in rows]  # fmt: skip
    write_outputs(args.out, args.name, rows, lines + ["", f"Figure: {args.name}.png"])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# claim 4: effort


def effort_rows(runs: list[plot.Run]) -> list[dict]:
    rows = []
    for algo, env_id in sorted({(r.algo, r.env_id) for r in runs}, key=lambda c: (plot.natural_key(c[1]), c[0])):
        values = []
        for run in (r for r in runs if (r.algo, r.env_id) == (algo, env_id)):
            final = run.path / "final_eval.json"
            effort = json.loads(final.read_text()).get("eval/effort") if final.is_file() else None
            if effort is not None:
                values.append((float(effort), run.final_return))
        if values:
            efforts, returns = np.array(values).T
            rows.append(dict(env_id=env_id, algo=algo, seeds=len(values), effort_mean=float(efforts.mean()),
                             effort_std=float(efforts.std()), return_mean=float(returns.mean())))  # fmt: skip
    return rows


def effort(args) -> int:
    rows = effort_rows(finished_runs(args.runs_dir))
    if not rows:
        sys.exit("analysis.py: error: no run with eval/effort in its final_eval.json under " + " ".join(args.runs_dir))
    lines = ["| env | algo | seeds | effort (mean summed activation per step) | final return |", "|---|---|---|---|---|"]
    lines += [f"| {r['env_id']} | {r['algo']} | {r['seeds']} | {r['effort_mean']:.3f} ± {r['effort_std']:.3f} | "
              f"{r['return_mean']:.1f} |" for r in rows]  # fmt: skip
    write_outputs(args.out, args.name, rows, lines)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the flow's Q gain and superiority ratio


FLOW_TAGS = ("flow/q_gain", "flow/superiority_ratio")


def flow(args) -> int:
    runs = [r for r in finished_runs(args.runs_dir) if r.algo == "qflex"]
    series: dict[str, dict[str, list]] = {}
    for run in runs:
        scalars, _ = plot.load_scalars(run.path)
        for tag in FLOW_TAGS:
            if scalars.get(tag):
                series.setdefault(run.env_id, {}).setdefault(tag, []).append(np.array([(s, v) for s, v, _ in scalars[tag]]))
    if not series:
        sys.exit("analysis.py: error: no qflex run with flow/* scalars under " + " ".join(args.runs_dir))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted(series, key=plot.natural_key)
    fig, axes = plt.subplots(1, len(FLOW_TAGS), figsize=(5 * len(FLOW_TAGS), 3.5))
    rows = []
    for env_id in envs:
        for ax, tag in zip(axes, FLOW_TAGS, strict=True):
            curves = series[env_id].get(tag, [])
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = curves[0][:length, 0]
            values = np.stack([c[:length, 1] for c in curves])
            ax.plot(steps, values.mean(0), label=f"{env_id} (n={len(curves)})")
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
            last = values[:, -max(1, length // 5) :].mean(1)  # the last fifth of training, per seed
            rows.append(dict(env_id=env_id, tag=tag, seeds=len(curves), last_fifth_mean=float(last.mean()),
                             last_fifth_std=float(last.std()), first=float(values[:, 0].mean())))  # fmt: skip
    for ax, tag in zip(axes, FLOW_TAGS, strict=True):
        ax.set_title(f"{tag} (mean, min-max over seeds)", fontsize=9)
        ax.set_xlabel("env transitions")
        ax.legend(fontsize=7)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].axhline(0.0, color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name}.png", dpi=130)
    plt.close(fig)
    lines = ["| env | diagnostic | seeds | first logged | mean over the last fifth of training |", "|---|---|---|---|---|"]
    lines += [f"| {r['env_id']} | {r['tag']} | {r['seeds']} | {r['first']:.3f} | {r['last_fifth_mean']:.3f} ± "
              f"{r['last_fifth_std']:.3f} |" for r in rows]  # fmt: skip
    write_outputs(args.out, args.name, rows, lines + ["", f"Figure: {args.name}.png"])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# claim 3: exploration correlation


def load_algo(algo: str):
    """algos/<algo>.py as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"{algo}_analysis", REPO / "algos" / f"{algo}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def exploration_sampler(algo: str, checkpoint: dict, obs_dim: int, act_dim: int, action_scale):
    """sample(obs [N, obs_dim], noise [N, act_dim]) -> exploratory actions in [-1, 1], as the run acts in training."""
    from torch import nn

    module, args = load_algo(algo), checkpoint["args"]
    if algo == "sac":
        paper = args["preset"] == "paper"
        log_det = ("cleanrl" if paper else "exact") if args["tanh_correction"] else "none"
        actor = module.Actor(obs_dim, act_dim, separate_heads=paper, log_det=log_det, action_scale=action_scale,
                             hidden_dim=args["hidden_dim"], num_layers=args["num_layers"],
                             activation=nn.ReLU if paper else nn.GELU, jax_init=not paper)  # fmt: skip
        actor.load_state_dict(checkpoint["actor"])
        actor.eval()
        return lambda obs, noise: actor.sample(obs, noise)[0]
    if algo == "qflex":
        kwargs = dict(hidden_dim=args["hidden_dim"], num_layers=args["num_layers"])
        actor, velocity = module.Actor(obs_dim, act_dim, **kwargs), module.VelocityField(obs_dim, act_dim, **kwargs)
        actor.load_state_dict(checkpoint["actor"])
        velocity.load_state_dict(checkpoint["velocity"])
        actor.eval()
        velocity.eval()

        def sample(obs, noise):
            actions = actor.sample(obs, noise)
            if args["flow"]:
                actions = module.euler_sample(velocity, obs, actions, args["euler_steps"])
            return actions.clamp(-1.0, 1.0)  # what the env applies

        return sample
    raise SystemExit(f"analysis.py: error: correlation supports qflex and sac, not {algo}")


def actuator_groups(env) -> tuple[list[str], list[str]]:
    """(actuator names, group of each actuator): ChainReach by joint (flexor + extensor); MuJoCo muscle models by the
    hinge joint with the largest moment arm at the current pose (call after a reset)."""
    base = env.unwrapped
    if hasattr(base, "muscle_activations") and hasattr(base, "num_links"):
        links = base.num_links
        names = [f"flex{j}" for j in range(links)] + [f"ext{j}" for j in range(links)]
        return names, [f"joint {j}" for j in range(links)] * 2
    import mujoco

    model, data = base.model, base.data
    mujoco.mj_forward(model, data)
    moment = np.zeros((model.nu, model.nv))
    for i in range(model.nu):  # actuator_moment is stored sparse, row i at moment_rowadr[i]
        start, count = data.moment_rowadr[i], data.moment_rownnz[i]
        moment[i, data.moment_colind[start : start + count]] = data.actuator_moment[start : start + count]
    hinge = np.array([model.jnt_type[model.dof_jntid[dof]] == mujoco.mjtJoint.mjJNT_HINGE for dof in range(model.nv)])
    moment[:, ~hinge] = 0.0  # slide dofs (knee translations) are in metres, not comparable
    names = [model.actuator(i).name for i in range(model.nu)]
    groups = [model.joint(int(model.dof_jntid[int(np.abs(row).argmax())])).name for row in moment]
    return names, groups


def correlation_matrix(actions: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of actions [N, d]; NaN for a column with no variance."""
    centred = actions - actions.mean(0)
    std = centred.std(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / len(actions) / np.outer(std, std)
    constant = std == 0
    corr[constant, :] = np.nan
    corr[:, constant] = np.nan
    return corr


def within_across(corr: np.ndarray, groups: list[str]) -> tuple[float, float]:
    """Mean |corr| over actuator pairs i < j in the same group, and over pairs in different groups (NaNs skipped)."""
    labels = np.array(groups)
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), k=1)
    magnitude = np.abs(corr)
    return float(np.nanmean(magnitude[same & upper])), float(np.nanmean(magnitude[~same & upper]))


def correlation(args) -> int:
    import torch

    import envs as env_layer

    runs = [r for r in finished_runs(args.runs_dir) if r.env_id == args.env_id and r.algo in args.algos]
    if not runs:
        sys.exit(f"analysis.py: error: no {'/'.join(args.algos)} runs on {args.env_id} under " + " ".join(args.runs_dir))
    env = env_layer.make_env(args.env_id, 0, 0, False, "analysis")()
    states = []
    for k in range(args.states):
        obs, _ = env.reset(seed=10_000 + k)  # the evaluation resets, the same states for every algorithm
        states.append(obs)
    names, groups = actuator_groups(env)
    order = sorted(range(len(names)), key=lambda i: (groups[i], i))
    obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    half_width = env_layer.action_half_width(env)
    results, rows = {}, []
    for algo in args.algos:
        matrices = []
        for run in (r for r in runs if r.algo == algo):
            path = run.path.parent.parent / "models" / run.path.name / "checkpoint.pt"
            if not path.is_file():
                print(f"skipping {run.path.name}: no checkpoint at {path}")
                continue
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            sample = exploration_sampler(checkpoint["algo"], checkpoint, obs_dim, act_dim, half_width)  # the script
            generator = torch.Generator().manual_seed(args.seed)
            for obs in states:
                batch = torch.as_tensor(np.repeat(obs[None], args.samples, 0))
                with torch.no_grad():
                    actions = sample(batch, torch.randn((args.samples, act_dim), generator=generator)).numpy()
                matrices.append(correlation_matrix(actions.astype(np.float64)))
        if not matrices:
            continue
        with warnings.catch_warnings():  # an actuator pair with no variance in every matrix stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_corr = np.nanmean(np.stack(matrices), axis=0)
        within, across = within_across(mean_corr, groups)
        per_state = [within_across(m, groups) for m in matrices]
        results[algo] = mean_corr
        rows.append(dict(algo=algo, env_id=args.env_id, matrices=len(matrices), within=within, across=across,
                         within_std=float(np.std([w for w, _ in per_state])),
                         across_std=float(np.std([a for _, a in per_state]))))  # fmt: skip
    if not results:
        sys.exit("analysis.py: error: no checkpoints found (runs need --save-model)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    for ax, (algo, corr) in zip(axes[0], results.items(), strict=True):
        image = ax.imshow(corr[np.ix_(order, order)], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
        bounds = [i for i in range(1, len(order)) if groups[order[i]] != groups[order[i - 1]]]
        for b in bounds:
            ax.axhline(b - 0.5, color="k", lw=0.4)
            ax.axvline(b - 0.5, color="k", lw=0.4)
        if len(order) <= 32:  # names are readable up to a few dozen actuators
            ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=6)
            ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        row = next(r for r in rows if r["algo"] == algo)
        ax.set_title(f"{algo}: within {row['within']:.2f}, across {row['across']:.2f} (mean |corr|)", fontsize=9)
        ax.set_xlabel("actuators grouped by joint")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{args.env_id}: correlation of exploratory actions ({args.samples} samples x {args.states} states)",
                 fontsize=10)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name}.png", dpi=130)
    plt.close(fig)
    lines = [f"{args.env_id}: {len(set(groups))} groups of {len(names)} actuators; {args.samples} exploratory actions at "
             f"each of {args.states} evaluation-reset states per run.", "",
             "| algo | matrices (runs x states) | mean abs corr within groups | across groups |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['algo']} | {r['matrices']} | {r['within']:.3f} (± {r['within_std']:.3f}) | {r['across']:.3f} "
              f"(± {r['across_std']:.3f}) |" for r in rows]  # fmt: skip
    lines += ["", "± : std over the per-state matrices.", f"Figure: {args.name}.png"]
    write_outputs(args.out, args.name, rows, lines)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("dimension", "score vs |A| on ChainReach"), ("ablation", "Qflex score vs N, eta, --no-flow"),
                            ("effort", "eval/effort per algorithm"),
                            ("flow", "Qflex flow diagnostics along training"),
                            ("correlation", "exploration correlation from checkpoints")):  # fmt: skip
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--runs-dir", nargs="+", default=["runs"], help="sweep or runs folders (default runs)")
        sub.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results)")
        sub.add_argument("--name", default=name, help=f"output file stem (default {name})")
        sub.add_argument("--seed", type=int, default=0, help="seed of the bootstrap / the exploration noise")
        if name in ("dimension", "ablation"):
            sub.add_argument("--reps", type=int, default=10_000, help="bootstrap reps")
        if name == "ablation":
            sub.add_argument("--env-id", default="ChainReach64-v0", help="the ablation's task (default ChainReach64-v0)")
        if name == "correlation":
            sub.add_argument("--env-id", required=True)
            sub.add_argument("--algos", nargs="+", default=["qflex", "sac"], help="exp names of qflex or sac runs")
            sub.add_argument("--states", type=int, default=8, help="fixed states (evaluation resets)")
            sub.add_argument("--samples", type=int, default=1000, help="exploratory actions per state")
    args = parser.parse_args(argv)
    if getattr(args, "samples", 2) < 2 or getattr(args, "states", 1) < 1:
        parser.error("--samples must be >= 2 and --states >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    commands = dict(dimension=dimension, ablation=ablation, effort=effort, flow=flow, correlation=correlation)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
