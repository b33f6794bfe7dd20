"""algos/dacer.py: the maths against closed forms (noise schedules, reverse step, DSAC-T critic loss, GMM entropy
estimate), each update step on a tiny fixed problem, smoke runs with updates and alpha/GMM steps, checkpoint resume,
clean failures, and a learning test.

Order matters for `python tests/mutate.py dacer` (it runs this file with -x in a forked child per mutant): the fast
closed-form tests come first, the GMM pieces against small NumPy references next, and the slow comparisons with
scikit-learn last, so most mutants stop early. scikit-learn is imported only inside the tests that use it (its import
takes seconds), and the update-step tests use `PlainSGD` instead of torch.optim (the first torch.optim optimizer of a
process imports torch._dynamo, seconds again, in every child)."""

import copy
import inspect
import json
import math
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import (
    adam_steps,
    assert_one_line_error,
    final_eval,
    load_script,
    read_scalars,
    resume_to,
    run_algo,
    run_dirs,
    run_main_in_process,
)

dacer = load_script("algos/dacer.py")

# Mutants of tests/mutate.py that cannot change what the code computes, with the reason (read with ast.literal_eval).
EQUIVALENT_MUTANTS = {
    "trunc_normal_init_: nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std) "
    "nn.init.zeros_(laye... -> nn.init.zeros_(layer.bias) nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, "
    "b=2...": ("independent in-place inits of weight and bias; zeros_ draws no random numbers"),
    "DistributionalQNetwork.forward: -1 -> 1": "the head output is 2-D, so dim 1 is dim -1",
    "ChainNoise.split: True -> False": "strict= only checks lengths; x_T, z and xi always hold the same rows",
    "Actor.__init__: super().__init__() self.obs_dim, self.act_dim, self.time_dim, self.x_T_scale = obs_dim,... -> "
    "self.obs_dim, self.act_dim, self.time_dim, self.x_T_scale = (obs_dim, act_dim, time_dim...": (
        "plain ints and floats may be set on an nn.Module before Module.__init__, which leaves them alone"
    ),
    "Actor.draw_noise: True -> False": "strict= only checks lengths; every chunk holds exactly (x_T, z, xi)",
    "timestep_embedding: -1 -> 1": "the angles are 2-D, so dim 1 is dim -1",
    "distributional_critic_loss: mean + (y_sample - mean).clamp(-td_clip * std_ema, td_clip * std_ema) -> mean - "
    "(y_sample - mean).clamp(-td_clip * std_ema, td_clip * std_ema)": (
        "y_b is detached and enters only as (mu - y_b)^2, the same for mu + c and mu - c"
    ),
    "distributional_critic_loss: std.clamp(min=0.0) -> std": "sigma is a softplus output, never negative",
    "kmeans_plusplus_draws: 1 -> 2 #2": "NumPy's reshape treats any negative size as the one inferred dimension (-2 as -1)",
    "relocate_empty_clusters: -1 -> 1": "the tensor is 2-D here, so dim 1 is dim -1",
    "relocate_empty_clusters: -1 -> 1 #2": "the tensor is 2-D here, so dim 1 is dim -1",
    "relocate_empty_clusters: -1 -> 1 #3": "the tensor is 2-D here, so dim 1 is dim -1",
    "relocate_empty_clusters: rank[:, j].clamp(min=0) -> rank[:, j]": (
        "rank is -1 only for clusters before the first empty one, where move is False and the index picked (the last) "
        "changes nothing"
    ),
    "lloyd_step: not syncs_are_free(X.device) -> syncs_are_free(X.device)": (
        "the empty-cluster step is a no-op when no cluster is empty, so calling it always changes nothing"
    ),
    "lloyd_step: counts == 0 -> counts != 0": (
        "some cluster is always non-empty, so the empty-cluster step (a no-op without empty clusters) is always called"
    ),
    "lloyd_step: -1 -> 1 #3": "the tensor is 2-D here, so dim 1 is dim -1",
    "lloyd_step: -1 -> 1 #4": (
        "sqrt then square per coordinate instead of per center: the total squared shift is the same sum (up to rounding)"
    ),
    "lloyd_step: 1 -> 2 #6": (
        "sqrt then square per coordinate instead of per center: the total squared shift is the same sum (up to rounding)"
    ),
    "lloyd_step: -1 -> 1 #5": "the tensor is 2-D here, so dim 1 is dim -1",
    "kmeans_labels: 1 -> 2 #3": "[:, 0] keeps only the first of the sliced points, X[first], either way",
    "kmeans_labels: -1 -> 1 #2": "the tensor is 2-D here, so dim 1 is dim -1",
    "kmeans_labels: torch.searchsorted(closest.cumsum(-1), u * pot[:, None]).clamp(max=S - 1) -> "
    "torch.searchsorted(closest.cumsum(-1), u * pot[:, None])": (
        "the RandomState(42) draws are all <= 0.951, so u * pot never exceeds the last cumulative sum and no index reaches S"
    ),
    "kmeans_labels: -1 -> 1 #3": "the tensor is 2-D here, so dim 1 is dim -1",
    "kmeans_labels: S - 1 -> S + 1": (
        "the RandomState(42) draws are all <= 0.951, so u * pot never exceeds the last cumulative sum and no index reaches S"
    ),
    "kmeans_labels: -1 -> 1 #5": "the tensor is 2-D here, so dim 1 is dim -1",
    "kmeans_labels: pot, closest = pots[rows, best], dist[rows, best] centers.append(X[rows, candidates[row... -> "
    "centers.append(X[rows, candidates[rows, best]]) pot, closest = (pots[rows, best], dist[...": ("independent statements"),
    "kmeans_labels: -1 -> 1 #6": "the tensor is 2-D here, so dim 1 is dim -1",
    "kmeans_labels: -1 -> 1 #8": (
        "the first Lloyd step labels the first seed's own point 0 (distance 0, first of equal minima), so the labels "
        "are never all 1 and the first comparison fails either way"
    ),
    "kmeans_labels: 1 -> 2 #12": "labels are never -2 either, so the first comparison fails either way",
    "kmeans_labels.step: -1 -> 1": "the tensor is 2-D here, so dim 1 is dim -1",
    "gaussian_parameters: -2 -> 2": "the tensor is 4-D ([B, K, d, d]), so dim 2 is dim -2",
    "covariance_cholesky: -1 -> 1": "the tensor is 2-D here, so dim 1 is dim -1",
    "covariance_cholesky: -1 -> 1 #2": "the tensor is 2-D here, so dim 1 is dim -1",
    "gmm_log_resp: -2 -> 2": "the tensor is 4-D ([B, K, d, d]), so dim 2 is dim -2",
    "gmm_log_resp: -1 -> 1 #8": "the tensor is 2-D here, so dim 1 is dim -1",
    "fit_gmm: -math.inf -> math.inf": "the first change |L - (+-inf)| is inf either way, never below tol",
    "fit_gmm.step: -1 -> 1": "the tensor is 2-D here, so dim 1 is dim -1",
    "fit_gmm.step: -1 -> 1 #2": "the tensor is 2-D here, so dim 1 is dim -1",
    "gmm_entropy: -2 -> 2": "the tensor is 4-D ([B, K, d, d]), so dim 2 is dim -2",
    "gmm_entropy: -1 -> 1 #5": "the tensor is 2-D here, so dim 1 is dim -1",
    "gmm_entropy: -1 -> 1 #6": "the tensor is 2-D here, so dim 1 is dim -1",
    "critic_step: with torch.no_grad(): y_mean, y_sample = bootstrap_target( args.reward_scale * batch.re... -> "
    "y_mean, y_sample = bootstrap_target(args.reward_scale * batch.rewards, batch.terminatio...": (
        "the targets enter the loss only through detached terms ((y_mean - mu).detach(), the detached y_b), so no "
        "gradient reaches the target critics either way"
    ),
    "critic_step: qf2_loss = distributional_critic_loss(qf2_a_values, qf2_a_std, y_mean, y_sample, std_em... -> "
    "q_optimizer.zero_grad() qf2_loss = distributional_critic_loss(qf2_a_values, qf2_a_std, ...": (
        "no backward pass runs between the two statements"
    ),
    "actor_step: pi.detach() -> pi": "abs() >= 1.0 gives a bool tensor without a graph either way",
    "actor_step: actor_loss = -torch.minimum(qf1(batch.obs, pi)[0], qf2(batch.obs, pi)[0]).mean() actor_... -> "
    "actor_optimizer.zero_grad() actor_loss = -torch.minimum(qf1(batch.obs, pi)[0], qf2(batc...": (
        "no backward pass runs between the two statements"
    ),
    "actor_step: actor_optimizer.step() clipped_fraction = (pi.detach().abs() >= 1.0).float().mean() -> "
    "clipped_fraction = (pi.detach().abs() >= 1.0).float().mean() actor_optimizer.step()": (
        "pi is computed before the step; the step does not change it"
    ),
    "alpha_step: True -> False": "strict= only checks lengths, which are always equal here",
    "alpha_step: alpha_loss = -log_alpha * (target_entropy - entropy) a_optimizer.zero_grad() -> "
    "a_optimizer.zero_grad() alpha_loss = -log_alpha * (target_entropy - entropy)": (
        "no backward pass runs between the two statements"
    ),
    "polyak_update: True -> False": "strict= only checks lengths; online and target networks have the same parameters",
}

# Tiny but complete: warm-up ends well before the budget, so updates, alpha (GMM) steps, logging and evaluation run.
TINY = ["--total-timesteps", "300", "--learning-starts", "100", "--batch-size", "16", "--buffer-size", "5000",
        "--hidden-dim", "32", "--log-every", "10", "--eval-episodes", "1",
        "--final-eval-episodes", "1", "--alpha-every", "40", "--entropy-samples", "20", "--no-cuda"]  # fmt: skip
LOSS_KEYS = {"losses/qf1_values", "losses/qf2_values", "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss",
             "losses/actor_loss", "losses/alpha", "losses/alpha_loss", "charts/SPS", "dacer/entropy",
             "dacer/qf1_std_ema", "dacer/noise_std", "dacer/clipped_fraction", "dacer/policy_lr"}  # fmt: skip
EPS64 = float(np.finfo(np.float64).eps)
# Largest |batched - scikit-learn| entropy over the states of test_batched_gmm_matches_sklearn, measured (nats):
# d = 2: 9e-16 (full), 6e-11 (diag); d = 8: 9e-16, 2e-11; d = 80: 2e-11, 4e-11; at most 1e-10 on other unclipped
# samples. Rounding only: the k-means labels are identical and EM takes the same iterations (scikit-learn: 2 to 46);
# the batched products sum in another order, the covariances are weighted by sqrt(r) on both sides and log det comes
# from the Cholesky factor instead of slogdet. The tolerance leaves a margin of 100 over the largest.
GMM_ATOL = 1e-8


def tiny_agent(seed: int = 0):
    """A 3-step diffusion policy and four critics on obs_dim 4, |A| 2, and a batch of 8 transitions (the last one
    terminated). The target critics start as copies of the online ones."""
    torch.manual_seed(seed)
    kwargs = dict(hidden_dim=16, num_layers=2, activation=torch.nn.Mish)
    actor = dacer.Actor(4, 2, betas=dacer.linear_beta_schedule(3, 0.3), x_T_scale=0.5, time_dim=4, **kwargs)
    critics = [dacer.DistributionalQNetwork(4, 2, **kwargs) for _ in range(4)]
    critics[2].load_state_dict(critics[0].state_dict())
    critics[3].load_state_dict(critics[1].state_dict())
    batch = dacer.Batch(torch.randn(8, 4), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 4),
                        torch.tensor([0.0] * 7 + [1.0]))  # fmt: skip
    return actor, critics, batch


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Move every parameter by N(0, scale^2) noise, e.g. so a target critic differs from its online twin."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


