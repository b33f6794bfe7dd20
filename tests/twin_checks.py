"""Checks of the GPU-twin backend (envs/twin.py) on CPU Warp; they need MyoSuite's mjlab extra, so they run in the
.venv-mjlab environment (requirements-mjlab.txt), in one process: importing the twins' registry costs ~40 s.
tests/test_twin.py runs this file there (`.venv-mjlab/bin/python -m pytest tests/twin_checks.py`).

What MyoSuite's cross-backend contract promises for myoLegWalk-v0 and what is checked here: the same spaces; the
same first observation from the deterministic initial pose; the same reward and observation for the same actions
over the first steps (measured: within 1e-3 over 5 random-action steps, see TOLERANCE). The twin's reward shaping
is its own further on, so no longer horizon is compared.
"""

import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import envs
from envs.twin import TwinEvalEnv, TwinVectorEnv, twin_available

pytestmark = pytest.mark.skipif(not twin_available(), reason="needs requirements-mjlab.txt")

ENV_ID = "myoLegWalk-v0"
NUM_WORLDS = 3
STEPS = 5
TOLERANCE = 1e-3  # float32 Warp vs float64 MuJoCo over STEPS steps
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_envs():
    return envs.make_vector_env(ENV_ID, NUM_WORLDS, seed=0)


@pytest.fixture(scope="module")
def twin(cpu_envs):
    eval_env = envs.make_env(ENV_ID, 0, 0, False, "")()
    wrapper = envs._policy_action_wrapper(eval_env)
    return TwinVectorEnv(ENV_ID, NUM_WORLDS, "cpu", wrapper.action_centre, wrapper.action_half_width)


def test_spaces_match_the_cpu_env(twin, cpu_envs):
    assert twin.single_observation_space.shape == cpu_envs.single_observation_space.shape == (403,)
    assert twin.single_action_space == cpu_envs.single_action_space  # Box(-1, 1, (80,)) float32
    assert twin.metadata["autoreset_mode"] == cpu_envs.metadata["autoreset_mode"]


def test_first_observations_and_rewards_match_the_cpu_env(twin, cpu_envs):
    twin_obs, _ = twin.reset(seed=0)
    cpu_obs, _ = cpu_envs.reset(seed=0)
    assert twin_obs.dtype == torch.float32 and twin_obs.device.type == "cpu"
    np.testing.assert_allclose(twin_obs.numpy(), cpu_obs, atol=1e-5)
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (STEPS, NUM_WORLDS, 80)).astype(np.float32)
    for t in range(STEPS):  # the twin takes the policy's tensor; the CPU envs the same values as NumPy
        twin_obs, twin_rewards, twin_term, twin_trunc, _ = twin.step(torch.as_tensor(actions[t]))
        cpu_obs, cpu_rewards, cpu_term, cpu_trunc, _ = cpu_envs.step(actions[t])
        np.testing.assert_allclose(twin_rewards.numpy(), cpu_rewards, atol=TOLERANCE, err_msg=f"reward, step {t}")
        np.testing.assert_allclose(twin_obs.numpy(), cpu_obs, atol=TOLERANCE, err_msg=f"observation, step {t}")
        assert twin_term.tolist() == cpu_term.tolist() and twin_trunc.tolist() == cpu_trunc.tolist()


def test_actions_are_clipped_and_mapped_like_the_cpu_wrapper(twin):
    """Policy actions beyond [-1, 1] act as the bound: the wrapper's c + h clip(a) in [0, 1] for the walk's muscles."""
    twin.reset(seed=0)
    state = twin.state_dict()
    outside = torch.full((NUM_WORLDS, 80), 3.0)
    obs_outside = twin.step(outside)[0]
    twin.load_state_dict(state)
    obs_bound = twin.step(torch.ones(NUM_WORLDS, 80))[0]
    torch.testing.assert_close(obs_outside, obs_bound)


def test_same_step_autoreset_keeps_the_true_final_observation(twin):
    """A world that times out: truncated (not terminated), its last observation in final_obs and the next episode's
    first in next_obs, its return and length in final_info; the other worlds go on."""
    first_obs, _ = twin.reset(seed=0)
    rewards_sum = torch.zeros(NUM_WORLDS, dtype=torch.float64)
    actions = torch.zeros(NUM_WORLDS, 80)
    for _ in range(2):
        rewards_sum += twin.step(actions)[1].double()
    twin.twin.episode_length_buf[1] = twin.twin.max_episode_length - 1  # world 1 reaches its time limit next step
    next_obs, rewards, terminations, truncations, infos = twin.step(actions)
    rewards_sum += rewards.double()
    assert truncations.tolist() == [False, True, False] and not terminations.any()
    assert infos["_final_obs"].tolist() == [False, True, False]
    assert not torch.equal(infos["final_obs"][1], next_obs[1])
    torch.testing.assert_close(next_obs[1], first_obs[1])  # the deterministic initial pose again
    assert infos["final_info"]["episode"]["l"][1] == 3
    assert infos["final_info"]["episode"]["r"][1] == pytest.approx(float(rewards_sum[1]), rel=1e-6)
    assert "solved" in infos["final_info"]  # the twin's success metric, MyoSuite's `solved`
    step = envs.split_vector_step(next_obs, terminations, truncations, infos)
    torch.testing.assert_close(step.real_next_obs[1], infos["final_obs"][1])
    torch.testing.assert_close(step.real_next_obs[[0, 2]], next_obs[[0, 2]])
    assert step.terminated.tolist() == [False, False, False]  # a time-out bootstraps
    assert [(e.env_index, e.episodic_length) for e in step.finished] == [(1, 3)]
    assert twin.step(actions)[0].shape == (NUM_WORLDS, 403)  # and stepping goes on


