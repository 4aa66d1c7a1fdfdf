"""Dopamine's checkpoint files, read without TensorFlow or Dopamine.

- :func:`read_tf_checkpoint` / :func:`list_tf_checkpoint` -- a pure-Python TensorFlow tensor-bundle reader
  (``tf_ckpt-<N>.index`` + ``.data-*``), every block and tensor checked against its masked crc32c.
- :func:`load_jax_checkpoint` -- a restricted (safe) unpickler for Dopamine's ``ckpt.<N>`` JAX checkpoints.
- ``_pick_iteration`` -- which checkpoint of a run's ``checkpoints/`` folder (or bucket listing) is the latest
  complete one.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Iterable

import google_crc32c
import jax.numpy as jnp
import numpy as np

from reincarnate.errors import CheckpointError


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
# Which checkpoint of a run: the latest complete iteration
# ----------------------------------------------------------------------------
_SENTINEL = "sentinel_checkpoint_complete."


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
