"""Everything the QDagger scripts share about teachers.

A *teacher* is the prior computation that Reincarnating RL (Agarwal et al.,
NeurIPS 2022) reuses: by default a Dopamine DQN agent from the public
``rl_checkpoints`` bucket (``DQN_400/<Game>/<run>/``), and also any earlier
agent -- a student saved by our own scripts (``runs/<run_name>/``, chained
reincarnation) or a CleanRL ``dqn_atari_jax.py`` model (a local file or
``hf://<owner>/<repo>/<file>`` on the Hugging Face Hub).  This module reads
those files with numpy and flax only -- no TensorFlow, no Dopamine -- and gives
the teacher the exact inputs it was trained on.

Public API
----------
- :class:`DopamineNatureDQN` -- the teacher network (flax), envpool layout in.
- :class:`CleanRLQNetwork` -- CleanRL's ``dqn_atari_jax.py`` Q-network (VALID
  padding), for CleanRL teachers.
- :func:`read_tf_checkpoint` -- pure-Python TensorFlow tensor-bundle reader.
- :func:`load_jax_checkpoint` -- restricted (safe) unpickler for Dopamine's
  ``ckpt.<N>`` JAX checkpoints.
- :func:`load_teacher` / :func:`load_teacher_params` -- find, load and check
  a teacher (:class:`TeacherCheckpoint`: params, network, ``q_values``,
  architecture, env settings) from a Dopamine run folder, checkpoint file or
  ``gs://`` address, a run folder of our scripts, or a CleanRL model file
  (local or ``hf://``, :func:`download_hf`).
- :func:`download_teacher` / :func:`download_gs` -- resumable, verified
  download from the bucket (or a mirror: ``REINCARNATE_BUCKET_URL``).
- :func:`load_dopamine_replay` -- the teacher's own replay (Dopamine
  ``OutOfGraphReplayBuffer`` files), streamed into one frame array, with
  Dopamine's valid indices and n-step transitions (:class:`DopamineReplay`).
- :func:`make_teacher_envs` -- envpool Atari on Dopamine's protocol.
- :func:`upload_hf` / :func:`check_hub_login` -- share a finished student on
  the Hub (``--upload-model``), where ``hf://`` loads it as a teacher.
- ``python teacher_utils.py download Breakout`` / ``inspect PATH`` / ``upload runs/<run_name>``.

Every error a user can cause is a :class:`TeacherError` with a one-line message
that names the problem and the fix.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import difflib
import errno
import hashlib
import http.client
import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import flax.serialization
import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import tyro

__all__ = [
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
# Errors
# ----------------------------------------------------------------------------
class TeacherError(RuntimeError):
    """A problem with a teacher the user can fix; the message is one line."""


class CheckpointError(TeacherError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the network."""


class DownloadError(TeacherError):
    """The bucket (or mirror) could not deliver a verified file."""


class EnvIdError(TeacherError, ValueError):
    """An env id envpool does not know."""


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
# crc32c (compiled, via google-crc32c)
# ----------------------------------------------------------------------------
_CRC_MASK_DELTA = 0xA282EAD8


def _masked_crc32c(data: bytes | np.ndarray) -> int:
    """LevelDB/TensorFlow's masked crc32c (Castagnoli)."""
    if not isinstance(data, bytes):  # the C extension only takes bytes
        data = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# ----------------------------------------------------------------------------
# TensorFlow tensor-bundle reader (no TensorFlow)
# ----------------------------------------------------------------------------
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked crc32c

# TensorFlow DataType enum -> numpy dtype.  Anything else (strings, resources,
# variants, complex) is refused: a Q-network never stores them.
_TF_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(jnp.bfloat16),
    17: np.dtype(np.uint16),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
_TF_DTYPE_NAMES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """Yield ``(field_number, wire_type, value)`` of a protobuf message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = buf[pos : pos + n]
            pos += n
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("protobuf field runs past the end of its message")
        yield field, wire, value


@dataclasses.dataclass(frozen=True)
class _BundleEntry:
    name: str
    dtype_enum: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool


def _parse_bundle_entry(name: str, value: bytes) -> _BundleEntry:
    dtype = shard = offset = size = 0
    crc: int | None = None
    shape: list[int] = []
    sliced = False
    for field, _, v in _proto_fields(value):
        if field == 1:
            dtype = v
        elif field == 2:  # TensorShapeProto
            for f2, _, dim in _proto_fields(v):
                if f2 == 2:  # Dim
                    size_ = 0
                    for f3, _, dv in _proto_fields(dim):
                        if f3 == 1:
                            size_ = dv - (1 << 64) if dv >= 1 << 63 else dv
                    shape.append(size_)
        elif field == 3:
            shard = v
        elif field == 4:
            offset = v
        elif field == 5:
            size = v
        elif field == 6:
            crc = struct.unpack("<I", v)[0]
        elif field == 7:
            sliced = True
    return _BundleEntry(name, dtype, tuple(shape), shard, offset, size, crc, sliced)


class _TableReader:
    """Reads the LevelDB-style table in a bundle's ``.index`` file."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = path.read_bytes()
        if len(self.buf) < _FOOTER_LEN:
            raise CheckpointError(f"{path} is truncated ({len(self.buf)} bytes, shorter than the 48-byte footer); download it again")
        footer = self.buf[-_FOOTER_LEN:]
        (magic,) = struct.unpack("<Q", footer[-8:])
        if magic != _TABLE_MAGIC:
            raise CheckpointError(f"{path} is not a TensorFlow checkpoint index (bad footer magic {magic:#x}); it is truncated or another file")
        try:
            _, pos = _varint(footer, 0)  # the metaindex handle is unused
            _, pos = _varint(footer, pos)
            index_offset, pos = _varint(footer, pos)
            index_size, _ = _varint(footer, pos)
            self.index_handle = (index_offset, index_size)
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt footer ({e}); download it again") from None

    def block(self, offset: int, size: int) -> bytes:
        end = offset + size + _BLOCK_TRAILER_LEN
        if end > len(self.buf) - _FOOTER_LEN:
            raise CheckpointError(f"{self.path} is truncated: a block at byte {offset} ends past the data; download it again")
        contents = self.buf[offset : offset + size]
        ctype = self.buf[offset + size]
        (stored_crc,) = struct.unpack("<I", self.buf[offset + size + 1 : end])
        if _masked_crc32c(self.buf[offset : offset + size + 1]) != stored_crc:
            raise CheckpointError(f"{self.path} is corrupt: crc32c mismatch in the block at byte {offset}; download it again")
        if ctype == 1:
            raise CheckpointError(f"{self.path} uses snappy-compressed blocks, which this reader does not support; re-save it with a recent TensorFlow")
        if ctype != 0:
            raise CheckpointError(f"{self.path} has a block with unknown compression type {ctype}; it is corrupt or not a checkpoint index")
        return contents

    @staticmethod
    def entries(block: bytes) -> Iterable[tuple[bytes, bytes]]:
        (num_restarts,) = struct.unpack("<I", block[-4:])
        limit = len(block) - 4 - 4 * num_restarts
        if limit < 0:
            raise ValueError("restart array larger than the block")
        pos, key = 0, b""
        while pos < limit:
            shared, pos = _varint(block, pos)
            non_shared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            key = key[:shared] + block[pos : pos + non_shared]
            pos += non_shared
            value = block[pos : pos + value_len]
            pos += value_len
            if pos > limit:
                raise ValueError("entry runs past the end of its block")
            yield key, value

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        try:
            index = self.block(*self.index_handle)
            for _, handle in self.entries(index):
                off, p = _varint(handle, 0)
                size, _ = _varint(handle, p)
                yield from self.entries(self.block(off, size))
        except ValueError as e:
            raise CheckpointError(f"{self.path} is corrupt ({e}); download it again") from None


def _bundle_prefix(prefix: str | os.PathLike) -> Path:
    p = str(prefix)
    for suffix in (".index", ".meta"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    p = re.sub(r"\.data-\d{5}-of-\d{5}$", "", p)
    return Path(p)


def _read_bundle_index(prefix: Path) -> tuple[int, dict[str, _BundleEntry]]:
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.is_file():
        raise CheckpointError(f"no TensorFlow checkpoint at {prefix} ({index_path.name} is missing); pass the prefix, e.g. .../checkpoints/tf_ckpt-199")
    table = _TableReader(index_path)
    num_shards, entries = 1, {}
    for key, value in table.items():
        if key == b"":  # BundleHeaderProto
            try:
                for field, _, v in _proto_fields(value):
                    if field == 1:
                        num_shards = v
                    elif field == 2 and v != 0:
                        raise CheckpointError(f"{index_path} was written big-endian, which this reader does not support")
            except ValueError as e:
                raise CheckpointError(f"{index_path} has a corrupt header ({e}); download it again") from None
            continue
        name = key.decode("utf-8", "replace")
        try:
            entries[name] = _parse_bundle_entry(name, value)
        except ValueError as e:
            raise CheckpointError(f"{index_path} has a corrupt entry for {name!r} ({e}); download it again") from None
    return num_shards, entries


def list_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype_name)}`` of a tensor bundle, reading only the index."""
    _, entries = _read_bundle_index(_bundle_prefix(prefix))
    out = {}
    for name, e in entries.items():
        dt = _TF_DTYPES.get(e.dtype_enum)
        out[name] = (e.shape, dt.name if dt is not None else _TF_DTYPE_NAMES.get(e.dtype_enum, f"dtype#{e.dtype_enum}"))
    return out


def read_tf_checkpoint(prefix: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read a TensorFlow tensor bundle (``<prefix>.index`` + ``.data-*``).

    Every block and tensor is checked against its crc32c.  ``names`` restricts
    the read to those variables (the others are never touched).  Returns
    read-only C-ordered numpy arrays (views of the bytes read, no copy),
    bit-exact copies of what TensorFlow wrote.
    """
    prefix = _bundle_prefix(prefix)
    num_shards, entries = _read_bundle_index(prefix)
    if names is not None:
        wanted = list(names)
        missing = [n for n in wanted if n not in entries]
        if missing:
            raise CheckpointError(f"{prefix} has no variable {missing[0]!r}; `python teacher_utils.py inspect {prefix}` lists what it has")
        entries = {n: entries[n] for n in wanted}
    out: dict[str, np.ndarray] = {}
    files: dict[int, Any] = {}
    try:
        for name, e in sorted(entries.items(), key=lambda kv: (kv[1].shard, kv[1].offset)):
            if e.sliced:
                raise CheckpointError(f"{prefix}: variable {name!r} is partitioned (sliced), which this reader does not support")
            dtype = _TF_DTYPES.get(e.dtype_enum)
            if dtype is None:
                kind = _TF_DTYPE_NAMES.get(e.dtype_enum, f"enum {e.dtype_enum}")
                raise CheckpointError(f"{prefix}: variable {name!r} has unsupported dtype {kind}; only numeric tensors can be read (pass names= to skip it)")
            count = int(np.prod(e.shape, dtype=np.int64))
            if count * dtype.itemsize != e.size:
                raise CheckpointError(f"{prefix}: variable {name!r} has {e.size} bytes but shape {e.shape} of {dtype.name} needs {count * dtype.itemsize}; the index is corrupt")
            if e.shard not in files:
                data_path = prefix.with_name(f"{prefix.name}.data-{e.shard:05d}-of-{num_shards:05d}")
                if not data_path.is_file():
                    raise CheckpointError(f"{data_path} is missing; download the whole checkpoint (index and data files)")
                files[e.shard] = open(data_path, "rb")
            f = files[e.shard]
            f.seek(e.offset)
            raw = f.read(e.size)
            if len(raw) != e.size:
                raise CheckpointError(f"{f.name} is truncated: variable {name!r} ends past the end of the file; download it again")
            if e.crc32c is not None and _masked_crc32c(raw) != e.crc32c:
                raise CheckpointError(f"{f.name} is corrupt: crc32c mismatch in variable {name!r}; download it again")
            out[name] = np.frombuffer(raw, dtype=dtype).reshape(e.shape)  # no copy
    finally:
        for f in files.values():
            f.close()
    return out


