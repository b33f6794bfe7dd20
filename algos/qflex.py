# docs and experiment results can be found at docs/algorithms/qflex.md
"""Qflex, Q-guided flow exploration (Wei, Zuo & Sui, ICLR 2026, arXiv 2601.19707), CleanRL-style, in one file.

Twin critics learn CrossQ-style, with BatchRenorm, one joint pass over [s; s'] and no target network (`critic_step`);
a tanh-Gaussian source policy maximises min_j Q with no entropy term (`actor_step`); a velocity field learns by flow
matching to carry source actions to targets found by truncated Q-gradient ascent (`flow_step`). Acting integrates
the velocity field from a source action (`euler_sample`). Two presets (`--preset`; any flag you pass wins over them):
  * qflex-protocol  (default) the official settings (reference scripts/train.py) on myoLegWalk-v0's budget;
  * paper           the same values, so that a sweep over `--preset paper` covers Qflex too.
Equations, defaults and their sources: docs/algorithms/qflex.md.
"""

import copy
import json
import math
import os
import random
import sys
import time
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
    policy_lr: float | None = None
    """the learning rate of the source policy optimizer (preset: 3e-4)"""
    q_lr: float | None = None
    """the learning rate of the Q network optimizer (preset: 3e-4)"""
    flow_lr: float | None = None
    """the learning rate of the velocity field optimizer (preset: 3e-4)"""
    hidden_dim: int = 256
    """width of every hidden layer (256 up to ~120 actuators; 1024 for MS-Human-700's 700)"""
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
    """project every ascent iterate onto [-1, 1]^d (ablation; the reference never clips)"""


PRESETS = {
    "qflex-protocol": dict(total_timesteps=20_000_000, num_envs=80, learning_starts=30_000, policy_lr=3e-4, q_lr=3e-4,
                           flow_lr=3e-4, num_layers=3),
}  # fmt: skip
PRESETS["paper"] = PRESETS["qflex-protocol"]  # Qflex's authors ran their own protocol: one set of values, two names
# Argument checks besides the common ones: (flags, rule) pairs with a rule of ARG_RULES, then (holds, message) pairs
# over several flags, the message formatted with the arguments.
ALGO_ARG_CHECKS = (
    (("policy_lr", "q_lr", "flow_lr", "hidden_dim", "num_layers", "flow_step_size", "euler_steps"), "positive"),
    (("flow_steps",), ">= 0"),
)
ALGO_ARG_CONSTRAINTS = ()


# TRY NOT TO MODIFY: BatchRenorm
# The two flavours of the JAX reference code as BatchRenorm keyword arguments: the Flax module of the CrossQ release
# (adityab/CrossQ, sbx) and the Haiku module of the Qflex authors' relax. Momentum, r_max and d_max agree.
BRN_FLAX = dict(momentum=0.99, eps=1e-3, r_max=3.0, d_max=5.0, warmup=100_000, debias=False)
BRN_HAIKU = dict(momentum=0.99, eps=1e-5, r_max=3.0, d_max=5.0, warmup=10, debias=True)


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
    """Batch renormalisation (Ioffe, arXiv 1702.03275, Algorithm 1) over dim 0 of (n, num_features) inputs.

    Train mode normalises x with its batch mean and biased variance, corrected by r and d (`batch_renorm_statistics`)
    once the layer has had `warmup` train-mode calls (plain batch norm before), then moves the running statistics
    towards that batch's. Eval mode returns gamma (x - running_mean) / sqrt(running_var + eps) + beta and updates
    nothing, so rows are independent. `momentum` is the decay of the running statistics (the JAX meaning; PyTorch's
    BatchNorm momentum is 1 minus it). The flavours differ in how the running statistics start and move:
      * debias=False (Flax, `BRN_FLAX`): a plain EMA from mean 0 / var 1; the batch variance is clamped at 0.
      * debias=True (Haiku, `BRN_HAIKU`): a zero-debiased EMA, so the first train-mode call sets the running
        statistics to that batch's exactly; the batch variance is floored at eps.
    Before its first train-mode call a layer reads mean 0 / var 1 in both flavours. `num_batches_tracked` counts the
    train-mode calls; running statistics and counter are buffers, so a checkpoint holds them.
    """

    def __init__(
        self, num_features: int, *, momentum: float, eps: float, r_max: float, d_max: float, warmup: int, debias: bool
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


# ALGO LOGIC: networks
def trunc_normal_init_(layer: nn.Linear) -> nn.Linear:
    """Haiku's default Linear init, used by the JAX reference code: N(0, 1/fan_in) truncated at 2 std, zero bias."""
    std = 1.0 / math.sqrt(layer.in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    """The trunk of all three networks: BRN(input) -> [Linear(H) -> ReLU -> BRN] x L; the caller adds Linear(out)."""
    layers, width = [BatchRenorm(in_dim, **BRN_HAIKU)], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), nn.ReLU(), BatchRenorm(hidden_dim, **BRN_HAIKU)]
        width = hidden_dim
    return nn.Sequential(*layers)


