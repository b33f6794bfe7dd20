# docs and experiment results can be found at docs/qflex.md#qflexpy
"""Qflex, Q-guided flow exploration (Wei, Zuo & Sui, ICLR 2026, arXiv 2601.19707), CleanRL-style, one file.

Specification: ../shared/specs/qflex.md (section numbers below, "§n", refer to it); equation-to-line map: docs/qflex.md.
Three learners share one update (§5): twin critics trained CrossQ-style (BatchRenorm, one joint pass over
[s; s'], no target network), a tanh-Gaussian source policy that maximises min_j Q with no entropy term, and a
velocity field trained by flow matching towards actions moved by N steps of truncated Q-gradient ascent. Acting
draws a source action and integrates the velocity field for K Euler steps, so collecting data needs no Q-gradient.

Presets (--preset): Qflex has only its own protocol, the official one (reference `scripts/train.py`):
  * qflex-protocol  (default) 3x256 ReLU + BatchRenorm, Adam 3e-4 with betas (0.5, 0.999) for all four networks,
                    batch 256, buffer 1e6, 80 envs, 30k uniform warm-up, 1 update per vector step, 20M transitions
                    (the myoLegWalk-v0 budget: 250k updates).
  * paper           the same values under the name the baseline scripts use for "as the authors ran it", so a
                    sweep over `--preset paper` covers Qflex too.
Other benchmarks of the paper only change --total-timesteps, --num-envs, --eval-freq and --hidden-dim (§10, §13.9;
commands in docs/qflex.md).

Choices where the spec leaves a point open (§13 numbers):
  * No entropy term (§13.1); `flow/source_log_std` is logged to watch the source policy's collapse.
  * FSR (§13.2) follows §7 and is computed at log steps only; its source sample reuses the update's shared noise,
    so logging draws no random numbers and never changes training.
  * Flow targets, iterates and stored actions are never clipped (§13.3); --clip-flow-target projects every ascent
    iterate onto [-1, 1]^d (ablation only).
  * Euler grid t_k = k/K (§13.4); BatchRenorm starts with an empty zero-debiased EMA and counter 0 (§13.5). Before a
    layer's first train-mode call its eval mode uses mean 0, variance 1: this happens once, for a' in the first update.
  * One noise draw per update for a', a~ and a0 (§13.6); warm-up transitions count in global_step (§13.7).
  * --no-flow (ablation) acts with source actions and skips the flow target and the velocity-field step entirely.
  * --tau exists only to keep the common flags; Qflex has no target network (tau = 1), so only 1 is accepted.
  * charts/action_abs_max is measured on the actions of the latest vector step (current policy), not on replay.
One Adam over both critics is used: Adam is per-parameter and the critics share nothing, so it equals one per critic.
"""