# ----------------------------------------------------------------------------
# Dopamine JAX checkpoints: a restricted unpickler
# ----------------------------------------------------------------------------
def _array_from_numpy_reduce(fun: Any, args: tuple, arr_state: tuple, aval_state: Any = None) -> np.ndarray:
    """Stands in for jax's array reconstructors: the numpy value, nothing else."""
    value = fun(*args)
    if not isinstance(value, np.ndarray):
        raise pickle.UnpicklingError("jax array reconstruction did not start from a numpy array")
    value.__setstate__(arr_state)
    return value


def _frozen_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


class _DataRecord(tuple):
    """Stands in for optimizer-state classes (optax namedtuples, flax.optim
    records): keeps the fields as a tuple, and any state as ``.state``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_DataRecord":
        return tuple.__new__(cls, args + tuple(kwargs.values()))

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("jax._src.array", "_reconstruct_array"): _array_from_numpy_reduce,
    ("jax._src.device_array", "reconstruct_device_array"): _array_from_numpy_reduce,
    ("flax.core.frozen_dict", "FrozenDict"): _frozen_dict,
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}
# numpy >= 1.25 pickles dtypes through their numpy.dtypes classes.
for _name in dir(np.dtypes) if hasattr(np, "dtypes") else ():
    if _name.endswith("DType"):
        _SAFE_GLOBALS[("numpy.dtypes", _name)] = getattr(np.dtypes, _name)
# Optimizer states only carry arrays; their classes are replaced by _DataRecord
# (never imported), so an optax or flax.optim version mismatch cannot matter.
_RECORD_MODULES = ("optax.", "flax.optim.", "flax.training.train_state")


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for _codecs.encode, which protocol-2 pickles call as encode(text, 'latin1')."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module.startswith(_RECORD_MODULES) and name[:1].isupper():
            return _DataRecord
        if module == "_codecs" and name == "encode":  # how protocol-2 pickles store bytes
            return _latin1_bytes
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_jax_checkpoint(path: str | os.PathLike) -> dict:
    """Load a Dopamine ``ckpt.<N>`` pickle without running any code in it.

    Only numpy arrays/dtypes, jax array reconstructors (turned into numpy
    arrays), ``FrozenDict`` (turned into ``dict``) and optimizer-state records
    (turned into tuples) are allowed; any other global -- ``os.system``,
    ``builtins.eval``, ... -- aborts the load with :class:`CheckpointError`.
    Gzipped files (``ckpt.<N>.gz``) are read transparently.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a Dopamine run folder, its checkpoints/ folder or a ckpt.<N> file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise CheckpointError(f"{path} is a corrupt or truncated gzip file ({e}); download it again") from None
    try:
        data = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if re.fullmatch(r"[\w.]+\.\w+", msg):
            raise CheckpointError(
                f"refusing to load {path}: it references {msg}, which a Dopamine checkpoint never contains (a pickle can run code; only numpy/jax/flax/optax data is allowed)"
            ) from None
        raise CheckpointError(f"{path} is not a valid pickle ({msg}); it is corrupt or truncated, download it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a Dopamine checkpoint dict")
    return data


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
_SENTINEL = "sentinel_checkpoint_complete."


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


def _checkpoint_iterations(names: Iterable[str]) -> dict[str, set[int]]:
    """Classify the basenames of a ``checkpoints/`` folder (or bucket listing)."""
    found: dict[str, set[int]] = {"sentinel": set(), "jax": set(), "tf_index": set(), "tf_data": set()}
    for n in names:
        if m := re.fullmatch(r"sentinel_checkpoint_complete\.(\d+)", n):
            found["sentinel"].add(int(m[1]))
        elif m := re.fullmatch(r"ckpt\.(\d+)", n):
            found["jax"].add(int(m[1]))
        elif m := re.fullmatch(r"tf_ckpt-(\d+)\.index", n):
            found["tf_index"].add(int(m[1]))
        elif m := re.fullmatch(r"tf_ckpt-(\d+)\.data-00000-of-(\d+)", n):
            found["tf_data"].add(int(m[1]))
    return found


def _pick_iteration(names: Iterable[str], where: str, iteration: int | None, checkpoint_file_hint: int | None = None) -> tuple[str, int]:
    """Decide the checkpoint kind and the iteration to load from file names.

    TF bundles win over pickles (a TF agent's ``ckpt.<N>`` holds no weights).
    Latest complete iteration = the largest N with its files and, where the
    run writes sentinels, its ``sentinel_checkpoint_complete.<N>``.
    """
    found = _checkpoint_iterations(names)
    if found["tf_index"] or found["tf_data"]:
        kind, complete = "tf", found["tf_index"] & found["tf_data"]
        if found["sentinel"]:  # Dopamine writes the sentinel after the bundle: it is authoritative
            complete = complete & found["sentinel"]
    elif found["jax"]:
        kind, complete = "jax", found["jax"] & found["sentinel"]
    else:
        raise CheckpointError(f"no Dopamine checkpoint in {where} (expected ckpt.<N> or tf_ckpt-<N>.index files); pass a run folder such as .../DQN_400/Breakout/1")
    if iteration is not None:
        if iteration not in complete:
            listing = ", ".join(map(str, sorted(complete))) or "none"
            raise CheckpointError(f"iteration {iteration} is not in {where} (complete {kind} checkpoints: {listing}); pass one of those or omit the iteration")
        return kind, iteration
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {where}: files of an unfinished save (no sentinel_checkpoint_complete.<N>); pass a checkpoint file directly to load it anyway")
    if kind == "tf" and not found["sentinel"] and checkpoint_file_hint in complete:
        return kind, int(checkpoint_file_hint)  # type: ignore[arg-type]
    return kind, max(complete)


def _tf_checkpoint_file_hint(folder: Path) -> int | None:
    """Iteration named by TensorFlow's ``checkpoint`` text file, if any."""
    f = folder / "checkpoint"
    if not f.is_file():
        return None
    m = re.search(r'model_checkpoint_path:\s*"([^"]*)"', f.read_text(errors="replace"))
    if m and (m2 := re.search(r"tf_ckpt-(\d+)$", m[1].replace("\\", "/"))):
        return int(m2[1])
    return None


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
            f"the teacher has {teacher_actions} actions but the environment has {num_actions}: use the env id of the teacher's game "
            f"{trained_on}(its minimal action set), or full_action_space=True if the teacher was trained with all 18 actions"
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
MODEL_SUFFIX = ".cleanrl_model"
_STUDENT_SCRIPTS = {"qdagger_dqn_atari_jax": "dqn", "qdagger_rainbow_atari_jax": "rainbow"}
_PROBE_FILE = "q_probe.npz"
_PROBE_TOL = 1e-4
"""The reloaded params must give the probe's Q to this (times max(1, max |Q|))."""
_PROBE_TF32_TOL = 1e-2
"""Up to this (times max(1, max |Q|)) a difference is the arithmetic, not the params: JAX computes float32
convolutions and matmuls in TensorFloat-32 on recent NVIDIA GPUs, so a probe saved there differs from a
float32 CPU reload by about 1e-3 of the Q scale. Such a reload warns; a larger difference is an error."""

CLEANRL_ENV_KWARGS: dict[str, Any] = dict(
    repeat_action_probability=0.0,  # NoFrameskip-v4: no sticky actions
    noop_max=30,  # NoopResetEnv(noop_max=30)
    use_fire_reset=True,  # FireResetEnv on games with FIRE
    episodic_life=False,  # see below
    zero_stack_start=False,  # gym's FrameStack repeats the reset frame
)
"""What CleanRL's ``dqn_atari_jax.py`` agents were trained on, as :func:`make_teacher_envs` overrides.

CleanRL wraps ``<Game>NoFrameskip-v4`` (no sticky actions, minimal action set) in
up-to-30 no-op starts, max-and-skip 4, life-loss terminals, FIRE on reset, reward
clipping, an INTER_AREA resize to 84x84, grayscale and a 4-frame stack whose
older slots repeat the reset frame.  Its life-loss terminals only shape its
training targets (it records and reports whole-game returns, counted before that
wrapper), so evaluations and roll-outs here play whole games: ``episodic_life``
stays False.  The episode cap is left to the caller (``max_episode_steps``)."""


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _flat_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (dicts only; any other value is a leaf)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat_tree(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


def _is_msgpack_model(path: Path) -> bool:
    """A model file: named ``*.cleanrl_model``, or a file that starts as a msgpack map (flax's
    ``to_bytes``).  A pickle's first byte is 0x80 followed by its protocol, never a map of >= 1 entries."""
    if path.name.endswith(MODEL_SUFFIX):
        return True
    if re.fullmatch(r"tf_ckpt-\d+\.(index|data-\d+-of-\d+)|ckpt\.\d+(\.gz)?", path.name):
        return False  # Dopamine's names: a tensor-data file may start with any byte
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError:
        return False
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _read_run_args(folder: Path) -> dict:
    f = folder / "args.json"
    try:
        args = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not readable JSON ({_one_line(e)}); restore the args.json the script wrote into that run folder") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{f} holds a JSON {type(args).__name__}, not the script's flags; restore the args.json the script wrote")
    return args


def _unfinished_phase(folder: Path) -> str | None:
    """The phase of the newest complete resume checkpoint of one of our run folders, unless the run finished.

    The scripts save the model on SIGINT/SIGTERM too, so a model file alone does not mean a finished run; its last
    checkpoint does (phase "done").  Only meta.json is read: the crcs matter to --resume, not to this question.
    """
    root = folder / "checkpoints"
    if not root.is_dir():
        return None  # --checkpoint-frequency 0 and never interrupted: the model is the finished run's
    for ckpt in sorted((p for p in root.glob("ckpt-*") if (p / CHECKPOINT_SENTINEL).is_file()), reverse=True):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # as latest_checkpoint does: a damaged one does not count, the previous one does
        phase = meta.get("phase") if isinstance(meta, dict) else None
        # A finished run always ends with a "done" checkpoint once it has a checkpoints folder (the scripts force it
        # after an interrupted run with --checkpoint-frequency 0).
        return None if not isinstance(phase, str) or phase == "done" else phase
    return None


