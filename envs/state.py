"""Checkpointable env state: everything that decides the future transitions of the training vector env.

``vector_env_state(envs)`` returns a dict of plain Python values (per-env ``bytes``) that ``torch.save`` stores and
``torch.load(..., weights_only=True)`` reads back; ``restore_vector_env_state(envs, state)`` puts it into vector envs
freshly built by ``envs.make_envs`` / ``envs.make_vector_env`` / ``envs.pool.EnvPool`` with the same env id and
number of envs. After that the next steps under the same actions are bit-identical (obs, rewards, flags, the
``final_obs``/``final_info`` entries) to continuing the original, across episode ends; the training script keeps
its current observation array ``obs`` itself and uses the restore instead of ``envs.reset(seed=...)``.

Why not ``pickle.dumps(env)``: Gymnasium MuJoCo and MyoSuite envs are ``EzPickle`` (unpickling rebuilds a *fresh*
env from the constructor arguments, dropping every state), MuJoCo's ``MjModel``/``MjData`` pickle as a whole model
(28-41 MB for MyoSuite), and ChainReach's state arrays are views of one buffer that pickling would split apart.

What is captured, per sub-env, by walking the whole wrapper stack's ``__dict__`` graph (shared objects and cycles
kept as references):

* plain Python values, containers, ``deque`` s and objects (TimeLimit's elapsed steps, OrderEnforcing's
  ``_has_reset``, RecordEpisodeStatistics' accumulators and queues, MyoSuite's step counters, targets, task dicts,
  ...); arrays are written back *in place* where the fresh env has one of the same shape/dtype, so views into a
  shared buffer (ChainReach) and references held elsewhere stay valid;
* every NumPy ``Generator``/``RandomState`` and Python ``random.Random`` (the env's ``np_random``, the action and
  observation space RNGs) as its bit-generator state;
* ``MjData``: ``mj_getState(mjSTATE_INTEGRATION)`` (time, qpos, qvel, act, actuator history, plugin state, ctrl,
  applied forces, eq_active, mocap, userdata, qacc_warmstart), the warning counters (MyoSuite's instability check
  reads them) and ``tree_asleep``; after restoring, ``mj_forward`` recomputes the derived quantities;
* ``MjModel``: every numeric field except compiled assets that no task edits (``mesh_*``, ``tex_*``, ``bvh_*``,
  ``skin_*``, ``flex*``, ``oct_*``, names), plus ``opt`` and ``stat``: MyoSuite tasks move sites/bodies and
  randomise masses, frictions and sizes on reset, and heightfield tasks rewrite ``hfield_data``.

Kept from the fresh env (never part of the state): callables, classes, modules, and native objects other than
MjModel/MjData (``MjSpec``, renderers, GL contexts), which do not affect transitions. RecordEpisodeStatistics'
``episode_start_time`` is wall-clock: it is saved as the time elapsed in the episode, so ``info["episode"]["t"]``
goes on counting from there (it is never reproducible anyway).

Inexact by construction: MuJoCo's derived quantities (``xpos``, ``sensordata``, contacts, ``cfrc_ext``, solver
statistics) are recomputed by ``mj_forward`` at restore instead of copied. MyoSuite itself runs ``mj_forward`` after
every step, so they are identical there; Gymnasium v5 envs leave the values of the last ``mj_step`` (computed one
substep earlier), so they differ until the next step, which recomputes them before anything reads them.

Vector envs: ``SyncVectorEnv`` (any autoreset mode), ``AsyncVectorEnv`` (same-step or disabled autoreset: in
next-step mode its workers keep a private autoreset flag) and ``EnvPool``. The remote ones are reached through
their ``call``/``set_attr`` commands: the outermost wrapper of each env briefly takes the class ``_StateAgent``
(which adds the two methods that capture/restore, then puts the original class back), so neither the pool nor
gymnasium needs a new command. A state from one kind restores into another (e.g. resume with other --env-workers).
"""

from __future__ import annotations

import collections
import importlib
import pickle
import random
import time
import zlib
from enum import Enum
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

import gymnasium as gym
import numpy as np

from envs import EnvError

__all__ = ["EnvStateError", "env_state", "restore_env_state", "restore_vector_env_state", "vector_env_state"]

