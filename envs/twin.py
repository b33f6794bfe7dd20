"""MyoSuite's GPU twin as a training backend (``--env-backend mjlab``): the same task, batched over E worlds on MuJoCo
Warp, behind the interface of the CPU vector envs.

MyoSuite 3 builds the twin of a registered id with ``myosuite.make_env(env_id, backend="mjlab", num_envs=E)``: the
same model, observations, reward terms and resets as the CPU env (its cross-backend contract), stepped by mjlab's
``ManagerBasedRlEnv`` with torch tensors in and out. ``TwinVectorEnv`` presents it like ``envs.make_vector_env``:

  * actions in [-1, 1]^d, mapped to the env's own action Box as the CPU ``PolicyActionWrapper`` maps them
    (``c + h * clip(a, -1, 1)``, with c and h read from the CPU env of the same id);
  * float32 observations (the twin's ``actor`` group, the CPU observation vector);
  * same-step autoreset: mjlab's own autoreset is turned off, so a finished world returns its true last
    observation, which goes to ``infos["final_obs"]``, and is then reset in the same step; ``next_obs`` holds the new
    episode's first observation, as gymnasium's SAME_STEP mode does;
  * ``terminations`` is the task's termination alone and ``truncations`` its time limit, so time-outs bootstrap;
  * per-world episode return and length, and ``solved`` from the twin's ``success`` metric where the task has it.

Observations, rewards and flags stay torch tensors on the twin's device; only the finished-episode statistics
cross to the host, in the one transfer a vector step needs to know which worlds finished (mjlab makes the same
host read inside its own step). The extra is installed into its own environment (requirements-mjlab.txt): it pins
mujoco 3.11, and dm_control needs 3.17.
"""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import numpy as np
import torch

from envs import EnvIdError

MJLAB_INSTALL = "python -m venv --system-site-packages .venv-mjlab && .venv-mjlab/bin/pip install -r requirements-mjlab.txt"


def twin_available() -> bool:
    """Whether MyoSuite's mjlab extra (mjlab, MuJoCo Warp) is importable here."""
    return importlib.util.find_spec("mjlab") is not None and importlib.util.find_spec("mujoco_warp") is not None


def twin_env_ids() -> list[str]:
    """The ids MyoSuite registers a twin for (mjlab's task registry)."""
    import myosuite.envs.myo.backends.mjlab  # noqa: F401  (registers the twins with mjlab)
    from mjlab.tasks.registry import list_tasks

    return sorted(list_tasks())


