"""The shared env layer: action rescaling, observation dtype, info stripping, the vector-step transition helper,
id errors, user envs given as `module:Env-v0`, evaluation seeding and video capture."""

import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs import EnvIdError, check_env_id, evaluate, make_env, make_vector_env, split_vector_step


def inner_action_wrapper(env: gym.Env) -> envs.PolicyActionWrapper:
    while not isinstance(env, envs.PolicyActionWrapper):
        env = env.env
    return env


@pytest.mark.parametrize(
    "env_id, low, high",
    [
        ("myoLegWalk-v0", 0.0, 1.0),  # MyoSuite leg: [0, 1] Box, written directly to muscle excitation
        ("myoElbowPose1D6MRandom-v0", -1.0, 1.0),
        ("myoHandReachRandom-v0", -1.0, 1.0),  # MyoSuite sigmoid family
        ("Humanoid-v5", -0.4, 0.4),  # Gymnasium MuJoCo v5 torques
        ("dm_control/cartpole-swingup-v0", -1.0, 1.0),  # dm_control through shimmy (dict obs flattened)
        ("ChainReach4-v0", -1.0, 1.0),
    ],
)
def test_policy_space_and_rescaling(env_id, low, high):
    env = make_env(env_id, seed=0, idx=0, capture_video=False, run_name="test")()
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert set(info) <= {"solved"}
    wrapper = inner_action_wrapper(env)
    d = env.action_space.shape[0]
    np.testing.assert_allclose(wrapper.action(-np.ones(d)), np.full(d, low), atol=1e-6)
    np.testing.assert_allclose(wrapper.action(np.ones(d)), np.full(d, high), atol=1e-6)
    np.testing.assert_allclose(wrapper.action(np.zeros(d)), np.full(d, (low + high) / 2), atol=1e-6)
    np.testing.assert_allclose(wrapper.action(np.full(d, 7.0)), np.full(d, high), atol=1e-6)  # clipped, never beyond
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and np.isfinite(reward)
    assert set(info) <= {"solved", "episode"}  # MyoSuite's obs_dict/rwd_dict are gone
    env.close()


