"""envs.state: a vector env restored from a saved state continues bit for bit like the original."""

import io

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs import make_env, make_vector_env
from envs.pool import EnvPool
from envs.state import EnvStateError, restore_vector_env_state, vector_env_state

SEED = 5


def same(a, b) -> bool:
    """Exact equality of step outputs: arrays (dtype, values), nested info dicts (key order too), scalars."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) and a.dtype == object:
        return isinstance(b, np.ndarray) and a.shape == b.shape and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def without_wall_time(info: dict) -> dict:
    """`episode["t"]` is wall-clock time, never reproducible; everything else must match."""
    return {k: without_wall_time(v) if isinstance(v, dict) else v for k, v in info.items() if k != "t"}


def run(envs, actions) -> list[tuple]:
    steps = []
    for action in actions:
        obs, rewards, terminations, truncations, infos = envs.step(action)
        steps.append((obs, rewards, terminations, truncations, without_wall_time(infos)))
    return steps


def assert_same_steps(expected: list[tuple], got: list[tuple]) -> None:
    assert len(expected) == len(got)
    for t, (a, b) in enumerate(zip(expected, got, strict=True)):
        for name, x, y in zip(("obs", "rewards", "terminations", "truncations", "infos"), a, b, strict=True):
            assert same(x, y), f"step {t} after the restore: {name} differs"


def episode_ends(steps: list[tuple]) -> int:
    return sum(int((s[2] | s[3]).sum()) for s in steps)


def through_torch(state: dict) -> dict:
    """What a checkpoint does with the state; weights_only=True proves it is plain data."""
    buffer = io.BytesIO()
    torch.save({"env_state": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["env_state"]


def actions_for(envs, num_steps: int, seed: int = 0) -> np.ndarray:
    shape = (num_steps, envs.num_envs, *envs.single_action_space.shape)
    return np.random.default_rng(seed).uniform(-1.2, 1.2, shape).astype(np.float32)  # some outside [-1, 1]


def test_chain_reach_sync_resume_is_bit_identical_across_episode_ends():
    original = make_vector_env("ChainReach4-v0", 2, SEED)
    original.reset(seed=SEED)
    actions = actions_for(original, 60 + 180)
    run(original, actions[:30])
    original.reset(options={"reset_mask": np.array([False, True])})  # env 1 ends its episodes 30 steps after env 0
    run(original, actions[30:60])
    state = through_torch(vector_env_state(original))
    expected = run(original, actions[60:])
    assert episode_ends(expected) == 4  # each env crosses two episode ends after the save (100-step episodes)

    resumed = make_vector_env("ChainReach4-v0", 2, SEED)
    restore_vector_env_state(resumed, state)
    assert_same_steps(expected, run(resumed, actions[60:]))
    for a, b in zip(original.envs, resumed.envs, strict=True):  # the space RNGs were restored too
        assert np.array_equal(a.action_space.sample(), b.action_space.sample())
        assert np.array_equal(a.observation_space.sample(), b.observation_space.sample())
        assert a.get_wrapper_attr("episode_count") == b.get_wrapper_attr("episode_count")

    reseeded = make_vector_env("ChainReach4-v0", 2, SEED)  # what resuming did before: reset with seed + global_step
    reseeded.reset(seed=SEED + 60 * 2)
    assert not same(expected[0][0], run(reseeded, actions[60:61])[0][0])


@pytest.mark.parametrize("env_id, before, after", [("Hopper-v5", 15, 60), ("myoElbowPose1D6MRandom-v0", 30, 80)])
def test_mujoco_sync_resume_is_bit_identical_across_episode_ends(env_id, before, after):
    import mujoco

    original = make_vector_env(env_id, 2, SEED)
    original.reset(seed=SEED)
    actions = actions_for(original, before + after)
    run(original, actions[:before])
    model = original.envs[0].unwrapped.model  # as MyoSuite's tasks do on reset: the model is part of the state
    model.dof_damping[:] += 0.5
    model.geom_friction[:, 0] *= 0.8
    state = through_torch(vector_env_state(original))
    expected = run(original, actions[before:])
    assert episode_ends(expected) >= 2  # Hopper topples (terminations), the elbow's 100-step episodes time out

    resumed = make_vector_env(env_id, 2, SEED)
    restore_vector_env_state(resumed, state)
    assert np.array_equal(resumed.envs[0].unwrapped.model.dof_damping, model.dof_damping)
    assert_same_steps(expected, run(resumed, actions[before:]))
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    for a, b in zip(original.envs, resumed.envs, strict=True):
        ua, ub = a.unwrapped, b.unwrapped
        sa, sb = (np.empty(mujoco.mj_stateSize(u.model, spec)) for u in (ua, ub))
        mujoco.mj_getState(ua.model, ua.data, sa, spec)
        mujoco.mj_getState(ub.model, ub.data, sb, spec)
        assert sa.tobytes() == sb.tobytes()
        assert a.get_wrapper_attr("_elapsed_steps") == b.get_wrapper_attr("_elapsed_steps")
        assert np.array_equal(a.action_space.sample(), b.action_space.sample())


def test_env_pool_and_async_states_restore_across_kinds():
    sync = make_vector_env("ChainReach4-v0", 3, SEED)
    sync.reset(seed=SEED)
    actions = actions_for(sync, 40 + 80, seed=1)
    run(sync, actions[:40])
    state = vector_env_state(sync)
    expected = run(sync, actions[40:])
    assert episode_ends(expected) == 3

    pool = EnvPool("ChainReach4-v0", 3, SEED, num_workers=2)
    try:
        restore_vector_env_state(pool, state)  # Sync -> EnvPool (its infos match SyncVectorEnv's bit for bit)
        assert_same_steps(expected, run(pool, actions[40:]))
        pool.reset(seed=SEED)
        run(pool, actions[:40])
        pool_state = vector_env_state(pool)  # EnvPool -> Sync
        assert [c.__name__ for c in pool.call("__getattribute__", "__class__")] == ["RecordEpisodeStatistics"] * 3
        assert_same_steps(expected, run(pool, actions[40:]))
    finally:
        pool.close()
    again = make_vector_env("ChainReach4-v0", 3, SEED)
    restore_vector_env_state(again, pool_state)
    assert_same_steps(expected, run(again, actions[40:]))

    thunks = [make_env("ChainReach4-v0", SEED + i, i, False, "") for i in range(3)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    first, second = (gym.vector.AsyncVectorEnv(thunks, autoreset_mode=mode) for _ in range(2))
    try:
        first.reset(seed=SEED)
        run(first, actions[:40])
        async_state = vector_env_state(first)
        async_expected = run(first, actions[40:])  # AsyncVectorEnv orders its info keys its own way
        restore_vector_env_state(second, async_state)
        assert_same_steps(async_expected, run(second, actions[40:]))
    finally:
        first.close()
        second.close()


def test_unsupported_vector_envs_and_mismatches_give_one_line_errors():
    sync = make_vector_env("ChainReach4-v0", 2, SEED)
    sync.reset(seed=SEED)
    wrapped = gym.wrappers.vector.RecordEpisodeStatistics(sync)
    with pytest.raises(EnvStateError, match=r"RecordEpisodeStatistics \(a VectorWrapper\) is not supported") as error:
        vector_env_state(wrapped)
    assert "\n" not in str(error.value)

    thunks = [make_env("ChainReach4-v0", SEED + i, i, False, "") for i in range(2)]
    next_step = gym.vector.AsyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        with pytest.raises(EnvStateError, match="next-step autoreset mode is not supported"):
            vector_env_state(next_step)
    finally:
        next_step.close()

    state = vector_env_state(sync)
    with pytest.raises(EnvStateError, match="saved for 2 envs, this vector env has 3"):
        restore_vector_env_state(make_vector_env("ChainReach4-v0", 3, SEED), state)
    other = make_vector_env("ChainReach16-v0", 2, SEED)
    with pytest.raises(EnvStateError, match="the saved env is .*ChainReach4-v0"):
        restore_vector_env_state(other, state)
    assert not other.envs[0].get_wrapper_attr("_has_reset")  # a mismatch changes nothing