def _flax_model_source(path: Path) -> tuple[Path, dict | None] | None:
    """(model file, args.json of its run or None) when ``path`` is a flax model rather than a Dopamine checkpoint."""
    if path.is_dir():
        if (path / "args.json").is_file():  # a run folder of our scripts (it may also hold resume checkpoints/)
            args = _read_run_args(path)
            exp = str(args.get("exp_name", ""))
            model = path / f"{exp}{MODEL_SUFFIX}"
            if not model.is_file():
                others = sorted(path.glob(f"*{MODEL_SUFFIX}"))
                if len(others) != 1:
                    raise CheckpointError(
                        f"run folder {path} has no {exp}{MODEL_SUFFIX}: the run was started without --save-model, or is still running, or "
                        f"was killed before it could save; pass a run saved with --save-model, or a model file"
                    )
                model = others[0]
            phase = _unfinished_phase(path)
            if phase is not None:
                raise CheckpointError(
                    f"run folder {path} holds the model of a run interrupted in phase {phase}; resume it with --resume to finish it, "
                    f"or pass the model file {model} itself to use the unfinished params"
                )
            return model, args
        models = sorted(path.glob(f"*{MODEL_SUFFIX}"))
        dopamine = (path / "checkpoints").is_dir() or any(re.fullmatch(r"(tf_)?ckpt[.-]\d+.*", p.name) for p in path.iterdir())
        if len(models) == 1 and not dopamine:  # e.g. a CleanRL run folder: runs/<run_name>/dqn_atari_jax.cleanrl_model
            return models[0], None
        return None
    if path.is_file() and _is_msgpack_model(path):
        beside = path.parent / "args.json"
        if beside.is_file():
            args = _read_run_args(path.parent)
            if f"{args.get('exp_name')}{MODEL_SUFFIX}" == path.name:
                return path, args
        return path, None
    return None


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


def download_hf(address: str, cache_dir: str | os.PathLike | None = None, *, base_url: str | None = None) -> Path:
    """Download ``hf://<owner>/<repo>[@<revision>]/<path in the repo>`` with ``huggingface_hub.hf_hub_download``
    into the Hugging Face cache (``cache_dir`` instead, if given; ``base_url`` replaces the Hub endpoint, as
    ``HF_ENDPOINT`` does) and return the local file.  A file already in the cache loads offline."""
    m = re.fullmatch(r"hf://([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)", address)
    if not m:
        raise TeacherError(f"{address!r} is not a Hub file address; use hf://<owner>/<repo>/<file>, e.g. hf://cleanrl/BreakoutNoFrameskip-v4-dqn_atari_jax-seed1/dqn_atari_jax.cleanrl_model")
    repo_id, revision, filename = m[1], m[2], m[3]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise TeacherError(f"{address} needs huggingface_hub: pip install huggingface_hub") from None
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser())
    if base_url is not None:
        kwargs["endpoint"] = base_url.rstrip("/")
    try:
        model = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, **kwargs))
        if filename.endswith(MODEL_SUFFIX):
            # A student uploaded by --upload-model has its run's args.json (the flags that rebuild its network) and
            # Q probe beside it; fetched from the same commit, they land beside the model in the cache's snapshot.
            commit = model.parents[filename.count("/")].name  # the cache's snapshots/<commit>/<filename>
            folder = filename.rpartition("/")[0]
            for extra in ("args.json", "q_probe.npz"):
                try:
                    hf_hub_download(repo_id=repo_id, filename=f"{folder}/{extra}" if folder else extra, revision=commit, **kwargs)
                except EntryNotFoundError:  # a CleanRL model, or ours without a probe: the loader says what it lacks
                    pass
        return model
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        raise DownloadError(f"{address}: the Hub cannot be reached and the file is not in the Hugging Face cache; connect (unset HF_HUB_OFFLINE) "
                            f"and run again, or download the file and pass its local path") from None
    except EntryNotFoundError:
        raise DownloadError(f"{address}: no file {filename} in the Hub repo {repo_id} (HTTP 404); check the file name "
                            f"(CleanRL's is <exp_name>.cleanrl_model, e.g. dqn_atari_jax.cleanrl_model)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{address}: the Hub repo {repo_id} has no revision {revision}; pass an existing branch, tag or commit after @") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{address}: no Hub repo {repo_id} (or it is private or gated); check the owner/repo, or log in with `hf auth login`") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"{address}: the Hub answered {_one_line(e)}; try again later") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"{address}: download failed ({type(e).__name__}: {_one_line(e)})") from None


# ----------------------------------------------------------------------------
# Sharing a student on the Hub: --upload-model, `python teacher_utils.py upload`
# ----------------------------------------------------------------------------
class HubError(TeacherError):
    """The Hub could not be reached, or refused a login check or an upload; the message is one line."""


def hub_repo_name(run_args: Mapping) -> str:
    """The Hub repo name of a run: CleanRL's ``{env_id}-{exp_name}-seed{seed}`` with the method added, so that the
    paper's comparisons on one game and seed do not overwrite each other."""
    return f"{run_args['env_id']}-{run_args['exp_name']}-{run_args.get('method', 'qdagger')}-seed{run_args['seed']}"


def _hub_api() -> Any:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HubError("uploading to the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return HfApi()


def _hub_failure(e: Exception, doing: str, retry: str) -> HubError:
    """One line for an exception of huggingface_hub or of its HTTP client while ``doing``; ``retry`` says how to go on."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    if status == 401:
        return HubError(f"{doing}: the Hub refused the Hugging Face token (HTTP 401: invalid or expired); log in again with `hf auth login` "
                        f"(or set HF_TOKEN), then {retry}")
    if status == 403:
        return HubError(f"{doing}: the token may not write there (HTTP 403); use a token with write access, or pass --hf-entity "
                        f"with a namespace you can write to, then {retry}")
    if status is not None:
        return HubError(f"{doing}: the Hub answered HTTP {status} ({_one_line(e)}); {retry}")
    if isinstance(e, OSError) or any(w in type(e).__name__ for w in ("Connect", "Timeout", "Network")):
        return HubError(f"{doing}: the Hub cannot be reached ({type(e).__name__}: {_one_line(e)}); check the network (HF_ENDPOINT), then {retry}")
    cause = e.__cause__ or e.__context__  # huggingface_hub wraps a failed file transfer in a RuntimeError
    detail = f"{_one_line(e)}" + (f" <- {type(cause).__name__}: {_one_line(cause)}" if cause is not None else "")
    return HubError(f"{doing} failed ({type(e).__name__}: {detail}); {retry}")


def check_hub_login(entity: str = "") -> str:
    """The Hub namespace an upload will go to: ``entity``, else the logged-in user.  Run before a training run
    starts, so that a missing or refused login is told then rather than after the run: a token must be configured
    (``hf auth login`` or HF_TOKEN), the Hub must accept it, and ``entity`` must be the user or one of its orgs."""
    api = _hub_api()
    from huggingface_hub import get_token

    if not get_token():
        raise HubError("--upload-model needs a Hugging Face login: run `hf auth login` (or set HF_TOKEN), or drop --upload-model")
    retry = "run again, or drop --upload-model and upload the finished run with `python teacher_utils.py upload runs/<run_name>`"
    try:
        me = api.whoami()
    except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many kinds; the user needs one line
        raise _hub_failure(e, "checking the Hugging Face login", retry) from None
    namespaces = [me["name"], *(o["name"] for o in me.get("orgs", []) if isinstance(o, Mapping) and "name" in o)]
    if entity and entity not in namespaces:
        raise HubError(f"--hf-entity {entity}: the logged-in user {me['name']} can upload to {', '.join(namespaces)} only; "
                       f"pass one of those, or log in as a member of {entity}")
    return entity or me["name"]


def _model_card(run_args: Mapping, final: Mapping | None, repo_id: str, model_name: str, script: str) -> str:
    """README.md of an uploaded student: the Hub's metadata (tags, the final evaluation as model-index) and how to
    use it as a teacher, watch it and train it again."""
    from huggingface_hub import EvalResult, ModelCardData

    env_id, method, seed = run_args["env_id"], run_args.get("method", "qdagger"), run_args["seed"]
    algo = "Rainbow" if script == "qdagger_rainbow_atari_jax" else "DQN"
    title = f"{method} {algo} student on {env_id}"
    results = []
    if final and final.get("returns"):
        results = [EvalResult(task_type="reinforcement-learning", task_name="reinforcement-learning", dataset_type=env_id,
                              dataset_name=env_id, metric_type="mean_reward", metric_name="mean_reward",
                              metric_value=f"{final['mean']:.2f} +/- {final['std']:.2f}")]
    data = ModelCardData(library_name="reincarnate", tags=[env_id, "reinforcement-learning", "deep-reinforcement-learning",
                                                           "reincarnating-rl", method, "custom-implementation"],
                         model_name=title if results else None, eval_results=results or None)
    teacher = f"`{run_args['teacher_checkpoint']}`" if run_args.get("teacher_checkpoint") else f"`gs://rl_checkpoints/DQN_400/{game_from_env_id(env_id)}/1` (the default)"
    lines = [f"# {title}", "",
             f"A {algo} agent (`{run_args.get('network', 'nature')}` network) trained on `{env_id}` by `{script}.py` of reincarnate, "
             f"Reincarnating RL (Agarwal et al., NeurIPS 2022): method `{method}`, seed {seed}"
             + ("" if method == "tabula-rasa" else f", teacher {teacher}") + ".", ""]
    if final and final.get("returns"):
        lines += ["| final evaluation | |", "|---|---|",
                  f"| episodes | {len(final['returns'])} |",
                  f"| mean return | {final['mean']:.2f} ± {final['std']:.2f} |"]
        for key, label in (("teacher_normalized_score", "teacher-normalized score"), ("human_normalized_score", "human-normalized score"),
                           ("agent_steps", "online agent steps")):
            if final.get(key) is not None:
                value = final[key]
                lines.append(f"| {label} | {value:.3f} |" if isinstance(value, float) else f"| {label} | {value} |")
        lines.append("")
    address = f"hf://{repo_id}/{model_name}"
    lines += ["## Use it", "", "As the teacher of a new student:", "", "```bash",
              f"python {script}.py --env-id {env_id} --teacher-checkpoint {address}", "```", "",
              "Watch and score it (Dopamine's evaluation protocol; `--capture-video` films its first episode):", "", "```bash",
              f"python reincarnate_utils/enjoy.py {address} --env-id {env_id}", "```", "",
              "The files: the params (flax msgpack), `args.json` (every flag of the run: the network is rebuilt from it), "
              "`q_probe.npz` (Q-values of a few states, checked at every load), `final_eval.json`, the TensorBoard logs, "
              "the code that trained it, and the final evaluation's video when it was filmed.", "",
              "## Train it again", "", "```bash", (final or {}).get("command") or f"python {script}.py --env-id {env_id} --seed {seed}", "```", "",
              "| flag | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in run_args.items()]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


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
# Downloading from the bucket
# ----------------------------------------------------------------------------
BUCKET = "rl_checkpoints"
DEFAULT_BUCKET_URL = "https://storage.googleapis.com"
BUCKET_URL_ENV = "REINCARNATE_BUCKET_URL"
CACHE_ENV = "REINCARNATE_CACHE"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$REINCARNATE_CACHE`` or ``~/.cache/reincarnate``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reincarnate").expanduser()


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(BUCKET_URL_ENV) or DEFAULT_BUCKET_URL).rstrip("/")


def _unreachable(base: str, reason: Any) -> DownloadError:
    return DownloadError(
        f"cannot reach the teacher bucket at {base} ({reason}); copy the run folder (gs://{BUCKET}/DQN_400/<Game>/<run>/) elsewhere "
        f"and pass its local path (e.g. --teacher-checkpoint /data/DQN_400/Breakout/1), or set {BUCKET_URL_ENV} to a mirror"
    )


def _open(url: str, base: str, what: str, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> Any:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DownloadError(f"{what} not found in the bucket (HTTP 404 for {url}); check the game, run and iteration") from None
        raise DownloadError(f"{what}: HTTP {e.code} {e.reason} from {url}; try again later or use a mirror ({BUCKET_URL_ENV})") from None
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(base, getattr(e, "reason", e)) from None


def list_bucket(prefix: str, *, base_url: str | None = None, bucket: str = BUCKET) -> list[dict]:
    """Every object under ``prefix`` (GCS JSON listing API, all pages)."""
    base = _base_url(base_url)
    items: list[dict] = []
    token = None
    while True:
        query = {"prefix": prefix, **({"pageToken": token} if token else {})}
        url = f"{base}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
        with _open(url, base, f"listing of gs://{bucket}/{prefix}") as r:
            try:
                page = json.loads(r.read())
            except (ValueError, OSError) as e:
                raise DownloadError(f"the listing of gs://{bucket}/{prefix} from {base} is not valid JSON ({e}); is {BUCKET_URL_ENV} a GCS endpoint?") from None
        items.extend(page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            return items


def game_from_env_id(env_id: str) -> str:
    """``"Breakout-v5"`` -> ``"Breakout"`` (the bucket's CamelCase game name)."""
    name = env_id.split("/")[-1]
    name = re.sub(r"(NoFrameskip)?-v\d+$", "", name)
    if not name:
        raise EnvIdError(f"cannot derive a game name from env id {env_id!r}; use an id like Breakout-v5")
    return name[0].upper() + name[1:]


def _download_object(item: Mapping[str, Any], dest: Path, base: str, bucket: str, progress: bool, retries: int = 5) -> Path:
    """Stream one object to ``dest.part``, resume with Range, verify, rename."""
    name = item["name"]
    size = int(item.get("size", -1))
    if dest.is_file() and (size < 0 or dest.stat().st_size == size):
        return dest  # verified when it was renamed into place
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = f"{base}/{bucket}/{urllib.parse.quote(name, safe='/')}"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=size if size >= 0 else None, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(name).name, file=sys.stderr, leave=False)
    try:
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size >= 0 and have > size:  # a stale part from another version of the object
                part.unlink()
                have = 0
            if bar is not None:
                bar.reset(total=size if size >= 0 else None)
                bar.update(have)
            if size >= 0 and have == size:
                break
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with _open(url, base, f"gs://{bucket}/{name}", headers) as r:
                    if have and r.status != 206:  # server ignored Range: start over
                        have = 0
                    with open(part, "ab" if have else "wb") as f:
                        while chunk := r.read(_CHUNK):
                            f.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                if size < 0 or part.stat().st_size >= size:
                    break
                raise ConnectionError("connection closed early")
            except (ConnectionError, TimeoutError, http.client.HTTPException) as e:
                attempt += 1
                if attempt > retries:
                    raise DownloadError(f"download of gs://{bucket}/{name} kept failing ({e}); run the same command again to resume from {part}") from None
                time.sleep(min(0.2 * 2**attempt, 5.0))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DownloadError(f"disk full while writing {part}; free space or set {CACHE_ENV} (or --cache-dir) to a larger disk, then run again to resume") from None
                raise
    finally:
        if bar is not None:
            bar.close()
    _verify(part, item, bucket)
    os.replace(part, dest)
    return dest


def _verify(part: Path, item: Mapping[str, Any], bucket: str) -> None:
    """Check size, md5 and crc32c against the listing; delete the part on mismatch."""
    name = item["name"]
    problem = None
    size = int(item.get("size", -1))
    if size >= 0 and part.stat().st_size != size:
        problem = f"size {part.stat().st_size} != {size}"
    else:
        md5 = hashlib.md5()
        crc = google_crc32c.Checksum()
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK * 8):
                md5.update(chunk)
                crc.update(chunk)
        if "md5Hash" in item and base64.b64encode(md5.digest()).decode() != item["md5Hash"]:
            problem = "md5 mismatch"
        elif "crc32c" in item and base64.b64encode(crc.digest()).decode() != item["crc32c"]:
            problem = "crc32c mismatch"
    if problem:
        part.unlink(missing_ok=True)
        raise DownloadError(f"gs://{bucket}/{name} failed verification ({problem}); the partial file was deleted, run again to download it afresh")


