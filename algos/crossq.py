# docs and experiment results can be found at README.md#crossqpy
"""CrossQ (Bhatt, Palenicek et al., ICLR 2024, arXiv 1902.05605), CleanRL-style, one file.

CrossQ is SAC with three changes: no target network, BatchRenorm (BRN) in the critics and the actor, and one joint
train-mode critic pass over [s; s'] and [a; a'] (2B rows), so the batch statistics see both halves; the bootstrap
half is stop-gradiented. BRN modes (../shared/specs/baselines.md §2.5): next action with the actor in eval mode,
joint pass with the critics in train mode, actor step with the actor in train mode and the critics in eval mode,
acting and evaluation with both in eval mode.

Two presets (../shared/specs/baselines.md §2), chosen with --preset; every explicitly passed flag overrides them:
  * paper           the authors' release (adityab/CrossQ, sbx): critics 2 x 2048 ReLU, actor 2 x 256 ReLU with separate
                    mu/log-std heads, log pi with the tanh correction, policy delay 3 (actor and temperature after
                    critic updates 3, 6, 9, ...) with the critics' post-update weights, lr 1e-3, alpha loss
                    alpha * (H - H_target) with H = -mean log pi of the actor step (alpha lr 1e-3), Flax BRN
                    (eps 1e-3, running mean 0 / var 1 start, no debiasing, warm-up 100k train calls), 1 env,
                    updates_per_step = num_envs (UTD 1 per transition), 5k warm-up, 5M transitions.
  * qflex-protocol  (default) the CrossQ the Qflex authors ran: critics and actor 3 x 256 ReLU, one 2d actor head,
                    log pi WITHOUT the tanh correction (Gaussian log-density of the pre-tanh sample, in the target,
                    the actor loss and the alpha loss), one actor step per update that sees the critics' pre-update
                    weights with their post-update BRN statistics, alpha loss -mean(log alpha * (log pi + H_target)),
                    lr 3e-4 everywhere, Haiku BRN (eps 1e-5, zero-debiased running statistics, batch variance floored
                    at eps, warm-up 10), 80 envs, 1 update per vector step, 30k warm-up, 20M transitions.
Both: Adam betas (0.5, 0.999) for actor and critics, default betas for log alpha, alpha0 = 1, H_target = -|A|,
reward scale 1, log-std clipped to [-20, 2], BRN momentum (decay) 0.99, r_max 3, d_max 5, truncated-normal
1/sqrt(fan_in) init with zero biases (baselines.md §0). Besides SAC's keys the run logs `charts/action_saturation`,
the fraction of rollout action coordinates with |a_i| > 0.99 since the last log (baselines.md §2.5: without the
tanh correction the temperature controller can be satisfied while actions pile up at +-1), and `losses/entropy`,
-mean log pi of the last actor step (the pre-tanh Gaussian's in qflex-protocol).

Choices where the spec leaves a point open:
  * One Adam over both critics in both presets (Adam is per-parameter, so it equals one Adam per critic). The critic
    objective is sum_i 1/2 mean (y - q_i)^2 in `paper` and sum_i mean (q_i - y)^2 in `qflex-protocol`; the factor
    1/2 only rescales Adam's epsilon, so it is tied to the preset name rather than given a flag. `losses/qf*_loss`
    log the plain mean squared error in both presets.
  * Pre-update critic weights (qflex-protocol) come from ordering, not from a copy: the actor step runs between the
    critic's backward pass and its optimiser step, when the critics still hold phi_bar and the joint pass has already
    written the new BRN statistics.
  * The tanh log-Jacobian of `paper` is the exact stable form 2 (log 2 - x - softplus(-2x)) on the pre-tanh sample
    (what the TFP tanh bijector computes), not the 1e-6-regularised form CleanRL uses.
  * a' and a~ get independent noise draws (sbx draws separate keys; CrossQ has no shared-noise rule).
  * BRN batch variance is the biased one from torch.var_mean (correction 0): the same quantity as the references'
    E[x^2] - E[x]^2 clamped at 0, without its float32 cancellation for features with |mean| >> std. sqrt(batch var)
    at exactly zero variance (a dead ReLU unit) gets a zero gradient instead of NaN. The zero-debiased EMA is written
    as the equivalent in-place update m <- m + (1 - rho)/(1 - rho^n) (x - m); before a layer's first train-mode call
    its running statistics read mean 0 / var 1 in both flavours (only the first update's next action sees them).
  * The Linear init is Haiku's (std 1/sqrt(fan_in), truncated at 2 std) as baselines.md §0 asks; Flax's lecun_normal
    in sbx additionally divides the std by 0.88 to undo the truncation, a ~14% difference in initial weight scale.
  * No --tau flag: there is no target network.
"""

