# docs and experiment results can be found at docs/algorithms/dacer.md
"""DACER: Diffusion Actor-Critic with Entropy Regulator (Wang et al., NeurIPS 2024, arXiv 2405.15177), in one file.

A diffusion policy (T reverse steps of a noise-prediction network) is trained by back-propagating min_i Q_i through the
whole chain (`actor_step`); DSAC-T-style distributional twin critics learn an entropy-free target (`critic_step`);
exploration adds kappa * alpha * xi to the chain output, and alpha follows a Gaussian-mixture estimate of the policy's
entropy every 10k updates (`alpha_step`). Two presets (`--preset`; any flag you pass wins over them):
  * paper           the released code (happy-yan/DACER-Diffusion-with-Online-RL): VP schedule, lr 1e-4, 20 envs;
  * qflex-protocol  (default) the DACER of the Qflex comparison: linear schedule, lr 3e-4 decaying to 3e-5, 80 envs.
Equations, defaults and their sources: docs/algorithms/dacer.md.
"""

import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from envs import EnvError, NonFiniteGuard, check_env_id, evaluate, make_envs, split_vector_step
from envs.state import restore_vector_env_state, vector_env_state


@dataclass
class Args:
    # TRY NOT TO MODIFY: common arguments
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (sync_tensorboard)"""
    wandb_project_name: str = "qflex-bench"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to record the first episode of every evaluation round to videos/{run_name}/"""
    save_model: bool = False
    """whether to write atomic checkpoints to models/{run_name}/checkpoint.pt (every --checkpoint-every and at the end)"""
    checkpoint_every: int = 100_000
    """env transitions between checkpoints (with --save-model)"""
    save_buffer: bool = False
    """also store the replay buffer in checkpoints (exact resume; up to ~3.6 GB on myoLegWalk-v0)"""
    resume: str | None = None
    """path of a checkpoint to continue from, at its step, with its arguments (only budget/output flags may change)"""
    log_every: int = 100
    """gradient updates between scalar logs (losses, SPS, diagnostics)"""
    env_id: str = "myoLegWalk-v0"
    """the id of the environment (any registered id, or `module:EnvName-v0`)"""
    preset: Literal["paper", "qflex-protocol"] = "qflex-protocol"
    """hyperparameter preset: `paper` (as its authors released it) or `qflex-protocol` (as the Qflex authors ran it)"""
    total_timesteps: int | None = None
    """total env transitions, summed over all envs (default: the preset's)"""
    num_envs: int | None = None
    """number of parallel envs E (default: the preset's)"""
    async_envs: bool = False
    """use gymnasium's AsyncVectorEnv (one subprocess per env) instead of SyncVectorEnv"""
    env_workers: int | None = None
    """worker processes that step the envs through shared memory, with the same transitions bit for bit (0: step them
    in this process; default: one per core, at most num_envs, when num_envs >= 8, else 0)"""
    overlap: bool | None = None
    """train while the envs step; the update then samples the buffer as it stood before this vector step (default: on
    when the envs step in other processes, i.e. with --env-workers > 0 or --async-envs)"""
    env_backend: Literal["cpu", "mjlab"] = "cpu"
    """cpu: MuJoCo on CPU processes; mjlab: MyoSuite's GPU twin of the env id, num_envs worlds on MuJoCo Warp on the
    run's device (needs requirements-mjlab.txt; README)"""
    eval_backend: Literal["cpu", "mjlab"] = "cpu"
    """where evaluation episodes run: cpu, the paper's protocol and the per-run score; mjlab, a one-world twin"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int | None = None
    """env transitions of uniform random actions before updates start (default: the preset's)"""
    updates_per_step: int | None = None
    """gradient updates per vector-env step U, so UTD = U / num_envs per transition (default: the preset's, else 1)"""
    eval_freq: int | None = None
    """env transitions between evaluations (default min(1M, total/20)); 0 disables periodic evaluation"""
    eval_episodes: int = 5
    """episodes per periodic evaluation round (the algorithm's deterministic action, separate env)"""
    final_eval_episodes: int = 20
    """episodes of the final evaluation (the per-run score)"""
    compile: bool = False
    """torch.compile the update steps and the acting path"""
    cudagraphs: bool = False
    """CUDA only: capture the update as CUDA graphs; implies static shapes"""

    # ALGO LOGIC: algorithm specific arguments
    tau: float = 0.005
    """target smoothing coefficient (also the rate of the critics' std EMA)"""
    policy_lr: float | None = None
    """the (initial) learning rate of the diffusion policy optimizer (preset: paper 1e-4, qflex-protocol 3e-4)"""
    q_lr: float | None = None
    """the learning rate of the critic optimizer (preset: paper 1e-4, qflex-protocol 3e-4)"""
    lr_schedule: Literal["constant", "linear"] | None = None
    """policy lr: constant, or linear from --policy-lr to --policy-lr-end over policy steps [--lr-decay-begin,
    --lr-decay-begin + --lr-decay-steps] (preset: paper constant, qflex-protocol linear)"""
    policy_lr_end: float = 3e-5
    """final policy learning rate of the linear schedule"""
    lr_decay_begin: int = 25_000
    """policy step at which the linear lr decay begins"""
    lr_decay_steps: int = 50_000
    """policy steps over which the lr decays linearly"""
    policy_delay: int = 2
    """one policy step and one target-critic update on every policy_delay-th update (the critics step on every update)"""
    alpha_lr: float = 3e-2
    """the learning rate of the temperature optimizer"""
    alpha_every: int = 10_000
    """updates between temperature steps (each runs batch_size x --entropy-samples chains and batch_size GMM fits)"""
    alpha: float = 3.0
    """initial temperature alpha (the released code: log alpha = log 3); the exploration noise std is --noise-scale * alpha"""
    autotune: bool = True
    """automatic tuning of alpha towards the target entropy -target_entropy_scale * |A|"""
    target_entropy_scale: float = 0.9
    """target entropy H-bar = -target_entropy_scale * |A|"""
    entropy_estimator: Literal["gmm-full", "gmm-diag"] = "gmm-full"
    """entropy estimate for alpha: the paper's full-covariance GMM, or diagonal components (well conditioned at large |A|)"""
    entropy_samples: int = 200
    """actions drawn per batch state for the entropy estimate"""
    gmm_components: int = 3
    """Gaussian-mixture components of the entropy estimate"""
    noise_scale: float = 0.15
    """kappa: the exploration noise added to the chain output has std noise_scale * alpha"""
    num_timesteps: int = 20
    """number of diffusion steps T"""
    beta_schedule: Literal["vp", "linear"] | None = None
    """noise schedule: VP with x_T ~ N(0, I), or linear (--beta-scale) with x_T ~ 0.5 N(0, I)
    (preset: paper vp, qflex-protocol linear)"""
    beta_scale: float = 0.3
    """scale of the linear schedule beta_t = beta_scale * linspace(1e-4, 0.999, T)"""
    hidden_dim: int = 256
    """width of every hidden layer (critics and noise-prediction network)"""
    num_layers: int = 3
    """number of hidden layers"""
    time_dim: int = 16
    """dimension of the sinusoidal time embedding"""
    reward_scale: float = 0.2
    """rewards are multiplied by this inside the update"""


PRESETS = {
    "paper": dict(total_timesteps=30_000_000, num_envs=20, learning_starts=30_000, policy_lr=1e-4, q_lr=1e-4,
                  lr_schedule="constant", beta_schedule="vp"),
    "qflex-protocol": dict(total_timesteps=20_000_000, num_envs=80, learning_starts=30_000, policy_lr=3e-4, q_lr=3e-4,
                           lr_schedule="linear", beta_schedule="linear"),
}  # fmt: skip
# Argument checks besides the common ones: (flags, rule) pairs with a rule of ARG_RULES, then (holds, message) pairs
# over several flags, the message formatted with the arguments.
ALGO_ARG_CHECKS = (
    (("policy_lr", "q_lr", "policy_lr_end", "lr_decay_steps", "policy_delay", "hidden_dim", "num_layers"), "positive"),
    (("alpha_lr", "alpha_every", "alpha", "entropy_samples", "gmm_components", "num_timesteps", "beta_scale"), "positive"),
    (("reward_scale",), "positive"),
    (("lr_decay_begin", "noise_scale"), ">= 0"),
    (("tau",), "in (0, 1]"),
    (("time_dim",), "a positive even number"),
)
ALGO_ARG_CONSTRAINTS = (
    (lambda a: a.beta_schedule != "linear" or a.beta_scale * 0.999 < 1, "--beta-scale {beta_scale} makes the last beta >= 1"),
    (lambda a: not a.autotune or a.entropy_samples >= a.gmm_components,
     "--entropy-samples {entropy_samples} is below --gmm-components {gmm_components}"),
)  # fmt: skip


# ALGO LOGIC: networks
def trunc_normal_init_(layer: nn.Linear) -> nn.Linear:
    """Haiku's default Linear init, used by the JAX reference code: N(0, 1/fan_in) truncated at 2 std, zero bias."""
    std = 1.0 / math.sqrt(layer.in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dim: int, num_layers: int, activation: type[nn.Module]) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), activation()]
        width = hidden_dim
    return nn.Sequential(*layers)


