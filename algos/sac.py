# docs and experiment results can be found at README.md#sacpy
"""Soft Actor-Critic (Haarnoja et al., arXiv 1801.01290 / 1812.05905), CleanRL-style, one file.

Two presets (../shared/specs/baselines.md §1), chosen with --preset; every explicitly passed flag overrides them:
  * paper           CleanRL's sac_continuous_action.py: 2x256 ReLU, PyTorch default init, separate mu/log-std heads
                    with log-std squashed into [-5, 2], critic/alpha lr 1e-3, two actor steps every second update,
                    alpha loss on a fresh sample written in alpha, 1 env, 5k warm-up.
  * qflex-protocol  (default) the SAC the Qflex authors ran: 3x256 GELU, truncated-normal 1/sqrt(fan_in) init,
                    one 2d head with log-std clipped to [-20, 0.5], exact tanh log-det, lr 3e-4 everywhere, alpha0 = e,
                    reward scale 0.2, alpha loss -log(alpha) * sg(log pi + H), 80 envs, 1 update per vector step,
                    30k warm-up, 20M transitions (the myoLegWalk-v0 budget).
One Adam over both critics is used in both presets: Adam is per-parameter, so it equals one Adam per critic.
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
    """hyperparameter preset: `paper` (CleanRL's SAC) or `qflex-protocol` (the Qflex authors' comparison)"""
    total_timesteps: int | None = None
    """total env transitions, summed over all envs (preset: paper 1M, qflex-protocol 20M)"""
    num_envs: int | None = None
    """number of parallel envs E (preset: paper 1, qflex-protocol 80)"""
    async_envs: bool = False
    """use gymnasium's AsyncVectorEnv (subprocesses) instead of SyncVectorEnv"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int | None = None
    """env transitions of uniform random actions before updates start (preset: paper 5k, qflex-protocol 30k)"""
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
    """the learning rate of the policy network optimizer (preset: 3e-4)"""
    q_lr: float | None = None
    """the learning rate of the Q network optimizer (preset: paper 1e-3, qflex-protocol 3e-4)"""
    alpha_lr: float | None = None
    """the learning rate of the temperature optimizer (preset: paper 1e-3, qflex-protocol 3e-4)"""
    policy_frequency: int | None = None
    """policy update period in updates; each period runs that many actor steps (preset: paper 2, qflex-protocol 1)"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int | None = None
    """number of hidden layers (preset: paper 2, qflex-protocol 3)"""
    alpha: float | None = None
    """initial entropy temperature (preset: paper 1, qflex-protocol e)"""
    autotune: bool = True
    """automatic tuning of the entropy temperature towards the target entropy -|A|"""
    reward_scale: float | None = None
    """rewards are multiplied by this inside the update (preset: paper 1, qflex-protocol 0.2)"""


PRESETS = {
    "paper": dict(
        total_timesteps=1_000_000,
        num_envs=1,
        learning_starts=5_000,
        policy_lr=3e-4,
        q_lr=1e-3,
        alpha_lr=1e-3,
        policy_frequency=2,
        num_layers=2,
        alpha=1.0,
        reward_scale=1.0,
    ),
    "qflex-protocol": dict(
        total_timesteps=20_000_000,
        num_envs=80,
        learning_starts=30_000,
        policy_lr=3e-4,
        q_lr=3e-4,
        alpha_lr=3e-4,
        policy_frequency=1,
        num_layers=3,
        alpha=math.e,
        reward_scale=0.2,
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
    ]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_freq", "final_eval_episodes"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size > args.buffer_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.num_envs > args.buffer_size:
        raise ValueError(f"--num-envs {args.num_envs} is larger than --buffer-size {args.buffer_size}")
    if not (0 < args.gamma <= 1 and 0 < args.tau <= 1):
        raise ValueError("--gamma and --tau must lie in (0, 1]")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this script, or raise ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("algo") != "sac":
        raise ValueError(f"{path} is not a sac.py checkpoint")
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
    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, activation, jax_init: bool):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden_dim, num_layers, activation, jax_init)
        self.head = nn.Linear(hidden_dim, 1)
        if jax_init:
            trunc_normal_init_(self.head)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, actions], dim=1))).squeeze(-1)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # paper (CleanRL): squashed range
LOG_STD_CLIP = (-20.0, 0.5)  # qflex-protocol (relax create_sac_net): hard clip


class Actor(nn.Module):
    """Tanh-Gaussian policy. `paper`: separate mu/log-std heads, tanh-squashed log-std; else one 2d head, clipped."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, activation, jax_init: bool, paper_heads: bool
    ):
        super().__init__()
        self.paper_heads = paper_heads
        self.trunk = mlp(obs_dim, hidden_dim, num_layers, activation, jax_init)
        if paper_heads:
            self.fc_mean, self.fc_logstd = nn.Linear(hidden_dim, act_dim), nn.Linear(hidden_dim, act_dim)
        else:
            self.fc_head = nn.Linear(hidden_dim, 2 * act_dim)
            if jax_init:
                trunc_normal_init_(self.fc_head)

    def forward(self, obs: torch.Tensor):
        h = self.trunk(obs)
        if self.paper_heads:
            mean, log_std = self.fc_mean(h), torch.tanh(self.fc_logstd(h))
            return mean, LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        mean, log_std = self.fc_head(h).chunk(2, dim=-1)
        return mean, log_std.clamp(*LOG_STD_CLIP)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor, exact_log_det: bool):
        """Reparameterised a = tanh(mu + sigma * noise) and its log-probability (see `tanh_gaussian_log_prob`)."""
        mean, log_std = self(obs)
        x = mean + log_std.exp() * noise
        return torch.tanh(x), tanh_gaussian_log_prob(x, noise, log_std, exact_log_det)