FORMAT = "envs.state/1"


class EnvStateError(EnvError):
    """A vector env or a state that cannot be saved/restored; the message is one line."""


# ---------------------------------------------------------------------------------------------------------------------
# One env: snapshot of the object graph reachable from the outermost wrapper.
#
# Nodes (tuples, first item a tag): ("v", value) immutable value; ("r", id) an object seen before; ("a", id, array,
# writeable); ("g", id, kind, state) an RNG; ("M", id, fields) MjModel; ("D", id, fields) MjData; ("l"|"t"|"q", id,
# children[, maxlen]) list/tuple/deque; ("d", id, class, [(key, child)]) dict; ("o", id, class, [(attr, child)])
# object; ("p", blob) anything else that pickles; ("x", class) opaque, kept from the fresh env; ("c", seconds) a
# perf_counter timestamp saved as the time elapsed since it.

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, np.generic, np.dtype, Enum, range, slice)
_OPAQUE = (FunctionType, BuiltinFunctionType, MethodType, ModuleType, type)
# Model fields no task edits at run time (compiled assets, names, acceleration structures): 96% of a MyoSuite model.
_MODEL_SKIP = ("bvh_", "tex_", "mesh_", "skin_", "flex", "oct_", "names", "name_", "text_", "paths", "plugin_attr")
_MODEL_STRUCTS = ("opt", "stat")
_CLOCK_ATTRS = {("gymnasium.wrappers.common", "RecordEpisodeStatistics"): ("episode_start_time",)}
_MISSING = object()
_model_fields: list[str] | None = None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str) -> type:
    module, qualname = path.split(":", 1)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_immutable(value) -> bool:
    if isinstance(value, _IMMUTABLE):
        return True
    if type(value) in (tuple, frozenset):
        return all(_is_immutable(v) for v in value)
    return False


def _mujoco():
    """The mujoco module if it is already imported (an env that uses it has imported it), else None."""
    import sys

    return sys.modules.get("mujoco")


def _model_field_names(model) -> list[str]:
    global _model_fields
    if _model_fields is None:
        names = []
        for name in dir(model):
            if name.startswith("_") or name.startswith(_MODEL_SKIP):
                continue
            try:
                value = getattr(model, name)
            except Exception:  # noqa: BLE001, S112  (properties that raise for some models)
                continue
            if isinstance(value, np.ndarray) and value.dtype != object:
                names.append(name)
        _model_fields = names
    return _model_fields


def _struct_fields(struct) -> dict:
    out = {}
    for name in dir(struct):
        if name.startswith("_"):
            continue
        value = getattr(struct, name)
        if isinstance(value, np.ndarray):
            out[name] = value.copy()
        elif isinstance(value, (bool, int, float)):
            out[name] = value
    return out


def _model_snapshot(model) -> dict:
    fields = {name: getattr(model, name).copy() for name in _model_field_names(model)}
    for struct in _MODEL_STRUCTS:
        fields[struct] = _struct_fields(getattr(model, struct))
    fields["sizes"] = _model_sizes(model)
    return fields


def _model_sizes(model) -> tuple:
    return tuple(int(getattr(model, n)) for n in ("nq", "nv", "nu", "na", "nbody", "njnt", "ngeom", "nsite", "nmocap"))


def _restore_model(model, fields: dict) -> None:
    if _model_sizes(model) != fields["sizes"]:
        raise EnvStateError(f"the state's MuJoCo model has sizes {fields['sizes']}, this env's {_model_sizes(model)}")
    for name, saved in fields.items():
        if name == "sizes":
            continue
        if name in _MODEL_STRUCTS:
            struct = getattr(model, name)
            for key, value in saved.items():
                if isinstance(value, np.ndarray):
                    current = getattr(struct, key)
                    if current.tobytes() != value.tobytes():
                        current[...] = value
                elif getattr(struct, key) != value:
                    setattr(struct, key, value)
            continue
        current = getattr(model, name)
        if current.shape != saved.shape or current.dtype != saved.dtype:
            raise EnvStateError(f"MuJoCo model field '{name}' is {current.shape} {current.dtype}, saved {saved.shape}")
        if current.tobytes() != saved.tobytes():
            current[...] = saved