class DistributionalQNetwork(nn.Module):
    """DSAC-T critic: concat(s, a) -> trunk -> (mean mu, softplus -> std sigma); its target has no entropy term."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, activation):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers, activation)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 2))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = self.head(self.trunk(torch.cat([obs, actions], dim=1))).unbind(-1)
        return mean, F.softplus(raw_std)


SAMPLE_CHUNK = 16_384  # rows per reverse-chain call when sampling for the entropy estimate (bounds activation memory)


class ChainNoise(NamedTuple):
    """Standard normal draws for N chains: start x_T [N, d] (scaled by x_T_scale), step noises z [T, N, d] and the
    exploration noise xi [N, d]."""

    x_T: torch.Tensor
    z: torch.Tensor
    xi: torch.Tensor

    def split(self, size: int) -> list["ChainNoise"]:
        parts = zip(self.x_T.split(size), self.z.split(size, dim=1), self.xi.split(size), strict=True)
        return [ChainNoise(*part) for part in parts]


class Actor(nn.Module):
    """Diffusion policy: noise-prediction network eps_theta(s, x, t) and its T-step reverse chain.

    eps_theta = Linear(d) o [Linear(hidden), mish] x L applied to concat(s, x, emb(t)), with
    emb = Linear(time_dim) o mish o Linear(2 time_dim) of the sinusoidal embedding.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int,
        num_layers: int,
        activation,
        betas: np.ndarray,
        x_T_scale: float,
        time_dim: int,
    ):
        super().__init__()
        self.obs_dim, self.act_dim, self.time_dim, self.x_T_scale = obs_dim, act_dim, time_dim, x_T_scale
        self.coef = diffusion_coefficients(betas)
        self.num_timesteps = len(betas)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), activation(), nn.Linear(2 * time_dim, time_dim))
        self.trunk = mlp(obs_dim + act_dim + time_dim, hidden_dim, num_layers, activation)
        self.head = nn.Linear(hidden_dim, act_dim)
        for layer in (self.time_mlp[0], self.time_mlp[2], self.head):
            trunc_normal_init_(layer)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        return self.head(self.trunk(torch.cat([obs, x, emb], dim=1)))

    def chain(self, obs: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Run the reverse chain from x = x_T with step noises z[t]; differentiable in the parameters.

        Same maths as calling forward() at every step, cheaper: the first layer is split by input, and its state
        part W_s s + b and time part W_e emb(t) are computed once per chain instead of once per step."""
        first = self.trunk[0]
        w_obs, w_act, w_emb = first.weight.split([self.obs_dim, self.act_dim, self.time_dim], dim=1)
        obs_part = F.linear(obs, w_obs, first.bias)
        steps = torch.arange(self.num_timesteps, device=obs.device)
        emb_part = F.linear(self.time_mlp(timestep_embedding(steps, self.time_dim)), w_emb)
        for t in reversed(range(self.num_timesteps)):
            hidden = self.trunk[1:](obs_part + emb_part[t] + F.linear(x, w_act))
            x = reverse_step(x, self.head(hidden), self.coef, t, z[t])
        return x

    def draw_noise(self, rows: int, generator: torch.Generator) -> ChainNoise:
        """ChainNoise for `rows` chains from `generator`, SAMPLE_CHUNK rows at a time (x_T, z, xi of each in turn)."""
        parts = []
        for start in range(0, rows, SAMPLE_CHUNK):
            shape = (min(SAMPLE_CHUNK, rows - start), self.act_dim)
            shapes = (shape, (self.num_timesteps, *shape), shape)
            parts.append([torch.randn(s, device=generator.device, generator=generator) for s in shapes])
        x_T, z, xi = zip(*parts, strict=True)
        return ChainNoise(torch.cat(x_T), torch.cat(z, dim=1), torch.cat(xi))

    def sample(self, obs: torch.Tensor, noise: ChainNoise, noise_std) -> torch.Tensor:
        """a = clip(chain(s) + noise_std * xi, -1, 1) from x_T = x_T_scale * noise.x_T; noise_std = kappa * alpha."""
        x = self.chain(obs, self.x_T_scale * noise.x_T, noise.z)
        return (x + noise_std * noise.xi).clamp(-1.0, 1.0)


# ALGO LOGIC: maths
def vp_beta_schedule(num_timesteps: int, b_min: float = 0.1, b_max: float = 10.0) -> np.ndarray:
    """VP-SDE discretisation: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2T^2)), t = 1..T."""
    t = np.arange(1, num_timesteps + 1, dtype=np.float64)
    T = num_timesteps
    return 1.0 - np.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)


def linear_beta_schedule(num_timesteps: int, scale: float, start: float = 1e-4, end: float = 0.999) -> np.ndarray:
    """beta_t = scale * linspace(start, end, T)."""
    return scale * np.linspace(start, end, num_timesteps, dtype=np.float64)


def diffusion_coefficients(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 tables of the forward process and of its posterior q(x_{t-1} | x_t, x_0), index t = 0..T-1.

    alpha-bar_t = prod_{tau <= t} (1 - beta_tau) with alpha-bar_{-1} = 1; the posterior has mean
    c1_t x_0 + c2_t x_t and variance beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) (log clipped at 1e-20).
    """
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def reverse_step(x: torch.Tensor, eps_pred: torch.Tensor, coef: dict[str, np.ndarray], t: int, z: torch.Tensor):
    """One ancestral step x_t -> x_{t-1}: x0-hat = clip(x / sqrt(abar_t) - eps * sqrt(1/abar_t - 1), -1, 1), then
    the posterior mean c1_t x0-hat + c2_t x plus exp(logvar_t / 2) z, without noise at t = 0."""
    x0_hat = x * float(coef["sqrt_recip_alphas_cumprod"][t]) - eps_pred * float(coef["sqrt_recipm1_alphas_cumprod"][t])
    mean = float(coef["posterior_mean_coef1"][t]) * x0_hat.clamp(-1.0, 1.0) + float(coef["posterior_mean_coef2"][t]) * x
    if t == 0:
        return mean
    return mean + math.exp(0.5 * float(coef["posterior_log_variance_clipped"][t])) * z


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin(t f_j), cos(t f_j)] / sqrt(dim), f_j = 10000^(-j / (dim/2)), j = 0..dim/2-1."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1) / math.sqrt(dim)


