"""Offline tests of the bucket downloader (teacher_utils.download_teacher & co).

Every test serves a folder built in tmp_path through tests/gcs_emulator.py on
127.0.0.1; file contents are random bytes (the downloader does not parse them).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gcs_emulator import GcsEmulator

import teacher_utils as tu

BUCKET = "rl_checkpoints"
RUN = "DQN_400/Breakout/1"  # object-name prefix of the run most tests use


# ----------------------------------------------------------------------------
# Building the served bucket
# ----------------------------------------------------------------------------
def put(root: Path, name: str, size: int = 300_000, seed: int | None = None) -> bytes:
    """Write object ``name`` under ``root`` with ``size`` random bytes; return them."""
    rnd = random.Random(name if seed is None else seed)
    data = rnd.randbytes(size)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def put_text(root: Path, name: str, text: str) -> bytes:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text.encode()


def make_jax_run(root: Path, prefix: str = RUN) -> None:
    """Dopamine JAX run: iterations 3 and 5 complete, 6 unfinished (no sentinel), plus replay."""
    for n in (3, 5, 6):
        put(root, f"{prefix}/checkpoints/ckpt.{n}", 250_000 + n)
        put(root, f"{prefix}/checkpoints/$store$_observation_ckpt.{n}.gz", 120_000)
        put(root, f"{prefix}/checkpoints/$store$_action_ckpt.{n}.gz", 20_000)
        put(root, f"{prefix}/checkpoints/add_count_ckpt.{n}.gz", 1_000)
    for n in (3, 5):
        put_text(root, f"{prefix}/checkpoints/sentinel_checkpoint_complete.{n}", "done")
    # Replay log holding iteration 5's transitions: suffix (5 + 1) // 4 = 1.
    put(root, f"{prefix}/replay_logs/$store$_observation_ckpt.1.gz", 150_000)
    put(root, f"{prefix}/replay_logs/$store$_action_ckpt.1.gz", 10_000)


def make_tf_run(root: Path, prefix: str = RUN) -> None:
    """Dopamine TF run: iterations 3 and 4 complete, 5 unfinished (index only, no sentinel)."""
    for n in (3, 4):
        put(root, f"{prefix}/checkpoints/tf_ckpt-{n}.index", 5_000 + n)
        put(root, f"{prefix}/checkpoints/tf_ckpt-{n}.data-00000-of-00001", 300_000 + n)
        put(root, f"{prefix}/checkpoints/tf_ckpt-{n}.meta", 40_000)
        put(root, f"{prefix}/checkpoints/ckpt.{n}", 2_000)  # Dopamine's small bookkeeping pickle
        put_text(root, f"{prefix}/checkpoints/sentinel_checkpoint_complete.{n}", "done")
    put(root, f"{prefix}/checkpoints/tf_ckpt-5.index", 5_005)
    put_text(
        root,
        f"{prefix}/checkpoints/checkpoint",
        'model_checkpoint_path: "tf_ckpt-4"\n'
        'all_model_checkpoint_paths: "tf_ckpt-3"\n'
        'all_model_checkpoint_paths: "tf_ckpt-4"\n',
    )


def local_files(folder: Path) -> set[str]:
    """Relative posix paths of every file under ``folder``."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def assert_mirrors(local_run: Path, root: Path, rels: set[str], prefix: str = RUN) -> None:
    """``local_run/<rel>`` is byte-identical to object ``<prefix>/<rel>`` for every rel."""
    for rel in rels:
        assert (local_run / rel).read_bytes() == (root / prefix / rel).read_bytes(), rel


JAX_LATEST = {"checkpoints/ckpt.5", "checkpoints/sentinel_checkpoint_complete.5"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "bucket"
    r.mkdir()
    return r


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def emu(root: Path):
    with GcsEmulator(root, bucket=BUCKET) as e:  # page size 2: every listing is paginated
        yield e


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch):
    """Tests choose the endpoint explicitly; a developer's mirror setting must not leak in."""
    monkeypatch.delenv(tu.BUCKET_URL_ENV, raising=False)
    monkeypatch.delenv("REINCARNATE_CACHE", raising=False)


# ----------------------------------------------------------------------------
# The emulator itself (so a failure below is not a fake-server bug)
# ----------------------------------------------------------------------------
def test_emulator_serves_listing_and_ranges(root, emu):
    import base64
    import hashlib
    import json
    import urllib.request

    data = put(root, "a/$store$_x", 1000)
    put(root, "a/b", 10)
    put(root, "a/c", 10)
    with urllib.request.urlopen(f"{emu.base_url}/storage/v1/b/{BUCKET}/o?prefix=a/") as r:
        page = json.loads(r.read())
    assert [it["name"] for it in page["items"]] == ["a/$store$_x", "a/b"]
    assert page["items"][0]["size"] == "1000"
    assert page["items"][0]["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert "nextPageToken" in page
    with urllib.request.urlopen(f"{emu.base_url}/storage/v1/b/{BUCKET}/o?prefix=nothing/") as r:
        assert "items" not in json.loads(r.read())
    req = urllib.request.Request(emu.object_url("a/$store$_x"), headers={"Range": "bytes=900-"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == "bytes 900-999/1000"
        assert r.read() == data[900:]
    assert emu.object_gets("a/$store$_x")[0].path == f"/{BUCKET}/a/%24store%24_x"


# ----------------------------------------------------------------------------
# game_from_env_id
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env_id, game",
    [
        ("Breakout-v5", "Breakout"),
        ("SpaceInvaders-v5", "SpaceInvaders"),
        ("MontezumaRevenge-v5", "MontezumaRevenge"),
        ("Pong-v5", "Pong"),
    ],
)
def test_game_from_env_id(env_id, game):
    assert tu.game_from_env_id(env_id) == game


# ----------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------
def test_list_bucket_follows_pagination(root, emu):
    make_jax_run(root)
    expected = emu.object_names(RUN + "/")
    assert len(expected) == 16  # 8 pages of 2

    items = tu.list_bucket(RUN + "/", base_url=emu.base_url)

    assert [it["name"] for it in items] == expected
    assert items[0] == emu.metadata(expected[0])  # items as GCS gives them (size is a string)
    lists = emu.list_requests()
    assert len(lists) == 8
    assert sum("pageToken=" in r.path for r in lists) == 7
    assert all(r.object_name == RUN + "/" for r in lists)


def test_download_with_many_pages(root, cache, tmp_path):
    """Page size 1: the checkpoint files sit on late pages of a long listing."""
    make_jax_run(root)
    for i in range(30):  # unrelated objects listed before checkpoints/ ("aaa" < "checkpoints")
        put(root, f"{RUN}/aaa_logs/log_{i:02d}", 100)
    with GcsEmulator(root, bucket=BUCKET, page_size=1) as emu:
        run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
        assert len(emu.list_requests()) == len(emu.object_names(RUN + "/"))
    assert local_files(run) == JAX_LATEST
    assert_mirrors(run, root, JAX_LATEST)


# ----------------------------------------------------------------------------
# Full downloads
# ----------------------------------------------------------------------------
def test_jax_run_picks_latest_complete_iteration(root, cache, emu):
    make_jax_run(root)

    run = tu.download_teacher("Breakout", 1, cache_dir=cache, base_url=emu.base_url, progress=False)

    # ckpt.6 has no sentinel, so 5 is the latest complete iteration; no replay by default.
    assert local_files(run) == JAX_LATEST
    assert_mirrors(run, root, JAX_LATEST)
    assert list(cache.rglob("*.part")) == []
    assert {r.object_name for r in emu.object_gets()} == {f"{RUN}/{rel}" for rel in JAX_LATEST}


def test_returned_folder_mirrors_bucket_layout(root, cache, emu):
    """The run folder is <cache_dir>/<bucket>/<agent>/<Game>/<run>/ (gs:// addresses may name other buckets)."""
    make_jax_run(root)
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert run == cache / "rl_checkpoints" / "DQN_400" / "Breakout" / "1"


def test_env_id_accepted_as_game(root, cache, emu):
    make_jax_run(root)
    run = tu.download_teacher("Breakout-v5", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert run.parts[-3:] == ("DQN_400", "Breakout", "1")
    assert local_files(run) == JAX_LATEST


def test_other_run_and_agent(root, cache, emu):
    make_jax_run(root, "DQN_400/Breakout/2")
    make_jax_run(root, "Rainbow/Breakout/1")
    run = tu.download_teacher("Breakout", run=2, cache_dir=cache, base_url=emu.base_url, progress=False)
    assert run.parts[-3:] == ("DQN_400", "Breakout", "2")
    assert_mirrors(run, root, JAX_LATEST, "DQN_400/Breakout/2")
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False, agent="Rainbow")
    assert run.parts[-3:] == ("Rainbow", "Breakout", "1")
    assert_mirrors(run, root, JAX_LATEST, "Rainbow/Breakout/1")


def test_tf_run(root, cache, emu):
    make_tf_run(root)

    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    expected = {
        "checkpoints/tf_ckpt-4.index",
        "checkpoints/tf_ckpt-4.data-00000-of-00001",
        "checkpoints/checkpoint",
        "checkpoints/sentinel_checkpoint_complete.4",
        "checkpoints/ckpt.4",
    }
    assert local_files(run) == expected
    assert_mirrors(run, root, expected)
    assert list(cache.rglob("*.part")) == []


def test_tf_run_explicit_iteration(root, cache, emu):
    make_tf_run(root)
    run = tu.download_teacher("Breakout", iteration=3, cache_dir=cache, base_url=emu.base_url, progress=False)
    picked = {
        "checkpoints/tf_ckpt-3.index",
        "checkpoints/tf_ckpt-3.data-00000-of-00001",
        "checkpoints/sentinel_checkpoint_complete.3",
        "checkpoints/ckpt.3",
    }
    assert picked <= local_files(run)
    assert local_files(run) - picked <= {"checkpoints/checkpoint"}
    assert_mirrors(run, root, local_files(run))


def test_jax_run_explicit_iteration(root, cache, emu):
    make_jax_run(root)
    run = tu.download_teacher("Breakout", iteration=3, cache_dir=cache, base_url=emu.base_url, progress=False)
    expected = {"checkpoints/ckpt.3", "checkpoints/sentinel_checkpoint_complete.3"}
    assert local_files(run) == expected
    assert_mirrors(run, root, expected)


def test_missing_iteration_is_a_teacher_error(root, cache, emu):
    make_jax_run(root)
    with pytest.raises(tu.TeacherError) as e:
        tu.download_teacher("Breakout", iteration=42, cache_dir=cache, base_url=emu.base_url, progress=False)
    assert "42" in str(e.value)
    assert "\n" not in str(e.value)
    assert emu.object_gets() == []


def test_replay_skipped_by_default_and_fetched_on_request(root, cache, emu):
    make_jax_run(root)

    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert not any("$store$" in f or f.startswith("replay_logs/") for f in local_files(run))
    assert not any("%24" in r.path for r in emu.object_gets())

    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False, include_replay=True)
    replay = {
        "checkpoints/$store$_observation_ckpt.5.gz",
        "checkpoints/$store$_action_ckpt.5.gz",
        "replay_logs/$store$_observation_ckpt.1.gz",
    }
    assert JAX_LATEST | replay <= local_files(run)
    assert_mirrors(run, root, local_files(run))
    # `$` travels percent-encoded.
    paths = {r.path for r in emu.object_gets()}
    assert f"/{BUCKET}/{RUN}/replay_logs/%24store%24_observation_ckpt.1.gz" in paths
    assert list(cache.rglob("*.part")) == []


# ----------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------
def test_cut_connection_is_resumed_with_range(root, cache, emu):
    make_jax_run(root)
    name = f"{RUN}/checkpoints/ckpt.5"
    emu.cut_after[name] = 100_000

    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    gets = emu.object_gets(name)
    assert [g.range for g in gets] == [None, "bytes=100000-"]
    assert gets[1].status == 206
    assert (run / "checkpoints/ckpt.5").read_bytes() == (root / name).read_bytes()
    assert list(cache.rglob("*.part")) == []


def test_cut_connection_with_progress_bar(root, cache, emu):
    make_jax_run(root)
    name = f"{RUN}/checkpoints/ckpt.5"
    emu.cut_after[name] = 12_345
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=True)
    assert [g.range for g in emu.object_gets(name)] == [None, "bytes=12345-"]
    assert_mirrors(run, root, JAX_LATEST)


def test_leftover_part_file_is_resumed(root, cache, emu):
    """A .part left by an interrupted earlier process is continued, not restarted."""
    make_jax_run(root)
    name = f"{RUN}/checkpoints/ckpt.5"
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
    final = run / "checkpoints/ckpt.5"
    # Simulate the earlier process dying after 70,000 bytes.
    final.with_name("ckpt.5.part").write_bytes(final.read_bytes()[:70_000])
    final.unlink()
    emu.clear_requests()

    again = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    assert again == run
    assert [g.range for g in emu.object_gets(name)] == ["bytes=70000-"]
    assert final.read_bytes() == (root / name).read_bytes()
    assert not final.with_name("ckpt.5.part").exists()


def test_cached_files_are_reused(root, cache, emu):
    make_jax_run(root)
    first = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert len(emu.object_gets()) == 2
    emu.clear_requests()

    second = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    assert second == first
    assert emu.object_gets() == []  # only the listing is fetched again
    assert len(emu.list_requests()) >= 1
    assert_mirrors(second, root, JAX_LATEST)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def test_md5_mismatch_is_a_download_error(root, cache, emu):
    make_jax_run(root)
    name = f"{RUN}/checkpoints/ckpt.5"
    emu.corrupt_listing_md5[name] = True

    with pytest.raises(tu.DownloadError) as e:
        tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    assert name in str(e.value)
    assert "\n" not in str(e.value)
    assert list(cache.rglob("ckpt.5")) == []  # never under the final name
    assert emu.object_gets(name)  # it was fetched, then rejected


def test_missing_object_is_a_download_error(root, cache, emu):
    make_jax_run(root)
    name = f"{RUN}/checkpoints/ckpt.5"
    emu.hide_object[name] = True

    with pytest.raises(tu.DownloadError) as e:
        tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)

    assert name in str(e.value)
    assert "\n" not in str(e.value)
    assert list(cache.rglob("ckpt.5")) == []


def test_missing_replay_object_names_it_with_dollar(root, cache, emu):
    make_jax_run(root)
    name = f"{RUN}/replay_logs/$store$_observation_ckpt.1.gz"
    emu.hide_object[name] = True
    with pytest.raises(tu.DownloadError) as e:
        tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False, include_replay=True)
    assert name in str(e.value)


def test_unknown_game_names_the_prefix(root, cache, emu):
    make_jax_run(root)
    with pytest.raises(tu.TeacherError) as e:
        tu.download_teacher("Pongg", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert "gs://rl_checkpoints/DQN_400/Pongg/1" in str(e.value)
    assert "\n" not in str(e.value)
    assert emu.object_gets() == []


def test_empty_bucket_names_the_prefix(cache, emu):
    with pytest.raises(tu.TeacherError) as e:
        tu.download_teacher("Breakout", run=3, cache_dir=cache, base_url=emu.base_url, progress=False)
    assert "gs://rl_checkpoints/DQN_400/Breakout/3" in str(e.value)


def test_unreachable_endpoint_is_a_download_error(cache):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tu.DownloadError) as e:
        tu.download_teacher("Breakout", cache_dir=cache, base_url=f"http://127.0.0.1:{port}", progress=False)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# Endpoint selection and gs:// addresses
# ----------------------------------------------------------------------------
def test_base_url_from_env_var(root, cache, emu, monkeypatch):
    make_jax_run(root)
    monkeypatch.setenv(tu.BUCKET_URL_ENV, emu.base_url)

    run = tu.download_teacher("Breakout", cache_dir=cache, progress=False)

    assert local_files(run) == JAX_LATEST
    assert len(emu.object_gets()) == 2
    assert tu.list_bucket(RUN + "/") == tu.list_bucket(RUN + "/", base_url=emu.base_url)


def test_base_url_argument_wins_over_env_var(root, cache, emu, monkeypatch):
    make_jax_run(root)
    monkeypatch.setenv(tu.BUCKET_URL_ENV, "http://127.0.0.1:9/nowhere")  # discard port: must not be used
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url, progress=False)
    assert_mirrors(run, root, JAX_LATEST)


def test_base_url_trailing_slash(root, cache, emu):
    make_jax_run(root)
    run = tu.download_teacher("Breakout", cache_dir=cache, base_url=emu.base_url + "/", progress=False)
    assert local_files(run) == JAX_LATEST


@pytest.mark.parametrize("address", [f"gs://{BUCKET}/{RUN}", f"gs://{BUCKET}/{RUN}/"])
def test_download_gs_matches_download_teacher(root, tmp_path, emu, address):
    make_jax_run(root)
    via_teacher = tu.download_teacher("Breakout", cache_dir=tmp_path / "a", base_url=emu.base_url, progress=False)
    via_gs = tu.download_gs(address, cache_dir=tmp_path / "b", base_url=emu.base_url, progress=False)

    assert via_gs.relative_to(tmp_path / "b") == via_teacher.relative_to(tmp_path / "a")
    assert local_files(via_gs) == local_files(via_teacher) == JAX_LATEST
    assert_mirrors(via_gs, root, JAX_LATEST)


def test_download_gs_options(root, cache, emu):
    make_jax_run(root)
    run = tu.download_gs(f"gs://{BUCKET}/{RUN}", cache_dir=cache, iteration=3, include_replay=True, base_url=emu.base_url, progress=False)
    assert {"checkpoints/ckpt.3", "checkpoints/sentinel_checkpoint_complete.3", "checkpoints/$store$_observation_ckpt.3.gz"} <= local_files(run)
    assert "checkpoints/ckpt.5" not in local_files(run)
    assert_mirrors(run, root, local_files(run))


# ---------------------------------------------------------------- command line, real checkpoint
def test_cli_download_fetches_and_loads_a_real_checkpoint(root, cache, emu, fixture_copy, tmp_path):
    """`python teacher_utils.py download` against the emulator serving a real Dopamine checkpoint."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(fixture_copy("teacher_jax_linen") / "checkpoints", root / RUN / "checkpoints")
    script = Path(tu.__file__).resolve()
    r = subprocess.run([sys.executable, str(script), "download", "Breakout-v5", "--cache-dir", str(cache), "--base-url", emu.base_url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "jax checkpoint, iteration 5, 4 actions" in r.stdout
    local = cache / BUCKET / RUN / "checkpoints"
    assert sorted(p.name for p in local.iterdir()) == ["ckpt.5", "sentinel_checkpoint_complete.5"]
    assert (local / "ckpt.5").read_bytes() == (root / RUN / "checkpoints" / "ckpt.5").read_bytes()

    r = subprocess.run([sys.executable, str(script), "download", "Pongg", "--cache-dir", str(cache), "--base-url", emu.base_url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("error: nothing at gs://rl_checkpoints/DQN_400/Pongg/1/") and len(r.stderr.strip().splitlines()) == 1
