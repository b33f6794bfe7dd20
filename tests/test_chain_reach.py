"""ChainReach env: registration, gymnasium conventions, dynamics invariants and solvability."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs.chain_reach import ChainReachEnv, jacobian_transpose_action, register_chain_reach

IDS_AND_ACTION_DIMS = [("ChainReach4-v0", 8), ("ChainReach16-v0", 32), ("ChainReach64-v0", 128), ("ChainReach256-v0", 512)]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_chain_reach()
    register_chain_reach()  # idempotent: a second call must not raise or re-register


def _rollout_return(env: ChainReachEnv, policy, seed: int) -> float:
    obs, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(100):
        obs, reward, *_ = env.step(policy(obs))
        total += reward
    return total


def test_registry_has_exactly_the_four_ids():
    ids = sorted(k for k in gym.registry if k.startswith("ChainReach"))
    assert ids == sorted(env_id for env_id, _ in IDS_AND_ACTION_DIMS)


@pytest.mark.parametrize("env_id,action_dim", IDS_AND_ACTION_DIMS)
def test_spaces_and_dtypes(env_id, action_dim):
    env = gym.make(env_id)
    spec = gym.spec(env_id)
    assert spec.max_episode_steps == 100
    assert spec.entry_point == "envs.chain_reach:ChainReachEnv"
    assert isinstance(env.action_space, gym.spaces.Box)
    assert env.action_space.shape == (action_dim,)
    assert env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
    J = action_dim // 2
    assert env.observation_space.shape == (6 * J + 6,)
    assert env.observation_space.dtype == np.float32
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert isinstance(info, dict)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32
    assert isinstance(reward, float)
    env.close()


@pytest.mark.parametrize("env_id", ["ChainReach4-v0", "ChainReach256-v0"])
def test_truncates_at_exactly_100_and_never_terminates(env_id):
    env = gym.make(env_id)
    env.reset(seed=1)
    for t in range(1, 101):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated
        assert truncated == (t == 100)
    env.close()


def test_same_seed_same_obs_and_trajectory():
    a, b = ChainReachEnv(16), ChainReachEnv(16)
    obs_a, _ = a.reset(seed=123)
    obs_b, _ = b.reset(seed=123)
    np.testing.assert_array_equal(obs_a, obs_b)
    obs_c, _ = a.reset(seed=124)
    assert not np.array_equal(obs_a, obs_c)
    a.reset(seed=123)
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 32)).astype(np.float32)
    for act in actions:
        oa, ra, *_ = a.step(act)
        ob, rb, *_ = b.step(act)
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb


def test_reset_without_seed_draws_new_targets():
    env = ChainReachEnv(4)
    env.reset(seed=0)
    targets = {tuple(env.reset()[0][24:26].tolist()) for _ in range(5)}
    assert len(targets) == 5


def test_out_of_range_actions_are_clipped():
    a, b = ChainReachEnv(4), ChainReachEnv(4)
    a.reset(seed=7)
    b.reset(seed=7)
    big = np.array([5.0, -7.0, 1e6, -1e6, 3.0, 1.5, -2.0, -9.0])
    for _ in range(10):
        oa, ra, *_ = a.step(big)
        ob, rb, *_ = b.step(np.clip(big, -1, 1))
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb


def test_activations_in_unit_interval_and_state_bounded():
    J = 16
    env = ChainReachEnv(J)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for t in range(600):
        # alternate noise and sustained bang-bang drive so the joints also sit on their limits
        action = rng.uniform(-3, 3, 2 * J) if t % 200 < 100 else np.sign(np.sin(t / 30.0 + np.arange(2 * J)))
        obs, reward, *_ = env.step(action)
        act = obs[4 * J : 6 * J]
        assert np.all(act >= 0.0) and np.all(act <= 1.0)
        assert np.all(np.abs(obs[:J]) <= 1.0)
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward) and -2.0 <= reward <= 0.0
        tip, target = obs[6 * J + 2 : 6 * J + 4], obs[6 * J : 6 * J + 2]
        assert np.linalg.norm(tip) <= 1.0 + 1e-5
        assert 0.1 - 1e-5 <= np.linalg.norm(target) <= 0.8 + 1e-5
        assert np.linalg.norm(obs[6 * J + 4 :]) <= 1.8 + 1e-5


def test_constant_drive_moves_tip_within_10_steps():
    env = ChainReachEnv(4)
    obs, _ = env.reset(seed=0)
    tip0 = obs[26:28].copy()
    action = -np.ones(8, dtype=np.float32)
    action[0] = 1.0  # base flexor on, everything else off: the chain swings about the base
    for _ in range(10):
        obs, *_ = env.step(action)
    assert np.linalg.norm(obs[26:28] - tip0) > 0.2


def test_target_option_and_validation():
    env = ChainReachEnv(4)
    obs, _ = env.reset(seed=0, options={"target": (0.3, -0.4)})
    np.testing.assert_allclose(obs[24:26], [0.3, -0.4], rtol=1e-6)
    with pytest.raises(ValueError):
        env.reset(options={"target": (2.0, 0.0)})


@pytest.mark.parametrize("num_links", [4, 16, 64])
def test_scripted_controller_beats_random(num_links):
    env = ChainReachEnv(num_links)
    rng = np.random.default_rng(0)
    seeds = range(5)
    random_ret = np.mean([_rollout_return(env, lambda _: rng.uniform(-1, 1, 2 * num_links), s) for s in seeds])
    scripted_ret = np.mean([_rollout_return(env, lambda o: jacobian_transpose_action(o, num_links), s) for s in seeds])
    assert scripted_ret > random_ret + 40.0, (scripted_ret, random_ret)
    assert scripted_ret > -35.0


@pytest.mark.parametrize("num_links", [4, 64])
def test_env_checker_passes(num_links):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checker only warns that an unwrapped env has no spec for render modes
        check_env(ChainReachEnv(num_links, render_mode="rgb_array"), skip_render_check=False)


@pytest.mark.parametrize("num_links", [4, 256])
def test_rgb_array_render(num_links):
    env = ChainReachEnv(num_links, render_mode="rgb_array")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    img = env.render()
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 0 and img.shape[1] > 0
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2  # something was drawn on the background
    assert ChainReachEnv(num_links).render() is None


def test_render_through_make():
    env = gym.make("ChainReach16-v0", render_mode="rgb_array")
    env.reset(seed=0)
    assert env.render().dtype == np.uint8
    env.close()