def test_state_dict_restores_the_worlds(twin):
    twin.reset(seed=0)
    actions = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, (4, NUM_WORLDS, 80)), dtype=torch.float32)
    twin.step(actions[0])
    state = twin.state_dict()
    after = [twin.step(a)[0] for a in actions[1:]]
    twin.load_state_dict(state)
    again = [twin.step(a)[0] for a in actions[1:]]
    for a, b in zip(after, again, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_evaluation_on_the_twin_matches_the_cpu_env():
    """A whole episode of a fixed policy (the walker falls after 41 steps): the same return, length and effort.
    Measured: return 54.724 vs 54.725, effort equal to 1e-6 relative."""
    cpu_env = envs.make_env(ENV_ID, 10_000, 0, False, "")()
    wrapper = envs._policy_action_wrapper(cpu_env)
    twin_env = TwinEvalEnv(TwinVectorEnv(ENV_ID, 1, "cpu", wrapper.action_centre, wrapper.action_half_width))
    zero_policy = lambda obs: np.zeros((1, 80), np.float32)  # noqa: E731  (activation 0.5 for every muscle)
    cpu, twin = (envs.evaluate(env, zero_policy, 1, 10_000) for env in (cpu_env, twin_env))
    assert cpu.lengths.tolist() == twin.lengths.tolist() == [41]
    np.testing.assert_allclose(twin.returns, cpu.returns, atol=0.01)
    np.testing.assert_allclose(twin.efforts, cpu.efforts, rtol=1e-3)


def test_eval_env_runs_an_episode_step(twin):
    eval_env = TwinEvalEnv(twin)
    obs, _ = eval_env.reset(seed=0)
    assert obs.shape == (403,) and obs.dtype == np.float32
    obs, reward, terminated, truncated, info = eval_env.step(np.zeros(80, np.float32))
    assert np.isfinite(reward) and not terminated and not truncated
    assert eval_env.muscle_activations().shape == (80,)


def run_in_process(algo: str, cwd: Path, *flags: str) -> dict:
    """Run algos/<algo>.py as __main__ in this process (the twin registry is already imported); its final_eval.json."""
    argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [f"{algo}.py", *flags]
    os.chdir(cwd)
    try:
        runpy.run_path(str(REPO / "algos" / f"{algo}.py"), run_name="__main__")
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
    (run_dir,) = (cwd / "runs").iterdir()
    return json.loads((run_dir / "final_eval.json").read_text())


TINY = ["--env-id", ENV_ID, "--env-backend", "mjlab", "--num-envs", "4", "--total-timesteps", "160", "--learning-starts",
        "96", "--batch-size", "32", "--buffer-size", "1000", "--hidden-dim", "16", "--eval-freq", "0",
        "--final-eval-episodes", "1", "--save-model", "--save-buffer", "--no-cuda"]  # fmt: skip


@pytest.mark.parametrize("algo, extra", [("sac", []), ("qflex", ["--eval-backend", "mjlab", "--euler-steps", "2"])])
def test_algorithm_runs_end_to_end_on_the_twin(algo, extra, tmp_path):
    final = run_in_process(algo, tmp_path, *TINY, *extra)
    assert final["global_step"] == 160 and final["num_updates"] > 0
    assert np.isfinite(final["eval/episodic_return"]) and final["eval/effort"] > 0
    (checkpoint,) = (tmp_path / "models").glob("*/checkpoint.pt")
    state = torch.load(checkpoint, weights_only=False)
    assert state["env_state"]["kind"] == "TwinVectorEnv" and state["args"]["env_backend"] == "mjlab"
    assert torch.is_tensor(state["obs"]) and state["obs"].shape == (4, 403)
    if algo == "sac":  # resume (with the buffer): the worlds' state and the tensor observation come back on the device
        resumed = run_in_process(algo, tmp_path, "--resume", str(checkpoint), "--total-timesteps", "200")
        assert resumed["global_step"] == 200 and resumed["num_updates"] == final["num_updates"] + 10