import json
import math
import os
import random
import sys
import time
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
    """hyperparameter preset: `paper` (the CrossQ authors' release: 2x2048 critics, policy delay 3, UTD 1) or
    `qflex-protocol` (the Qflex authors' comparison: 3x256, 80 envs, 1 update per vector step); flags marked
    (preset: ...) take their value from it unless given explicitly"""
    total_timesteps: int | None = None
    """total env transitions, summed over all envs (preset: paper 5M, qflex-protocol 20M)"""
    num_envs: int | None = None
    """number of parallel envs E (preset: paper 1, qflex-protocol 80)"""
    async_envs: bool = False
    """use gymnasium's AsyncVectorEnv (subprocesses) instead of SyncVectorEnv"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int | None = None
    """env transitions of uniform random actions before updates start (preset: paper 5k, qflex-protocol 30k)"""
    updates_per_step: int | None = None
    """gradient updates per vector-env step U, UTD = U / num_envs per transition (preset: paper num_envs, qflex-protocol 1)"""
    eval_freq: int | None = None
    """env transitions between evaluations (default min(1M, total/20)); 0 disables periodic evaluation"""
    eval_episodes: int = 5
    """episodes per periodic evaluation round (deterministic policy, separate env)"""
    final_eval_episodes: int = 20
    """episodes of the final evaluation (the per-run score)"""

    # Algorithm specific arguments
    policy_lr: float | None = None
    """the learning rate of the policy network optimizer (preset: paper 1e-3, qflex-protocol 3e-4)"""
    q_lr: float | None = None
    """the learning rate of the Q network optimizer (preset: paper 1e-3, qflex-protocol 3e-4)"""
    alpha_lr: float | None = None
    """the learning rate of the temperature optimizer, Adam with default betas (preset: paper 1e-3, qflex-protocol 3e-4)"""
    adam_beta1: float = 0.5
    """Adam beta1 of the actor and critic optimizers (beta2 0.999); never applied to the temperature"""
    policy_delay: int | None = None
    """one actor and temperature step after every policy_delay-th critic update (preset: paper 3, qflex-protocol 1)"""
    actor_critic_weights: Literal["post-update", "pre-update"] | None = None
    """critic weights in the actor loss, from after or before this update's critic step; BRN statistics are always the
    ones the joint pass just wrote (preset: paper post-update, qflex-protocol pre-update)"""
    hidden_dim: int = 256
    """width of the actor's hidden layers"""
    critic_hidden_dim: int | None = None
    """width of the critics' hidden layers (preset: paper 2048, qflex-protocol 256)"""
    num_layers: int | None = None
    """number of hidden layers of the actor and of each critic (preset: paper 2, qflex-protocol 3)"""
    separate_heads: bool | None = None
    """separate mu and log-std output layers instead of one shared 2d head (preset: paper True, qflex-protocol False)"""
    tanh_correction: bool | None = None
    """subtract the tanh log-Jacobian in log pi; without it log pi is the pre-tanh Gaussian's (preset: paper True,
    qflex-protocol False)"""
    alpha: float = 1.0
    """initial entropy temperature"""
    autotune: bool = True
    """automatic tuning of the entropy temperature towards the target entropy -|A|"""
    alpha_loss_form: Literal["alpha", "log-alpha"] | None = None
    """temperature loss, both minimised over log alpha: `alpha` = alpha * (H - H_target) with H = -mean log pi
    (paper), `log-alpha` = -mean(log alpha * (log pi + H_target)) (qflex-protocol)"""
    reward_scale: float = 1.0
    """rewards are multiplied by this inside the update"""
    brn_warmup: int | None = None
    """train-mode calls of each BatchRenorm layer that use plain batch statistics before the renorm corrections start
    (preset: paper 100k, qflex-protocol 10)"""
    brn_eps: float | None = None
    """BatchRenorm epsilon (preset: paper 1e-3, qflex-protocol 1e-5)"""
    brn_debias: bool | None = None
    """BatchRenorm flavour: zero-debiased running statistics and batch variance floored at eps (Haiku), or running mean
    0 / var 1 start, no debiasing, variance clamped at 0 (Flax) (preset: paper False, qflex-protocol True)"""
    brn_momentum: float = 0.99
    """BatchRenorm running-statistics decay, Flax meaning (PyTorch's BatchNorm momentum is 1 minus this)"""
    brn_r_max: float = 3.0
    """BatchRenorm clip of the scale correction r to [1/r_max, r_max]"""
    brn_d_max: float = 5.0
    """BatchRenorm clip of the shift correction d to [-d_max, d_max]"""