class PlainSGD:
    """p <- p - lr * grad: the optimizer interface the step functions use (param_groups, zero_grad, step). Exact, so a
    test can predict the parameters after a step; and not torch.optim, whose first optimizer imports torch._dynamo
    (seconds in every forked mutant of tests/mutate.py)."""

    def __init__(self, params, lr: float):
        self.param_groups = [dict(params=list(params), lr=lr)]

    def zero_grad(self) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad)


def stale_gradients(params) -> None:
    """Gradients left over from an earlier step: a step function must zero them before its backward pass."""
    for p in params:
        p.grad = torch.full_like(p, 100.0)


def sgd_expectation(loss: torch.Tensor, params: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """The parameters after one plain SGD step on `loss`."""
    grads = torch.autograd.grad(loss, params)
    return [(p - lr * g).detach() for p, g in zip(params, grads, strict=True)]


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def close_to(module: torch.nn.Module, expected: list[torch.Tensor], atol: float = 1e-6) -> bool:
    return all(torch.allclose(p, q, rtol=1e-5, atol=atol) for p, q in zip(module.parameters(), expected, strict=True))


# ----------------------------------------------------------------------------------------------------------- maths
def test_vp_schedule_closed_form():
    betas = dacer.vp_beta_schedule(20)
    assert betas[0] == pytest.approx(0.01722, abs=1e-4) and betas[-1] == pytest.approx(0.3859, abs=1e-4)
    assert np.all(np.diff(betas) > 0)
    # prod (1 - beta_t) = exp(-b_min - (b_max - b_min) / 2) for the VP discretisation
    alphas_cumprod = dacer.diffusion_coefficients(betas)["alphas_cumprod"]
    assert alphas_cumprod[-1] == pytest.approx(math.exp(-0.1 - 9.9 / 2), rel=1e-9)
    assert alphas_cumprod[-1] == pytest.approx(0.0064, abs=1e-4)


@pytest.mark.parametrize("scale, last_alpha_bar", [(0.3, 0.0346), (0.8, 5.3e-6)])
def test_linear_schedule_closed_form(scale, last_alpha_bar):
    betas = dacer.linear_beta_schedule(20, scale)
    assert betas[0] == pytest.approx(scale * 1e-4) and betas[-1] == pytest.approx(scale * 0.999)
    assert np.allclose(np.diff(betas), scale * (0.999 - 1e-4) / 19)
    alphas_cumprod = dacer.diffusion_coefficients(betas)["alphas_cumprod"]
    assert alphas_cumprod[-1] == pytest.approx(last_alpha_bar, rel=0.02)


def test_diffusion_coefficient_tables():
    """Every table against its definition, written out step by step: alpha-bar_t = prod_{tau <= t} (1 - beta_tau),
    alpha-bar_{-1} = 1, and the DDPM posterior q(x_{t-1} | x_t, x_0) with mean c1 x_0 + c2 x_t and variance
    beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) (Ho et al. 2020, Eqs. 6-7), whose log is clipped at 1e-20 (the
    variance of the first step is exactly 0)."""
    betas = dacer.vp_beta_schedule(6)
    abar, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        abar.append(running)
    abar = np.array(abar)
    abar_prev = np.array([1.0, *abar[:-1]])
    variance = np.array([b * (1 - p) / (1 - a) for b, p, a in zip(betas, abar_prev, abar, strict=True)])
    expected = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=abar**0.5,
        sqrt_one_minus_alphas_cumprod=(1 - abar) ** 0.5,
        sqrt_recip_alphas_cumprod=abar**-0.5,
        sqrt_recipm1_alphas_cumprod=(1 / abar - 1) ** 0.5,
        posterior_variance=variance,
        posterior_log_variance_clipped=np.log([max(v, 1e-20) for v in variance]),
        posterior_mean_coef1=betas * abar_prev**0.5 / (1 - abar),
        posterior_mean_coef2=(1 - abar_prev) * (1 - betas) ** 0.5 / (1 - abar),
    )
    coef = dacer.diffusion_coefficients(betas)
    assert coef.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(coef[key], value, rtol=1e-12, atol=0, err_msg=key)
    assert variance[0] == 0.0 and coef["posterior_log_variance_clipped"][0] == pytest.approx(math.log(1e-20))


@pytest.mark.parametrize("schedule", ["vp", "linear"])
@pytest.mark.parametrize("t", [0, 1, 10, 19])
def test_reverse_step_is_the_forward_posterior(schedule, t):
    """With the true noise, one reverse step has the mean and variance of q(x_{t-1} | x_t, x_0) (Gaussian conditioning
    of x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) n); a noise
    prediction that puts x0-hat outside [-1, 1] is clipped to the box, on either side."""
    betas = dacer.vp_beta_schedule(20) if schedule == "vp" else dacer.linear_beta_schedule(20, 0.3)
    coef = dacer.diffusion_coefficients(betas)
    abar = np.cumprod(1 - betas)
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    generator = torch.Generator().manual_seed(t)
    x0 = torch.rand((64, 5), generator=generator, dtype=torch.float64) * 1.8 - 0.9  # inside the clip box
    noise = torch.randn((64, 5), generator=generator, dtype=torch.float64)
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * noise
    cov = math.sqrt(1 - betas[t]) * (1 - abar_prev)  # Cov(x_{t-1}, x_t | x0); Var(x_t | x0) = 1 - abar_t
    mean = math.sqrt(abar_prev) * x0 + cov / (1 - abar[t]) * (x_t - math.sqrt(abar[t]) * x0)
    var = (1 - abar_prev) - cov**2 / (1 - abar[t])
    step_mean = dacer.reverse_step(x_t, noise, coef, t, torch.zeros_like(x_t))
    step_one = dacer.reverse_step(x_t, noise, coef, t, torch.ones_like(x_t))
    assert torch.allclose(step_mean, mean, atol=1e-9)
    if t == 0:
        assert torch.allclose(step_mean, x0, atol=1e-9) and torch.equal(step_one, step_mean)  # no noise at t = 0
    else:
        assert torch.allclose(step_one - step_mean, torch.full_like(x_t, math.sqrt(var)), rtol=1e-9)
    # a noise prediction that puts x0-hat outside the box is clipped to it: above, then below
    for shift, edge in ((-1e3, 1.0), (1e3, -1.0)):
        far = dacer.reverse_step(x_t, noise + shift, coef, t, torch.zeros_like(x_t))
        clipped = coef["posterior_mean_coef1"][t] * edge + coef["posterior_mean_coef2"][t] * x_t
        assert torch.allclose(far, clipped, atol=1e-9), edge


def test_time_embedding():
    """emb(t) = [sin(t f_0), ..., sin(t f_{h-1}), cos(t f_0), ..., cos(t f_{h-1})] / sqrt(dim), f_j = 10000^(-j/h),
    h = dim / 2, entry by entry."""
    t = torch.tensor([0, 7, 19])
    emb = dacer.timestep_embedding(t, 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0], torch.cat([torch.zeros(8), torch.full((8,), 0.25)]))
    for b, step in enumerate(t.tolist()):
        for j in range(8):
            angle = step * 10000.0 ** (-j / 8)
            assert emb[b, j].item() == pytest.approx(math.sin(angle) / 4, abs=1e-6), (b, j)
            assert emb[b, 8 + j].item() == pytest.approx(math.cos(angle) / 4, abs=1e-6), (b, j)


def test_distributional_critic_loss_gradients():
    """d/dmu = -(b^2 + eps)(y_mean - mu)/(sd^2 + eps)/B and d/dsigma = -(b^2 + eps)((mu - y_b)^2 - sd^2)/(sd^3 + eps)/B."""
    mean = torch.tensor([0.0, 1.0, -2.0, 0.5], requires_grad=True)
    std = torch.tensor([0.5, 2.0, 1.0, 0.1], requires_grad=True)
    y_mean = torch.tensor([1.0, 0.0, -2.0, 0.4])
    y_sample = torch.tensor([10.0, -1.0, -2.5, 0.5])
    b = torch.tensor(0.8)
    dacer.distributional_critic_loss(mean, std, y_mean, y_sample, b).backward()
    m, s = mean.detach(), std.detach()
    y_bound = m + (y_sample - m).clamp(-2.4, 2.4)  # the TD error is clipped at 3 b
    assert y_bound[0] == pytest.approx(2.4)
    scale = (b**2 + 0.1) / 4
    assert torch.allclose(mean.grad, -scale * (y_mean - m) / (s**2 + 0.1))
    assert torch.allclose(std.grad, -scale * ((m - y_bound) ** 2 - s**2) / (s**3 + 0.1))
    assert mean.grad[0] < 0 and std.grad[0] < 0 and std.grad[3] > 0  # mu towards y, sigma towards |TD error|


def test_distributional_critic_loss_clips_the_td_error_below_too():
    """y_b = mu + clip(y_sample - mu, -3b, 3b): a sample far below the mean is clipped at mu - 3b."""
    mean, std = torch.tensor([0.0]), torch.tensor([1.0], requires_grad=True)
    dacer.distributional_critic_loss(mean, std, torch.tensor([0.0]), torch.tensor([-10.0]), torch.tensor(0.5)).backward()
    assert std.grad.item() == pytest.approx(-(0.25 + 0.1) * (1.5**2 - 1.0) / (1.0 + 0.1))