def _data_snapshot(data) -> dict:
    mujoco = _mujoco()
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(data.model, spec))
    mujoco.mj_getState(data.model, data, state, spec)
    warning = [(int(w.number), int(w.lastinfo)) for w in data.warning]
    fields = {"integration": state, "warning": warning}
    if hasattr(data, "tree_asleep"):
        fields["tree_asleep"] = np.array(data.tree_asleep, copy=True)
    return fields


def _restore_data(data, fields: dict) -> None:
    mujoco = _mujoco()
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    if fields["integration"].size != mujoco.mj_stateSize(data.model, spec):
        raise EnvStateError("the state's MuJoCo data does not fit this env's model")
    mujoco.mj_setState(data.model, data, fields["integration"], spec)
    if "tree_asleep" in fields and hasattr(data, "tree_asleep"):
        data.tree_asleep[...] = fields["tree_asleep"]
    mujoco.mj_forward(data.model, data)  # derived quantities; it writes no integration state
    for w, (number, lastinfo) in zip(data.warning, fields["warning"], strict=True):
        w.number, w.lastinfo = number, lastinfo  # after mj_forward, which may count warnings of its own


class _Snapshot:
    def __init__(self):
        self.memo: dict[int, int] = {}
        self.keep: list = []  # keeps every memoised object alive, so no id() is reused during the walk
        self.opaque: set[str] = set()

    def node(self, value, clock: bool = False):
        if clock and isinstance(value, float):
            return ("c", time.perf_counter() - value) if value >= 0 else ("v", value)
        if _is_immutable(value):
            return ("v", value)
        key = id(value)
        if key in self.memo:
            return ("r", self.memo[key])
        nid = self.memo[key] = len(self.memo)
        self.keep.append(value)
        mujoco = _mujoco()
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                return ("p", pickle.dumps(value))
            return ("a", nid, value.copy(), bool(value.flags.writeable))
        if isinstance(value, np.random.Generator):
            return ("g", nid, "Generator", value.bit_generator.state)
        if isinstance(value, np.random.RandomState):
            return ("g", nid, "RandomState", value.get_state(legacy=False))
        if isinstance(value, random.Random):
            return ("g", nid, "Random", value.getstate())
        if mujoco is not None and isinstance(value, mujoco.MjModel):
            return ("M", nid, _model_snapshot(value))
        if mujoco is not None and isinstance(value, mujoco.MjData):
            return ("D", nid, _data_snapshot(value))
        if type(value) is list:
            return ("l", nid, [self.node(v) for v in value])
        if type(value) is tuple:
            return ("t", nid, [self.node(v) for v in value])
        if type(value) is collections.deque:
            return ("q", nid, [self.node(v) for v in value], value.maxlen)
        if type(value) in (dict, collections.OrderedDict):
            return ("d", nid, _class_path(type(value)), [(k, self.node(v)) for k, v in value.items()])
        if isinstance(value, _OPAQUE) or type(value).__module__.split(".")[0] in ("mujoco", "OpenGL"):
            self.opaque.add(_class_path(type(value)))
            return ("x", _class_path(type(value)))
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict):
            cls = type(value)
            clocks = _CLOCK_ATTRS.get((cls.__module__, cls.__qualname__), ())
            return ("o", nid, _class_path(cls), [(k, self.node(v, k in clocks)) for k, v in attrs.items()])
        try:
            return ("p", pickle.dumps(value))
        except Exception:  # noqa: BLE001  (native objects: kept from the fresh env)
            self.opaque.add(_class_path(type(value)))
            return ("x", _class_path(type(value)))


