"""The one layer the algorithm files share: env creation, vector envs, replay transitions, evaluation, video.

Every env made here looks the same to an algorithm:
  * actions live in [-1, 1]^d; the wrapper sends ``c + h * clip(a, -1, 1)`` to the underlying env
    (c, h = centre and half-width of its Box), so algorithms never rescale and may store unclipped actions;
  * observations are float32 (dm_control dict observations are flattened first);
  * ``info`` keeps only ``solved`` (MyoSuite's success flag) plus the per-env episode statistics, because
    MyoSuite's per-step ``obs_dict``/``rwd_dict`` would otherwise be pickled and merged on every vector step;
  * episode return/length come from a per-env ``RecordEpisodeStatistics`` (the vector-level one miscounts
    under same-step autoreset: it drops the first reward of every episode after the first).

Supported ids: MyoSuite (offline ones), Gymnasium MuJoCo v5, ``dm_control/*`` through shimmy, our ChainReach
tasks, and any user env as ``some.module:EnvName-v0`` (the module is imported, which registers the id).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from dataclasses import dataclass, field

# Offscreen MuJoCo rendering on machines without a display (Mesa EGL); must precede the first mujoco import.
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from envs.chain_reach import register_chain_reach  # noqa: E402

register_chain_reach()

# MyoSuite ids that fetch motion clips from the Hugging Face hub: never usable offline.
NETWORK_ENV_IDS = {
    "myoFullBodyDirectional-v0": "downloads motion clips from the Hugging Face hub when it is made",
    "myoChallengeChaseTagFBVs-v0": "downloads a motion clip from the Hugging Face hub on its first step",
}
# Gymnasium's `info` keys worth keeping per step; everything else is dropped (see module docstring).
KEPT_INFO_KEYS = ("solved",)


class EnvError(ValueError):
    """A problem with an env, reported to the user in one line (scripts print it and exit non-zero)."""


class EnvIdError(EnvError):
    """An env id that cannot be made here; its message is one line meant for the user."""


def _load_env_families(env_id: str) -> None:
    """Import the packages whose import registers the ids of the family `env_id` belongs to."""
    if ":" in env_id:
        module = env_id.split(":", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise EnvIdError(f"cannot import module '{module}' for env id '{env_id}': {e}") from None
        return
    if env_id.startswith("dm_control/"):
        import shimmy  # noqa: F401  (registers dm_control/* ids)
    elif env_id.startswith("myo") or env_id not in gym.registry:
        import myosuite  # noqa: F401  (registers myo* ids; imported for close matches too)


def check_env_id(env_id: str) -> str:
    """Return the registered id for `env_id` or raise EnvIdError with a one-line explanation.

    ``module:Name-v0`` ids import their module first; unknown ids name their closest registered matches.
    """
    if env_id in NETWORK_ENV_IDS:
        raise EnvIdError(f"env '{env_id}' needs a network download ({NETWORK_ENV_IDS[env_id]}); pick an offline env")
    _load_env_families(env_id)
    registered_id = env_id.split(":", 1)[1] if ":" in env_id else env_id
    if registered_id not in gym.registry:
        matches = difflib.get_close_matches(registered_id, list(gym.registry), n=3, cutoff=0.6)
        if ":" in env_id:  # suggest ids in the same `module:` form, which is what the user can pass
            matches = [f"{env_id.split(':', 1)[0]}:{match}" for match in matches]
        hint = f"; did you mean {', '.join(matches)}?" if matches else ""
        raise EnvIdError(f"unknown env id '{env_id}'{hint}")
    return registered_id


class PolicyActionWrapper(gym.ActionWrapper):
    """Expose Box(-1, 1, d) and send ``c + h * clip(a, -1, 1)`` to the wrapped env's Box."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise EnvIdError(f"env '{env.spec.id if env.spec else env}' needs a flat Box action space, got {space}")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise EnvIdError(f"env '{env.spec.id if env.spec else env}' has an unbounded action space")
        self.action_centre = ((space.high.astype(np.float64) + space.low) / 2).astype(space.dtype)
        self.action_half_width = ((space.high.astype(np.float64) - space.low) / 2).astype(space.dtype)
        self.action_space = gym.spaces.Box(-1.0, 1.0, space.shape, np.float32)

    def action(self, action):
        return self.action_centre + self.action_half_width * np.clip(action, -1.0, 1.0).astype(self.action_centre.dtype)