class QNetwork(nn.Module):
    """Critic Q_j(s, a) -> [B]; its target has no entropy term."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


def q_min_bar(qf1_bar: QNetwork, qf2_bar: QNetwork, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """min_j Q_j(s, a; phi-bar) with BatchRenorm in eval mode, so rows stay independent and no statistic changes."""
    qf1_bar.eval()
    qf2_bar.eval()
    return torch.minimum(qf1_bar(obs, actions), qf2_bar(obs, actions))


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


# ALGO LOGIC: maths
def bootstrap_target(rewards, terminations, next_q1, next_q2, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min_j sg(q'_j): no entropy term; terminated only, never truncated."""
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
    """The flow target a1: `num_steps` steps of truncated steepest ascent on q_fn(obs, .) from `actions`.

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
    """Integrate da/dt = v(s, a, t) from t = 0 to 1 in K = `num_steps` Euler steps.

    Each step uses the velocity at the end of its interval, t_k = k/K, as the reference does, and clips it
    elementwise at +-K, so one step moves a coordinate by at most 1. The result is not clipped to the box.
    """
    dt = 1.0 / num_steps
    for k in range(1, num_steps + 1):
        t = torch.full((actions.shape[0], 1), k * dt, device=actions.device, dtype=actions.dtype)
        actions = actions + dt * velocity_fn(obs, actions, t).clamp(-num_steps, num_steps)
    return actions


def flow_matching_loss(velocity_fn, obs: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_v = mean over B x d of (v(s, a_t, t) - (a1 - a0))^2 on the straight path a_t = (1 - t) a0 + t a1."""
    t = t.reshape(-1, 1)
    a0, a1 = a0.detach(), a1.detach()
    a_t = (1.0 - t) * a0 + t * a1
    return (velocity_fn(obs, a_t, t) - (a1 - a0)).pow(2).mean()


def flow_superiority_ratio(q_fn, obs: torch.Tensor, source_actions: torch.Tensor, flowed_actions: torch.Tensor):
    """FSR: fraction of states whose flowed action has a strictly higher Q than its own source action."""
    return (q_fn(obs, flowed_actions).reshape(-1) > q_fn(obs, source_actions).reshape(-1)).float().mean()


# ALGO LOGIC: update steps
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminations: torch.Tensor


def critic_step(batch: Batch, noise, actor, qf1, qf2, qf1_bar, qf2_bar, q_optimizer, args) -> dict:
    """One step on sum_j mean (Q_j(s, a) - y)^2, y bootstrapped from the same train-mode pass over [s; s'] (CrossQ).

    a' is a source action of the pre-update policy (BatchRenorm eval). phi-bar (qf1_bar, qf2_bar) receives the
    critics' weights before this step and their BatchRenorm statistics after this pass; the other steps read it.
    """
    actor.eval()
    with torch.no_grad():
        next_actions = actor.sample(batch.next_obs, noise)
    qf1.train()
    qf2.train()
    joint_obs, joint_actions = torch.cat([batch.obs, batch.next_obs]), torch.cat([batch.actions, next_actions])
    qf1_a_values, qf1_next_values = qf1(joint_obs, joint_actions).chunk(2)
    qf2_a_values, qf2_next_values = qf2(joint_obs, joint_actions).chunk(2)
    next_q_value = bootstrap_target(batch.rewards, batch.terminations, qf1_next_values, qf2_next_values, args.gamma)
    qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
    qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    qf1_bar.load_state_dict(qf1.state_dict())
    qf2_bar.load_state_dict(qf2.state_dict())
    q_optimizer.step()
    return {
        "losses/qf1_values": qf1_a_values.detach().mean(),
        "losses/qf2_values": qf2_a_values.detach().mean(),
        "losses/qf1_loss": qf1_loss.detach(),
        "losses/qf2_loss": qf2_loss.detach(),
        "losses/qf_loss": (qf1_loss + qf2_loss).detach() / 2.0,
    }