class _Restore:
    def __init__(self):
        self.objects: dict[int, Any] = {}
        self.data: list = []  # (MjData, fields), restored after the models

    def node(self, current, node):
        tag = node[0]
        if tag == "v":
            return node[1]
        if tag == "r":
            return self.objects[node[1]]
        if tag == "c":
            return time.perf_counter() - node[1]
        if tag == "p":
            return pickle.loads(node[1])
        if tag == "x":
            return current
        nid = node[1]
        if tag == "a":
            saved, writeable = node[2], node[3]
            if isinstance(current, np.ndarray) and current.shape == saved.shape and current.dtype == saved.dtype:
                if current.tobytes() == saved.tobytes():
                    result = current
                elif current.flags.writeable:
                    current[...] = saved
                    result = current
                else:
                    result = saved.copy()
            else:
                result = saved.copy()
            if not writeable and result is not current:
                result.flags.writeable = False
        elif tag == "g":
            result = self._rng(current, node[2], node[3])
        elif tag in ("M", "D"):
            mujoco = _mujoco()
            kind = None if mujoco is None else mujoco.MjModel if tag == "M" else mujoco.MjData
            if kind is None or not isinstance(current, kind):
                raise EnvStateError(f"the env has no MuJoCo {'model' if tag == 'M' else 'data'} where the state has one")
            if tag == "M":
                _restore_model(current, node[2])
            else:
                self.data.append((current, node[2]))
            result = current
        elif tag == "l":
            result = current if type(current) is list else []
            self.objects[nid] = result
            old = list(result)
            result[:] = [self.node(old[i] if i < len(old) else _MISSING, child) for i, child in enumerate(node[2])]
        elif tag == "t":
            old = current if type(current) is tuple and len(current) == len(node[2]) else (_MISSING,) * len(node[2])
            result = tuple(self.node(c, child) for c, child in zip(old, node[2], strict=True))
        elif tag == "q":
            maxlen = node[3]
            result = current if type(current) is collections.deque and current.maxlen == maxlen else None
            result = collections.deque(maxlen=maxlen) if result is None else result
            self.objects[nid] = result
            old = list(result)
            values = [self.node(old[i] if i < len(old) else _MISSING, child) for i, child in enumerate(node[2])]
            result.clear()
            result.extend(values)
        elif tag == "d":
            cls = _load_class(node[2])
            result = current if type(current) is cls else cls()
            self.objects[nid] = result
            old = dict(result)
            values = [(k, self.node(old.get(k, _MISSING), child)) for k, child in node[3]]
            result.clear()
            result.update((k, v) for k, v in values if v is not _MISSING)
        elif tag == "o":
            cls = _load_class(node[2])
            result = current if type(current) is cls else cls.__new__(cls)
            self.objects[nid] = result
            old = dict(result.__dict__)
            values = [(k, self.node(old.get(k, _MISSING), child)) for k, child in node[3]]
            result.__dict__.clear()
            result.__dict__.update((k, v) for k, v in values if v is not _MISSING)
        else:
            raise EnvStateError(f"unknown node '{tag}' in an env state (a newer format?)")
        self.objects[nid] = result
        return result

    @staticmethod
    def _rng(current, kind: str, state):
        if kind == "Generator":
            if not isinstance(current, np.random.Generator) or type(current.bit_generator).__name__ != state["bit_generator"]:
                current = np.random.Generator(getattr(np.random, state["bit_generator"])())
            current.bit_generator.state = state
        elif kind == "RandomState":
            current = current if isinstance(current, np.random.RandomState) else np.random.RandomState()
            current.set_state(state)
        else:
            current = current if isinstance(current, random.Random) else random.Random()
            current.setstate(state)
        return current


def _signature(env: gym.Env) -> list[str]:
    """The wrapper stack's classes, outermost first, plus the env id and the MuJoCo model sizes (if any)."""
    stack, e = [], env
    while True:
        stack.append(_class_path(type(e)))
        if not isinstance(e, gym.Wrapper):
            break
        e = e.env
    stack.append(f"id={env.spec.id if env.spec is not None else None}")
    mujoco, model = _mujoco(), getattr(e, "model", None)
    if mujoco is not None and isinstance(model, mujoco.MjModel):
        stack.append(f"model={_model_sizes(model)}")
    return stack


def env_state(env: gym.Env) -> bytes:
    """The state of one env (its whole wrapper stack) as bytes; see the module docstring for what it holds."""
    snapshot = _Snapshot()
    root = snapshot.node(env)
    payload = {"signature": _signature(env), "root": root, "opaque": sorted(snapshot.opaque)}
    return zlib.compress(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL), 1)