PRESETS = {
    "paper": dict(
        total_timesteps=5_000_000,
        num_envs=1,
        learning_starts=5_000,
        updates_per_step=None,  # = num_envs (UTD 1 per transition), filled in by resolve_preset
        policy_lr=1e-3,
        q_lr=1e-3,
        alpha_lr=1e-3,
        policy_delay=3,
        actor_critic_weights="post-update",
        critic_hidden_dim=2048,
        num_layers=2,
        separate_heads=True,
        tanh_correction=True,
        alpha_loss_form="alpha",
        brn_warmup=100_000,
        brn_eps=1e-3,
        brn_debias=False,
    ),
    "qflex-protocol": dict(
        total_timesteps=20_000_000,
        num_envs=80,
        learning_starts=30_000,
        updates_per_step=1,
        policy_lr=3e-4,
        q_lr=3e-4,
        alpha_lr=3e-4,
        policy_delay=1,
        actor_critic_weights="pre-update",
        critic_hidden_dim=256,
        num_layers=3,
        separate_heads=False,
        tanh_correction=False,
        alpha_loss_form="log-alpha",
        brn_warmup=10,
        brn_eps=1e-5,
        brn_debias=True,
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
    if args.updates_per_step is None:
        args.updates_per_step = args.num_envs
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
        "policy_delay",
        "hidden_dim",
        "critic_hidden_dim",
        "num_layers",
        "checkpoint_every",
        "log_every",
        "policy_lr",
        "q_lr",
        "alpha_lr",
        "alpha",
        "reward_scale",
        "brn_eps",
    ]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_freq", "final_eval_episodes", "brn_warmup", "brn_d_max"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.num_envs > args.buffer_size:
        raise ValueError(f"--num-envs {args.num_envs} is larger than --buffer-size {args.buffer_size}")
    if not 0 < args.gamma <= 1:
        raise ValueError("--gamma must lie in (0, 1]")
    for name in ["adam_beta1", "brn_momentum"]:
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    if not args.brn_r_max >= 1:
        raise ValueError(f"--brn-r-max must be >= 1, got {args.brn_r_max}")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algo") != "crossq":
        raise ValueError(f"{path} is not a crossq.py checkpoint")
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


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 instead of inf (and then NaN) at x = 0; the forward value is unchanged."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def batch_renorm_statistics(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    warmed_up: torch.Tensor,
    eps: float,
    r_max: float,
    d_max: float,
    var_floor: float,
):
    """Train-mode BatchRenorm, per feature: (mean, var) that x is normalised with, and the batch (mean, var) for the EMA.

    var_B = max(mean((x - mu_B)^2), var_floor), the biased batch variance. While `warmed_up` is false the result is
    (mu_B, var_B), plain batch norm. Afterwards, with sigma_R = sqrt(running_var + eps),
    r = clip(sg(sqrt(var_B + eps) / sigma_R), 1/r_max, r_max), d = clip(sg((mu_B - running_mean) / sigma_R), +-d_max),
    and the result is (mu_B - d sqrt(var_B) / r, var_B / r^2). Gradients reach mu_B and var_B, never r or d.
    `warmed_up` is a bool tensor, so no host sync is needed.
    """
    batch_var, batch_mean = torch.var_mean(x, dim=0, correction=0)
    if var_floor > 0:
        batch_var = batch_var.clamp_min(var_floor)
    with torch.no_grad():
        running_std = (running_var + eps).sqrt()
        r = ((batch_var + eps).sqrt() / running_std).clamp(1.0 / r_max, r_max)
        d = ((batch_mean - running_mean) / running_std).clamp(-d_max, d_max)
        r, d = torch.where(warmed_up, r, 1.0), torch.where(warmed_up, d, 0.0)
    mean = batch_mean - d * safe_sqrt(batch_var) / r
    return mean, batch_var / r.square(), batch_mean.detach(), batch_var.detach()


