# docs and experiment results can be found at docs/algorithms/sdac.md
"""Soft Diffusion Actor-Critic, SDAC (Ma et al., ICML 2025, arXiv 2502.00361), as its camera-ready code, in one file.

A diffusion policy eps_theta(s, x, t) learns by reweighted score matching: a best-of-N action, noised to a random step
t, is regressed onto reverse-sample noises weighted by softmax((5 / alpha) min_i Q_i) (`actor_step`); twin MSE critics
bootstrap from best-of-N actions with no entropy term (`critic_step`); alpha follows the analytic entropy of the added
exploration noise (`alpha_step`); an EMA copy of the policy acts. Two presets (`--preset`; any flag you pass wins):
  * paper           the camera-ready scripts/train_mujoco.py (alpha lr 7e-3, 5 envs, 1M transitions);
  * qflex-protocol  (default) the SDAC the Qflex authors compared against, on myoLegWalk-v0's budget.
Equations, defaults and their sources: docs/algorithms/sdac.md.
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
    """target smoothing coefficient (critic targets and the EMA policy)"""
    policy_lr: float = 3e-4
    """the initial learning rate of the diffusion policy optimizer"""
    policy_lr_end: float = 3e-5
    """the policy learning rate after the linear decay (set it to --policy-lr for a constant lr)"""
    lr_decay_begin: int = 25_000
    """policy-optimiser step at which the linear lr decay begins"""
    lr_decay_steps: int = 50_000
    """policy-optimiser steps over which the lr decays linearly"""
    q_lr: float = 3e-4
    """the learning rate of the critic optimizer"""
    alpha_lr: float | None = None
    """the learning rate of the temperature optimizer (preset: paper 7e-3, qflex-protocol 3e-4)"""
    alpha_every: int = 250
    """updates between temperature steps"""
    alpha: float = 5.0
    """initial temperature alpha: exploration noise std --noise-scale * alpha, weight temperature alpha / --energy-scale"""
    autotune: bool = True
    """automatic tuning of alpha towards the target entropy (on the analytic entropy of the added noise)"""
    target_entropy_scale: float = 0.9
    """target entropy H-bar = -target_entropy_scale * |A|"""
    energy_scale: float = 5.0
    """reverse-sample weights are softmax(energy_scale / alpha * min Q) (5 = the initial alpha)"""
    num_particles: int = 32
    """best-of-N: chains sampled per state, the one with the largest min Q is kept"""
    num_reverse_samples: int = 64
    """reverse samples per state for the weighted score-matching loss"""
    noise_scale: float = 0.1
    """the exploration noise added to the best-of-N action has std noise_scale * alpha"""
    num_timesteps: int = 20
    """number of diffusion steps T"""
    beta_scale: float = 0.8
    """scale of the linear schedule beta_t = beta_scale * linspace(1e-4, 0.999, T)"""
    init_noise_scale: float = 0.5
    """the reverse chain starts from x_T ~ init_noise_scale * N(0, I)"""
    policy_delay: int = 2
    """one policy, EMA-policy and target-critic step after every policy_delay-th critic update"""
    hidden_dim: int = 256
    """width of every hidden layer (critics and noise-prediction network)"""
    num_layers: int = 3
    """number of hidden layers"""
    time_dim: int = 16
    """dimension of the sinusoidal time embedding"""
    reward_scale: float = 0.2
    """rewards are multiplied by this inside the update"""


PRESETS = {
    "paper": dict(total_timesteps=1_000_000, num_envs=5, learning_starts=30_000, alpha_lr=7e-3),
    "qflex-protocol": dict(total_timesteps=20_000_000, num_envs=80, learning_starts=30_000, alpha_lr=3e-4),
}  # fmt: skip
# Argument checks besides the common ones: (flags, rule) pairs with a rule of ARG_RULES, then (holds, message) pairs
# over several flags, the message formatted with the arguments.
ALGO_ARG_CHECKS = (
    (("policy_lr", "policy_lr_end", "lr_decay_steps", "q_lr", "alpha_lr", "alpha_every", "alpha", "energy_scale"), "positive"),
    (("num_particles", "num_reverse_samples", "num_timesteps", "beta_scale", "policy_delay", "hidden_dim"), "positive"),
    (("num_layers", "reward_scale"), "positive"),
    (("lr_decay_begin", "noise_scale", "init_noise_scale"), ">= 0"),
    (("tau",), "in (0, 1]"),
    (("time_dim",), "a positive even number"),
)
ALGO_ARG_CONSTRAINTS = ((lambda a: a.beta_scale * 0.999 < 1, "--beta-scale {beta_scale} makes the last beta >= 1"),)


# ALGO LOGIC: networks
def trunc_normal_init_(layer: nn.Linear) -> nn.Linear:
    """Haiku's default Linear init, used by the JAX reference code: N(0, 1/fan_in) truncated at 2 std, zero bias."""
    std = 1.0 / math.sqrt(layer.in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), nn.Mish()]
        width = hidden_dim
    return nn.Sequential(*layers)