def restore_env_state(env: gym.Env, state: bytes) -> None:
    """Put `state` (from ``env_state``) into `env`, an env built like the saved one; nothing changes on a mismatch."""
    payload = pickle.loads(zlib.decompress(state))
    if payload["signature"] != _signature(env):
        raise EnvStateError(f"the saved env is {' '.join(payload['signature'])}, this one {' '.join(_signature(env))}")
    restore = _Restore()
    restore.node(env, payload["root"])
    for data, fields in restore.data:
        _restore_data(data, fields)


# ---------------------------------------------------------------------------------------------------------------------
# Envs in other processes (AsyncVectorEnv, EnvPool): run env_state / restore_env_state there through call/set_attr.


class _StateAgent(gym.Wrapper):
    """The class an env's outermost wrapper takes for one `call`; each method first puts the original class back."""

    def _envs_state_get(self) -> bytes:
        self.__class__ = self.__dict__.pop("_envs_state_class")
        return env_state(self)

    def _envs_state_set(self) -> None:
        self.__class__ = self.__dict__.pop("_envs_state_class")
        restore_env_state(self, self.__dict__.pop("_envs_state_pending"))


def _remote(vector_env, method: str, states: list[bytes] | None = None) -> tuple:
    classes = vector_env.call("__getattribute__", "__class__")  # `get_attr` would call the class
    vector_env.set_attr("_envs_state_class", list(classes))
    if states is not None:
        vector_env.set_attr("_envs_state_pending", list(states))
    vector_env.set_attr("__class__", [_StateAgent] * vector_env.num_envs)
    return vector_env.call(method)


# ---------------------------------------------------------------------------------------------------------------------
# Vector envs.


def _mode(vector_env) -> str:
    """The autoreset mode, from the vector env itself: gymnasium's ``metadata`` is the env class's own dict, which
    every Sync/AsyncVectorEnv of that class overwrites with its mode."""
    mode = getattr(vector_env, "autoreset_mode", None) or vector_env.metadata.get("autoreset_mode")
    return getattr(mode, "value", str(mode))


def _kind(vector_env) -> str:
    from envs.pool import EnvPool  # lazy: envs.pool imports envs

    if isinstance(vector_env, gym.vector.SyncVectorEnv):  # envs.SyncVectorEnv included
        return "SyncVectorEnv"
    if isinstance(vector_env, gym.vector.AsyncVectorEnv):  # envs.AsyncVectorEnv included
        if _mode(vector_env) == gym.vector.AutoresetMode.NEXT_STEP.value:
            raise EnvStateError(
                "env state: AsyncVectorEnv in next-step autoreset mode is not supported (its workers keep a private "
                "autoreset flag); use same-step autoreset, SyncVectorEnv or EnvPool"
            )
        return "AsyncVectorEnv"
    if type(vector_env) is EnvPool:
        return "EnvPool"
    what = "a VectorWrapper" if isinstance(vector_env, gym.vector.VectorWrapper) else "a vector env"
    raise EnvStateError(
        f"env state: {type(vector_env).__module__}.{type(vector_env).__qualname__} ({what}) is not supported; pass the "
        "SyncVectorEnv, AsyncVectorEnv or EnvPool that envs.make_envs builds"
    )


def _buffers(vector_env, kind: str) -> dict[str, np.ndarray]:
    """The vector env's own arrays: last batched observation, rewards, flags (and Sync's autoreset marks)."""
    if kind == "SyncVectorEnv":
        return {
            "observations": vector_env._observations, "rewards": vector_env._rewards,
            "terminations": vector_env._terminations, "truncations": vector_env._truncations,
            "autoreset_envs": vector_env._autoreset_envs,
        }  # fmt: skip
    if kind == "EnvPool":
        return {
            "observations": vector_env._obs, "rewards": vector_env._rewards,
            "terminations": vector_env._terminations, "truncations": vector_env._truncations,
        }  # fmt: skip
    return {"observations": vector_env.observations}


def _check_idle(vector_env, kind: str) -> None:
    if kind == "AsyncVectorEnv" and vector_env._state != gym.vector.async_vector_env.AsyncState.DEFAULT:
        raise EnvStateError(f"env state: AsyncVectorEnv is waiting for '{vector_env._state.value}'; finish it first")
    if kind == "EnvPool" and vector_env._pending:
        raise EnvStateError("env state: EnvPool has a pending step_async(); call step_wait() first")
    if getattr(vector_env, "closed", False):
        raise EnvStateError(f"env state: the {kind} is closed")


