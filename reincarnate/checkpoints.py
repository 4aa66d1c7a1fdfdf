"""Checkpoints of a run and the run folder's lock.

A checkpoint is a folder of .npy arrays (no pickle) and meta.json (counters, schedules, the crc32c of every array
file), written under a temporary name, fsynced, completed by a sentinel file, then renamed into place; older ones
are deleted only after that. A run folder is locked (flock) by the one process that writes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import google_crc32c
import jax
import numpy as np

from reincarnate.errors import RunError

_CHUNK = 1 << 20

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


def params_digest(params: Any) -> str:
    """A short hash of a parameter tree's values: the teacher's identity in a checkpoint."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def tree_arrays(prefix: str, tree) -> dict:
    """A pytree's leaves as named checkpoint arrays (prefix.0, prefix.1, ...)."""
    return {f"{prefix}.{i}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def tree_from(ckpt: Path, prefix: str, template, device):
    """The pytree saved by tree_arrays, in the structure and dtypes of `template`, placed on `device`; a leaf of
    another shape is a RunError (the checkpoint was written by another configuration)."""
    leaves = jax.tree.leaves(template)
    loaded = [read_checkpoint_array(ckpt, f"{prefix}.{i}") for i in range(len(leaves))]
    for a, b in zip(leaves, loaded):
        if np.shape(a) != b.shape:
            raise RunError(f"{ckpt}: {prefix} has a {b.shape} array where this run has {np.shape(a)}; it was written by another configuration")
    cast = [b.astype(np.asarray(a).dtype) for a, b in zip(leaves, loaded)]
    return jax.device_put(jax.tree.unflatten(jax.tree.structure(template), cast), device)
