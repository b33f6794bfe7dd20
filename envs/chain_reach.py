"""ChainReach: a fast, over-actuated planar reaching task with muscle-like antagonistic actuators.

A planar chain of ``J`` links (total length ``L = 1``, each link ``1/J``) hangs from a fixed base at the origin. Every
joint is driven by an antagonistic pair of muscle-like actuators (a flexor and an extensor), so ``|A| = 2J`` for ``J``
degrees of freedom: the action space is redundant (co-contraction is a null space that only costs effort), which is the
over-actuated regime the Qflex case analysis is about, at a cost of ~20 us per step instead of MuJoCo's milliseconds.

Registered ids (see ``register_chain_reach``): ``ChainReach4-v0``, ``ChainReach16-v0``, ``ChainReach64-v0``,
``ChainReach256-v0`` with ``J = 4, 16, 64, 256`` and ``|A| = 8, 32, 128, 512``; 100-step episodes (TimeLimit), never
terminated.

Dynamics (control step ``dt = 0.04 s``, 25 Hz, no substeps)
-------------------------------------------------------------
* Action ``a`` in ``[-1, 1]^{2J}``: ``a[:J]`` are the flexors of joints ``0..J-1``, ``a[J:]`` the extensors. Actions are
  clipped to the box, then mapped to excitations ``u = (a + 1) / 2`` in ``[0, 1]``.
* First-order activation: ``act += (dt / tau) * (u - act)`` with ``tau = 0.08 s`` (``dt / tau = 0.5``: ~94% of a step
  change after 4 steps). ``act`` is a convex combination of values in ``[0, 1]``, so it stays in ``[0, 1]``.
* Each joint ``j`` has a normalised coordinate ``x_j`` in ``[-1, 1]`` and angle ``q_j = lim_j * x_j``. The base joint has
  ``lim_0 = pi`` (any reach direction); the ``J - 1`` bending joints share a total bend budget of ``2 pi``:
  ``lim_j = 2 pi / (J - 1)``. Scaling the bending limits by ``1/(J-1)`` keeps the chain's curvature (and with it the
  reachable set and the tip speed) roughly independent of ``J``, so larger ``J`` is harder only through dimension.
* Every joint is an independent unit-inertia rotor in normalised units (no inertial coupling between links; this keeps
  the step O(J)). Semi-implicit Euler::

      xdd = F * (act_flex - act_ext) - B * xd - K * x        F = 16, B = 8 /s, K = 1 /s^2
      xd += dt * xdd;  x += dt * xd;  x = clip(x, -1, 1), and xd = 0 where x hit a limit

  The terminal speed ``F / B = 2 /s`` (0.08 per step) takes a joint across its half range in ~15 steps; the base rotates
  up to ~2 pi rad/s and moves a straight chain's tip ~0.25 per step. The velocity time constant is ``1/B = 0.125 s``.
* Link orientations ``theta_i = sum_{j <= i} q_j``; tip ``p = (1/J) * sum_i (cos theta_i, sin theta_i)``.

Reset: ``x_j ~ U(-0.1, 0.1)``, ``xd = 0``, ``act = 0``; target uniform (in area) in the annulus ``0.1 <= r <= 0.8`` at a
uniform angle. Every such target is reachable. ``reset(options={"target": (x, y)})`` fixes the target instead.

Reward (per step): ``r = -||p - target|| - 0.01 * mean(act^2)``, in ``[-1.81, 0]``. Over a 100-step episode, uniform
random actions score about -100 (they barely move the tip); the scripted controller below about -17, most of it spent
while the tip travels to the target (numbers per J: ``python benchmark/chain_reach_speed.py``).

Observation (float32, ``6J + 6`` entries: 30, 102, 390, 1542 for J = 4, 16, 64, 256)
------------------------------------------------------------------------------------
====================  ==========  ==============================================
slice                 size        content
====================  ==========  ==============================================
``[0, J)``            J           joint positions ``x`` (normalised, in [-1, 1])
``[J, 2J)``           J           joint velocities ``xd / (F / B)`` (about [-1, 1])
``[2J, 3J)``          J           ``cos(theta_i)``, absolute link orientations
``[3J, 4J)``          J           ``sin(theta_i)``
``[4J, 6J)``          2J          activations (flexors then extensors), in [0, 1]
``[6J, 6J + 2)``      2           target ``(x, y)``
``[6J + 2, 6J + 4)``  2           tip ``(x, y)``
``[6J + 4, 6J + 6)``  2           tip minus target
====================  ==========  ==============================================

Normalised joint positions are used instead of cos/sin of joint angles because the bending angles shrink like ``1/J``:
at ``J = 256`` their cosines would all read 1.0 in float32.

``render_mode="rgb_array"`` draws the chain, tip and target into a 128x128 uint8 image with numpy only (no MuJoCo, no
OpenGL), so video capture works anywhere.

``jacobian_transpose_action`` is a scripted reference controller (damped least squares on the tip Jacobian, mapped onto
the muscle pairs) that shows the task is solvable; it reads only the observation.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

LINK_COUNTS = (4, 16, 64, 256)
MAX_EPISODE_STEPS = 100

DT = 0.04
TAU = 0.08
FORCE = 16.0
DAMPING = 8.0
STIFFNESS = 1.0
V_MAX = FORCE / DAMPING
BASE_LIMIT = math.pi
BEND_BUDGET = 2.0 * math.pi
EFFORT_WEIGHT = 0.01
TARGET_R_MIN = 0.1
TARGET_R_MAX = 0.8
INIT_NOISE = 0.1
RENDER_SIZE = 128


def joint_limits(num_links: int) -> np.ndarray:
    """Angle (rad) that ``x_j = +-1`` maps to, per joint."""
    lim = np.empty(num_links)
    lim[0] = BASE_LIMIT
    if num_links > 1:
        lim[1:] = BEND_BUDGET / (num_links - 1)
    return lim


class ChainReachEnv(gym.Env):
    """Planar J-link chain, 2J antagonistic muscle actuators, reach a random target. See the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}  # one frame per control step: real time at DT = 0.04

    def __init__(self, num_links: int = 4, render_mode: str | None = None, effort_weight: float = EFFORT_WEIGHT):
        if num_links < 1:
            raise ValueError(f"num_links must be >= 1, got {num_links}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.num_links = J = int(num_links)
        self.render_mode = render_mode
        self.effort_weight = float(effort_weight)
        self.link_length = 1.0 / J
        self.limits = joint_limits(J)

        self.action_space = spaces.Box(-1.0, 1.0, (2 * J,), np.float32)
        # Every entry is bounded by construction; the velocity bound is the fixed point of the velocity update under
        # full drive plus full stiffness pull, (F + K) / F in observation units.
        high = np.ones(6 * J + 6, dtype=np.float32)
        high[J : 2 * J] = (FORCE + STIFFNESS) / FORCE
        high[6 * J + 4 :] = 2.0
        low = -high
        low[4 * J : 6 * J] = 0.0
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

        # The whole state lives inside one float64 buffer laid out like the observation, so building the observation
        # is a single cast-copy and every update below writes in place through views (per-call allocations dominate
        # the cost at these sizes, not arithmetic).
        self._buf = np.zeros(6 * J + 6)
        b = self._buf
        self._x = b[0:J]
        self._v = b[J : 2 * J]  # velocity stored already scaled by 1/V_MAX, i.e. in observation units
        self._cs = b[2 * J : 4 * J].reshape(2, J)
        self._cos = b[2 * J : 3 * J]
        self._sin = b[3 * J : 4 * J]
        self._act = b[4 * J : 6 * J]
        self._act_f = b[4 * J : 5 * J]
        self._act_e = b[5 * J : 6 * J]
        self._target = b[6 * J : 6 * J + 2]
        self._tip = b[6 * J + 2 : 6 * J + 4]
        self._diff = b[6 * J + 4 : 6 * J + 6]

        self._u = np.empty(2 * J)
        self._tmp = np.empty(J)
        self._theta = np.empty(J)
        self._free = np.empty(J, dtype=bool)

        alpha = DT / TAU
        self._c_keep = 1.0 - alpha
        self._c_exc = 0.5 * alpha
        # Constants of the velocity update folded for v = xd / V_MAX.
        self._c_damp = 1.0 - DT * DAMPING
        self._c_force = DT * FORCE / V_MAX
        self._c_stiff = DT * STIFFNESS / V_MAX
        self._c_pos = DT * V_MAX
        self._c_effort = self.effort_weight / (2 * J)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self._x[:] = rng.uniform(-INIT_NOISE, INIT_NOISE, self.num_links)
        self._v[:] = 0.0
        self._act[:] = 0.0
        if options is not None and options.get("target") is not None:
            target = np.asarray(options["target"], dtype=np.float64).reshape(2)
            if not np.hypot(*target) <= 1.0:
                raise ValueError(f"target {target.tolist()} is out of reach (|target| must be <= 1)")
            self._target[:] = target
        else:
            # sqrt of a uniform radius-squared makes the target uniform in area over the annulus
            r = math.sqrt(rng.uniform(TARGET_R_MIN**2, TARGET_R_MAX**2))
            phi = rng.uniform(-math.pi, math.pi)
            self._target[0] = r * math.cos(phi)
            self._target[1] = r * math.sin(phi)
        self._kinematics()
        return self._buf.astype(np.float32), {}

    def step(self, action):
        u = self._u
        np.maximum(action, -1.0, out=u)
        np.minimum(u, 1.0, out=u)
        act = self._act
        act *= self._c_keep
        u *= self._c_exc
        act += u
        act += self._c_exc  # the +1 of u = (a + 1) / 2, times alpha / 2

        x, v, tmp = self._x, self._v, self._tmp
        np.subtract(self._act_f, self._act_e, out=tmp)
        v *= self._c_damp
        tmp *= self._c_force
        v += tmp
        np.multiply(x, self._c_stiff, out=tmp)
        v -= tmp
        np.multiply(v, self._c_pos, out=tmp)
        x += tmp
        np.minimum(x, 1.0, out=x)
        np.maximum(x, -1.0, out=x)
        # Inelastic joint stops: velocity left pointing into a stop would hold the joint there after the drive reverses.
        np.abs(x, out=tmp)
        np.less(tmp, 1.0, out=self._free)
        v *= self._free

        dist = self._kinematics()
        reward = -dist - self._c_effort * float(np.dot(act, act))
        return self._buf.astype(np.float32), reward, False, False, {}

    def muscle_activations(self) -> np.ndarray:
        """The 2J actuator activations in [0, 1] (flexors of joints 0..J-1, then their extensors); a copy."""
        return self._act.copy()

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._draw()

    # ------------------------------------------------------------------ internals
    def _kinematics(self) -> float:
        """Recompute link orientations, tip and tip-target offset from x; return the tip-target distance."""
        np.multiply(self._x, self.limits, out=self._tmp)
        np.add.accumulate(self._tmp, out=self._theta)
        np.cos(self._theta, out=self._cos)
        np.sin(self._theta, out=self._sin)
        np.add.reduce(self._cs, axis=1, out=self._tip)
        self._tip *= self.link_length
        np.subtract(self._tip, self._target, out=self._diff)
        dx, dy = self._diff.tolist()
        return math.sqrt(dx * dx + dy * dy)

    def joint_positions(self) -> np.ndarray:
        """(J + 1, 2) positions of the base, every joint and the tip."""
        pts = np.zeros((self.num_links + 1, 2))
        pts[1:, 0] = np.cumsum(self._cos) * self.link_length
        pts[1:, 1] = np.cumsum(self._sin) * self.link_length
        return pts

    def _draw(self) -> np.ndarray:
        size = RENDER_SIZE
        img = np.full((size, size, 3), 255, dtype=np.uint8)
        scale = (size - 1) / 2.2  # world [-1.1, 1.1] fills the image with a small margin

        def to_px(p):
            # image rows grow downwards, world y grows upwards
            return np.stack([(1.1 - p[..., 1]) * scale, (p[..., 0] + 1.1) * scale], axis=-1)

        def disk(center, radius, color):
            rr, cc = np.ogrid[:size, :size]
            r0, c0 = to_px(np.asarray(center))
            img[(rr - r0) ** 2 + (cc - c0) ** 2 <= radius**2] = color

        # faint reach circles give a sense of scale
        rr, cc = np.ogrid[:size, :size]
        rad = np.hypot(rr - 1.1 * scale, cc - 1.1 * scale) / scale
        img[np.abs(rad - TARGET_R_MAX) < 0.006] = (225, 225, 225)
        img[np.abs(rad - 1.0) < 0.006] = (200, 200, 200)

        disk(self._target, 4, (220, 40, 40))
        pts = to_px(self.joint_positions())
        a, b = pts[:-1], pts[1:]
        n = int(np.ceil(np.max(np.abs(b - a)))) * 2 + 2
        t = np.linspace(0.0, 1.0, n)[None, :, None]
        line = (a[:, None, :] + t * (b - a)[:, None, :]).reshape(-1, 2)
        for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2-pixel wide strokes stay visible after video compression
            r = np.clip(np.rint(line[:, 0]).astype(int) + dr, 0, size - 1)
            c = np.clip(np.rint(line[:, 1]).astype(int) + dc, 0, size - 1)
            img[r, c] = (40, 60, 160)
        if self.num_links <= 32:  # joints would merge into a solid line for long chains
            r = np.clip(np.rint(pts[1:-1, 0]).astype(int), 0, size - 1)
            c = np.clip(np.rint(pts[1:-1, 1]).astype(int), 0, size - 1)
            img[r, c] = (0, 0, 0)
        disk((0.0, 0.0), 3, (0, 0, 0))
        disk(self._tip, 2.5, (30, 160, 60))
        return img


def jacobian_transpose_action(obs: np.ndarray, num_links: int, gain: float = 8.0, damping: float = 0.02) -> np.ndarray:
    """Scripted reaching controller that reads only the observation; returns an action in [-1, 1]^{2J}.

    Weighted damped least squares on the tip Jacobian w.r.t. the normalised joint coordinates gives a joint velocity
    that moves the tip towards the target, plus a null-space pull towards mid-range. A velocity feedforward (with
    stiffness compensation) and a velocity feedback turn it into a net muscle drive ``d``, which goes to the flexor when
    positive and to the extensor when negative (no co-contraction, so minimal effort).
    """
    J = num_links
    obs = np.asarray(obs, dtype=np.float64)
    x, v = obs[:J], obs[J : 2 * J]
    c, s = obs[2 * J : 3 * J], obs[3 * J : 4 * J]
    err = -obs[6 * J + 4 : 6 * J + 6]  # target - tip
    lim = joint_limits(J)
    # d tip / d x_j = lim_j * l * sum_{i >= j} (-sin theta_i, cos theta_i)
    jac = np.stack([-np.cumsum(s[::-1])[::-1], np.cumsum(c[::-1])[::-1]]) * (lim / J)  # (2, J)
    tip_vel = gain * err
    speed = np.linalg.norm(tip_vel)
    if speed > 2.0:  # cap the requested tip speed so far targets do not saturate every muscle at once
        tip_vel *= 2.0 / speed
    # The base column dominates the Jacobian for long chains; down-weighting it makes the solution bend the chain
    # instead of swinging the base into its limit. The 4/J scalings were tuned on J = 4..256.
    w = np.ones(J)
    w[0] = min(1.0, 4.0 / J)
    jw = jac * w
    jjt = jw @ jac.T + damping**2 * np.eye(2)
    xd_des = jw.T @ np.linalg.solve(jjt, tip_vel)
    # Null-space centring keeps short chains out of folded, limit-bound local minima.
    z = -(4.0 / J) * x
    xd_des += z - jw.T @ np.linalg.solve(jjt, jac @ z)
    peak = np.max(np.abs(xd_des))
    if peak > 0.8 * V_MAX:
        xd_des *= 0.8 * V_MAX / peak
    drive = xd_des * (DAMPING / FORCE) + x * (STIFFNESS / FORCE) + (xd_des / V_MAX - v)
    drive = np.clip(drive, -1.0, 1.0)
    u = np.concatenate([np.maximum(drive, 0.0), np.maximum(-drive, 0.0)])
    return (2.0 * u - 1.0).astype(np.float32)


def register_chain_reach() -> None:
    """Register ChainReach{4,16,64,256}-v0; safe to call more than once."""
    for num_links in LINK_COUNTS:
        env_id = f"ChainReach{num_links}-v0"
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="envs.chain_reach:ChainReachEnv",
            max_episode_steps=MAX_EPISODE_STEPS,
            kwargs={"num_links": num_links},
        )