def bootstrap_target(rewards, terminations, next_q1, next_q2, zeta, gamma: float):
    """DSAC-T targets from the target critics' (mean, std) at (s', a'), no entropy term; terminated only, never truncated:
    y_mean = r + gamma (1 - terminated) min_i mu_i and y_sample = r + gamma (1 - terminated) (mu_j + sigma_j zeta),
    with j = argmin_i mu_i and zeta ~ N(0, 1) clipped here to [-3, 3]."""
    (mean1, std1), (mean2, std2) = next_q1, next_q2
    zeta = zeta.clamp(-3.0, 3.0)
    sample = torch.where(mean1 < mean2, mean1 + std1 * zeta, mean2 + std2 * zeta)
    discount = gamma * (1.0 - terminations)
    return rewards + discount * torch.minimum(mean1, mean2), rewards + discount * sample


def update_std_ema(std_ema: torch.Tensor, batch_mean_std: torch.Tensor, tau: float) -> torch.Tensor:
    """b <- (1 - tau) b + tau mean(sigma), initialised from the first batch (b < 0 marks 'not yet set')."""
    batch_mean_std = batch_mean_std.detach()
    return torch.where(std_ema < 0, batch_mean_std, (1.0 - tau) * std_ema + tau * batch_mean_std)


def distributional_critic_loss(
    mean: torch.Tensor,
    std: torch.Tensor,
    y_mean: torch.Tensor,
    y_sample: torch.Tensor,
    std_ema: torch.Tensor,
    eps_c: float = 0.1,
    td_clip: float = 3.0,
) -> torch.Tensor:
    """DSAC-T loss for one critic:
    -(b^2 + eps) mean[ mu sg(y_mean - mu) / (sd^2 + eps) + sigma ((sg(mu) - y_b)^2 - sd^2) / (sd^3 + eps) ],
    y_b = sg(mu + clip(y_sample - mu, -3b, 3b)), sd = sg(max(sigma, 0)): mu regresses towards y_mean with a
    sigma-normalised step, and sigma^2 towards the clipped squared TD error."""
    y_bound = (mean + (y_sample - mean).clamp(-td_clip * std_ema, td_clip * std_ema)).detach()
    std_detached = std.clamp(min=0.0).detach()
    mean_term = mean * (y_mean - mean).detach() / (std_detached.pow(2) + eps_c)
    std_term = std * ((mean.detach() - y_bound).pow(2) - std_detached.pow(2)) / (std_detached.pow(3) + eps_c)
    return -(std_ema.pow(2) + eps_c) * (mean_term + std_term).mean()


GMM_CHECK_EVERY = 5  # k-means / EM iterations between convergence checks (the fits' only host syncs) off the CPU
GMM_CPU_CHUNK = 32  # states fitted together on the CPU (their temporaries stay in cache; measured at d = 80)


def syncs_are_free(device: torch.device) -> bool:
    """Whether reading a device value on the host costs nothing (the CPU): the GMM fits then check convergence on
    every iteration, skip the empty-cluster step when no cluster is empty and fit GMM_CPU_CHUNK states at a time."""
    return device.type == "cpu"


def kmeans_plusplus_draws(n_samples: int, n_clusters: int) -> tuple[int, np.ndarray]:
    """The random numbers scikit-learn's k-means++ draws from RandomState(42) (GaussianMixture(random_state=42)'s
    'kmeans' init): the first center's index, then n_local_trials = 2 + int(log K) uniforms per further center.
    They do not depend on the data, so one set serves every state of a batch."""
    rng = np.random.RandomState(42)
    first = int(rng.choice(n_samples, p=np.ones(n_samples) / n_samples))
    n_local_trials = 2 + int(np.log(n_clusters))
    return first, np.array([rng.uniform(size=n_local_trials) for _ in range(n_clusters - 1)]).reshape(-1, n_local_trials)