def ema_weight(momentum: float, count: torch.Tensor, debias: bool) -> torch.Tensor | float:
    """Weight w of the running-statistics update m <- m + w (x - m) for the count-th update (count >= 1).

    Plain EMA: w = 1 - momentum. Zero-debiased EMA (h <- momentum h + (1 - momentum) x from h = 0, read as
    h / (1 - momentum^count)): w = (1 - momentum) / (1 - momentum^count), so the first update copies x.
    """
    if not debias:
        return 1.0 - momentum
    return (1.0 - momentum) / (1.0 - torch.pow(momentum, count.to(torch.float64))).float()


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe 2017) over dim 0 of (n, num_features) inputs, as CrossQ uses it.

    Train mode: batch statistics with the renorm corrections of `batch_renorm_statistics` (plain batch norm for the first
    `warmup` train-mode calls), then one update of the running statistics with the batch mean and biased variance.
    Eval mode: gamma (x - running_mean) / sqrt(running_var + eps) + beta, rows independent, nothing updated.
    `momentum` is the decay of the running statistics (Flax meaning). `debias=False` is the Flax/sbx flavour
    (running mean 0 / var 1 start, plain EMA, batch variance clamped at 0); `debias=True` the Haiku/Qflex one
    (zero-debiased EMA, batch variance floored at eps).
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.99,
        eps: float = 1e-3,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: int = 100_000,
        debias: bool = False,
    ):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.r_max, self.d_max, self.warmup, self.debias = r_max, d_max, warmup, debias
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.addcmul(self.bias, x - self.running_mean, self.weight * torch.rsqrt(self.running_var + self.eps))
        mean, var, batch_mean, batch_var = batch_renorm_statistics(
            x,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked >= self.warmup,
            self.eps,
            self.r_max,
            self.d_max,
            self.eps if self.debias else 0.0,
        )
        with torch.no_grad():
            self.num_batches_tracked += 1
            weight = ema_weight(self.momentum, self.num_batches_tracked, self.debias)
            self.running_mean.lerp_(batch_mean, weight)
            self.running_var.lerp_(batch_var, weight)
        return torch.addcmul(self.bias, x - mean, self.weight * torch.rsqrt(var + self.eps))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, eps={self.eps}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup={self.warmup}, debias={self.debias}"
        )


def mlp(in_dim: int, hidden_dim: int, num_layers: int, brn: dict) -> nn.Sequential:
    """BRN(input) -> [Linear -> ReLU -> BRN] x num_layers: normalisation after every activation."""
    layers, width = [BatchRenorm(in_dim, **brn)], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), nn.ReLU(), BatchRenorm(hidden_dim, **brn)]
        width = hidden_dim
    return nn.Sequential(*layers)


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, brn: dict):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers, brn)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


LOG_STD_CLIP = (-20.0, 2.0)  # both presets (sbx and relax): hard clip


