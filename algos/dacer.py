# docs and experiment results can be found at README.md#dacerpy
"""DACER: Diffusion Actor-Critic with Entropy Regulator (Wang et al., NeurIPS 2024, arXiv 2405.15177), one file.

A diffusion policy (noise-prediction network eps_theta(s, x, t), T = 20 reverse steps) is trained by back-propagating
min_i Q_i through the whole reverse chain; exploration is Gaussian noise kappa * alpha * xi added to the chain output,
and alpha is adapted every 10k updates from a Gaussian-mixture estimate of the policy's entropy. The critics are
DSAC-T-style distributional twins (mean and std heads). Spec: ../shared/specs/baselines.md §3 and §6.

Two presets, chosen with --preset; every explicitly passed flag overrides them:
  * paper           the released code (happy-yan/DACER-Diffusion-with-Online-RL): VP noise schedule with
                    x_T ~ N(0, I), lr 1e-4 constant for critics and policy, 20 envs, 30k warm-up, 30M transitions
                    (the reference Humanoid budget).
  * qflex-protocol  (default) the DACER of the Qflex comparison, as reconstructed in baselines.md §6 items 1-2:
                    linear schedule beta_t = 0.3 * linspace(1e-4, 0.999, T) with x_T ~ 0.5 N(0, I), lr 3e-4, policy lr
                    decayed linearly to 3e-5 over policy-optimiser steps 25k-75k, 80 envs, 1 update per vector step,
                    30k warm-up, 20M transitions (the myoLegWalk-v0 budget).
Shared by both: 3x256 mish networks, truncated-normal 1/sqrt(fan_in) init, reward scale 0.2, tau 0.005, policy and
target updates every 2nd update, kappa 0.15, alpha0 = 3, alpha lr 3e-2 every 10k updates, H-bar = -0.9 d.

Choices where the spec leaves a point open:
  * Within one update everything reads the pre-update state, as the JAX reference does: the policy step (on even
    updates) runs before the critic step, so it sees the critics before this update's step, and the entropy for an
    alpha step is estimated with the policy before its step. Critic gradients never flow from the actor loss.
  * One clipped zeta ~ N(0, 1) per transition for the sampled target (the reference draws one per critic and keeps
    the one of the argmin critic: the same distribution).
  * The entropy estimate is the paper's GaussianMixture (3 full components, 200 samples per batch state, reg_covar
    1e-6, random_state 42). At |A| >= ~60 each full covariance is rank-deficient and the estimate is biased low by
    tens to ~100 nats (spec §3.5). `--entropy-estimator gmm-diag` fits diagonal components instead: 2d parameters
    per component, well conditioned at any |A|; it ignores correlations, so on a Gaussian it can only overestimate
    (Hadamard's inequality). On 200 isotropic samples at d = 80 (sigma 0.45, true entropy 49.6 nats) gmm-full returns
    -23 to -53 (seeds 0-2) and gmm-diag +47.7 to +48.3. The default stays the paper's estimator.
  * alpha0 = 3 as in the spec (the released network file initialises log alpha = 1.2, alpha 3.3; `--alpha 3.32`).
  * The deterministic (evaluation) action seeds its chain noise with a CRC32 of the observation bytes (the reference
    hashes mean(s) * std(s)); the chain runs without the kappa * alpha noise, then the result is clipped.
  * The GMM fits run on the CPU after the (device) sampling, synchronously: alpha is used right after its step.
  * The reverse chain evaluates eps_theta's first layer split by input: the state and time parts are computed once per
    chain, only the action part at every step (same maths; 38% fewer multiply-adds per step at myoLegWalk sizes).
  * `dacer/clipped_fraction` logs the share of policy-step action coordinates at the box boundary (no gradient
    reaches them through the final clip).
"""

import json
import math
import os
import random
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from envs import EnvIdError, check_env_id, evaluate, make_env, make_vector_env, split_vector_step