def squared_distances(points: torch.Tensor, X: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """max(||p||^2 - 2 p.x + ||x||^2, 0) of points [B, P, d] to X [B, S, d] (x_sq = ||x||^2), as [B, P, S]."""
    return (-2.0 * points @ X.mT + points.square().sum(-1, keepdim=True) + x_sq[:, None]).clamp(min=0.0)


def relocate_empty_clusters(X: torch.Tensor, labels, dist, sums, counts) -> None:
    """scikit-learn's `_relocate_empty_clusters_dense`, in place on the label sums [B, K, d] and counts [B, K]: the
    j-th empty cluster of a state takes its j-th farthest point (dist [B, S]: squared distance to its center), which
    leaves its cluster; nothing moves where all distances are 0."""
    rows, K = torch.arange(len(X), device=X.device), counts.shape[1]
    farthest = dist.topk(K, dim=-1).indices  # farthest first
    empty = (counts == 0) & (dist.amax(-1) > 0)[:, None]
    rank = (counts == 0).long().cumsum(-1) - 1
    for j in range(K):  # cluster by cluster, as scikit-learn
        far = farthest[rows, rank[:, j].clamp(min=0)]
        move, x_far, old = empty[:, j], X[rows, far], labels[rows, far]
        sums[rows, old] -= move[:, None] * x_far
        counts[rows, old] -= move.to(X.dtype)
        sums[:, j] = torch.where(move[:, None], x_far, sums[:, j])
        counts[:, j] = torch.where(move, 1.0, counts[:, j])


def lloyd_step(X: torch.Tensor, Xt: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor):
    """One iteration of scikit-learn's `lloyd_iter_chunked_dense` on every state (X [B, S, d], Xt = X^T): labels
    [B, S] of the nearest of `centers` [B, K, d], the new centers (label means; an empty cluster takes the point
    farthest from its center, `_relocate_empty_clusters_dense`) and the squared centre shift [B]."""
    rows, K = torch.arange(len(X), device=X.device), centers.shape[1]
    scores = centers.square().sum(-1)[:, None] - 2.0 * X @ centers.mT  # [B, S, K], + ||x||^2 = squared distance
    min_score, labels = scores.min(-1)  # the first of equal minima, as scikit-learn's strict `<`
    one_hot = F.one_hot(labels, K).to(X.dtype)
    sums, counts = (Xt @ one_hot).mT, one_hot.sum(1)
    if not syncs_are_free(X.device) or bool((counts == 0).any()):  # a no-op unless a cluster is empty
        relocate_empty_clusters(X, labels, min_score + x_sq, sums, counts)
    means = sums * (1.0 / counts)[..., None]
    # `_average_centers`: a still-empty cluster copies the biggest one, averaged only if that one comes before it
    biggest = counts.argmax(-1)
    earlier = biggest[:, None, None] < torch.arange(K, device=X.device)[:, None]
    copy = torch.where(earlier, means[rows, biggest][:, None], sums[rows, biggest][:, None])
    new_centers = torch.where((counts > 0)[..., None], means, copy)
    shift = (new_centers - centers).square().sum(-1).sqrt()
    return labels, new_centers, shift.square().sum(-1)


def kmeans_labels(X: torch.Tensor, n_clusters: int, max_iter: int = 300, tol: float = 1e-4, check_every=None):
    """scikit-learn's KMeans(n_clusters, n_init=1, random_state=42).fit(x).labels_ for every state x = X[b] [S, d] at
    once: k-means++ seeding with `kmeans_plusplus_draws`, then Lloyd iterations until the labels repeat or the squared
    centre shift is <= tol * mean per-feature variance (then one more labelling), at most max_iter."""
    B, S, _ = X.shape
    X = X - X.mean(1, keepdim=True)  # as KMeans.fit does
    x_sq, rows = X.square().sum(-1), torch.arange(B, device=X.device)
    first, uniforms = kmeans_plusplus_draws(S, n_clusters)
    centers, closest = [X[:, first]], squared_distances(X[:, first : first + 1], X, x_sq)[:, 0]
    pot = closest.sum(-1)
    for u in torch.as_tensor(uniforms, dtype=X.dtype, device=X.device):
        candidates = torch.searchsorted(closest.cumsum(-1), u * pot[:, None]).clamp(max=S - 1)
        dist = torch.minimum(closest[:, None], squared_distances(X[rows[:, None], candidates], X, x_sq))
        pots = dist.sum(-1)
        best = pots.argmin(-1)
        pot, closest = pots[rows, best], dist[rows, best]
        centers.append(X[rows, candidates[rows, best]])
    ones = torch.ones(B, dtype=torch.bool, device=X.device)
    state = dict(idx=rows, X=X, Xt=X.mT.contiguous(), x_sq=x_sq, tol=x_sq.mean(-1) / X.shape[-1] * tol,
                 centers=torch.stack(centers, 1), labels=torch.full((B, S), -1, device=X.device), strict=~ones,
                 active=ones)  # fmt: skip
    out = torch.empty((B, S), dtype=torch.long, device=X.device)

    def finish(s, done):
        X, centers = s["X"][done], s["centers"][done]
        relabelled = (centers.square().sum(-1)[:, None] - 2.0 * X @ centers.mT).argmin(-1)  # the final labelling
        out[s["idx"][done]] = torch.where(s["strict"][done, None], s["labels"][done], relabelled)

    def step(s):
        labels, centers, shift = lloyd_step(s["X"], s["Xt"], s["x_sq"], s["centers"])
        strict, active = (labels == s["labels"]).all(-1), s["active"]
        s["centers"] = torch.where(active[:, None, None], centers, s["centers"])
        s["labels"] = torch.where(active[:, None], labels, s["labels"])
        s["strict"] = torch.where(active, strict, s["strict"])
        s["active"] = active & ~strict & (shift > s["tol"])

    iterate_batched(state, step, finish, max_iter, check_every)
    return out


def iterate_batched(state: dict, step, finish, max_iter: int, check_every=None) -> None:
    """Run step(state) up to max_iter times on the rows [b, ...] of the tensors of `state`; step must leave the rows
    with active = False unchanged. Every check_every iterations (every iteration where `syncs_are_free`) the batch
    sheds its inactive rows through finish(state, done) once they are 1/8 of it; at the end all go."""
    check_every = check_every or (1 if syncs_are_free(state["active"].device) else GMM_CHECK_EVERY)
    for it in range(1, max_iter + 1):
        step(state)
        if it % check_every == 0 and it < max_iter:
            done = ~state["active"]
            n_done = int(done.sum())  # one host sync
            if n_done == len(done):
                break
            if 8 * n_done >= len(done):
                finish(state, done)
                for key, value in state.items():
                    state[key] = value[~done]
    finish(state, torch.ones_like(state["active"]))


def gaussian_parameters(data: torch.Tensor, resp: torch.Tensor, reg_covar: float, covariance_type: str):
    """scikit-learn's `_estimate_gaussian_parameters` for every state from responsibilities resp [B, S, K] and the
    samples, data = X [B, S, d] ('full') or [X, X^2] [B, S, 2d] ('diag'): nk = sum resp + 10 eps
    [B, K], means [B, K, d] and covariances + reg_covar on the diagonal, [B, K, d, d] ('full', from the centred
    samples) or [B, K, d] ('diag', E[x^2] - mean^2)."""
    nk = resp.sum(1) + 10 * torch.finfo(resp.dtype).eps
    moments = resp.mT @ data / nk[..., None]
    if covariance_type == "full":
        B, S, d = data.shape
        diff = data[:, None] - moments[:, :, None]  # [B, K, S, d], times sqrt(resp): sum_i r_i diff_i diff_i^T
        diff *= resp.mT.sqrt()[..., None]
        diff = diff.view(-1, S, d)
        covariances = torch.bmm(diff.mT, diff).view(B, -1, d, d) / nk[..., None, None]
        covariances.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
        return nk, moments, covariances
    means, mean_squares = moments.chunk(2, dim=-1)
    return nk, means, mean_squares - means.square() + reg_covar


def covariance_cholesky(covariances: torch.Tensor, covariance_type: str):
    """Lower Cholesky factors of the covariances (their square roots for 'diag') and whether all exist [B] (where
    scikit-learn raises 'ill-defined empirical covariance')."""
    if covariance_type == "full":
        chol, info = torch.linalg.cholesky_ex(covariances)
        return chol, (info == 0).all(-1)
    return covariances.sqrt(), (covariances > 0).flatten(1).all(-1)


def gmm_log_resp(data: torch.Tensor, weights, means, chol, covariance_type: str):
    """E step: log responsibilities [B, S, K] and the mean log-likelihood [B] (scikit-learn's lower bound) of the
    samples under the mixture log w_k + log N(x | mu_k, Sigma_k), with scikit-learn's formulas: ||(x - mu) P||^2 with
    the precision's Cholesky factor P = L^-T ('full', data = X), or sum (mu^2 - 2 mu x + x^2) / sigma^2 ('diag',
    data = [X, X^2]); chol from `covariance_cholesky`."""
    B, K, d = means.shape
    if covariance_type == "full":
        eye = torch.eye(d, dtype=data.dtype, device=data.device)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^-1, so P = L^-T
        y = data[:, None] @ inverse.mT - (inverse @ means[..., None]).mT  # [B, K, S, d]
        log_prob = y.square().sum(-1).mT
        log_det = -chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        precisions = chol.reciprocal().square()
        coefficients = torch.cat([-2.0 * means * precisions, precisions], -1)  # [B, K, 2d]
        log_prob = (means.square() * precisions).sum(-1)[:, None] + data @ coefficients.mT
        log_det = -chol.log().sum(-1)
    weighted = -0.5 * (d * math.log(2 * math.pi) + log_prob) + (log_det + weights.log())[:, None]
    log_norm = weighted.logsumexp(-1)
    return weighted - log_norm[..., None], log_norm.mean(-1)


class GaussianMixtureFit(NamedTuple):
    """Fitted mixtures of B states: weights [B, K], means [B, K, d], covariances [B, K, d, d] ('full') or [B, K, d]
    ('diag'), their Cholesky factors (square roots for 'diag') and ok [B] (False: a covariance had no Cholesky factor,
    where scikit-learn raises)."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    chol: torch.Tensor
    ok: torch.Tensor


def fit_gmm(X: torch.Tensor, n_components: int, covariance_type: str = "full", reg_covar: float = 1e-6,
            tol: float = 1e-3, max_iter: int = 100, check_every=None) -> GaussianMixtureFit:  # fmt: skip
    """scikit-learn's GaussianMixture(n_components, covariance_type, reg_covar, tol, max_iter, random_state=42).fit(x)
    for every state x = X[b] [S, d] at once, on X's device and in its dtype: responsibilities from `kmeans_labels`,
    then E and M steps until the mean log-likelihood changes by less than tol (each state on its own) or max_iter."""
    B, S, _ = X.shape
    resp = F.one_hot(kmeans_labels(X, n_components, check_every=check_every), n_components).to(X.dtype)
    data = X if covariance_type == "full" else torch.cat([X, X.square()], -1)
    nk, means, covariances = gaussian_parameters(data, resp, reg_covar, covariance_type)
    chol, ok = covariance_cholesky(covariances, covariance_type)
    state = dict(idx=torch.arange(B, device=X.device), data=data, resp=resp, weights=nk / S, means=means,
                 covariances=covariances, chol=chol, lower_bound=torch.full((B,), -math.inf, dtype=X.dtype,
                 device=X.device), ok=ok, active=ok.clone())  # fmt: skip
    out = {key: torch.empty_like(state[key]) for key in GaussianMixtureFit._fields}

    def finish(s, done):
        for key, value in out.items():
            value[s["idx"][done]] = s[key][done]

    def step(s):
        log_resp, lower_bound = gmm_log_resp(s["data"], s["weights"], s["means"], s["chol"], covariance_type)
        resp = log_resp.exp()
        nk, means, covariances = gaussian_parameters(s["data"], resp, reg_covar, covariance_type)
        chol, ok = covariance_cholesky(covariances, covariance_type)
        active, converged = s["active"], (lower_bound - s["lower_bound"]).abs() < tol
        # Responsibilities equal to the last ones give the same parameters again, so scikit-learn's next iteration
        # would repeat this log-likelihood and stop: the row is done now, with these parameters.
        repeated = (resp == s["resp"]).flatten(1).all(-1)
        for key, value in dict(resp=resp, weights=nk / nk.sum(-1, keepdim=True), means=means, covariances=covariances,
                               chol=chol, lower_bound=lower_bound).items():  # fmt: skip
            s[key] = torch.where(active.view(-1, *[1] * (value.dim() - 1)), value, s[key])
        s["ok"] = s["ok"] & (ok | ~active)
        s["active"] = active & s["ok"] & ~converged & ~repeated

    iterate_batched(state, step, finish, max_iter, check_every)
    return GaussianMixtureFit(**out)


def gmm_entropy(samples: torch.Tensor, n_components: int = 3, covariance_type: str = "full", check_every=None):
    """Entropy [B] of the mixture `fit_gmm` fits to each state's samples [B, S, d] (in float64), as the paper computes
    it: -sum_k w_k log w_k + sum_k w_k [d/2 (1 + log 2 pi) + 1/2 log det Sigma_k] (an upper bound of the mixture
    entropy); NaN where the fit failed."""
    X = samples.to(torch.float64)
    if syncs_are_free(X.device) and len(X) > GMM_CPU_CHUNK:  # in cache-sized groups of states
        parts = [gmm_entropy(part, n_components, covariance_type, check_every) for part in X.split(GMM_CPU_CHUNK)]
        return torch.cat(parts)
    fit = fit_gmm(X, n_components, covariance_type, check_every=check_every)
    if covariance_type == "full":  # log det Sigma = 2 sum log diag L
        log_dets = 2.0 * fit.chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    else:
        log_dets = fit.covariances.log().sum(-1)
    w, d = fit.weights, samples.shape[-1]
    entropy = -torch.xlogy(w, w).sum(-1) + (w * (0.5 * d * (1.0 + math.log(2 * math.pi)) + 0.5 * log_dets)).sum(-1)
    return torch.where(fit.ok, entropy, math.nan)


def estimate_entropy(actions, n_components: int = 3, estimator: str = "gmm-full") -> torch.Tensor:
    """Mean over states of the GMM entropy (`gmm_entropy`) of actions [B, S, d] (S policy samples per state), a
    float64 scalar on their device."""
    covariance_type = {"gmm-full": "full", "gmm-diag": "diag"}[estimator]
    return gmm_entropy(torch.as_tensor(actions), n_components, covariance_type).mean()


def linear_lr(step: int, lr: float, lr_end: float, begin: int, steps: int) -> float:
    """optax.linear_schedule: lr until `begin`, then linear to lr_end over `steps`, then lr_end."""
    frac = min(max(step - begin, 0) / steps, 1.0)
    return lr + frac * (lr_end - lr)


def observation_seed(obs: np.ndarray) -> int:
    """A reproducible seed derived from the observation bytes (for the deterministic action's chain noise)."""
    return zlib.crc32(np.ascontiguousarray(obs, dtype=np.float32).tobytes())


# ALGO LOGIC: update steps
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminations: torch.Tensor


def critic_step(batch: Batch, next_actions, zeta, qf1, qf2, qf1_target, qf2_target, q_optimizer, std_ema, args) -> dict:
    """One step on L_1 + L_2 (`distributional_critic_loss`) towards the target critics' entropy-free targets at
    (s', a') (`bootstrap_target`); b_i (`std_ema`, updated in place) takes this batch's std first, as in the reference."""
    with torch.no_grad():
        y_mean, y_sample = bootstrap_target(
            args.reward_scale * batch.rewards,
            batch.terminations,
            qf1_target(batch.next_obs, next_actions),
            qf2_target(batch.next_obs, next_actions),
            zeta,
            args.gamma,
        )
    qf1_a_values, qf1_a_std = qf1(batch.obs, batch.actions)
    qf2_a_values, qf2_a_std = qf2(batch.obs, batch.actions)
    std_ema.copy_(update_std_ema(std_ema, torch.stack([qf1_a_std.mean(), qf2_a_std.mean()]), args.tau))
    qf1_loss = distributional_critic_loss(qf1_a_values, qf1_a_std, y_mean, y_sample, std_ema[0])
    qf2_loss = distributional_critic_loss(qf2_a_values, qf2_a_std, y_mean, y_sample, std_ema[1])
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    q_optimizer.step()
    return {
        "losses/qf1_values": qf1_a_values.detach().mean(),
        "losses/qf2_values": qf2_a_values.detach().mean(),
        "losses/qf1_loss": qf1_loss.detach(),
        "losses/qf2_loss": qf2_loss.detach(),
        "losses/qf_loss": (qf1_loss + qf2_loss).detach() / 2.0,
        "dacer/qf1_std": qf1_a_std.detach().mean(),
        "dacer/qf2_std": qf2_a_std.detach().mean(),
        "dacer/qf1_std_ema": std_ema[0].clone(),
        "dacer/qf2_std_ema": std_ema[1].clone(),
    }


def actor_step(batch: Batch, noise: ChainNoise, actor, qf1, qf2, actor_optimizer, noise_std, lr: float) -> dict:
    """One step at learning rate lr on -mean min_i mu_i(s, a), a = clip(chain(s) + kappa alpha xi, -1, 1), back-propagated
    through all T reverse steps; the critics get no gradient."""
    for group in actor_optimizer.param_groups:
        group["lr"] = lr
    pi = actor.sample(batch.obs, noise, noise_std)
    actor_loss = -torch.minimum(qf1(batch.obs, pi)[0], qf2(batch.obs, pi)[0]).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
    actor_optimizer.step()
    clipped_fraction = (pi.detach().abs() >= 1.0).float().mean()  # coordinates no gradient reaches through the clip
    return {"losses/actor_loss": actor_loss.detach(), "dacer/clipped_fraction": clipped_fraction}


def alpha_step(obs, noise: ChainNoise, actor, log_alpha, a_optimizer, noise_std, target_entropy: float, args) -> dict:
    """H = mean over the batch states of the GMM entropy (`estimate_entropy`) of --entropy-samples policy actions each
    (chain, noise and clip included), then one Adam step on -log alpha (H-bar - H): alpha grows while H < H-bar."""
    with torch.no_grad():
        rows = obs.repeat_interleave(args.entropy_samples, dim=0)
        parts = zip(rows.split(SAMPLE_CHUNK), noise.split(SAMPLE_CHUNK), strict=True)
        samples = torch.cat([actor.sample(part, part_noise, noise_std) for part, part_noise in parts])
        samples = samples.view(len(obs), args.entropy_samples, -1)
    entropy = estimate_entropy(samples, args.gmm_components, args.entropy_estimator).float()  # on the run's device
    alpha_loss = -log_alpha * (target_entropy - entropy)
    a_optimizer.zero_grad()
    alpha_loss.backward()
    a_optimizer.step()
    return {"losses/alpha_loss": alpha_loss.detach(), "dacer/entropy": entropy}


@torch.no_grad()
def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """phi-bar <- (1 - tau) phi-bar + tau phi."""
    for param, target_param in zip(online.parameters(), target.parameters(), strict=True):
        target_param.lerp_(param, tau)


def diagnostics(log_alpha, actor_optimizer, target_entropy: float, args) -> dict:
    """Scalars read at log steps only: alpha, the exploration noise std kappa * alpha, H-bar and the policy lr."""
    alpha = log_alpha.detach().exp()
    return {
        "losses/alpha": alpha,
        "dacer/noise_std": args.noise_scale * alpha.double(),
        "dacer/target_entropy": torch.tensor(target_entropy, device=alpha.device),
        "dacer/policy_lr": torch.tensor(actor_optimizer.param_groups[0]["lr"], device=alpha.device),
    }


# TRY NOT TO MODIFY: run plumbing
COMMON_ARG_CHECKS = (
    (("total_timesteps", "num_envs", "buffer_size", "batch_size", "updates_per_step", "eval_episodes"), "positive"),
    (("checkpoint_every", "log_every"), "positive"),
    (("learning_starts", "eval_freq", "final_eval_episodes"), ">= 0"),
    (("gamma",), "in (0, 1]"),
)
COMMON_ARG_CONSTRAINTS = (
    (lambda a: a.batch_size <= a.buffer_size, "--batch-size {batch_size} is larger than --buffer-size {buffer_size}"),
    (lambda a: a.num_envs <= a.buffer_size, "--num-envs {num_envs} is larger than --buffer-size {buffer_size}"),
    (lambda a: a.env_workers is None or a.env_workers >= 0, "--env-workers must be >= 0, got {env_workers}"),
    (lambda a: a.env_backend == "cpu" or not (a.env_workers or a.async_envs),
     "--env-backend mjlab steps its worlds on the run's device; --env-workers and --async-envs are for CPU envs"),
    (lambda a: a.learning_starts < a.total_timesteps,
     "--learning-starts {learning_starts} is not below --total-timesteps {total_timesteps}: no update would run"),
    (lambda a: not a.cudagraphs or (a.cuda and torch.cuda.is_available()),
     "--cudagraphs needs a CUDA device, and this run has none (no CUDA available, or --no-cuda)"),
)  # fmt: skip
ARG_RULES = {
    "positive": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "a positive even number": lambda v: v > 0 and v % 2 == 0,
}
# Flags a resumed run may change; everything else comes from the checkpoint so the run continues unchanged.
RESUME_OVERRIDES = ("total_timesteps", "resume", "save_model", "checkpoint_every", "save_buffer", "cuda", "track",
                    "wandb_project_name", "wandb_entity", "capture_video", "log_every", "eval_freq", "async_envs",
                    "env_workers", "compile", "cudagraphs")  # fmt: skip
# Seconds between status lines when stdout is not a terminal (nohup, Slurm, CI); the environment may override it.
STATUS_EVERY_S = float(os.environ.get("QFLEX_BENCH_STATUS_EVERY_S", "60"))


def resolve_preset(args: Args) -> Args:
    """Fill every flag left at None from the chosen preset (explicit flags win)."""
    for name, value in PRESETS[args.preset].items():  # a callable value is computed from the flags resolved before it
        if getattr(args, name) is None:
            setattr(args, name, value(args) if callable(value) else value)
    if args.updates_per_step is None:
        args.updates_per_step = 1
    if args.eval_freq is None:
        args.eval_freq = min(1_000_000, args.total_timesteps // 20)
    return args


def validate_args(args: Args) -> None:
    """Raise ValueError with a one-line message for arguments that cannot work."""
    for names, rule in COMMON_ARG_CHECKS + ALGO_ARG_CHECKS:
        for name in names:
            if not ARG_RULES[rule](getattr(args, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    for holds, message in COMMON_ARG_CONSTRAINTS + ALGO_ARG_CONSTRAINTS:
        if not holds(args):
            raise ValueError(message.format(**vars(args)))


def auto_env_workers(num_envs: int, env_backend: str = "cpu") -> int:
    """The default --env-workers: one worker per core (at most num_envs) from 8 envs on; fewer envs step in-process,
    and so does the GPU twin."""
    return min(os.cpu_count() or 1, num_envs) if num_envs >= 8 and env_backend == "cpu" else 0


# The torch.compile backend of --compile; the tests set "aot_eager" (no C++ code generation) to stay fast.
COMPILE_BACKEND = "inductor"


def maybe_compile(fn, args: Args):
    """`fn` under torch.compile with --compile or --cudagraphs (mode "reduce-overhead", i.e. CUDA graphs, with
    --cudagraphs; default mode otherwise), else `fn` itself: with both flags off the eager path is untouched."""
    if not (args.compile or args.cudagraphs):
        return fn
    if COMPILE_BACKEND != "inductor":  # modes are inductor options
        return torch.compile(fn, backend=COMPILE_BACKEND)
    return torch.compile(fn, mode="reduce-overhead" if args.cudagraphs else None)


def load_checkpoint(path: str, algo: str) -> dict:
    """Load a checkpoint written by `algo`.py, or raise ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algo") != algo:
        raise ValueError(f"{path} is not a {algo}.py checkpoint")
    return checkpoint


class GlobalRNG:
    """Python's, NumPy's and torch's global generators as one stateful object."""

    def state_dict(self) -> dict:
        return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


def state_of(obj):
    """What a checkpoint stores for one stateful object (module, optimizer, buffer, tensor or generator)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    return obj.state_dict()


def restore(obj, state) -> None:
    """Inverse of `state_of`, in place."""
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            obj.copy_(state)
    elif isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state
    else:
        obj.load_state_dict(state)


def crossed(prev_step: int, step: int, period: int) -> bool:
    """Whether a vector step from prev_step to step passed a multiple of period (steps advance by num_envs)."""
    return step // period > prev_step // period


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """`write(file)` into a temp file, fsync, then rename: a crash or a full disk never leaves a half-written checkpoint
    or result file, and the previous one stays. A failed write exits with one line and removes the temp file."""
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: cannot write {path}: {e.strerror or e}; the previous file is kept")


def atomic_write_json(obj, path: str) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def write_scalars(writer: SummaryWriter, scalars: dict, global_step: int) -> None:
    """Log a dict of device scalars with one host sync."""
    if scalars:
        for key, value in zip(scalars, torch.stack(list(scalars.values())).tolist(), strict=True):
            writer.add_scalar(key, value, global_step)


def nonfinite_loss(scalars: dict) -> torch.Tensor:
    """Device bool: whether any `*_loss` entry is NaN or infinite (read only at log and checkpoint steps)."""
    losses = [value for key, value in scalars.items() if key.endswith("_loss")]
    return ~torch.isfinite(torch.stack(losses)).all() if losses else torch.zeros((), dtype=torch.bool)


class Progress:
    """A tqdm bar on a terminal; elsewhere (nohup, Slurm, CI) one status line every STATUS_EVERY_S seconds."""

    def __init__(self, total: int, initial: int):
        self.total, self.tty, self.status = total, sys.stdout.isatty(), {}
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=not self.tty)
        self.last_print = time.time()

    def update(self, num_steps: int, global_step: int) -> None:
        self.bar.update(num_steps)
        if not self.tty and time.time() - self.last_print >= STATUS_EVERY_S:
            self.last_print = time.time()
            print(f"step {global_step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in self.status.items()), flush=True)

    def set(self, **status) -> None:
        self.status.update(status)
        self.bar.set_postfix(self.status, refresh=False)


class ReplayBuffer:
    """FIFO buffer preallocated on the device; uniform sampling with its own generator.

    Stores (s, a, r, s', terminated, truncated): a as the policy emitted it, r raw (any scaling happens inside the
    update), s' the true final observation at episode ends, `terminated` the bootstrap mask, `truncated` for logging.
    """

    fields = ("obs", "actions", "rewards", "next_obs", "terminations", "truncations")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, generator: torch.Generator):
        self.capacity, self.device, self.generator, self.pos, self.size = capacity, device, generator, 0, 0
        shapes = dict(obs=(capacity, obs_dim), actions=(capacity, act_dim), next_obs=(capacity, obs_dim))
        self.storage = {k: torch.empty(shapes.get(k, (capacity,)), dtype=torch.float32, device=device) for k in self.fields}

    def add(self, obs, actions, rewards, next_obs, terminations, truncations):
        idx = torch.arange(self.pos, self.pos + len(obs), device=self.device) % self.capacity
        for storage, rows in zip(
            self.storage.values(), (obs, actions, rewards, next_obs, terminations, truncations), strict=True
        ):
            storage[idx] = torch.as_tensor(rows, dtype=torch.float32).to(self.device, non_blocking=True)
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        return Batch(*(self.storage[k][idx] for k in Batch._fields))

    def state_dict(self) -> dict:
        # a copy of the filled rows only (a CPU slice would otherwise save the whole preallocated storage)
        return dict({k: v[: self.size].to("cpu", copy=True) for k, v in self.storage.items()}, pos=self.pos, size=self.size)

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.size = state["pos"], state["size"]
        for k, v in self.storage.items():
            v[: self.size] = state[k].to(self.device)


if __name__ == "__main__":
    # TRY NOT TO MODIFY: arguments, resume, seeding and env setup; nothing is written before all of them succeed
    args = tyro.cli(Args)
    algo, checkpoint = os.path.basename(__file__)[: -len(".py")], None
    try:
        if args.resume is not None:
            checkpoint = load_checkpoint(args.resume, algo)
            cli, defaults, saved = vars(args).copy(), vars(Args()), checkpoint["args"]
            fixed = [k for k in cli if k not in RESUME_OVERRIDES and cli[k] not in (defaults[k], saved.get(k))]
            if fixed:
                flags = ", ".join(f"--{k.replace('_', '-')}" for k in fixed)
                raise ValueError(f"a resumed run keeps the checkpoint's arguments; {flags} cannot change on --resume")
            args = Args(**saved)
            for name in RESUME_OVERRIDES:  # only flags given with a non-default value change the resumed run
                if cli[name] != defaults[name]:
                    setattr(args, name, cli[name])
            if args.total_timesteps <= checkpoint["global_step"]:
                raise ValueError(f"--total-timesteps {args.total_timesteps} is not past the checkpoint's step "
                                 f"{checkpoint['global_step']}: nothing to resume")  # fmt: skip
        resolve_preset(args)
        validate_args(args)
        check_env_id(args.env_id)
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if checkpoint and checkpoint.get("device") != device.type:  # generator states are device-specific
            raise ValueError(f"{args.resume} was written on {checkpoint.get('device')}; resume it there, not on {device.type}")
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_name = checkpoint["run_name"] if checkpoint else run_name
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        # Separate streams, so the logging frequency or evaluation never changes the training noise.
        act_generator = torch.Generator(device=device).manual_seed(args.seed)
        update_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
        replay_generator = torch.Generator(device=device).manual_seed(args.seed + 2)
        warmup_rng = np.random.default_rng(args.seed)
        eval_seed = args.seed + 10_000
        env_workers = args.env_workers if args.env_workers is not None else auto_env_workers(args.num_envs, args.env_backend)
        args.overlap = bool(env_workers or args.async_envs) if args.overlap is None else args.overlap
        envs, eval_env = make_envs(args.env_id, args.num_envs, args.seed, args.async_envs, run_name, args.capture_video,
                                   video_every=args.eval_episodes, eval_seed=eval_seed, env_workers=env_workers,
                                   backend=args.env_backend, eval_backend=args.eval_backend, device=device)  # fmt: skip
        if checkpoint and "env_state" in checkpoint:  # the envs continue exactly where the checkpoint left them
            restore_vector_env_state(envs, checkpoint["env_state"])
    except ValueError as e:  # EnvError included
        sys.exit(f"{args.exp_name}.py: error: {e}")
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))

    # ALGO LOGIC: initialize agent here
    if args.beta_schedule == "vp":
        betas, x_T_scale = vp_beta_schedule(args.num_timesteps), 1.0
    else:
        betas, x_T_scale = linear_beta_schedule(args.num_timesteps, args.beta_scale), 0.5
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers, activation=nn.Mish)
    actor = Actor(obs_dim, act_dim, betas=betas, x_T_scale=x_T_scale, time_dim=args.time_dim, **net_kwargs).to(device)
    qf1 = DistributionalQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = DistributionalQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target = DistributionalQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2_target = DistributionalQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    adam = dict(capturable=args.cudagraphs)  # CUDA graphs need the step count on the device
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam)
    policy_lr_end = args.policy_lr_end if args.lr_schedule == "linear" else args.policy_lr
    target_entropy = -args.target_entropy_scale * act_dim
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, **adam)
    # --compile: the critic and actor steps, the sampling chain (acting and a') and the Polyak update under
    # torch.compile (the scheduled Python-float lr does not recompile: Dynamo traces floats as inputs). Eager:
    # alpha_step (the GMM entropy fit iterates to convergence with data-dependent Python checks).
    critic_step_fn, polyak_update_fn = maybe_compile(critic_step, args), maybe_compile(polyak_update, args)
    actor_step_fn = maybe_compile(actor_step, args)
    sample_fn = maybe_compile(actor.sample, args)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)
    # b_i of the distributional loss: EMA of each critic's batch-mean std (-1 = not initialised yet).
    std_ema = torch.full((2,), -1.0, device=device)
    # Everything a checkpoint holds besides the counters; save and resume both read this one mapping.
    stateful = dict(actor=actor, qf1=qf1, qf2=qf2, qf1_target=qf1_target, qf2_target=qf2_target, q_optimizer=q_optimizer,
                    actor_optimizer=actor_optimizer, a_optimizer=a_optimizer, log_alpha=log_alpha,
                    std_ema=std_ema)  # fmt: skip

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action: the reverse chain without the kappa * alpha noise, chain noise seeded by the observation."""
        noise = actor.draw_noise(len(obs), torch.Generator(device=device).manual_seed(observation_seed(obs)))
        return actor.sample(torch.as_tensor(obs, device=device), noise, noise_std=0.0).cpu().numpy()

    # TRY NOT TO MODIFY: run directory, checkpoints and resume
    stateful.update(global_rng=GlobalRNG(), act_generator=act_generator, update_generator=update_generator,
                    replay_generator=replay_generator, warmup_rng=warmup_rng)  # fmt: skip
    global_step, num_updates = 0, 0
    if checkpoint:
        if "replay_buffer" in checkpoint:
            stateful["replay_buffer"] = rb
        missing = [key for key in stateful if key not in checkpoint]
        if missing:
            sys.exit(f"{args.exp_name}.py: error: {args.resume} lacks {', '.join(missing)}; it cannot be resumed")
        for key, obj in stateful.items():
            restore(obj, checkpoint[key])
        global_step, num_updates = checkpoint["global_step"], checkpoint["num_updates"]
    if args.save_buffer:
        stateful["replay_buffer"] = rb
    start_step, saved_step = global_step, global_step if checkpoint else None
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True, resume="allow" if checkpoint else None)  # fmt: skip
    # A resumed run rewrites what was logged after its checkpoint, and keeps everything up to the checkpoint's step.
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step + 1 if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    versions = {"torch": torch.__version__, "gymnasium": gym.__version__, "numpy": np.__version__}
    atomic_write_json(dict(vars(args), run_name=run_name, versions=versions), f"runs/{run_name}/config.json")
    where = f"{env_workers} worker processes" if env_workers else "this process"
    where = f"the mjlab twin on {device}" if args.env_backend == "mjlab" else where
    where += ", overlapped with the updates" if args.overlap else ""
    print(f"{run_name}: preset {args.preset}, " + ", ".join(f"{k}={getattr(args, k)}" for k in PRESETS[args.preset])
          + f"; {args.num_envs} envs stepped in {where}")  # fmt: skip

    def save_checkpoint():
        os.makedirs(f"models/{run_name}", exist_ok=True)
        state = {key: state_of(obj) for key, obj in stateful.items()}
        state.update(algo=algo, args=vars(args), run_name=run_name, device=device.type, global_step=global_step,
                     num_updates=num_updates, env_state=vector_env_state(envs), obs=obs, logs=logs)  # fmt: skip
        atomic_write(f"models/{run_name}/checkpoint.pt", lambda f: torch.save(state, f))
        return global_step

    def stop_if_nonfinite():
        """One host sync; called at log steps and before every checkpoint, so no bad state is ever saved."""
        if nonfinite.item():
            kept = f"the last good checkpoint (step {saved_step}) is kept" if saved_step is not None else "no checkpoint"
            sys.exit(
                f"{args.exp_name}.py: error: non-finite loss by step {global_step} (update {num_updates}); stopped, {kept}"
            )

    def evaluate_and_log(num_episodes: int) -> dict:
        scalars = evaluate(eval_env, deterministic_action, num_episodes, eval_seed).scalars()
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step)
        progress.set(eval=f"{scalars['eval/episodic_return']:.2f}")
        return scalars

    # TRY NOT TO MODIFY: start the game
    # the latest value of every logged scalar; a resumed run carries them on, as an uninterrupted one would
    logs = {key: value.to(device) for key, value in checkpoint.get("logs", {}).items()} if checkpoint else {}
    nonfinite, env_guard = torch.zeros((), dtype=torch.bool, device=device), NonFiniteGuard(args.env_id)
    progress = Progress(args.total_timesteps, global_step)
    if args.eval_freq and global_step == 0:  # the untrained policy, so every curve starts at step 0
        evaluate_and_log(args.eval_episodes)
    start_time = time.time()
    if checkpoint and "env_state" in checkpoint:  # the envs were restored with the rest; their observation too
        obs = checkpoint["obs"].to(device) if torch.is_tensor(checkpoint["obs"]) else checkpoint["obs"]  # the twin's
    else:
        obs, _ = envs.reset(seed=args.seed + global_step)

    def receive_step(obs, actions):
        """Wait for the vector step the envs are taking, log its finished episodes, store its transitions; the next obs."""
        next_obs, rewards, terminations, truncations, infos = envs.step_wait()

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        step = split_vector_step(next_obs, terminations, truncations, infos)
        for episode in step.finished:
            writer.add_scalar("charts/episodic_return", episode.episodic_return, global_step)
            writer.add_scalar("charts/episodic_length", episode.episodic_length, global_step)
            if episode.success is not None:
                writer.add_scalar("charts/episodic_success", episode.success, global_step)
            progress.set(ret=f"{episode.episodic_return:.1f}")

        # TRY NOT TO MODIFY: save data to replay buffer; handle `final_obs`
        try:  # NaN or infinite env data never enters the buffer; an env that keeps emitting it stops the run
            finite = env_guard.finite_rows(obs, rewards, step.real_next_obs, global_step)
        except EnvError as e:
            sys.exit(f"{args.exp_name}.py: error: {e}")
        transitions = (obs, actions, rewards, step.real_next_obs, step.terminated, step.truncated)
        if not finite.all():  # copies only on the rare steps that have a bad row
            writer.add_scalar("charts/nonfinite_env_transitions", env_guard.count, global_step)
            transitions = tuple(x[finite] for x in transitions)
        rb.add(*transitions)

        # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
        return next_obs  # becomes obs

    while global_step < args.total_timesteps:
        # ALGO LOGIC: put action logic here
        if global_step < args.learning_starts:
            actions = warmup_rng.uniform(-1.0, 1.0, (args.num_envs, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                noise = actor.draw_noise(args.num_envs, act_generator)
                noise_std = args.noise_scale * log_alpha.detach().exp()
                actions = sample_fn(torch.as_tensor(obs, device=device), noise, noise_std)
            actions = actions.clone()  # read after the update (--overlap), which may reuse a CUDA graph's output memory

        # TRY NOT TO MODIFY: execute the game and log data.
        envs.step_async(actions)
        prev_step, global_step = global_step, global_step + args.num_envs
        progress.update(args.num_envs, global_step)
        if not args.overlap:  # the update below samples the buffer with this vector step's transitions
            obs = receive_step(obs, actions)

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts and rb.size >= args.batch_size:
            for _ in range(args.updates_per_step):
                # Every step reads the state from before this update, as the JAX reference does: a' and the entropy
                # samples come from the policy before its step, and the policy step sees the critics before theirs.
                batch = rb.sample(args.batch_size)
                noise_std = args.noise_scale * log_alpha.detach().exp()  # kappa * alpha
                next_noise = actor.draw_noise(args.batch_size, update_generator)
                with torch.no_grad():
                    next_actions = sample_fn(batch.next_obs, next_noise, noise_std)
                zeta = torch.randn(args.batch_size, device=device, generator=update_generator)
                if args.autotune and num_updates % args.alpha_every == 0:
                    entropy_noise = actor.draw_noise(args.batch_size * args.entropy_samples, update_generator)
                    logs.update(
                        alpha_step(batch.obs, entropy_noise, actor, log_alpha, a_optimizer, noise_std, target_entropy, args)
                    )
                policy_update = num_updates % args.policy_delay == 0
                if policy_update:
                    pi_noise = actor.draw_noise(args.batch_size, update_generator)
                    policy_steps = num_updates // args.policy_delay  # policy steps before this one
                    lr = linear_lr(policy_steps, args.policy_lr, policy_lr_end, args.lr_decay_begin, args.lr_decay_steps)
                    logs.update(actor_step_fn(batch, pi_noise, actor, qf1, qf2, actor_optimizer, noise_std, lr))
                logs.update(
                    critic_step_fn(batch, next_actions, zeta, qf1, qf2, qf1_target, qf2_target, q_optimizer, std_ema, args)
                )
                if policy_update:
                    polyak_update_fn(qf1, qf1_target, args.tau)
                    polyak_update_fn(qf2, qf2_target, args.tau)
                num_updates += 1
                nonfinite |= nonfinite_loss(logs)
                if num_updates % args.log_every == 0:
                    logs.update(diagnostics(log_alpha, actor_optimizer, target_entropy, args))
                    # TRY NOT TO MODIFY: log the update
                    stop_if_nonfinite()
                    write_scalars(writer, logs, global_step)
                    sps = int((global_step - start_step) / (time.time() - start_time))
                    writer.add_scalar("charts/SPS", sps, global_step)
                    writer.add_scalar("charts/updates", num_updates, global_step)
                    progress.set(SPS=sps)

        # TRY NOT TO MODIFY: with --overlap, receive the vector step the envs took during the update
        if args.overlap:
            obs = receive_step(obs, actions)

        # TRY NOT TO MODIFY: evaluation and checkpoints, when global_step crosses a multiple of their period
        if args.eval_freq and crossed(prev_step, global_step, args.eval_freq) and global_step < args.total_timesteps:
            evaluate_and_log(args.eval_episodes)
        if args.save_model and crossed(prev_step, global_step, args.checkpoint_every):
            stop_if_nonfinite()
            saved_step = save_checkpoint()

    # TRY NOT TO MODIFY: final checkpoint and evaluation
    stop_if_nonfinite()
    if args.save_model:
        saved_step = save_checkpoint()
        print(f"checkpoint saved to models/{run_name}/checkpoint.pt")
    if args.final_eval_episodes:
        scalars = evaluate_and_log(args.final_eval_episodes)
        if not math.isfinite(scalars["eval/episodic_return"]):  # never a "score" that is not a number
            sys.exit(f"{args.exp_name}.py: error: the final evaluation's return is {scalars['eval/episodic_return']}")
        final = dict(scalars, global_step=global_step, num_updates=num_updates, episodes=args.final_eval_episodes,
                     wall_time=time.time() - start_time)  # fmt: skip
        atomic_write_json(final, f"runs/{run_name}/final_eval.json")
        print(
            f"final eval over {args.final_eval_episodes} episodes: return {scalars['eval/episodic_return']:.2f} "
            f"± {scalars['eval/episodic_return_std']:.2f}"
        )
    progress.bar.close()
    envs.close()
    eval_env.close()
    writer.close()