def tanh_gaussian_log_prob(x: torch.Tensor, noise: torch.Tensor, log_std: torch.Tensor, exact: bool) -> torch.Tensor:
    """log pi(tanh(x)) for x = mu + sigma * noise, summed over action dimensions.

    log N(x; mu, sigma) = -noise^2/2 - log sigma - log(2 pi)/2, minus the tanh log-Jacobian, written either as
    CleanRL does, log(1 - tanh(x)^2 + 1e-6) (paper), or in the exact stable form 2 (log 2 - x - softplus(-2x)).
    """
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    if exact:
        log_det = 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))
    else:
        log_det = torch.log(1 - torch.tanh(x).pow(2) + 1e-6)
    return (gaussian - log_det).sum(-1)


def soft_q_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, gamma: float):
    """y = r + gamma * (1 - terminated) * (min_i Q_i(s', a') - alpha * log pi(a'|s')); terminated only, never truncated."""
    return rewards + gamma * (1.0 - terminations) * (torch.minimum(next_q1, next_q2) - alpha * next_log_prob)


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
    activation = nn.ReLU if paper else nn.GELU
    net_kwargs = dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers, activation=activation, jax_init=not paper)
    actor = Actor(obs_dim, act_dim, paper_heads=paper, **net_kwargs).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf2_target = SoftQNetwork(obs_dim, act_dim, **net_kwargs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
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
            (qf1_target, "qf1_target"),
            (qf2_target, "qf2_target"),
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
            algo="sac",
            args=vars(args),
            run_name=run_name,
            global_step=global_step,
            num_updates=num_updates,
            actor=actor.state_dict(),
            qf1=qf1.state_dict(),
            qf2=qf2.state_dict(),
            qf1_target=qf1_target.state_dict(),
            qf2_target=qf2_target.state_dict(),
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
        """Evaluation action: tanh(mu), already in [-1, 1]."""
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
    qf1_loss = qf2_loss = qf1_a_values = qf2_a_values = actor_loss = alpha_loss = zero
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
                noise = torch.randn((args.num_envs, act_dim), device=device, generator=act_generator)
                actions, _ = actor.sample(torch.as_tensor(obs, device=device), noise, exact_log_det=not paper)
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
                    next_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                    next_actions, next_log_prob = actor.sample(b_next_obs, next_noise, exact_log_det=not paper)
                    next_q_value = soft_q_target(
                        args.reward_scale * b_rewards,
                        b_terminations,
                        qf1_target(b_next_obs, next_actions),
                        qf2_target(b_next_obs, next_actions),
                        next_log_prob,
                        alpha,
                        args.gamma,
                    )
                qf1_a_values = qf1(b_obs, b_actions)
                qf2_a_values = qf2(b_obs, b_actions)
                qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
                qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
                q_optimizer.zero_grad()
                (qf1_loss + qf2_loss).backward()
                q_optimizer.step()

                if num_updates % args.policy_frequency == 0:  # TD3-style delay, compensated by policy_frequency steps
                    for _ in range(args.policy_frequency):
                        pi_noise = torch.randn((args.batch_size, act_dim), device=device, generator=update_generator)
                        pi, log_pi = actor.sample(b_obs, pi_noise, exact_log_det=not paper)
                        min_qf_pi = torch.minimum(qf1(b_obs, pi), qf2(b_obs, pi))
                        actor_loss = (alpha * log_pi - min_qf_pi).mean()
                        actor_optimizer.zero_grad()
                        actor_loss.backward(inputs=list(actor.parameters()))  # leave no gradient in the critics
                        actor_optimizer.step()

                        if args.autotune:
                            if paper:  # CleanRL: fresh sample, loss written in alpha
                                with torch.no_grad():
                                    alpha_noise = torch.randn(
                                        (args.batch_size, act_dim), device=device, generator=update_generator
                                    )
                                    _, log_pi = actor.sample(b_obs, alpha_noise, exact_log_det=False)
                                alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                            else:  # relax: the actor step's log pi, loss written in log alpha
                                alpha_loss = -(log_alpha * (log_pi.detach() + target_entropy)).mean()
                            a_optimizer.zero_grad()
                            alpha_loss.backward()
                            a_optimizer.step()
                            alpha = log_alpha.detach().exp()

                # update the target networks
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