import copy
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
    """Qflex (arXiv 2601.19707). The defaults are the paper's myoLegWalk-v0 run: 20M transitions, 80 envs, 250k updates.

    The paper's other runs (qflex.md §10; full commands in docs/qflex.md) change only these flags:
    h1-run-v0: --total-timesteps 5000000 --num-envs 70; h1-balance_simple-v0: 20000000 and 70 envs;
    SMPLHumanoidJump-v1, myoHandPenTwirlRandom-v0: 5000000 and 80 envs; OstrichRun-v1: 10000000, 80 envs,
    --eval-freq 1000000; MS700Locomotion-v1: 50000000, 224 envs, --hidden-dim 1024. Width rule (§13.9): 256 up to
    ~120 actuators, 1024 only for models with hundreds of actuators.
    """

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
    """gradient updates between scalar logs (losses, SPS, flow diagnostics)"""

    # Environment and protocol
    env_id: str = "myoLegWalk-v0"
    """the id of the environment (any registered id, or `module:EnvName-v0`)"""
    preset: Literal["qflex-protocol", "paper"] = "qflex-protocol"
    """hyperparameter preset: `qflex-protocol` (the official Qflex settings); `paper` is an alias with the same values"""
    total_timesteps: int | None = None
    """total env transitions, summed over all envs (preset: 20M = myoLegWalk-v0; other benchmarks: see above)"""
    num_envs: int | None = None
    """number of parallel envs E (preset: 80 = myoLegWalk-v0; 70 for h1-*, 224 for MS700Locomotion-v1)"""
    async_envs: bool = False
    """use gymnasium's AsyncVectorEnv (subprocesses) instead of SyncVectorEnv"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """target smoothing coefficient; Qflex has no target network (phi-bar = the critic before each step), so only 1"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int | None = None
    """env transitions of uniform random actions before updates start (preset: 30k)"""
    updates_per_step: int = 1
    """gradient updates per vector-env step U (UTD = U / num_envs per transition)"""
    eval_freq: int | None = None
    """env transitions between evaluations (default min(1M, total/20)); 0 disables periodic evaluation"""
    eval_episodes: int = 5
    """episodes per periodic evaluation round (fixed-noise flowed action, separate env)"""
    final_eval_episodes: int = 20
    """episodes of the final evaluation (the per-run score)"""

    # Algorithm specific arguments
    policy_lr: float | None = None
    """the learning rate of the source policy optimizer (preset: 3e-4)"""
    q_lr: float | None = None
    """the learning rate of the Q network optimizer (preset: 3e-4)"""
    flow_lr: float | None = None
    """the learning rate of the velocity field optimizer (preset: 3e-4)"""
    hidden_dim: int = 256
    """width of every hidden layer (256 up to ~120 actuators; 1024 for MS-Human-700, qflex.md §13.9)"""
    num_layers: int | None = None
    """number of hidden layers (preset: 3)"""
    flow: bool = True
    """act with flowed actions; --no-flow acts with source-policy actions and trains no velocity field (ablation)"""
    flow_steps: int = 20
    """N, steps of truncated Q-gradient ascent that build the flow target (0: the target is the source action)"""
    flow_step_size: float = 0.01
    """eta, the largest ascent step size; each sample's step is min(eta, 2 sqrt(d) / (||g|| + 1e-6))"""
    euler_steps: int = 20
    """K, Euler steps of the velocity field when acting (velocity clipped at +-K)"""
    clip_flow_target: bool = False
    """project every ascent iterate onto [-1, 1]^d (ablation, qflex.md §13.3; the reference never clips)"""


