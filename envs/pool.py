"""EnvPool: the training vector env stepped by W worker processes that talk through shared memory.

``EnvPool(env_id, num_envs, seed, num_workers)`` is a drop-in for the ``SyncVectorEnv`` that ``envs.make_vector_env``
builds (same-step autoreset), with the same outputs bit for bit:

  * worker ``w`` owns the contiguous envs ``[lo_w, hi_w)`` (``np.array_split`` sizes, so E need not divide by W) and
    builds env ``i`` itself as ``envs.make_env(env_id, seed + i, i, False, run_name)()``, exactly as
    ``make_vector_env`` does, so env ``i`` here is env ``i`` there;
  * observations, actions, rewards, terminated/truncated flags, final observations and every ``info`` leaf (the kept
    keys, ``solved``, and the ``episode`` statistics ``r``/``l``/``t``) live in one shared memory block (a ``memfd``
    handed to the workers over their socket, so nothing can leak in /dev/shm); per step the parent writes the actions
    and sends each worker a 4-byte command, and each worker answers one byte. No array is pickled per step;
  * the parent rebuilds ``infos`` exactly as gymnasium's ``VectorEnv._add_info`` would have merged the per-env
    dicts: same keys in the same order, same masks, same dtypes (a ``np.bool_`` ``solved`` gives gymnasium's object
    array, a Python ``bool`` a bool array), ``final_obs``/``final_info`` only on steps where some env finished. Each
    info value travels as 8 raw bytes plus a one-byte type code, so ``split_vector_step`` and the replay contents
    are unchanged. ``episode["t"]`` is the workers' own wall time (it is wall-clock time, never reproducible);
  * ``step_async(actions)`` / ``step_wait()`` let a training loop update its networks while the workers step.

Failures never hang: an env that raises gives one ``EnvPoolError`` naming the env index, the pool's step count and
the exception; a worker that dies (killed, segfault) is seen through its socket's EOF or its exit within a second
and gives an ``EnvPoolError`` naming its envs and the step; either way the pool closes itself. Workers ignore SIGINT
(the parent gets Ctrl-C and closes the pool), are daemonic, and exit by themselves within a second when their parent
is gone (socket EOF, or a changed parent pid), so no orphan outlives the parent even after a SIGKILL.

Start method: "fork" on Linux (default). The parent only imports the env packages (``check_env_id``), never builds
an env, so MuJoCo/MyoSuite models and their state are created in each child after the fork; this is ~10x faster to
start than "spawn"/"forkserver" (the children skip the MyoSuite/MuJoCo imports; ``python benchmark/env_speed.py``
prints the start-up times). Forking a parent that already runs threads (CUDA, a TensorBoard writer) is safe for
these children as they touch neither; pass ``start_method="forkserver"`` or ``"spawn"`` if a user env is not
fork-safe (then the env id must be importable in a fresh interpreter, e.g. ``module:Name-v0``). Elsewhere the
default is "spawn".
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import signal
import sys
import tempfile
import time
import weakref
from multiprocessing import get_context, reduction
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from envs import KEPT_INFO_KEYS, EnvIdError, check_env_id, host_actions, make_env

__all__ = ["EnvPool", "EnvPoolError", "default_start_method"]


class EnvPoolError(RuntimeError):
    """An env raised inside a worker, or a worker died; the message is one line naming the env(s) and the step."""


def default_start_method() -> str:
    return "fork" if sys.platform.startswith("linux") else "spawn"


# ---------------------------------------------------------------------------------------------------------------------
# Info values: 8 raw bytes + a one-byte code per (leaf, env). Code 0 = absent; else 1 + kind * len(_DTYPES) + dtype index.
_DTYPES = [np.dtype(t) for t in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")]
_DTYPE_INDEX = {dt: k for k, dt in enumerate(_DTYPES)}
# The kind of a value decides what gymnasium's `_add_info` makes of it (numeric array vs object array) and what an
# element of an object array is: NATIVE = Python bool/int/float, NPNUM = np.number scalar, NPOBJ = other numpy scalars
# (np.bool_ is not an np.number: gymnasium stores it in an object array), ARR0D = 0-d ndarray.
_NATIVE, _NPNUM, _NPOBJ, _ARR0D = range(4)
_NUMERIC_KINDS = (_NATIVE, _NPNUM, _ARR0D)
_TYPE_CODES: dict[type, int] = {}


def _code(kind: int, dtype: np.dtype) -> int:
    return 1 + kind * len(_DTYPES) + _DTYPE_INDEX[dtype]


def _decode(code: int) -> tuple[int, np.dtype]:
    kind, index = divmod(code - 1, len(_DTYPES))
    return kind, _DTYPES[index]


def _value_code(value) -> int:
    code = _TYPE_CODES.get(type(value))
    if code is not None:
        return code
    t = type(value)
    if isinstance(value, np.ndarray):
        if value.ndim == 0 and value.dtype in _DTYPE_INDEX:
            return _code(_ARR0D, value.dtype)
    elif t in (int, float, bool):
        code = _code(_NATIVE, np.dtype(t))
    elif isinstance(value, np.generic) and np.dtype(t) in _DTYPE_INDEX:
        code = _code(_NPNUM if issubclass(t, np.number) else _NPOBJ, np.dtype(t))
    if code is None:
        raise TypeError(f"info value {value!r} of type {t.__name__} cannot travel through EnvPool (only scalars)")
    _TYPE_CODES[t] = code
    return code


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


# The info leaves: top-level kept keys (step info, or the reset info after an autoreset), the same keys inside
# final_info, and final_info["episode"]["r"/"l"/"t"] from RecordEpisodeStatistics.
_EPISODE_KEYS = ("r", "l", "t")
_TOP = {k: n for n, k in enumerate(KEPT_INFO_KEYS)}
_FINAL = {k: len(_TOP) + n for n, k in enumerate(KEPT_INFO_KEYS)}
_EPISODE = {k: 2 * len(_TOP) + n for n, k in enumerate(_EPISODE_KEYS)}
_NUM_LEAVES = 2 * len(_TOP) + len(_EPISODE_KEYS)


def _layout(num_envs: int, obs_shape: tuple, obs_dtype: np.dtype, act_shape: tuple) -> tuple[dict, int]:
    """Offsets of the shared arrays in one block (64-byte aligned): name -> (offset, shape, dtype str)."""
    arrays = {
        "obs": ((num_envs, *obs_shape), obs_dtype),
        "final_obs": ((num_envs, *obs_shape), obs_dtype),
        "actions": ((num_envs * int(np.prod(act_shape, dtype=np.int64)) * 8,), np.dtype("u1")),  # raw bytes, any dtype
        "rewards": ((num_envs,), np.dtype("f8")),
        "terminations": ((num_envs,), np.dtype("?")),
        "truncations": ((num_envs,), np.dtype("?")),
        "codes": ((_NUM_LEAVES, num_envs), np.dtype("u1")),
        "values": ((_NUM_LEAVES, num_envs, 8), np.dtype("u1")),
    }
    layout, offset = {}, 0
    for name, (shape, dtype) in arrays.items():
        layout[name] = (offset, shape, dtype.str)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset += (nbytes + 63) // 64 * 64
    return layout, max(offset, 64)


def _views(buffer, layout: dict) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, np.dtype(dt), buffer=buffer, offset=off) for name, (off, shape, dt) in layout.items()}


def _value_views(values: np.ndarray) -> list[np.ndarray]:
    """values[(L, E, 8) bytes] seen as an (L, E) array of each dtype, indexed by dtype index."""
    return [values.view(dt)[..., 0] for dt in _DTYPES]


# ---------------------------------------------------------------------------------------------------------------------
# The worker.


def _worker(conn, env_id, seed, lo, hi, run_name, parent_pid, inherited):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it closes the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler forked from the parent: terminate() must stop us
    for c in inherited:  # fork: other workers' and our own parent-side sockets, so parent death gives us EOF
        c.close()
    parent_pid = os.getppid() if parent_pid is None else parent_pid  # forkserver: the server, which ends with the parent
    envs = []
    try:
        for i in range(lo, hi):
            envs.append(make_env(env_id, seed + i, i, False, run_name)())
        first = envs[0]
        for env in envs[1:]:
            if env.observation_space != first.observation_space or env.action_space != first.action_space:
                raise RuntimeError("sub-environments do not share one observation/action space")
        conn.send_bytes(b"r" + pickle.dumps((first.observation_space, first.action_space, first.metadata, first.render_mode)))
    except Exception as e:  # noqa: BLE001  (reported to the parent as one line)
        i = lo + len(envs)
        conn.send_bytes(b"e" + pickle.dumps((i, type(e).__name__, _first_line(e), isinstance(e, EnvIdError))))
        return

    poller = select.poll()  # one poll object, not Connection.poll's selector per call: this is the per-step path
    poller.register(conn.fileno(), select.POLLIN)

    def receive():
        while not poller.poll(1000):
            if os.getppid() != parent_pid:
                raise EOFError
        return conn.recv_bytes()

    try:
        message = receive()
        if message[:1] != b"A":
            return
        layout, size = pickle.loads(message[1:])
        fd = reduction.recv_handle(conn)
        block = mmap.mmap(fd, size)
        os.close(fd)
        v = _views(block, layout)
        obs, final_obs, rewards, terms, truncs = v["obs"], v["final_obs"], v["rewards"], v["terminations"], v["truncations"]
        codes, value_views = v["codes"], _value_views(v["values"])
        raw_actions, act_shape = v["actions"], first.action_space.shape
        action_views: dict[bytes, np.ndarray] = {}
        num_envs = codes.shape[1]
        conn.send_bytes(b"k")

        def put(leaf: int, i: int, value) -> None:
            code = _value_code(value)
            value_views[(code - 1) % len(_DTYPES)][leaf, i] = value
            codes[leaf, i] = code

        def put_info(info: dict, i: int, keys: dict) -> None:
            for key, value in info.items():
                if key == "episode" and keys is _FINAL and isinstance(value, dict) and tuple(value) == _EPISODE_KEYS:
                    for k in _EPISODE_KEYS:
                        put(_EPISODE[k], i, value[k])
                elif key in keys:
                    put(keys[key], i, value)
                else:
                    raise TypeError(f"info key '{key}' cannot travel through EnvPool")

        while True:
            message = receive()
            tag = message[:1]
            i = lo
            try:
                if tag == b"s":
                    actions = action_views.get(message)
                    if actions is None:
                        dtype = np.dtype(message[1:].decode())
                        actions = raw_actions[: num_envs * int(np.prod(act_shape)) * dtype.itemsize].view(dtype)
                        actions = action_views[message] = actions.reshape(num_envs, *act_shape)
                    codes[:, lo:hi] = 0
                    for env in envs:
                        o, r, te, tr, info = env.step(actions[i].copy())
                        rewards[i], terms[i], truncs[i] = r, te, tr
                        if te or tr:
                            final_obs[i] = o
                            if info:
                                put_info(info, i, _FINAL)
                            o, info = env.reset()
                        if info:
                            put_info(info, i, _TOP)
                        obs[i] = o
                        i += 1
                    conn.send_bytes(b"k")
                elif tag == b"R":
                    seeds, options, mask = pickle.loads(message[1:])
                    codes[:, lo:hi] = 0
                    for env, s, m in zip(envs, seeds, mask, strict=True):
                        if m:
                            o, info = env.reset(seed=s, options=options)
                            if info:
                                put_info(info, i, _TOP)
                            obs[i] = o
                        i += 1
                    conn.send_bytes(b"k")
                elif tag == b"C":
                    name, args, kwargs, set_values = pickle.loads(message[1:])
                    results = []
                    for env in envs:
                        if set_values is not None:
                            env.set_wrapper_attr(name, set_values[i - lo])
                            results.append(None)
                        else:
                            attr = env.get_wrapper_attr(name)
                            results.append(attr(*args, **kwargs) if callable(attr) else attr)
                        i += 1
                    conn.send_bytes(b"r" + pickle.dumps(results))
                else:  # b"q" (close) or anything unexpected
                    break
            except Exception as e:  # noqa: BLE001  (reported to the parent as one line)
                conn.send_bytes(b"e" + pickle.dumps((i, type(e).__name__, _first_line(e), False)))
    except (EOFError, OSError):
        pass  # the parent is gone or closed our socket
    finally:
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001, S110
                pass


# ---------------------------------------------------------------------------------------------------------------------
# The parent.


class _Resources:
    """What must be released: processes, sockets, the shared block. Kept apart from EnvPool for weakref.finalize."""

    def __init__(self):
        self.processes, self.conns, self.block, self.done = [], [], None, False

    def shutdown(self) -> None:
        if self.done:
            return
        self.done = True
        for conn in self.conns:
            try:
                conn.send_bytes(b"q")
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.block = None  # the mapping goes when its last numpy view does


class EnvPool(gym.vector.VectorEnv):
    """`num_envs` envs made by ``envs.make_env`` stepped in `num_workers` processes; SyncVectorEnv's interface."""

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        seed: int,
        num_workers: int,
        run_name: str = "",
        start_method: str | None = None,
        step_timeout: float | None = None,
    ):
        if num_envs < 1 or num_workers < 1:
            raise ValueError(f"EnvPool needs num_envs >= 1 and num_workers >= 1, got {num_envs} and {num_workers}")
        check_env_id(env_id)  # one-line EnvIdError in the parent; also imports the env packages before the fork
        self.env_id, self.num_envs, self.step_timeout = env_id, num_envs, step_timeout
        self.num_workers = min(num_workers, num_envs)
        bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(num_envs), self.num_workers)])
        self.slices = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self.start_method = start_method or default_start_method()
        self._step_count, self._pending = 0, False
        self._resources, self._pollers = _Resources(), []
        self._finalizer = weakref.finalize(self, self._resources.shutdown)
        started = time.perf_counter()
        try:
            self._start_workers(env_id, seed, run_name)
        except BaseException:
            self._finalizer()
            self.closed = True
            raise
        self.startup_seconds = time.perf_counter() - started

    # -- start-up -----------------------------------------------------------------------------------------------------
    def _start_workers(self, env_id: str, seed: int, run_name: str) -> None:
        ctx = get_context(self.start_method)
        res = self._resources
        watched_pid = None if self.start_method == "forkserver" else os.getpid()  # a worker exits when it changes
        for lo, hi in self.slices:
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            res.conns.append(parent_conn)
            inherited = list(res.conns) if self.start_method == "fork" else []
            p = ctx.Process(
                target=_worker,
                args=(child_conn, env_id, seed, lo, hi, run_name, watched_pid, inherited),
                name=f"EnvPool-{env_id}-{lo}:{hi}",
                daemon=True,
            )
            p.start()
            child_conn.close()
            res.processes.append(p)
            self._pollers.append(select.poll())
            self._pollers[-1].register(parent_conn.fileno(), select.POLLIN)
        replies = self._collect("start-up", b"r")
        obs_space, act_space, metadata, render_mode = pickle.loads(replies[0])
        for reply in replies[1:]:
            other_obs, other_act = pickle.loads(reply)[:2]
            if other_obs != obs_space or other_act != act_space:
                raise EnvPoolError(f"the workers' envs of '{env_id}' do not share one observation/action space")
        if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Box):
            raise EnvPoolError(f"EnvPool needs Box observation and action spaces, got {obs_space} and {act_space}")
        self.single_observation_space, self.single_action_space = obs_space, act_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.action_space = batch_space(act_space, self.num_envs)
        self.metadata = dict(metadata)
        self.metadata["autoreset_mode"] = gym.vector.AutoresetMode.SAME_STEP
        self.render_mode = render_mode

        layout, size = _layout(self.num_envs, obs_space.shape, obs_space.dtype, act_space.shape)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("envpool", os.MFD_CLOEXEC)
        else:  # an unlinked temporary file, in memory where /dev/shm exists
            fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.unlink(path)
        try:
            os.ftruncate(fd, size)
            res.block = mmap.mmap(fd, size)
            message = b"A" + pickle.dumps((layout, size))
            for w, (conn, p) in enumerate(zip(res.conns, res.processes, strict=True)):
                try:
                    conn.send_bytes(message)
                    reduction.send_handle(conn, fd, p.pid)
                except OSError:
                    self._dead(w, "start-up")
        finally:
            os.close(fd)
        self._collect("start-up", b"k")
        v = _views(res.block, layout)
        self._obs, self._final_obs, self._rewards = v["obs"], v["final_obs"], v["rewards"]
        self._terminations, self._truncations, self._codes = v["terminations"], v["truncations"], v["codes"]
        self._value_views = _value_views(v["values"])
        self._raw_actions, self._action_views = v["actions"], {}

    # -- messaging ----------------------------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._resources.processes]

    def _where(self, phase: str) -> str:
        return f"step {self._step_count}" if phase == "step" else phase

    def _fail(self, message: str):
        self.close()
        raise EnvPoolError(message)

    def _dead(self, w: int, phase: str):
        p = self._resources.processes[w]
        p.join(0.5)
        code = p.exitcode
        how = "is unresponsive" if code is None else f"died (exit code {code}"
        if code is not None and code < 0:
            try:
                how += f", {signal.Signals(-code).name}"
            except ValueError:
                pass
        how += ")" if code is not None else ""
        lo, hi = self.slices[w]
        envs_text = f"env {lo}" if hi - lo == 1 else f"envs {lo}-{hi - 1}"
        self._fail(f"EnvPool worker {w} ({envs_text} of '{self.env_id}') {how} during {self._where(phase)}")

    def _send(self, message: bytes, phase: str, workers=None) -> None:
        for w in range(self.num_workers) if workers is None else workers:
            try:
                self._resources.conns[w].send_bytes(message)
            except (OSError, ValueError):
                self._dead(w, phase)

    def _collect(self, phase: str, expected: bytes, workers=None) -> list[bytes]:
        """One reply from each of `workers` (all by default), in order; an env error or a dead worker closes the pool
        and raises EnvPoolError (EnvIdError for an env that cannot be built)."""
        replies = []
        try:
            for w in range(self.num_workers) if workers is None else workers:
                conn, p, poller = self._resources.conns[w], self._resources.processes[w], self._pollers[w]
                waited = 0.0
                while not poller.poll(500):
                    waited += 0.5
                    if not p.is_alive() or (self.step_timeout is not None and waited >= self.step_timeout):
                        self._dead(w, phase)
                try:
                    reply = conn.recv_bytes()
                except (EOFError, OSError):
                    self._dead(w, phase)
                if reply[:1] == b"e":
                    i, type_name, line, is_id_error = pickle.loads(reply[1:])
                    self.close()
                    if phase == "start-up":
                        error = EnvIdError if is_id_error else EnvPoolError
                        raise error(f"env {i} of '{self.env_id}' could not be built: {type_name}: {line}")
                    raise EnvPoolError(f"env {i} of '{self.env_id}' raised {type_name} at {self._where(phase)}: {line}")
                if reply[:1] != expected:
                    self._fail(f"EnvPool worker {w} sent an unexpected reply during {self._where(phase)}")
                replies.append(reply[1:])
        except KeyboardInterrupt:
            self.close()
            raise
        return replies

    def _check_open(self) -> None:
        if self.closed:
            raise EnvPoolError(f"EnvPool of '{self.env_id}' is closed")
        if self._pending:
            raise EnvPoolError("EnvPool: call step_wait() before another call (a step_async() is pending)")

    # -- the VectorEnv interface --------------------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset every env (env i with ``seed + i`` for an int seed) or those in ``options["reset_mask"]``."""
        self._check_open()
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        assert len(seed) == self.num_envs, f"seed list must have length num_envs={self.num_envs}, got {len(seed)}"
        options = dict(options) if options is not None else None
        mask = np.ones(self.num_envs, dtype=bool)
        if options is not None and "reset_mask" in options:
            mask = options.pop("reset_mask")
            assert isinstance(mask, np.ndarray) and mask.shape == (self.num_envs,) and mask.dtype == np.bool_
            assert np.any(mask), "options['reset_mask'] must reset at least one env"
        workers = [w for w, (lo, hi) in enumerate(self.slices) if mask[lo:hi].any()]
        for w in workers:
            lo, hi = self.slices[w]
            payload = (seed[lo:hi], options, [bool(m) for m in mask[lo:hi]])
            self._send(b"R" + pickle.dumps(payload), "reset", [w])
        self._collect("reset", b"k", workers)
        infos = self._merge_leaves({}, [(k, _TOP[k]) for k in KEPT_INFO_KEYS], rank0=0, entries_only=False)
        return self._obs.copy(), infos

    def step_async(self, actions) -> None:
        """Write `actions` ([num_envs, *action_shape]) to shared memory and start every worker's step."""
        self._check_open()
        actions = np.asarray(host_actions(actions))
        shape = (self.num_envs, *self.single_action_space.shape)
        if actions.shape != shape:
            raise ValueError(f"EnvPool.step: actions must have shape {shape}, got {actions.shape}")
        if actions.dtype.kind not in "biuf" or actions.dtype.itemsize > 8:
            actions = actions.astype(np.float64)
        dtype = actions.dtype.newbyteorder("=")
        view = self._action_views.get(dtype)
        if view is None:
            size = actions.size * dtype.itemsize
            view = self._action_views[dtype] = self._raw_actions[:size].view(dtype).reshape(shape)
        view[...] = actions
        self._step_count += 1
        self._send(b"s" + dtype.str.encode(), "step")
        self._pending = True

    def step_wait(self):
        """Wait for the step started by step_async; returns (next_obs, rewards, terminations, truncations, infos)."""
        if not self._pending:
            raise EnvPoolError("EnvPool.step_wait() without a pending step_async()")
        self._pending = False
        self._collect("step", b"k")
        finished = self._terminations | self._truncations
        infos: dict[str, Any] = {}
        entries = []
        if finished.any():
            first = int(np.argmax(finished))
            entries += [(first, 0, "final_obs", None), (first, 1, "final_info", None)]
        entries += self._merge_leaves(infos, [(k, _TOP[k]) for k in KEPT_INFO_KEYS], rank0=2, entries_only=True)
        for _, _, key, array in sorted(entries, key=lambda e: e[:2]):
            if key == "final_obs":
                final_obs = np.full(self.num_envs, fill_value=None, dtype=object)
                for i in np.flatnonzero(finished):
                    final_obs[i] = self._final_obs[i].copy()
                infos["final_obs"], infos["_final_obs"] = final_obs, finished.copy()
            elif key == "final_info":
                infos["final_info"], infos["_final_info"] = self._final_info(), finished.copy()
            else:
                infos[key], infos[f"_{key}"] = array
        return self._obs.copy(), self._rewards.copy(), self._terminations.copy(), self._truncations.copy(), infos

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def _final_info(self) -> dict:
        final_info: dict[str, Any] = {}
        entries = self._merge_leaves({}, [(k, _FINAL[k]) for k in KEPT_INFO_KEYS], rank0=0, entries_only=True)
        episode_present = self._codes[_EPISODE["r"]] != 0
        if episode_present.any():
            entries.append((int(np.argmax(episode_present)), len(KEPT_INFO_KEYS), "episode", None))
        for _, _, key, array in sorted(entries, key=lambda e: e[:2]):
            if key == "episode":
                episode = self._merge_leaves({}, [(k, _EPISODE[k]) for k in _EPISODE_KEYS], rank0=0, entries_only=False)
                final_info["episode"], final_info["_episode"] = episode, episode_present
            else:
                final_info[key], final_info[f"_{key}"] = array
        return final_info

    def _merge_leaves(self, out: dict, leaves: list[tuple[str, int]], rank0: int, entries_only: bool):
        """The arrays `_add_info` would have built for these leaves; as sortable entries, or put into `out` in order."""
        entries = []
        for rank, (key, leaf) in enumerate(leaves):
            codes = self._codes[leaf]
            present = codes != 0
            if not present.any():
                continue
            idx = np.flatnonzero(present)
            first_code = int(codes[idx[0]])
            kind, dtype = _decode(first_code)
            if kind in _NUMERIC_KINDS:
                array = np.zeros(self.num_envs, dtype=dtype)
                if np.all(codes[idx] == first_code):
                    array[idx] = self._value_views[_DTYPE_INDEX[dtype]][leaf, idx]
                else:
                    for i in idx:
                        array[i] = self._element(leaf, i)
            else:
                array = np.full(self.num_envs, fill_value=None, dtype=object)
                for i in idx:
                    array[i] = self._element(leaf, i)
            entries.append((int(idx[0]), rank0 + rank, key, (array, present)))
        if entries_only:
            return entries
        for _, _, key, (array, present) in sorted(entries, key=lambda e: e[:2]):
            out[key], out[f"_{key}"] = array, present
        return out

    def _element(self, leaf: int, i: int):
        """The value env i put in `leaf`, as the object gymnasium would have stored (Python scalar, numpy scalar...)."""
        kind, dtype = _decode(int(self._codes[leaf, i]))
        value = self._value_views[_DTYPE_INDEX[dtype]][leaf, i]
        if kind == _NATIVE:
            return value.item()
        return np.array(value) if kind == _ARR0D else value

    # -- the rest -----------------------------------------------------------------------------------------------------
    def _call_workers(self, name: str, args=(), kwargs=None, set_values=None) -> tuple:
        self._check_open()
        for w, (lo, hi) in enumerate(self.slices):
            values = None if set_values is None else list(set_values[lo:hi])
            self._send(b"C" + pickle.dumps((name, args, kwargs or {}, values)), f"call to '{name}'", [w])
        results = []
        for reply in self._collect(f"call to '{name}'", b"r"):
            results += pickle.loads(reply)
        return tuple(results)

    def call(self, name: str, *args, **kwargs) -> tuple:
        """Call (or read) attribute `name` of every env, as SyncVectorEnv.call (arguments and results are pickled)."""
        return self._call_workers(name, args, kwargs)

    def get_attr(self, name: str) -> tuple:
        return self._call_workers(name)

    def set_attr(self, name: str, values) -> None:
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"set_attr needs {self.num_envs} values (one per env), got {len(values)}")
        self._call_workers(name, set_values=values)

    def close_extras(self, **kwargs) -> None:
        """Stop the workers (they close their envs), terminating any that do not exit within a second."""
        self._pending = False
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def __repr__(self) -> str:
        return f"EnvPool({self.env_id!r}, num_envs={self.num_envs}, num_workers={self.num_workers})"
