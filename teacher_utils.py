"""Everything the QDagger scripts share about teachers.

A *teacher* is the prior computation that Reincarnating RL (Agarwal et al.,
NeurIPS 2022) reuses: by default a Dopamine DQN agent from the public
``rl_checkpoints`` bucket (``DQN_400/<Game>/<run>/``), and also any earlier
agent -- a student saved by our own scripts (``runs/<run_name>/``, chained
reincarnation) or a CleanRL ``dqn_atari_jax.py`` model (a local file or
``hf://<owner>/<repo>/<file>`` on the Hugging Face Hub).  This module reads
those files with numpy and flax only -- no TensorFlow, no Dopamine -- and gives
the teacher the exact inputs it was trained on.

This module holds the teacher networks, the loading of every kind of teacher,
the upload of a student (which loads it as a teacher first), what both scripts
share beyond the teacher, and the command line.  The rest lives below it in
``reincarnate/``, one concern per module, and every public name of those is
importable from here too (``teacher_utils.X``).

Public API (where it lives, when not here)
----------
- :class:`DopamineNatureDQN` -- the teacher network (flax), envpool layout in.
- :class:`CleanRLQNetwork` -- CleanRL's ``dqn_atari_jax.py`` Q-network (VALID
  padding), for CleanRL teachers.
- :func:`read_tf_checkpoint` -- pure-Python TensorFlow tensor-bundle reader
  (``reincarnate/dopamine_checkpoints.py``).
- :func:`load_jax_checkpoint` -- restricted (safe) unpickler for Dopamine's
  ``ckpt.<N>`` JAX checkpoints (``reincarnate/dopamine_checkpoints.py``).
- :func:`load_teacher` / :func:`load_teacher_params` -- find, load and check
  a teacher (:class:`TeacherCheckpoint`: params, network, ``q_values``,
  architecture, env settings) from a Dopamine run folder, checkpoint file or
  ``gs://`` address, a run folder of our scripts, or a CleanRL model file
  (local or ``hf://``, :func:`download_hf`).
- :func:`download_teacher` / :func:`download_gs` -- resumable, verified
  download from the bucket (or a mirror: ``REINCARNATE_BUCKET_URL``)
  (``reincarnate/downloads.py``, with :func:`download_hf`).
- :func:`load_dopamine_replay` -- the teacher's own replay (Dopamine
  ``OutOfGraphReplayBuffer`` files), streamed into one frame array, with
  Dopamine's valid indices and n-step transitions (:class:`DopamineReplay`)
  (``reincarnate/dopamine_replay.py``).
- :func:`make_teacher_envs` -- envpool Atari on Dopamine's protocol, and the
  scores that normalise a return (``reincarnate/envs.py``).
- :func:`upload_hf` / :func:`check_hub_login` -- share a finished student on
  the Hub (``--upload-model``), where ``hf://`` loads it as a teacher (the
  Hub's side: ``reincarnate/hub.py``).
- ``python teacher_utils.py download Breakout`` / ``inspect PATH`` / ``upload runs/<run_name>``.

Every error a user can cause is a :class:`TeacherError` (``reincarnate/errors.py``)
with a one-line message that names the problem and the fix.
"""


from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import tyro

# The library below this module (reincarnate/, one concern per module). Its public names are re-exported here, so
# that the scripts, the tools and users keep writing teacher_utils.X.
from reincarnate.checkpoints import CHECKPOINT_SENTINEL, params_digest
from reincarnate.dopamine_checkpoints import _bundle_prefix, _pick_iteration, _tf_checkpoint_file_hint, list_tf_checkpoint, load_jax_checkpoint, read_tf_checkpoint
from reincarnate.dopamine_replay import DopamineReplay, load_dopamine_replay
from reincarnate.downloads import (
    BUCKET,
    BUCKET_URL_ENV,
    CACHE_ENV,
    DEFAULT_BUCKET_URL,
    default_cache_dir,
    download_gs,
    download_hf,
    download_teacher,
    list_bucket,
)
from reincarnate.envs import (
    ATARI_SCORES,
    CLEANRL_ENV_KWARGS,
    DOPAMINE_ENV_KWARGS,
    DopamineAtariEnvs,
    atari_env_ids,
    check_env_id,
    game_from_env_id,
    human_normalized_score,
    env_num_actions,
    make_teacher_envs,
    normalized_score,
    random_score,
    teacher_normalized_score,
)
from reincarnate.errors import CheckpointError, DownloadError, EnvIdError, HubError, RunError, TeacherError, _one_line
from reincarnate.hub import _hub_api, _hub_failure, _model_card, check_hub_login, hub_repo_name
from reincarnate.saved_models import MODEL_SUFFIX, _flax_model_source, _read_run_args


__all__ = [
    "CHECKPOINT_SENTINEL",
    "RunError",
    "env_num_actions",
    "normalized_score",
    "load_run_teacher",
    "teacher_identity",
    "describe_teacher",
    "load_run_dopamine_replay",
    "student_from_teacher",
    "RunTeacher",
    "prepare_run_teacher",
    "TeacherError",
    "CheckpointError",
    "DownloadError",
    "EnvIdError",
    "DopamineNatureDQN",
    "CleanRLQNetwork",
    "read_tf_checkpoint",
    "list_tf_checkpoint",
    "load_jax_checkpoint",
    "TeacherCheckpoint",
    "load_teacher",
    "load_teacher_params",
    "expected_param_shapes",
    "download_teacher",
    "download_gs",
    "download_hf",
    "HubError",
    "hub_repo_name",
    "check_hub_login",
    "upload_hf",
    "DopamineReplay",
    "load_dopamine_replay",
    "list_bucket",
    "default_cache_dir",
    "BUCKET",
    "DEFAULT_BUCKET_URL",
    "BUCKET_URL_ENV",
    "CACHE_ENV",
    "game_from_env_id",
    "atari_env_ids",
    "check_env_id",
    "make_teacher_envs",
    "DopamineAtariEnvs",
    "DOPAMINE_ENV_KWARGS",
    "CLEANRL_ENV_KWARGS",
    "ATARI_SCORES",
    "random_score",
    "human_normalized_score",
    "teacher_normalized_score",
]