class CountingEnv(gym.Env):
    """obs = [episode id, t]; env `flavour` 0 terminates at t = 3, flavour 1 is cut by TimeLimit at t = 5."""

    def __init__(self, flavour: int = 0):
        self.flavour, self.episode, self.t = flavour, -1, 0
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self):
        return np.array([self.episode, self.t], dtype=np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.flavour == 0 and self.t == 3, False, {"solved": self.t >= 2, "noise": "dropped"}


gym.register("TestCounting-v0", entry_point=CountingEnv, max_episode_steps=5)


def test_split_vector_step_transition_by_transition():
    # env 0 terminates at t = 3, env 1 is truncated by its time limit at t = 5
    thunks = [
        lambda f=flavour: gym.wrappers.RecordEpisodeStatistics(envs.KeepInfoKeys(gym.wrappers.TimeLimit(CountingEnv(f), 5)))
        for flavour in (0, 1)
    ]
    vector_env = gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = vector_env.reset(seed=0)
    transitions, episodes = [], []
    for _ in range(12):
        next_obs, rewards, terminations, truncations, infos = vector_env.step(np.zeros((2, 1), np.float32))
        step = split_vector_step(next_obs, terminations, truncations, infos)
        for i in range(2):
            transitions.append((i, obs[i].copy(), step.real_next_obs[i].copy(), step.terminated[i], step.truncated[i]))
        episodes += step.finished
        obs = next_obs
    assert len(transitions) == 24  # one real transition per env per step, none for the resets
    for i, s, s_next, terminated, truncated in transitions:
        # s' is the true successor inside the same episode (never the next episode's first observation)
        assert s_next[0] == s[0] and s_next[1] == s[1] + 1
        assert terminated == (i == 0 and s_next[1] == 3)  # the bootstrap mask is the termination alone
        assert truncated == (i == 1 and s_next[1] == 5)  # truncations are kept apart, so they still bootstrap
    by_env = {i: [e for e in episodes if e.env_index == i] for i in (0, 1)}
    assert [(e.episodic_length, e.episodic_return) for e in by_env[0]] == [(3, 3.0)] * 4
    assert [(e.episodic_length, e.episodic_return) for e in by_env[1]] == [(5, 5.0)] * 2
    assert all(e.success == 1.0 for e in episodes)
    vector_env.close()


def test_make_vector_env_same_step_and_seeding():
    vector_env = make_vector_env("ChainReach4-v0", 3, seed=5)
    assert vector_env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs_a, _ = vector_env.reset(seed=5)
    obs_b, _ = vector_env.reset(seed=5)
    np.testing.assert_array_equal(obs_a, obs_b)
    assert not np.allclose(obs_a[0], obs_a[1])  # env i is seeded seed + i
    vector_env.close()


def test_unknown_id_names_close_matches():
    with pytest.raises(EnvIdError, match=r"unknown env id 'myoLegWalks-v0'; did you mean myoLegWalk-v0"):
        check_env_id("myoLegWalks-v0")
    with pytest.raises(EnvIdError, match="unknown env id 'NoSuchThing-v9'$"):
        check_env_id("NoSuchThing-v9")


@pytest.mark.parametrize("env_id", ["myoFullBodyDirectional-v0", "myoChallengeChaseTagFBVs-v0"])
def test_network_only_ids_are_rejected(env_id):
    with pytest.raises(EnvIdError, match="needs a network download"):
        check_env_id(env_id)


def test_user_env_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_envs.py").write_text(
        textwrap.dedent(
            """
            import gymnasium as gym
            import numpy as np

            class Line(gym.Env):
                observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
                action_space = gym.spaces.Box(0.0, 4.0, (2,), np.float64)

                def reset(self, seed=None, options=None):
                    super().reset(seed=seed)
                    return np.zeros(1), {}

                def step(self, action):
                    return np.array([action.sum()]), float(action[0]), False, False, {}

            gym.register("LineUser-v0", entry_point=Line, max_episode_steps=4)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("my_user_envs:LineUser-v0", seed=0, idx=0, capture_video=False, run_name="test")()
    env.reset(seed=0)
    obs, reward, *_ = env.step(np.array([-1.0, 1.0], np.float32))
    assert obs.dtype == np.float32 and obs[0] == pytest.approx(4.0) and reward == pytest.approx(0.0)
    with pytest.raises(EnvIdError, match="cannot import module 'not_a_module_xyz'"):
        check_env_id("not_a_module_xyz:Foo-v0")
    sys.modules.pop("my_user_envs", None)


def test_evaluate_is_seeded_and_reports_success():
    env = make_env("myoElbowPose1D6MRandom-v0", seed=0, idx=0, capture_video=False, run_name="test")()

    def act(obs):
        return np.zeros((1, env.action_space.shape[0]), np.float32)

    first, second = evaluate(env, act, 2, seed=123), evaluate(env, act, 2, seed=123)
    np.testing.assert_array_equal(first.returns, second.returns)
    assert first.lengths.tolist() == [100, 100]
    scalars = first.scalars()
    assert set(scalars) == {"eval/episodic_return", "eval/episodic_return_std", "eval/episodic_length", "eval/success_rate",
                            "eval/effort"}  # fmt: skip
    assert 0.0 < scalars["eval/effort"] < env.unwrapped.model.na  # summed muscle activations, each in [0, 1]
    env.close()


@pytest.mark.parametrize("command, expected", [(-1.0, 0.0), (1.0, 8 * (1 - (1 - 0.5**100) / 100))])
def test_effort_is_the_mean_summed_activation_per_step(command, expected):
    """ChainReach4 (8 actuators), activation a_k = a_(k-1) + 0.5 (u - a_(k-1)) from 0: a constant command u = 0
    (action -1) costs nothing; u = 1 gives a_k = 1 - 0.5^k, so the 100-step mean of the sum is 8 (1 - sum_k 0.5^k / 100)."""
    env = make_env("ChainReach4-v0", seed=0, idx=0, capture_video=False, run_name="test")()
    result = evaluate(env, lambda obs: np.full((1, 8), command, np.float32), 2, seed=0)
    np.testing.assert_allclose(result.efforts, [expected, expected], rtol=1e-6)
    assert result.scalars()["eval/effort"] == pytest.approx(expected, rel=1e-6)


def test_no_effort_without_activation_dynamics():
    env = make_env("Humanoid-v5", seed=0, idx=0, capture_video=False, run_name="test")()
    result = evaluate(gym.wrappers.TimeLimit(env, 5), lambda obs: np.zeros((1, 17), np.float32), 1, seed=0)
    assert result.efforts.size == 0 and "eval/effort" not in result.scalars()


@pytest.mark.parametrize("env_id", ["ChainReach4-v0", "Humanoid-v5", "myoLegWalk-v0"])
def test_video_written(tmp_path, monkeypatch, env_id):
    monkeypatch.chdir(tmp_path)
    env = make_env(env_id, seed=0, idx=0, capture_video=True, run_name="vid")()
    env.max_frames = 6  # software rendering is slow; a few frames prove the path
    env.reset(seed=0)
    for _ in range(8):
        env.step(env.action_space.sample())
    env.close()
    videos = list((tmp_path / "videos" / "vid").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    import imageio.v3 as iio

    frames = iio.imread(videos[0])
    assert frames.ndim == 4 and frames.shape[0] == 6 and frames.shape[-1] == 3
    assert frames.std() > 1.0  # a drawn scene, not a blank frame