def actor_step(batch: Batch, noise, actor, qf1_bar, qf2_bar, actor_optimizer) -> dict:
    """One step on -mean min_j Q_j(s, a~; phi-bar), a~ reparameterised (policy BatchRenorm train); no entropy term."""
    actor.train()
    pi = actor.sample(batch.obs, noise)
    actor_loss = -q_min_bar(qf1_bar, qf2_bar, batch.obs, pi).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
    actor_optimizer.step()
    return {"losses/actor_loss": actor_loss.detach()}


def flow_step(batch: Batch, noise, t, actor, velocity, qf1_bar, qf2_bar, flow_optimizer, args) -> tuple[dict, tuple]:
    """One flow-matching step of the velocity field towards the flow target on s'; returns the logs and (a0, a1).

    a0 is a source action of the post-update policy (BatchRenorm eval), a1 = `q_guided_flow` of a0 under phi-bar.
    """
    actor.eval()
    with torch.no_grad():
        source_actions = actor.sample(batch.next_obs, noise)
    target_actions, grad_norm = q_guided_flow(
        lambda obs, actions: q_min_bar(qf1_bar, qf2_bar, obs, actions),
        batch.next_obs,
        source_actions,
        args.flow_steps,
        args.flow_step_size,
        clip_to_box=args.clip_flow_target,
        return_grad_norm=True,
    )
    velocity.train()
    flow_loss = flow_matching_loss(velocity, batch.next_obs, source_actions, target_actions, t)
    flow_optimizer.zero_grad()
    flow_loss.backward()
    flow_optimizer.step()
    return {"losses/flow_loss": flow_loss.detach(), "flow/grad_norm": grad_norm}, (source_actions, target_actions)


