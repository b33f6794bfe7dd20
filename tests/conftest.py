"""Shared helpers for the script-level tests: run `algos/<algo>.py` in a scratch directory and read its logs."""

import ast
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# No network, no W&B, headless rendering; one BLAS thread so parallel test processes do not oversubscribe 2 cores.
TEST_ENV = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}

# The suite's longest tests, longest first (pytest --durations on 2 cores, 2026-12-02). They are handed out first, so
# the two xdist workers do not end with one of them running alone: the suite's wall time is then about half its sum.
LONGEST_FIRST = (
    "tests/test_sac.py::test_learns_chain_reach4",
    "tests/test_twin.py::test_twin_checks_pass_in_the_mjlab_environment",
    "tests/test_qflex.py::test_learns_chain_reach4",
    "tests/test_crossq.py::test_learns_chain_reach4",
    "tests/test_sdac.py::test_learns_chain_reach4",
    "tests/test_resume.py::test_resume_with_buffer_is_exact",
    "tests/test_benchmark.py::test_sweep_end_to_end",
    "tests/test_analysis.py::test_every_command_end_to_end",
    "tests/test_dacer.py::test_learns_chain_reach4",
)


def pytest_collection_modifyitems(config, items):
    """Start the longest tests first (every parametrisation of them); the others keep their order."""
    rank = {test: i for i, test in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("[")[0], len(rank)))


for _name in ("WANDB_MODE", "HF_HUB_OFFLINE", "MUJOCO_GL"):  # the in-process tests get the same guarantees
    os.environ.setdefault(_name, TEST_ENV[_name])


def load_script(relative_path: str, name: str | None = None):
    """Import a script such as "algos/qflex.py" as a module (its `__main__` block does not run) to test its functions."""
    path = REPO / relative_path
    mutant = os.environ.get("QFLEX_BENCH_MUTANT", "")  # tests/mutate.py: "algos/x.py=/tmp/mutant.py"
    if mutant.startswith(f"{relative_path}="):
        path = Path(mutant.split("=", 1)[1])
    spec = importlib.util.spec_from_file_location(name or f"{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_script(
    relative_path: str, *flags: str, cwd: Path, check: bool = True, timeout: float = 900, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python <repo>/<relative_path> FLAGS` in `cwd`; return the finished process (stdout+stderr in .stdout)."""
    if os.environ.get("QFLEX_BENCH_MUTATION"):
        pytest.skip("tests/mutate.py runs the in-process tests only")
    env = {**os.environ, **TEST_ENV, **(extra_env or {})}
    proc = subprocess.run([sys.executable, str(REPO / relative_path), *flags], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
    if check and proc.returncode != 0:
        pytest.fail(f"{relative_path} {' '.join(flags)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def run_algo(algo: str, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python algos/<algo>.py FLAGS` (keyword arguments as for run_script)."""
    return run_script(f"algos/{algo}.py", *flags, **kwargs)


def final_eval(cwd: Path) -> dict:
    """The final_eval.json of the only run under `cwd`."""
    (run_dir,) = run_dirs(cwd)
    return json.loads((run_dir / "final_eval.json").read_text())


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs").iterdir()) if (cwd / "runs").exists() else []


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run as {tag: [(step, value), ...]} in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """A clean failure: non-zero exit, the message present, no Python traceback."""
    assert proc.returncode != 0, proc.stdout
    assert fragment in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout


def resume_to(algo: str, run_dir: Path, checkpoint_path: Path, total_timesteps: int, cwd: Path) -> dict:
    """Resume `run_dir`'s run from its checkpoint up to `total_timesteps`; check it logged on into the same directory
    past the old end without rewinding, and return the new checkpoint."""
    import torch

    step_before = torch.load(checkpoint_path, weights_only=False)["global_step"]
    resume = ["--resume", str(checkpoint_path), "--total-timesteps", str(total_timesteps), "--save-model"]
    run_algo(algo, *resume, "--log-every", "10", "--eval-freq", "0", cwd=cwd)
    assert run_dirs(cwd) == [run_dir]
    steps = [s for s, _ in read_scalars(run_dir)["charts/updates"]]
    assert steps == sorted(steps) and steps[-1] > step_before and any(s <= step_before for s in steps)
    return torch.load(checkpoint_path, weights_only=False)


def assert_haiku_truncated_normal_init(init_) -> None:
    """`init_(layer)` is Haiku's default Linear init: N(0, 1/fan_in) truncated at +-2 std (whose std is 0.8796 of the
    untruncated one), bias exactly 0; checked on a 400 -> 300 layer."""
    import torch

    torch.manual_seed(0)
    layer = init_(torch.nn.Linear(400, 300))
    std, w = 1 / 20, layer.weight.detach()
    assert torch.equal(layer.bias.detach(), torch.zeros(300))
    assert w.min() >= -2 * std and w.max() <= 2 * std and w.min() < -1.95 * std and w.max() > 1.95 * std
    assert w.std().item() == pytest.approx(0.8796 * std, rel=0.02) and abs(w.mean().item()) < 0.01 * std


# ------------------------------------------------------------------------------------- a script's training loop, in process
# tests/mutate.py never mutates __main__, so the loop's wiring (phases, the order of the steps, which network each step
# reads) is checked by running the __main__ block in this process with the step functions wrapped to record each call.


class LoopCall(NamedTuple):
    """One recorded call: its arguments, its result, and the probe of the run's state just before and just after it."""

    name: str
    args: tuple
    result: object
    before: dict
    after: dict


def run_main_in_process(script, flags: list[str], tmp_path: Path, monkeypatch, names: tuple[str, ...], probe):
    """Execute the `if __name__ == "__main__":` body of `script` (a module from load_script, so under
    QFLEX_BENCH_MUTANT it is the mutant's __main__ that runs) with `flags`, its functions `names` wrapped to record
    each call; `probe(namespace)` is read before and after every recorded call. Returns the namespace (networks,
    optimisers, counters, ...) and the calls in order."""
    path = Path(script.__file__)
    tree = ast.parse(path.read_text())
    (main,) = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    code = compile(ast.Module(body=main.body, type_ignores=[]), str(path), "exec")
    namespace, calls = dict(vars(script)), []

    def recorded(name):
        function = getattr(script, name)

        def wrapper(*args):
            before = probe(namespace)
            result = function(*args)
            calls.append(LoopCall(name, args, result, before, probe(namespace)))
            return result

        return wrapper

    namespace.update({name: recorded(name) for name in names})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [path.name, *flags])
    rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # the script seeds the global ones
    try:
        exec(code, namespace)
    finally:
        random.setstate(rng_states[0]), np.random.set_state(rng_states[1]), torch.set_rng_state(rng_states[2])
    return namespace, calls


def adam_steps(optimizer) -> int:
    """Steps an Adam optimiser has taken (its per-parameter step count; 0 before the first)."""
    state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
    return int(state["step"]) if "step" in state else 0