@dataclass
class Args:
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
    """gradient updates between scalar logs (losses, SPS)"""

    # Environment and protocol
    env_id: str = "myoLegWalk-v0"
    """the id of the environment (any registered id, or `module:EnvName-v0`)"""
    preset: Literal["paper", "qflex-protocol"] = "qflex-protocol"
    """hyperparameter preset: `paper` (the released DACER code) or `qflex-protocol` (the Qflex authors' comparison)"""
    total_timesteps: int | None = None
    """total env transitions, summed over all envs (preset: paper 30M, qflex-protocol 20M)"""
    num_envs: int | None = None
    """number of parallel envs E (preset: paper 20, qflex-protocol 80)"""
    async_envs: bool = False
    """use gymnasium's AsyncVectorEnv (subprocesses) instead of SyncVectorEnv"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (also the rate of the critics' std EMA)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int | None = None
    """env transitions of uniform random actions before updates start (preset: 30k)"""
    updates_per_step: int = 1
    """gradient updates per vector-env step U (UTD = U / num_envs per transition)"""
    eval_freq: int | None = None
    """env transitions between evaluations (default min(1M, total/20)); 0 disables periodic evaluation"""
    eval_episodes: int = 5
    """episodes per periodic evaluation round (deterministic policy, separate env)"""
    final_eval_episodes: int = 20
    """episodes of the final evaluation (the per-run score)"""

    # Algorithm specific arguments
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
    """policy-optimiser step at which the linear lr decay begins"""
    lr_decay_steps: int = 50_000
    """policy-optimiser steps over which the lr decays linearly"""
    alpha_lr: float = 3e-2
    """the learning rate of the temperature optimizer"""
    alpha_every: int = 10_000
    """updates between temperature steps (each runs batch_size x --entropy-samples chains and GMM fits)"""
    alpha: float = 3.0
    """initial temperature alpha; the exploration noise std is --noise-factor * alpha"""
    autotune: bool = True
    """automatic tuning of alpha towards the target entropy -0.9 |A|"""
    target_entropy_scale: float = 0.9
    """target entropy H-bar = -target_entropy_scale * |A|"""
    entropy_estimator: Literal["gmm-full", "gmm-diag"] = "gmm-full"
    """entropy estimate for alpha: the paper's full-covariance GMM, or diagonal components (well conditioned at
    large |A|; see the module docstring)"""
    entropy_samples: int = 200
    """actions drawn per batch state for the entropy estimate"""
    gmm_components: int = 3
    """Gaussian-mixture components of the entropy estimate"""
    noise_factor: float = 0.15
    """kappa: the exploration noise added to the chain output has std kappa * alpha"""
    num_timesteps: int = 20
    """number of diffusion steps T"""
    beta_schedule: Literal["vp", "linear"] | None = None
    """noise schedule: VP with x_T ~ N(0, I), or linear (--beta-scale) with x_T ~ 0.5 N(0, I)
    (preset: paper vp, qflex-protocol linear)"""
    beta_scale: float = 0.3
    """scale of the linear schedule beta_t = beta_scale * linspace(1e-4, 0.999, T)"""
    policy_frequency: int = 2
    """policy and target-critic updates happen on every policy_frequency-th update (critics every update)"""
    hidden_dim: int = 256
    """width of every hidden layer (critics and noise-prediction network)"""
    num_layers: int = 3
    """number of hidden layers"""
    time_dim: int = 16
    """dimension of the sinusoidal time embedding"""
    reward_scale: float = 0.2
    """rewards are multiplied by this inside the update"""


PRESETS = {
    "paper": dict(
        total_timesteps=30_000_000,
        num_envs=20,
        learning_starts=30_000,
        policy_lr=1e-4,
        q_lr=1e-4,
        lr_schedule="constant",
        beta_schedule="vp",
    ),
    "qflex-protocol": dict(
        total_timesteps=20_000_000,
        num_envs=80,
        learning_starts=30_000,
        policy_lr=3e-4,
        q_lr=3e-4,
        lr_schedule="linear",
        beta_schedule="linear",
    ),
}
# Flags a resumed run may change; everything else comes from the checkpoint so the run continues unchanged.
RESUME_OVERRIDES = (
    "total_timesteps",
    "resume",
    "save_model",
    "checkpoint_every",
    "save_buffer",
    "cuda",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "log_every",
    "eval_freq",
)


def resolve_preset(args: Args) -> Args:
    """Fill every flag left at None from the chosen preset (explicit flags win)."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.eval_freq is None:
        args.eval_freq = min(1_000_000, args.total_timesteps // 20)
    return args


def validate_args(args: Args) -> None:
    """Raise ValueError with a one-line message for arguments that cannot work."""
    positive = [
        "total_timesteps",
        "num_envs",
        "buffer_size",
        "batch_size",
        "updates_per_step",
        "eval_episodes",
        "policy_frequency",
        "hidden_dim",
        "num_layers",
        "checkpoint_every",
        "log_every",
        "policy_lr",
        "q_lr",
        "alpha_lr",
        "alpha",
        "reward_scale",
        "policy_lr_end",
        "lr_decay_steps",
        "alpha_every",
        "entropy_samples",
        "gmm_components",
        "num_timesteps",
        "beta_scale",
    ]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_freq", "final_eval_episodes", "lr_decay_begin", "noise_factor"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.num_envs > args.buffer_size:
        raise ValueError(f"--num-envs {args.num_envs} is larger than --buffer-size {args.buffer_size}")
    if not (0 < args.gamma <= 1 and 0 < args.tau <= 1):
        raise ValueError("--gamma and --tau must lie in (0, 1]")
    if args.time_dim % 2 or args.time_dim < 2:
        raise ValueError(f"--time-dim must be a positive even number, got {args.time_dim}")
    if args.beta_schedule == "linear" and not args.beta_scale * 0.999 < 1:
        raise ValueError(f"--beta-scale {args.beta_scale} makes the last beta >= 1")
    if args.autotune and args.entropy_samples < args.gmm_components:
        raise ValueError(f"--entropy-samples {args.entropy_samples} is below --gmm-components {args.gmm_components}")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algo") != "dacer":
        raise ValueError(f"{path} is not a dacer.py checkpoint")
    return checkpoint


def crossed(prev_step: int, step: int, period: int) -> bool:
    """Whether a vector step from prev_step to step passed a multiple of period (steps advance by num_envs)."""
    return step // period > prev_step // period


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temp file and rename, so a crash never leaves a half-written checkpoint."""
    tmp_path = path + ".tmp"
    torch.save(obj, tmp_path)
    os.replace(tmp_path, path)


def atomic_write_json(obj, path: str) -> None:
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp_path, path)


class ReplayBuffer:
    """FIFO buffer preallocated on the device; uniform sampling with its own generator.

    Stores (s, a, r, s', terminated, truncated): a as emitted by the policy, r raw (scaled inside the update),
    s' the true final observation at episode ends, `terminated` the bootstrap mask, `truncated` for logging only.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device, generator: torch.Generator):
        self.capacity, self.device, self.generator = capacity, device, generator
        self.obs = torch.empty((capacity, obs_dim), dtype=torch.float32, device=device)
        self.next_obs = torch.empty((capacity, obs_dim), dtype=torch.float32, device=device)
        self.actions = torch.empty((capacity, act_dim), dtype=torch.float32, device=device)
        self.rewards = torch.empty(capacity, dtype=torch.float32, device=device)
        self.terminations = torch.empty(capacity, dtype=torch.float32, device=device)
        self.truncations = torch.empty(capacity, dtype=torch.float32, device=device)
        self.pos, self.size = 0, 0

    def add(self, obs, actions, rewards, next_obs, terminations, truncations):
        n = len(obs)
        idx = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        for storage, rows in (
            (self.obs, obs),
            (self.actions, actions),
            (self.rewards, rewards),
            (self.next_obs, next_obs),
            (self.terminations, terminations),
            (self.truncations, truncations),
        ):
            storage[idx] = torch.as_tensor(rows, dtype=torch.float32).to(self.device, non_blocking=True)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int):
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminations[idx]

    def state_dict(self) -> dict:
        n = self.size
        return dict(
            pos=self.pos,
            size=n,
            obs=self.obs[:n].cpu(),
            next_obs=self.next_obs[:n].cpu(),
            actions=self.actions[:n].cpu(),
            rewards=self.rewards[:n].cpu(),
            terminations=self.terminations[:n].cpu(),
            truncations=self.truncations[:n].cpu(),
        )

    def load_state_dict(self, state: dict) -> None:
        n = state["size"]
        for name in ("obs", "next_obs", "actions", "rewards", "terminations", "truncations"):
            getattr(self, name)[:n] = state[name].to(self.device)
        self.pos, self.size = state["pos"], n


def trunc_normal_init_(layer: nn.Linear) -> nn.Linear:
    """Haiku's default Linear init, used by the JAX reference code: N(0, 1/fan_in) truncated at 2 std, zero bias."""
    std = 1.0 / math.sqrt(layer.in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dim: int, num_layers: int, activation: type[nn.Module], jax_init: bool) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(num_layers):
        linear = nn.Linear(width, hidden_dim)
        layers += [trunc_normal_init_(linear) if jax_init else linear, activation()]
        width = hidden_dim
    return nn.Sequential(*layers)


class SoftQNetwork(nn.Module):
    """Distributional critic (DSAC-T): concat(s, a) -> trunk -> (mean, softplus -> std)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, activation, jax_init: bool):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers, activation, jax_init)
        self.head = nn.Linear(hidden_dim, 2)
        if jax_init:
            trunc_normal_init_(self.head)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = self.head(self.trunk(torch.cat([obs, actions], dim=1))).unbind(-1)
        return mean, F.softplus(raw_std)


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
        jax_init: bool,
        betas: np.ndarray,
        x_T_scale: float,
        time_dim: int,
    ):
        super().__init__()
        self.obs_dim, self.act_dim, self.time_dim, self.x_T_scale = obs_dim, act_dim, time_dim, x_T_scale
        self.coef = diffusion_coefficients(betas)
        self.num_timesteps = len(betas)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), activation(), nn.Linear(2 * time_dim, time_dim))
        self.trunk = mlp(obs_dim + act_dim + time_dim, hidden_dim, num_layers, activation, jax_init)
        self.head = nn.Linear(hidden_dim, act_dim)
        if jax_init:
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

    def sample(self, obs: torch.Tensor, generator: torch.Generator, noise_std) -> torch.Tensor:
        """a = clip(chain(s) + noise_std * xi, -1, 1); noise_std = kappa * alpha (0: no exploration noise)."""
        shape = (len(obs), self.act_dim)
        x_T = self.x_T_scale * torch.randn(shape, device=obs.device, generator=generator)
        z = torch.randn((self.num_timesteps, *shape), device=obs.device, generator=generator)
        x = self.chain(obs, x_T, z)
        if not isinstance(noise_std, torch.Tensor) and noise_std == 0:
            return x.clamp(-1.0, 1.0)
        xi = torch.randn(shape, device=obs.device, generator=generator)
        return (x + noise_std * xi).clamp(-1.0, 1.0)


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


def gmm_entropy(samples: np.ndarray, n_components: int = 3, covariance_type: str = "full") -> float:
    """Entropy of a GaussianMixture fitted to samples [S, d], as the paper computes it:
    -sum_k w_k log w_k + sum_k w_k [d/2 (1 + log 2 pi) + 1/2 log det Sigma_k] (an upper bound of the mixture entropy)."""
    from sklearn.exceptions import ConvergenceWarning  # lazy: only alpha steps need scikit-learn (seconds to import)
    from sklearn.mixture import GaussianMixture

    d = samples.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(n_components, covariance_type=covariance_type, reg_covar=1e-6, random_state=42)
        gmm.fit(np.asarray(samples, dtype=np.float64))
    if covariance_type == "full":
        log_dets = np.array([np.linalg.slogdet(cov)[1] for cov in gmm.covariances_])
    else:
        log_dets = np.log(gmm.covariances_).sum(-1)
    weights = gmm.weights_
    weight_entropy = -np.sum(np.where(weights > 0, weights * np.log(np.where(weights > 0, weights, 1.0)), 0.0))
    return float(weight_entropy + np.sum(weights * (0.5 * d * (1.0 + math.log(2 * math.pi)) + 0.5 * log_dets)))


def estimate_entropy(actions: np.ndarray, n_components: int = 3, estimator: str = "gmm-full") -> float:
    """Mean over states of the GMM entropy of actions [B, S, d] (S policy samples per state)."""
    covariance_type = {"gmm-full": "full", "gmm-diag": "diag"}[estimator]
    return float(np.mean([gmm_entropy(state_actions, n_components, covariance_type) for state_actions in actions]))


def distributional_targets(rewards, terminations, next_q1, next_q2, zeta, gamma: float):
    """DSAC-T targets from the target critics' (mean, std) at (s', a'), no entropy term; terminated only, never truncated:
    y_mean = r + gamma (1 - terminated) min_i mu_i and y_sample = r + gamma (1 - terminated) (mu_j + sigma_j zeta),
    with j = argmin_i mu_i and zeta ~ N(0, 1) clipped to [-3, 3]."""
    (mean1, std1), (mean2, std2) = next_q1, next_q2
    sample = torch.where(mean1 < mean2, mean1 + std1 * zeta, mean2 + std2 * zeta)
    discount = gamma * (1.0 - terminations)
    return rewards + discount * torch.minimum(mean1, mean2), rewards + discount * sample


def linear_lr(step: int, lr: float, lr_end: float, begin: int, steps: int) -> float:
    """optax.linear_schedule: lr until `begin`, then linear to lr_end over `steps`, then lr_end."""
    frac = min(max(step - begin, 0) / steps, 1.0)
    return lr + frac * (lr_end - lr)


def observation_seed(obs: np.ndarray) -> int:
    """A reproducible seed derived from the observation bytes (for the deterministic action's chain noise)."""
    return zlib.crc32(np.ascontiguousarray(obs, dtype=np.float32).tobytes())


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    try:
        if args.resume is not None:
            checkpoint = load_checkpoint(args.resume)
            cli = vars(args).copy()
            args = Args(**checkpoint["args"])
            defaults = vars(Args())
            for name in RESUME_OVERRIDES:  # only flags given with a non-default value change the resumed run
                if cli[name] != defaults[name]:
                    setattr(args, name, cli[name])
        resolve_preset(args)
        validate_args(args)
        check_env_id(args.env_id)
    except (ValueError, EnvIdError) as e:
        sys.exit(f"{args.exp_name}.py: error: {e}")

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = checkpoint["run_name"] if checkpoint else run_name
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
            resume="allow" if checkpoint else None,
        )
    start_step = checkpoint["global_step"] if checkpoint else 0
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    atomic_write_json(
        dict(
            vars(args),
            run_name=run_name,
            versions={"torch": torch.__version__, "gymnasium": gym.__version__, "numpy": np.__version__},
        ),
        f"runs/{run_name}/config.json",
    )
    print(f"{run_name}: preset {args.preset}, " + ", ".join(f"{k}={getattr(args, k)}" for k in PRESETS[args.preset]))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # Separate streams, so the logging frequency or evaluation never changes the training noise.
    act_generator = torch.Generator(device=device).manual_seed(args.seed)
    update_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    replay_generator = torch.Generator(device=device).manual_seed(args.seed + 2)
    warmup_rng = np.random.default_rng(args.seed)

    # env setup
    try:
        envs = make_vector_env(args.env_id, args.num_envs, args.seed, args.async_envs, run_name)
        eval_env = make_env(args.env_id, args.seed + 10_000, 0, args.capture_video, run_name, video_every=args.eval_episodes)()
    except Exception as e:  # a user env that fails to build: report it in one line
        sys.exit(f"{args.exp_name}.py: error: cannot make env '{args.env_id}': {type(e).__name__}: {e}")
    assert isinstance(envs.single_action_space, gym.spaces.Box), "only continuous action space is supported"
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))

    # ALGO LOGIC: initialize agent here
    if args.beta_schedule == "vp":
        betas, x_T_scale = vp_beta_schedule(args.num_timesteps), 1.0
    else:
        betas, x_T_scale = linear_beta_schedule(args.num_timesteps, args.beta_scale), 0.5
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers, activation=nn.Mish, jax_init=True)
    actor = Actor(obs_dim, act_dim, betas=betas, x_T_scale=x_T_scale, time_dim=args.time_dim, **net_kwargs).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2_target = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    target_entropy = -args.target_entropy_scale * act_dim
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    alpha = log_alpha.detach().exp()
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)
    # b_i of the distributional loss: EMA of each critic's batch-mean std (-1 = not initialised yet).
    std_ema = torch.full((2,), -1.0, device=device)
    entropy = torch.zeros((), device=device)  # last entropy estimate; only recomputed on alpha steps

    global_step, num_updates, num_policy_updates = start_step, 0, 0
    if checkpoint:
        for module, key in (
            (actor, "actor"),
            (qf1, "qf1"),
            (qf2, "qf2"),
            (qf1_target, "qf1_target"),
            (qf2_target, "qf2_target"),
            (q_optimizer, "q_optimizer"),
            (actor_optimizer, "actor_optimizer"),
            (a_optimizer, "a_optimizer"),
        ):
            module.load_state_dict(checkpoint[key])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
            std_ema.copy_(checkpoint["std_ema"])
            entropy.copy_(checkpoint["entropy"])
        alpha = log_alpha.detach().exp()
        num_updates = checkpoint["num_updates"]
        num_policy_updates = checkpoint["num_policy_updates"]
        rng = checkpoint["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        for generator, key in ((act_generator, "act"), (update_generator, "update"), (replay_generator, "replay")):
            generator.set_state(rng[key])
        warmup_rng.bit_generator.state = rng["warmup"]
        if "replay_buffer" in checkpoint:
            rb.load_state_dict(checkpoint["replay_buffer"])

    def save_checkpoint():
        os.makedirs(f"models/{run_name}", exist_ok=True)
        state = dict(
            algo="dacer",
            args=vars(args),
            run_name=run_name,
            global_step=global_step,
            num_updates=num_updates,
            num_policy_updates=num_policy_updates,
            actor=actor.state_dict(),
            qf1=qf1.state_dict(),
            qf2=qf2.state_dict(),
            qf1_target=qf1_target.state_dict(),
            qf2_target=qf2_target.state_dict(),
            q_optimizer=q_optimizer.state_dict(),
            actor_optimizer=actor_optimizer.state_dict(),
            a_optimizer=a_optimizer.state_dict(),
            log_alpha=log_alpha.detach().cpu(),
            std_ema=std_ema.cpu(),
            entropy=entropy.cpu(),
            rng=dict(
                python=random.getstate(),
                numpy=np.random.get_state(),
                torch=torch.get_rng_state(),
                act=act_generator.get_state(),
                update=update_generator.get_state(),
                replay=replay_generator.get_state(),
                warmup=warmup_rng.bit_generator.state,
            ),
        )
        if args.save_buffer:
            state["replay_buffer"] = rb.state_dict()
        atomic_torch_save(state, f"models/{run_name}/checkpoint.pt")

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action: the reverse chain without the kappa * alpha noise, chain noise seeded by the observation."""
        generator = torch.Generator(device=device).manual_seed(observation_seed(obs))
        return actor.sample(torch.as_tensor(obs, device=device), generator, noise_std=0.0).cpu().numpy()

    @torch.no_grad()
    def policy_entropy(b_obs: torch.Tensor) -> torch.Tensor:
        """GMM entropy of --entropy-samples policy actions (noise and clip included) per batch state, averaged."""
        rows = b_obs.repeat_interleave(args.entropy_samples, dim=0)
        chunks = [actor.sample(part, update_generator, args.noise_factor * alpha) for part in rows.split(16_384)]
        samples = torch.cat(chunks).view(len(b_obs), args.entropy_samples, act_dim).cpu().numpy()
        return torch.tensor(estimate_entropy(samples, args.gmm_components, args.entropy_estimator), device=device)

    def stop_if_nonfinite():
        """One host sync; called at log steps and before every checkpoint, so no bad state is ever saved."""
        if nonfinite.item():
            sys.exit(
                f"{args.exp_name}.py: error: non-finite loss by step {global_step} (update {num_updates}); "
                "stopped, the last good checkpoint is kept"
            )

    # Loss tensors stay on the device; they are read (synchronising) only at log steps.
    zero = torch.zeros((), device=device)
    qf1_loss = qf2_loss = qf1_a_values = qf2_a_values = qf1_a_std = qf2_a_std = actor_loss = alpha_loss = zero
    clipped_fraction = zero
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    if args.eval_freq and global_step == 0:  # the untrained policy, so every curve starts at step 0
        for key, value in evaluate(eval_env, deterministic_action, args.eval_episodes, args.seed + 10_000).scalars().items():
            writer.add_scalar(key, value, 0)

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    last_return = float("nan")
    progress = tqdm(total=args.total_timesteps, initial=global_step, unit="step", disable=not sys.stdout.isatty())
    obs, _ = envs.reset(seed=args.seed + global_step)
    while global_step < args.total_timesteps:
        # ALGO LOGIC: put action logic here
        if global_step < args.learning_starts:
            actions = warmup_rng.uniform(-1.0, 1.0, (args.num_envs, act_dim)).astype(np.float32)
        else:
            with torch.no_grad():
                actions = actor.sample(torch.as_tensor(obs, device=device), act_generator, args.noise_factor * alpha)
            actions = actions.cpu().numpy()

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        prev_step, global_step = global_step, global_step + args.num_envs
        progress.update(args.num_envs)

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        step = split_vector_step(next_obs, terminations, truncations, infos)
        for episode in step.finished:
            writer.add_scalar("charts/episodic_return", episode.episodic_return, global_step)
            writer.add_scalar("charts/episodic_length", episode.episodic_length, global_step)
            if episode.success is not None:
                writer.add_scalar("charts/episodic_success", episode.success, global_step)
            last_return = episode.episodic_return

        # TRY NOT TO MODIFY: save data to replay buffer; handle `final_obs`
        rb.add(obs, actions, rewards, step.real_next_obs, step.terminated, step.truncated)

        # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
        obs = next_obs

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts and rb.size >= args.batch_size:
            for _ in range(args.updates_per_step):
                b_obs, b_actions, b_rewards, b_next_obs, b_terminations = rb.sample(args.batch_size)
                with torch.no_grad():
                    next_actions = actor.sample(b_next_obs, update_generator, args.noise_factor * alpha)
                    zeta = torch.randn(args.batch_size, device=device, generator=update_generator).clamp(-3.0, 3.0)
                    y_mean, y_sample = distributional_targets(
                        args.reward_scale * b_rewards,
                        b_terminations,
                        qf1_target(b_next_obs, next_actions),
                        qf2_target(b_next_obs, next_actions),
                        zeta,
                        args.gamma,
                    )

                # alpha's entropy estimate reads the policy before this update's policy step (as the reference does)
                alpha_step = args.autotune and num_updates % args.alpha_every == 0
                if alpha_step:
                    entropy = policy_entropy(b_obs)

                # policy step before the critic step: the actor loss sees the critics before this update's step
                if num_updates % args.policy_frequency == 0:
                    lr_end = args.policy_lr_end if args.lr_schedule == "linear" else args.policy_lr
                    for group in actor_optimizer.param_groups:
                        group["lr"] = linear_lr(
                            num_policy_updates, args.policy_lr, lr_end, args.lr_decay_begin, args.lr_decay_steps
                        )
                    pi = actor.sample(b_obs, update_generator, args.noise_factor * alpha)
                    actor_loss = -torch.minimum(qf1(b_obs, pi)[0], qf2(b_obs, pi)[0]).mean()
                    clipped_fraction = (pi.detach().abs() >= 1.0).float().mean()  # no gradient through these
                    actor_optimizer.zero_grad()
                    actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
                    actor_optimizer.step()
                    num_policy_updates += 1

                qf1_a_values, qf1_a_std = qf1(b_obs, b_actions)
                qf2_a_values, qf2_a_std = qf2(b_obs, b_actions)
                std_ema = update_std_ema(std_ema, torch.stack([qf1_a_std.mean(), qf2_a_std.mean()]), args.tau)
                qf1_loss = distributional_critic_loss(qf1_a_values, qf1_a_std, y_mean, y_sample, std_ema[0])
                qf2_loss = distributional_critic_loss(qf2_a_values, qf2_a_std, y_mean, y_sample, std_ema[1])
                q_optimizer.zero_grad()
                (qf1_loss + qf2_loss).backward()
                q_optimizer.step()

                if alpha_step:
                    alpha_loss = -log_alpha * (target_entropy - entropy)
                    a_optimizer.zero_grad()
                    alpha_loss.backward()
                    a_optimizer.step()
                    alpha = log_alpha.detach().exp()

                # update the target networks
                if num_updates % args.policy_frequency == 0:
                    with torch.no_grad():
                        for param, target_param in zip(qf1.parameters(), qf1_target.parameters(), strict=True):
                            target_param.lerp_(param, args.tau)
                        for param, target_param in zip(qf2.parameters(), qf2_target.parameters(), strict=True):
                            target_param.lerp_(param, args.tau)

                num_updates += 1
                nonfinite |= ~torch.isfinite(qf1_loss + qf2_loss + actor_loss)
                if num_updates % args.log_every == 0:
                    stop_if_nonfinite()
                    sps = int((global_step - start_step) / (time.time() - start_time))
                    writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
                    writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
                    writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                    writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                    writer.add_scalar("losses/qf_loss", (qf1_loss + qf2_loss).item() / 2.0, global_step)
                    writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                    writer.add_scalar("losses/alpha", alpha.item(), global_step)
                    writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                    writer.add_scalar("dacer/qf1_std", qf1_a_std.mean().item(), global_step)
                    writer.add_scalar("dacer/qf2_std", qf2_a_std.mean().item(), global_step)
                    writer.add_scalar("dacer/qf1_std_ema", std_ema[0].item(), global_step)
                    writer.add_scalar("dacer/qf2_std_ema", std_ema[1].item(), global_step)
                    writer.add_scalar("dacer/entropy", entropy.item(), global_step)
                    writer.add_scalar("dacer/target_entropy", target_entropy, global_step)
                    writer.add_scalar("dacer/noise_std", args.noise_factor * alpha.item(), global_step)
                    writer.add_scalar("dacer/policy_lr", actor_optimizer.param_groups[0]["lr"], global_step)
                    writer.add_scalar("dacer/clipped_fraction", clipped_fraction.item(), global_step)
                    writer.add_scalar("charts/SPS", sps, global_step)
                    writer.add_scalar("charts/updates", num_updates, global_step)
                    progress.set_postfix(SPS=sps, ret=f"{last_return:.1f}", refresh=False)

        # Evaluation and checkpoints happen when global_step crosses a multiple of their period.
        if args.eval_freq and crossed(prev_step, global_step, args.eval_freq) and global_step < args.total_timesteps:
            result = evaluate(eval_env, deterministic_action, args.eval_episodes, args.seed + 10_000)
            for key, value in result.scalars().items():
                writer.add_scalar(key, value, global_step)
        if args.save_model and crossed(prev_step, global_step, args.checkpoint_every):
            stop_if_nonfinite()
            save_checkpoint()

    stop_if_nonfinite()
    if args.save_model:
        save_checkpoint()
        print(f"checkpoint saved to models/{run_name}/checkpoint.pt")
    if args.final_eval_episodes:
        result = evaluate(eval_env, deterministic_action, args.final_eval_episodes, args.seed + 10_000)
        scalars = result.scalars()
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step)
        atomic_write_json(
            dict(
                scalars,
                global_step=global_step,
                num_updates=num_updates,
                episodes=args.final_eval_episodes,
                wall_time=time.time() - start_time,
            ),
            f"runs/{run_name}/final_eval.json",
        )
        print(
            f"final eval over {args.final_eval_episodes} episodes: return {scalars['eval/episodic_return']:.2f} "
            f"± {scalars['eval/episodic_return_std']:.2f}"
        )

    progress.close()
    envs.close()
    eval_env.close()
    writer.close()
