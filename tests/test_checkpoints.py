"""Teacher checkpoints: the TF bundle reader, the safe pickle loader and
load_teacher, on fixtures written by TensorFlow's Saver and by pickle of real
jax/flax/optax objects (see tests/fixtures/README.md)."""

import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import teacher_utils as tu
from bundle_table import data_block_handles, index_handle
from reincarnate.dopamine_checkpoints import _masked_crc32c, _read_bundle_index

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
TEACHERS = {
    "teacher_tf": ("tf", 3, "tf-weights/biases"),
    "teacher_tf_keras": ("tf", 1, "tf-kernel/bias"),
    "teacher_jax_linen": ("jax", 5, "linen"),
    "teacher_jax_prelinen": ("jax", 2, "pre-linen"),
}


def _expected_bundle(fixture_copy):
    data = np.load(fixture_copy("tf_bundle_dtypes") / "expected.npz")
    out = {}
    for key in data.files:
        if key.startswith("__bf16__:"):
            out[key[len("__bf16__:") :]] = data[key].view(jax.numpy.bfloat16)
        else:
            out[key] = data[key]
    return out


# ---------------------------------------------------------------- TF reader
def test_tf_reader_is_bit_exact_for_every_dtype(fixture_copy):
    prefix = fixture_copy("tf_bundle_dtypes") / "bundle-7"
    got = tu.read_tf_checkpoint(prefix)
    want = _expected_bundle(fixture_copy)
    assert set(got) == set(want)
    dtypes = set()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name  # bit-exact, NaN payloads included
        dtypes.add(g.dtype.name)
    assert {"float32", "float64", "int32", "uint8", "int64", "bool", "float16", "bfloat16"} <= dtypes


def test_tf_reader_reads_a_subset_and_lists_without_reading_data(fixture_copy, tmp_path):
    src = fixture_copy("tf_bundle_dtypes")
    listing = tu.list_tf_checkpoint(src / "bundle-7.index")
    want = _expected_bundle(fixture_copy)
    assert {k: v[0] for k, v in listing.items()} == {k: v.shape for k, v in want.items()}
    some = sorted(want)[:3]
    got = tu.read_tf_checkpoint(src / "bundle-7", names=some)
    assert sorted(got) == some
    with pytest.raises(tu.CheckpointError, match="no variable 'nope'"):
        tu.read_tf_checkpoint(src / "bundle-7", names=["nope"])


def test_tf_index_has_several_data_blocks(fixture_copy):
    index = (fixture_copy("tf_bundle_dtypes") / "bundle-7.index").read_bytes()
    assert len(data_block_handles(index)) >= 2, "fixture should exercise more than one data block"


