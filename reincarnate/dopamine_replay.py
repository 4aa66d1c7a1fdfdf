"""The teacher's own replay: a Dopamine ``OutOfGraphReplayBuffer`` as its agent saved it (``<name>_ckpt.<N>.gz`` files),
found in a run folder or downloaded from the bucket, streamed into one frame array (:func:`load_dopamine_replay`),
with exactly the valid indices and n-step transitions a Dopamine agent samples (:class:`DopamineReplay`)."""

from __future__ import annotations

import ast
import dataclasses
import io
import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reincarnate.dopamine_checkpoints import _SAFE_GLOBALS, _checkpoint_iterations, _latin1_bytes, _pick_iteration, _tf_checkpoint_file_hint
from reincarnate.downloads import _plan_prefix, default_cache_dir
from reincarnate.errors import CheckpointError, TeacherError
from reincarnate.saved_models import _flax_model_source


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
