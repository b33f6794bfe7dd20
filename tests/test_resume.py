"""Exact resume: checkpoint half-way, resume with the buffer, and the run is bit-identical to an uninterrupted one
(the envs' state and RNGs, the buffer, the networks, optimizers and every noise stream come back)."""

import pytest

from tests.conftest import final_eval, read_scalars, run_algo, run_dirs

TINY = ["--num-envs", "2", "--no-cuda", "--save-model", "--save-buffer", "--learning-starts", "120", "--batch-size", "32",
        "--buffer-size", "5000", "--hidden-dim", "16", "--log-every", "5", "--eval-freq", "200", "--eval-episodes", "1",
        "--final-eval-episodes", "1"]  # fmt: skip
# Per algorithm, flags that keep its run short.
FAST = {"sac": [], "qflex": ["--flow-steps", "3", "--euler-steps", "3"], "crossq": [],
        "dacer": ["--num-timesteps", "4", "--alpha-every", "40", "--entropy-samples", "20"],
        "sdac": ["--num-timesteps", "4", "--num-particles", "2", "--alpha-every", "40"]}  # fmt: skip


@pytest.mark.parametrize(
    "algo, env_id",
    [("sac", "ChainReach4-v0"), ("sac", "myoElbowPose1D6MRandom-v0"), ("qflex", "ChainReach4-v0"),
     ("crossq", "ChainReach4-v0"), ("dacer", "ChainReach4-v0"), ("sdac", "ChainReach4-v0")],
)  # fmt: skip
def test_resume_with_buffer_is_exact(tmp_path, algo, env_id):
    flags = ["--env-id", env_id, *TINY, *FAST[algo], "--total-timesteps", "400"]
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    run_algo(algo, *flags, cwd=tmp_path / "straight")
    run_algo(algo, *flags, "--total-timesteps", "200", cwd=tmp_path / "resumed")
    (checkpoint_path,) = (tmp_path / "resumed" / "models").glob("*/checkpoint.pt")
    run_algo(algo, "--resume", str(checkpoint_path), "--total-timesteps", "400", cwd=tmp_path / "resumed")
    straight, resumed = (
        {k: v for k, v in final_eval(tmp_path / n).items() if k != "wall_time"} for n in ("straight", "resumed")
    )
    assert straight == resumed
    straight, resumed = (read_scalars(run_dirs(tmp_path / name)[0]) for name in ("straight", "resumed"))
    different = [key for key in straight if key != "charts/SPS" and straight[key] != resumed.get(key)]
    assert not different, different