def vector_env_state(vector_env) -> dict:
    """Everything that decides the future transitions of `vector_env`: a dict of str/int/bytes (torch.save-able)."""
    if type(vector_env).__name__ == "TwinVectorEnv":  # the GPU twin keeps its state in tensors (envs.twin)
        twin = vector_env.state_dict()
        return {"format": FORMAT, "kind": "TwinVectorEnv", "num_envs": int(vector_env.num_envs), "twin": twin}
    kind = _kind(vector_env)
    _check_idle(vector_env, kind)
    if kind == "SyncVectorEnv":
        states = [env_state(env) for env in vector_env.envs]
    else:
        states = list(_remote(vector_env, "_envs_state_get"))
    buffers = {k: np.array(v, copy=True) for k, v in _buffers(vector_env, kind).items()}
    if kind == "SyncVectorEnv":
        buffers["env_obs"] = [None if o is None else np.array(o, copy=True) for o in vector_env._env_obs]
    if kind == "EnvPool":
        buffers["step_count"] = vector_env._step_count
    return {
        "format": FORMAT,
        "kind": kind,
        "num_envs": int(vector_env.num_envs),
        "autoreset_mode": _mode(vector_env),
        "envs": states,
        "vector": zlib.compress(pickle.dumps(buffers, protocol=pickle.HIGHEST_PROTOCOL), 1),
    }


def restore_vector_env_state(vector_env, state: dict) -> None:
    """Restore `state` (from ``vector_env_state``) into `vector_env`, built with the same env id and num_envs.

    Use it instead of ``envs.reset(seed=...)`` on resume; the current observation is the caller's (saved alongside).
    A state saved from one kind (SyncVectorEnv, AsyncVectorEnv, EnvPool) restores into any other; the GPU twin's
    (TwinVectorEnv: the worlds' physics state and episode counters) only into a twin.
    """
    twin_state = state.get("kind") == "TwinVectorEnv" if isinstance(state, dict) else False
    if twin_state or type(vector_env).__name__ == "TwinVectorEnv":
        if not (twin_state and type(vector_env).__name__ == "TwinVectorEnv"):
            raise EnvStateError("env state: a run of --env-backend mjlab resumes only with --env-backend mjlab, and back")
        if state["num_envs"] != vector_env.num_envs:
            raise EnvStateError(f"env state: saved for {state['num_envs']} envs, this vector env has {vector_env.num_envs}")
        vector_env.load_state_dict(state["twin"])
        return
    kind = _kind(vector_env)
    _check_idle(vector_env, kind)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EnvStateError(f"env state: not a {FORMAT} state (got {type(state).__name__})")
    if state["num_envs"] != vector_env.num_envs:
        raise EnvStateError(f"env state: saved for {state['num_envs']} envs, this vector env has {vector_env.num_envs}")
    if state["autoreset_mode"] != _mode(vector_env):
        raise EnvStateError(f"env state: saved in autoreset mode {state['autoreset_mode']}, this one uses {_mode(vector_env)}")
    if kind == "SyncVectorEnv":
        for env, env_bytes in zip(vector_env.envs, state["envs"], strict=True):
            restore_env_state(env, env_bytes)
    else:
        _remote(vector_env, "_envs_state_set", state["envs"])
    saved = pickle.loads(zlib.decompress(state["vector"]))
    for name, target in _buffers(vector_env, kind).items():
        if name in saved and np.shape(saved[name]) == np.shape(target):
            target[...] = saved[name]
    if kind == "SyncVectorEnv":
        if "autoreset_envs" not in saved:  # saved elsewhere: same-step mode, where nothing is pending
            vector_env._autoreset_envs[...] = False
        env_obs = saved.get("env_obs") or list(saved["observations"])
        vector_env._env_obs = [None if o is None else np.array(o, copy=True) for o in env_obs]
    if kind == "EnvPool" and "step_count" in saved:
        vector_env._step_count = saved["step_count"]