class Float32Observation(gym.ObservationWrapper):
    """Cast observations (float64 for Gymnasium MuJoCo v5 and dm_control) to float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32
        )

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


class KeepInfoKeys(gym.Wrapper):
    """Drop every `info` key but KEPT_INFO_KEYS, so vector envs do not pickle/merge MyoSuite's large dicts."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, {k: info[k] for k in KEPT_INFO_KEYS if k in info}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {k: info[k] for k in KEPT_INFO_KEYS if k in info}


class OffscreenVideo(gym.Wrapper):
    """Write every `every`-th episode as an mp4 under `folder`, rendered offscreen.

    MuJoCo envs (MyoSuite, Gymnasium v5, dm_control) are drawn with ``mujoco.Renderer`` on the unwrapped model,
    whose geometry buffer fits full-body models; other envs must support ``render_mode="rgb_array"``.
    Frames are capped and shadows/reflections are off because software rendering is slow.
    """

    def __init__(
        self,
        env: gym.Env,
        folder: str,
        every: int = 1,
        height: int = 240,
        width: int = 320,
        max_frames: int = 500,
        frame_skip: int | None = None,
    ):
        super().__init__(env)
        self.folder, self.every, self.max_frames = folder, max(1, every), max_frames
        self.height, self.width = height, width
        self.episode_index, self.step_index, self.frames = -1, 0, []
        self.renderer = None
        control_fps = env.metadata.get("render_fps") or 50
        self.fps = int(control_fps)
        self.frame_skip = frame_skip or 1
        os.makedirs(folder, exist_ok=True)

    def _mujoco_model(self):
        unwrapped = self.env.unwrapped
        physics = getattr(unwrapped, "_env", None)  # shimmy: dm_control Environment inside
        if physics is not None and hasattr(physics, "physics"):
            return physics.physics.model.ptr, physics.physics.data.ptr
        model, data = getattr(unwrapped, "model", None), getattr(unwrapped, "data", None)
        import mujoco

        if isinstance(model, mujoco.MjModel) and isinstance(data, mujoco.MjData):
            return model, data
        return None

    def _capture(self):
        if self.episode_index % self.every or len(self.frames) >= self.max_frames or self.step_index % self.frame_skip:
            return
        handles = self._mujoco_model()
        if handles is None:
            frame = self.env.render()
        else:
            import mujoco

            if self.renderer is None:
                self.renderer = mujoco.Renderer(handles[0], self.height, self.width)
            self.renderer.update_scene(handles[1])
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
            frame = self.renderer.render()
        if frame is not None:
            self.frames.append(np.asarray(frame, dtype=np.uint8))

    def _flush(self):
        if self.frames:
            import imageio

            path = os.path.join(self.folder, f"episode-{self.episode_index}.mp4")
            tmp_path = path + ".tmp.mp4"
            imageio.mimwrite(tmp_path, self.frames, fps=max(1, self.fps // self.frame_skip), macro_block_size=1)
            os.replace(tmp_path, path)
        self.frames = []

    def reset(self, **kwargs):
        self._flush()
        obs, info = self.env.reset(**kwargs)
        self.episode_index += 1
        self.step_index = 0
        self._capture()
        return obs, info

    def step(self, action):
        result = self.env.step(action)
        self.step_index += 1
        self._capture()
        if result[2] or result[3]:
            self._flush()
        return result

    def close(self):
        self._flush()
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        super().close()


def make_env(env_id: str, seed: int, idx: int, capture_video: bool, run_name: str, video_every: int = 1, **env_kwargs):
    """Return a thunk building one wrapped env (CleanRL signature). Videos record env `idx == 0` only."""
    registered_id = check_env_id(env_id)

    def thunk():
        render_mode = "rgb_array" if capture_video and idx == 0 and registered_id.startswith("ChainReach") else None
        env = gym.make(env_id, render_mode=render_mode, **env_kwargs) if render_mode else gym.make(env_id, **env_kwargs)
        if isinstance(env.observation_space, gym.spaces.Dict):
            env = gym.wrappers.FlattenObservation(env)
        env = KeepInfoKeys(env)
        env = Float32Observation(env)
        env = PolicyActionWrapper(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if capture_video and idx == 0:
            env = OffscreenVideo(env, os.path.join("videos", run_name), every=video_every)
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
        return env

    return thunk


def host_actions(actions):
    """Actions as the CPU envs take them: a torch tensor (the policy's, on any device) becomes a NumPy array."""
    return actions.detach().cpu().numpy() if hasattr(actions, "detach") else actions


class SyncVectorEnv(gym.vector.SyncVectorEnv):
    """gymnasium's SyncVectorEnv with the step_async / step_wait pair of the pool and AsyncVectorEnv, so one training
    loop serves all three; in this process the envs step inside step_wait (after an overlapped update)."""

    def step_async(self, actions) -> None:
        self._pending_actions = host_actions(actions)

    def step_wait(self):
        actions, self._pending_actions = self._pending_actions, None
        return self.step(actions)


class AsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, taking the policy's torch actions as the other vector envs do."""

    def step_async(self, actions) -> None:
        super().step_async(host_actions(actions))


def make_vector_env(env_id: str, num_envs: int, seed: int, async_envs: bool = False, run_name: str = ""):
    """`num_envs` copies of `env_id` (env i seeded seed + i), same-step autoreset: one real transition per env per step."""
    thunks = [make_env(env_id, seed + i, i, False, run_name) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if async_envs:
        vector_env = AsyncVectorEnv(thunks, autoreset_mode=mode, shared_memory=True)
    else:
        vector_env = SyncVectorEnv(thunks, autoreset_mode=mode)
    assert vector_env.metadata["autoreset_mode"] == mode
    return vector_env


def make_envs(
    env_id: str,
    num_envs: int,
    seed: int,
    async_envs: bool = False,
    run_name: str = "",
    capture_video: bool = False,
    video_every: int = 1,
    eval_seed: int | None = None,
    env_workers: int = 0,
    backend: str = "cpu",
    eval_backend: str = "cpu",
    device="cpu",
):
    """The training vector env (env i seeded seed + i) and one evaluation env (seeded `eval_seed`, videos if asked).

    ``env_workers=W > 0`` steps the training envs in an ``envs.pool.EnvPool`` of W processes (same outputs, bit for bit).
    ``backend="mjlab"`` trains on MyoSuite's GPU twin (``envs.twin.TwinVectorEnv``, `num_envs` worlds on `device`);
    ``eval_backend="mjlab"`` evaluates on a one-world twin instead of the CPU env.

    Any failure to build them (a user env whose constructor raises, a discrete or unbounded action space) comes out
    as one EnvIdError with a one-line message, so scripts report it without a traceback.
    """
    if "mjlab" in (backend, eval_backend) and capture_video:
        raise EnvIdError("--capture-video renders the CPU env; it needs --env-backend cpu and --eval-backend cpu")
    try:
        if backend == "cpu" and env_workers > 0:
            from envs.pool import EnvPool  # lazy: envs.pool imports this module

            envs = EnvPool(env_id, num_envs, seed, env_workers, run_name)
        elif backend == "cpu":
            envs = make_vector_env(env_id, num_envs, seed, async_envs, run_name)
        eval_seed = seed if eval_seed is None else eval_seed
        eval_env = make_env(env_id, eval_seed, 0, capture_video, run_name, video_every=video_every)()
        if "mjlab" in (backend, eval_backend):
            from envs.twin import TwinEvalEnv, TwinVectorEnv  # lazy: needs the optional mjlab extra

            wrapper = _policy_action_wrapper(eval_env)  # the twin maps actions as the CPU env's wrapper does
            twin = functools.partial(TwinVectorEnv, env_id, device=device, action_centre=wrapper.action_centre,
                                     action_half_width=wrapper.action_half_width)  # fmt: skip
            if backend == "mjlab":
                envs = twin(num_envs=num_envs)
            if eval_backend == "mjlab":
                eval_env.close()
                eval_env = TwinEvalEnv(twin(num_envs=1))
    except EnvIdError:
        raise
    except Exception as e:  # noqa: BLE001  (anything a user's constructor raises)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise EnvIdError(f"cannot make env '{env_id}': {type(e).__name__}: {first_line}") from None
    return envs, eval_env


def _policy_action_wrapper(env: gym.Env) -> PolicyActionWrapper:
    while not isinstance(env, PolicyActionWrapper):
        if hasattr(env, "action_half_width"):  # envs.twin.TwinEvalEnv
            return env
        if not hasattr(env, "env"):
            raise ValueError("env was not made by envs.make_env (no PolicyActionWrapper)")
        env = env.env
    return env


def action_half_width(env: gym.Env) -> np.ndarray:
    """h, the half-width of the underlying env's action Box, as seen through the PolicyActionWrapper of `env`."""
    return _policy_action_wrapper(env).action_half_width


# Env steps with a NaN or infinite observation or reward that a run tolerates (they never enter the replay buffer)
# before it stops: a few transient glitches pass, an env that keeps emitting garbage ends the run within steps.
NONFINITE_LIMIT = 10


class NonFiniteEnvData(EnvError):
    """An env kept returning NaN or infinite data; the message is one line naming the env index and the step."""


class NonFiniteGuard:
    """Where env data enters a run: marks the transitions whose obs, reward or s' is not finite, counts them, and
    raises NonFiniteEnvData once more than `limit` of them have been seen."""

    def __init__(self, env_id: str, limit: int = NONFINITE_LIMIT):
        self.env_id, self.limit, self.count = env_id, limit, 0

    def finite_rows(self, obs: np.ndarray, rewards: np.ndarray, real_next_obs: np.ndarray, global_step: int) -> np.ndarray:
        """Boolean mask of the rows that are finite everywhere; the others are counted (and never stored)."""
        if hasattr(obs, "isfinite"):  # the GPU twin's device tensors: one host read of the mask
            finite = (obs.isfinite().all(1) & rewards.isfinite() & real_next_obs.isfinite().all(1)).cpu().numpy()
        else:
            finite = np.isfinite(obs).all(1) & np.isfinite(rewards) & np.isfinite(real_next_obs).all(1)
        if not finite.all():
            self.count += int((~finite).sum())
            if self.count > self.limit:
                first = int(np.flatnonzero(~finite)[0])
                raise NonFiniteEnvData(
                    f"env {first} of '{self.env_id}' returned a non-finite observation or reward at step {global_step} "
                    f"({self.count} such transitions so far, more than the {self.limit} tolerated)"
                )
        return finite


@dataclass
class FinishedEpisode:
    env_index: int
    episodic_return: float
    episodic_length: int
    success: float | None  # `solved` on the last step (MyoSuite), else None


@dataclass
class VectorStep:
    """One same-step-autoreset vector step turned into replay transitions.

    Row i of the transition is (obs[i], action[i], reward[i], real_next_obs[i], terminated[i]): `real_next_obs`
    holds the true final observation where an episode ended (next_obs there is already the reset observation),
    and the done flag is `terminated` alone, so time-limit truncations still bootstrap.
    """

    real_next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    finished: list[FinishedEpisode] = field(default_factory=list)


def split_vector_step(next_obs: np.ndarray, terminations: np.ndarray, truncations: np.ndarray, infos: dict) -> VectorStep:
    """The single place where a vector step becomes replay transitions and episode statistics.

    Same-step autoreset: rows that finished carry the new episode's first observation in `next_obs`; their true
    last observation and last-step info sit in ``infos["final_obs"]`` / ``infos["final_info"]``.
    """
    on_device = hasattr(next_obs, "clone")  # the GPU twin (envs.twin): tensors stay where they are
    real_next_obs = next_obs.clone() if on_device else next_obs.copy()
    finished = []
    if "final_obs" in infos:
        final_info = infos["final_info"]
        rows = np.flatnonzero(infos["_final_obs"])
        if on_device:
            real_next_obs[rows] = infos["final_obs"][rows]
        else:  # gymnasium's final_obs is an object array, None where the episode goes on
            for i in rows:
                real_next_obs[i] = infos["final_obs"][i]
        for i in np.flatnonzero(final_info.get("_episode", [])):
            success = None
            if "_solved" in final_info and final_info["_solved"][i]:
                success = float(final_info["solved"][i])
            finished.append(
                FinishedEpisode(int(i), float(final_info["episode"]["r"][i]), int(final_info["episode"]["l"][i]), success)
            )
    if on_device:
        return VectorStep(real_next_obs, terminations, truncations, finished)
    return VectorStep(real_next_obs, np.asarray(terminations, dtype=bool), np.asarray(truncations, dtype=bool), finished)


def muscle_activations(env: gym.Env) -> np.ndarray | None:
    """The actuators' activation states now: ChainReach's own, MuJoCo's `data.act` for MyoSuite (muscle activations in
    [0, 1], one per muscle); None for envs without activation dynamics (e.g. dm_control torques)."""
    base = env.unwrapped
    if hasattr(base, "muscle_activations"):
        return base.muscle_activations()
    act = getattr(getattr(base, "data", None), "act", None)
    return np.array(act) if act is not None and np.size(act) else None


@dataclass
class EvalResult:
    returns: np.ndarray
    lengths: np.ndarray
    successes: np.ndarray  # empty when the env reports no `solved`
    efforts: np.ndarray  # per episode, the mean over its steps of the summed activations; empty without activations

    def scalars(self) -> dict[str, float]:
        """The `eval/` TensorBoard keys (README, "What a run writes")."""
        out = {
            "eval/episodic_return": float(self.returns.mean()),
            "eval/episodic_return_std": float(self.returns.std()),
            "eval/episodic_length": float(self.lengths.mean()),
        }
        if self.successes.size:
            out["eval/success_rate"] = float(self.successes.mean())
        if self.efforts.size:
            out["eval/effort"] = float(self.efforts.mean())
        return out


def evaluate(eval_env: gym.Env, act, num_episodes: int, seed: int) -> EvalResult:
    """Run `num_episodes` episodes of `act(obs_batch) -> action_batch` on `eval_env` (one gym.Env).

    Episode k resets with ``seed + k``, so every round and every algorithm starts from the same states.
    `act` receives a [1, obs_dim] float32 array and returns a [1, d] array in policy space.
    """
    returns, lengths, successes, efforts = [], [], [], []
    for episode in range(num_episodes):
        obs, _ = eval_env.reset(seed=seed + episode)
        episodic_return, length, done, info, effort = 0.0, 0, False, {}, 0.0
        while not done:
            action = np.asarray(act(obs[None]))[0]
            obs, reward, terminated, truncated, info = eval_env.step(action)
            episodic_return += float(reward)
            length += 1
            done = terminated or truncated
            activations = muscle_activations(eval_env)
            effort = None if activations is None or effort is None else effort + float(activations.sum())
        returns.append(episodic_return)
        lengths.append(length)
        if "solved" in info:
            successes.append(float(info["solved"]))
        if effort is not None:
            efforts.append(effort / length)
    return EvalResult(np.array(returns), np.array(lengths), np.array(successes), np.array(efforts))