# ALGO LOGIC: diagnostics
@torch.no_grad()
def flow_diagnostics(batch: Batch, noise, flow_pair, actions, actor, velocity, qf1_bar, qf2_bar, args) -> dict:
    """Log-step diagnostics of the post-update networks and phi-bar, all in eval mode; they draw no random numbers.

    FSR takes one source sample per current state with the update's own noise and flows it by `euler_sample`;
    `flow_pair` is the flow step's (a0, a1) on s' (None with --no-flow); `actions` those of the latest vector step.
    """
    actor.eval()
    velocity.eval()
    _, log_std = actor(batch.obs)
    logs = {"flow/source_log_std": log_std.mean()}
    if flow_pair is not None:
        source_actions, target_actions = flow_pair

        def q_fn(obs, actions):
            return q_min_bar(qf1_bar, qf2_bar, obs, actions)

        fsr_source = actor.sample(batch.obs, noise)
        fsr_flowed = euler_sample(velocity, batch.obs, fsr_source, args.euler_steps)
        displacement = target_actions - source_actions
        logs["flow/superiority_ratio"] = flow_superiority_ratio(q_fn, batch.obs, fsr_source, fsr_flowed)
        logs["flow/q_gain"] = (q_fn(batch.next_obs, target_actions) - q_fn(batch.next_obs, source_actions)).mean()
        logs["flow/displacement"] = displacement.norm(dim=-1).mean()
        logs["flow/displacement_max"] = displacement.abs().amax(dim=-1).mean()
    logs["charts/action_abs_max"] = torch.as_tensor(actions, device=batch.obs.device).abs().amax(dim=-1).mean()
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
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers)
    actor = Actor(obs_dim, act_dim, **net_kwargs).to(device)
    qf1 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = QNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    velocity = VelocityField(obs_dim, act_dim, **net_kwargs).to(device)
    # phi-bar: frozen copies that receive the critics' pre-step weights and post-pass BRN statistics every update
    qf1_bar, qf2_bar = copy.deepcopy(qf1).requires_grad_(False), copy.deepcopy(qf2).requires_grad_(False)
    # reference optimiser: beta1 0.5, constant lr, no weight decay; CUDA graphs need the step count on the device
    adam = dict(betas=(0.5, 0.999), eps=1e-8, capturable=args.cudagraphs)
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam)
    flow_optimizer = torch.optim.Adam(velocity.parameters(), lr=args.flow_lr, **adam)
    # --compile: every update step and the acting path under torch.compile (the flow target's N ascent steps unroll)
    critic_step_fn, actor_step_fn, flow_step_fn = (maybe_compile(fn, args) for fn in (critic_step, actor_step, flow_step))
    sample_fn, euler_sample_fn = maybe_compile(actor.sample, args), maybe_compile(euler_sample, args)
    # z_fix: the evaluation noise, one vector drawn once from a generator seeded with 0, identical for every seed
    z_fix = torch.randn(act_dim, generator=torch.Generator().manual_seed(0)).to(device)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)
    # Everything a checkpoint holds besides the counters; save and resume both read this one mapping. phi-bar is not
    # in it: every critic step overwrites it before anything reads it.
    stateful = dict(actor=actor, qf1=qf1, qf2=qf2, velocity=velocity, q_optimizer=q_optimizer,
                    actor_optimizer=actor_optimizer, flow_optimizer=flow_optimizer)  # fmt: skip

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action: a0 = tanh(mu + sigma * z_fix), K Euler steps, clipped to [-1, 1]."""
        actor.eval()
        velocity.eval()
        obs = torch.as_tensor(obs, device=device)
        actions = actor.sample(obs, z_fix.expand(len(obs), -1))
        if args.flow:
            actions = euler_sample(velocity, obs, actions, args.euler_steps)
        return actions.clamp(-1.0, 1.0).cpu().numpy()

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
            with torch.no_grad():  # a source sample, then K Euler steps of the velocity field; BatchRenorm eval
                actor.eval()
                velocity.eval()
                obs_tensor = torch.as_tensor(obs, device=device)
                noise = torch.randn((args.num_envs, act_dim), device=device, generator=act_generator)
                actions = sample_fn(obs_tensor, noise)
                if args.flow:
                    actions = euler_sample_fn(velocity, obs_tensor, actions, args.euler_steps)
            # stored unclipped; the env wrapper clips before rescaling. A copy: it is read after the update (--overlap),
            # which may reuse a CUDA graph's output memory
            actions = actions.clone()

        # TRY NOT TO MODIFY: execute the game and log data.
        envs.step_async(actions)
        prev_step, global_step = global_step, global_step + args.num_envs
        progress.update(args.num_envs, global_step)
        if not args.overlap:  # the update below samples the buffer with this vector step's transitions
            obs = receive_step(obs, actions)

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts and rb.size >= args.batch_size:
            for _ in range(args.updates_per_step):
                # the reference's guard: NaN and +-inf in the batch become 0
                batch = Batch(*(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in rb.sample(args.batch_size)))
                # one noise draw per update, shared by a' (critic step), a~ (actor step) and a0 (flow step)
                noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                logs.update(critic_step_fn(batch, noise, actor, qf1, qf2, qf1_bar, qf2_bar, q_optimizer, args))
                logs.update(actor_step_fn(batch, noise, actor, qf1_bar, qf2_bar, actor_optimizer))
                flow_pair = None
                if args.flow:
                    t = torch.rand(args.batch_size, device=device, generator=update_generator)
                    flow_logs, flow_pair = flow_step_fn(
                        batch, noise, t, actor, velocity, qf1_bar, qf2_bar, flow_optimizer, args
                    )
                    logs.update(flow_logs)
                num_updates += 1
                nonfinite |= nonfinite_loss(logs)
                if num_updates % args.log_every == 0:
                    logs.update(flow_diagnostics(batch, noise, flow_pair, actions, actor, velocity, qf1_bar, qf2_bar, args))
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
