"""--overlap: the update runs while the envs take the vector step. Where the envs step never changes a result (a worker
pool and this process give the same run, bit for bit); the one thing overlap changes is which buffer the update
samples: the buffer as it stood before this vector step, so the first update's batch and everything after it
differ, while the schedule (steps, updates, evaluations) and every transition taken before that update do not."""

import pytest
import torch

from tests.conftest import final_eval, read_scalars, run_algo, run_dirs

# 4 envs, 25 warm-up vector steps, then one update per vector step; learning_starts >= batch + num_envs, so the
# first update comes at the same step with and without overlap.
TINY = ["--env-id", "ChainReach4-v0", "--num-envs", "4", "--no-cuda", "--learning-starts", "100", "--batch-size", "32",
        "--buffer-size", "1000", "--hidden-dim", "16", "--log-every", "5", "--eval-freq", "200", "--eval-episodes", "1",
        "--final-eval-episodes", "1", "--total-timesteps", "400", "--save-model", "--save-buffer"]  # fmt: skip


def run(tmp_path, name: str, *flags: str) -> tuple[dict, dict, dict]:
    """final_eval.json (less the wall time), every scalar (less SPS) and the checkpoint of one run."""
    (tmp_path / name).mkdir()
    run_algo("sac", *TINY, *flags, cwd=tmp_path / name)
    final = {k: v for k, v in final_eval(tmp_path / name).items() if k != "wall_time"}
    scalars = {k: v for k, v in read_scalars(run_dirs(tmp_path / name)[0]).items() if k != "charts/SPS"}
    (checkpoint_path,) = (tmp_path / name / "models").glob("*/checkpoint.pt")
    return final, scalars, torch.load(checkpoint_path, weights_only=False)


@pytest.fixture(scope="module")
def overlapped_in_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("overlap"), "in_process", "--env-workers", "0", "--overlap", "True")


def test_overlap_in_a_pool_and_in_this_process_is_one_run(tmp_path, overlapped_in_process):
    pooled, in_process = run(tmp_path, "pool", "--env-workers", "2", "--overlap", "True"), overlapped_in_process
    assert pooled[0] == in_process[0]
    assert pooled[1] == in_process[1]
    assert pooled[2]["args"]["overlap"] is True


def test_overlap_changes_only_the_buffer_the_update_samples(tmp_path, overlapped_in_process):
    final_sync, scalars_sync, ckpt_sync = run(tmp_path, "sync", "--overlap", "False")
    final_overlap, scalars_overlap, ckpt_overlap = overlapped_in_process
    # The same schedule: steps, updates, evaluations and where the losses were logged.
    for key in ("global_step", "num_updates"):
        assert final_sync[key] == final_overlap[key], key
    assert [s for s, _ in scalars_sync["charts/updates"]] == [s for s, _ in scalars_overlap["charts/updates"]]
    assert [s for s, _ in scalars_sync["eval/episodic_return"]] == [s for s, _ in scalars_overlap["eval/episodic_return"]]
    # Every transition before the first update (the warm-up) is the same; the first update sampled a different
    # buffer, so the policy, and the transitions after it, differ.
    first_update_rows = 100
    rb_sync, rb_overlap = (c["replay_buffer"] for c in (ckpt_sync, ckpt_overlap))
    assert rb_sync["size"] == rb_overlap["size"] == 400
    for key in ("obs", "actions", "rewards", "next_obs", "terminations"):
        assert torch.equal(rb_sync[key][:first_update_rows], rb_overlap[key][:first_update_rows]), key
    assert not torch.equal(rb_sync["actions"][first_update_rows:400], rb_overlap["actions"][first_update_rows:400])
    assert scalars_sync["losses/qf_loss"] != scalars_overlap["losses/qf_loss"]
