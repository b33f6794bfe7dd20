"""DACER's entropy estimate for the temperature step: the batched GMM fits of algos/dacer.py against the estimator the
official code uses (one scikit-learn GaussianMixture per batch state, one after another), on the same samples.

Samples: for each of B states, S actions in [-1, 1]^d drawn from a random 3-component mixture squashed by tanh (the
shape of DACER's exploratory actions; B = 256 and S = 200 are the defaults of --batch-size and --entropy-samples).
Reports the wall time of each estimator, the speed-up, and the largest difference of the estimates.

    python benchmark/dacer_entropy_speed.py                    # d = 80 (myoLegWalk), B = 256, S = 200, CPU
    python benchmark/dacer_entropy_speed.py --dim 8 --states 64 --device cuda
"""

import argparse
import importlib.util
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load_dacer():
    spec = importlib.util.spec_from_file_location("dacer_script", REPO / "algos" / "dacer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_actions(states: int, samples: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 0.8, (states, 3, dim))
    scales = rng.uniform(0.05, 0.4, (states, 3, dim))
    component = rng.integers(0, 3, (states, samples))
    rows = np.arange(states)[:, None]
    pre_tanh = centres[rows, component] + scales[rows, component] * rng.standard_normal((states, samples, dim))
    return np.tanh(pre_tanh)


def sklearn_entropies(actions: np.ndarray, n_components: int, covariance_type: str) -> np.ndarray:
    """The official estimator: per state, GaussianMixture(3, reg_covar 1e-6) and the entropy bound of its fit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    out = []
    for x in actions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm = GaussianMixture(n_components, covariance_type=covariance_type, reg_covar=1e-6, random_state=42).fit(x)
        d = x.shape[1]
        if covariance_type == "full":
            log_dets = np.array([np.linalg.slogdet(c)[1] for c in gmm.covariances_])
        else:
            log_dets = np.log(gmm.covariances_).sum(-1)
        w = gmm.weights_
        out.append(-(w * np.log(w)).sum() + (w * (0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * log_dets)).sum())
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=80, help="d, the action dimension (myoLegWalk: 80)")
    parser.add_argument("--states", type=int, default=256, help="B, the batch states of one temperature step")
    parser.add_argument("--samples", type=int, default=200, help="S, actions per state (--entropy-samples)")
    parser.add_argument("--covariance", choices=["full", "diag"], default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dacer = load_dacer()
    actions = sample_actions(args.states, args.samples, args.dim, args.seed)
    print(f"dacer_entropy_speed: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; d = {args.dim}, B = {args.states}, S = {args.samples}, "
          f"{args.covariance} covariances")  # fmt: skip

    start = time.perf_counter()
    reference = sklearn_entropies(actions, 3, args.covariance)
    sklearn_s = time.perf_counter() - start

    samples = torch.as_tensor(actions, device=args.device)
    dacer.gmm_entropy(samples[:2], 3, args.covariance)  # first call: allocator and kernel warm-up
    if samples.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    batched = dacer.gmm_entropy(samples, 3, args.covariance)
    batched = batched.cpu().numpy()  # the host read ends the timing on any device
    batched_s = time.perf_counter() - start

    finite = np.isfinite(batched) & np.isfinite(reference)
    print(f"scikit-learn, one fit per state : {sklearn_s:8.2f} s ({1000 * sklearn_s / args.states:.1f} ms per state)")
    print(f"batched fit_gmm on {args.device:<13}: {batched_s:8.2f} s ({1000 * batched_s / args.states:.1f} ms per state)")
    print(f"speed-up                         : {sklearn_s / batched_s:8.1f}x")
    print(f"largest |difference| of the entropies: {np.abs(batched - reference)[finite].max():.2e} nats "
          f"({int(finite.sum())} of {args.states} states finite in both)")  # fmt: skip


if __name__ == "__main__":
    main()