def _replay_wanted(rel: str, iteration: int) -> bool:
    base = rel.rsplit("/", 1)[-1]
    if rel.startswith("checkpoints/"):
        return bool(re.search(rf"_ckpt\.{iteration}\.gz$", base))
    if rel.startswith("replay_logs/"):
        return bool(re.search(rf"_ckpt\.{(iteration + 1) // 4}\.gz$", base))
    return False


@dataclasses.dataclass
class _RunPlan:
    """A listed run prefix and the checkpoint picked in it (nothing big fetched yet)."""

    base: str
    bucket: str
    prefix: str
    local_root: Path
    objects: dict[str, dict]
    """Relative object name -> listing item."""
    kind: str
    iteration: int

    def checkpoint_files(self) -> list[str]:
        """Relative names of the files the picked checkpoint needs."""
        it = self.iteration
        wanted = [f"checkpoints/{_SENTINEL}{it}"]
        if self.kind == "tf":
            wanted += ["checkpoints/checkpoint", f"checkpoints/tf_ckpt-{it}.index", f"checkpoints/ckpt.{it}"]
            wanted += [r for r in self.objects if re.fullmatch(rf"checkpoints/tf_ckpt-{it}\.data-\d{{5}}-of-\d{{5}}", r)]
        else:
            wanted.append(f"checkpoints/ckpt.{it}")
        return wanted

    def download(self, rels: Iterable[str], progress: bool) -> None:
        for r in dict.fromkeys(rels):
            if r in self.objects:
                _download_object(self.objects[r], self.local_root / r, self.base, self.bucket, progress)


def _plan_prefix(prefix: str, cache_dir: Path, iteration: int | None, base_url: str | None, bucket: str = BUCKET) -> _RunPlan:
    """List a run prefix and pick its checkpoint iteration, as downloads do."""
    prefix = prefix.strip("/") + "/"
    base = _base_url(base_url)
    items = list_bucket(prefix, base_url=base, bucket=bucket)
    if not items:
        raise TeacherError(f"nothing at gs://{bucket}/{prefix} (on {base}); check the game name (CamelCase, e.g. SpaceInvaders) and the run number")
    rel = {it["name"][len(prefix) :]: it for it in items}
    ckpt_names = {r.split("/", 1)[1] for r in rel if r.startswith("checkpoints/") and r.count("/") == 1}
    hint = None
    if "checkpoints/checkpoint" in rel:  # tiny: fetch it first so the TF hint is known
        _download_object(rel["checkpoints/checkpoint"], cache_dir / bucket / prefix / "checkpoints/checkpoint", base, bucket, False)
        hint = _tf_checkpoint_file_hint(cache_dir / bucket / prefix / "checkpoints")
    kind, it = _pick_iteration(ckpt_names, f"gs://{bucket}/{prefix}checkpoints/", iteration, hint)
    return _RunPlan(base, bucket, prefix, cache_dir / bucket / prefix, rel, kind, it)


def _download_prefix(prefix: str, cache_dir: Path, iteration: int | None, base_url: str | None, include_replay: bool, progress: bool, bucket: str = BUCKET) -> Path:
    plan = _plan_prefix(prefix, cache_dir, iteration, base_url, bucket)
    wanted = plan.checkpoint_files()
    if include_replay:
        wanted += [r for r in plan.objects if _replay_wanted(r, plan.iteration)]
    plan.download(wanted, progress)
    return plan.local_root


def download_teacher(
    game: str,
    run: int = 1,
    iteration: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    include_replay: bool = False,
    progress: bool = True,
    agent: str = "DQN_400",
) -> Path:
    """Download a teacher's checkpoint (and optionally its replay) from the bucket.

    ``game`` is the bucket's CamelCase name (``"Breakout"``) or an envpool id
    (``"Breakout-v5"``).  Picks the latest complete iteration unless
    ``iteration`` is given, fetches only what that checkpoint needs, and
    returns the local run folder ``<cache>/rl_checkpoints/<agent>/<Game>/<run>/``.
    Interrupted downloads resume; every file is checked against the listing's
    size, md5 and crc32c before it gets its final name.
    """
    game = game_from_env_id(game) if re.search(r"-v\d+$", game) else game
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _download_prefix(f"{agent}/{game}/{run}", cache, iteration, base_url, include_replay, progress)


def download_gs(
    address: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    iteration: int | None = None,
    base_url: str | None = None,
    include_replay: bool = False,
    progress: bool = True,
) -> Path:
    """:func:`download_teacher` for an address ``gs://<bucket>/<run prefix>``."""
    m = re.fullmatch(r"gs://([^/]+)/(.+?)/*", address)
    if not m:
        raise TeacherError(f"{address!r} is not a bucket address; use gs://rl_checkpoints/DQN_400/<Game>/<run>")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _download_prefix(m[2], cache, iteration, base_url, include_replay, progress, bucket=m[1])


# ----------------------------------------------------------------------------
# The teacher's replay: Dopamine OutOfGraphReplayBuffer checkpoint files
# ----------------------------------------------------------------------------
# Dopamine's replay stores each frame once (rows: frame o_i, the action a_i
# taken at it, the reward r_{i+1} that followed, terminal) and builds stacks of
# 4 frames when it samples; each attribute is saved as <dir>/<name>_ckpt.<N>.gz,
# gzip around np.save (arrays) or a pickle (the episode-end set).
_REPLAY_STACK = 4
_REPLAY_FRAME = (84, 84)
_REPLAY_FRAMES_FILE = "$store$_observation"
_REPLAY_REQUIRED = (_REPLAY_FRAMES_FILE, "$store$_action", "$store$_reward", "$store$_terminal", "add_count", "invalid_range")
_REPLAY_OPTIONAL = ("episode_end_indices",)  # older agents did not save it; sum_tree (priorities) is never read
_REPLAY_READ_CHUNK = 4 << 20  # bytes per readinto: the only copy besides the array itself
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 1 << 16