class TwinVectorEnv(gym.vector.VectorEnv):
    """E worlds of the MyoSuite twin of `env_id` on `device`, with the step_async / step_wait pair of envs.SyncVectorEnv.

    `action_centre` and `action_half_width` are those of the CPU env's action Box (envs.action_half_width).
    """

    def __init__(self, env_id: str, num_envs: int, device, action_centre: np.ndarray, action_half_width: np.ndarray):
        if not twin_available():
            raise EnvIdError(f"--env-backend mjlab needs MyoSuite's mjlab extra, which is not installed: {MJLAB_INSTALL}")
        if env_id not in twin_env_ids():
            raise EnvIdError(f"env '{env_id}' has no mjlab twin in MyoSuite (envs.twin.twin_env_ids()); use --env-backend cpu")
        from mjlab.envs import ManagerBasedRlEnv
        from mjlab.tasks.registry import load_env_cfg

        cfg = load_env_cfg(env_id)
        cfg.scene.num_envs = num_envs
        cfg.auto_reset = False  # this class resets finished worlds itself, after reading their last observation
        self.twin = getattr(cfg, "env_cls", ManagerBasedRlEnv)(cfg, device=str(device))
        self.env_id, self.num_envs, self.device = env_id, num_envs, torch.device(str(device))
        obs_dim = self.twin.single_observation_space.spaces["actor"].shape[0]
        act_dim = self.twin.single_action_space.shape[0]
        if act_dim != len(action_half_width):
            raise EnvIdError(f"the twin of '{env_id}' takes {act_dim} actions, its CPU env {len(action_half_width)}")
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.action_centre = torch.as_tensor(action_centre, dtype=torch.float32, device=self.device)
        self.action_half_width = torch.as_tensor(action_half_width, dtype=torch.float32, device=self.device)
        metrics = getattr(self.twin, "metrics_manager", None)
        names = list(getattr(metrics, "active_terms", []) or [])
        self._success_index = names.index("success") if "success" in names and hasattr(metrics, "_step_values") else None
        self.episode_returns = torch.zeros(num_envs, dtype=torch.float64, device=self.device)
        self.episode_lengths = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self._pending_actions = None
        self.final_activations = None  # every world's muscle activations before the last autoreset (TwinEvalEnv)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset every world; mjlab seeds its random streams (and the global ones) with `seed`."""
        obs, _ = self.twin.reset(seed=seed)
        self.episode_returns.zero_()
        self.episode_lengths.zero_()
        return obs["actor"].clone(), {}

    def step_async(self, actions) -> None:
        self._pending_actions = actions

    def step_wait(self):
        actions, self._pending_actions = self._pending_actions, None
        return self.step(actions)

    def step(self, actions):
        actions = torch.as_tensor(actions, dtype=torch.float32).to(self.device, non_blocking=True)
        env_actions = self.action_centre + self.action_half_width * actions.clamp(-1.0, 1.0)
        obs, rewards, terminations, truncations, _ = self.twin.step(env_actions)
        next_obs = obs["actor"].clone()
        self.episode_returns += rewards
        self.episode_lengths += 1
        done = terminations | truncations
        done_ids = done.nonzero().squeeze(-1)
        infos = {}
        if len(done_ids):  # the host read that mjlab's step makes too
            success = None
            if self._success_index is not None:
                success = self.twin.metrics_manager._step_values[done_ids, self._success_index] > 0
            stats = [self.episode_returns[done_ids], self.episode_lengths[done_ids].double()]
            stats = torch.stack(stats + ([success.double()] if success is not None else [])).cpu().numpy()
            ids = done_ids.cpu().numpy()
            mask = np.zeros(self.num_envs, dtype=bool)
            mask[ids] = True

            def per_env(values, dtype):
                out = np.zeros(self.num_envs, dtype=dtype)
                out[ids] = values
                return out

            final_info = {"episode": {"r": per_env(stats[0], np.float64), "l": per_env(stats[1], np.int64)}, "_episode": mask}
            if success is not None:
                final_info.update(solved=per_env(stats[2], bool), _solved=mask)
            infos = {"final_obs": next_obs.clone(), "_final_obs": mask, "final_info": final_info}
            act = getattr(self.twin.sim.data, "act", None)
            self.final_activations = None if act is None else act.clone()  # the reset below zeroes them
            reset_obs, _ = self.twin.reset(env_ids=done_ids)
            next_obs[done_ids] = reset_obs["actor"][done_ids]
            self.episode_returns[done_ids] = 0.0
            self.episode_lengths[done_ids] = 0
        return next_obs, rewards.float(), terminations, truncations, infos

    def close_extras(self, **kwargs) -> None:
        if hasattr(self, "twin"):  # not when the constructor failed
            self.twin.close()

    # The physics state of every world and the episode counters, for checkpoints (envs.state).
    STATE_FIELDS = ("qpos", "qvel", "act", "ctrl", "qacc_warmstart", "time")

    def state_dict(self) -> dict:
        data = self.twin.sim.data
        state = {name: getattr(data, name).detach().cpu().clone() for name in self.STATE_FIELDS if hasattr(data, name)}
        counters = dict(episode_length_buf=self.twin.episode_length_buf, episode_returns=self.episode_returns,
                        episode_lengths=self.episode_lengths)  # fmt: skip
        state.update({name: value.cpu().clone() for name, value in counters.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        data = self.twin.sim.data
        for name in self.STATE_FIELDS:
            if name in state and hasattr(data, name):
                getattr(data, name).copy_(state[name].to(self.device))
        self.twin.episode_length_buf.copy_(state["episode_length_buf"].to(self.device))
        self.episode_returns.copy_(state["episode_returns"].to(self.device))
        self.episode_lengths.copy_(state["episode_lengths"].to(self.device))
        self.twin.sim.forward()

    def __repr__(self) -> str:
        return f"TwinVectorEnv({self.env_id!r}, num_envs={self.num_envs}, device={self.device})"


class TwinEvalEnv(gym.Env):
    """A one-world TwinVectorEnv as the single gym.Env that envs.evaluate runs (--eval-backend mjlab): NumPy in and out,
    ``solved`` in the last step's info where the task reports success, the world's muscle activations for the effort."""

    def __init__(self, vector_env: TwinVectorEnv):
        self.vector_env = vector_env
        self.observation_space, self.action_space = vector_env.single_observation_space, vector_env.single_action_space
        self.action_half_width = vector_env.action_half_width.cpu().numpy()
        self.action_centre = vector_env.action_centre.cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, _ = self.vector_env.reset(seed=seed)
        return obs[0].cpu().numpy(), {}

    def step(self, action):
        next_obs, rewards, terminations, truncations, infos = self.vector_env.step(torch.as_tensor(action)[None])
        info, self._ended = {}, bool(infos)
        if infos:  # the episode ended: its last observation, not the next episode's first
            next_obs = infos["final_obs"]
            if "solved" in infos["final_info"]:
                info["solved"] = bool(infos["final_info"]["solved"][0])
        return next_obs[0].cpu().numpy(), float(rewards[0]), bool(terminations[0]), bool(truncations[0]), info

    def muscle_activations(self) -> np.ndarray | None:
        """The activations after the last step (on the step that ended the episode: before the world's reset)."""
        ended = getattr(self, "_ended", False) and self.vector_env.final_activations is not None
        act = self.vector_env.final_activations if ended else getattr(self.vector_env.twin.sim.data, "act", None)
        return None if act is None or act.numel() == 0 else act[0].cpu().numpy()

    def close(self) -> None:
        self.vector_env.close()