# ----------------------------------------------------------------------------
# The teacher network
# ----------------------------------------------------------------------------
class DopamineNatureDQN(nn.Module):
    """Dopamine's Nature DQN, parameter-compatible with its checkpoints.

    Input: uint8 ``(B, 4, 84, 84)`` (envpool's layout, oldest frame first).
    Output: Q-values ``(B, num_actions)``.  Dopamine uses SAME padding, so the
    flatten size is 11*11*64 = 7,744 (CleanRL's VALID network has 3,136).
    """

    num_actions: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Dopamine's network sees NHWC with channels = frames, oldest first.
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        # xavier_uniform as Dopamine's JAX DQN networks (matters only for a student built from this class).
        init = nn.initializers.xavier_uniform()
        x = nn.relu(nn.Conv(32, (8, 8), strides=(4, 4), padding="SAME", kernel_init=init, name="Conv_0")(x))
        x = nn.relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="SAME", kernel_init=init, name="Conv_1")(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="SAME", kernel_init=init, name="Conv_2")(x))
        x = x.reshape((x.shape[0], -1))  # H, W, C order, as Dopamine flattens
        x = nn.relu(nn.Dense(512, kernel_init=init, name="Dense_0")(x))
        return nn.Dense(self.num_actions, kernel_init=init, name="Dense_1")(x)


