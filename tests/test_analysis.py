"""benchmark/analysis.py: its statistics against their definitions, the actuator grouping on ChainReach and MyoLeg,
the exploration samplers against the algorithms' own acting code, and one end-to-end run of every command."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import load_script, run_algo, run_script

analysis = load_script("benchmark/analysis.py", "analysis_under_test")


def test_correlation_matrix_is_pearson_and_marks_constant_columns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    x[:, 1] = 0.6 * x[:, 0] + 0.8 * x[:, 1]  # corr(x0, x1) = 0.6 in expectation
    np.testing.assert_allclose(analysis.correlation_matrix(x), np.corrcoef(x.T), atol=1e-12)
    x[:, 2] = 1.0  # a saturated actuator has no correlation, not a fake 0
    corr = analysis.correlation_matrix(x)
    assert np.isnan(corr[2]).all() and np.isnan(corr[:, 2]).all() and not np.isnan(corr[:2, :2]).any()


def test_within_and_across_average_the_right_pairs():
    corr = np.array([[1.0, 0.5, -0.2, 0.1], [0.5, 1.0, 0.3, np.nan], [-0.2, 0.3, 1.0, -0.9], [0.1, np.nan, -0.9, 1.0]])
    within, across = analysis.within_across(corr, ["a", "a", "b", "b"])
    assert within == pytest.approx((0.5 + 0.9) / 2)  # pairs (0,1) and (2,3); the diagonal never counts
    assert across == pytest.approx((0.2 + 0.1 + 0.3) / 3)  # (0,2), (0,3), (1,2); the NaN pair (1,3) is skipped


def test_actuator_groups_chain_reach_pairs_and_myoleg_joints():
    import envs

    env = envs.make_env("ChainReach4-v0", 0, 0, False, "t")()
    env.reset(seed=0)
    names, groups = analysis.actuator_groups(env)
    assert names[1] == "flex1" and names[5] == "ext1" and groups[1] == groups[5] == "joint 1" and len(set(groups)) == 4
    env = envs.make_env("myoLegWalk-v0", 0, 0, False, "t")()
    env.reset(seed=0)
    names, groups = analysis.actuator_groups(env)
    by_name = dict(zip(names, groups, strict=True))
    assert len(names) == 80
    assert by_name["soleus_r"] == "ankle_angle_r" and by_name["soleus_l"] == "ankle_angle_l"  # plantarflexors
    assert by_name["vasmed_r"] == "knee_angle_r"  # a knee extensor, not a knee translation dof
    assert all("translation" not in g for g in groups)
    env.close()


def test_dimension_rows_normalise_and_count_seeds(tmp_path):
    runs = [analysis.plot.Run(algo="sac", env_id="ChainReach4-v0", seed=s, path=tmp_path, final_return=r, wall_time=60.0)
            for s, r in ((1, -102.8), (2, -51.4))]  # fmt: skip
    (row,) = analysis.dimension_rows(runs, reps=200, seed=0)
    assert (row["actuators"], row["seeds"]) == (8, 2)
    assert row["score_mean"] == pytest.approx(0.25) and row["score_ci_low"] <= 0.25 <= row["score_ci_high"]
    assert row["wall_time_min"] == pytest.approx(1.0)


def test_ablation_rows_group_runs_by_their_config_not_their_exp_name(tmp_path):
    def run(name, seed, final_return, env_id="ChainReach4-v0", **config):
        path = tmp_path / f"{name}_{seed}"
        path.mkdir()
        config = dict(dict(flow=True, flow_steps=20, flow_step_size=0.01), **config)
        (path / "config.json").write_text(json.dumps(config))
        return analysis.plot.Run(algo=name, env_id=env_id, seed=seed, path=path, final_return=final_return, wall_time=120.0)

    runs = [run("qflex", 1, -102.8), run("qflex_default", 2, -51.4), run("qflex_N5", 1, 0.0, flow_steps=5),
            run("qflex_noflow", 1, -102.8, flow=False), run("qflex_eta0.03", 1, -51.4, flow_step_size=0.03),
            analysis.plot.Run(algo="sac", env_id="ChainReach4-v0", seed=1, path=tmp_path, final_return=0.0),
            run("other_task", 1, 0.0, env_id="ChainReach16-v0")]  # fmt: skip
    rows = analysis.ablation_rows(runs, "ChainReach4-v0", reps=200, seed=0)
    assert [r["setting"] for r in rows] == ["N = 5, eta = 0.01", "N = 20, eta = 0.01", "N = 20, eta = 0.03",
                                            "no flow (source policy)"]  # fmt: skip
    default = rows[1]
    assert (default["seeds"], default["exp_names"]) == (2, "qflex qflex_default")
    assert default["score_mean"] == pytest.approx(0.25) and default["wall_time_min"] == pytest.approx(2.0)
    assert rows[0]["score_mean"] == pytest.approx(1.0) and rows[3]["score_mean"] == pytest.approx(0.0)


def test_qflex_sampler_is_the_source_sample_then_the_euler_flow():
    qflex = load_script("algos/qflex.py", "qflex_for_analysis")
    torch.manual_seed(0)
    actor, velocity = qflex.Actor(6, 4, hidden_dim=8, num_layers=2), qflex.VelocityField(6, 4, hidden_dim=8, num_layers=2)
    args = dict(hidden_dim=8, num_layers=2, flow=True, euler_steps=3)
    checkpoint = dict(args=args, actor=actor.state_dict(), velocity=velocity.state_dict())
    obs, noise = torch.randn(5, 6), torch.randn(5, 4)
    actor.eval(), velocity.eval()
    with torch.no_grad():
        expected = qflex.euler_sample(velocity, obs, actor.sample(obs, noise), 3).clamp(-1, 1)
        np.testing.assert_allclose(analysis.exploration_sampler("qflex", checkpoint, 6, 4, None)(obs, noise), expected)
        checkpoint["args"] = dict(args, flow=False)
        source = analysis.exploration_sampler("qflex", checkpoint, 6, 4, None)(obs, noise)
        np.testing.assert_allclose(source, actor.sample(obs, noise))
        assert not torch.allclose(source, expected)


def test_every_command_end_to_end(tmp_path):
    flags = ["--env-id", "ChainReach4-v0", "--num-envs", "2", "--learning-starts", "200", "--total-timesteps", "400",
             "--batch-size", "32", "--hidden-dim", "16", "--eval-freq", "200", "--eval-episodes", "1",
             "--final-eval-episodes", "2", "--save-model", "--log-every", "5"]  # fmt: skip
    run_algo("sac", *flags, cwd=tmp_path)
    run_algo("qflex", *flags, "--flow-steps", "2", "--euler-steps", "2", cwd=tmp_path)
    out = tmp_path / "out"
    for command in (
        ["dimension", "--reps", "100"],
        ["ablation", "--env-id", "ChainReach4-v0", "--reps", "100"],
        ["effort"],
        ["flow"],
        ["correlation", "--env-id", "ChainReach4-v0", "--states", "2", "--samples", "200"],
    ):
        run_script("benchmark/analysis.py", *command, "--runs-dir", str(tmp_path), "--out", str(out), cwd=tmp_path)
    for name in ("dimension", "ablation", "flow", "correlation"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| N = 2, eta = 0.01 | 1 |" in (out / "ablation.md").read_text()
    effort_table = (out / "effort.md").read_text()
    assert "| ChainReach4-v0 | qflex | 1 |" in effort_table and "| ChainReach4-v0 | sac | 1 |" in effort_table
    correlation = (out / "correlation.csv").read_text().splitlines()
    assert correlation[0].startswith("algo,env_id,matrices,within,across") and len(correlation) == 3
    (final,) = tmp_path.glob("runs/*sac*/final_eval.json")
    assert "eval/effort" in json.loads(final.read_text())
    missing = run_script("benchmark/analysis.py", "correlation", "--env-id", "ChainReach16-v0", "--runs-dir", str(tmp_path),
                         cwd=tmp_path, check=False)  # fmt: skip
    assert missing.returncode != 0 and missing.stdout.strip().startswith("analysis.py: error: no qflex/sac runs")