def test_bootstrap_target():
    """The sampled target follows the critic with the smaller mean, zeta is clipped to [-3, 3], and terminated
    transitions do not bootstrap."""
    rewards, terminations = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    q1 = (torch.tensor([2.0, 5.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    q2 = (torch.tensor([3.0, 4.0, 3.0, 3.0]), torch.tensor([2.0, 2.0, 2.0, 2.0]))
    zeta = torch.tensor([1.0, 5.0, 1.0, -5.0])
    y_mean, y_sample = dacer.bootstrap_target(rewards, terminations, q1, q2, zeta, 0.5)
    assert torch.allclose(y_mean, torch.tensor([2.0, 3.0, 1.0, 1.5]))
    expected = [1 + 0.5 * (2.0 + 1.0), 1 + 0.5 * (4.0 + 2.0 * 3.0), 1.0, 1 + 0.5 * (1.0 - 3.0)]
    assert torch.allclose(y_sample, torch.tensor(expected))


def test_std_ema():
    """b <- (1 - tau) b + tau mean(sigma); only b < 0 marks 'not yet set' (then b = mean(sigma)), a set b below 1 is
    averaged like any other; b is a statistic, no gradient flows through it."""
    ema = dacer.update_std_ema(torch.tensor([-1.0, -1.0]), torch.tensor([2.0, 3.0]), tau=0.005)
    assert torch.equal(ema, torch.tensor([2.0, 3.0]))
    ema = dacer.update_std_ema(ema, torch.tensor([4.0, 3.0]), tau=0.5)
    assert torch.allclose(ema, torch.tensor([3.0, 3.0]))
    small = dacer.update_std_ema(torch.tensor([0.5, 0.25]), torch.tensor([1.0, 1.0]), tau=0.5)
    assert torch.allclose(small, torch.tensor([0.75, 0.625]))
    sigma = torch.tensor([2.0, 3.0], requires_grad=True)
    assert not dacer.update_std_ema(ema, sigma, tau=0.5).requires_grad


def test_policy_lr_schedule():
    lr = [dacer.linear_lr(step, 3e-4, 3e-5, 25_000, 50_000) for step in (0, 25_000, 50_000, 75_000, 200_000)]
    assert lr == pytest.approx([3e-4, 3e-4, 1.65e-4, 3e-5, 3e-5])


# -------------------------------------------------------------------------------------------------------- networks
def test_linear_layers_use_truncated_normal_init():
    """Haiku's default init in every Linear layer of eps_theta (time MLP, trunk, head) and of the critics: weights
    N(0, 1/fan_in) truncated at 2 std (the standard normal truncated to [-2, 2] has std 0.8796), zero bias."""
    torch.manual_seed(0)
    actor = dacer.Actor(6, 3, 64, 2, torch.nn.Mish, dacer.linear_beta_schedule(5, 0.3), 0.5, 16)
    critic = dacer.DistributionalQNetwork(6, 3, 64, 2, torch.nn.Mish)
    layers = [m for net in (actor, critic) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 8
    z = torch.cat([m.weight.detach().flatten() * math.sqrt(m.in_features) for m in layers])  # N(0, 1) truncated
    assert 1.9 < z.abs().max() <= 2.0 + 1e-6
    density = math.exp(-2.0) / math.sqrt(2 * math.pi)  # phi(2)
    truncated_std = math.sqrt(1 - 2 * 2 * density / math.erf(2 / math.sqrt(2)))
    assert truncated_std == pytest.approx(0.8796, abs=1e-4)
    assert z.std().item() == pytest.approx(truncated_std, abs=0.03)
    for m in layers:
        assert m.weight.abs().max() <= 2.0 / math.sqrt(m.in_features) + 1e-6 and torch.all(m.bias == 0), m


def test_critic_outputs_mean_and_softplus_std():
    """(mu, sigma) = (h_0, log(1 + exp(h_1))) of the head on the trunk of concat(s, a)."""
    torch.manual_seed(0)
    critic = dacer.DistributionalQNetwork(4, 2, 16, 2, torch.nn.Mish)
    assert [m.in_features for m in critic.modules() if isinstance(m, torch.nn.Linear)] == [6, 16, 16]
    obs, actions = torch.randn(5, 4), torch.rand(5, 2) * 2 - 1
    mean, std = critic(obs, actions)
    with torch.no_grad():
        out = critic.head(critic.trunk(torch.cat([obs, actions], dim=1)))
    assert mean.shape == std.shape == (5,)
    assert torch.allclose(mean, out[:, 0]) and torch.allclose(std, torch.log1p(torch.exp(out[:, 1])))


def test_actor_architecture_and_forward():
    """eps_theta = head o trunk of concat(s, x, time_mlp(emb(t))), time_mlp = Linear(2 time_dim) o mish o
    Linear(time_dim); the layer shapes and the forward pass written out."""
    torch.manual_seed(0)
    actor = dacer.Actor(6, 3, 32, 2, torch.nn.Mish, dacer.linear_beta_schedule(5, 0.3), 0.5, 16)
    shapes = [tuple(m.weight.shape) for m in actor.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(32, 16), (16, 32), (32, 6 + 3 + 16), (32, 32), (3, 32)]
    assert actor.num_timesteps == 5
    obs, x, t = torch.randn(4, 6), torch.randn(4, 3), torch.tensor([0, 1, 3, 4])
    emb = actor.time_mlp[2](torch.nn.functional.mish(actor.time_mlp[0](dacer.timestep_embedding(t, 16))))
    hidden = torch.cat([obs, x, emb], dim=1)
    for layer in actor.trunk:
        hidden = layer(hidden)
    assert torch.allclose(actor(obs, x, t), actor.head(hidden), atol=1e-6)


def test_sampling_noise_clip_and_deterministic_action():
    """a = clip(chain(s; x_T = 0.5 N(0, I)) + noise_std xi, -1, 1): the exploration noise is added after the chain and
    before the clip, both edges of which are reached with large noise."""
    torch.manual_seed(0)
    actor = dacer.Actor(6, 3, 32, 2, torch.nn.Mish, dacer.linear_beta_schedule(20, 0.3), 0.5, 16)
    obs = torch.randn(8, 6)
    noise = actor.draw_noise(8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        chain = actor.chain(obs, 0.5 * noise.x_T, noise.z)
        noisy = actor.sample(obs, noise, noise_std=5.0)
        assert noisy.max() == 1.0 and noisy.min() == -1.0 and (noisy.abs() < 1.0).any()  # large noise, then clipped
        assert torch.equal(noisy, (chain + 5.0 * noise.xi).clamp(-1.0, 1.0))
        small = actor.sample(obs, noise, noise_std=0.1)
        assert torch.allclose(small, (chain + 0.1 * noise.xi).clamp(-1.0, 1.0), atol=1e-6)
        quiet = actor.sample(obs, noise, noise_std=0.0)
    assert torch.equal(quiet, chain.clamp(-1.0, 1.0))  # x_T ~ 0.5 N(0, I)
    assert torch.equal(quiet, actor.sample(obs, actor.draw_noise(8, torch.Generator().manual_seed(1)), noise_std=0.0))
    # the chain (first layer split, state and time parts computed once) equals eps_theta called at every step
    x_T, z = 0.5 * torch.randn(8, 3), torch.randn(20, 8, 3)
    x = x_T
    for t in reversed(range(20)):
        x = dacer.reverse_step(x, actor(obs, x, torch.full((8,), t)), actor.coef, t, z[t])
    assert torch.allclose(actor.chain(obs, x_T, z), x, atol=1e-5)
    seed = dacer.observation_seed(obs.numpy())
    assert seed == dacer.observation_seed(obs.numpy().copy()) and seed != dacer.observation_seed(obs.numpy() + 1e-3)


def test_draw_noise_is_drawn_chunk_by_chunk(monkeypatch):
    """x_T, z and xi come chunk by chunk in that order, the order the entropy sampling consumes them in."""
    monkeypatch.setattr(dacer, "SAMPLE_CHUNK", 3)
    actor, _, _ = tiny_agent()
    noise = actor.draw_noise(7, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    for start, rows in ((0, 3), (3, 3), (6, 1)):
        assert torch.equal(noise.x_T[start : start + rows], torch.randn((rows, 2), generator=generator))
        assert torch.equal(noise.z[:, start : start + rows], torch.randn((3, rows, 2), generator=generator))
        assert torch.equal(noise.xi[start : start + rows], torch.randn((rows, 2), generator=generator))
    assert [len(part.x_T) for part in noise.split(3)] == [3, 3, 1]
    assert [part.z.shape for part in noise.split(3)] == [(3, 3, 2), (3, 3, 2), (3, 1, 2)]


# ---------------------------------------------------------------------------------------------------- update steps
@pytest.mark.parametrize("std_ema_before", [[-1.0, -1.0], [0.5, 2.0]])
def test_critic_step(std_ema_before):
    """One step on L_1 + L_2 of the online critics at (s, a), towards targets from the TARGET critics at (s', a')
    (which here differ from the online ones), with the done mask (the batch's last transition is terminated) and the
    min of the critics inside `bootstrap_target`; b_i is updated in place from this batch's mean std before the loss
    uses it (initialised from it when unset). Old gradients are zeroed; the target critics and the policy are left
    alone."""
    actor, (qf1, qf2, qf1_target, qf2_target), batch = tiny_agent()
    perturb(qf1_target, seed=1)
    perturb(qf2_target, seed=2)
    args = dacer.resolve_preset(dacer.Args())
    next_actions, zeta = torch.rand(8, 2) * 2 - 1, torch.randn(8, generator=torch.Generator().manual_seed(3))
    # the expected step, on copies: y from the target critics, b_i from this batch, then one SGD step on L_1 + L_2
    ref1, ref2 = copy.deepcopy(qf1), copy.deepcopy(qf2)
    with torch.no_grad():
        mask = 1.0 - batch.terminations
        t1, t2 = qf1_target(batch.next_obs, next_actions), qf2_target(batch.next_obs, next_actions)
        y_mean = args.reward_scale * batch.rewards + args.gamma * mask * torch.minimum(t1[0], t2[0])
    assert y_mean[-1] == args.reward_scale * batch.rewards[-1]
    targets = dacer.bootstrap_target(args.reward_scale * batch.rewards, batch.terminations, t1, t2, zeta, args.gamma)
    assert torch.allclose(targets[0], y_mean)
    (m1, s1), (m2, s2) = ref1(batch.obs, batch.actions), ref2(batch.obs, batch.actions)
    before = torch.tensor(std_ema_before)
    batch_std = torch.stack([s1.mean(), s2.mean()]).detach()
    b = batch_std if before[0] < 0 else (1 - args.tau) * before + args.tau * batch_std
    loss1 = dacer.distributional_critic_loss(m1, s1, *targets, b[0])
    loss2 = dacer.distributional_critic_loss(m2, s2, *targets, b[1])
    params = list(ref1.parameters()) + list(ref2.parameters())
    expected = sgd_expectation(loss1 + loss2, params, lr=0.05)
    snapshots = {name: snapshot(m) for name, m in dict(actor=actor, t1=qf1_target, t2=qf2_target).items()}
    q_optimizer = PlainSGD(list(qf1.parameters()) + list(qf2.parameters()), lr=0.05)
    stale_gradients(q_optimizer.param_groups[0]["params"])
    std_ema = before.clone()
    logs = dacer.critic_step(batch, next_actions, zeta, qf1, qf2, qf1_target, qf2_target, q_optimizer, std_ema, args)
    assert torch.allclose(std_ema, b)  # in place
    assert torch.allclose(logs["losses/qf1_loss"], loss1) and torch.allclose(logs["losses/qf2_loss"], loss2)
    assert logs["losses/qf_loss"] == (logs["losses/qf1_loss"] + logs["losses/qf2_loss"]) / 2
    n1 = len(list(qf1.parameters()))
    assert close_to(qf1, expected[:n1]) and close_to(qf2, expected[n1:])
    assert not close_to(qf1, snapshot(ref1)) and not close_to(qf2, snapshot(ref2))
    for name, module in dict(actor=actor, t1=qf1_target, t2=qf2_target).items():
        assert unchanged(module, snapshots[name]) and all(p.grad is None for p in module.parameters()), name
    assert all(not v.requires_grad for v in logs.values())


def test_actor_step():
    """One SGD step at learning rate lr on -mean_s min_i mu_i(s, a), a = clip(chain(s) + noise_std xi, -1, 1), the
    gradient back-propagated through the chain; both critics are the min somewhere, some coordinates are clipped on
    each side; old gradients are zeroed, the critics get none and do not move."""
    actor, (qf1, qf2, _, _), batch = tiny_agent()
    noise = actor.draw_noise(8, torch.Generator().manual_seed(2))
    noise_std = torch.tensor(0.8)
    ref = copy.deepcopy(actor)
    pi = ref.sample(batch.obs, noise, noise_std)
    q1, q2 = qf1(batch.obs, pi)[0], qf2(batch.obs, pi)[0]
    assert (q1 < q2).any() and (q2 < q1).any()
    assert (pi.detach() == 1.0).any() and (pi.detach() == -1.0).any() and (pi.detach().abs() < 1.0).any()
    loss = -torch.minimum(q1, q2).mean()
    expected = sgd_expectation(loss, list(ref.parameters()), lr=2e-2)
    before_q1, before_q2 = snapshot(qf1), snapshot(qf2)
    actor_optimizer = PlainSGD(actor.parameters(), lr=1e-3)
    stale_gradients(actor.parameters())
    logs = dacer.actor_step(batch, noise, actor, qf1, qf2, actor_optimizer, noise_std, lr=2e-2)
    assert torch.allclose(logs["losses/actor_loss"], loss)
    assert logs["dacer/clipped_fraction"] == (pi.abs() >= 1.0).float().mean()
    assert actor_optimizer.param_groups[0]["lr"] == 2e-2
    assert close_to(actor, expected) and not close_to(actor, snapshot(ref))
    assert unchanged(qf1, before_q1) and unchanged(qf2, before_q2)
    assert all(p.grad is None for p in list(qf1.parameters()) + list(qf2.parameters()))  # no gradient left in the critics


@pytest.mark.parametrize("entropy_above_target, estimator, components", [(True, "gmm-full", 3), (False, "gmm-diag", 2)])
def test_alpha_step_moves_alpha_towards_the_target_entropy(monkeypatch, entropy_above_target, estimator, components):
    """H = the GMM estimate of 20 policy samples per state (chain, noise and clip included, sampled in chunks), then
    one step on -log alpha (H-bar - H), whose gradient is H - H-bar: alpha shrinks while H > H-bar and grows while
    H < H-bar (Eq. 16). The policy is not touched; old gradients of log alpha are zeroed."""
    monkeypatch.setattr(dacer, "SAMPLE_CHUNK", 7)  # 80 rows in 12 chunks
    actor, _, batch = tiny_agent()
    obs = batch.obs[:4]
    args = dacer.resolve_preset(dacer.Args(entropy_samples=20, gmm_components=components, entropy_estimator=estimator))
    noise, noise_std = actor.draw_noise(4 * 20, torch.Generator().manual_seed(3)), torch.tensor(0.45)
    with torch.no_grad():
        samples = actor.sample(obs.repeat_interleave(20, dim=0), noise, noise_std).view(4, 20, 2)
    entropy = dacer.estimate_entropy(samples, components, estimator).item()  # checked against scikit-learn below
    target_entropy = entropy - 2.0 if entropy_above_target else entropy + 2.0  # +-2: / and * differ
    log_alpha = torch.tensor(math.log(3.0), requires_grad=True)
    stale_gradients([log_alpha])
    before = snapshot(actor)
    logs = dacer.alpha_step(obs, noise, actor, log_alpha, PlainSGD([log_alpha], lr=0.1), noise_std, target_entropy, args)
    assert logs["dacer/entropy"].item() == pytest.approx(entropy, rel=1e-5, abs=1e-5)
    assert logs["losses/alpha_loss"].item() == pytest.approx(-math.log(3.0) * (target_entropy - entropy), rel=1e-4)
    assert log_alpha.item() == pytest.approx(math.log(3.0) - 0.1 * (entropy - target_entropy), abs=1e-5)
    assert (log_alpha.item() < math.log(3.0)) == entropy_above_target
    assert unchanged(actor, before) and all(p.grad is None for p in actor.parameters())


def test_polyak_update():
    """phi-bar <- (1 - tau) phi-bar + tau phi, without autograd (the target parameters are leaves that need no
    gradient history); the online network does not move."""
    _, (qf1, _, qf1_target, _), _ = tiny_agent()
    perturb(qf1_target)
    online, target = snapshot(qf1), snapshot(qf1_target)
    dacer.polyak_update(qf1, qf1_target, 0.25)
    assert close_to(qf1_target, [0.75 * t + 0.25 * o for t, o in zip(target, online, strict=True)])
    assert unchanged(qf1, online) and all(not p.grad_fn for p in qf1_target.parameters())


def test_diagnostics():
    """alpha = exp(log alpha), the exploration std kappa alpha, H-bar and the policy lr, none carrying a graph."""
    log_alpha = torch.tensor(math.log(2.0), requires_grad=True)
    args = dacer.resolve_preset(dacer.Args())
    logs = dacer.diagnostics(log_alpha, PlainSGD([log_alpha], lr=1.5e-4), -1.8, args)
    assert logs["losses/alpha"].item() == pytest.approx(2.0)
    assert logs["dacer/noise_std"].item() == pytest.approx(args.noise_scale * 2.0) and args.noise_scale == 0.15
    assert logs["dacer/target_entropy"].item() == pytest.approx(-1.8)
    assert logs["dacer/policy_lr"].item() == pytest.approx(1.5e-4)
    assert all(not v.requires_grad for v in logs.values())


# ------------------------------------------------------------------ the GMM entropy estimate, piece by piece, fast
def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_documented_constants_and_defaults():
    """The values docs/algorithms/dacer.md states: chains sampled SAMPLE_CHUNK = 16 384 rows at a time, the GMM fits
    in groups of GMM_CPU_CHUNK = 32 states on the CPU and checked for convergence every GMM_CHECK_EVERY = 5 iterations
    elsewhere; the paper's 3 full components; scikit-learn's defaults, KMeans tol 1e-4 and max_iter 300 and
    GaussianMixture reg_covar 1e-6, tol 1e-3 and max_iter 100 (compared with scikit-learn itself at the end of this
    file). Reading values on the host is free on the CPU only."""
    assert (dacer.SAMPLE_CHUNK, dacer.GMM_CPU_CHUNK, dacer.GMM_CHECK_EVERY) == (16_384, 32, 5)
    assert defaults(dacer.kmeans_labels) == dict(max_iter=300, tol=1e-4, check_every=None)
    assert defaults(dacer.fit_gmm) == dict(covariance_type="full", reg_covar=1e-6, tol=1e-3, max_iter=100, check_every=None)
    assert defaults(dacer.gmm_entropy) == dict(n_components=3, covariance_type="full", check_every=None)
    assert defaults(dacer.estimate_entropy) == dict(n_components=3, estimator="gmm-full")
    assert defaults(dacer.distributional_critic_loss) == dict(eps_c=0.1, td_clip=3.0)
    assert dacer.syncs_are_free(torch.device("cpu")) and not dacer.syncs_are_free(torch.device("cuda"))


def test_squared_distances():
    """||p - x||^2 by the expansion ||p||^2 - 2 p.x + ||x||^2 for points [B, P, d] and samples [B, S, d], floored at 0
    where rounding makes the expansion negative (here for points within 1e-9 of the samples)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn((2, 9, 3), generator=generator, dtype=torch.float64) * 10
    near = X + 1e-9 * torch.randn((2, 9, 3), generator=generator, dtype=torch.float64)
    points = torch.cat([near, torch.randn((2, 2, 3), generator=generator, dtype=torch.float64)], 1)  # [2, 11, 3]
    x_sq = X.square().sum(-1)
    dist = dacer.squared_distances(points, X, x_sq)
    assert dist.shape == (2, 11, 9)
    assert torch.allclose(dist, ((points[:, :, None] - X[:, None]) ** 2).sum(-1), rtol=1e-12, atol=1e-10)
    expansion = -2.0 * points @ X.mT + points.square().sum(-1, keepdim=True) + x_sq[:, None]
    assert (expansion < 0).any() and (dist >= 0).all()


def run_countdown(counts: list[int], max_iter: int, check_every=None):
    """iterate_batched on rows that need counts[b] steps each; returns the batch size each step saw, the rows of each
    finish call and each row's remaining count as finished."""
    n = len(counts)
    state = dict(idx=torch.arange(n), left=torch.tensor(counts), active=torch.ones(n, dtype=torch.bool))
    sizes, finished, out = [], [], torch.full((n,), -99)

    def step(s):
        sizes.append(len(s["idx"]))
        s["left"] = torch.where(s["active"], s["left"] - 1, s["left"])
        s["active"] = s["active"] & (s["left"] > 0)

    def finish(s, done):
        finished.append(sorted(s["idx"][done].tolist()))
        out[s["idx"][done]] = s["left"][done]

    dacer.iterate_batched(state, step, finish, max_iter, check_every)
    return sizes, finished, out.tolist()


def test_iterate_batched(monkeypatch):
    """The batch loop: a check after every iteration on the CPU, every GMM_CHECK_EVERY elsewhere, or every
    check_every given; at a check, finished rows are finished and dropped once they are at least 1/8 of the batch,
    and the loop ends when all are finished; no check after the last iteration (max_iter), everything left is
    finished at the end."""
    eight = [1, 2, 3, 3, 3, 3, 3, 3]
    assert run_countdown(eight, 10) == ([8, 7, 6], [[0], [1], [2, 3, 4, 5, 6, 7]], [0] * 8)
    nine = [1] + [3] * 8  # one finished row of nine is below 1/8: nothing is dropped
    assert run_countdown(nine, 10) == ([9, 9, 9], [list(range(9))], [0] * 9)
    assert run_countdown([2, 5], 3) == ([2, 2, 1], [[0], [1]], [0, 2])  # max_iter 3: row 1 stops with 2 steps left
    assert run_countdown([3, 3], 10, check_every=2) == ([2, 2, 2, 2], [[0, 1]], [0, 0])
    monkeypatch.setattr(dacer, "syncs_are_free", lambda device: False)
    sizes, finished, out = run_countdown([1, 2, 7, 7, 7, 7, 7, 7], 20)
    assert sizes == [8] * 5 + [6] * 5 and finished == [[0, 1], [2, 3, 4, 5, 6, 7]] and out == [0] * 8


def reference_lloyd_step(x: np.ndarray, centers: np.ndarray):
    """One iteration of scikit-learn's `lloyd_iter_chunked_dense` on one state, written out in NumPy: labels of the
    nearest center (the first of equal ones), label sums and counts; each empty cluster (in order) takes the next
    farthest point from its center unless all points sit on theirs (`_relocate_empty_clusters_dense`); then the means,
    a still-empty cluster taking the biggest one's current row, already averaged only if it comes earlier
    (`_average_centers`); and the total squared shift of the centers."""
    K = len(centers)
    labels = np.argmin((centers**2).sum(1)[None] - 2 * x @ centers.T, axis=1)
    counts = np.bincount(labels, minlength=K).astype(np.float64)
    sums = np.stack([x[labels == k].sum(0) for k in range(K)])
    distances = ((x - centers[labels]) ** 2).sum(1)
    empty = np.flatnonzero(counts == 0)
    if len(empty) and distances.max() > 0:
        for k, i in zip(empty, np.argsort(-distances, kind="stable"), strict=False):
            sums[labels[i]] -= x[i]
            counts[labels[i]] -= 1
            sums[k], counts[k] = x[i], 1
    new, biggest = sums.copy(), np.argmax(counts)
    for k in range(K):
        new[k] = new[k] / counts[k] if counts[k] > 0 else new[biggest]
    return labels, new, ((new - centers) ** 2).sum()


def lloyd_cases() -> tuple[np.ndarray, np.ndarray]:
    """Six states of 7 points in 2-d with 3 centers: an ordinary step; one empty cluster (relocated); two empty
    clusters; two states whose points all sit on two of the centers (nothing to relocate), the empty cluster before /
    after the biggest one; and one empty cluster with all squared distances below 1."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 2)) * [3.0, 1.0]
    p, q = np.array([0.5, -1.0]), np.array([2.0, 3.0])
    duplicated = np.array([p, p, q, q, q, q, p])
    X = np.stack([x, x, x, duplicated, duplicated, 0.1 * x])
    centers = np.stack([x[[0, 2, 4]] + 0.1, np.stack([x[0], x[3], [40.0, 40.0]]), np.stack([x.mean(0), [40, 40], [-40, 40]]),
                        np.stack([[50.0, 50.0], p, q]), np.stack([q, p, [50.0, 50.0]]),
                        np.stack([0.1 * x[0], 0.1 * x[3], [40.0, 40.0]])])  # fmt: skip
    return X, centers


@pytest.mark.parametrize("cpu", [True, False])
def test_lloyd_step_matches_the_reference(monkeypatch, cpu):
    """`lloyd_step` equals `reference_lloyd_step` state by state, on all states at once and on each alone (so the
    CPU path's test for an empty cluster sees one batch without any cluster of exactly one point), on the CPU path
    (the empty-cluster step only when a cluster is empty) and the accelerator path (always)."""
    if not cpu:
        monkeypatch.setattr(dacer, "syncs_are_free", lambda device: False)
    X, centers = lloyd_cases()
    Xt, Ct = torch.as_tensor(X), torch.as_tensor(centers)
    labels, new_centers, shift = dacer.lloyd_step(Xt, Xt.mT.contiguous(), Xt.square().sum(-1), Ct)
    for b in range(len(X)):
        ref_labels, ref_centers, ref_shift = reference_lloyd_step(X[b], centers[b])
        one = dacer.lloyd_step(Xt[b : b + 1], Xt[b : b + 1].mT.contiguous(), Xt[b : b + 1].square().sum(-1), Ct[b : b + 1])
        for got_labels, got_centers, got_shift in ((labels[b], new_centers[b], shift[b]), (one[0][0], one[1][0], one[2][0])):
            assert np.array_equal(got_labels.numpy(), ref_labels), b
            assert np.allclose(got_centers.numpy(), ref_centers, rtol=1e-12, atol=1e-12), b
            assert got_shift.item() == pytest.approx(ref_shift, rel=1e-12), b
    # the cases do what they say: relocation in states 1, 2 and 5, a still-empty cluster in 3 and 4
    assert [len(set(reference_lloyd_step(X[b], centers[b])[0])) for b in range(6)] == [3, 2, 1, 2, 2, 2]
    assert 0 < ((X[5] - centers[5][reference_lloyd_step(X[5], centers[5])[0]]) ** 2).sum(1).max() < 1
    assert np.allclose(new_centers[3, 0].numpy(), 4 * lloyd_cases()[1][3, 2])  # the biggest one's sum, not its mean


def reference_kmeans_labels(x: np.ndarray, K: int, tol: float = 1e-4, max_iter: int = 300):
    """scikit-learn's KMeans(K, n_init=1, random_state=42, tol, max_iter).fit(x).labels_, written out in NumPy (and
    compared with scikit-learn at the end of this file): center the data; k-means++ seeding with RandomState(42)
    (the first center by choice(S), then for each further one 2 + int(log K) candidates drawn by u * potential on
    the cumulative squared distances, keeping the one of least potential); Lloyd steps until the labels repeat
    ('strict') or the squared shift is <= tol * mean per-feature variance ('tol'), at most max_iter; unless strict,
    label once more with the final centers. Returns the labels and why it stopped."""
    x = x - x.mean(0)
    S, rng = len(x), np.random.RandomState(42)
    centers = [x[rng.choice(S, p=np.full(S, 1.0 / S))]]
    closest = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, K):
        draws = rng.uniform(size=2 + int(np.log(K))) * closest.sum()
        candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), S - 1)
        dist = np.minimum(closest, ((x[candidates][:, None] - x[None]) ** 2).sum(-1))
        best = np.argmin(dist.sum(1))
        closest = dist[best]
        centers.append(x[candidates[best]])
    centers, previous, reason = np.array(centers), np.full(S, -1), "max_iter"
    for _ in range(max_iter):
        labels, centers, shift = reference_lloyd_step(x, centers)
        if np.array_equal(labels, previous):
            return labels, "strict"
        if shift <= tol * np.var(x, axis=0).mean():
            reason = "tol"
            break
        previous = labels
    return np.argmin((centers**2).sum(1)[None] - 2 * x @ centers.T, axis=1), reason


def policy_like_samples(d: int, states: int = 6, seed: int = 0, clip: float = 1.0, samples: int = 200) -> np.ndarray:
    """[states, samples, d] float32 actions: per state an offset, two blobs and noise, clipped to [-clip, clip]."""
    rng = np.random.default_rng(seed)
    blobs = rng.choice([-1.0, 1.0], size=(states, samples, 1)) * rng.normal(size=(states, 1, d)) * 0.4
    x = rng.normal(size=(states, 1, d)) * 0.3 + blobs + rng.normal(size=(states, samples, d)) * 0.4
    return np.clip(x, -clip, clip).astype(np.float32)


@pytest.mark.parametrize(
    "tol, max_iter, offset, reasons",
    [
        (1e-4, 300, 0.0, {"strict"}),
        (0.02, 300, 0.0, {"strict", "tol"}),
        (1e-4, 2, 0.0, {"max_iter"}),
        (0.002, 300, 30.0, {"strict"}),
    ],
)
def test_kmeans_labels_match_the_reference(tol, max_iter, offset, reasons):
    """`kmeans_labels` on 5 states at once equals `reference_kmeans_labels` state by state, stopping by repeated
    labels, by the shift tolerance (some states of the batch) or at max_iter, and on data far from the origin (the
    data are centered first)."""
    samples = policy_like_samples(2, states=5, seed=5, samples=40).astype(np.float64) + offset
    labels = dacer.kmeans_labels(torch.as_tensor(samples), 3, max_iter=max_iter, tol=tol)
    found = set()
    for b, x in enumerate(samples):
        expected, reason = reference_kmeans_labels(x, 3, tol, max_iter)
        found.add(reason)
        assert np.array_equal(labels[b].numpy(), expected), b
    assert found == reasons, found


def test_kmeans_labels_off_the_cpu(monkeypatch):
    """The accelerator path (a convergence check every GMM_CHECK_EVERY iterations, finished states frozen) gives the
    same labels as the CPU path."""
    samples = torch.as_tensor(policy_like_samples(2, states=5, seed=5, samples=40), dtype=torch.float64)
    cpu = dacer.kmeans_labels(samples, 3, tol=0.02)
    monkeypatch.setattr(dacer, "syncs_are_free", lambda device: False)
    assert torch.equal(dacer.kmeans_labels(samples, 3, tol=0.02), cpu)


def test_em_step_against_its_formulas():
    """One E step and one M step on 5 points in 2-d with 2 components, against the textbook formulas."""
    X = torch.tensor([[0.0, 0.1], [0.3, -0.2], [1.0, 1.2], [1.4, 0.8], [0.2, 0.4]], dtype=torch.float64)[None]
    weights = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    means = torch.tensor([[[0.1, 0.0], [1.2, 1.0]]], dtype=torch.float64)
    covariances = torch.tensor([[[[0.2, 0.05], [0.05, 0.1]], [[0.3, -0.1], [-0.1, 0.2]]]], dtype=torch.float64)
    x, w, mu, cov = X[0].numpy(), weights[0].numpy(), means[0].numpy(), covariances[0].numpy()
    # E: log r_ik = log w_k + log N(x_i | mu_k, Sigma_k) - log sum_j w_j N(x_i | mu_j, Sigma_j); bound = mean log sum
    log_joint = np.stack([math.log(w[k]) - 0.5 * (2 * math.log(2 * math.pi) + np.linalg.slogdet(cov[k])[1]
                          + np.einsum("id,de,ie->i", x - mu[k], np.linalg.inv(cov[k]), x - mu[k]))
                          for k in range(2)], -1)  # fmt: skip
    log_norm = np.logaddexp(log_joint[:, 0], log_joint[:, 1])
    chol, ok = dacer.covariance_cholesky(covariances, "full")
    log_resp, bound = dacer.gmm_log_resp(X, weights, means, chol, "full")
    assert ok.all() and np.allclose(log_resp[0].numpy(), log_joint - log_norm[:, None], atol=1e-12)
    assert bound.item() == pytest.approx(log_norm.mean(), abs=1e-12)
    # diag: the same with the covariances' diagonals
    variances = np.stack([np.diag(c) for c in cov])
    log_joint_diag = np.log(w) - 0.5 * (2 * math.log(2 * math.pi) + np.log(variances).sum(-1)
                                        + (((x[:, None] - mu) ** 2) / variances).sum(-1))  # fmt: skip
    data = torch.cat([X, X.square()], -1)
    diag_chol, _ = dacer.covariance_cholesky(torch.as_tensor(variances)[None], "diag")
    log_resp_diag, bound_diag = dacer.gmm_log_resp(data, weights, means, diag_chol, "diag")
    expected = log_joint_diag - np.logaddexp(log_joint_diag[:, 0], log_joint_diag[:, 1])[:, None]
    assert np.allclose(log_resp_diag[0].numpy(), expected, atol=1e-12)
    assert bound_diag.item() == pytest.approx(np.logaddexp(log_joint_diag[:, 0], log_joint_diag[:, 1]).mean(), abs=1e-12)
    # M: n_k = sum_i r_ik (+ 10 eps), mu_k = sum_i r_ik x_i / n_k, Sigma_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T / n_k
    # + 1e-6 I (diag: its diagonal); the weights are normalised outside, as in scikit-learn's M step
    resp = np.exp(log_resp[0].numpy())
    nk_expected = resp.sum(0) + 10 * EPS64
    mu_expected = resp.T @ x / nk_expected[:, None]
    cov_expected = np.stack([(resp[:, k, None] * (x - mu_expected[k])).T @ (x - mu_expected[k]) / nk_expected[k]
                             + 1e-6 * np.eye(2) for k in range(2)])  # fmt: skip
    nk, new_means, new_covariances = dacer.gaussian_parameters(X, torch.as_tensor(resp)[None], 1e-6, "full")
    assert np.allclose(nk[0].numpy(), nk_expected, atol=1e-12) and np.allclose(new_means[0].numpy(), mu_expected)
    assert np.allclose(new_covariances[0].numpy(), cov_expected, atol=1e-12)
    _, diag_means, diag_variances = dacer.gaussian_parameters(data, torch.as_tensor(resp)[None], 1e-6, "diag")
    assert np.allclose(diag_means[0].numpy(), mu_expected, atol=1e-12)
    assert np.allclose(diag_variances[0].numpy(), np.stack([np.diag(c) for c in cov_expected]), atol=1e-12)


def test_m_step_counts_exactly():
    """n_k = sum_i r_ik + 10 eps exactly (responsibilities that sum exactly, so the 10 eps are visible), for two states
    and three components."""
    resp = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.75, 0.0, 0.25]], dtype=torch.float64)
    resp = torch.stack([resp, resp.flip(-1)])
    X = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2)
    nk, _, _ = dacer.gaussian_parameters(X, resp, 1e-6, "full")
    assert torch.equal(nk, torch.tensor([[1.5, 0.75, 0.75], [0.75, 0.75, 1.5]], dtype=torch.float64) + 10 * EPS64)


def test_covariance_cholesky():
    """Lower Cholesky factors L L^T = Sigma ('full') or square roots ('diag'), and per state whether every component
    has one (a covariance that is not positive definite, a variance <= 0: not ok)."""
    spd = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    covariances = torch.stack([torch.stack([spd, 0.25 * spd, torch.eye(2, dtype=torch.float64)]),
                               torch.stack([spd, indefinite, spd])])  # fmt: skip
    chol, ok = dacer.covariance_cholesky(covariances, "full")
    assert ok.tolist() == [True, False]
    assert torch.allclose(chol[0] @ chol[0].mT, covariances[0]) and torch.equal(chol[0], chol[0].tril())
    variances = torch.tensor([[[4.0, 0.25], [1.0, 9.0], [0.5, 0.5]], [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    roots, ok = dacer.covariance_cholesky(variances, "diag")
    assert ok.tolist() == [True, False] and torch.equal(roots[0], variances[0].sqrt())


def reference_em(x: np.ndarray, labels: np.ndarray, K: int, covariance_type: str, tol: float, max_iter: int):
    """scikit-learn's GaussianMixture EM from the k-means responsibilities, written out in NumPy: initial parameters
    from the one-hot labels with weights n_k / S; then up to max_iter times an E step (mean log-likelihood L) and an M
    step (weights n_k / sum n_k), stopping once |L - L_previous| < tol. Returns weights, means, covariances and the
    number of iterations."""
    S, d = x.shape

    def m_step(resp):
        nk = resp.sum(0) + 10 * EPS64
        means = resp.T @ x / nk[:, None]
        if covariance_type == "full":
            cov = np.stack(
                [(resp[:, k, None] * (x - means[k])).T @ (x - means[k]) / nk[k] + 1e-6 * np.eye(d) for k in range(K)]
            )
        else:
            cov = resp.T @ x**2 / nk[:, None] - means**2 + 1e-6
        return nk, means, cov

    def log_joint(weights, means, cov):
        full = [np.linalg.inv(c) for c in cov] if covariance_type == "full" else None
        rows = []
        for k in range(K):
            diff = x - means[k]
            if covariance_type == "full":
                log_det, mahalanobis = np.linalg.slogdet(cov[k])[1], np.einsum("id,de,ie->i", diff, full[k], diff)
            else:
                log_det, mahalanobis = np.log(cov[k]).sum(), (diff**2 / cov[k]).sum(1)
            rows.append(np.log(weights[k]) - 0.5 * (d * math.log(2 * math.pi) + log_det + mahalanobis))
        return np.stack(rows, 1)

    nk, means, cov = m_step(np.eye(K)[labels])
    weights, bound, n_iter = nk / S, -np.inf, 0
    while n_iter < max_iter:
        n_iter += 1
        joint = log_joint(weights, means, cov)
        top = joint.max(1, keepdims=True)
        log_norm = (top + np.log(np.exp(joint - top).sum(1, keepdims=True)))[:, 0]
        previous, bound = bound, log_norm.mean()
        nk, means, cov = m_step(np.exp(joint - log_norm[:, None]))
        weights = nk / nk.sum()
        if abs(bound - previous) < tol:
            break
    return weights, means, cov, n_iter


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("tol, max_iter", [(1e-3, 100), (1e-3, 1), (1e-3, 3), (0.05, 100)])
def test_fit_gmm_matches_the_reference_em(covariance_type, tol, max_iter):
    """`fit_gmm` on 3 states at once equals `reference_em` from the same k-means labels state by state: weights,
    means, covariances and their Cholesky factors (square roots for 'diag'), for the default tolerance, a loose one,
    and EM cut short at 1 and 3 iterations."""
    X = torch.as_tensor(policy_like_samples(2, states=3, seed=6, samples=40), dtype=torch.float64)
    labels = dacer.kmeans_labels(X, 3)
    fit = dacer.fit_gmm(X, 3, covariance_type, tol=tol, max_iter=max_iter)
    assert fit.ok.all()
    iterations = []
    for b in range(len(X)):
        weights, means, cov, n_iter = reference_em(X[b].numpy(), labels[b].numpy(), 3, covariance_type, tol, max_iter)
        iterations.append(n_iter)
        assert np.allclose(fit.weights[b].numpy(), weights, rtol=0, atol=1e-10), b
        assert np.allclose(fit.means[b].numpy(), means, rtol=0, atol=1e-10), b
        assert np.allclose(fit.covariances[b].numpy(), cov, rtol=1e-9, atol=1e-12), b
        roots = np.linalg.cholesky(cov) if covariance_type == "full" else np.sqrt(cov)
        assert np.allclose(fit.chol[b].numpy(), roots, rtol=1e-9, atol=1e-12), b
    if (tol, max_iter) == (1e-3, 100):
        assert min(iterations) > 3, iterations  # so the cut-short cases stop early


def test_fit_gmm_convergence_is_on_the_absolute_change(monkeypatch):
    """scikit-learn stops when |L - L_previous| < tol: a mean log-likelihood that falls by 1 per iteration (scripted
    here) has not converged, and the fit runs on to max_iter."""
    X = torch.as_tensor(policy_like_samples(2, states=2, seed=6, samples=40), dtype=torch.float64)
    calls, original = [], dacer.gmm_log_resp

    def falling(*args):
        log_resp, bound = original(*args)
        calls.append(1)
        return log_resp, bound - len(calls)

    monkeypatch.setattr(dacer, "gmm_log_resp", falling)
    dacer.fit_gmm(X, 3, "full", max_iter=4)
    assert len(calls) == 4


def test_failed_fit_gives_nan():
    """A covariance without a Cholesky factor (here: no reg_covar and a collapsed component), where scikit-learn
    raises (checked at the end of this file), marks its state not ok; `gmm_entropy` returns NaN there, and the run
    stops at its next log step."""
    samples = policy_like_samples(2, states=2).astype(np.float64)
    samples[1, :100] = samples[1, 0]  # half of the second state's samples at one point
    fit = dacer.fit_gmm(torch.as_tensor(samples), 3, "full", reg_covar=0.0)
    assert fit.ok.tolist() == [True, False]


def stub_fit(covariance_type: str):
    """Two states' known mixtures in 2-d (the second with an empty component), repeated over any batch; one in
    three of the states is marked failed."""
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], dtype=torch.float64)
    a = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.2, -0.1], [-0.1, 0.4]], [[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    full = torch.stack([a, a.flip(0) * 0.5])
    covariances = full if covariance_type == "full" else full.diagonal(dim1=-2, dim2=-1)
    chol = torch.linalg.cholesky(full) if covariance_type == "full" else covariances.sqrt()

    def fit(X, n_components, cov_type="full", check_every=None):
        fit.calls.append((X.dtype, tuple(X.shape), n_components, cov_type))
        rows = torch.arange(len(X)) % 2
        ok = torch.arange(len(X)) % 3 != 2
        return dacer.GaussianMixtureFit(weights[rows], torch.zeros(len(X), 3, 2), covariances[rows], chol[rows], ok)

    fit.calls = []
    return fit, weights, full


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gmm_entropy_formula(monkeypatch, covariance_type):
    """H = -sum_k w_k log w_k + sum_k w_k [d/2 (1 + log 2 pi) + 1/2 log det Sigma_k] (0 log 0 = 0) of the fitted
    mixtures (stubbed here with known ones), in float64, NaN where the fit failed; the states go to `fit_gmm` in
    groups of GMM_CPU_CHUNK on the CPU, all together elsewhere; `estimate_entropy` is the mean over the states."""
    fit, weights, full = stub_fit(covariance_type)
    monkeypatch.setattr(dacer, "fit_gmm", fit)
    det = torch.linalg.det(full) if covariance_type == "full" else full.diagonal(dim1=-2, dim2=-1).prod(-1)
    expected, d = [], 2
    for w, dets in zip(weights.tolist(), det.tolist(), strict=True):
        gaussians = sum(
            wk * (0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * math.log(dk)) for wk, dk in zip(w, dets, strict=True)
        )
        expected.append(-sum(wk * math.log(wk) for wk in w if wk > 0) + gaussians)
    samples = torch.zeros(4, 5, 2)  # S = 5 samples of d = 2 per state
    entropy = dacer.gmm_entropy(samples, covariance_type=covariance_type)
    assert fit.calls == [(torch.float64, (4, 5, 2), 3, covariance_type)]
    assert entropy.dtype == torch.float64 and torch.isnan(entropy[2])
    assert torch.allclose(entropy[[0, 1, 3]], torch.tensor(expected + expected[1:], dtype=torch.float64), atol=1e-12)
    fit.calls.clear()
    assert torch.isnan(dacer.estimate_entropy(samples, estimator=f"gmm-{covariance_type}"))
    assert fit.calls == [(torch.float64, (4, 5, 2), 3, covariance_type)]
    fit.calls.clear()
    dacer.gmm_entropy(torch.zeros(40, 5, 2), 3, covariance_type)
    assert [call[1][0] for call in fit.calls] == [32, 8]
    fit.calls.clear()
    monkeypatch.setattr(dacer, "syncs_are_free", lambda device: False)
    dacer.gmm_entropy(torch.zeros(40, 5, 2), 3, covariance_type)
    assert [call[1][0] for call in fit.calls] == [40]


def test_estimate_entropy_is_the_mean_over_states(monkeypatch):
    """Ĥ = mean_s H_s (the per-state entropies stubbed)."""
    monkeypatch.setattr(dacer, "gmm_entropy", lambda x, n, cov: torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64))
    assert dacer.estimate_entropy(np.zeros((3, 4, 2))).item() == pytest.approx(3.0)


def test_gmm_entropy_on_low_dimensional_gaussian():
    """At d = 3 with 2000 samples: one component recovers the Gaussian's entropy; the paper's three-component formula
    -sum w log w + sum w H_k upper-bounds the mixture entropy, by at most log 3. Diagonal components drop correlations,
    so they are exact only for an axis-aligned Gaussian (and overestimate a correlated one)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3)) * 0.3 + 0.5 * np.eye(3)
    for cov in (a @ a.T, np.diag([0.04, 0.25, 1.0])):
        true = 0.5 * 3 * (1 + math.log(2 * math.pi)) + 0.5 * np.linalg.slogdet(cov)[1]
        samples = rng.multivariate_normal(np.zeros(3), cov, size=(4, 2000))
        assert dacer.estimate_entropy(samples, n_components=1).item() == pytest.approx(true, abs=0.05)
        full = dacer.estimate_entropy(samples, 3, "gmm-full").item()
        diag = dacer.estimate_entropy(samples, 3, "gmm-diag").item()
        assert true - 0.05 < full < true + math.log(3), (full, true)
        assert diag > true - 0.05, (diag, true)
    assert diag < true + math.log(3), (diag, true)


def test_gmm_entropy_at_80_dimensions():
    """The weakness noted in docs/algorithms/dacer.md: 200 isotropic samples (sigma 0.45, true entropy 49.6 nats) at
    d = 80. The paper's full-covariance estimate is rank-deficient and far too low (measured -23 to -53 over seeds
    0-2); diagonal components are within a few nats (47.7-48.3)."""
    true = 0.5 * 80 * (1 + math.log(2 * math.pi * 0.45**2))
    assert true == pytest.approx(49.63, abs=0.01)
    samples = np.random.default_rng(1).normal(size=(1, 200, 80)) * 0.45
    full = dacer.estimate_entropy(samples, 3, "gmm-full").item()
    diag = dacer.estimate_entropy(samples, 3, "gmm-diag").item()
    assert full < true - 60, full
    assert abs(diag - true) < 4, diag


def test_batched_gmm_chunking_and_device_path(monkeypatch):
    """The CPU path (chunks of GMM_CPU_CHUNK states, a convergence check every iteration) and the path taken on an
    accelerator (all states together, a check every GMM_CHECK_EVERY iterations, converged states masked) agree."""
    samples = torch.as_tensor(policy_like_samples(8, states=10, seed=3))
    cpu = {cov: dacer.gmm_entropy(samples, 3, cov) for cov in ("full", "diag")}
    monkeypatch.setattr(dacer, "GMM_CPU_CHUNK", 3)
    for cov in ("full", "diag"):
        assert torch.allclose(dacer.gmm_entropy(samples, 3, cov), cpu[cov], rtol=0, atol=GMM_ATOL)
    monkeypatch.setattr(dacer, "syncs_are_free", lambda device: False)
    for cov in ("full", "diag"):
        assert torch.allclose(dacer.gmm_entropy(samples, 3, cov), cpu[cov], rtol=0, atol=GMM_ATOL)


# ------------------------------------------------------------------- against scikit-learn itself (slow: at the end)
# The oracle: one scikit-learn GaussianMixture per state, as the official code fits them. The batched `fit_gmm` must
# reproduce it; so must the NumPy references above.
def sklearn_gmm(samples: np.ndarray, n_components: int = 3, covariance_type: str = "full"):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(n_components, covariance_type=covariance_type, reg_covar=1e-6, random_state=42)
        return gmm.fit(np.asarray(samples, dtype=np.float64))


def sklearn_gmm_entropy(samples: np.ndarray, n_components: int = 3, covariance_type: str = "full") -> float:
    """-sum_k w_k log w_k + sum_k w_k [d/2 (1 + log 2 pi) + 1/2 log det Sigma_k] of scikit-learn's fit to samples [S, d]."""
    gmm, d = sklearn_gmm(samples, n_components, covariance_type), samples.shape[1]
    if covariance_type == "full":
        log_dets = np.array([np.linalg.slogdet(cov)[1] for cov in gmm.covariances_])
    else:
        log_dets = np.log(gmm.covariances_).sum(-1)
    weights = gmm.weights_
    weight_entropy = -np.sum(np.where(weights > 0, weights * np.log(np.where(weights > 0, weights, 1.0)), 0.0))
    return float(weight_entropy + np.sum(weights * (0.5 * d * (1.0 + math.log(2 * math.pi)) + 0.5 * log_dets)))


def sklearn_kmeans(x: np.ndarray, n_clusters: int = 3, **kwargs):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters, n_init=1, random_state=42, **kwargs).fit(x.astype(np.float64))


def test_defaults_are_sklearns():
    """The defaults `kmeans_labels` and `fit_gmm` copy are scikit-learn's."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    kmeans, gmm = KMeans(), GaussianMixture()
    assert defaults(dacer.kmeans_labels)["max_iter"] == kmeans.max_iter and defaults(dacer.kmeans_labels)["tol"] == kmeans.tol
    fit_defaults = defaults(dacer.fit_gmm)
    assert (fit_defaults["reg_covar"], fit_defaults["tol"], fit_defaults["max_iter"]) == (gmm.reg_covar, gmm.tol, gmm.max_iter)


def test_references_match_sklearn():
    """The NumPy references the fast tests above use are scikit-learn's algorithms: one Lloyd step equals
    `lloyd_iter_chunked_dense` (with its empty-cluster relocation and averaging) on the `lloyd_cases`, the k-means
    labels equal KMeans's (also with a loose tol and max_iter 2), and EM from them equals GaussianMixture's."""
    from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense

    for x, centers in zip(*lloyd_cases(), strict=True):
        new, weights, labels, shift = np.zeros_like(centers), np.zeros(3), np.zeros(len(x), dtype=np.int32), np.zeros(3)
        lloyd_iter_chunked_dense(x, np.ones(len(x)), centers, new, weights, labels, shift, 1)
        ref_labels, ref_centers, ref_shift = reference_lloyd_step(x, centers)
        assert (
            np.array_equal(labels, ref_labels)
            and np.allclose(new, ref_centers)
            and (shift**2).sum() == pytest.approx(ref_shift)
        )
    for x in policy_like_samples(2, states=5, seed=5, samples=40).astype(np.float64):
        for kwargs in (dict(), dict(tol=0.02), dict(max_iter=2)):
            assert np.array_equal(reference_kmeans_labels(x, 3, **kwargs)[0], sklearn_kmeans(x, **kwargs).labels_), kwargs
    for x in policy_like_samples(2, states=3, seed=6, samples=40).astype(np.float64):
        labels = reference_kmeans_labels(x, 3)[0]
        for covariance_type in ("full", "diag"):
            gmm = sklearn_gmm(x, 3, covariance_type)
            weights, means, cov, n_iter = reference_em(x, labels, 3, covariance_type, 1e-3, 100)
            assert n_iter == gmm.n_iter_ and np.allclose(weights, gmm.weights_, atol=1e-10)
            assert np.allclose(means, gmm.means_, atol=1e-10) and np.allclose(cov, gmm.covariances_, atol=1e-10)


def test_kmeans_plusplus_draws_are_sklearns():
    """The seeding draws are RandomState(42)'s, as KMeans(random_state=42) consumes them: first choice(S, p), then
    2 + int(log K) uniforms per further center; with them, k-means++ seeds as scikit-learn's does."""
    first, uniforms = dacer.kmeans_plusplus_draws(200, 3)
    rng = np.random.RandomState(42)
    assert first == rng.choice(200, p=np.full(200, 1 / 200)) and uniforms.shape == (2, 3)
    assert np.array_equal(uniforms, [rng.uniform(size=3), rng.uniform(size=3)])
    assert dacer.kmeans_plusplus_draws(200, 1)[1].shape == (0, 2)
    for x in policy_like_samples(8, states=4).astype(np.float64):  # seeding and one Lloyd step, then the labelling
        one_step = sklearn_kmeans(x, max_iter=1).labels_
        assert np.array_equal(dacer.kmeans_labels(torch.as_tensor(x)[None], 3, max_iter=1)[0].numpy(), one_step)


def test_empty_clusters_relocated_as_sklearn():
    """Lloyd's empty-cluster step against scikit-learn's own `_relocate_empty_clusters_dense`: two of four clusters
    empty, they take the farthest and second-farthest points from their centers (no random case needed it in 20 000
    tries; the fits on policy samples never do)."""
    from sklearn.cluster._k_means_common import _relocate_empty_clusters_dense

    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3))
    centers = np.stack([x[:4].mean(0), x[4:].mean(0), x[0] + 5.0, x[1] - 5.0])  # clusters 2 and 3 get no point
    labels = ((x[:, None] - centers) ** 2).sum(-1).argmin(-1).astype(np.int32)
    counts = np.bincount(labels, minlength=4).astype(np.float64)
    sums = np.stack([x[labels == k].sum(0) if counts[k] else np.zeros(3) for k in range(4)])
    assert (counts[2:] == 0).all()
    expected_sums, expected_counts = sums.copy(), counts.copy()
    _relocate_empty_clusters_dense(x, np.ones(9), centers, expected_sums, expected_counts, labels)
    X, sums_t, counts_t = torch.as_tensor(x)[None], torch.as_tensor(sums)[None].clone(), torch.as_tensor(counts)[None]
    dist = torch.as_tensor(((x - centers[labels]) ** 2).sum(-1))[None]
    dacer.relocate_empty_clusters(X, torch.as_tensor(labels, dtype=torch.long)[None], dist, sums_t, counts_t)
    assert np.allclose(sums_t[0].numpy(), expected_sums) and np.array_equal(counts_t[0].numpy(), expected_counts)
    assert expected_counts[2:].tolist() == [1.0, 1.0] and expected_counts.sum() == 9  # both relocated


def test_failed_fit_raises_in_sklearn():
    """The state `test_failed_fit_gives_nan` marks not ok is one where scikit-learn raises."""
    from sklearn.mixture import GaussianMixture

    samples = policy_like_samples(2, states=2).astype(np.float64)
    samples[1, :100] = samples[1, 0]
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(3, reg_covar=0.0, random_state=42).fit(samples[1])


def test_repeated_responsibilities_end_the_fit_early(monkeypatch):
    """Well-separated clusters: the first E step gives back the k-means labels exactly, the parameters would repeat,
    and the fit stops after one E step, where scikit-learn stops after two with the same mixture."""
    rng = np.random.default_rng(0)
    centers = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    samples = (centers[rng.integers(0, 3, size=(2, 200))] + 0.1 * rng.normal(size=(2, 200, 2))).astype(np.float32)
    calls = []
    original = dacer.gmm_log_resp
    monkeypatch.setattr(dacer, "gmm_log_resp", lambda *a: calls.append(1) or original(*a))
    entropy = dacer.gmm_entropy(torch.as_tensor(samples), 3, "full").numpy()
    assert len(calls) == 1
    assert [sklearn_gmm(state).n_iter_ for state in samples] == [2, 2]
    assert np.allclose(entropy, [sklearn_gmm_entropy(state) for state in samples], rtol=0, atol=GMM_ATOL)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("d", [2, 8, 80])
def test_batched_gmm_matches_sklearn(d, covariance_type):
    """`fit_gmm` fits all states at once as scikit-learn fits each: the same k-means labels, the same mixture (up to
    rounding) and the same entropy estimate, to GMM_ATOL per state."""
    samples = policy_like_samples(d, seed=d)
    X = torch.as_tensor(samples, dtype=torch.float64)
    labels = dacer.kmeans_labels(X, 3).numpy()
    fit = dacer.fit_gmm(X, 3, covariance_type)
    entropy = dacer.gmm_entropy(torch.as_tensor(samples), 3, covariance_type).numpy()
    for b, state in enumerate(samples):
        gmm = sklearn_gmm(state, 3, covariance_type)
        assert np.array_equal(labels[b], sklearn_kmeans(state).labels_), b
        assert np.allclose(fit.weights[b].numpy(), gmm.weights_, rtol=0, atol=1e-9), b
        assert np.allclose(fit.means[b].numpy(), gmm.means_, rtol=0, atol=1e-9), b
        assert np.allclose(fit.covariances[b].numpy(), gmm.covariances_, rtol=1e-7, atol=1e-12), b
        assert entropy[b] == pytest.approx(sklearn_gmm_entropy(state, 3, covariance_type), abs=GMM_ATOL), b
    assert fit.ok.all()


def test_batched_gmm_on_heavily_clipped_samples():
    """With most coordinates at the box boundary, samples repeat and some lie at exactly equal distances from two
    k-means seeds; which seed wins is then decided by rounding, in scikit-learn as here, and a state may end in
    another local optimum. Measured on these samples (d = 2, 70 % of the coordinates clipped): 1 state of 32 (4 exact
    ties at the first Lloyd step), by 0.15 nats (full) and 0.44 (diag); the batch mean moves by 0.005 and 0.014."""
    samples = policy_like_samples(2, states=32, seed=2, clip=0.25)
    assert (np.abs(samples) == 0.25).mean() > 0.65
    for covariance_type in ("full", "diag"):
        ours = dacer.gmm_entropy(torch.as_tensor(samples), 3, covariance_type).numpy()
        reference = np.array([sklearn_gmm_entropy(state, 3, covariance_type) for state in samples])
        differs = np.abs(ours - reference) > GMM_ATOL
        assert differs.sum() <= 2 and np.abs(ours - reference).max() < 1.0, (ours - reference)[differs]
        assert abs(ours.mean() - reference.mean()) < 0.05


def test_alpha_step_entropy_is_sklearns():
    """The entropy the alpha step logs is the official estimate: one scikit-learn GaussianMixture per state."""
    actor, _, batch = tiny_agent()
    obs, args = batch.obs[:4], dacer.resolve_preset(dacer.Args(entropy_samples=20))
    noise, noise_std = actor.draw_noise(4 * 20, torch.Generator().manual_seed(3)), torch.tensor(0.45)
    with torch.no_grad():
        samples = actor.sample(obs.repeat_interleave(20, dim=0), noise, noise_std).view(4, 20, 2).numpy()
    log_alpha = torch.tensor(math.log(3.0), requires_grad=True)
    logs = dacer.alpha_step(obs, noise, actor, log_alpha, PlainSGD([log_alpha], lr=0.1), noise_std, 0.0, args)
    assert logs["dacer/entropy"].item() == pytest.approx(np.mean([sklearn_gmm_entropy(state) for state in samples]))


# ------------------------------------------------------------------------------------------------------ the script
def test_smoke_myoleg_walk_with_alpha_steps(tmp_path):
    """myoLegWalk-v0 (|A| = 80): updates, the GMM/alpha step (every 40 updates) and evaluation all run."""
    proc = run_algo("dacer", "--env-id", "myoLegWalk-v0", "--num-envs", "2", "--eval-freq", "200", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert LOSS_KEYS <= set(scalars), sorted(scalars)
    assert all(math.isfinite(v) for key in LOSS_KEYS for _, v in scalars[key])
    assert [step for step, _ in scalars["eval/episodic_return"]][:2] == [0, 200]  # the untrained policy, then periodic
    assert scalars["losses/alpha"][-1][1] != pytest.approx(3.0)  # alpha steps at updates 0, 40, 80 moved alpha
    assert scalars["dacer/target_entropy"][-1][1] == pytest.approx(-72.0)
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["num_updates"] == (300 - 100) // 2 + 1 and "eval/success_rate" in scalars
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "qflex-protocol" and config["beta_schedule"] == "linear" and config["lr_schedule"] == "linear"
    assert "final eval over 1 episodes" in proc.stdout


def test_smoke_paper_preset_and_resume_continues_at_same_step(tmp_path):
    """ChainReach16-v0 with the paper preset (VP schedule), an explicit override, a checkpoint, and a resume."""
    flags = ["--env-id", "ChainReach16-v0", "--preset", "paper", "--num-envs", "2", "--q-lr", "5e-4", "--save-model",
             "--save-buffer"]  # fmt: skip
    run_algo("dacer", *flags, "--eval-freq", "0", "--num-timesteps", "5", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["beta_schedule"] == "vp" and config["policy_lr"] == 1e-4 and config["q_lr"] == 5e-4
    checkpoint_path = tmp_path / "models" / run_dir.name / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["global_step"] == 300 and checkpoint["num_updates"] == 101 and (checkpoint["std_ema"] > 0).all()
    # optimiser steps: critics every update, the policy on updates 0, 2, ..., alpha on updates 0, 40, 80
    assert optimizer_steps(checkpoint) == dict(q_optimizer=101, actor_optimizer=51, a_optimizer=3)
    resumed = resume_to("dacer", run_dir, checkpoint_path, 400, cwd=tmp_path)
    assert resumed["global_step"] == 400 and resumed["num_updates"] == 151
    assert optimizer_steps(resumed) == dict(q_optimizer=151, actor_optimizer=76, a_optimizer=4)


def optimizer_steps(checkpoint: dict) -> dict[str, int]:
    return {key: int(checkpoint[key]["state"][0]["step"]) for key in ("q_optimizer", "actor_optimizer", "a_optimizer")}


@pytest.mark.parametrize(
    "flags, message",
    [(["--entropy-samples", "2"], "--entropy-samples 2 is below --gmm-components 3"),
     (["--policy-delay", "0"], "--policy-delay must be positive, got 0"),
     (["--time-dim", "15"], "--time-dim must be a positive even number, got 15")],
)  # fmt: skip
def test_bad_input_fails_in_one_line(tmp_path, flags, message):
    proc = run_algo("dacer", *flags, cwd=tmp_path, check=False)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "runs").exists()


# Measured with these flags (final evaluation, the 5 fixed evaluation episodes): the untrained policy -106, zero action
# -110, the best constant corner action -47.5, the scripted reaching controller -13; DACER ends at -64.5 (seed 1; seeds
# 2 and 3: -74.5, -60.8). T = 5, small networks, 750 updates and alpha0 = 1 (less clipping) keep it short; the
# threshold sits 20 below seed 1 and about 20 above the untrained policy.
LEARNING_FLAGS = ["--env-id", "ChainReach4-v0", "--seed", "1", "--num-envs", "4", "--total-timesteps", "4000",
                  "--learning-starts", "1000", "--hidden-dim", "64", "--batch-size", "128", "--num-timesteps", "5",
                  "--gamma", "0.9", "--alpha", "1", "--eval-freq", "0", "--final-eval-episodes", "5",
                  "--no-cuda"]  # fmt: skip
LEARNING_THRESHOLD = -85.0


def test_learns_chain_reach4(tmp_path):
    """DACER on ChainReach4-v0 ends clearly above its untrained policy."""
    run_algo("dacer", *LEARNING_FLAGS, cwd=tmp_path)
    final = final_eval(tmp_path)
    assert final["eval/episodic_return"] > LEARNING_THRESHOLD, final


# ------------------------------------------------------------------------------------ the training loop, in process
# A tiny run of the script's __main__ block in this process (the pattern of tests/test_sdac.py), with the step functions
# wrapped to record each call: its arguments, its result, and a probe of the run's state just before and just after it.
# tests/mutate.py never mutates __main__, so this is what checks the loop's wiring: the order of the steps in an update,
# their phases, and which networks (online or target) and which state (before or after the update) each one reads.


def flat(*modules) -> torch.Tensor:
    """All parameters of `modules`, flattened into one cloned tensor."""
    return torch.cat([p.detach().flatten().clone() for module in modules for p in module.parameters()])


def loop_state(namespace: dict) -> dict:
    """What the loop test reads around each step call: the update counter, the policy's parameters (a list, to load
    into a copy), the online and the target critics' weights, and log alpha."""
    return dict(
        update=namespace["num_updates"],
        actor=[p.detach().clone() for p in namespace["actor"].parameters()],
        critics=flat(namespace["qf1"], namespace["qf2"]),
        targets=flat(namespace["qf1_target"], namespace["qf2_target"]),
        log_alpha=namespace["log_alpha"].detach().clone(),
    )


def same_noise(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# 10 updates (global steps 12, 14, ..., 30): policy steps on updates 0, 3, 6, 9 (--policy-delay 3), alpha steps on
# 0, 2, 4, 6, 8 (--alpha-every 2), both on 0 and 6; the linear lr schedule decays over policy steps 1 to 5
LOOP_FLAGS = ["--env-id", "ChainReach4-v0", "--num-envs", "2", "--total-timesteps", "30", "--learning-starts", "12",
              "--batch-size", "4", "--buffer-size", "100", "--hidden-dim", "8", "--num-layers", "1", "--time-dim", "4",
              "--num-timesteps", "3", "--policy-delay", "3", "--alpha-every", "2", "--entropy-samples", "4",
              "--gmm-components", "2", "--lr-decay-begin", "1", "--lr-decay-steps", "4", "--eval-freq", "0",
              "--final-eval-episodes", "0", "--log-every", "4", "--no-cuda"]  # fmt: skip
LOOP_UPDATES, LOOP_BATCH, LOOP_SEED = 10, 4, 1
LOOP_POLICY_LRS = [3e-4, 3e-4, 3e-4 - 0.25 * 2.7e-4, 3e-4 - 0.5 * 2.7e-4]  # lr of policy steps 0..3: 3e-4 -> 3e-5


def test_loop_step_order_phases_and_what_each_step_reads(tmp_path, monkeypatch):
    """The update of docs/algorithms/dacer.md: a' ~ pi(.|s') first, then alpha_step on every --alpha-every-th update
    (from update 0), actor_step on every --policy-delay-th update (from update 0), critic_step on every update, and
    after it on policy updates polyak_update online -> target for qf1 then qf2. Every step reads the state from before
    the update: a' and the entropy samples come from the policy before its step, the policy step sees the online
    critics before theirs, and a', the alpha and the policy steps use kappa * alpha of before the alpha step. The
    critic step bootstraps from the target critics, the policy step uses the online ones; the critics move only in
    critic_step, the targets only in the Polyak steps, the policy only in actor_step. All steps of an update share one
    fresh replay batch; a', zeta, the entropy noise and the policy noise are drawn in that order from update_generator;
    the policy lr follows the linear schedule over policy steps."""
    names = ("alpha_step", "actor_step", "critic_step", "polyak_update")
    ns, calls = run_main_in_process(dacer, LOOP_FLAGS, tmp_path, monkeypatch, names, loop_state)
    actor, qf1, qf2, qf1_target, qf2_target, args = (ns[k] for k in ("actor", "qf1", "qf2", "qf1_target", "qf2_target",
                                                                     "args"))  # fmt: skip
    assert ns["num_updates"] == LOOP_UPDATES and args.lr_schedule == "linear" and args.autotune
    updates = [[call for call in calls if call.before["update"] == k] for k in range(LOOP_UPDATES)]
    assert sum(map(len, updates)) == len(calls)
    policy_turns, alpha_turns = [0, 3, 6, 9], [0, 2, 4, 6, 8]
    assert [[call.name for call in update] for update in updates] == [
        ["alpha_step"] * (k in alpha_turns) + ["actor_step"] * (k in policy_turns) + ["critic_step"]
        + ["polyak_update"] * 2 * (k in policy_turns) for k in range(LOOP_UPDATES)
    ]  # fmt: skip
    replay_generator = torch.Generator().manual_seed(LOOP_SEED + 2)
    update_generator = torch.Generator().manual_seed(LOOP_SEED + 1)
    start_actor = copy.deepcopy(actor)  # loaded with each update's starting policy to replay a'
    for k, update in enumerate(updates):
        calls_by_name = {call.name: call for call in update}  # the two Polyak calls are read from `update`
        critic, start = calls_by_name["critic_step"], update[0].before
        batch = critic.args[0]
        rows = torch.randint(0, 12 + 2 * k, (LOOP_BATCH,), generator=replay_generator)  # the buffer as it stood
        assert all(torch.equal(getattr(batch, field), ns["rb"].storage[field][rows]) for field in dacer.Batch._fields)
        noise_std = args.noise_scale * start["log_alpha"].exp()  # kappa * alpha of before this update's alpha step
        next_noise = actor.draw_noise(LOOP_BATCH, update_generator)
        zeta = torch.randn(LOOP_BATCH, generator=update_generator)
        with torch.no_grad():
            for p, value in zip(start_actor.parameters(), start["actor"], strict=True):
                p.copy_(value)
            next_actions = start_actor.sample(batch.next_obs, next_noise, noise_std)
        assert torch.equal(critic.args[1], next_actions) and torch.equal(critic.args[2], zeta)
        expected = (qf1, qf2, qf1_target, qf2_target, ns["q_optimizer"], ns["std_ema"], args)  # targets bootstrap
        assert all(passed is wanted for passed, wanted in zip(critic.args[3:], expected, strict=True))
        assert torch.equal(critic.before["critics"], start["critics"])  # nothing before it moved the online critics
        assert not torch.equal(critic.after["critics"], critic.before["critics"])
        assert torch.equal(critic.after["targets"], critic.before["targets"])
        if k in alpha_turns:
            alpha = calls_by_name["alpha_step"]
            entropy_noise = actor.draw_noise(LOOP_BATCH * args.entropy_samples, update_generator)
            assert alpha.args[0] is batch.obs and same_noise(alpha.args[1], entropy_noise)
            assert alpha.args[2] is actor and alpha.args[3] is ns["log_alpha"] and alpha.args[4] is ns["a_optimizer"]
            assert torch.equal(alpha.args[5], noise_std) and alpha.args[6] == pytest.approx(-0.9 * ns["act_dim"])
            assert alpha.args[7] is args
            assert not torch.equal(alpha.after["log_alpha"], alpha.before["log_alpha"])
        if k in policy_turns:
            policy = calls_by_name["actor_step"]
            pi_noise = actor.draw_noise(LOOP_BATCH, update_generator)
            assert policy.args[0] is batch and same_noise(policy.args[1], pi_noise)
            expected = (actor, qf1, qf2, ns["actor_optimizer"])  # the online critics
            assert all(passed is wanted for passed, wanted in zip(policy.args[2:6], expected, strict=True))
            assert torch.equal(policy.args[6], noise_std)  # alpha of before the alpha step
            assert policy.args[7] == pytest.approx(LOOP_POLICY_LRS[policy_turns.index(k)], rel=1e-12)
            assert torch.equal(policy.before["critics"], start["critics"])  # the critics before their step
            assert all(torch.equal(p, q) for p, q in zip(policy.before["actor"], start["actor"], strict=True))
            assert not all(torch.equal(p, q) for p, q in zip(policy.after["actor"], start["actor"], strict=True))
            (qf1_polyak, qf2_polyak) = [call.args for call in update if call.name == "polyak_update"]
            assert qf1_polyak[0] is qf1 and qf1_polyak[1] is qf1_target and qf1_polyak[2] == args.tau
            assert qf2_polyak[0] is qf2 and qf2_polyak[1] is qf2_target and qf2_polyak[2] == args.tau
            assert not torch.equal(update[-1].after["targets"], critic.after["targets"])
        # what the next update starts from: nothing moves a network between the steps recorded here
        end = updates[k + 1][0].before if k + 1 < LOOP_UPDATES else loop_state(ns)
        last = update[-1].after
        assert torch.equal(end["critics"], critic.after["critics"]) and torch.equal(end["targets"], last["targets"])
        assert all(torch.equal(p, q) for p, q in zip(end["actor"], last["actor"], strict=True))
        assert torch.equal(end["log_alpha"], last["log_alpha"])
    assert adam_steps(ns["q_optimizer"]) == LOOP_UPDATES and adam_steps(ns["actor_optimizer"]) == len(policy_turns)
    assert adam_steps(ns["a_optimizer"]) == len(alpha_turns)
