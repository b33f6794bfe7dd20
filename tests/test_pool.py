"""EnvPool (envs/pool.py): bit-for-bit the SyncVectorEnv of make_vector_env, step_async/step_wait, failures that
never hang, and no worker left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest

from envs import EnvIdError, make_vector_env, split_vector_step
from envs.pool import EnvPool, EnvPoolError
from tests.conftest import REPO, TEST_ENV


class FlipEnv(gym.Env):
    """Terminates at random (seeded by reset) and is truncated by its 6-step TimeLimit; float64 observations; its
    `solved` is a np.bool_, a Python bool or absent and its reward a np.float32 or a Python float, by episode kind;
    kind-0 episodes also report `solved` at reset, so the top-level `solved` after an autoreset comes from there."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.kind = 0, int(self.np_random.integers(3))
        return self._obs(np.zeros(2)), ({"solved": np.bool_(True)} if self.kind == 0 else {})

    def _obs(self, action):
        return np.array([self.kind, self.t, float(np.sum(action)) + self.np_random.normal()], dtype=np.float64)

    def step(self, action):
        self.t += 1
        reward = np.float32(np.sum(action)) if self.kind == 1 else float(action[0])
        terminated = bool(self.np_random.random() < 0.15)
        info = [{"solved": np.bool_(self.t > 2)}, {"solved": self.t > 2, "noise": "dropped"}, {}][self.kind]
        return self._obs(action), reward, terminated, False, info