PRESETS = {
    "qflex-protocol": dict(
        total_timesteps=20_000_000,
        num_envs=80,
        learning_starts=30_000,
        policy_lr=3e-4,
        q_lr=3e-4,
        flow_lr=3e-4,
        num_layers=3,
    ),
}
PRESETS["paper"] = PRESETS["qflex-protocol"]  # Qflex's paper protocol is its own; see the module docstring
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
        "hidden_dim",
        "num_layers",
        "checkpoint_every",
        "log_every",
        "policy_lr",
        "q_lr",
        "flow_lr",
        "flow_step_size",
        "euler_steps",
    ]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_freq", "final_eval_episodes", "flow_steps"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.num_envs > args.buffer_size:
        raise ValueError(f"--num-envs {args.num_envs} is larger than --buffer-size {args.buffer_size}")
    if not 0 < args.gamma <= 1:
        raise ValueError("--gamma must lie in (0, 1]")
    if args.tau != 1:
        raise ValueError(f"--tau must be 1: Qflex has no target network (phi-bar is the pre-update critic), got {args.tau}")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algo") != "qflex":
        raise ValueError(f"{path} is not a qflex.py checkpoint")
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

    Stores (s, a, r, s', terminated, truncated): a as emitted by the flow (unclipped, may leave [-1, 1]^d), r raw,
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


# BatchRenorm constants of the reference (relax/network/blocks.py), qflex.md §2.1.
BRN_MOMENTUM, BRN_EPS, BRN_R_MAX, BRN_D_MAX, BRN_WARMUP = 0.99, 1e-5, 3.0, 5.0, 10


class BatchRenorm(nn.Module):
    """Batch renormalisation, reference flavour (qflex.md §2.1), per feature over the batch dimension.

    Train mode normalises with the batch statistics, corrected by r and d once `warmup` train calls have passed
    (plain batch norm before), then updates the running statistics. Eval mode normalises with the running
    statistics and changes nothing, so rows are independent. Running statistics are zero-debiased EMAs: hidden
    h <- rho h + (1 - rho) x, running value h / (1 - rho^n) after n train calls, so the first train call sets them
    to that batch's statistics exactly. `running_mean`/`running_var` hold that debiased value (0 and 1 before the
    first train call).
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = BRN_MOMENTUM,
        eps: float = BRN_EPS,
        r_max: float = BRN_R_MAX,
        d_max: float = BRN_D_MAX,
        warmup: int = BRN_WARMUP,
    ):
        super().__init__()
        self.momentum, self.eps, self.r_max, self.d_max, self.warmup = momentum, eps, r_max, d_max, warmup
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("mean_hidden", torch.zeros(num_features))
        self.register_buffer("var_hidden", torch.zeros(num_features))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))  # the call counter c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # gamma * (x - m) / sqrt(v + eps) + beta, folded into one scale and one shift
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return torch.addcmul(self.bias - self.running_mean * scale, x, scale)
        batch_mean = x.mean(0)
        # E[x^2] - E[x]^2 as in the reference (biased), floored at eps
        batch_var = ((x * x).mean(0) - batch_mean * batch_mean).clamp_min(self.eps)
        with torch.no_grad():  # r and d are constants for the gradient
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(batch_var + self.eps) / running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((batch_mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
            renorm = self.num_batches >= self.warmup  # a device tensor: no host sync in the hot loop
            r = torch.where(renorm, r, torch.ones_like(r))
            d = torch.where(renorm, d, torch.zeros_like(d))
        mean = batch_mean - d * torch.sqrt(batch_var) / r
        var = batch_var / (r * r)
        y = self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias
        with torch.no_grad():
            self.num_batches += 1
            self.mean_hidden.lerp_(batch_mean, 1.0 - self.momentum)
            self.var_hidden.lerp_(batch_var, 1.0 - self.momentum)
            debias = 1.0 - self.momentum ** self.num_batches.to(x.dtype)
            self.running_mean.copy_(self.mean_hidden / debias)
            self.running_var.copy_(self.var_hidden / debias)
        return y


def mlp(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    """The shared trunk (§2.2): BRN(input) -> [Linear(H) -> ReLU -> BRN] x L; the caller adds Linear(out)."""
    layers, width = [BatchRenorm(in_dim)], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), nn.ReLU(), BatchRenorm(hidden_dim)]
        width = hidden_dim
    return nn.Sequential(*layers)


class QNetwork(nn.Module):
    """Critic Q_j(s, a) -> [B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


LOG_STD_CLIP = (-20.0, 2.0)  # reference create_flow_net: hard clip


class Actor(nn.Module):
    """Source policy pi0_theta: a0 = tanh(mu + sigma * noise), one 2d head, log sigma clipped; no log-probability."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden_dim, num_layers)
        self.fc_head = trunc_normal_init_(nn.Linear(hidden_dim, 2 * act_dim))

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.fc_head(self.trunk(obs)).chunk(2, dim=-1)
        return mean, log_std.clamp(*LOG_STD_CLIP)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Reparameterised a0 = tanh(mu + sigma * noise); tanh acts on the sample only."""
        mean, log_std = self(obs)
        return torch.tanh(mean + log_std.exp() * noise)


class VelocityField(nn.Module):
    """v_w(s, a, t) -> [B, d]; t enters as one raw scalar column (normalised by the input BRN like s and a)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim + 1, hidden_dim, num_layers)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, act_dim))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions, t.reshape(-1, 1)], dim=1)))


def bootstrap_target(rewards, terminations, next_q1, next_q2, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min_j sg(q'_j) (§3.1): no entropy term, terminated only, never truncated."""
    return (rewards + gamma * (1.0 - terminations) * torch.minimum(next_q1, next_q2)).detach()


def q_guided_flow(
    q_fn,
    obs: torch.Tensor,
    actions: torch.Tensor,
    num_steps: int,
    step_size: float,
    clip_to_box: bool = False,
    return_grad_norm: bool = False,
):
    """The flow target a1 (§3.3): `num_steps` steps of truncated steepest ascent on q_fn(obs, .) from `actions`.

        g = grad_x sum_b q_fn(obs, x)_b,   eta_b = min(step_size, 2 sqrt(d) / (||g_b|| + 1e-6)),   x <- x + eta_b g_b

    `q_fn(obs, actions)` returns [B] or [B, 1]. Per-sample gradients come from the gradient of the batch sum, which
    is only right when rows do not interact (BatchRenorm in eval mode). The cap keeps each step shorter than 2 sqrt(d),
    the l2 diameter of [-1, 1]^d. Nothing is clipped unless `clip_to_box` (ablation). Returns the detached targets,
    and with `return_grad_norm` also the mean ||g|| over samples and steps (NaN when num_steps is 0).
    """
    x = actions.detach()
    obs = obs.detach()
    max_move = 2.0 * math.sqrt(actions.shape[-1])
    grad_norm_sum = torch.zeros((), device=actions.device)
    with torch.enable_grad():
        for _ in range(num_steps):
            x = x.requires_grad_(True)
            (g,) = torch.autograd.grad(q_fn(obs, x).sum(), x)
            g_norm = g.norm(dim=-1, keepdim=True)
            x = (x + torch.clamp(max_move / (g_norm + 1e-6), max=step_size) * g).detach()
            if clip_to_box:
                x = x.clamp(-1.0, 1.0)
            grad_norm_sum = grad_norm_sum + g_norm.mean()
    if return_grad_norm:
        return x, grad_norm_sum / num_steps if num_steps else torch.full((), float("nan"), device=actions.device)
    return x


def euler_sample(velocity_fn, obs: torch.Tensor, actions: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Integrate da/dt = v(s, a, t) from t = 0 to 1 in K = `num_steps` Euler steps (§4.1).

    Each step uses the velocity at the end of its interval, t_k = k/K, as the reference does, and clips it
    elementwise at +-K, so one step moves a coordinate by at most 1. The result is not clipped to the box.
    """
    dt = 1.0 / num_steps
    for k in range(1, num_steps + 1):
        t = torch.full((actions.shape[0], 1), k * dt, device=actions.device, dtype=actions.dtype)
        actions = actions + dt * velocity_fn(obs, actions, t).clamp(-num_steps, num_steps)
    return actions


def flow_matching_loss(velocity_fn, obs: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_v = mean over B x d of (v(s, a_t, t) - (a1 - a0))^2 on the straight path a_t = (1 - t) a0 + t a1 (§3.4)."""
    t = t.reshape(-1, 1)
    a0, a1 = a0.detach(), a1.detach()
    a_t = (1.0 - t) * a0 + t * a1
    return (velocity_fn(obs, a_t, t) - (a1 - a0)).pow(2).mean()


def flow_superiority_ratio(q_fn, obs: torch.Tensor, source_actions: torch.Tensor, flowed_actions: torch.Tensor):
    """FSR (§7): fraction of states whose flowed action has a strictly higher Q than its own source action."""
    return (q_fn(obs, flowed_actions).reshape(-1) > q_fn(obs, source_actions).reshape(-1)).float().mean()


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
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers)
    actor = Actor(obs_dim, act_dim, **net_kwargs).to(device)
    qf1 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    velocity = VelocityField(obs_dim, act_dim, **net_kwargs).to(device)
    # phi-bar: frozen copies that receive the critics' pre-step weights and post-pass BRN statistics every update
    qf1_bar, qf2_bar = copy.deepcopy(qf1).requires_grad_(False), copy.deepcopy(qf2).requires_grad_(False)
    adam = dict(betas=(0.5, 0.999), eps=1e-8)  # reference optimiser: beta1 0.5, constant lr, no weight decay
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam)
    flow_optimizer = torch.optim.Adam(velocity.parameters(), lr=args.flow_lr, **adam)
    # z_fix: the evaluation noise, one vector drawn once from a generator seeded with 0 (§4.2), identical for every seed
    z_fix = torch.randn(act_dim, generator=torch.Generator().manual_seed(0)).to(device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)

    global_step, num_updates = start_step, 0
    if checkpoint:
        for module, key in (
            (actor, "actor"),
            (qf1, "qf1"),
            (qf2, "qf2"),
            (velocity, "velocity"),
            (q_optimizer, "q_optimizer"),
            (actor_optimizer, "actor_optimizer"),
            (flow_optimizer, "flow_optimizer"),
        ):
            module.load_state_dict(checkpoint[key])
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
            algo="qflex",
            args=vars(args),
            run_name=run_name,
            global_step=global_step,
            num_updates=num_updates,
            actor=actor.state_dict(),
            qf1=qf1.state_dict(),
            qf2=qf2.state_dict(),
            velocity=velocity.state_dict(),
            q_optimizer=q_optimizer.state_dict(),
            actor_optimizer=actor_optimizer.state_dict(),
            flow_optimizer=flow_optimizer.state_dict(),
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

    def q_min_bar(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_j Q_j(s, a; phi-bar) with BatchRenorm in eval mode, so rows stay independent."""
        qf1_bar.eval()
        qf2_bar.eval()
        return torch.minimum(qf1_bar(obs, actions), qf2_bar(obs, actions))

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action (§4.2): a0 = tanh(mu + sigma * z_fix), K Euler steps, clipped to [-1, 1]."""
        actor.eval()
        velocity.eval()
        obs = torch.as_tensor(obs, device=device)
        actions = actor.sample(obs, z_fix.expand(len(obs), -1))
        if args.flow:
            actions = euler_sample(velocity, obs, actions, args.euler_steps)
        return actions.clamp(-1.0, 1.0).cpu().numpy()

    def stop_if_nonfinite():
        """One host sync; called at log steps and before every checkpoint, so no bad state is ever saved."""
        if nonfinite.item():
            sys.exit(
                f"{args.exp_name}.py: error: non-finite loss by step {global_step} (update {num_updates}); "
                "stopped, the last good checkpoint is kept"
            )

    # Loss tensors stay on the device; they are read (synchronising) only at log steps.
    zero = torch.zeros((), device=device)
    qf1_loss = qf2_loss = qf1_a_values = qf2_a_values = actor_loss = flow_loss = flow_grad_norm = zero
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
            with torch.no_grad():  # §4.1: source sample, then K Euler steps; BRN eval everywhere
                actor.eval()
                velocity.eval()
                obs_tensor = torch.as_tensor(obs, device=device)
                noise = torch.randn((args.num_envs, act_dim), device=device, generator=act_generator)
                actions = actor.sample(obs_tensor, noise)
                if args.flow:
                    actions = euler_sample(velocity, obs_tensor, actions, args.euler_steps)
            actions = actions.cpu().numpy()  # stored unclipped; the env wrapper clips before rescaling

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

        # ALGO LOGIC: training (one update = steps 2-8 of qflex.md §5).
        if global_step >= args.learning_starts and rb.size >= args.batch_size:
            for _ in range(args.updates_per_step):
                # the reference's guard: NaN and +-inf in the batch become 0
                b_obs, b_actions, b_rewards, b_next_obs, b_terminations = (
                    torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in rb.sample(args.batch_size)
                )
                # one noise draw per update, shared by a', a~ and a0 (§5, §13.6)
                noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)

                # step 3, critics (§3.1): a' is a SOURCE action of the pre-update policy; one joint train-mode pass
                actor.eval()
                with torch.no_grad():
                    next_actions = actor.sample(b_next_obs, noise)
                qf1.train()
                qf2.train()
                joint_obs, joint_actions = torch.cat([b_obs, b_next_obs]), torch.cat([b_actions, next_actions])
                qf1_a_values, qf1_next_values = qf1(joint_obs, joint_actions).chunk(2)
                qf2_a_values, qf2_next_values = qf2(joint_obs, joint_actions).chunk(2)
                next_q_value = bootstrap_target(b_rewards, b_terminations, qf1_next_values, qf2_next_values, args.gamma)
                qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
                qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
                q_optimizer.zero_grad()
                (qf1_loss + qf2_loss).backward()
                # phi-bar (§12): the weights before this step, the BRN statistics after this pass
                qf1_bar.load_state_dict(qf1.state_dict())
                qf2_bar.load_state_dict(qf2.state_dict())
                q_optimizer.step()

                # step 4, source policy (§3.2): maximise min_j Q(s, a~; phi-bar), no entropy term; policy BRN train
                actor.train()
                pi = actor.sample(b_obs, noise)
                actor_loss = -q_min_bar(b_obs, pi).mean()
                actor_optimizer.zero_grad()
                actor_loss.backward(inputs=list(actor.parameters()))
                actor_optimizer.step()

                if args.flow:
                    # step 5, flow target on next states (§3.3): post-update source policy, truncated Q ascent
                    actor.eval()
                    with torch.no_grad():
                        source_actions = actor.sample(b_next_obs, noise)
                    target_actions, flow_grad_norm = q_guided_flow(
                        q_min_bar,
                        b_next_obs,
                        source_actions,
                        args.flow_steps,
                        args.flow_step_size,
                        clip_to_box=args.clip_flow_target,
                        return_grad_norm=True,
                    )
                    # step 6, velocity field (§3.4): flow matching on the straight path, velocity BRN train
                    velocity.train()
                    t = torch.rand(args.batch_size, device=device, generator=update_generator)
                    flow_loss = flow_matching_loss(velocity, b_next_obs, source_actions, target_actions, t)
                    flow_optimizer.zero_grad()
                    flow_loss.backward()
                    flow_optimizer.step()
                # step 8 (phi-bar <- phi+) happens at the start of the next update's critic step

                num_updates += 1
                nonfinite |= ~torch.isfinite(qf1_loss + qf2_loss + actor_loss + flow_loss)
                if num_updates % args.log_every == 0:
                    stop_if_nonfinite()
                    sps = int((global_step - start_step) / (time.time() - start_time))
                    writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
                    writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
                    writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                    writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                    writer.add_scalar("losses/qf_loss", (qf1_loss + qf2_loss).item() / 2.0, global_step)
                    writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                    # step 7, diagnostics (§7): post-update theta and w, phi-bar, everything in eval mode
                    with torch.no_grad():
                        actor.eval()
                        velocity.eval()
                        _, log_std = actor(b_obs)
                        writer.add_scalar("flow/source_log_std", log_std.mean().item(), global_step)
                        if args.flow:
                            fsr_source = actor.sample(b_obs, noise)
                            fsr_flowed = euler_sample(velocity, b_obs, fsr_source, args.euler_steps)
                            fsr = flow_superiority_ratio(q_min_bar, b_obs, fsr_source, fsr_flowed)
                            q_gain = q_min_bar(b_next_obs, target_actions) - q_min_bar(b_next_obs, source_actions)
                            displacement = target_actions - source_actions
                            writer.add_scalar("losses/flow_loss", flow_loss.item(), global_step)
                            writer.add_scalar("flow/superiority_ratio", fsr.item(), global_step)
                            writer.add_scalar("flow/q_gain", q_gain.mean().item(), global_step)
                            writer.add_scalar("flow/displacement", displacement.norm(dim=-1).mean().item(), global_step)
                            writer.add_scalar(
                                "flow/displacement_max", displacement.abs().amax(dim=-1).mean().item(), global_step
                            )
                            writer.add_scalar("flow/grad_norm", flow_grad_norm.item(), global_step)
                    writer.add_scalar("charts/action_abs_max", float(np.abs(actions).max(axis=-1).mean()), global_step)
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
