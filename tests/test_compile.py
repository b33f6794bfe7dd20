"""--compile and --cudagraphs: compiled update steps match the eager ones, a compiled run learns like an eager one, and
--cudagraphs without CUDA is a one-line error. The step tests compile with backend "aot_eager" (no C++ code generation)."""

import math
import os

import pytest
import torch

from tests.conftest import assert_one_line_error, final_eval, load_script, run_algo, run_main_in_process

ALGOS = ("sac", "qflex", "crossq", "dacer", "sdac")
MODULES = {}
B, OBS, ACT = 8, 4, 2


def module(algo: str):
    if algo not in MODULES:
        MODULES[algo] = load_script(f"algos/{algo}.py", name=f"{algo}_compile_under_test")
        MODULES[algo].COMPILE_BACKEND = "aot_eager"
    return MODULES[algo]


def batch_of(m):
    g = torch.Generator().manual_seed(1)
    return m.Batch(torch.randn(B, OBS, generator=g), torch.rand(B, ACT, generator=g) * 2 - 1, torch.randn(B, generator=g),
                   torch.randn(B, OBS, generator=g), torch.tensor([0.0, 1.0] * (B // 2)))  # fmt: skip


def adam(*modules, lr=1e-2):
    return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)


def sac_steps(m):
    args = m.resolve_preset(m.Args(hidden_dim=16))
    kw = dict(hidden_dim=16, num_layers=2, activation=torch.nn.GELU, jax_init=True)
    actor = m.Actor(OBS, ACT, separate_heads=False, log_det="exact", action_scale=torch.ones(ACT), **kw)
    qf1, qf2, qf1_t, qf2_t = (m.SoftQNetwork(OBS, ACT, **kw) for _ in range(4))
    log_alpha = torch.tensor(0.3, requires_grad=True)
    noise = torch.randn(B, ACT, generator=torch.Generator().manual_seed(2))
    batch, q_opt, a_opt = batch_of(m), adam(qf1, qf2), adam(actor)
    return {
        "critic_step": (m.critic_step, (batch, noise, actor, qf1, qf2, qf1_t, qf2_t, q_opt, log_alpha, args)),
        "actor_step": (m.actor_step, (batch, noise, actor, qf1, qf2, a_opt, log_alpha, args)),
    }


def qflex_steps(m):
    args = m.resolve_preset(m.Args(hidden_dim=16, num_layers=2))
    actor, qf1, qf2 = m.Actor(OBS, ACT, 16, 2), m.QNetwork(OBS, ACT, 16, 2), m.QNetwork(OBS, ACT, 16, 2)
    qf1_bar, qf2_bar = m.QNetwork(OBS, ACT, 16, 2).requires_grad_(False), m.QNetwork(OBS, ACT, 16, 2).requires_grad_(False)
    velocity = m.VelocityField(OBS, ACT, 16, 2)
    noise = torch.randn(B, ACT, generator=torch.Generator().manual_seed(2))
    t = torch.rand(B, generator=torch.Generator().manual_seed(3))
    batch, q_opt, a_opt, flow_opt = batch_of(m), adam(qf1, qf2), adam(actor), adam(velocity)
    return {
        "critic_step": (m.critic_step, (batch, noise, actor, qf1, qf2, qf1_bar, qf2_bar, q_opt, args)),
        "actor_step": (m.actor_step, (batch, noise, actor, qf1_bar, qf2_bar, a_opt)),
        "flow_step": (m.flow_step, (batch, noise, t, actor, velocity, qf1_bar, qf2_bar, flow_opt, args)),
    }


def crossq_steps(m):
    args = m.resolve_preset(m.Args(hidden_dim=16, critic_hidden_dim=16, num_layers=2))
    brn = dict(momentum=args.brn_momentum, eps=args.brn_eps, r_max=args.brn_r_max, d_max=args.brn_d_max,
               warmup=args.brn_warmup, debias=args.brn_debias)  # fmt: skip
    actor = m.Actor(OBS, ACT, 16, 2, brn, args.separate_heads)
    qf1, qf2 = m.SoftQNetwork(OBS, ACT, 16, 2, brn), m.SoftQNetwork(OBS, ACT, 16, 2, brn)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    noise = torch.randn(B, ACT, generator=torch.Generator().manual_seed(2))
    batch, q_opt, a_opt = batch_of(m), adam(qf1, qf2), adam(actor)
    return {
        "critic_step": (m.critic_step, (batch, noise, actor, qf1, qf2, q_opt, log_alpha, args, True)),
        "actor_step": (m.actor_step, (batch, noise, actor, qf1, qf2, a_opt, log_alpha, args)),
    }


def dacer_steps(m):
    args = m.resolve_preset(m.Args(hidden_dim=16, num_layers=2))
    kw = dict(hidden_dim=16, num_layers=2, activation=torch.nn.Mish)
    actor = m.Actor(OBS, ACT, betas=m.linear_beta_schedule(3, 0.3), x_T_scale=0.5, time_dim=4, **kw)
    qf1, qf2, qf1_t, qf2_t = (m.DistributionalQNetwork(OBS, ACT, **kw) for _ in range(4))
    g = torch.Generator().manual_seed(2)
    next_actions, zeta, chain_noise = (
        torch.rand(B, ACT, generator=g) * 2 - 1,
        torch.randn(B, generator=g),
        actor.draw_noise(B, g),
    )
    batch, q_opt, a_opt, std_ema = batch_of(m), adam(qf1, qf2), adam(actor), torch.full((2,), -1.0)
    return {
        "critic_step": (m.critic_step, (batch, next_actions, zeta, qf1, qf2, qf1_t, qf2_t, q_opt, std_ema, args)),
        "actor_step": (m.actor_step, (batch, chain_noise, actor, qf1, qf2, a_opt, torch.tensor(0.1), 1e-2)),
    }


def sdac_steps(m):
    args = m.Args(num_timesteps=5, num_reverse_samples=4, hidden_dim=16, num_layers=2)
    qf1, qf2, qf1_t, qf2_t = (m.QNetwork(OBS, ACT, 16, 2) for _ in range(4))
    next_actions = torch.rand(B, ACT, generator=torch.Generator().manual_seed(2)) * 2 - 1
    log_alpha = torch.tensor(-1.0, requires_grad=True)
    batch, q_opt, a_opt = batch_of(m), adam(qf1, qf2), torch.optim.Adam([log_alpha], lr=1e-2)
    actor = m.Actor(OBS, ACT, 16, 2, betas=m.linear_beta_schedule(5, 0.3), x_T_scale=0.5, time_dim=4)
    g = torch.Generator().manual_seed(3)
    a0, t = torch.rand(B, ACT, generator=g) * 2 - 1, torch.randint(0, 5, (B,), generator=g)
    eps1, eps2 = torch.randn(B, ACT, generator=g), torch.randn(B, 4, ACT, generator=g)
    return {
        "critic_step": (m.critic_step, (batch, next_actions, qf1, qf2, qf1_t, qf2_t, q_opt, args)),
        "actor_step": (m.actor_step, (batch, a0, t, eps1, eps2, actor, qf1, qf2, adam(actor), 0.1, 1e-2, args)),
        "alpha_step": (m.alpha_step, (log_alpha, a_opt, -2.0, ACT, 0.1)),
    }


BUILDERS = dict(sac=sac_steps, qflex=qflex_steps, crossq=crossq_steps, dacer=dacer_steps, sdac=sdac_steps)
CASES = [(algo, step) for algo in ALGOS for step in BUILDERS[algo](module(algo))]


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in tensors(out[key])]
    if isinstance(out, tuple | list):
        return [t for x in out for t in tensors(x)]
    return [out] if isinstance(out, torch.Tensor) else []


@pytest.mark.parametrize("algo,step", CASES)
def test_compiled_step_matches_eager(algo, step):
    """From identical networks (built under the same seed), three compiled steps give the eager steps' losses."""
    m = module(algo)
    # Every case compiles new optimisers, i.e. recompiles Optimizer.step's shared wrapper; past Dynamo's recompile
    # limit (8) the step would fall back to eager with the capturable flag Dynamo set, which fails on CPU. A fresh
    # Dynamo per case keeps the cases independent of their number and order.
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        fn, inputs = BUILDERS[algo](m)[step]
        fn = m.maybe_compile(fn, m.Args(compile=compiled))
        results.append([tensors(fn(*inputs)) for _ in range(3)])
    for eager, compiled in zip(*results, strict=True):
        assert len(eager) == len(compiled) > 0
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


LR_INDEX = {"dacer": 7, "sdac": 10}  # where actor_step takes the scheduled lr


@pytest.mark.parametrize("algo", sorted(LR_INDEX))
def test_scheduled_lr_actor_step_compiles_once_and_matches_eager(algo):
    """The linear lr schedule hands actor_step a new Python float every step: compiled, it does not recompile per step
    (after the first change Dynamo traces the float as a graph input) nor drift from eager, and the optimiser runs at
    the lr it was given."""
    from torch._dynamo.utils import counters

    m = module(algo)
    results, graphs = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        fn, inputs = BUILDERS[algo](m)["actor_step"]
        fn, inputs = m.maybe_compile(fn, m.Args(compile=compiled)), list(inputs)
        outs = []
        for i in range(6):
            inputs[LR_INDEX[algo]] = 1e-2 * (1 - 0.1 * i)
            outs.append(tensors(fn(*inputs)))
            if i in (2, 5):
                graphs.append(counters["stats"]["unique_graphs"])
        optimizer = next(x for x in inputs if isinstance(x, torch.optim.Optimizer))
        assert optimizer.param_groups[0]["lr"] == inputs[LR_INDEX[algo]]
        results.append(outs)
    # eager: no graph; compiled: once the lr has changed (the first change recompiles once, marking it dynamic), no new one
    assert graphs[0] == graphs[1] == 0 and graphs[3] == graphs[2] > 0, graphs
    for eager, compiled in zip(*results, strict=True):
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_qflex_flow_maths_trace_without_graph_breaks():
    """The flow target's N ascent steps (autograd.grad in a loop) and the Euler sampler each trace into one graph, so
    --compile and --cudagraphs cover Qflex's most expensive part, not only the critic and actor steps."""
    m = module("qflex")
    torch.manual_seed(0)
    qf1, qf2 = m.QNetwork(OBS, ACT, 16, 2).requires_grad_(False), m.QNetwork(OBS, ACT, 16, 2).requires_grad_(False)
    velocity, obs, a0 = m.VelocityField(OBS, ACT, 16, 2), torch.randn(B, OBS), torch.rand(B, ACT) * 2 - 1
    q_fn = lambda o, a: m.q_min_bar(qf1, qf2, o, a)  # noqa: E731
    for fn, inputs in ((m.q_guided_flow, (q_fn, obs, a0, 5, 0.01, False, True)), (m.euler_sample, (velocity, obs, a0, 5))):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*inputs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


SHORT = ["--env-id", "ChainReach4-v0", "--num-envs", "2", "--learning-starts", "64", "--total-timesteps", "80", "--batch-size",
         "16", "--hidden-dim", "16", "--eval-freq", "0", "--final-eval-episodes", "0", "--compile"]  # fmt: skip
WIRING = {  # algo: (its own flags, the update steps that --compile must cover)
    "qflex": (["--flow-steps", "2", "--euler-steps", "2"], ("critic_step", "actor_step", "flow_step")),
    "dacer": (["--num-timesteps", "3", "--alpha-every", "1000"], ("critic_step", "actor_step")),
    "sdac": (["--num-timesteps", "3", "--num-particles", "2", "--alpha-every", "1000"], ("critic_step", "actor_step")),
}


@pytest.mark.parametrize("algo", sorted(WIRING))
def test_compile_covers_every_update_step(algo, tmp_path, monkeypatch):
    """With --compile the loop calls the update steps through what maybe_compile returned, never the plain functions
    (a stand-in for maybe_compile marks the calls that go through it). DACER and SDAC: actor_step at the default
    linear lr schedule too."""
    m = load_script(f"algos/{algo}.py", name=f"{algo}_compile_wiring_under_test")
    through_compile = []

    def marking_compile(fn, args):
        def compiled(*inputs):
            through_compile.append(fn)
            try:
                return fn(*inputs)
            finally:
                through_compile.pop()

        return compiled if args.compile else fn

    m.maybe_compile = marking_compile
    own_flags, names = WIRING[algo]
    _, calls = run_main_in_process(m, SHORT + own_flags, tmp_path, monkeypatch, names, probe=lambda ns: bool(through_compile))
    for name in names:
        mine = [call for call in calls if call.name == name]
        assert mine and all(call.before for call in mine), name
        if algo == "qflex":
            assert len(mine) == 9, name  # updates at steps 64, 66, ..., 80


def test_maybe_compile_is_the_identity_without_the_flags():
    m = module("sac")
    assert m.maybe_compile(m.critic_step, m.Args()) is m.critic_step


def test_cudagraphs_without_cuda_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        flags = ["--no-cuda"]
    else:
        flags = []
    proc = run_algo("sac", "--env-id", "ChainReach4-v0", "--cudagraphs", *flags, cwd=tmp_path, check=False)
    assert_one_line_error(proc, "--cudagraphs needs a CUDA device")
    assert not (tmp_path / "runs").exists()


E2E = ["--env-id", "ChainReach4-v0", "--num-envs", "2", "--total-timesteps", "600", "--learning-starts", "200",
       "--batch-size", "32", "--hidden-dim", "32", "--eval-freq", "0", "--final-eval-episodes", "3", "--log-every",
       "50", "--no-cuda", "--seed", "3"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="inductor C++ compilation; set RUN_SLOW=1")
def test_sac_compile_end_to_end_matches_eager(tmp_path):
    """A short --compile run (default CPU backend, inductor) finishes and lands close to the eager run's return."""
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    run_algo("sac", *E2E, cwd=tmp_path / "eager")
    run_algo("sac", *E2E, "--compile", cwd=tmp_path / "compiled")
    eager, compiled = final_eval(tmp_path / "eager"), final_eval(tmp_path / "compiled")
    assert math.isfinite(compiled["eval/episodic_return"])
    assert (
        abs(compiled["eval/episodic_return"] - eager["eval/episodic_return"]) <= 0.25 * abs(eager["eval/episodic_return"]) + 5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_sac_cudagraphs_end_to_end(tmp_path):
    flags = [f for f in E2E if f != "--no-cuda"]
    run_algo("sac", *flags, "--compile", "--cudagraphs", cwd=tmp_path)
    assert math.isfinite(final_eval(tmp_path)["eval/episodic_return"])