def _replay_name(name: str, suffix: int) -> str:
    return f"{name}_ckpt.{suffix}.gz"


def _replay_suffixes(folder: Path) -> dict[str, set[int]]:
    """``{attribute: {suffixes present}}`` of the replay files in ``folder``."""
    found: dict[str, set[int]] = {n: set() for n in _REPLAY_REQUIRED + _REPLAY_OPTIONAL}
    if folder.is_dir():
        for p in folder.iterdir():
            if (m := re.fullmatch(r"(.+)_ckpt\.(\d+)\.gz", p.name)) and m[1] in found:
                found[m[1]].add(int(m[2]))
    return found


def _replay_fix(folder: Path, teacher_iteration: int | None = None) -> str:
    """How to get a replay: the download command for this run, or rollouts."""
    run = folder.parent if folder.name in ("checkpoints", "replay_logs") else folder
    cmd = "python teacher_utils.py download <Game> --include-replay"
    if run.name.isdigit() and run.parent.name:
        extra = "" if run.name == "1" else f" --run {run.name}"
        extra += f" --iteration {teacher_iteration}" if teacher_iteration is not None else ""
        cmd = f"python teacher_utils.py download {run.parent.name}{extra} --include-replay"
    return f"download the replay with `{cmd}` or use --teacher-data rollout"


class _ReplayUnpickler(pickle.Unpickler):
    """For ``episode_end_indices``: a set of ints, which Dopamine fills with the
    numpy int64 its ``cursor()`` returns.  Only sets, ints and numpy scalars
    (with their dtype) may be built; any other global aborts the load."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "int"): int,
        ("__builtin__", "set"): set,  # protocol-2 pickles name the Python 2 module
        ("__builtin__", "frozenset"): frozenset,
        ("__builtin__", "int"): int,
        **{k: v for k, v in _SAFE_GLOBALS.items() if k[1] in ("scalar", "dtype") or k[0] == "numpy.dtypes"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "_codecs" and name == "encode":  # protocol-2 bytes of a numpy scalar
            return _latin1_bytes
        raise pickle.UnpicklingError(f"{module}.{name}")


def _read_npy_header(f: Any, head: bytes, path: Path, fix: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Parse the .npy header whose first 8 bytes ``head`` came from the (gzip) stream ``f``."""
    major = head[6] if len(head) == 8 else -1
    if major not in (1, 2, 3):
        raise CheckpointError(f"{path} has an unknown .npy format version or a truncated header; {fix}")
    size_len = 2 if major == 1 else 4
    raw_len = f.read(size_len)
    if len(raw_len) != size_len:
        raise CheckpointError(f"{path} is truncated inside its .npy header; {fix}")
    header_len = int.from_bytes(raw_len, "little")
    if header_len > _NPY_MAX_HEADER:
        raise CheckpointError(f"{path} has a {header_len}-byte .npy header, too long for an array Dopamine saves; the file is corrupt, {fix}")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(f"{path} is truncated inside its .npy header; {fix}")
    try:
        # A plain literal (dict of str/bool/tuple): ast.literal_eval evaluates nothing else.
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin1"))
        if not isinstance(header, dict) or not isinstance(header.get("descr"), str) or not isinstance(header.get("shape"), tuple):
            raise ValueError("not a {'descr': str, 'shape': tuple} dict")
        dtype = np.dtype(header["descr"])
        shape = tuple(header["shape"])
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"bad shape {shape}")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt .npy header ({e}); {fix}") from None
    if header.get("fortran_order") and len(shape) > 1:
        raise CheckpointError(f"{path} holds a Fortran-ordered array, which Dopamine never writes; {fix}")
    if dtype.hasobject:
        raise CheckpointError(f"{path} holds Python objects (dtype {dtype}); a replay file only holds numbers, {fix}")
    return dtype, shape


def _unpickle_replay_value(raw: bytes, path: Path, fix: str) -> Any:
    try:
        return _ReplayUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        if re.fullmatch(r"[\w.]+\.\w+", str(e)):
            raise CheckpointError(f"refusing to load {path}: it references {e}, which a Dopamine replay file never contains (only sets of ints are allowed)") from None
        raise CheckpointError(f"{path} is neither a .npy array nor a valid pickle ({e}); it is corrupt, {fix}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, RecursionError) as e:
        raise CheckpointError(f"{path} is neither a .npy array nor a valid pickle ({type(e).__name__}: {e}); it is corrupt, {fix}") from None


def _read_gz_file(
    path: Path,
    fix: str,
    dtype: np.dtype | type | None = None,
    shape: tuple[int | None, ...] | None = None,
    progress: str | None = None,
) -> Any:
    """Read one ``<name>_ckpt.<N>.gz``: a numpy array streamed from the gzip
    into a preallocated array (the file's decompressed bytes never exist as a
    whole), or -- only when ``dtype`` is ``None`` -- the value of a pickle,
    built by :class:`_ReplayUnpickler`.

    ``dtype``/``shape`` (``None`` = any length) are checked against the header
    before anything is allocated, so a 7 GB read never starts on a wrong file.
    ``progress``: label of a byte progress bar (stderr), or ``None``.
    """
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            head = f.read(8)
            if head[:6] != _NPY_MAGIC:
                if dtype is not None:
                    raise CheckpointError(f"{path} does not hold a numpy array (no .npy header); it is not a Dopamine replay file, {fix}")
                return _unpickle_replay_value(head + f.read(), path, fix)  # small: a set of episode ends
            got_dtype, got_shape = _read_npy_header(f, head, path, fix)
            if dtype is not None and got_dtype != np.dtype(dtype):
                raise CheckpointError(f"{path} holds {got_dtype} values, Dopamine's replay saves {np.dtype(dtype)}; it is not a Dopamine Atari replay file, {fix}")
            if shape is not None and (len(got_shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got_shape))):
                want = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
                raise CheckpointError(f"{path} holds an array of shape {got_shape}, expected {want}; it is not a Dopamine Atari replay file, {fix}")
            try:
                out = np.empty(got_shape, dtype=got_dtype)
            except (MemoryError, ValueError) as e:
                raise CheckpointError(f"{path} claims an array of shape {got_shape} that cannot be allocated ({type(e).__name__}); the header is corrupt, {fix}") from None
            view = memoryview(out.reshape(-1).view(np.uint8))
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=out.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=progress, file=sys.stderr, leave=False)
            try:
                pos = 0
                while pos < out.nbytes:
                    n = f.readinto(view[pos : pos + _REPLAY_READ_CHUNK])
                    if not n:
                        raise CheckpointError(f"{path} is truncated: its array needs {out.nbytes:,} bytes, the file holds {pos:,}; {fix}")
                    pos += n
                    if bar is not None:
                        bar.update(n)
            finally:
                if bar is not None:
                    bar.close()
            if f.read(1):  # reading to the end also checks the gzip crc32 and length
                raise CheckpointError(f"{path} has data after its array; it is not a file np.save wrote, {fix}")
            return out
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{path} does not exist; {fix}") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); {fix}") from None


def _not_dopamine_replay(source: str) -> CheckpointError:
    return CheckpointError(f"{source} is not a Dopamine checkpoint, so it has no Dopamine replay; use --teacher-data rollout")


def _is_flax_teacher(path: Path) -> bool:
    """A run folder of our scripts or a flax model (CleanRL's or ours): teachers that come without a Dopamine replay."""
    try:
        return _flax_model_source(path) is not None
    except CheckpointError:  # raised only for folders with args.json: ours, even when unusable as a teacher
        return True