def expected_param_shapes(num_actions: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every parameter of :class:`DopamineNatureDQN`."""
    return {
        "Conv_0": {"kernel": (8, 8, 4, 32), "bias": (32,)},
        "Conv_1": {"kernel": (4, 4, 32, 64), "bias": (64,)},
        "Conv_2": {"kernel": (3, 3, 64, 64), "bias": (64,)},
        "Dense_0": {"kernel": (7744, 512), "bias": (512,)},
        "Dense_1": {"kernel": (512, num_actions), "bias": (num_actions,)},
    }


class CleanRLQNetwork(nn.Module):
    """CleanRL's ``dqn_atari_jax.py`` Q-network, parameter-compatible with its
    ``.cleanrl_model`` files (``flax.serialization.to_bytes`` of its params).

    Input: uint8 ``(B, 4, 84, 84)``, oldest frame first; output ``(B, num_actions)``.
    The Nature DQN layer sizes with VALID padding, so the flatten size is
    7*7*64 = 3,136; flax's default initialisers (only used if one trains it).
    """

    num_actions: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        for i, (features, size, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
            h = nn.relu(nn.Conv(features, (size, size), strides=(stride, stride), padding="VALID", name=f"Conv_{i}")(h))
        h = nn.relu(nn.Dense(512, name="Dense_0")(h.reshape((h.shape[0], -1))))
        return nn.Dense(self.num_actions, name="Dense_1")(h)


def cleanrl_param_shapes(num_actions: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every parameter of :class:`CleanRLQNetwork` (Dopamine's but for ``Dense_0``)."""
    return {**expected_param_shapes(num_actions), "Dense_0": {"kernel": (3136, 512), "bias": (512,)}}


# ----------------------------------------------------------------------------
# Finding and loading a teacher
# ----------------------------------------------------------------------------
_TF_TO_FLAX = {
    "Conv": "Conv_0",
    "Conv_1": "Conv_1",
    "Conv_2": "Conv_2",
    "fully_connected": "Dense_0",
    "fully_connected_1": "Dense_1",
}
_PRE_LINEN_TO_LINEN = {"Dense_3": "Dense_0", "Dense_4": "Dense_1"}


@dataclasses.dataclass
class TeacherCheckpoint:
    """A loaded teacher: where it came from, its parameters, and how to run it.

    ``q_values(params, obs)`` is the teacher's Q, whatever the teacher is; a script
    should use it (and ``env_kwargs``) rather than assume Dopamine's network.
    """

    path: Path
    """The file (JAX pickle, model file) or bundle prefix (TF) that was read."""
    kind: str
    """``"jax"`` (Dopamine's pickled ``ckpt.<N>``), ``"tf"`` (Dopamine's tensor bundle ``tf_ckpt-<N>``),
    ``"student"`` (a model saved by qdagger_dqn_atari_jax.py / qdagger_rainbow_atari_jax.py) or
    ``"cleanrl"`` (a CleanRL ``dqn_atari_jax.py`` model)."""
    iteration: int | None
    """Dopamine iteration of the checkpoint, if known (None for students and CleanRL models)."""
    naming: str
    """Variable naming: ``"linen"``, ``"pre-linen"``, ``"tf-weights/biases"``, ``"tf-kernel/bias"`` or ``"flax-msgpack"``."""
    params: dict
    """``{"params": {...}}`` (numpy arrays) for ``network``; :class:`DopamineNatureDQN`'s for Dopamine teachers."""
    variables: dict[str, tuple[tuple[int, ...], str]]
    """Every variable in the file: name -> (shape, dtype)."""
    network: nn.Module | None = None
    """The flax module the params belong to (default: :class:`DopamineNatureDQN` sized by the params)."""
    q_values: Callable[[Any, Any], jax.Array] | None = dataclasses.field(default=None, repr=False)
    """``q_values(params, obs)``: uint8 ``(B, 4, 84, 84)`` -> float32 ``(B, num_actions)``, pure (jit it or call it
    inside a jitted function). For a distributional (Rainbow) student: the expected Q over its atoms, without noise."""
    architecture: str = "dopamine-nature-dqn"
    """The network and the settings that decide its parameter shapes: ``"dopamine-nature-dqn"`` (Dopamine teachers and
    our DQN-Nature students: the same class), ``"dqn-impala"``, ``"rainbow-<nature|impala>-<atoms>[-dueling][-noisy]"``,
    ``"cleanrl-nature-dqn"``. Equal strings mean a student can start from these params (fine-tuning)."""
    student_args: dict | None = None
    """The ``args.json`` of the run that saved a student (all its flags), else None."""
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides for :func:`make_teacher_envs` that give the teacher the inputs it was trained on: ``{}`` for Dopamine
    teachers, the student's own env flags (``max_episode_steps``) for our students, :data:`CLEANRL_ENV_KWARGS` for CleanRL."""
    target_params: dict | None = None
    """The teacher's own target network (same layout as ``params``) where the checkpoint holds one (Dopamine's
    ``Target/`` variables or ``target_params``), else None: fine-tuning starts its target from it, as the reference's
    ReloadedDQNAgent.reload_checkpoint does."""

    def __post_init__(self) -> None:
        if self.network is None:
            self.network = DopamineNatureDQN(int(np.shape(self.params["params"]["Dense_1"]["bias"])[0]))
        if self.q_values is None:
            self.q_values = _plain_q_values(self.network)

    @property
    def num_actions(self) -> int:
        return int(self.network.num_actions)  # type: ignore[union-attr]


def _plain_q_values(network: nn.Module) -> Callable[[Any, Any], jax.Array]:
    """``q_values`` of a network whose output is Q itself."""

    def q_values(params: Any, obs: Any) -> jax.Array:
        return network.apply(params, obs).astype(jnp.float32)

    return q_values


def _resolve_checkpoint(source: Path, iteration: int | None) -> tuple[str, Path, int | None]:
    """Turn a user path into (kind, file or prefix, iteration)."""
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        kind, it = _pick_iteration((p.name for p in folder.iterdir()), str(folder), iteration, _tf_checkpoint_file_hint(folder))
        return kind, (folder / (f"tf_ckpt-{it}" if kind == "tf" else f"ckpt.{it}")), it
    prefix = _bundle_prefix(source)
    if prefix.with_name(prefix.name + ".index").is_file():
        m = re.search(r"-(\d+)$", prefix.name)
        return "tf", prefix, int(m[1]) if m else None
    if source.is_file():
        m = re.fullmatch(r"ckpt\.(\d+)(\.gz)?", source.name)
        return "jax", source, int(m[1]) if m else None
    raise CheckpointError(
        f"teacher checkpoint {source} does not exist; pass a Dopamine run folder (.../DQN_400/Breakout/1), a ckpt.<N> file, a tf_ckpt-<N> "
        f"prefix or a gs:// address, a run folder of our scripts (runs/<run_name>/), a {MODEL_SUFFIX} file or an hf:// address"
    )


def _tf_online_params(tensors: Mapping[str, np.ndarray], scope: str = "Online") -> tuple[dict, str]:
    """The params of one network scope of a Dopamine TF checkpoint (``Online`` or ``Target``), and its naming."""
    naming = None
    for w, b, label in (("weights", "biases", "tf-weights/biases"), ("kernel", "bias", "tf-kernel/bias")):
        if f"{scope}/Conv/{w}" in tensors:
            naming = (w, b, label)
    if naming is None:
        raise CheckpointError(f"the TF checkpoint has no {scope}/Conv/weights or {scope}/Conv/kernel: it is not a Dopamine DQN checkpoint")
    w, b, label = naming
    params = {}
    for tf_name, flax_name in _TF_TO_FLAX.items():
        try:
            params[flax_name] = {"kernel": tensors[f"{scope}/{tf_name}/{w}"], "bias": tensors[f"{scope}/{tf_name}/{b}"]}
        except KeyError as e:
            raise CheckpointError(f"the TF checkpoint lacks {e.args[0]}: it is not a Dopamine Nature DQN checkpoint") from None
    return {"params": params}, label


def _jax_online_params(data: Mapping, key: str = "online_params") -> tuple[dict, str]:
    """The params under ``key`` (``online_params`` or ``target_params``) of a Dopamine JAX checkpoint, and their naming."""
    if key not in data:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise CheckpointError(f"the checkpoint has no '{key}' (keys: {keys}): it is not a Dopamine JAX DQN checkpoint")
    online = data[key]
    naming = "linen"
    if isinstance(online, Mapping) and "params" in online:
        online = online["params"]
    if isinstance(online, Mapping) and any(k in online for k in _PRE_LINEN_TO_LINEN):
        naming = "pre-linen"
        online = {_PRE_LINEN_TO_LINEN.get(k, k): v for k, v in online.items()}
    if not isinstance(online, Mapping):
        raise CheckpointError(f"the checkpoint's {key} is a {type(online).__name__}, not a parameter dict")
    return {"params": {k: dict(v) for k, v in online.items()}}, naming


def _check_shapes(params: dict, where: str, num_actions: int | None) -> None:
    p = params["params"]
    if set(p) != set(expected_param_shapes(1)):
        raise CheckpointError(f"{where} has layers {sorted(p)}, not Dopamine's Nature DQN (Conv_0..2, Dense_0..1)")
    ckpt_actions = int(np.shape(p["Dense_1"]["bias"])[0]) if np.ndim(p["Dense_1"]["bias"]) == 1 else -1
    for layer, shapes in expected_param_shapes(ckpt_actions).items():
        for k, shape in shapes.items():
            got = tuple(np.shape(p[layer].get(k)))
            if got != shape:
                raise CheckpointError(f"{where}: {layer}/{k} has shape {got}, Dopamine's Nature DQN needs {shape}; this is not a DQN_400-style teacher")
            if np.asarray(p[layer][k]).dtype != np.float32:
                raise CheckpointError(f"{where}: {layer}/{k} is {np.asarray(p[layer][k]).dtype}, expected float32")
    _check_num_actions(ckpt_actions, num_actions)


def _check_num_actions(teacher_actions: int, num_actions: int | None, trained_on: str = "") -> None:
    """The one-line error when the teacher's action count is not the environment's."""
    if num_actions is not None and num_actions != teacher_actions:
        raise CheckpointError(
            f"the teacher has {teacher_actions} actions but the environment has {num_actions}: pass --env-id of the teacher's game "
            f"{trained_on}(these envs use each game's minimal action set, as Dopamine's protocol; a teacher trained with all 18 "
            f"actions cannot act in them)"
        )


def load_teacher(source: str | os.PathLike, num_actions: int | None = None, iteration: int | None = None, **download_kwargs: Any) -> TeacherCheckpoint:
    """Find, load and check a teacher; see :class:`TeacherCheckpoint` for what comes back.

    ``source`` is one of

    - a Dopamine DQN run: its folder (``.../DQN_400/Breakout/1``), its
      ``checkpoints/`` folder, a ``ckpt.<N>`` file, a ``tf_ckpt-<N>`` prefix (or
      its ``.index``), or a bucket address ``gs://rl_checkpoints/DQN_400/Breakout/1``
      (downloaded to the cache first; ``download_kwargs`` go to :func:`download_gs`);
      ``iteration`` picks the checkpoint (default: the latest complete one);
    - a run folder of qdagger_dqn_atari_jax.py / qdagger_rainbow_atari_jax.py saved
      with ``--save-model`` (``runs/<run_name>/``: ``args.json``,
      ``<exp_name>.cleanrl_model``, ``q_probe.npz``), or its model file: the network
      is rebuilt by the script's own ``make_student`` from ``args.json``, and the
      loaded params must reproduce the Q-values of ``q_probe.npz``;
    - a CleanRL ``dqn_atari_jax.py`` model (``<exp_name>.cleanrl_model``: flax
      msgpack), a local file or folder or ``hf://<owner>/<repo>[@<revision>]/<file>``
      (downloaded into the Hugging Face cache by :func:`download_hf`; ``download_kwargs``
      ``cache_dir`` and ``base_url`` become its ``cache_dir`` and ``endpoint``).

    A flax msgpack without ``args.json`` is recognised by its layers: CleanRL's
    network (``Dense_0`` kernel (3136, 512)) or Dopamine's Nature DQN ((7744, 512):
    a bare model of our DQN-Nature student).  ``num_actions``, if given, must be the
    teacher's action count.
    """
    src = str(source)
    if src.startswith("hf://"):
        hf_kwargs = {k: v for k, v in download_kwargs.items() if k not in ("progress", "include_replay")}
        source = download_hf(src, **hf_kwargs)
    elif src.startswith("gs://"):
        source = download_gs(src, iteration=iteration, **download_kwargs)
    path = Path(source).expanduser()
    flax_model = _flax_model_source(path)
    if flax_model is not None:
        model_file, run_args = flax_model
        where = src if src.startswith("hf://") else str(path)
        if iteration is not None:
            raise CheckpointError(f"{where} is a single saved model, not a Dopamine run: iterations do not apply; omit the iteration")
        return _load_flax_model(model_file, run_args, where, num_actions)
    kind, path, it = _resolve_checkpoint(path, iteration)
    target = None
    if kind == "tf":
        listing = list_tf_checkpoint(path)
        weights = [n for n in listing if n.startswith(("Online/", "Target/")) and "/Adam" not in n and "/RMSProp" not in n]
        tensors = read_tf_checkpoint(path, names=weights)
        params, naming = _tf_online_params(tensors)
        if any(n.startswith("Target/") for n in weights):
            target = _tf_online_params(tensors, "Target")[0]
    else:
        data = load_jax_checkpoint(path)
        params, naming = _jax_online_params(data)
        if "target_params" in data:
            target = _jax_online_params(data, "target_params")[0]
        listing = {}
        for layer, leaves in params["params"].items():
            for k, v in leaves.items():
                a = np.asarray(v)
                listing[f"online_params/{layer}/{k}"] = (a.shape, a.dtype.name)
        if it is None and isinstance(data.get("current_iteration"), (int, np.integer)):
            it = int(data["current_iteration"])
    as_numpy = lambda p: {"params": {layer: {k: np.asarray(v) for k, v in leaves.items()} for layer, leaves in p["params"].items()}}  # noqa: E731
    params = as_numpy(params)
    _check_shapes(params, str(path), num_actions)
    if target is not None:
        target = as_numpy(target)
        _check_shapes(target, f"{path} (target network)", num_actions)
    return TeacherCheckpoint(path=path, kind=kind, iteration=it, naming=naming, params=params, variables=listing, target_params=target)


def load_teacher_params(source: str | os.PathLike, num_actions: int | None = None, iteration: int | None = None, **download_kwargs: Any) -> dict:
    """The params of a teacher's network (see :func:`load_teacher`; :class:`DopamineNatureDQN`'s for a Dopamine
    teacher), already on the default JAX device."""
    return jax.device_put(load_teacher(source, num_actions, iteration, **download_kwargs).params)


# ----------------------------------------------------------------------------
# Earlier agents as teachers: our students' run folders, CleanRL models, the Hub
# ----------------------------------------------------------------------------
_STUDENT_SCRIPTS = {"qdagger_dqn_atari_jax": "dqn", "qdagger_rainbow_atari_jax": "rainbow"}
_PROBE_FILE = "q_probe.npz"
_PROBE_TOL = 1e-4
"""The reloaded params must give the probe's Q to this (times max(1, max |Q|))."""
_PROBE_TF32_TOL = 1e-2
"""Up to this (times max(1, max |Q|)) a difference is the arithmetic, not the params: JAX computes float32
convolutions and matmuls in TensorFloat-32 on recent NVIDIA GPUs, so a probe saved there differs from a
float32 CPU reload by about 1e-3 of the Q scale. Such a reload warns; a larger difference is an error."""


def _flat_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (dicts only; any other value is a leaf)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat_tree(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


def _msgpack_state(path: Path, where: str) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {where} ({e.strerror or e}); check the path and its permissions") from None
    try:
        state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise CheckpointError(
            f"{where} is not a readable flax msgpack model ({type(e).__name__}: {_one_line(e)}): the file is truncated or corrupt; "
            f"save or download it again"
        ) from None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{where} holds a msgpack {type(state).__name__}, not flax parameters; pass a model saved with flax.serialization.to_bytes(params)")
    return state


def _file_listing(state: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(np.shape(v)), np.asarray(v).dtype.name) for name, v in _flat_tree(state).items()}


def _student_script(args: Mapping, where: str) -> Any:
    """The training script that wrote a run (imported lazily: it imports this module)."""
    name = str(args.get("exp_name", ""))
    if name not in _STUDENT_SCRIPTS:  # a run with its own --exp-name: its flags tell the scripts apart
        name = "qdagger_rainbow_atari_jax" if "num_atoms" in args else "qdagger_dqn_atari_jax"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise TeacherError(f"cannot import {name} to rebuild the student of {where} ({_one_line(e)}); install what it needs (pip install -e .)") from None
    beside = Path(__file__).resolve().with_name(f"{name}.py")  # the scripts live next to this module
    if not beside.is_file():
        raise TeacherError(f"cannot import {name} to rebuild the student of {where}; run from the repository root (where {name}.py is) or put it on PYTHONPATH")
    spec = importlib.util.spec_from_file_location(name, beside)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        del sys.modules[name]
        raise TeacherError(f"cannot import {beside} to rebuild the student of {where} ({type(e).__name__}: {_one_line(e)})") from None
    return module


def _head_actions(state: Mapping, layer: str, leaf: str, per_action: int, where: str) -> int:
    try:
        size = int(np.shape(state["params"][layer][leaf])[-1])
    except (KeyError, TypeError, IndexError):
        layers = sorted(state.get("params", state)) if isinstance(state.get("params", state), Mapping) else []
        raise CheckpointError(
            f"{where} has no params/{layer}/{leaf} (layers: {', '.join(map(str, layers)) or 'none'}): the model does not match its "
            f"run's args.json; pass the run folder the model was saved in"
        ) from None
    if size % per_action:
        raise CheckpointError(f"{where}: params/{layer}/{leaf} has {size} outputs, not a multiple of num_atoms {per_action} from args.json; pass the run folder the model was saved in")
    return size // per_action


def _student_network(args: Mapping, state: Mapping, where: str) -> tuple[nn.Module, Callable, str]:
    """(network, q_values, architecture) of a student, built by its own script as it was trained."""
    module = _student_script(args, where)
    if _STUDENT_SCRIPTS.get(module.__name__) == "rainbow" or hasattr(module, "make_support"):
        fields = {f.name for f in dataclasses.fields(module.Args)}
        run_args = module.Args(**{k: v for k, v in args.items() if k in fields})
        head = "advantage" if run_args.dueling else "logits"
        A = _head_actions(state, head, "bias_mu" if run_args.noisy else "bias", int(run_args.num_atoms), where)
        net = module.make_student(run_args, A)
        support = jnp.asarray(module.make_support(run_args))
        expected_q = module.expected_q

        def q_values(params: Any, obs: Any) -> jax.Array:  # noise-free (key=None): the mean weights
            return expected_q(net.apply(params, obs), support).astype(jnp.float32)

        arch = f"rainbow-{run_args.network}-{run_args.num_atoms}" + ("-dueling" if run_args.dueling else "") + ("-noisy" if run_args.noisy else "")
        return net, q_values, arch
    network = str(args.get("network", "nature"))
    A = _head_actions(state, "Dense_1", "bias", 1, where)
    net = module.make_student(network, A)
    arch = "dopamine-nature-dqn" if network == "nature" else f"dqn-{network}"
    return net, _plain_q_values(net), arch


def _fit_params(state: Mapping, net: nn.Module, arch: str, where: str, fix: str) -> dict:
    """The params of ``net`` from a restored state dict, every name, shape and dtype checked."""
    template = jax.eval_shape(net.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 4, 84, 84), jnp.uint8))
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flat_tree(flax.core.unfreeze(template)).items()}
    got = _flat_tree(state)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        detail = "; ".join(x for x in (f"missing {', '.join(missing[:4])}" if missing else "", f"unexpected {', '.join(extra[:4])}" if extra else "") if x)
        raise CheckpointError(f"{where} does not fit the {arch} network ({detail}); {fix}")
    for name, (shape, dtype) in want.items():
        a = np.asarray(got[name])
        if a.shape != shape or a.dtype != dtype:
            raise CheckpointError(f"{where}: {name} is {a.dtype.name}{list(a.shape)}, the {arch} network needs {dtype.name}{list(shape)}; {fix}")
    restored = flax.serialization.from_state_dict(flax.core.unfreeze(template), dict(state))
    return jax.tree.map(np.array, restored)  # copies: writable, and not views pinning the file's bytes


