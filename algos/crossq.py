# docs and experiment results can be found at docs/algorithms/crossq.md
"""CrossQ (Bhatt, Palenicek et al., ICLR 2024, arXiv 1902.05605), CleanRL-style, in one file.

SAC without target networks, with BatchRenorm in the critics and the actor. The critics regress on a soft target
computed in the same train-mode pass over [s; s'] and [a; a'] (`critic_step`), a tanh-Gaussian actor maximises
min_i Q - alpha log pi (`actor_step`), and alpha is tuned towards the target entropy -|A| (`alpha_step`).
Two presets (`--preset`; any flag you pass wins over them):
  * paper           the CrossQ authors' release (adityab/CrossQ): 2x2048 critics, policy delay 3, Flax BatchRenorm;
  * qflex-protocol  (default) the CrossQ the Qflex authors compared against, on myoLegWalk-v0's budget.
Equations, defaults and their sources: docs/algorithms/crossq.md.
"""

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
    """critic weights in the actor loss, from after or before this update's critic step; BatchRenorm statistics are
    always the ones the joint pass just wrote (preset: paper post-update, qflex-protocol pre-update)"""
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
    nan_to_num: bool | None = None
    """replace NaN and +-inf in the sampled s, a, r and s' by 0 before the update, as the Qflex authors' CrossQ does
    (preset: paper False, qflex-protocol True)"""
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
    "paper": dict(total_timesteps=5_000_000, num_envs=1, learning_starts=5_000, policy_lr=1e-3, q_lr=1e-3, alpha_lr=1e-3,
                  updates_per_step=lambda args: args.num_envs,  # UTD 1 per transition, whatever --num-envs
                  policy_delay=3, actor_critic_weights="post-update", critic_hidden_dim=2048, num_layers=2,
                  separate_heads=True, tanh_correction=True, alpha_loss_form="alpha", brn_warmup=100_000, brn_eps=1e-3,
                  brn_debias=False, nan_to_num=False),
    "qflex-protocol": dict(total_timesteps=20_000_000, num_envs=80, learning_starts=30_000, policy_lr=3e-4, q_lr=3e-4,
                           alpha_lr=3e-4, policy_delay=1, actor_critic_weights="pre-update", critic_hidden_dim=256,
                           num_layers=3, separate_heads=False, tanh_correction=False, alpha_loss_form="log-alpha",
                           brn_warmup=10, brn_eps=1e-5, brn_debias=True, nan_to_num=True),
}  # fmt: skip
# Argument checks besides the common ones: (flags, rule) pairs with a rule of ARG_RULES, then (holds, message) pairs
# over several flags, the message formatted with the arguments.
ALGO_ARG_CHECKS = (
    (("policy_lr", "q_lr", "alpha_lr", "policy_delay", "hidden_dim", "critic_hidden_dim", "num_layers", "alpha",
      "reward_scale", "brn_eps"), "positive"),
    (("brn_warmup", "brn_d_max"), ">= 0"),
    (("adam_beta1", "brn_momentum"), "in [0, 1)"),
    (("brn_r_max",), ">= 1"),
)  # fmt: skip
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


def mlp(in_dim: int, hidden_dim: int, num_layers: int, brn: dict) -> nn.Sequential:
    """BRN(input) -> [Linear -> ReLU -> BRN] x num_layers: normalisation after every activation."""
    layers, width = [BatchRenorm(in_dim, **brn)], in_dim
    for _ in range(num_layers):
        layers += [trunc_normal_init_(nn.Linear(width, hidden_dim)), nn.ReLU(), BatchRenorm(hidden_dim, **brn)]
        width = hidden_dim
    return nn.Sequential(*layers)


