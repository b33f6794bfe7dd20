"""Tests for algos/qflex.py: Proposition 1 and the sampler/loss maths (qflex.md §8), BatchRenorm (§2.1), and runs.

The pure functions are imported from the script itself (it is not a package module, so it is loaded by path).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_one_line_error, load_script, read_scalars, run_algo, run_dirs

qflex = load_script("algos/qflex.py")

D = 6  # action dimension of the analytic tests
ETA = 0.01
N_STEPS = 20


def concave_critic(h: torch.Tensor, scale: float = 1.0):
    """Q(s, a) = scale * (-1/2 (a - c(s))^T diag(h) (a - c(s)) + q0(s)), with c(s) partly outside [-1, 1]^d."""

    def centre(obs):
        return 1.5 * torch.tanh(obs[:, :D]) + 0.5 * obs[:, D : 2 * D]

    def q_fn(obs, actions):
        diff = actions - centre(obs)
        return scale * (-0.5 * (diff * diff * h).sum(-1) + obs[:, 0] ** 2)

    return q_fn, centre


@pytest.fixture
def quadratic():
    generator = torch.Generator().manual_seed(0)
    h = torch.linspace(0.5, 4.0, D, dtype=torch.float64)  # eta <= 2 / h_max: every step is an ascent step
    obs = torch.randn(64, 2 * D, generator=generator, dtype=torch.float64)
    a0 = torch.rand(64, D, generator=generator, dtype=torch.float64) * 2 - 1
    q_fn, centre = concave_critic(h)
    return h, obs, a0, q_fn, centre


def test_flow_steps_never_decrease_q_and_match_closed_form(quadratic):
    h, obs, a0, q_fn, centre = quadratic
    values = [q_fn(obs, a0)]
    x = a0
    for _ in range(N_STEPS):
        x = qflex.q_guided_flow(q_fn, obs, x, 1, ETA)
        values.append(q_fn(obs, x))
        assert (values[-1] >= values[-2]).all()  # pathwise monotone (descent lemma, eta <= 2 / L)
        assert values[-1].mean() >= values[-2].mean()
    assert (values[-1] > values[0]).all() and values[-1].mean() > values[0].mean()
    # the N-step call equals N single steps, and the truncation never binds here: x_N - c = (I - eta H)^N (a0 - c)
    a1 = qflex.q_guided_flow(q_fn, obs, a0, N_STEPS, ETA)
    torch.testing.assert_close(a1, x)
    c = centre(obs)
    torch.testing.assert_close(a1 - c, (1 - ETA * h) ** N_STEPS * (a0 - c), rtol=1e-10, atol=1e-12)
    assert not a1.requires_grad


def test_small_steps_follow_the_continuous_flow(quadratic):
    """Prop. 1, continuous form: with eta -> 0, N eta = 1, the iterates approach a(1) = c + exp(-H)(a0 - c)."""
    h, obs, a0, q_fn, centre = quadratic
    a1 = qflex.q_guided_flow(q_fn, obs, a0, 500, 1.0 / 500)
    c = centre(obs)
    exact = c + torch.exp(-h) * (a0 - c)
    assert (a1 - exact).abs().max() < 1e-2
    gain = q_fn(obs, exact) - q_fn(obs, a0)  # F(1) = 1/2 sum_i h_i (1 - exp(-2 h_i)) (a0_i - c_i)^2 per sample
    torch.testing.assert_close(gain, 0.5 * (h * (1 - torch.exp(-2 * h)) * (a0 - c) ** 2).sum(-1))


def test_truncation_caps_every_step_at_the_box_diameter(quadratic):
    h, obs, a0, _, _ = quadratic
    huge_q, _ = concave_critic(h, scale=1e6)  # ||g|| >> 2 sqrt(d) / eta, so every step is truncated
    cap = 2 * math.sqrt(D)
    x = a0
    for _ in range(N_STEPS):
        x_next = qflex.q_guided_flow(huge_q, obs, x, 1, ETA)
        move = (x_next - x).norm(dim=-1)
        assert (move <= cap).all()
        assert (move > 0.999 * cap).all()  # near equality: the cap, not eta, sets the step
        x = x_next
    assert torch.isfinite(x).all()


def test_fixed_point_identity_and_box_projection(quadratic):
    h, obs, a0, q_fn, centre = quadratic
    c = centre(obs)
    torch.testing.assert_close(qflex.q_guided_flow(q_fn, obs, c, N_STEPS, ETA), c, rtol=0, atol=0)
    column_q = qflex.q_guided_flow(lambda o, a: q_fn(o, a)[:, None], obs, a0, N_STEPS, ETA)  # [B, 1] critics work too
    torch.testing.assert_close(column_q, qflex.q_guided_flow(q_fn, obs, a0, N_STEPS, ETA))
    same, grad_norm = qflex.q_guided_flow(q_fn, obs, a0, 0, ETA, return_grad_norm=True)
    assert torch.equal(same, a0) and torch.isnan(grad_norm)
    # c(s) lies outside the box for some states: the default leaves the box, the ablation flag projects
    free = qflex.q_guided_flow(q_fn, obs, a0, 200, 0.1)
    boxed = qflex.q_guided_flow(q_fn, obs, a0, 200, 0.1, clip_to_box=True)
    assert free.abs().max() > 1 and boxed.abs().max() <= 1


def test_targets_are_superior_and_the_straight_path_stays_above_the_source(quadratic):
    h, obs, a0, q_fn, _ = quadratic
    a1 = qflex.q_guided_flow(q_fn, obs, a0, N_STEPS, ETA)
    assert qflex.flow_superiority_ratio(q_fn, obs, a0, a1).item() == 1.0
    for t in torch.linspace(0, 1, 11, dtype=torch.float64):
        assert (q_fn(obs, (1 - t) * a0 + t * a1) >= q_fn(obs, a0) - 1e-12).all()


def test_euler_sampler_is_exact_for_constant_velocity_and_clips_at_k():
    generator = torch.Generator().manual_seed(1)
    obs, a0 = torch.randn(16, 3, generator=generator), torch.randn(16, D, generator=generator)
    velocity = torch.empty(16, D).uniform_(-20, 20, generator=generator)  # ||v||_inf <= K
    times = []

    def oracle(obs, actions, t):
        times.append(t[0, 0].item())
        assert t.shape == (len(actions), 1)
        return velocity

    torch.testing.assert_close(qflex.euler_sample(oracle, obs, a0, 20), a0 + velocity)
    assert times == pytest.approx([k / 20 for k in range(1, 21)])  # t_k = k / K: end of each interval
    fast = torch.full((16, D), 1e3)
    fast[:, 0] = -1e3
    out = qflex.euler_sample(lambda o, a, t: fast, obs, a0, 20)
    torch.testing.assert_close(out - a0, 20.0 * torch.sign(fast))  # clipped at +-K: one unit per step


def test_flow_matching_loss_is_zero_for_the_straight_line_velocity():
    generator = torch.Generator().manual_seed(2)
    obs, a0, a1 = (torch.randn(32, k, generator=generator) for k in (5, D, D))
    t = torch.rand(32, generator=generator)
    assert qflex.flow_matching_loss(lambda o, a, t: a1 - a0, obs, a0, a1, t).item() == pytest.approx(0.0, abs=1e-12)
    zero = qflex.flow_matching_loss(lambda o, a, t: torch.zeros_like(a), obs, a0, a1, t)
    torch.testing.assert_close(zero, (a1 - a0).pow(2).mean())  # a mean over B x d, not a sum over d

    # the path point the network sees: a_t = (1 - t) a0 + t a1 with t as a column
    def check_path(o, a_t, tt):
        torch.testing.assert_close(a_t, (1 - t[:, None]) * a0 + t[:, None] * a1)
        return a1 - a0

    qflex.flow_matching_loss(check_path, obs, a0, a1, t)


def trained_critic(obs_dim=7, act_dim=D, calls=12):
    torch.manual_seed(3)
    critic = qflex.QNetwork(obs_dim, act_dim, 32, 3)
    critic.train()
    for _ in range(calls):  # past the BatchRenorm warm-up, so the running statistics are non-trivial
        critic(torch.randn(64, obs_dim) * 2 + 1, torch.rand(64, act_dim) * 2 - 1)
    return critic.requires_grad_(False)


def test_eval_mode_gradients_are_per_sample():
    critic = trained_critic().eval()
    obs, a0 = torch.randn(16, 7), torch.rand(16, D) * 2 - 1
    batched = qflex.q_guided_flow(critic, obs, a0, 3, 0.1)
    rows = torch.cat([qflex.q_guided_flow(critic, obs[i : i + 1], a0[i : i + 1], 3, 0.1) for i in range(16)])
    torch.testing.assert_close(batched, rows)
    # Why eval mode: in train mode the batch sum of a batch-normalised output does not depend on the input at all,
    # so the "per-sample" gradient of the sum vanishes and the ascent would not move.
    critic.train()
    torch.testing.assert_close(qflex.q_guided_flow(critic, obs, a0, 1, 0.1), a0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- BatchRenorm


def brn_reference(x, running_mean, running_var, eps=1e-5, r_max=3.0, d_max=5.0):
    """§2.1 train-mode output with gamma = 1, beta = 0, written from the formulas."""
    mu = x.mean(0)
    var = (x.pow(2).mean(0) - mu.pow(2)).clamp_min(eps)
    r = (torch.sqrt(var + eps) / torch.sqrt(running_var + eps)).clamp(1 / r_max, r_max)
    d = ((mu - running_mean) / torch.sqrt(running_var + eps)).clamp(-d_max, d_max)
    mean_tilde = mu - d * torch.sqrt(var) / r
    return (x - mean_tilde) / torch.sqrt(var / r**2 + eps), r, d


def test_batchrenorm_warmup_is_batchnorm_and_first_ema_is_the_batch():
    torch.manual_seed(4)
    # float64: E[x^2] - E[x]^2 (the reference's variance) loses digits in float32 when |mean| >> std
    brn = qflex.BatchRenorm(5).double().train()
    x = (torch.randn(128, 5) * torch.tensor([0.1, 1, 3, 10, 100]) + torch.tensor([5.0, -2, 0, 1, 50])).double()
    y = brn(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True, eps=1e-5))
    torch.testing.assert_close(brn.running_mean, x.mean(0))
    torch.testing.assert_close(brn.running_var, x.var(0, unbiased=False))
    assert brn.num_batches.item() == 1
    means = [x.mean(0)]
    for call in range(2, qflex.BRN_WARMUP + 1):  # calls 2..W are still plain batch norm, whatever the drift
        x = torch.randn(128, 5, dtype=torch.float64) * (call**2) + 10 * call
        means.append(x.mean(0))
        torch.testing.assert_close(brn(x), F.batch_norm(x, None, None, training=True, eps=1e-5))
    # zero-debiased EMA: hidden h = sum_k (1 - rho) rho^(n-k) mu_k, running value h / (1 - rho^n)
    n, rho = qflex.BRN_WARMUP, qflex.BRN_MOMENTUM
    hidden = sum((1 - rho) * rho ** (n - k) * mu for k, mu in enumerate(means, start=1))
    torch.testing.assert_close(brn.running_mean, hidden / (1 - rho**n))
    assert brn.num_batches.item() == n


def test_batchrenorm_r_and_d_follow_the_formulas_with_clipping():
    torch.manual_seed(5)
    brn = qflex.BatchRenorm(3).train()
    for _ in range(qflex.BRN_WARMUP):
        brn(torch.randn(256, 3))
    # feature 0: far shift and wide spread (r and d clipped); 1: mild (unclipped); 2: narrow (r clipped below)
    x = torch.randn(256, 3) * torch.tensor([10.0, 1.2, 0.05]) + torch.tensor([20.0, 0.3, 0.0])
    x.requires_grad_(True)
    m, v = brn.running_mean.clone(), brn.running_var.clone()
    expected, r, d = brn_reference(x.detach(), m, v)
    assert r[0] == 3.0 and d[0] == 5.0 and 1 / 3 < r[1] < 3 and -5 < d[1] < 5 and r[2] == pytest.approx(1 / 3)
    y = brn(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # no gradient through r and d: compare with the formula where r and d are constants
    weights = torch.randn(256, 3)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    mu = x_ref.mean(0)
    var = (x_ref.pow(2).mean(0) - mu.pow(2)).clamp_min(1e-5)
    y_ref = (x_ref - (mu - d * torch.sqrt(var) / r)) / torch.sqrt(var / r**2 + 1e-5)
    (grad_ref,) = torch.autograd.grad((y_ref * weights).sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)
    # the EMA then moves by (1 - rho) of the way, debiased by 1 - rho^(W + 1)
    n = qflex.BRN_WARMUP + 1
    rho = qflex.BRN_MOMENTUM
    hidden_mean = m * (1 - rho ** (n - 1))  # the previous debiased value times its debias factor
    torch.testing.assert_close(
        brn.running_mean, (rho * hidden_mean + (1 - rho) * x.detach().mean(0)) / (1 - rho**n), rtol=1e-5, atol=1e-5
    )


def test_batchrenorm_eval_uses_running_stats_and_changes_nothing():
    torch.manual_seed(6)
    brn = qflex.BatchRenorm(4)
    with torch.no_grad():
        brn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        brn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 3.0]))
    brn.train()
    for _ in range(3):
        brn(torch.randn(64, 4) * 3 + 1)
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    brn.eval()
    x = torch.randn(32, 4)
    y = brn(x)
    expected = brn.weight * (x - brn.running_mean) / torch.sqrt(brn.running_var + 1e-5) + brn.bias
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(brn(x[:1]), y[:1])  # rows are independent
    for key, value in brn.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------------------------------- full runs

TINY = [
    "--num-envs",
    "2",
    "--batch-size",
    "32",
    "--learning-starts",
    "64",
    "--buffer-size",
    "10000",
    "--log-every",
    "10",
    "--eval-episodes",
    "1",
    "--final-eval-episodes",
    "1",
    "--hidden-dim",
    "32",
    # short chains keep the smoke runs cheap; the default N = K = 20 is the same code path, tested in-process above
    "--flow-steps",
    "4",
    "--euler-steps",
    "4",
]
FLOW_KEYS = {
    "flow/superiority_ratio",
    "flow/q_gain",
    "flow/displacement",
    "flow/displacement_max",
    "flow/grad_norm",
    "flow/source_log_std",
    "losses/flow_loss",
    "charts/action_abs_max",
}
SHARED_KEYS = {"losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values", "losses/qf2_values"}


def test_smoke_myolegwalk(tmp_path):
    run_algo("qflex", "--env-id", "myoLegWalk-v0", "--total-timesteps", "120", "--eval-freq", "0", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert FLOW_KEYS | SHARED_KEYS | {"losses/actor_loss", "eval/episodic_return"} <= set(scalars)
    assert not any(key.startswith("losses/alpha") for key in scalars)
    assert scalars["charts/updates"][-1][1] == 20  # (120 - 64) / 2 vector steps, rounded down to the log period
    assert all(math.isfinite(v) for key in FLOW_KEYS for _, v in scalars[key])
    assert all(0.0 <= v <= 1.0 for _, v in scalars["flow/superiority_ratio"])


def test_smoke_chainreach16_and_resume(tmp_path):
    flags = ["--env-id", "ChainReach16-v0", "--eval-freq", "200", "--save-model", "--save-buffer", *TINY]
    run_algo("qflex", *flags, "--total-timesteps", "200", cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    first = json.loads((run_dir / "final_eval.json").read_text())
    assert first["global_step"] == 200 and first["num_updates"] == (200 - 64) // 2 + 1
    checkpoint = tmp_path / "models" / run_dir.name / "checkpoint.pt"
    # override flags are taken from the command line, defaults included (sac.py's RESUME_OVERRIDES), so repeat them
    proc = run_algo("qflex", "--resume", str(checkpoint), "--total-timesteps", "300", "--log-every", "10", cwd=tmp_path)
    assert run_dirs(tmp_path) == [run_dir], proc.stdout  # the resumed run writes into the same run directory
    second = json.loads((run_dir / "final_eval.json").read_text())
    # the buffer came back with the checkpoint, so updates resume at once: one per vector step, 50 more
    assert second["global_step"] == 300 and second["num_updates"] == first["num_updates"] + 50
    scalars = read_scalars(run_dir)
    assert FLOW_KEYS <= set(scalars)
    updates = scalars["charts/updates"]
    assert [u for _, u in updates] == sorted(u for _, u in updates) and updates[-1][1] == 110
    # step 0 (untrained policy), then the resumed run's final round; the first run's final round at 200 is purged
    assert [step for step, _ in scalars["eval/episodic_return"]] == [0, 300]


def test_no_flow_acts_with_source_actions(tmp_path):
    run_algo(
        "qflex", "--env-id", "ChainReach4-v0", "--no-flow", "--total-timesteps", "120", "--eval-freq", "0", *TINY, cwd=tmp_path
    )
    scalars = read_scalars(run_dirs(tmp_path)[0])
    assert "flow/superiority_ratio" not in scalars and "losses/flow_loss" not in scalars
    assert "flow/source_log_std" in scalars
    assert all(v <= 1.0 for _, v in scalars["charts/action_abs_max"])  # tanh samples stay in the box


def test_bad_arguments_fail_in_one_line(tmp_path):
    proc = run_algo("qflex", "--env-id", "ChainReach4-v0", "--tau", "0.005", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "--tau must be 1")
    assert proc.stdout.strip().count("\n") == 0


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found"):
        qflex.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"algo": "sac"}, tmp_path / "sac.pt")
    with pytest.raises(ValueError, match="is not a qflex.py checkpoint"):
        qflex.load_checkpoint(str(tmp_path / "sac.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        qflex.load_checkpoint(str(tmp_path / "junk.pt"))


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("flow_steps", -1, "--flow-steps must be >= 0"),
        ("euler_steps", 0, "--euler-steps must be positive"),
        ("flow_step_size", 0.0, "--flow-step-size must be positive"),
        ("flow_lr", -1.0, "--flow-lr must be positive"),
        ("batch_size", 10**7, "larger than --buffer-size"),
    ],
)
def test_validate_args(name, value, fragment):
    args = qflex.resolve_preset(qflex.Args(**{name: value}))
    with pytest.raises(ValueError, match=fragment):
        qflex.validate_args(args)
    qflex.validate_args(qflex.resolve_preset(qflex.Args()))  # the defaults are valid
    # `paper` is an alias of the official protocol: every resolved value but the name is the same
    paper, protocol = (vars(qflex.resolve_preset(qflex.Args(preset=p))) for p in ("paper", "qflex-protocol"))
    assert {k: v for k, v in paper.items() if k != "preset"} == {k: v for k, v in protocol.items() if k != "preset"}
    assert (protocol["num_envs"], protocol["learning_starts"], protocol["total_timesteps"]) == (80, 30_000, 20_000_000)


# Measured on the 2-core machine (seed 1, this exact command): the untrained policy (step-0 evaluation, same 10 episodes)
# scores -98.1 and the final evaluation -53.3 after 1200 updates (seeds 2 and 3 of the same settings: -47.6 and -70.4;
# random actions -99.5, a scripted reaching controller -9.9). gamma 0.9 and lr 1e-3 make the critic converge within the
# budget; N = K = 5 with eta = 0.04 keeps N * eta = 0.2 of the default while cutting the update cost.
LEARNING_FLAGS = ["--env-id", "ChainReach4-v0", "--seed", "1", "--num-envs", "1", "--total-timesteps", "1500",
                  "--learning-starts", "300", "--batch-size", "64", "--hidden-dim", "64", "--gamma", "0.9",
                  "--q-lr", "1e-3", "--policy-lr", "1e-3", "--flow-lr", "1e-3", "--flow-steps", "5", "--euler-steps", "5",
                  "--flow-step-size", "0.04", "--log-every", "300", "--eval-freq", "100000", "--eval-episodes", "10",
                  "--final-eval-episodes", "10"]  # fmt: skip


def test_learns_chain_reach4(tmp_path):
    run_algo("qflex", *LEARNING_FLAGS, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    final = json.loads((run_dir / "final_eval.json").read_text())
    initial = read_scalars(run_dir)["eval/episodic_return"][0]
    assert initial[0] == 0
    assert final["eval/episodic_return"] > -75.0, final
    assert final["eval/episodic_return"] > initial[1] + 20.0, (initial, final)