def _check_probe(ckpt: TeacherCheckpoint, probe_file: Path) -> None:
    """The loaded params must reproduce the Q-values the script saved beside them."""
    try:
        with np.load(probe_file, allow_pickle=False) as z:
            obs, q_saved = np.asarray(z["obs"]), np.asarray(z["q"], np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # EOFError: empty; BadZipFile: truncated
        raise CheckpointError(f"{probe_file} is not a readable Q probe ({type(e).__name__}: {_one_line(e)}); restore it from the run or "
                              f"delete it to skip the check") from None
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[1:] != (4, 84, 84) or q_saved.shape != (obs.shape[0], ckpt.num_actions):
        raise CheckpointError(
            f"{probe_file} holds obs {obs.dtype.name}{list(obs.shape)} and Q {list(q_saved.shape)}, not uint8 [N, 4, 84, 84] and "
            f"[N, {ckpt.num_actions}]: it belongs to another model; restore it from the run or delete it to skip the check"
        )
    q = np.asarray(ckpt.q_values(ckpt.params, obs))  # type: ignore[misc]
    err = float(np.max(np.abs(q - q_saved), initial=0.0))
    if not np.isfinite(err):
        err = math.inf
    scale = max(1.0, float(np.max(np.abs(q_saved), initial=0.0)))
    if err <= _PROBE_TOL * scale:
        return
    if err <= _PROBE_TF32_TOL * scale:
        import warnings

        warnings.warn(f"{ckpt.path} reproduces {probe_file.name} only to {err:.2g} (max |Q| {scale:.3g}): reduced-precision (TF32) "
                      f"GPU arithmetic where the probe was saved, not different params", stacklevel=3)
        return
    raise CheckpointError(
        f"{ckpt.path} does not reproduce {probe_file} (max |dQ| = {err:.3g}, max |Q| = {scale:.3g}): the model file is corrupt or "
        f"belongs to another run than this args.json; copy the run folder again"
    )


def _load_flax_model(model_file: Path, run_args: dict | None, where: str, num_actions: int | None) -> TeacherCheckpoint:
    state = _msgpack_state(model_file, where)
    listing = _file_listing(state)
    if run_args is not None:
        net, q_values, arch = _student_network(run_args, state, where)
        fix = "pass the run folder the model was saved in, with its own args.json"
        params = _fit_params(state, net, arch, where, fix)
        env_kwargs = {k: run_args[k] for k in ("max_episode_steps",) if k in run_args}
        ckpt = TeacherCheckpoint(path=model_file, kind="student", iteration=None, naming="flax-msgpack", params=params, variables=listing,
                                 network=net, q_values=q_values, architecture=arch, student_args=dict(run_args), env_kwargs=env_kwargs)
        env_id = run_args.get("env_id")
        _check_num_actions(ckpt.num_actions, num_actions, f"(this student was trained on {env_id}) " if env_id else "")
        if (model_file.parent / _PROBE_FILE).is_file():
            _check_probe(ckpt, model_file.parent / _PROBE_FILE)
        return ckpt
    # No args.json: recognise the network by its layers.
    p = state.get("params")
    layers = p if isinstance(p, Mapping) else {}
    try:
        A = int(np.shape(layers["Dense_1"]["bias"])[0])
        dense0 = tuple(np.shape(layers["Dense_0"]["kernel"]))
    except (KeyError, TypeError, IndexError):
        A, dense0 = 0, None
    fix = ("pass a CleanRL dqn_atari_jax.py model (Dense_0 kernel (3136, 512)) or, for a run of qdagger_*_atari_jax.py, "
           "its run folder (runs/<run_name>/ with args.json)")
    if dense0 == (3136, 512):
        net, kind, arch, env_kwargs = CleanRLQNetwork(A), "cleanrl", "cleanrl-nature-dqn", dict(CLEANRL_ENV_KWARGS)
    elif dense0 == (7744, 512):
        net, kind, arch, env_kwargs = DopamineNatureDQN(A), "student", "dopamine-nature-dqn", {}
    else:
        found = ", ".join(sorted(map(str, layers or state))) or "none"
        raise CheckpointError(f"{where} is a flax model of an unknown network (layers: {found}; Dense_0 kernel {dense0}); {fix}")
    params = _fit_params(state, net, arch, where, fix)
    ckpt = TeacherCheckpoint(path=model_file, kind=kind, iteration=None, naming="flax-msgpack", params=params, variables=listing,
                             network=net, architecture=arch, env_kwargs=env_kwargs)
    _check_num_actions(ckpt.num_actions, num_actions)
    return ckpt


# ----------------------------------------------------------------------------
# Sharing a student on the Hub: --upload-model, `python teacher_utils.py upload`
# (it loads the run as a teacher first; the Hub's side is reincarnate/hub.py)
# ----------------------------------------------------------------------------
def upload_hf(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload a finished run of our scripts saved with ``--save-model`` to the Hub model repo ``repo_id`` (created if
    missing) in one commit, and return the repo's URL.

    The model is loaded first as a teacher would be (its network rebuilt from ``args.json``, its ``q_probe.npz``
    reproduced), so a broken model is never uploaded.  The commit holds the model, ``args.json``,
    ``q_probe.npz``, ``final_eval.json``, the TensorBoard event files, ``videos/final-eval.mp4`` (also as
    ``replay.mp4``, the video the Hub's model page plays), the script that trained it with ``teacher_utils.py`` and
    ``pyproject.toml``, and a model card.  A commit is all or nothing on the Hub: an upload that fails changes nothing.
    """
    run = Path(run_dir)
    if not (run / "args.json").is_file():
        raise HubError(f"{run} is not a run folder of the scripts (no args.json); pass runs/<run_name> of a run saved with --save-model")
    model, run_args = _flax_model_source(run)  # type: ignore[misc]  # a folder with args.json: refuses an interrupted run, a missing model
    load_teacher(run)  # raises if the params do not rebuild or do not reproduce the run's Q probe
    module = _student_script(run_args, str(run))
    script = module.__name__
    files: dict[str, Path] = {model.name: model, "args.json": run / "args.json"}
    for name in ("q_probe.npz", "final_eval.json"):
        if (run / name).is_file():
            files[name] = run / name
    files.update({f.name: f for f in sorted(run.glob("events.out.tfevents.*")) if f.is_file()})
    video = run / "videos" / "final-eval.mp4"
    if video.is_file():
        files["videos/final-eval.mp4"] = files["replay.mp4"] = video
    here = Path(__file__).resolve().parent
    for code in (Path(module.__file__).resolve(), here / "teacher_utils.py", here / "pyproject.toml"):
        if code.is_file():
            files[code.name] = code
    final = json.loads((run / "final_eval.json").read_text()) if "final_eval.json" in files else None
    retry = f"upload again with `python teacher_utils.py upload {run}`"
    api = _hub_api()
    from huggingface_hub import CommitOperationAdd

    with tempfile.TemporaryDirectory() as tmp:  # the card as a file: in-memory bytes would turn off the Hub's Xet uploads
        card = Path(tmp) / "README.md"
        card.write_text(_model_card(run_args, final, repo_id, model.name, script))
        files["README.md"] = card
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.create_commit(url.repo_id, [CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v)) for k, v in files.items()],
                              commit_message=f"{script} {run_args.get('method', 'qdagger')} seed {run_args['seed']}: run {run.name}")
        except KeyboardInterrupt:
            raise HubError(f"uploading {run} to the Hub repo {repo_id} was interrupted; {retry} (the run is intact; nothing was committed)") from None
        except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many kinds; the user needs one line
            raise _hub_failure(e, f"uploading {run} to the Hub repo {repo_id}", f"{retry} (the run is intact; nothing was committed)") from None
    return str(url)


# ----------------------------------------------------------------------------
# The teacher of a training run (what both scripts do with it before training)
# ----------------------------------------------------------------------------
def load_run_teacher(source: str | os.PathLike, num_actions: int, iteration: int | None = None, trained_with: Mapping | None = None,
                     run_dir: Path | None = None) -> TeacherCheckpoint:
    """:func:`load_teacher` for a training run; on --resume (``trained_with``: the identity its checkpoint recorded,
    :func:`teacher_identity`) it must be the teacher the run was trained with."""
    teacher = load_teacher(source, num_actions=num_actions, iteration=iteration)
    if trained_with and trained_with.get("digest") not in (None, params_digest(teacher.params)):
        raise TeacherError(f"the teacher at {source} is not the one {run_dir or 'this run'} was trained with (its parameters differ); pass that teacher")
    return teacher


def teacher_identity(source: str | os.PathLike, teacher: TeacherCheckpoint | None) -> dict:
    """What a run's checkpoints record of its teacher: where it came from and a hash of its parameters."""
    if teacher is None:
        return dict(digest=None)
    return dict(source=str(source), iteration=teacher.iteration, digest=params_digest(teacher.params))


def describe_teacher(teacher: TeacherCheckpoint) -> str:
    own_envs = f", its own envs: {teacher.env_kwargs}" if teacher.env_kwargs else ""
    return f"teacher: {teacher.kind} {teacher.architecture} {teacher.path} (iteration {teacher.iteration}, {teacher.num_actions} actions{own_envs})"


def load_run_dopamine_replay(source: str | os.PathLike, iteration: int | None, update_horizon: int, gamma: float, num_actions: int,
                             env_id: str) -> DopamineReplay:
    """The teacher's own Dopamine replay for a run's offline phase (``--teacher-data dopamine-replay``), checked against
    the run's game."""
    replay = load_dopamine_replay(source, iteration=iteration, update_horizon=update_horizon, gamma=gamma)
    print(f"teacher replay: {replay.path} (iteration {replay.iteration}, {replay.capacity} rows, "
          f"{len(replay.valid_indices())} valid transitions for n = {update_horizon})")
    if replay.actions.max(initial=0) >= num_actions or replay.actions.min(initial=0) < 0:
        raise CheckpointError(f"the teacher replay in {replay.path} has actions up to {replay.actions.max()} but {env_id} has {num_actions}: "
                              f"it belongs to another game; pass that game's --env-id or --teacher-data rollout")
    return replay


class RunTeacher(NamedTuple):
    """What a training run takes from its teacher: the loaded checkpoint (None without one: tabula rasa), its Q
    function and its params on the device, and the teacher data to build: its own Dopamine replay (loaded now if the run
    has yet to build the data) and/or rollout_steps agent steps of roll-outs."""

    checkpoint: TeacherCheckpoint | None
    q_fn: Callable | None
    params: Any
    dopamine: bool
    dopamine_replay: DopamineReplay | None
    rollout_steps: int


def prepare_run_teacher(run: Any, num_actions: int, need_data: bool, device: Any) -> RunTeacher:
    """A training run's teacher (``run``: reincarnate.run.Run): --teacher-checkpoint or the game's DQN_400 agent,
    loaded and checked (on --resume: the one the run was trained with), and its data as --teacher-data asks."""
    args = run.args
    if args.method == "tabula-rasa":
        print(f"teacher: none (--method {args.method})")
        run.info["teacher"] = teacher_identity("", None)
        return RunTeacher(None, None, None, False, None, 0)
    source = args.teacher_checkpoint or f"gs://rl_checkpoints/DQN_400/{game_from_env_id(args.env_id)}/1"
    teacher = load_run_teacher(source, num_actions, args.teacher_iteration, run.info.get("teacher"), run.dir)
    print(describe_teacher(teacher))
    run.info["teacher"] = teacher_identity(source, teacher)
    dopamine = need_data and args.teacher_data in ("dopamine-replay", "both")
    replay = None
    if dopamine and (run.phase == "teacher_eval" or (run.phase == "collect" and not run.progress.get("collected"))):
        replay = load_run_dopamine_replay(source, teacher.iteration, args.n_step, args.gamma, num_actions, args.env_id)
        run.info["dopamine_rows"] = replay.capacity
    rollout_steps = args.teacher_steps if need_data and args.teacher_data in ("rollout", "both") else 0
    return RunTeacher(teacher, teacher.q_values, jax.device_put(teacher.params, device), dopamine, replay, rollout_steps)


def student_from_teacher(teacher: TeacherCheckpoint, student_params: Any, student_q: Callable, student: str, fix: str) -> tuple[Any, Any]:
    """Fine-tuning (--init-from-teacher): the student's params and its target network's, as the teacher's own online
    and target networks (ReloadedDQNAgent.reload_checkpoint; the online weights where the checkpoint holds no target).
    The teacher must have the student's architecture (``student``: the student's description, ``fix``: what to do)."""
    shapes = lambda tree: jax.tree.map(np.shape, flax.core.unfreeze(tree))  # noqa: E731
    if shapes(teacher.params) != shapes(student_params):
        raise CheckpointError(f"--init-from-teacher (--method finetune) needs a teacher with the student's architecture; the teacher is "
                              f"{teacher.architecture}, {student}: {fix}")
    params = jax.tree.map(jnp.array, teacher.params)
    target = jax.tree.map(jnp.array, teacher.target_params or teacher.params)
    probe = np.random.default_rng(0).integers(0, 256, (8, 4, 84, 84), np.uint8)
    gap = float(jnp.abs(student_q(params, probe) - teacher.q_values(teacher.params, probe)).max())
    print(f"student initialised from the teacher: max |Q_student - Q_teacher| on 8 states = {gap:g}; its target network from the "
          f"teacher's {'target network' if teacher.target_params else 'weights (the teacher has no target network)'}")
    return params, target


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Download:
    """Download a teacher checkpoint from the rl_checkpoints bucket."""

    game: tyro.conf.Positional[str]
    """Game in the bucket's CamelCase (Breakout, SpaceInvaders) or an envpool id (Breakout-v5)."""
    run: int = 1
    """Run number under DQN_400/<Game>/ (the bucket holds several seeds)."""
    iteration: int | None = None
    """Dopamine iteration to fetch; default: the latest complete one."""
    cache_dir: str | None = None
    """Where files go; default $REINCARNATE_CACHE or ~/.cache/reincarnate."""
    include_replay: bool = False
    """Also fetch the teacher's replay buffer for that iteration (several GB)."""
    base_url: str | None = None
    """Bucket endpoint (a mirror); default $REINCARNATE_BUCKET_URL or https://storage.googleapis.com."""
    agent: str = "DQN_400"
    """Agent folder in the bucket."""


@dataclasses.dataclass
class Inspect:
    """Show what a teacher holds: kind, architecture, env settings, iteration, variables, actions."""

    path: tyro.conf.Positional[str]
    """A Dopamine run folder, its checkpoints/ folder, a ckpt.<N> file, a tf_ckpt-<N> prefix or a gs:// address;
    a run folder of our scripts (runs/<run_name>/); a .cleanrl_model file or an hf://<owner>/<repo>/<file> address."""
    iteration: int | None = None
    """Iteration to inspect; default: the latest complete one."""


@dataclasses.dataclass
class Upload:
    """Upload a finished run saved with --save-model to the Hugging Face Hub (what --upload-model does at a run's end)."""

    run: tyro.conf.Positional[str]
    """The run folder (runs/<run_name>/)."""
    hf_entity: str = ""
    """The Hub user or organization to upload to; default the logged-in user."""
    repo_id: str | None = None
    """The whole repo id (owner/name) instead; default {hf_entity}/{env_id}-{exp_name}-{method}-seed{seed}."""
    private: bool = False
    """Create the repo private (an existing repo keeps its visibility)."""


def _cli_upload(cmd: Upload) -> None:
    run = Path(cmd.run)
    if not (run / "args.json").is_file() and (Path("runs") / cmd.run / "args.json").is_file():
        run = Path("runs") / cmd.run
    if not (run / "args.json").is_file():
        raise HubError(f"{cmd.run} is not a run folder of the scripts (no args.json); pass runs/<run_name> of a run saved with --save-model")
    namespace = check_hub_login(cmd.hf_entity)  # the token, before the model is loaded and hashed
    repo_id = cmd.repo_id or f"{namespace}/{hub_repo_name(_read_run_args(run))}"
    print(f"uploaded {run} to {upload_hf(run, repo_id, private=cmd.private)}")


def _cli_download(cmd: Download) -> None:
    path = download_teacher(cmd.game, cmd.run, cmd.iteration, cmd.cache_dir, base_url=cmd.base_url, include_replay=cmd.include_replay, agent=cmd.agent)
    t = load_teacher(path)
    print(f"{path}: {t.kind} checkpoint, iteration {t.iteration}, {t.num_actions} actions")


def _cli_inspect(cmd: Inspect) -> None:
    t = load_teacher(cmd.path, iteration=cmd.iteration)
    print(f"path:        {t.path}")
    print(f"kind:        {t.kind} ({t.naming})")
    print(f"architecture: {t.architecture}")
    print(f"iteration:   {t.iteration}")
    print(f"num_actions: {t.num_actions}")
    overrides = ", ".join(f"{k}={v!r}" for k, v in t.env_kwargs.items())
    print(f"env settings: Dopamine's protocol{' with ' + overrides if overrides else ''} (make_teacher_envs(..., **env_kwargs))")
    if t.student_args is not None:
        a = t.student_args
        print(f"trained by:  {a.get('exp_name')} on {a.get('env_id')} (method {a.get('method', '?')}, seed {a.get('seed', '?')})")
    print(f"network ({type(t.network).__name__} params):")
    for name, v in _flat_tree(t.params.get("params", t.params)).items():
        layer, _, k = name.rpartition("/")
        print(f"  {layer}/{k:<7} {str(tuple(np.shape(v))):<18} {np.asarray(v).dtype}")
    print(f"variables in file ({len(t.variables)}):")
    for name, (shape, dtype) in sorted(t.variables.items()):
        print(f"  {name:<48} {str(tuple(shape)):<18} {dtype}")


def main(argv: Sequence[str] | None = None) -> int:
    cmd = tyro.extras.subcommand_cli_from_dict({"download": Download, "inspect": Inspect, "upload": Upload}, args=argv)  # type: ignore[arg-type]
    try:
        {Download: _cli_download, Inspect: _cli_inspect, Upload: _cli_upload}[type(cmd)](cmd)
    except TeacherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial downloads are kept as *.part and resume on the next run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # The training scripts (imported to rebuild a student teacher) `import teacher_utils`: let them find this
    # module rather than execute a second copy with its own classes.
    sys.modules.setdefault("teacher_utils", sys.modules[__name__])
    sys.exit(main())