class Actor(nn.Module):
    """Tanh-Gaussian policy on a BRN trunk; separate mu/log-std heads (paper) or one 2d head; log-std clipped."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, brn: dict, separate_heads: bool):
        super().__init__()
        self.separate_heads = separate_heads
        self.trunk = mlp(obs_dim, hidden_dim, num_layers, brn)
        if separate_heads:
            self.fc_mean = trunc_normal_init_(nn.Linear(hidden_dim, act_dim))
            self.fc_logstd = trunc_normal_init_(nn.Linear(hidden_dim, act_dim))
        else:
            self.fc_head = trunc_normal_init_(nn.Linear(hidden_dim, 2 * act_dim))

    def forward(self, obs: torch.Tensor):
        h = self.trunk(obs)
        if self.separate_heads:
            mean, log_std = self.fc_mean(h), self.fc_logstd(h)
        else:
            mean, log_std = self.fc_head(h).chunk(2, dim=-1)
        return mean, log_std.clamp(*LOG_STD_CLIP)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor, tanh_correction: bool):
        """Reparameterised a = tanh(mu + sigma * noise) and its log-probability (see `tanh_gaussian_log_prob`)."""
        mean, log_std = self(obs)
        x = mean + log_std.exp() * noise
        return torch.tanh(x), tanh_gaussian_log_prob(x, noise, log_std, tanh_correction)


def tanh_gaussian_log_prob(x: torch.Tensor, noise: torch.Tensor, log_std: torch.Tensor, tanh_correction: bool) -> torch.Tensor:
    """log pi for x = mu + sigma * noise, summed over action dimensions.

    log N(x; mu, sigma) = -noise^2/2 - log sigma - log(2 pi)/2, minus (with `tanh_correction`, the density of tanh(x))
    the tanh log-Jacobian in its exact stable form 2 (log 2 - x - softplus(-2x)). qflex-protocol omits the correction.
    """
    log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    if tanh_correction:
        log_prob = log_prob - 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))
    return log_prob.sum(-1)


def soft_q_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, gamma: float):
    """y = r + gamma * (1 - terminated) * (min_i sg(Q_i(s', a')) - alpha * log pi(a'|s')); terminated only.

    next_q come from the train-mode joint pass, so the stop-gradient on the bootstrap happens here.
    """
    next_v = torch.minimum(next_q1, next_q2).detach() - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminations) * next_v


def temperature_loss(log_alpha: torch.Tensor, log_pi: torch.Tensor, target_entropy: float, form: str) -> torch.Tensor:
    """Loss minimised over log alpha, with log pi of the actor step (no gradient to the actor).

    `alpha` (sbx): alpha * (H - H_target), H = -mean log pi, gradient alpha * (H - H_target) w.r.t. log alpha.
    `log-alpha` (relax): -mean(log alpha * (log pi + H_target)), gradient H - H_target.
    """
    log_pi = log_pi.detach()
    if form == "alpha":
        return log_alpha.exp() * (-log_pi.mean() - target_entropy)
    return -(log_alpha * (log_pi + target_entropy)).mean()


def saturation_count(actions: np.ndarray, threshold: float = 0.99) -> int:
    """Number of action coordinates with |a_i| > threshold (squashed actions piling up at the box edges)."""
    return int(np.count_nonzero(np.abs(actions) > threshold))


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
    paper = args.preset == "paper"
    brn = dict(
        momentum=args.brn_momentum,
        eps=args.brn_eps,
        r_max=args.brn_r_max,
        d_max=args.brn_d_max,
        warmup=args.brn_warmup,
        debias=args.brn_debias,
    )
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.num_layers, brn, args.separate_heads).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, args.critic_hidden_dim, args.num_layers, brn).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, args.critic_hidden_dim, args.num_layers, brn).to(device)
    betas = (args.adam_beta1, 0.999)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, betas=betas)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, betas=betas)
    critic_loss_scale = 0.5 if paper else 1.0  # sbx: sum_i 1/2 mean; relax: sum_i mean (Adam-invariant)
    target_entropy = -float(act_dim)
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    alpha = log_alpha.detach().exp()
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)

    global_step, num_updates = start_step, 0
    if checkpoint:
        for module, key in (
            (actor, "actor"),
            (qf1, "qf1"),
            (qf2, "qf2"),
            (q_optimizer, "q_optimizer"),
            (actor_optimizer, "actor_optimizer"),
            (a_optimizer, "a_optimizer"),
        ):
            module.load_state_dict(checkpoint[key])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
        alpha = log_alpha.detach().exp()
        num_updates = checkpoint["num_updates"]
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
            algo="crossq",
            args=vars(args),
            run_name=run_name,
            global_step=global_step,
            num_updates=num_updates,
            actor=actor.state_dict(),  # BRN running statistics and call counters are buffers, so they are included
            qf1=qf1.state_dict(),
            qf2=qf2.state_dict(),
            q_optimizer=q_optimizer.state_dict(),
            actor_optimizer=actor_optimizer.state_dict(),
            a_optimizer=a_optimizer.state_dict(),
            log_alpha=log_alpha.detach().cpu(),
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
        """Evaluation action: tanh(mu) with the actor's BRN in eval mode, already in [-1, 1]."""
        actor.eval()
        mean, _ = actor(torch.as_tensor(obs, device=device))
        return torch.tanh(mean).cpu().numpy()

    def stop_if_nonfinite():
        """One host sync; called at log steps and before every checkpoint, so no bad state is ever saved."""
        if nonfinite.item():
            sys.exit(
                f"{args.exp_name}.py: error: non-finite loss by step {global_step} (update {num_updates}); "
                "stopped, the last good checkpoint is kept"
            )

    # Loss tensors stay on the device; they are read (synchronising) only at log steps.
    zero = torch.zeros((), device=device)
    qf1_loss = qf2_loss = qf1_a_values = qf2_a_values = actor_loss = alpha_loss = log_pi = zero
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    saturated, acted = 0, 0  # policy action coordinates with |a_i| > 0.99, and all of them, since the last log

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
            actor.eval()
            with torch.no_grad():
                noise = torch.randn((args.num_envs, act_dim), device=device, generator=act_generator)
                actions, _ = actor.sample(torch.as_tensor(obs, device=device), noise, args.tanh_correction)
            actions = actions.cpu().numpy()
            saturated, acted = saturated + saturation_count(actions), acted + actions.size

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
                actor.eval()  # a' from the running statistics; nothing in the actor's BRN changes
                with torch.no_grad():
                    next_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                    next_actions, next_log_prob = actor.sample(b_next_obs, next_noise, args.tanh_correction)
                # One train-mode pass per critic over [s; s'], [a; a']: the BRN statistics see both halves.
                qf1.train()
                qf2.train()
                joint_obs, joint_actions = torch.cat([b_obs, b_next_obs]), torch.cat([b_actions, next_actions])
                qf1_a_values, qf1_next = qf1(joint_obs, joint_actions).chunk(2)
                qf2_a_values, qf2_next = qf2(joint_obs, joint_actions).chunk(2)
                next_q_value = soft_q_target(
                    args.reward_scale * b_rewards,
                    b_terminations,
                    qf1_next,
                    qf2_next,
                    next_log_prob,
                    alpha,
                    args.gamma,
                )
                qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
                qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
                q_optimizer.zero_grad()
                (critic_loss_scale * (qf1_loss + qf2_loss)).backward()
                if args.actor_critic_weights == "post-update":
                    q_optimizer.step()

                if (num_updates + 1) % args.policy_delay == 0:  # after critic updates delay, 2 delay, ...
                    actor.train()
                    qf1.eval()
                    qf2.eval()
                    pi_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                    pi, log_pi = actor.sample(b_obs, pi_noise, args.tanh_correction)
                    min_qf_pi = torch.minimum(qf1(b_obs, pi), qf2(b_obs, pi))
                    actor_loss = (alpha * log_pi - min_qf_pi).mean()
                    actor_optimizer.zero_grad()
                    actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
                    actor_optimizer.step()
                    actor.eval()

                    if args.autotune:
                        alpha_loss = temperature_loss(log_alpha, log_pi, target_entropy, args.alpha_loss_form)
                        a_optimizer.zero_grad()
                        alpha_loss.backward()
                        a_optimizer.step()
                        alpha = log_alpha.detach().exp()

                if args.actor_critic_weights == "pre-update":  # the actor step above saw phi_bar; step the critics now
                    q_optimizer.step()

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
                    writer.add_scalar("losses/entropy", -log_pi.detach().mean().item(), global_step)
                    if acted:
                        writer.add_scalar("charts/action_saturation", saturated / acted, global_step)
                        saturated, acted = 0, 0
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