def _copy_bundle(src: Path, dst: Path, prefix: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob(prefix + ".*"):
        shutil.copy(f, dst / f.name)
    return dst / prefix


def test_tf_reader_reports_a_corrupt_index_block(fixture_copy, tmp_path):
    prefix = _copy_bundle(fixture_copy("tf_bundle_dtypes"), tmp_path, "bundle-7")
    index = bytearray(prefix.with_name("bundle-7.index").read_bytes())
    index[100] ^= 0x40  # inside the first data block
    prefix.with_name("bundle-7.index").write_bytes(bytes(index))
    with pytest.raises(tu.CheckpointError, match="crc32c mismatch in the block"):
        tu.read_tf_checkpoint(prefix)


def test_tf_reader_reports_a_corrupt_tensor(fixture_copy, tmp_path):
    prefix = _copy_bundle(fixture_copy("teacher_tf") / "checkpoints", tmp_path, "tf_ckpt-3")
    data = prefix.with_name("tf_ckpt-3.data-00000-of-00001")
    entries = _read_bundle_index(prefix)[1]
    victim = entries["Online/fully_connected/weights"]
    raw = bytearray(data.read_bytes())
    raw[victim.offset + victim.size // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(tu.CheckpointError, match="crc32c mismatch in variable 'Online/fully_connected/weights'"):
        tu.read_tf_checkpoint(prefix)
    # The loader surfaces the same error with a non-zero exit from the CLI.
    r = subprocess.run([sys.executable, str(ROOT / "teacher_utils.py"), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "crc32c mismatch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_tf_reader_reports_truncated_files(fixture_copy, tmp_path):
    prefix = _copy_bundle(fixture_copy("teacher_tf") / "checkpoints", tmp_path / "a", "tf_ckpt-3")
    data = prefix.with_name("tf_ckpt-3.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(tu.CheckpointError, match="truncated"):
        tu.read_tf_checkpoint(prefix)

    prefix = _copy_bundle(fixture_copy("teacher_tf") / "checkpoints", tmp_path / "b", "tf_ckpt-3")
    index = prefix.with_name("tf_ckpt-3.index")
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(tu.CheckpointError, match="truncated|footer magic"):
        tu.read_tf_checkpoint(prefix)
    index.write_bytes(b"\x00" * 20)
    with pytest.raises(tu.CheckpointError, match="truncated"):
        tu.read_tf_checkpoint(prefix)


def test_tf_reader_refuses_snappy_blocks(fixture_copy, tmp_path):
    prefix = _copy_bundle(fixture_copy("tf_bundle_dtypes"), tmp_path, "bundle-7")
    path = prefix.with_name("bundle-7.index")
    index = bytearray(path.read_bytes())
    off, size = index_handle(bytes(index))
    index[off + size] = 1  # compression type: snappy, with a valid crc so only the type is wrong
    index[off + size + 1 : off + size + 5] = struct.pack("<I", _masked_crc32c(bytes(index[off : off + size + 1])))
    path.write_bytes(bytes(index))
    with pytest.raises(tu.CheckpointError, match="snappy"):
        tu.read_tf_checkpoint(prefix)


def test_tf_reader_refuses_string_tensors(fixture_copy):
    folder = fixture_copy("tf_bundle_string")
    prefix = next(folder.glob("*.index")).with_suffix("")
    listing = tu.list_tf_checkpoint(prefix)
    strings = [n for n, (_, dt) in listing.items() if dt == "string"]
    assert strings
    with pytest.raises(tu.CheckpointError, match="unsupported dtype string"):
        tu.read_tf_checkpoint(prefix)
    floats = [n for n in listing if n not in strings]
    assert set(tu.read_tf_checkpoint(prefix, names=floats)) == set(floats)


# ---------------------------------------------------------------- network and loader
@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_network_reproduces_the_writers_q_values(fixture_copy, name):
    expected = np.load(FIXTURES / "expected_q.npz")
    params = tu.load_teacher_params(fixture_copy(name), num_actions=4)
    q = jax.jit(tu.DopamineNatureDQN(4).apply)(params, expected["states"])
    assert q.shape == (8, 4)
    np.testing.assert_allclose(np.asarray(q), expected["q"], atol=1e-5, rtol=0)
    # The Q-values are not degenerate: the greedy action varies across states.
    assert len(set(np.argmax(expected["q"], axis=1))) > 1


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_load_teacher_detects_kind_naming_and_iteration(fixture_copy, name):
    kind, iteration, naming = TEACHERS[name]
    run = fixture_copy(name)
    for source in (run, run / "checkpoints"):
        t = tu.load_teacher(source)
        assert (t.kind, t.iteration, t.naming, t.num_actions) == (kind, iteration, naming, 4)
    shapes = {layer: {k: v.shape for k, v in leaves.items()} for layer, leaves in t.params["params"].items()}
    assert shapes == tu.expected_param_shapes(4)


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_load_teacher_reads_the_target_network_too(fixture_copy, name):
    """Dopamine's checkpoints hold the target network (TF: Target/..., JAX: target_params), which fine-tuning starts
    its target from, as ReloadedDQNAgent.reload_checkpoint. The fixtures were saved right after a sync (target ==
    online); a JAX checkpoint whose target differs shows that the target, not the online network, is read."""
    t = tu.load_teacher(fixture_copy(name))
    assert t.target_params is not None
    jax.tree.map(np.testing.assert_array_equal, t.target_params, t.params)


def test_load_teacher_reads_a_target_that_differs_from_the_online_network(fixture_copy, tmp_path):
    data = tu.load_jax_checkpoint(fixture_copy("teacher_jax_linen") / "checkpoints" / "ckpt.5")
    del data["optimizer_state"]  # (read back as plain records, which pickle.dumps cannot write as optax's)
    data["target_params"] = {"params": {layer: {k: np.asarray(v) + 0.5 for k, v in leaves.items()}
                                        for layer, leaves in data["online_params"]["params"].items()}}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt.5").write_bytes(pickle.dumps(data))
    (tmp_path / "checkpoints" / "sentinel_checkpoint_complete.5").write_text("")
    t = tu.load_teacher(tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + np.float32(0.5)), t.target_params, t.params)
    del data["target_params"]
    (tmp_path / "checkpoints" / "ckpt.5").write_bytes(pickle.dumps(data))
    assert tu.load_teacher(tmp_path).target_params is None  # none held: fine-tuning starts its target from the online weights


def test_all_fixtures_hold_the_same_weights(fixture_copy):
    loaded = [tu.load_teacher(fixture_copy(n)).params for n in sorted(TEACHERS)]
    for other in loaded[1:]:
        jax.tree.map(np.testing.assert_array_equal, loaded[0], other)


def test_single_file_and_prefix_sources(fixture_copy):
    ckpts = fixture_copy("teacher_tf") / "checkpoints"
    for src in (ckpts / "tf_ckpt-3", ckpts / "tf_ckpt-3.index", ckpts / "tf_ckpt-3.data-00000-of-00001"):
        t = tu.load_teacher(src)
        assert (t.kind, t.iteration) == ("tf", 3)
    t = tu.load_teacher(fixture_copy("teacher_jax_linen") / "checkpoints" / "ckpt.5")
    assert (t.kind, t.iteration) == ("jax", 5)


def test_latest_complete_iteration_is_picked(fixture_copy, tmp_path):
    src = fixture_copy("teacher_jax_linen") / "checkpoints"
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    for n in (3, 5, 7):  # 7 has no sentinel: an unfinished save
        os.symlink(src / "ckpt.5", ck / f"ckpt.{n}")
    for n in (3, 5):
        (ck / f"sentinel_checkpoint_complete.{n}").write_text("done")
    assert tu.load_teacher(tmp_path / "run").iteration == 5
    assert tu.load_teacher(tmp_path / "run", iteration=3).path.name == "ckpt.3"
    with pytest.raises(tu.CheckpointError, match="iteration 9 is not in"):
        tu.load_teacher(tmp_path / "run", iteration=9)
    for n in (3, 5):
        (ck / f"sentinel_checkpoint_complete.{n}").unlink()
    with pytest.raises(tu.CheckpointError, match="no complete checkpoint"):
        tu.load_teacher(tmp_path / "run")


def test_tf_latest_uses_sentinels_then_checkpoint_file(fixture_copy, tmp_path):
    src = fixture_copy("teacher_tf") / "checkpoints"
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for n in (2, 3, 4):
        for suffix in (".index", ".data-00000-of-00001"):
            os.symlink(src / f"tf_ckpt-3{suffix}", ck / f"tf_ckpt-{n}{suffix}")
    (ck / "checkpoint").write_text('model_checkpoint_path: "/gcs/old/path/tf_ckpt-3"\nall_model_checkpoint_paths: "tf_ckpt-3"\n')
    assert tu.load_teacher(ck).iteration == 3  # no sentinels: TF's checkpoint file decides
    (ck / "checkpoint").unlink()
    assert tu.load_teacher(ck).iteration == 4  # nothing else: the largest complete bundle
    (ck / "sentinel_checkpoint_complete.2").write_text("done")
    assert tu.load_teacher(ck).iteration == 2  # sentinels mark what finished
    (ck / "tf_ckpt-2.data-00000-of-00001").unlink()
    with pytest.raises(tu.CheckpointError, match="no complete checkpoint"):
        tu.load_teacher(ck)


def test_action_count_mismatch_names_both_numbers(fixture_copy):
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(fixture_copy("teacher_tf"), num_actions=6)
    msg = str(e.value)
    assert "4 actions" in msg and "has 6" in msg and "--env-id" in msg and "full_action_space" not in msg and "\n" not in msg


def test_missing_and_wrong_sources(tmp_path):
    with pytest.raises(tu.CheckpointError, match="does not exist"):
        tu.load_teacher(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tu.CheckpointError, match="no Dopamine checkpoint"):
        tu.load_teacher(tmp_path / "empty")
    (tmp_path / "ckpt.1").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(tu.CheckpointError, match="corrupt|not a valid pickle"):
        tu.load_teacher(tmp_path / "ckpt.1")
    (tmp_path / "ckpt.2").write_bytes(pickle.dumps({"training_steps": 3}))
    with pytest.raises(tu.CheckpointError, match="no 'online_params'"):
        tu.load_teacher(tmp_path / "ckpt.2")


def test_wrong_layer_shapes_are_refused(tmp_path):
    params = {k: {"kernel": np.zeros(s["kernel"], np.float32), "bias": np.zeros(s["bias"], np.float32)} for k, s in tu.expected_param_shapes(4).items()}
    params["Dense_0"]["kernel"] = np.zeros((3136, 512), np.float32)  # CleanRL's VALID-padding network
    (tmp_path / "ckpt.1").write_bytes(pickle.dumps({"online_params": {"params": params}}))
    with pytest.raises(tu.CheckpointError, match=r"Dense_0/kernel has shape \(3136, 512\)"):
        tu.load_teacher(tmp_path / "ckpt.1")


# ---------------------------------------------------------------- pickle safety
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_and_nothing_runs(fixture_copy, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt.1").write_bytes(pickle.dumps({"online_params": _Evil(marker)}))
    with pytest.raises(tu.CheckpointError, match=r"refusing to load .* (posix|os)\.system"):
        tu.load_jax_checkpoint(tmp_path / "ckpt.1")
    assert not marker.exists()

    for name, what in (("malicious", r"(posix|os)\.system"), ("malicious_eval", r"builtins\.eval")):
        folder = fixture_copy(name)
        before = set(Path("/tmp").iterdir())
        with pytest.raises(tu.CheckpointError, match=f"refusing to load .*{what}"):
            tu.load_teacher(folder)
        assert not [p for p in set(Path("/tmp").iterdir()) - before if "PWNED" in p.name.upper()]


def test_protocol_2_pickles_load_and_only_latin1_bytes_are_decoded(tmp_path):
    """Old pickles (protocol 2) store bytes and array buffers through _codecs.encode(text, 'latin1')."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "ckpt.1").write_bytes(pickle.dumps({"blob": b"\x00\xffab", "a": arr}, protocol=2))
    data = tu.load_jax_checkpoint(tmp_path / "ckpt.1")
    assert data["blob"] == b"\x00\xffab"
    np.testing.assert_array_equal(data["a"], arr)
    # The same opcode stream asking for another codec is refused, not guessed at.
    raw = pickle.dumps({"blob": b"\x00\xffab"}, protocol=2)
    assert b"latin1" in raw
    (tmp_path / "ckpt.2").write_bytes(raw.replace(b"latin1", b"rot_13"))
    with pytest.raises(tu.CheckpointError):
        tu.load_jax_checkpoint(tmp_path / "ckpt.2")


def test_safe_loader_keeps_optimizer_state_as_plain_data(fixture_copy):
    data = tu.load_jax_checkpoint(fixture_copy("teacher_jax_linen") / "checkpoints" / "ckpt.5")
    assert data["current_iteration"] == 5
    assert isinstance(data["online_params"], dict)  # FrozenDict became a dict
    # optax.adam state = (ScaleByAdamState(count, mu, nu), EmptyState()), now plain tuples of numpy data.
    adam, empty = data["optimizer_state"]
    assert isinstance(adam, tuple) and len(adam) == 3 and tuple(empty) == ()
    count, mu, nu = adam
    assert isinstance(count, np.ndarray) and count.dtype == np.int32
    assert mu["params"]["Dense_0"]["kernel"].shape == (7744, 512) and isinstance(nu["params"]["Conv_0"]["bias"], np.ndarray)
    assert isinstance(data["state"], np.ndarray) and data["state"].dtype == np.uint8


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_cli_inspect_prints_kind_iteration_and_shapes(fixture_copy, name):
    kind, iteration, naming = TEACHERS[name]
    r = subprocess.run([sys.executable, str(ROOT / "teacher_utils.py"), "inspect", str(fixture_copy(name))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"kind:        {kind} ({naming})" in out
    assert f"iteration:   {iteration}" in out
    assert "num_actions: 4" in out
    assert "Dense_0/kernel  (7744, 512)" in out and "Conv_0/kernel  (8, 8, 4, 32)" in out


def test_cli_reports_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "teacher_utils.py"), "inspect", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr
