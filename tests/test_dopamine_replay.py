"""teacher_utils.load_dopamine_replay against Dopamine 4.0.6's own answers.

The fixture (tests/fixtures/dopamine_replay/, see make_dopamine_replay_fixture.py)
was written by Dopamine's ``OutOfGraphReplayBuffer.save``; ``expected.npz``
holds what that buffer's ``is_valid_transition`` and ``sample_transition_batch``
returned for update horizons 1 and 3.  ``horizons/`` holds buffers saved with
update horizon h in (1, 3) and what Dopamine buffers with horizon n in 1..4
did after ``load``-ing them (``is_valid_transition``, the indices
``sample_index_batch`` drew, ``sample_transition_batch``).  Offline, CPU, a few
seconds.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import random
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gcs_emulator import GcsEmulator

import teacher_utils as tu
from reincarnate import downloads
from reincarnate.dopamine_checkpoints import _pick_iteration
from reincarnate.dopamine_replay import _human_size

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dopamine_replay"
RUN = FIXTURE / "run"  # checkpoints/*_ckpt.7.gz + sentinel_checkpoint_complete.7
RUN_LOGS = FIXTURE / "run_logs"  # replay_logs/*_ckpt.2.gz + checkpoints/sentinel_checkpoint_complete.7
NOTFULL = FIXTURE / "notfull"  # plain folder, *_ckpt.0.gz, 110 of 240 rows
HORIZONS = FIXTURE / "horizons"  # <full|notfull>_h<h>/*_ckpt.0.gz: capacity 50, saved by a buffer with update_horizon h
ITERATION = 7
CAPACITY = 240
REQUIRED = ["$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal", "add_count", "invalid_range"]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as z:
        return dict(z)


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch):
    monkeypatch.delenv(tu.BUCKET_URL_ENV, raising=False)
    monkeypatch.delenv(tu.CACHE_ENV, raising=False)


def load(source, **kw) -> tu.DopamineReplay:
    return tu.load_dopamine_replay(source, progress=False, **kw)


def copy_run(tmp_path: Path, src: Path = RUN) -> Path:
    dst = tmp_path / "DQN_400" / "Breakout" / "1"
    shutil.copytree(src, dst)
    return dst


def write_npy_gz(path: Path, array: np.ndarray, level: int = 6) -> None:
    with gzip.open(path, "wb", compresslevel=level) as f:
        np.save(f, array, allow_pickle=False)


def read_npy_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def one_line_error(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "must not chain a numpy/gzip traceback"
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def assert_same_replay(a: tu.DopamineReplay, b: tu.DopamineReplay) -> None:
    for name in ("frames", "actions", "rewards", "terminals", "episode_end_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.add_count, a.capacity, a.cursor, a.iteration) == (b.add_count, b.capacity, b.cursor, b.iteration)
    assert np.array_equal(a.valid_indices(), b.valid_indices())


# ----------------------------------------------------------------------------
# Equal to Dopamine, element for element
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("buffer, source", [("full", RUN), ("notfull", NOTFULL)])
def test_matches_dopamine(expected, buffer, source, horizon):
    replay = load(source, update_horizon=horizon, gamma=float(expected["gamma"]))
    key = f"{buffer}_n{horizon}"
    valid = replay.valid_indices()
    assert valid.dtype == np.int64
    assert np.array_equal(valid, expected[f"{key}_valid"])
    assert np.array_equal(np.flatnonzero(replay.valid_mask()), valid) and replay.valid_mask().dtype == bool

    t = replay.transitions(valid)
    # Dopamine's states are (B, 84, 84, 4), oldest frame first along the last axis.
    for name in ("state", "next_state"):
        assert t[name].dtype == np.uint8 and t[name].shape == (len(valid), 4, 84, 84)
        assert np.array_equal(t[name], np.moveaxis(expected[f"{key}_{name}"], -1, 1)), name
    assert t["action"].dtype == np.int32 and np.array_equal(t["action"], expected[f"{key}_action"])
    assert t["reward"].dtype == np.float32
    assert np.array_equal(t["reward"].view(np.uint32), expected[f"{key}_reward"].view(np.uint32)), "n-step rewards must be bit-exact"
    assert t["terminal"].dtype == bool and np.array_equal(t["terminal"], expected[f"{key}_terminal"].astype(bool))


def test_fixture_exercises_every_rule():
    """The oracle is only as good as the situations it covers: check them."""
    full = load(RUN, update_horizon=3)
    assert full.add_count > 2 * full.capacity and full.is_full and full.capacity == CAPACITY, "the buffer wrapped (twice)"
    assert 0 < full.cursor < full.capacity - 10
    ends = full.episode_end_indices
    assert len(ends) >= 5, "several episode ends"
    truncated = ends[full.terminals[ends] == 0]
    assert len(truncated) >= 2, "a truncated episode end (episode_end=True, terminal False)"
    assert full.terminals.sum() >= 3

    mask = full.valid_mask()
    # Each rule removes something the others do not.
    no_trunc = tu.DopamineReplay(**{**vars(full), "episode_end_indices": np.zeros(0, np.int64)})
    assert (no_trunc.valid_mask() & ~mask).any(), "the truncation rule matters"
    ends_in_stack = np.zeros(full.capacity, bool)
    for k in (1, 2, 3):
        ends_in_stack |= np.roll(full.terminals != 0, k)
    cursor_rows = (full.cursor - 3 + np.arange(7)) % full.capacity
    assert (ends_in_stack & ~np.isin(np.arange(full.capacity), cursor_rows)).any(), "the terminal-in-stack rule matters"
    assert not mask[ends_in_stack].any()
    assert not mask[cursor_rows].any()

    # n-step transitions cut short by a terminal, and full-length ones summing 3 nonzero rewards.
    t = full.transitions(full.valid_indices())
    assert t["terminal"].any() and (~t["terminal"]).any()
    valid = full.valid_indices()
    three = (full.rewards[(valid[:, None] + np.arange(3)) % full.capacity] != 0).all(axis=1) & ~t["terminal"]
    assert three.any()
    # Summing in float64 (or in another float32 order) changes some rewards'
    # last bit, so test_matches_dopamine's bit-exactness is a real check.
    window = (valid[:, None] + np.arange(3)) % full.capacity
    cut = np.where(t["terminal"], (full.terminals[window] != 0).argmax(axis=1) + 1, 3)
    terms = full.rewards[window].astype(np.float64) * 0.99 ** np.arange(3) * (np.arange(3) < cut[:, None])
    assert (terms.sum(axis=1).astype(np.float32) != t["reward"]).any()

    part = load(NOTFULL, update_horizon=3)
    assert not part.is_full and part.cursor == part.add_count == 110
    assert part.valid_indices().min() >= 3 and part.valid_indices().max() < part.cursor - 3


# ----------------------------------------------------------------------------
# Saved with one update horizon, loaded with another: what Dopamine's agent samples
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def horizons_expected() -> dict[str, np.ndarray]:
    with np.load(HORIZONS / "expected.npz") as z:
        return dict(z)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [1, 3])
@pytest.mark.parametrize("buffer", ["full", "notfull"])
def test_valid_rows_are_what_a_loading_dopamine_agent_samples(horizons_expected, buffer, h, n):
    """A buffer saved by an agent with horizon h, loaded with n (the reference's
    TeacherDQNAgent: n = 3 on DQN teachers saved with h = 1): the valid rows are
    exactly the indices Dopamine's own sample_index_batch drew from the loaded
    buffer, whose ``load`` kept the saved invalid_range (h) while its other checks use n."""
    e = horizons_expected
    replay = load(HORIZONS / f"{buffer}_h{h}", update_horizon=n, gamma=float(e["gamma"]))
    key, cap, c = f"{buffer}_h{h}_n{n}", replay.capacity, int(e[f"{buffer}_cursor"])
    assert replay.saved_update_horizon == h and replay.cursor == c and cap == 50
    valid = replay.valid_indices()
    assert np.array_equal(valid, e[f"{key}_sampled"])
    m = max(n, h)
    assert not replay.valid_mask()[(c - m + np.arange(m + 4)) % cap].any(), "rows cursor - max(n, h) ... cursor + 3"

    # The loaded buffer's is_valid_transition alone: the same rows when h >= n
    # (or the buffer is not full); with h < n it also accepts rows
    # cursor - n ... cursor - h - 1 (the fixture keeps them clear of the other
    # rules, so all n - h show), which Dopamine's sampler never draws.
    is_valid = e[f"{key}_is_valid"]
    assert np.isin(valid, is_valid).all()
    extra = np.setdiff1d(is_valid, valid)
    if h < n and buffer == "full":
        assert np.array_equal(extra, (c - n + np.arange(n - h)) % cap)
        # Unsafe rows: the next state of each stacks row `cursor`, the oldest row, from another episode.
        assert ((extra + n - c) % cap < 4).all()
        assert replay.frames[c, 5, 5] != replay.frames[c - 1, 5, 5]
    else:
        assert extra.size == 0

    if f"{key}_state" in e:  # wrapped buffer, h != n: Dopamine's sample_transition_batch of those rows
        t = replay.transitions(valid)
        for name in ("state", "next_state"):
            assert np.array_equal(t[name], np.moveaxis(e[f"{key}_{name}"], -1, 1)), name
        assert np.array_equal(t["action"], e[f"{key}_action"])
        assert np.array_equal(t["reward"].view(np.uint32), e[f"{key}_reward"].view(np.uint32))
        assert np.array_equal(t["terminal"], e[f"{key}_terminal"].astype(bool))


def test_saved_horizon_is_read_from_invalid_range(tmp_path):
    """h = len(invalid_range) - 4 (Dopamine saves h + stack_size rows); the paper's teachers: h = 1."""
    assert load(RUN, update_horizon=3).saved_update_horizon == 1
    assert load(NOTFULL).saved_update_horizon == 1
    run = copy_run(tmp_path)
    c = 558 % CAPACITY
    write_npy_gz(run / "checkpoints" / "invalid_range_ckpt.7.gz", (c - 5 + np.arange(9)) % CAPACITY)  # as an n = 5 saver writes it
    r1 = load(run, update_horizon=1)
    assert r1.saved_update_horizon == 5
    assert not r1.valid_mask()[(c - 5 + np.arange(9)) % CAPACITY].any()
    ref = load(RUN, update_horizon=1)
    assert np.array_equal(r1.valid_mask(), ref.valid_mask() & ~np.isin(np.arange(CAPACITY), (c - 5 + np.arange(9)) % CAPACITY))
    unknown = tu.DopamineReplay(**{**vars(r1), "saved_update_horizon": None})
    assert np.array_equal(unknown.valid_mask(), ref.valid_mask())


def test_other_gamma_is_the_discounted_sum():
    replay = load(RUN, update_horizon=3, gamma=0.9)
    idx = replay.valid_indices()
    t = replay.transitions(idx)
    for j, i in enumerate(idx):
        total, steps = 0.0, 0
        for k in range(3):
            total += 0.9**k * float(replay.rewards[(i + k) % CAPACITY])
            steps = k + 1
            if replay.terminals[(i + k) % CAPACITY]:
                break
        assert math.isclose(t["reward"][j], total, rel_tol=1e-6, abs_tol=1e-6)
        assert np.array_equal(t["next_state"][j, -1], replay.frames[(i + steps) % CAPACITY])


def test_transitions_checks_indices():
    replay = load(RUN)
    with pytest.raises(IndexError):
        replay.transitions([0, CAPACITY])
    assert replay.transitions([])["state"].shape == (0, 4, 84, 84)


def test_bad_update_horizon():
    with pytest.raises(tu.TeacherError, match="update_horizon"):
        load(RUN, update_horizon=0)


# ----------------------------------------------------------------------------
# Where the files are
# ----------------------------------------------------------------------------
def test_layouts_resolve():
    a = load(RUN)
    assert (a.path, a.iteration, a.teacher_iteration) == (RUN / "checkpoints", ITERATION, ITERATION)
    b = load(RUN_LOGS)
    assert (b.path, b.iteration, b.teacher_iteration) == (RUN_LOGS / "replay_logs", (ITERATION + 1) // 4, ITERATION)
    c = load(RUN / "checkpoints")  # a plain folder: the largest complete suffix
    assert (c.path, c.iteration, c.teacher_iteration) == (RUN / "checkpoints", ITERATION, None)
    d = load(RUN_LOGS, iteration=ITERATION)
    assert d.iteration == 2
    assert_same_replay(a, c)
    for x, y in ((a, b), (a, d)):
        assert np.array_equal(x.frames, y.frames) and x.add_count == y.add_count


def test_run_folder_uses_the_teachers_iteration(tmp_path):
    """With a teacher checkpoint present, N is the one load_teacher picks, not the largest replay suffix."""
    run = copy_run(tmp_path)
    ck = run / "checkpoints"
    for r in REQUIRED + ["episode_end_indices"]:  # a newer replay (iteration 9) without a complete teacher
        shutil.copy(ck / f"{r}_ckpt.7.gz", ck / f"{r}_ckpt.9.gz")
    (ck / "ckpt.7").write_bytes(b"teacher 7")
    (ck / "ckpt.9").write_bytes(b"teacher 9 (unfinished: no sentinel)")
    kind, it = _pick_iteration([p.name for p in ck.iterdir()], str(ck), None)
    assert (kind, it) == ("jax", 7)
    assert load(run).iteration == 7
    assert load(run, iteration=9).iteration == 9
    assert load(ck).iteration == 9  # plain folder: largest complete suffix
    (ck / "$store$_reward_ckpt.9.gz").unlink()
    assert load(ck).iteration == 7  # 9 is incomplete now
    with pytest.raises(tu.CheckpointError) as e:
        load(ck, iteration=9)
    one_line_error(e, "$store$_reward_ckpt.9.gz")


def test_replay_logs_with_teacher_checkpoints(tmp_path):
    run = copy_run(tmp_path, RUN_LOGS)
    for n in (3, 7):
        (run / "checkpoints" / f"ckpt.{n}").write_bytes(b"x")
        (run / "checkpoints" / f"sentinel_checkpoint_complete.{n}").write_text("done")
    r = load(run)
    assert (r.path.name, r.iteration, r.teacher_iteration) == ("replay_logs", 2, 7)
    with pytest.raises(tu.CheckpointError) as e:
        load(run, iteration=3)  # (3 + 1) // 4 = 1: not there
    one_line_error(e, "replay_logs/$store$_observation_ckpt.1.gz", "checkpoints/$store$_observation_ckpt.3.gz", "--include-replay", "--teacher-data rollout")


def test_missing_episode_end_indices_is_an_older_checkpoint(tmp_path):
    run = copy_run(tmp_path)
    (run / "checkpoints" / "episode_end_indices_ckpt.7.gz").unlink()
    old = load(run, update_horizon=3)
    assert old.episode_end_indices.size == 0
    new = load(RUN, update_horizon=3)
    assert (new.valid_mask() <= old.valid_mask()).all() and old.valid_mask().sum() > new.valid_mask().sum()


# ----------------------------------------------------------------------------
# Errors: one line naming the file and the fix
# ----------------------------------------------------------------------------
def test_missing_file(tmp_path):
    run = copy_run(tmp_path)
    (run / "checkpoints" / "$store$_reward_ckpt.7.gz").unlink()
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, "$store$_reward_ckpt.7.gz", "python teacher_utils.py download Breakout", "--include-replay", "--teacher-data rollout")


def test_no_replay_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(tu.CheckpointError) as e:
        load(tmp_path / "empty")
    one_line_error(e, "no Dopamine replay in", "--include-replay")
    with pytest.raises(tu.CheckpointError) as e:
        load(tmp_path / "nowhere")
    one_line_error(e, "not a folder")


@pytest.mark.parametrize("name", ["$store$_observation", "$store$_action", "episode_end_indices"])
def test_truncated_gz(tmp_path, name):
    run = copy_run(tmp_path)
    f = run / "checkpoints" / f"{name}_ckpt.7.gz"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, f.name, "truncated", "delete it and download the replay")


def test_corrupt_gz(tmp_path):
    run = copy_run(tmp_path)
    f = run / "checkpoints" / "$store$_observation_ckpt.7.gz"
    raw = bytearray(f.read_bytes())
    raw[-8] ^= 0xFF  # the gzip trailer's crc32: only reading to the end notices
    f.write_bytes(bytes(raw))
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, f.name, "corrupt")


def test_inconsistent_arrays(tmp_path):
    run = copy_run(tmp_path)
    f = run / "checkpoints" / "$store$_terminal_ckpt.7.gz"
    write_npy_gz(f, read_npy_gz(f)[:-1])
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, f.name, "239 rows", "different saves")


def test_frames_of_another_length(tmp_path):
    run = copy_run(tmp_path)
    f = run / "checkpoints" / "$store$_observation_ckpt.7.gz"
    write_npy_gz(f, np.zeros((CAPACITY + 1, 84, 84), np.uint8))
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, f.name, "(241, 84, 84)", "(240, 84, 84)")


def test_wrong_dtype(tmp_path):
    run = copy_run(tmp_path)
    f = run / "checkpoints" / "$store$_action_ckpt.7.gz"
    write_npy_gz(f, read_npy_gz(f).astype(np.float64))
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, f.name, "float64", "int32")


def test_add_count_inconsistent(tmp_path):
    run = copy_run(tmp_path)
    write_npy_gz(run / "checkpoints" / "add_count_ckpt.7.gz", np.array(557))
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, "invalid_range_ckpt.7.gz", "add_count_ckpt.7.gz", "557", "different saves")
    write_npy_gz(run / "checkpoints" / "add_count_ckpt.7.gz", np.array(-1))
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, "add_count_ckpt.7.gz", "non-negative")


def test_episode_end_outside_the_buffer(tmp_path):
    run = copy_run(tmp_path)
    with gzip.open(run / "checkpoints" / "episode_end_indices_ckpt.7.gz", "wb") as f:
        pickle.dump({3, CAPACITY + 5}, f)
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, "episode_end_indices_ckpt.7.gz", str(CAPACITY + 5))


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/REINCARNATE_PWNED_replay",))


def test_malicious_episode_end_pickle_is_refused(tmp_path):
    run = copy_run(tmp_path)
    with gzip.open(run / "checkpoints" / "episode_end_indices_ckpt.7.gz", "wb") as f:
        pickle.dump({1, 2}, f, protocol=2)  # a harmless protocol-2 set still loads
    assert list(load(run).episode_end_indices) == [1, 2]
    with gzip.open(run / "checkpoints" / "episode_end_indices_ckpt.7.gz", "wb") as f:
        pickle.dump(_Boom(), f)
    Path("/tmp/REINCARNATE_PWNED_replay").unlink(missing_ok=True)
    with pytest.raises(tu.CheckpointError) as e:
        load(run)
    one_line_error(e, "refusing to load", "episode_end_indices_ckpt.7.gz", "system")
    assert not Path("/tmp/REINCARNATE_PWNED_replay").exists()


# ----------------------------------------------------------------------------
# gs:// through the local GCS emulator
# ----------------------------------------------------------------------------
BUCKET = "rl_checkpoints"
PREFIX = "DQN_400/Breakout/1"


def make_bucket(root: Path, layout: str) -> None:
    run = root / PREFIX
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt.7").write_bytes(random.Random(7).randbytes(50_000))  # the teacher (not parsed here)
    (run / "checkpoints" / "sentinel_checkpoint_complete.7").write_text("done")
    (run / "checkpoints" / "ckpt.3").write_bytes(b"older teacher")
    (run / "checkpoints" / "sentinel_checkpoint_complete.3").write_text("done")
    if layout == "checkpoints":
        for p in (RUN / "checkpoints").glob("*_ckpt.7.gz"):
            shutil.copy(p, run / "checkpoints" / p.name)
        (run / "checkpoints" / "sum_tree_ckpt.7.gz").write_bytes(b"ignored")
    shutil.copytree(RUN_LOGS / "replay_logs", run / "replay_logs")  # always there: a second copy not to fetch twice


@pytest.mark.parametrize("layout", ["checkpoints", "replay_logs"])
def test_gs_download_announces_size_then_loads(tmp_path, monkeypatch, capsys, layout):
    root, cache = tmp_path / "bucket", tmp_path / "cache"
    make_bucket(root, layout)
    seen: list[tuple[str, str]] = []  # (object, stderr printed before it was fetched)
    printed: list[str] = []
    real = downloads._download_object

    def spy(item, dest, *args, **kwargs):
        printed.append(capsys.readouterr().err)
        seen.append((item["name"], "".join(printed)))
        return real(item, dest, *args, **kwargs)

    monkeypatch.setattr(downloads, "_download_object", spy)
    with GcsEmulator(root, bucket=BUCKET) as emu:
        replay = tu.load_dopamine_replay(f"gs://{BUCKET}/{PREFIX}", cache_dir=cache, base_url=emu.base_url, progress=False)
        printed.append(capsys.readouterr().err)
        folder = "checkpoints" if layout == "checkpoints" else "replay_logs"
        suffix = 7 if layout == "checkpoints" else 2
        files = [f"{PREFIX}/checkpoints/ckpt.7", f"{PREFIX}/checkpoints/sentinel_checkpoint_complete.7"]
        files += [f"{PREFIX}/{folder}/{r}_ckpt.{suffix}.gz" for r in REQUIRED + ["episode_end_indices"]]
        assert sorted(n for n, _ in seen) == sorted(files)  # not sum_tree, not the other layout, not ckpt.3
        total = sum((root / f).stat().st_size for f in files)
        lines = [line for line in "".join(printed).splitlines() if line.startswith("downloading")]
        local = cache / BUCKET / PREFIX
        assert lines == [f"downloading the teacher's replay for iteration 7: {_human_size(total)} in {len(files)} files to {local}"]
        assert all("downloading the teacher's replay" in before for _, before in seen), "announced before the first byte"
        assert {o.object_name for o in emu.object_gets()} == set(files)

        assert replay.path == local / folder and replay.iteration == suffix and replay.teacher_iteration == 7
        assert_same_replay(replay, load(RUN if layout == "checkpoints" else RUN_LOGS))

        # Cached: no announcement, no object fetched again.
        emu.clear_requests()
        seen.clear()
        printed.clear()
        again = tu.load_dopamine_replay(f"gs://{BUCKET}/{PREFIX}", cache_dir=cache, base_url=emu.base_url, progress=False)
        assert "downloading" not in capsys.readouterr().err
        assert emu.object_gets() == []
        assert_same_replay(again, replay)


def test_gs_without_replay(tmp_path):
    root = tmp_path / "bucket"
    make_bucket(root, "checkpoints")
    shutil.rmtree(root / PREFIX / "replay_logs")
    (root / PREFIX / "checkpoints" / "$store$_action_ckpt.7.gz").unlink()
    with GcsEmulator(root, bucket=BUCKET) as emu:
        with pytest.raises(tu.CheckpointError) as e:
            tu.load_dopamine_replay(f"gs://{BUCKET}/{PREFIX}", cache_dir=tmp_path / "cache", base_url=emu.base_url, progress=False)
        one_line_error(e, "no complete replay for iteration 7", "--teacher-data rollout")
        assert emu.object_gets() == []


# ----------------------------------------------------------------------------
# Streaming: no second copy of the frames
# ----------------------------------------------------------------------------
def test_frames_are_streamed_without_a_second_copy(tmp_path):
    cap = 12_000  # 85 MB of frames
    folder = tmp_path / "big"
    folder.mkdir()
    rows = np.arange(cap)
    frames = np.empty((cap, 84, 84), np.uint8)
    frames[:] = (np.arange(84, dtype=np.uint8)[None, None, :] + (rows % 251).astype(np.uint8)[:, None, None])
    frames[:, 0, 0] = rows % 256
    write_npy_gz(folder / "$store$_observation_ckpt.0.gz", frames, level=1)
    probe = frames[[0, 4_321, cap - 1]].copy()
    nbytes = frames.nbytes
    del frames
    write_npy_gz(folder / "$store$_action_ckpt.0.gz", (rows % 6).astype(np.int32))
    write_npy_gz(folder / "$store$_reward_ckpt.0.gz", np.zeros(cap, np.float32))
    write_npy_gz(folder / "$store$_terminal_ckpt.0.gz", (rows % 1000 == 999).astype(np.uint8))
    add_count = 3 * cap + 17
    write_npy_gz(folder / "add_count_ckpt.0.gz", np.array(add_count))
    write_npy_gz(folder / "invalid_range_ckpt.0.gz", (add_count % cap - 1 + np.arange(5)) % cap)

    tracemalloc.start()
    try:
        replay = load(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert replay.frames.nbytes == nbytes
    assert peak >= nbytes, "tracemalloc sees numpy's allocation"
    assert peak < 1.3 * nbytes, f"peak {peak / 1e6:.1f} MB for {nbytes / 1e6:.1f} MB of frames"
    assert np.array_equal(replay.frames[[0, 4_321, cap - 1]], probe)
    assert replay.is_full and replay.cursor == 17