class QNetwork(nn.Module):
    """Critic Q_i(s, a) -> [B]: concat(s, a), num_layers x (hidden_dim, mish), Linear(1); its target has no entropy term."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


class Actor(nn.Module):
    """Diffusion policy: noise-prediction network eps_theta(s, x, t) and its T-step reverse chain.

    eps_theta = Linear(d) o [Linear(hidden), mish] x L applied to concat(s, x, emb(t)), with
    emb = Linear(time_dim) o mish o Linear(2 time_dim) of the sinusoidal embedding.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, betas: np.ndarray, x_T_scale: float, time_dim: int
    ):
        super().__init__()
        self.obs_dim, self.act_dim, self.time_dim, self.x_T_scale = obs_dim, act_dim, time_dim, x_T_scale
        self.coef = diffusion_coefficients(betas)
        self.num_timesteps = len(betas)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), nn.Mish(), nn.Linear(2 * time_dim, time_dim))
        self.trunk = mlp(obs_dim + act_dim + time_dim, hidden_dim, num_layers)
        self.head = nn.Linear(hidden_dim, act_dim)
        for layer in (self.time_mlp[0], self.time_mlp[2], self.head):  # after the trunk: the init order is kept
            trunc_normal_init_(layer)
        # per-row tables for the noised actions of the policy loss (t differs between states)
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            self.register_buffer(name, torch.tensor(self.coef[name], dtype=torch.float32), persistent=False)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        return self.head(self.trunk(torch.cat([obs, x, emb], dim=1)))

    def chain(self, obs: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Run the reverse chain from x = x_T with step noises z[t].

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

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One chain per row from x_T ~ x_T_scale N(0, I), clipped to [-1, 1] (already inside: x0-hat is clipped)."""
        shape = (len(obs), self.act_dim)
        x_T = self.x_T_scale * torch.randn(shape, device=obs.device, generator=generator)
        z = torch.randn((self.num_timesteps, *shape), device=obs.device, generator=generator)
        return self.chain(obs, x_T, z).clamp(-1.0, 1.0)


# ALGO LOGIC: maths
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


@torch.no_grad()
def best_of_n(actor: Actor, qf1: nn.Module, qf2: nn.Module, obs: torch.Tensor, n: int, generator: torch.Generator):
    """Run n chains per state in one batched call and keep, per state, the one with the largest min_i Q_i(s, a)."""
    rows = obs.repeat_interleave(n, dim=0)
    candidates = actor.sample(rows, generator)
    q = torch.minimum(qf1(rows, candidates), qf2(rows, candidates)).view(len(obs), n)
    best = q.argmax(dim=1)
    return candidates.view(len(obs), n, -1)[torch.arange(len(obs), device=obs.device), best]


def bootstrap_target(rewards, terminations, next_q1, next_q2, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min_i Q-bar_i(s', a'); no entropy term; terminated only, never truncated."""
    return rewards + gamma * (1.0 - terminations) * torch.minimum(next_q1, next_q2)


def reverse_sample_weights(q_min: torch.Tensor, alpha: torch.Tensor, energy_scale: float = 5.0) -> torch.Tensor:
    """w_b^m = softmax_m(energy_scale / alpha * min_i Q_i(s_b, a-hat^m)) over the reverse samples of each state [B, M]."""
    return torch.softmax(energy_scale / alpha * q_min, dim=1)


def weighted_score_matching_loss(eps_pred: torch.Tensor, eps2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over (b, m, coordinate) of w_b^m (eps_pred_b - eps2_b^m)^2, eps_pred [B, d], eps2 [B, M, d], weights [B, M].

    Per state the minimiser is eps_pred = sum_m w^m eps2^m (weights sum to one): the Q-tilted noise."""
    return (weights[:, :, None] * (eps_pred[:, None] - eps2).pow(2)).mean()


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """1 / sum_m (w^m)^2 per state: M for uniform weights, 1 when one sample takes all the weight."""
    return 1.0 / weights.pow(2).sum(dim=1)


def entropy_approx(alpha: torch.Tensor, act_dim: int, noise_scale: float = 0.1) -> torch.Tensor:
    """H_approx = d/2 log(2 pi e (noise_scale alpha)^2): the entropy of the added Gaussian noise alone."""
    return 0.5 * act_dim * torch.log(2 * math.pi * math.e * (noise_scale * alpha) ** 2)


def temperature_loss(log_alpha: torch.Tensor, entropy: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """-log alpha * (H-bar - sg(H)): its gradient in log alpha is H - H-bar, so alpha falls while H > H-bar."""
    return -log_alpha * (target_entropy - entropy.detach())


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


def critic_step(batch: Batch, next_actions, qf1, qf2, qf1_target, qf2_target, q_optimizer, args) -> dict:
    """One step on sum_i mean (Q_i(s, a) - y)^2, y the entropy-free target of the Polyak critics at the best-of-N a'."""
    with torch.no_grad():
        next_q_value = bootstrap_target(
            args.reward_scale * batch.rewards,
            batch.terminations,
            qf1_target(batch.next_obs, next_actions),
            qf2_target(batch.next_obs, next_actions),
            args.gamma,
        )
    qf1_a_values = qf1(batch.obs, batch.actions)
    qf2_a_values = qf2(batch.obs, batch.actions)
    qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
    qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    q_optimizer.step()
    return {
        "losses/qf1_values": qf1_a_values.detach().mean(),
        "losses/qf2_values": qf2_a_values.detach().mean(),
        "losses/qf1_loss": qf1_loss.detach(),
        "losses/qf2_loss": qf2_loss.detach(),
        "losses/qf_loss": (qf1_loss + qf2_loss).detach() / 2.0,
    }


def actor_step(batch: Batch, a0, t, eps1, eps2, actor, qf1, qf2, actor_optimizer, alpha, lr: float, args):
    """One step of reweighted score matching at lr; returns the logs and the weights' effective sample size per state.

    a0 (a best-of-N action) is noised to a_t = sqrt(abar_t) a0 + sqrt(1 - abar_t) eps1; each reverse sample
    a-hat^m = clip((a_t - sqrt(1 - abar_t) eps2^m) / sqrt(abar_t), -1, 1) gets the weight softmax_m(energy_scale / alpha
    * min_i Q_i(s, a-hat^m)) from the critics as passed in, and eps_theta(s, a_t, t) regresses onto the weighted eps2^m.
    """
    with torch.no_grad():
        sqrt_ab = actor.sqrt_alphas_cumprod[t][:, None]
        sqrt_1m_ab = actor.sqrt_one_minus_alphas_cumprod[t][:, None]
        a_t = sqrt_ab * a0 + sqrt_1m_ab * eps1
        recon = ((a_t[:, None] - sqrt_1m_ab[:, None] * eps2) / sqrt_ab[:, None]).clamp(-1.0, 1.0)
        wide_obs = batch.obs.repeat_interleave(args.num_reverse_samples, dim=0)
        recon_rows = recon.view(-1, a0.shape[1])
        q_recon = torch.minimum(qf1(wide_obs, recon_rows), qf2(wide_obs, recon_rows))
        weights = reverse_sample_weights(q_recon.view(len(a0), -1), alpha, args.energy_scale)
    for group in actor_optimizer.param_groups:
        group["lr"] = lr
    eps_pred = actor(batch.obs, a_t, t)
    actor_loss = weighted_score_matching_loss(eps_pred, eps2, weights)
    actor_optimizer.zero_grad()
    actor_loss.backward()  # the weights carry no gradient: only eps_theta's parameters get one
    actor_optimizer.step()
    return {"losses/actor_loss": actor_loss.detach()}, effective_sample_size(weights)


def alpha_step(log_alpha, a_optimizer, target_entropy: float, act_dim: int, noise_scale: float) -> dict:
    """One step of the temperature loss on log alpha, H the analytic entropy of the added noise (`entropy_approx`)."""
    entropy = entropy_approx(log_alpha.detach().exp(), act_dim, noise_scale)
    alpha_loss = temperature_loss(log_alpha, entropy, target_entropy)
    a_optimizer.zero_grad()
    alpha_loss.backward()
    a_optimizer.step()
    return {"losses/alpha_loss": alpha_loss.detach()}


@torch.no_grad()
def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """phi-bar <- (1 - tau) phi-bar + tau phi (also theta-bar <- (1 - tau) theta-bar + tau theta, the EMA policy)."""
    for param, target_param in zip(online.parameters(), target.parameters(), strict=True):
        target_param.lerp_(param, tau)


# ALGO LOGIC: diagnostics
def sdac_diagnostics(log_alpha, actor_optimizer, ess_sum, ess_count, act_dim: int, args) -> dict:
    """Log-step scalars: alpha and what it sets (noise std, weight temperature, H_approx), the policy lr, and the mean
    effective sample size of the weights over the states of every policy step since the last log, overall and per t
    (its accumulators are then reset)."""
    alpha = log_alpha.detach().exp()
    logs = {
        "losses/alpha": alpha,
        "sdac/noise_std": args.noise_scale * alpha.double(),
        "sdac/weight_temperature": alpha.double() / args.energy_scale,
        "sdac/entropy_approx": entropy_approx(alpha, act_dim, args.noise_scale),
        "sdac/policy_lr": torch.tensor(actor_optimizer.param_groups[0]["lr"], dtype=torch.float64, device=alpha.device),
    }
    counts = ess_count.cpu()
    if counts.sum() > 0:
        sums = ess_sum.cpu()
        logs["sdac/ess"] = (sums.sum() / counts.sum()).to(alpha.device)
        for t in counts.nonzero().flatten().tolist():
            logs[f"sdac/ess_by_t/t{t:02d}"] = (sums[t] / counts[t]).to(alpha.device)
        ess_sum.zero_()
        ess_count.zero_()
    return logs


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
    betas = linear_beta_schedule(args.num_timesteps, args.beta_scale)
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers)
    actor_kwargs = dict(betas=betas, x_T_scale=args.init_noise_scale, time_dim=args.time_dim, **net_kwargs)
    actor = Actor(obs_dim, act_dim, **actor_kwargs).to(device)
    actor_ema = Actor(obs_dim, act_dim, **actor_kwargs).to(device)  # theta-bar: acts and evaluates
    actor_ema.load_state_dict(actor.state_dict())
    actor_ema.requires_grad_(False)
    qf1 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2_target = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    adam = dict(capturable=args.cudagraphs)  # CUDA graphs need the step count on the device
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam)
    target_entropy = -args.target_entropy_scale * act_dim
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, **adam)
    # --compile: the critic, actor and alpha steps and the Polyak updates under torch.compile (the scheduled
    # Python-float lr does not recompile: Dynamo traces floats as inputs). Eager: best_of_n (acting and a0/a'; it
    # draws from a torch.Generator inside, which does not trace).
    critic_step_fn, actor_step_fn = maybe_compile(critic_step, args), maybe_compile(actor_step, args)
    alpha_step_fn = maybe_compile(alpha_step, args)
    polyak_update_fn = maybe_compile(polyak_update, args)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)
    # effective sample size of the reverse-sample weights, summed per diffusion step t between logs
    ess_sum = torch.zeros(args.num_timesteps, device=device)
    ess_count = torch.zeros(args.num_timesteps, device=device)
    # Everything a checkpoint holds besides the counters; save and resume both read this one mapping.
    stateful = dict(actor=actor, actor_ema=actor_ema, qf1=qf1, qf2=qf2, qf1_target=qf1_target, qf2_target=qf2_target,
                    q_optimizer=q_optimizer, actor_optimizer=actor_optimizer, a_optimizer=a_optimizer,
                    log_alpha=log_alpha, ess_sum=ess_sum, ess_count=ess_count)  # fmt: skip

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action: best-of-N of the EMA policy under the online critics, no added noise, seeded chains."""
        generator = torch.Generator(device=device).manual_seed(observation_seed(obs))
        obs_t = torch.as_tensor(obs, device=device)
        return best_of_n(actor_ema, qf1, qf2, obs_t, args.num_particles, generator).clamp(-1.0, 1.0).cpu().numpy()

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
            with torch.no_grad():  # best-of-N of the EMA policy under the online critics, plus noise
                actions = best_of_n(
                    actor_ema, qf1, qf2, torch.as_tensor(obs, device=device), args.num_particles, act_generator
                )
                xi = torch.randn(actions.shape, device=device, generator=act_generator)
                actions = actions + args.noise_scale * log_alpha.detach().exp() * xi  # stored unclipped; the env clips
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
                batch = rb.sample(args.batch_size)
                policy_step = num_updates % args.policy_delay == 0
                alpha = log_alpha.detach().exp()
                with torch.no_grad():  # a' at s' and, on policy steps, a0 at s: one best-of-N call of the online policy
                    bon_obs = torch.cat([batch.next_obs, batch.obs]) if policy_step else batch.next_obs
                    bon_actions = best_of_n(actor, qf1, qf2, bon_obs, args.num_particles, update_generator)
                    xi = torch.randn(bon_actions.shape, device=device, generator=update_generator)
                    bon_actions = bon_actions + args.noise_scale * alpha * xi
                # The actor step runs first so that its weights, like everything in an update of the JAX reference,
                # read the critics before this update's critic step.
                if policy_step:
                    t = torch.randint(0, args.num_timesteps, (args.batch_size,), device=device, generator=update_generator)
                    eps1 = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                    eps2 = torch.randn(
                        (args.batch_size, args.num_reverse_samples, act_dim), device=device, generator=update_generator
                    )
                    policy_steps = num_updates // args.policy_delay  # optax counts the lr schedule in these
                    lr = linear_lr(policy_steps, args.policy_lr, args.policy_lr_end, args.lr_decay_begin, args.lr_decay_steps)
                    a0 = bon_actions[args.batch_size :]
                    actor_logs, ess = actor_step_fn(
                        batch, a0, t, eps1, eps2, actor, qf1, qf2, actor_optimizer, alpha, lr, args
                    )
                    logs.update(actor_logs)
                    ess_sum.index_add_(0, t, ess)
                    ess_count.index_add_(0, t, torch.ones_like(ess))
                next_actions = bon_actions[: args.batch_size]
                logs.update(critic_step_fn(batch, next_actions, qf1, qf2, qf1_target, qf2_target, q_optimizer, args))
                if args.autotune and num_updates % args.alpha_every == 0:
                    logs.update(alpha_step_fn(log_alpha, a_optimizer, target_entropy, act_dim, args.noise_scale))
                if policy_step:  # the target critics and the EMA policy
                    polyak_update_fn(qf1, qf1_target, args.tau)
                    polyak_update_fn(qf2, qf2_target, args.tau)
                    polyak_update_fn(actor, actor_ema, args.tau)
                num_updates += 1
                nonfinite |= nonfinite_loss(logs)
                if num_updates % args.log_every == 0:
                    logs = {k: v for k, v in logs.items() if not k.startswith("sdac/ess")}  # per log window, not stale
                    logs.update(sdac_diagnostics(log_alpha, actor_optimizer, ess_sum, ess_count, act_dim, args))
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