class SoftQNetwork(nn.Module):
    """Critic Q_i(s, a) -> [B] on a BatchRenorm trunk; its target carries the entropy term (soft Q-function)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, brn: dict):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers, brn)
        self.head = trunc_normal_init_(nn.Linear(hidden_dim, 1))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


LOG_STD_CLIP = (-20.0, 2.0)  # both presets (sbx and relax): hard clip


class Actor(nn.Module):
    """Tanh-Gaussian policy on a BatchRenorm trunk; separate mu/log-std heads or one 2d head; log-std clipped."""

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


# ALGO LOGIC: maths
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


# ALGO LOGIC: update steps
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminations: torch.Tensor


def nan_to_num_batch(batch: Batch) -> Batch:
    """NaN and +-inf in s, a, r and s' become 0 (relax's guard; terminations are 0/1 by construction)."""
    fields = ("obs", "actions", "rewards", "next_obs")
    return batch._replace(**{k: torch.nan_to_num(getattr(batch, k), nan=0.0, posinf=0.0, neginf=0.0) for k in fields})


def critic_step(batch: Batch, next_noise, actor, qf1, qf2, q_optimizer, log_alpha, args, step_optimizer: bool) -> dict:
    """Backward pass of the critic loss on the soft target of the same joint pass; the optimiser step if asked.

    a' ~ pi(.|s') with the actor's BatchRenorm in eval mode (nothing in it changes). Each critic then runs once in
    train mode over [s; s'], [a; a'] (2B rows), so its BatchRenorm statistics see both halves; the s' half is the
    stop-gradiented bootstrap. The loss is sum_i 1/2 mean (y - Q_i)^2 (paper, sbx) or sum_i mean (Q_i - y)^2
    (qflex-protocol, relax). With step_optimizer=False the gradients wait in the critics for the caller's
    q_optimizer.step(), so that an actor step in between sees the pre-update weights.
    """
    alpha = log_alpha.detach().exp()
    actor.eval()
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(batch.next_obs, next_noise, args.tanh_correction)
    qf1.train()
    qf2.train()
    joint_obs, joint_actions = torch.cat([batch.obs, batch.next_obs]), torch.cat([batch.actions, next_actions])
    qf1_a_values, qf1_next = qf1(joint_obs, joint_actions).chunk(2)
    qf2_a_values, qf2_next = qf2(joint_obs, joint_actions).chunk(2)
    next_q_value = soft_q_target(
        args.reward_scale * batch.rewards, batch.terminations, qf1_next, qf2_next, next_log_prob, alpha, args.gamma
    )
    qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
    qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
    loss_scale = 0.5 if args.preset == "paper" else 1.0  # only rescales Adam's epsilon
    q_optimizer.zero_grad()
    (loss_scale * (qf1_loss + qf2_loss)).backward()
    if step_optimizer:
        q_optimizer.step()
    return {
        "losses/qf1_values": qf1_a_values.detach().mean(),
        "losses/qf2_values": qf2_a_values.detach().mean(),
        "losses/qf1_loss": qf1_loss.detach(),
        "losses/qf2_loss": qf2_loss.detach(),
        "losses/qf_loss": (qf1_loss + qf2_loss).detach() / 2.0,
        "losses/alpha": alpha,
    }


def actor_step(batch: Batch, noise, actor, qf1, qf2, actor_optimizer, log_alpha, args) -> tuple[dict, torch.Tensor]:
    """One step on mean(alpha log pi(a~|s) - min_i Q_i(s, a~)), a~ reparameterised; returns the logs and log pi(a~|s).

    The actor's BatchRenorm runs in train mode (its statistics move), the critics' in eval mode (they read the
    statistics the joint pass just wrote); the actor is left in eval mode for acting.
    """
    actor.train()
    qf1.eval()
    qf2.eval()
    pi, log_pi = actor.sample(batch.obs, noise, args.tanh_correction)
    min_qf_pi = torch.minimum(qf1(batch.obs, pi), qf2(batch.obs, pi))
    actor_loss = (log_alpha.detach().exp() * log_pi - min_qf_pi).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
    actor_optimizer.step()
    actor.eval()
    return {"losses/actor_loss": actor_loss.detach(), "losses/entropy": -log_pi.detach().mean()}, log_pi.detach()


def alpha_step(log_pi, log_alpha, a_optimizer, target_entropy: float, form: str) -> dict:
    """One step of the temperature loss (`temperature_loss`) on log alpha."""
    alpha_loss = temperature_loss(log_alpha, log_pi, target_entropy, form)
    a_optimizer.zero_grad()
    alpha_loss.backward()
    a_optimizer.step()
    return {"losses/alpha_loss": alpha_loss.detach(), "losses/alpha": log_alpha.detach().exp()}


# ALGO LOGIC: diagnostics
SATURATION_THRESHOLD = 0.99  # |a_i| above this counts as an action piled up at the box edge


def saturation_count(actions: torch.Tensor) -> torch.Tensor:
    """Number of action coordinates with |a_i| > SATURATION_THRESHOLD (a device scalar: no host sync per step)."""
    return (actions.abs() > SATURATION_THRESHOLD).sum()


def rollout_diagnostics(action_counts: torch.Tensor, device: torch.device) -> dict:
    """`charts/action_saturation`: the saturated fraction of the rollout action coordinates since the last log.

    `action_counts` holds (saturated, all) on the device, read (a log step) and reset here. Nothing is returned when no
    policy action was taken since the last log (the entry in `logs` then keeps its last value).
    """
    saturated, acted = action_counts.tolist()
    action_counts.zero_()
    if not acted:
        return {}
    return {"charts/action_saturation": torch.tensor(saturated / acted, dtype=torch.float32, device=device)}


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
    brn = dict(momentum=args.brn_momentum, eps=args.brn_eps, r_max=args.brn_r_max, d_max=args.brn_d_max,
               warmup=args.brn_warmup, debias=args.brn_debias)  # fmt: skip
    actor = Actor(obs_dim, act_dim, args.hidden_dim, args.num_layers, brn, args.separate_heads).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, args.critic_hidden_dim, args.num_layers, brn).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, args.critic_hidden_dim, args.num_layers, brn).to(device)
    adam = dict(betas=(args.adam_beta1, 0.999), capturable=args.cudagraphs)  # CUDA graphs: step count on the device
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam)
    target_entropy = -float(act_dim)
    log_alpha = torch.tensor(math.log(args.alpha), device=device, requires_grad=args.autotune)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.alpha_lr, capturable=args.cudagraphs)
    # --compile: every update step and the acting sample under torch.compile; without it these are the functions
    critic_step_fn, actor_step_fn, alpha_step_fn = (maybe_compile(fn, args) for fn in (critic_step, actor_step, alpha_step))
    sample_fn = maybe_compile(actor.sample, args)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device, replay_generator)
    action_counts = torch.zeros(2, dtype=torch.float64, device=device)  # saturated, all rollout coordinates since a log
    # Everything a checkpoint holds besides the counters; save and resume both read this one mapping. BatchRenorm
    # running statistics and call counters are module buffers, so they travel with the networks.
    stateful = dict(actor=actor, qf1=qf1, qf2=qf2, q_optimizer=q_optimizer, actor_optimizer=actor_optimizer,
                    a_optimizer=a_optimizer, log_alpha=log_alpha, action_counts=action_counts)  # fmt: skip

    @torch.no_grad()
    def deterministic_action(obs: np.ndarray) -> np.ndarray:
        """Evaluation action: tanh(mu) with the actor's BatchRenorm in eval mode, already in [-1, 1]."""
        actor.eval()
        mean, _ = actor(torch.as_tensor(obs, device=device))
        return torch.tanh(mean).cpu().numpy()

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
            actor.eval()
            with torch.no_grad():
                noise = torch.randn((args.num_envs, act_dim), device=device, generator=act_generator)
                actions, _ = sample_fn(torch.as_tensor(obs, device=device), noise, args.tanh_correction)
            actions = actions.clone()  # read after the update (--overlap), which may reuse a CUDA graph's output memory
            action_counts[0] += saturation_count(actions)
            action_counts[1] += actions.numel()

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
                if args.nan_to_num:
                    batch = nan_to_num_batch(batch)
                next_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                # The critics' optimiser steps inside critic_step (post-update) or after the actor step (pre-update); then
                # the actor step sees the critics' weights from before this update with the BatchRenorm statistics that the
                # joint pass just wrote.
                post_update = args.actor_critic_weights == "post-update"
                logs.update(critic_step_fn(batch, next_noise, actor, qf1, qf2, q_optimizer, log_alpha, args, post_update))
                if (num_updates + 1) % args.policy_delay == 0:  # after critic updates d, 2d, 3d, ... (d = policy_delay)
                    pi_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                    actor_logs, log_pi = actor_step_fn(batch, pi_noise, actor, qf1, qf2, actor_optimizer, log_alpha, args)
                    logs.update(actor_logs)
                    if args.autotune:
                        logs.update(alpha_step_fn(log_pi, log_alpha, a_optimizer, target_entropy, args.alpha_loss_form))
                if not post_update:
                    q_optimizer.step()
                num_updates += 1
                nonfinite |= nonfinite_loss(logs)
                if num_updates % args.log_every == 0:
                    logs.update(rollout_diagnostics(action_counts, device))
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