class RaisingEnv(gym.Env):
    """The env reset first with seed 3 raises ValueError on its 7th step (in a pool reset with seed=0: env 3)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    first_seed, steps = None, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.first_seed = seed if self.first_seed is None else self.first_seed
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.first_seed == 3 and self.steps == 7:
            raise ValueError("boom\nsecond line")
        return np.zeros(1, np.float32), 0.0, False, False, {}


class DiscreteEnv(RaisingEnv):
    action_space = gym.spaces.Discrete(3)


class SlowEnv(RaisingEnv):
    """Envs reset first with seed >= 3 (worker 1's in a 5-env, 2-worker pool) take 2 s per step, so that worker is
    certainly still stepping when the test kills it; the others answer at once."""

    def step(self, action):
        if self.first_seed >= 3:
            time.sleep(2.0)
        return np.zeros(1, np.float32), 0.0, False, False, {}


gym.register("TestPoolFlip-v0", entry_point=FlipEnv, max_episode_steps=6)
gym.register("TestPoolRaise-v0", entry_point=RaisingEnv)
gym.register("TestPoolDiscrete-v0", entry_point=DiscreteEnv)
gym.register("TestPoolSlow-v0", entry_point=SlowEnv)


def assert_same(a, b, path="infos"):
    """Equal bit for bit, with equal types, dtypes and key order; `episode["t"]` is wall time: dtype and mask only."""
    if isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{k}]")
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in b:
            if path.endswith(".episode") and key == "t":
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, path
            else:
                assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a!r} != {b!r}"
        if b.dtype == object:
            for k, (x, y) in enumerate(zip(a, b, strict=True)):
                assert_same(x, y, f"{path}[{k}]")
        else:
            assert a.tobytes() == b.tobytes(), f"{path}: {a} != {b}"
    else:
        assert type(a) is type(b) and (a == b or (a is None and b is None)), f"{path}: {a!r} != {b!r}"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, seconds=5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize(
    "env_id, num_envs, num_workers, steps",
    [
        ("ChainReach4-v0", 5, 1, 230),  # 100-step episodes: two autoresets of every env
        ("ChainReach4-v0", 5, 2, 230),  # uneven split: envs 0-2 and 3-4
        ("TestPoolFlip-v0", 5, 2, 80),  # terminations and truncations, mixed info types
        ("TestPoolFlip-v0", 4, 3, 40),
        ("myoElbowPose1D6MRandom-v0", 3, 2, 110),  # MyoSuite: np.bool_ `solved` (object arrays), one episode end
        ("Hopper-v5", 3, 2, 60),  # Gymnasium MuJoCo: early terminations under random actions
    ],
)
def test_matches_sync_vector_env(env_id, num_envs, num_workers, steps):
    seed = 7
    pool = EnvPool(env_id, num_envs, seed, num_workers)
    sync = make_vector_env(env_id, num_envs, seed)
    assert pool.num_envs == sync.num_envs and pool.num_workers == num_workers
    assert pool.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert pool.single_observation_space == sync.single_observation_space
    assert pool.single_action_space == sync.single_action_space
    assert pool.observation_space == sync.observation_space and pool.action_space == sync.action_space
    assert_same(pool.action_space.sample(), sync.action_space.sample(), "action_space.sample()")  # same seeded RNG
    assert_same(pool.reset(seed=seed), sync.reset(seed=seed), "reset")
    rng, act_dim = np.random.default_rng(0), sync.single_action_space.shape[0]
    finished, ended = [], np.zeros(num_envs, int)
    for t in range(steps):
        actions = rng.uniform(-1.2, 1.2, (num_envs, act_dim))  # beyond the box now and then: clipped in each env
        actions = actions.astype(np.float32) if t % 3 else actions  # float64 rows reach the env as float64
        out, expected = pool.step(actions), sync.step(actions)
        assert_same(out, expected, f"step {t}")
        got, want = split_vector_step(*out[0:1], *out[2:]), split_vector_step(*expected[0:1], *expected[2:])
        assert_same(got.real_next_obs, want.real_next_obs)
        assert_same(got.terminated, want.terminated)
        assert_same(got.truncated, want.truncated)
        assert got.finished == want.finished, t
        finished += got.finished
        ended += expected[2] | expected[3]
        if t == steps - 10:  # a late reset with a new seed, then one without
            assert_same(pool.reset(seed=seed + 100), sync.reset(seed=seed + 100), "reset(seed + 100)")
            assert_same(pool.reset(), sync.reset(), "reset()")
    assert ended.all() and len(finished) == ended.sum()  # every env crossed at least one episode end
    pool.close()
    sync.close()


def test_reset_mask_and_attributes():
    pool, sync = EnvPool("TestPoolFlip-v0", 5, 0, 2), make_vector_env("TestPoolFlip-v0", 5, 0)
    assert_same(pool.reset(seed=1), sync.reset(seed=1))
    actions = np.zeros((5, 2), np.float32)
    for _ in range(3):
        assert_same(pool.step(actions), sync.step(actions))
    mask = np.array([False, True, False, False, True])
    assert_same(pool.reset(seed=9, options={"reset_mask": mask}), sync.reset(seed=9, options={"reset_mask": mask.copy()}))
    assert_same(pool.step(actions), sync.step(actions))
    assert pool.get_attr("spec") == sync.get_attr("spec")
    assert pool.call("get_wrapper_attr", "action_half_width")[0].tolist() == [2.0, 2.0]
    pool.set_attr("marker", list(range(5)))
    assert pool.get_attr("marker") == (0, 1, 2, 3, 4)
    pool.close()
    sync.close()


def test_step_async_wait_equals_step():
    stepped, split = EnvPool("TestPoolFlip-v0", 5, 3, 2), EnvPool("TestPoolFlip-v0", 5, 3, 2)
    assert_same(stepped.reset(seed=3), split.reset(seed=3))
    rng = np.random.default_rng(1)
    for _ in range(30):
        actions = rng.uniform(-1, 1, (5, 2)).astype(np.float32)
        expected = stepped.step(actions)
        split.step_async(actions)
        actions[:] = 99.0  # the pool copied them; the caller may reuse its buffer at once
        with pytest.raises(EnvPoolError, match="pending"):
            split.step_async(actions)
        assert_same(split.step_wait(), expected)
    stepped.close()
    split.close()


def test_start_methods_agree():
    """forkserver builds the envs in a fresh interpreter; it gives the same steps as fork and SyncVectorEnv."""
    pool, sync = EnvPool("ChainReach4-v0", 3, 0, 2, start_method="forkserver"), make_vector_env("ChainReach4-v0", 3, 0)
    assert_same(pool.reset(seed=0), sync.reset(seed=0))
    time.sleep(1.2)  # idle workers outlive their parent-pid check (a forkserver child's parent is the server)
    for _ in range(105):
        actions = np.tile(np.linspace(-1, 1, 8, dtype=np.float32), (3, 1))
        assert_same(pool.step(actions), sync.step(actions))
    pool.close()
    sync.close()


def test_env_exception_names_env_and_step():
    pool = EnvPool("TestPoolRaise-v0", 5, 0, 2)
    pids = pool.worker_pids
    pool.reset(seed=0)
    start = time.monotonic()
    with pytest.raises(EnvPoolError, match=r"^env 3 of 'TestPoolRaise-v0' raised ValueError at step 7: boom$"):
        for _ in range(10):
            pool.step(np.zeros((5, 1), np.float32))
    assert time.monotonic() - start < 5
    assert pool.closed and not wait_gone(pids)
    with pytest.raises(EnvPoolError, match="closed"):
        pool.step(np.zeros((5, 1), np.float32))


def test_build_errors_are_one_line():
    with pytest.raises(EnvIdError, match=r"env 0 of 'TestPoolDiscrete-v0' could not be built: EnvIdError: .*flat Box"):
        EnvPool("TestPoolDiscrete-v0", 2, 0, 2)
    with pytest.raises(EnvIdError, match="unknown env id"):
        EnvPool("NoSuchEnv-v0", 2, 0, 2)


@pytest.mark.parametrize("in_flight", [False, True])
def test_killed_worker_is_detected(in_flight):
    """Killed between steps, or mid-step (a 2 s step, so the kill always lands while the worker is stepping)."""
    env_id = "TestPoolSlow-v0" if in_flight else "ChainReach4-v0"
    pool = EnvPool(env_id, 5, 0, 2)
    pids = pool.worker_pids
    pool.reset(seed=0)
    actions = np.zeros((5, 1 if in_flight else 8), np.float32)
    if in_flight:
        pool.step_async(actions)
    else:
        pool.step(actions)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EnvPoolError, match=rf"worker 1 \(envs 3-4 of '{env_id}'\) died \(exit code -9, SIGKILL\)"):
        pool.step_wait() if in_flight else pool.step(actions)
    assert time.monotonic() - start < 3
    assert pool.closed and not wait_gone(pids)


def test_workers_ignore_sigint():
    pool = EnvPool("ChainReach4-v0", 2, 0, 2)
    pool.reset(seed=0)
    for pid in pool.worker_pids:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.1)
    pool.step(np.zeros((2, 8), np.float32))
    pids = pool.worker_pids
    pool.close()
    pool.close()  # idempotent
    assert not wait_gone(pids, 2.0)


@pytest.mark.parametrize("ending", ["exit", "gc", "sigkill"])
def test_no_orphans_after_parent_ends(ending):
    """A parent that exits without close(), drops its last reference, or is SIGKILLed leaves no worker behind."""
    code = textwrap.dedent(
        f"""
        import gc, os, signal, sys, time
        import numpy as np
        from envs.pool import EnvPool
        pool = EnvPool("ChainReach4-v0", 3, 0, 2)
        pool.reset(seed=0)
        pool.step(np.zeros((3, 8), np.float32))
        print(*pool.worker_pids, flush=True)
        if {ending!r} == "gc":
            pids = pool.worker_pids
            del pool
            gc.collect()
            time.sleep(0.5)
            print("left", *[p for p in pids if os.path.exists(f"/proc/{{p}}")], flush=True)
        elif {ending!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, **TEST_ENV}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (-9 if ending == "sigkill" else 0), proc.stderr
    pids = [int(p) for p in proc.stdout.splitlines()[0].split()]
    assert len(pids) == 2
    assert not wait_gone(pids, 5.0)
    if ending == "gc":
        assert proc.stdout.splitlines()[1] == "left"  # reaped by the parent itself, before it exited


def test_worker_split():
    pool = EnvPool("ChainReach4-v0", 3, 0, 8)  # more workers than envs: one env each
    assert pool.num_workers == 3 and pool.slices == [(0, 1), (1, 2), (2, 3)]
    assert isinstance(pool, gym.vector.VectorEnv)
    pool.close()
    with pytest.raises(ValueError, match="num_workers >= 1"):
        EnvPool("ChainReach4-v0", 3, 0, 0)


def test_make_envs_builds_a_pool_on_request():
    from envs import make_envs

    envs, eval_env = make_envs("ChainReach4-v0", 3, 0, env_workers=2)
    try:
        assert isinstance(envs, EnvPool) and envs.num_envs == 3
    finally:
        envs.close()
        eval_env.close()