def _resolve_replay(source: Path, iteration: int | None) -> tuple[Path, int, int | None]:
    """Turn a user path into (folder, file suffix, teacher iteration)."""
    if _is_flax_teacher(source):
        raise _not_dopamine_replay(str(source))
    if not source.is_dir():
        raise CheckpointError(
            f"replay source {source} is not a folder; pass a run folder (.../DQN_400/Breakout/1), a folder holding $store$_*_ckpt.<N>.gz files, or a gs:// address"
        )
    ckpt, logs = source / "checkpoints", source / "replay_logs"
    if ckpt.is_dir() or logs.is_dir():  # a run folder
        n = iteration
        if n is None:
            if not ckpt.is_dir():
                raise CheckpointError(f"{source} has replay_logs/ but no checkpoints/ to tell the teacher's iteration; pass iteration= (the teacher's), or pass {logs} itself to read its latest log")
            names = [p.name for p in ckpt.iterdir()]
            found = _checkpoint_iterations(names)
            if found["jax"] or found["tf_index"] or found["tf_data"]:
                _, n = _pick_iteration(names, str(ckpt), None, _tf_checkpoint_file_hint(ckpt))  # load_teacher's choice
            elif found["sentinel"]:  # replay without the network: Dopamine writes the sentinel after both
                n = max(found["sentinel"])
            else:
                raise CheckpointError(f"no complete checkpoint in {ckpt} (no ckpt.<N>, tf_ckpt-<N> or sentinel_checkpoint_complete.<N>) to tell the teacher's iteration; pass iteration=")
        candidates = [(ckpt, n), (logs, (n + 1) // 4)]  # a log holds 1M transitions = 4 iterations
        for folder, suffix in candidates:
            have = _replay_suffixes(folder)
            if all(suffix in have[r] for r in _REPLAY_REQUIRED):
                return folder, suffix, n
        for folder, suffix in candidates:  # a partial set: name what is missing there
            have = _replay_suffixes(folder)
            if any(suffix in s for s in have.values()):
                missing = next(r for r in _REPLAY_REQUIRED if suffix not in have[r])
                raise CheckpointError(f"{folder} has no {_replay_name(missing, suffix)}; {_replay_fix(source, n)}")
        raise CheckpointError(
            f"{source} has no replay for teacher iteration {n}: neither checkpoints/{_replay_name(_REPLAY_FRAMES_FILE, n)} "
            f"nor replay_logs/{_replay_name(_REPLAY_FRAMES_FILE, (n + 1) // 4)}; {_replay_fix(source, n)}"
        )
    have = _replay_suffixes(source)
    if iteration is not None:
        suffix = iteration
    else:
        complete = set.intersection(*(have[r] for r in _REPLAY_REQUIRED))
        if complete:
            return source, max(complete), None
        seen = set().union(*have.values())
        if not seen:
            raise CheckpointError(f"no Dopamine replay in {source} (expected {_replay_name(_REPLAY_FRAMES_FILE, 'N')} and its companions); {_replay_fix(source)}")
        suffix = max(seen)
    for r in _REPLAY_REQUIRED:
        if suffix not in have[r]:
            raise CheckpointError(f"{source} has no {_replay_name(r, suffix)}; {_replay_fix(source)}")
    return source, suffix, None


def _human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _download_replay_gs(address: str, iteration: int | None, cache_dir: str | os.PathLike | None, base_url: str | None, progress: bool) -> tuple[Path, int]:
    """Fetch a run's checkpoint and its replay for one iteration; announce the size first."""
    m = re.fullmatch(r"gs://([^/]+)/(.+?)/*", address)
    if not m:
        raise TeacherError(f"{address!r} is not a bucket address; use gs://rl_checkpoints/DQN_400/<Game>/<run>")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    plan = _plan_prefix(m[2], cache, iteration, base_url, bucket=m[1])
    it = plan.iteration
    replay: list[str] = []
    for layout, suffix in (("checkpoints", it), ("replay_logs", (it + 1) // 4)):
        names = [f"{layout}/{_replay_name(r, suffix)}" for r in _REPLAY_REQUIRED]
        if all(r in plan.objects for r in names):  # one complete layout; the other would be a second copy
            replay = names + [f"{layout}/{_replay_name(r, suffix)}" for r in _REPLAY_OPTIONAL]
            break
    if not replay:
        raise CheckpointError(
            f"gs://{plan.bucket}/{plan.prefix} has no complete replay for iteration {it} (neither checkpoints/{_replay_name(_REPLAY_FRAMES_FILE, it)} "
            f"nor replay_logs/{_replay_name(_REPLAY_FRAMES_FILE, (it + 1) // 4)} with its companions); use --teacher-data rollout"
        )
    wanted = [r for r in dict.fromkeys(plan.checkpoint_files() + replay) if r in plan.objects]
    todo, remaining = 0, 0
    for r in wanted:
        size, dest = int(plan.objects[r].get("size", -1)), plan.local_root / r
        if dest.is_file() and (size < 0 or dest.stat().st_size == size):
            continue  # cached (as _download_object decides)
        part = dest.with_name(dest.name + ".part")
        todo += 1
        remaining += max(size, 0) - (part.stat().st_size if part.is_file() and part.stat().st_size <= size else 0)
    if todo:  # several GB: say so before the first byte moves
        print(f"downloading the teacher's replay for iteration {it}: {_human_size(remaining)} in {todo} files to {plan.local_root}", file=sys.stderr, flush=True)
    plan.download(wanted, progress)
    return plan.local_root, it


@dataclasses.dataclass(eq=False, repr=False)
class DopamineReplay:
    """A Dopamine replay buffer as its agent saved it, frames stored once.

    Row ``i`` is (frame ``frames[i]``, the action taken at it, the reward that
    followed, whether the episode terminated there); Dopamine writes 3 zero rows
    before each episode and never stores an episode's last frame.  States are
    built on demand by :meth:`transitions` (stacking the whole buffer would take
    4x the memory).  :meth:`valid_indices` are exactly the indices that a
    Dopamine 4.0.6 agent with ``update_horizon`` n that ``load``-ed these files
    samples (its ``sample_index_batch``), and :meth:`transitions` are its
    ``sample_transition_batch`` for n and ``gamma``.  ``load`` keeps the saved
    ``invalid_range`` (rows ``cursor - h ... cursor + 3`` for the saving
    agent's horizon h, :attr:`saved_update_horizon`) while every other check
    uses n, and the sampler never draws rows ``cursor - n ... cursor + 2``: so
    the rows ``cursor - max(n, h) ... cursor + 3`` are never valid.  When
    h < n (DQN_400 teachers saved with h = 1, the paper's students use n = 3)
    the loaded buffer's ``is_valid_transition`` alone would also accept up to
    n - h rows ``cursor - n ... cursor - h - 1``, whose n-step transitions run
    past the newest row (their next state would stack row ``cursor``, the
    oldest); Dopamine's sampler never draws them, and neither do we.
    """

    frames: np.ndarray
    """uint8 ``(capacity, 84, 84)``: one frame per row."""
    actions: np.ndarray
    """int32 ``(capacity,)``."""
    rewards: np.ndarray
    """float32 ``(capacity,)`` (as stored: Dopamine clips before adding)."""
    terminals: np.ndarray
    """uint8 ``(capacity,)``."""
    add_count: int
    """Rows ever added, zero rows included."""
    episode_end_indices: np.ndarray
    """int64, sorted: rows that ended an episode (terminal or truncated);
    empty for checkpoints older than Dopamine's ``episode_end_indices``."""
    update_horizon: int
    gamma: float
    iteration: int
    """Suffix ``N`` of the files read (``..._ckpt.<N>.gz``)."""
    path: Path
    """The folder the files were read from."""
    teacher_iteration: int | None = None
    """The teacher's iteration when a run folder was given (the replay_logs
    suffix is ``(teacher_iteration + 1) // 4``), else ``None``."""
    saved_update_horizon: int | None = None
    """The saving agent's update horizon h, read off the saved
    ``invalid_range`` (Dopamine's has h + 4 rows: ``cursor - h ... cursor + 3``);
    ``None`` when unknown (nothing added yet): then only ``update_horizon``
    counts."""

    @property
    def capacity(self) -> int:
        return int(self.frames.shape[0])

    @property
    def cursor(self) -> int:
        """Row the next add would write (the oldest row once full)."""
        return self.add_count % self.capacity

    @property
    def is_full(self) -> bool:
        return self.add_count >= self.capacity

    def __repr__(self) -> str:
        return (
            f"DopamineReplay(path={str(self.path)!r}, iteration={self.iteration}, capacity={self.capacity}, add_count={self.add_count}, "
            f"update_horizon={self.update_horizon}, saved_update_horizon={self.saved_update_horizon}, gamma={self.gamma}, valid={int(self.valid_mask().sum())})"
        )

    def valid_mask(self) -> np.ndarray:
        """bool ``(capacity,)``: the rows a Dopamine agent with horizon n that
        loaded these files samples (its ``sample_index_batch``: the indices it
        draws that its ``is_valid_transition`` accepts).

        A row is a valid state index unless (1) its n-step transition or its
        stack crosses the cursor -- not yet written, or overwritten: the rows
        ``cursor - m ... cursor + 3`` with ``m = max(n, h)``, h the saving
        agent's horizon (Dopamine's ``load`` keeps the saved ``invalid_range``,
        ``cursor - h ... cursor + 3``; its sampler never draws
        ``cursor - n ... cursor + 2``), and for a filling buffer every row
        outside ``3 <= i < cursor - n`` too; (2) one of the 3 older frames of
        its stack ended an episode (terminal); (3) a truncated episode end (an
        episode end with terminal 0) lies in ``i ... i + n - 1``, whose next
        state would belong to another episode.  With h >= n this is exactly the
        loaded buffer's ``is_valid_transition``; with h < n that function
        would also accept rows ``cursor - n ... cursor - h - 1`` (at most
        n - h rows), which Dopamine's sampler never draws.
        """
        cap, n, c = self.capacity, self.update_horizon, self.cursor
        m = max(n, self.saved_update_horizon or 0)
        if self.is_full:
            valid = np.ones(cap, dtype=bool)
        else:
            valid = np.zeros(cap, dtype=bool)
            valid[_REPLAY_STACK - 1 : max(c - n, _REPLAY_STACK - 1)] = True
        valid[(c - m + np.arange(m + _REPLAY_STACK)) % cap] = False
        ended = self.terminals != 0
        for k in range(1, _REPLAY_STACK):  # np.roll(x, k)[i] == x[i - k], wrapping like the buffer
            valid &= ~np.roll(ended, k)
        truncated = np.zeros(cap, dtype=bool)
        truncated[self.episode_end_indices] = True
        truncated &= ~ended
        for k in range(n):
            valid &= ~np.roll(truncated, -k)
        return valid

    def valid_indices(self) -> np.ndarray:
        """int64 indices of :meth:`valid_mask`, ascending."""
        return np.flatnonzero(self.valid_mask()).astype(np.int64)

    def transitions(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """n-step transitions from state rows ``indices`` (use valid ones).

        Returns ``state``/``next_state`` uint8 ``(B, 4, 84, 84)`` (oldest frame
        first: envpool's layout, Dopamine's stack with the stack axis first),
        ``action`` int32, ``reward`` float32, ``terminal`` bool: element for
        element what Dopamine's ``sample_transition_batch(indices=...)`` gives.
        The trajectory stops after its first terminal (length L <= n):
        ``reward = sum_{k<L} gamma^k r_{i+k}`` summed in float32 as Dopamine
        does, ``next_state`` = the stack at ``i + L``, ``terminal`` = a
        terminal was met (then ``next_state`` is not meant to be used).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        cap, n = self.capacity, self.update_horizon
        if idx.size and (idx.min() < 0 or idx.max() >= cap):
            raise IndexError(f"replay indices must be in [0, {cap}), got {int(idx.min())}..{int(idx.max())}")
        trajectory = (idx[:, None] + np.arange(n)) % cap
        ended = self.terminals[trajectory] != 0
        done = ended.any(axis=1)
        length = np.where(done, ended.argmax(axis=1) + 1, n)
        # Dopamine: np.sum(float32 discounts[:L] * float32 rewards[i:i+L]) per
        # row; doing exactly that per trajectory length keeps every bit.
        discounts = np.array([math.pow(self.gamma, k) for k in range(n)], dtype=np.float32)
        reward = np.empty(idx.shape[0], dtype=np.float32)
        for steps in np.unique(length):
            rows = length == steps
            reward[rows] = np.sum(discounts[:steps] * self.rewards[trajectory[rows, :steps]], axis=1)
        window = np.arange(1 - _REPLAY_STACK, 1)
        return {
            "state": self.frames[(idx[:, None] + window) % cap],
            "action": self.actions[idx],
            "reward": reward,
            "next_state": self.frames[((idx + length)[:, None] + window) % cap],
            "terminal": done,
        }


def load_dopamine_replay(
    source: str | os.PathLike,
    iteration: int | None = None,
    update_horizon: int = 1,
    gamma: float = 0.99,
    *,
    base_url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DopamineReplay:
    """Load the replay a Dopamine agent saved (``OutOfGraphReplayBuffer.save``).

    ``source``: a run folder (``.../DQN_400/Breakout/1``: files
    ``checkpoints/*_ckpt.<N>.gz`` for the teacher's iteration ``N`` -- the one
    :func:`load_teacher` picks, or ``iteration`` -- else
    ``replay_logs/*_ckpt.<(N+1)//4>.gz`` as the Reincarnating RL runner
    keeps them); a folder holding the files (suffix ``iteration``, or the
    largest complete one); or ``gs://<bucket>/<run>``, downloaded to the cache
    (``cache_dir``, ``base_url``) after one line on stderr gives its size.

    The frames (7 GB for 1M rows) are streamed from the gzip into one
    preallocated array; peak memory is that array plus a few MB.
    ``update_horizon``/``gamma`` define the transitions (see
    :class:`DopamineReplay`): the valid indices are the ones a Dopamine agent
    with this ``update_horizon`` samples after ``load``-ing these files -- the
    saved ``invalid_range`` (the saving agent's horizon h) and the
    ``update_horizon`` n both exclude rows around the cursor, so rows
    ``cursor - max(n, h) ... cursor + 3`` are never valid.  A missing,
    truncated or inconsistent file raises :class:`CheckpointError` naming it.
    """
    if isinstance(update_horizon, bool) or not isinstance(update_horizon, (int, np.integer)) or update_horizon < 1:
        raise TeacherError(f"update_horizon must be an integer >= 1, got {update_horizon!r}")
    update_horizon = int(update_horizon)
    src = str(source)
    teacher_iteration: int | None
    if src.startswith("hf://"):  # the Hub holds CleanRL models: parameters only
        raise _not_dopamine_replay(src)
    if src.startswith("gs://"):
        run, it = _download_replay_gs(src, iteration, cache_dir, base_url, progress)
        folder, suffix, teacher_iteration = _resolve_replay(run, it)
    else:
        folder, suffix, teacher_iteration = _resolve_replay(Path(source).expanduser(), iteration)
    fix = _replay_fix(folder, teacher_iteration)
    redo = f"delete it and {fix}"
    redo_all = f"delete {folder / f'*_ckpt.{suffix}.gz'} and {fix}"
    path = {r: folder / _replay_name(r, suffix) for r in _REPLAY_REQUIRED + _REPLAY_OPTIONAL}
    for r in _REPLAY_REQUIRED:  # all there before a multi-GB read starts
        if not path[r].is_file():
            raise CheckpointError(f"{folder} has no {path[r].name}; {fix}")

    # Small files first: an inconsistent set fails before the frames are read.
    count = _read_gz_file(path["add_count"], redo)
    if isinstance(count, np.ndarray) and count.size == 1 and count.dtype.kind in "iu":
        count = count.reshape(())[()]
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise CheckpointError(f"{path['add_count']} holds {count!r}, not a row count (a non-negative integer); {redo}")
    add_count = int(count)
    actions = _read_gz_file(path["$store$_action"], redo, np.int32, (None,))
    capacity = actions.shape[0]
    if capacity < _REPLAY_STACK + update_horizon:
        raise TeacherError(f"the replay in {folder} has {capacity} rows, fewer than the stack (4) plus update_horizon ({update_horizon}); use a smaller update horizon")
    rewards = _read_gz_file(path["$store$_reward"], redo, np.float32, (None,))
    terminals = _read_gz_file(path["$store$_terminal"], redo, np.uint8, (None,))
    for name, arr in (("$store$_reward", rewards), ("$store$_terminal", terminals)):
        if arr.shape[0] != capacity:
            raise CheckpointError(f"{path[name]} has {arr.shape[0]} rows but {path['$store$_action'].name} has {capacity}; the files come from different saves, {redo_all}")
    saved_range = _read_gz_file(path["invalid_range"], redo)
    saved_horizon: int | None = None
    if add_count > 0:
        # The saver's invalid range: rows cursor - h ... cursor + 3 for its horizon h (h + 4 rows).
        c = add_count % capacity
        ok = isinstance(saved_range, np.ndarray) and saved_range.ndim == 1 and saved_range.shape[0] >= _REPLAY_STACK
        if ok:
            saved_horizon = saved_range.shape[0] - _REPLAY_STACK
            ok = np.array_equal(saved_range, (c - saved_horizon + np.arange(saved_horizon + _REPLAY_STACK)) % capacity)
        if not ok:
            raise CheckpointError(
                f"{path['invalid_range']} does not match {path['add_count'].name} ({add_count} rows added, cursor {c} of capacity {capacity}); "
                f"the files come from different saves, {redo_all}"
            )
    ends = np.zeros(0, dtype=np.int64)
    if path["episode_end_indices"].is_file():
        raw_ends = _read_gz_file(path["episode_end_indices"], redo)
        if not isinstance(raw_ends, (set, frozenset)) or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in raw_ends):
            raise CheckpointError(f"{path['episode_end_indices']} holds a {type(raw_ends).__name__}, not Dopamine's set of row indices; {redo}")
        ends = np.array(sorted(int(e) for e in raw_ends), dtype=np.int64)
        if ends.size and (ends[0] < 0 or ends[-1] >= capacity):
            raise CheckpointError(f"{path['episode_end_indices']} names row {int(ends[0] if ends[0] < 0 else ends[-1])}, outside the buffer's {capacity} rows; the files come from different saves, {redo_all}")
    frames = _read_gz_file(
        path[_REPLAY_FRAMES_FILE], redo, np.uint8, (capacity, *_REPLAY_FRAME), progress=f"replay frames ({path[_REPLAY_FRAMES_FILE].name})" if progress else None
    )
    return DopamineReplay(
        frames=frames,
        actions=actions,
        rewards=rewards,
        terminals=terminals,
        add_count=add_count,
        episode_end_indices=ends,
        update_horizon=update_horizon,
        gamma=float(gamma),
        iteration=suffix,
        path=folder,
        teacher_iteration=teacher_iteration,
        saved_update_horizon=saved_horizon,
    )


# ----------------------------------------------------------------------------
# Reference scores (Atari-57): G_R for the teacher-normalized score
# ----------------------------------------------------------------------------
# (random, human) per game, bucket CamelCase names. Random scores are those the
# Reincarnating RL code normalises with (Video Pinball's random score is 0 there,
# 16,256.9 in some other tables); human scores are the standard professional
# tester scores (DQN Nature / dqn_zoo).
ATARI_SCORES: dict[str, tuple[float, float]] = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3), "Asteroids": (719.1, 47388.7), "Atlantis": (12850.0, 29028.1),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "BeamRider": (363.9, 16926.5),
    "Berzerk": (123.7, 2630.4), "Bowling": (23.1, 160.7), "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5), "Centipede": (2090.9, 12017.0), "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4), "Defender": (2874.5, 18688.9), "DemonAttack": (152.1, 1971.0),
    "DoubleDunk": (-18.6, -16.4), "Enduro": (0.0, 860.5), "FishingDerby": (-91.7, -38.7),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5),
    "Gravitar": (173.0, 3351.4), "Hero": (1027.0, 30826.4), "IceHockey": (-11.2, 0.9),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MontezumaRevenge": (0.0, 4753.3), "MsPacman": (307.3, 6951.6),
    "NameThisGame": (2292.3, 8049.0), "Phoenix": (761.4, 7242.6), "Pitfall": (-229.4, 6463.7),
    "Pong": (-20.7, 14.6), "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0),
    "Riverraid": (1338.5, 17118.0), "RoadRunner": (11.5, 7845.0), "Robotank": (2.2, 11.9),
    "Seaquest": (68.4, 42054.7), "Skiing": (-17098.1, -4336.9), "Solaris": (1236.3, 12326.7),
    "SpaceInvaders": (148.0, 1668.7), "StarGunner": (664.0, 10250.0), "Surround": (-10.0, 6.5),
    "Tennis": (-23.8, -8.3), "TimePilot": (3568.0, 5229.2), "Tutankham": (11.4, 167.6),
    "UpNDown": (533.4, 11693.2), "Venture": (0.0, 1187.5), "VideoPinball": (0.0, 17667.9),
    "WizardOfWor": (563.5, 4756.5), "YarsRevenge": (3092.9, 54576.9), "Zaxxon": (32.5, 9173.3),
}


def random_score(env_id_or_game: str) -> float:
    """G_R: the random agent's score of a game (env id or CamelCase game)."""
    game = game_from_env_id(env_id_or_game) if re.search(r"-v\d+$", env_id_or_game) else env_id_or_game
    if game not in ATARI_SCORES:
        raise EnvIdError(f"no random score for {game!r}: normalised scores cover the 57 Atari games ({', '.join(list(ATARI_SCORES)[:4])}, ...)")
    return ATARI_SCORES[game][0]


def human_normalized_score(env_id_or_game: str, score: float) -> float:
    """(score - random) / (human - random)."""
    game = game_from_env_id(env_id_or_game) if re.search(r"-v\d+$", env_id_or_game) else env_id_or_game
    rnd, human = ATARI_SCORES[game] if game in ATARI_SCORES else (random_score(game), 0.0)
    return (score - rnd) / (human - rnd)


def teacher_normalized_score(student_score: float, teacher_score: float, random_score: float) -> float:
    """(G_S - G_R) / (G_T - G_R): 1 means the student matches its teacher."""
    if teacher_score <= random_score:
        raise ValueError(f"teacher score {teacher_score:g} is not above the random score {random_score:g}")
    return (student_score - random_score) / (teacher_score - random_score)


# ----------------------------------------------------------------------------
# Atari environments on Dopamine's protocol
# ----------------------------------------------------------------------------
DOPAMINE_ENV_KWARGS: dict[str, Any] = dict(
    repeat_action_probability=0.25,  # sticky actions (Machado et al. 2018)
    noop_max=1,  # no no-op starts; envpool 1.2.5 segfaults on noop_max=0
    use_fire_reset=False,
    episodic_life=False,
    reward_clip=False,  # we log the raw score and clip for learning ourselves
    frame_skip=4,
    img_height=84,
    img_width=84,
    stack_num=4,
    gray_scale=True,
    use_inter_area_resize=True,
    max_episode_steps=27_000,
    full_action_space=False,
)


def atari_env_ids() -> list[str]:
    """The envpool Atari ids (``Breakout-v5``, ...)."""
    from envpool.registration import registry

    return sorted(i for i, spec in registry.specs.items() if spec[0] == "envpool.atari")


def check_env_id(env_id: str) -> str:
    """Return ``env_id`` if envpool has it as an Atari game, else raise with close matches."""
    candidates = atari_env_ids()
    if env_id in candidates:
        return env_id
    key = env_id.split("/")[-1].replace("NoFrameskip", "").replace("-v4", "-v5")
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "teacher_utils.atari_env_ids() lists them"
    raise EnvIdError(f"unknown Atari env id {env_id!r}: envpool ids look like Breakout-v5; {hint}")


class DopamineAtariEnvs:
    """envpool Atari with Dopamine's state: older stack slots are zero at an
    episode's start (Dopamine's replay pads with zero frames, envpool repeats
    the reset frame).  Gymnasium 5-tuple API; observations (N, 4, 84, 84) uint8.
    envpool auto-resets: the step after a terminated/truncated one returns the
    first observation of a new episode (reward 0, the action ignored).

    ``zero_stack_start=False`` (not an envpool option) keeps envpool's own stacks,
    whose older slots repeat the reset frame, as gym's ``FrameStack`` (CleanRL).
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, zero_stack_start: bool = True, **overrides: Any):
        import envpool

        check_env_id(env_id)
        if num_envs < 1:
            raise TeacherError(f"num_envs must be >= 1, got {num_envs}")
        kwargs = {**DOPAMINE_ENV_KWARGS, **overrides}
        self.stack_num = int(kwargs["stack_num"])
        self.zero_stack_start = bool(zero_stack_start)
        self.envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed, **kwargs)
        self.env_id = env_id
        self.num_envs = num_envs
        self.config = dict(self.envs.config)
        self.single_action_space = self.envs.action_space
        self.single_observation_space = self.envs.observation_space
        self.num_actions = int(self.single_action_space.n)

    def _zero_old_slots(self, obs: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        if not self.zero_stack_start:
            return obs
        # A state at episode step t holds min(t + 1, 4) real frames.
        slots = np.arange(self.stack_num)[None, :]
        stale = slots < (self.stack_num - 1 - np.asarray(elapsed)[:, None])
        if stale.any():
            obs[stale] = 0
        return obs

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = self.envs.reset(**kwargs)
        return self._zero_old_slots(obs, info["elapsed_step"]), info

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        self.send(actions)
        return self.recv()

    def send(self, actions: np.ndarray) -> None:
        """The first half of ``step``: the emulators start stepping in envpool's threads and this returns at once,
        so the caller can launch device work meanwhile; ``recv`` waits for the result (always all envs, in order)."""
        self.envs.send(np.asarray(actions))

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, reward, terminated, truncated, info = self.envs.recv()
        return self._zero_old_slots(obs, info["elapsed_step"]), reward, terminated, truncated, info

    def close(self) -> None:
        self.envs.close()


def make_teacher_envs(env_id: str, num_envs: int, seed: int, zero_stack_start: bool = True, **overrides: Any) -> DopamineAtariEnvs:
    """envpool Atari configured as Dopamine trained its DQN teachers.

    Sticky actions 0.25, no no-op starts, no FIRE on reset, no life-loss
    terminals, 27,000-step cap, zeroed older stack slots at episode start.
    ``overrides`` replace any envpool option (e.g.
    ``repeat_action_probability=0.0`` for deterministic comparisons);
    ``zero_stack_start=False`` repeats the reset frame in the older slots
    instead.  A teacher's own settings are ``make_teacher_envs(env_id, n, seed,
    **teacher.env_kwargs)`` (:attr:`TeacherCheckpoint.env_kwargs`).
    """
    return DopamineAtariEnvs(env_id, num_envs, seed, zero_stack_start=zero_stack_start, **overrides)


# ----------------------------------------------------------------------------
# What both training scripts share beyond the teacher: their command line and
# the machine's memory
# ----------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _bool_fields(cls: type) -> set[str]:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool}


def normalize_bool_flags(cls: type, argv: Sequence[str]) -> list[str]:
    """Rewrite ``--flag=True|False`` and ``--flag True|False`` (what W&B sweep agents pass) into tyro's
    ``--flag`` / ``--no-flag``, for every boolean field of ``cls``; other tokens pass through."""
    bools = _bool_fields(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        field = name.replace("-", "_")
        if field in bools and eq:
            if value.lower() not in _TRUE | _FALSE:
                raise SystemExit(f"error: --{name} takes True or False, not {value!r}")
            out.append(f"--{name}" if value.lower() in _TRUE else f"--no-{name}")
        elif field in bools and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE | _FALSE:
            out.append(f"--{name}" if argv[i + 1].lower() in _TRUE else f"--no-{name}")
            i += 1
        else:
            out.append(tok)
        i += 1
    return out


def explicit_fields(cls: type, argv: Sequence[str]) -> set[str]:
    """Names of the fields of ``cls`` that ``argv`` sets explicitly (``--name``, ``--name=v``, ``--no-name``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    found = set()
    for tok in argv:
        if tok.startswith("--"):
            field = tok[2:].split("=", 1)[0].replace("-", "_")
            if field not in names and field.startswith("no_"):
                field = field[3:]
            if field in names:
                found.add(field)
    return found


def parse_args(cls: type, argv: Sequence[str] | None = None) -> Any:
    """``tyro.cli(cls)`` that also takes the boolean forms W&B sweeps pass (see :func:`normalize_bool_flags`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return tyro.cli(cls, args=normalize_bool_flags(cls, argv))


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (MemAvailable; the cgroup limit if lower)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                avail = min(avail, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            pass
    return avail


class RunError(TeacherError):
    """A problem with the run folder, a checkpoint or the machine that the user can fix; one line."""


def default_run_name(env_id: str, exp_name: str, method: str, seed: int) -> str:
    """``{env_id}__{exp_name}__{method}__{seed}__{start time}-{random}``: game, method and seed visible, and two
    runs started in the same second (a sweep, a launcher) still get different folders."""
    import secrets

    return f"{env_id}__{exp_name}__{method}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_output_folder(folder: Path, need_bytes: int, what: str) -> None:
    """The run folder exists, is writable, and its disk has room for ``need_bytes`` (a checkpoint): one error line
    before any work is spent, never a traceback hours later."""
    import shutil

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {folder} ({e.strerror or e}); run from a writable folder or fix its permissions") from None
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise RunError(f"{what} need {need_bytes / 2**30:.1f} GiB on disk but {folder} has {free / 2**30:.1f} GiB free; "
                       f"free some space, pass --checkpoint-frequency 0 (no checkpoints) or a smaller --buffer-size")


def _wandb_key_configured() -> bool:
    """Whether wandb.init will find an API key, looked up where wandb looks (the environment, then the netrc entry
    of the W&B host) without wandb itself: its Api() can prompt on a terminal or wait on the network."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urllib.parse.urlsplit(base_url).netloc or base_url.strip("/")  # wandb's netrc machine is the URL's netloc
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else Path.home() / ".netrc"
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # missing or malformed: wandb reads no key from it either
        return False
    return bool(creds and creds[2])


def check_wandb(track: bool) -> None:
    """With --track, a missing W&B login is one error line before any work (offline/disabled modes need none).
    Only the key's presence is checked, locally; a wrong key or an unreachable server is left to wandb.init."""
    if not track or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or _wandb_key_configured():
        return
    raise RunError("--track needs a Weights & Biases login: run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log locally")


# A checkpoint is a folder of .npy arrays (no pickle) and meta.json (counters, schedules, keys' sources, the
# crc32c of every array file), written under a temporary name, fsynced, completed by a sentinel file, then
# renamed into place; older ones are deleted only after that.
CHECKPOINT_SENTINEL = "COMPLETE"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32c_of_file(path: Path) -> str:
    crc = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * 16):
            crc.update(chunk)
    return crc.hexdigest().decode()


def write_checkpoint(root: Path, seq: int, arrays: Mapping[str, Any], meta: Mapping[str, Any], keep: int) -> Path:
    """Write ``root/ckpt-<seq>`` atomically (see above) and keep the ``keep`` newest complete checkpoints."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{seq:06d}"
    tmp = root / f".tmp-ckpt-{seq:06d}-{os.getpid()}"
    aside = root / f".old-ckpt-{seq:06d}-{os.getpid()}"
    for leftover in (tmp, aside):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    files = {}
    try:
        for name, value in arrays.items():
            a = np.asarray(value)
            a = np.ascontiguousarray(a).reshape(a.shape)  # (ascontiguousarray makes a 0-d array 1-d)
            path = tmp / f"{name}.npy"
            with open(path, "wb") as f:
                np.save(f, a, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[name] = _crc32c_of_file(path)
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1))
        (tmp / CHECKPOINT_SENTINEL).write_text("done")
        for p in (tmp / "meta.json", tmp / CHECKPOINT_SENTINEL, tmp):
            _fsync(p)
        # A folder of the same seq (left by a run that resumed from an earlier one) moves aside and is deleted only
        # after the new one is in place: a kill midway never leaves a half-deleted folder under a checkpoint's name.
        if final.exists():
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync(root)
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():  # the new one never took its place: put the old one back
            with contextlib.suppress(OSError):
                os.rename(aside, final)
        raise RunError(f"could not write a checkpoint to {final} ({e.strerror or e}); free disk space or pass --checkpoint-frequency 0") from None
    complete = sorted(p for p in root.glob("ckpt-*") if (p / CHECKPOINT_SENTINEL).is_file())
    for old in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (*root.glob(".tmp-ckpt-*"), *root.glob(".old-ckpt-*")):  # left by a killed writer
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


_RUN_LOCKS: dict[str, int] = {}
"""The run-folder locks this process holds (folder -> file descriptor): open until released or the process exits."""


def lock_run_folder(folder: Path) -> None:
    """Take ``folder/.lock`` (flock, exclusive) for the rest of this process, so two runs never write one folder.

    flock locks vanish with their process, however it ends, so a killed run leaves no stale lock behind."""
    import fcntl

    path = folder / ".lock"
    if str(folder.resolve()) in _RUN_LOCKS:  # held already by this process (a resume run in the same interpreter)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot open {path} ({e.strerror or e}); run from a writable folder or fix its permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunError(f"cannot lock {path} ({e.strerror or e}); put the run folder on a file system that supports flock") from None
        raise RunError(f"another process is running in {folder} (pid {holder} per .lock); wait for it to end or pass another --run-name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _RUN_LOCKS[str(folder.resolve())] = fd


def unlock_run_folder(folder: Path) -> None:
    """Release the lock ``lock_run_folder`` took (the run is over); nothing if this process does not hold it."""
    fd = _RUN_LOCKS.pop(str(folder.resolve()), None)
    if fd is not None:
        os.close(fd)


def latest_checkpoint(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint whose files all match their crc32c; a corrupt one is skipped with a
    warning (the previous one is used), an incomplete one (no sentinel: a writer killed midway) silently."""
    for ckpt in sorted((p for p in root.glob("ckpt-*") if (p / CHECKPOINT_SENTINEL).is_file()), reverse=True):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            bad = [n for n, crc in meta["files"].items() if _crc32c_of_file(ckpt / f"{n}.npy") != crc]
        except (OSError, ValueError, KeyError) as e:
            bad = [f"meta.json ({e})"]
        if not bad:
            return ckpt, meta
        print(f"warning: checkpoint {ckpt} is corrupt ({', '.join(bad[:3])} {'fails its' if len(bad) == 1 else 'fail their'} check); resuming from the previous one",
              file=sys.stderr)
    return None


def read_checkpoint_array(ckpt: Path, name: str) -> np.ndarray:
    return np.load(ckpt / f"{name}.npy", allow_pickle=False)


def _say_now(text: str) -> None:
    """Write to stderr from a signal handler: os.write, not print, since a signal that lands while the main thread
    writes to sys.stderr would make print re-enter that buffered stream ("RuntimeError: reentrant call")."""
    try:
        os.write(2, text.encode())
    except OSError:  # stderr closed or a broken pipe: the signal must still take effect
        pass


class Interrupt:
    """SIGINT/SIGTERM set ``requested``: the training loop finishes its step, checkpoints and exits. A second
    signal exits at once."""

    def __init__(self):
        import signal

        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        import signal

        if self.requested:
            _say_now(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        _say_now(f"\n{self.requested}: finishing this step and writing a checkpoint (send it again to exit at once)\n")

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def params_digest(params: Any) -> str:
    """A short hash of a parameter tree's values: the teacher's identity in a checkpoint."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


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
