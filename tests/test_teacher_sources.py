"""Any earlier agent as the teacher (chained reincarnation): teacher_utils.load_teacher on

- run folders of our own scripts (args.json + <exp_name>.cleanrl_model + q_probe.npz), built here with the
  scripts' own make_student / expected_q and flax.serialization.to_bytes, as `--save-model` writes them;
- CleanRL dqn_atari_jax.py model files, written here with CleanRL's network as its published source defines it
  (an oracle independent of teacher_utils.CleanRLQNetwork), locally and through hf:// against
  tests/hub_emulator.py (huggingface_hub runs in a subprocess, pointed at the emulator by HF_ENDPOINT);
- the env settings each teacher needs (zero_stack_start for CleanRL's frame stack).

CPU, offline, no training runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qdagger_dqn_atari_jax as dqn
import qdagger_rainbow_atari_jax as rainbow
import teacher_utils as tu
from reincarnate import run as rr
from reincarnate import checkpoints as ck
from hub_emulator import HubEmulator, client_env

ROOT = Path(__file__).resolve().parent.parent
A = 4  # Breakout's minimal action set


def random_params(net: nn.Module, seed: int):
    """Random params of ``net`` (numpy, no JAX compile), non-zero biases included: a bias left unloaded would show."""
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 4, 84, 84), jnp.uint8))
    rng = np.random.default_rng(seed)

    def leaf(x):
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 20
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(leaf, shapes)


def probe_obs(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 84, 84), dtype=np.uint8)


def test_dopamine_teachers_get_the_new_fields(fixture_copy):
    t = tu.load_teacher(fixture_copy("teacher_tf"), num_actions=A)
    assert (t.kind, t.architecture, t.env_kwargs, t.student_args, t.num_actions) == ("tf", "dopamine-nature-dqn", {}, None, A)
    assert type(t.network) is tu.DopamineNatureDQN
    obs = probe_obs(3)
    np.testing.assert_array_equal(np.asarray(jax.jit(t.q_values)(t.params, obs)), np.asarray(jax.jit(t.network.apply)(t.params, obs)))


# ----------------------------------------------------------------------------
# Run folders as qdagger_*_atari_jax.py --save-model writes them
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    folder: Path
    args: dict
    params: dict
    student: nn.Module
    q: np.ndarray  # the script's own Q on the probe obs
    obs: np.ndarray

    @property
    def model(self) -> Path:
        return self.folder / f"{self.args['exp_name']}.cleanrl_model"


def write_run(folder: Path, script, args, seed: int = 1) -> Run:
    folder.mkdir(parents=True)
    rainbow_run = script is rainbow
    student = script.make_student(args, A) if rainbow_run else script.make_student(args.network, A)
    params = random_params(student, seed)
    obs = probe_obs(seed=seed)
    if rainbow_run:
        q = np.asarray(script.expected_q(student.apply(params, obs), script.make_support(args)))
    else:
        q = np.asarray(student.apply(params, obs))
    (folder / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    (folder / f"{args.exp_name}.cleanrl_model").write_bytes(flax.serialization.to_bytes(params))
    with open(folder / "q_probe.npz", "wb") as f:
        np.savez(f, obs=obs, q=q)
    return Run(folder, json.loads((folder / "args.json").read_text()), params, student, q, obs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "dqn-nature": write_run(root / "dqn_nature", dqn, dqn.Args(env_id="Breakout-v5", network="nature", save_model=True, max_episode_steps=20_000)),
        "dqn-impala": write_run(root / "dqn_impala", dqn, dqn.Args(env_id="Breakout-v5", network="impala", save_model=True), seed=2),
        "rainbow-dueling": write_run(root / "rainbow_dueling", rainbow,
                                     rainbow.Args(env_id="Breakout-v5", network="nature", num_atoms=51, dueling=True, save_model=True), seed=3),
        "rainbow-noisy": write_run(root / "rainbow_noisy", rainbow,
                                   rainbow.Args(env_id="Breakout-v5", network="nature", num_atoms=11, v_min=-3.0, v_max=7.0, noisy=True,
                                                exp_name="my_rainbow_run", save_model=True), seed=4),
    }


def test_dqn_nature_student_is_a_teacher_as_it_is(runs):
    run = runs["dqn-nature"]
    for source in (run.folder, run.model, str(run.folder)):
        t = tu.load_teacher(source, num_actions=A)
        assert (t.kind, t.architecture, t.naming, t.iteration, t.num_actions) == ("student", "dopamine-nature-dqn", "flax-msgpack", None, A)
        assert t.path == run.model and t.student_args == run.args
        assert type(t.network) is tu.DopamineNatureDQN  # the same class as a Dopamine teacher
        assert t.env_kwargs == {"max_episode_steps": 20_000}
        np.testing.assert_allclose(np.asarray(t.q_values(t.params, run.obs)), run.q, atol=1e-5)
    # A Dopamine teacher's network runs it unchanged, and q_values is pure (jit-able).
    np.testing.assert_allclose(np.asarray(tu.DopamineNatureDQN(A).apply(t.params, run.obs)), run.q, atol=1e-5)
    q_jit = jax.jit(t.q_values)(jax.device_put(t.params), run.obs)
    assert q_jit.dtype == jnp.float32 and q_jit.shape == (8, A)
    np.testing.assert_allclose(np.asarray(q_jit), run.q, atol=1e-5)
    params = tu.load_teacher_params(run.folder, num_actions=A)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert t.variables["params/Dense_0/kernel"] == ((7744, 512), "float32")


@pytest.mark.parametrize("name, architecture", [("dqn-impala", "dqn-impala"), ("rainbow-dueling", "rainbow-nature-51-dueling"),
                                                ("rainbow-noisy", "rainbow-nature-11-noisy")])
def test_impala_and_rainbow_students_give_the_scripts_q(runs, name, architecture):
    run = runs[name]
    t = tu.load_teacher(run.folder, num_actions=A)
    assert (t.kind, t.architecture, t.num_actions) == ("student", architecture, A)
    assert t.env_kwargs == {"max_episode_steps": 27_000} and t.student_args["env_id"] == "Breakout-v5"
    obs = probe_obs(5, seed=99)  # other states than the probe's
    if name.startswith("rainbow"):
        args = rainbow.Args(**{k: v for k, v in run.args.items()})
        expected = rainbow.expected_q(run.student.apply(run.params, obs), rainbow.make_support(args))  # key=None: no noise
    else:
        expected = run.student.apply(run.params, obs)
    q = jax.jit(t.q_values)(t.params, obs)
    assert q.shape == (5, A) and q.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(q), np.asarray(expected), atol=1e-5)


def test_student_action_count_mismatch_names_both_numbers(runs):
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(runs["rainbow-dueling"].folder, num_actions=6)
    msg = str(e.value)
    assert "4 actions" in msg and "has 6" in msg and "--env-id" in msg and "full_action_space" not in msg and "Breakout-v5" in msg and "\n" not in msg


def copy_run(run: Run, dest: Path) -> Path:
    dest.mkdir()
    for f in run.folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_corrupt_model_and_probe_mismatch_are_one_line_errors(runs, tmp_path):
    run = runs["dqn-nature"]
    folder = copy_run(run, tmp_path / "truncated")
    model = folder / run.model.name
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(folder)
    assert "truncated or corrupt" in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)

    folder = copy_run(run, tmp_path / "probe")
    with open(folder / "q_probe.npz", "wb") as f:
        np.savez(f, obs=run.obs, q=run.q + 0.5)
    with pytest.raises(tu.CheckpointError, match="does not reproduce") as e:
        tu.load_teacher(folder)
    assert "\n" not in str(e.value)

    # Flipped weights that msgpack still parses: the probe catches them.
    folder = copy_run(run, tmp_path / "flipped")
    params = jax.tree.map(np.copy, run.params)
    params["params"]["Dense_1"]["kernel"] *= -1
    (folder / run.model.name).write_bytes(flax.serialization.to_bytes(params))
    with pytest.raises(tu.CheckpointError, match="does not reproduce"):
        tu.load_teacher(folder)

    # A GPU (TF32) probe differs from a float32 reload by ~1e-3 of the Q scale: a warning, not an error.
    folder = copy_run(run, tmp_path / "tf32")
    with open(folder / "q_probe.npz", "wb") as f:
        np.savez(f, obs=run.obs, q=run.q + 1e-3 * np.max(np.abs(run.q)))
    with pytest.warns(UserWarning, match="TF32"):
        tu.load_teacher(folder)

    # args.json that describes another network than the model file.
    folder = copy_run(run, tmp_path / "wrong_args")
    args = dict(run.args, network="impala")
    (folder / "args.json").write_text(json.dumps(args))
    with pytest.raises(tu.CheckpointError, match="does not fit the dqn-impala network") as e:
        tu.load_teacher(folder)
    assert "\n" not in str(e.value)

    folder = copy_run(run, tmp_path / "no_model")
    (folder / run.model.name).unlink()
    with pytest.raises(tu.CheckpointError, match="--save-model"):
        tu.load_teacher(folder)
    with pytest.raises(tu.CheckpointError, match="iterations do not apply"):
        tu.load_teacher(run.folder, iteration=3)


def add_resume_checkpoint(folder: Path, seq: int, phase: str) -> Path:
    """A complete resume checkpoint as ck.write_checkpoint lays it out (only meta.json matters to a teacher)."""
    ckpt = folder / "checkpoints" / f"ckpt-{seq:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"seq": seq, "phase": phase, "files": {}}))
    (ckpt / tu.CHECKPOINT_SENTINEL).write_text("done")
    return ckpt


def test_an_interrupted_run_folder_is_refused_but_its_model_file_loads(runs, tmp_path):
    run = runs["dqn-nature"]
    folder = copy_run(run, tmp_path / "interrupted")
    (folder / tu._PROBE_FILE).unlink()  # the scripts write the probe only when the run finishes
    add_resume_checkpoint(folder, 1, "done")  # an older one: the newest decides
    add_resume_checkpoint(folder, 2, "online")
    (folder / "checkpoints" / "ckpt-000003").mkdir()  # no sentinel: a writer killed midway, not a checkpoint
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(folder, num_actions=A)
    msg = str(e.value)
    assert "interrupted in phase online" in msg and "--resume" in msg and str(folder / run.model.name) in msg and "\n" not in msg
    t = tu.load_teacher(folder / run.model.name, num_actions=A)  # the unfinished params, on purpose
    assert t.kind == "student" and t.path == folder / run.model.name

    # The newest checkpoint is "done": a finished run.
    add_resume_checkpoint(folder, 4, "done")
    assert tu.load_teacher(folder, num_actions=A).path == folder / run.model.name


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_unreadable_probe_is_one_line(runs, tmp_path, damage):
    run = runs["dqn-nature"]
    folder = copy_run(run, tmp_path / damage)
    probe = folder / tu._PROBE_FILE
    probe.write_bytes(b"" if damage == "empty" else probe.read_bytes()[: probe.stat().st_size // 2])
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(folder, num_actions=A)
    msg = str(e.value)
    assert msg.startswith(f"{probe} is not a readable Q probe") and "delete it to skip the check" in msg and "\n" not in msg


def test_teachers_without_a_dopamine_replay_say_use_rollout(runs, cleanrl_model, tmp_path):
    no_model = copy_run(runs["dqn-nature"], tmp_path / "no_model")
    (no_model / runs["dqn-nature"].model.name).unlink()
    model_file = cleanrl_model[0]
    hf = "hf://cleanrl/BreakoutNoFrameskip-v4-dqn_atari_jax-seed1/dqn_atari_jax.cleanrl_model"  # refused before any download
    for source in (runs["dqn-nature"].folder, runs["dqn-nature"].model, no_model, model_file, model_file.parent, hf):
        with pytest.raises(tu.CheckpointError) as e:
            tu.load_dopamine_replay(source)
        assert str(e.value) == f"{source} is not a Dopamine checkpoint, so it has no Dopamine replay; use --teacher-data rollout"


def test_cli_inspect_shows_a_student(runs):
    run = runs["rainbow-dueling"]
    r = subprocess.run([sys.executable, str(ROOT / "teacher_utils.py"), "inspect", str(run.folder)], capture_output=True, text=True,
                       timeout=120, cwd=run.folder)
    assert r.returncode == 0, r.stderr
    assert "kind:        student (flax-msgpack)" in r.stdout and "architecture: rainbow-nature-51-dueling" in r.stdout
    assert "max_episode_steps=27000" in r.stdout and "qdagger_rainbow_atari_jax on Breakout-v5" in r.stdout
    assert "advantage/kernel  (512, 204)" in r.stdout and "network (RainbowNetwork params)" in r.stdout


# ----------------------------------------------------------------------------
# CleanRL dqn_atari_jax.py models
# ----------------------------------------------------------------------------
class CleanRLQNetworkOracle(nn.Module):
    """CleanRL's QNetwork as cleanrl/dqn_atari_jax.py defines it (vwxyzjn/cleanrl, read at fe8d8a0): NCHW -> NHWC,
    / 255, conv 32 8x8 s4, conv 64 4x4 s2, conv 64 3x3 s1 (all VALID, ReLU), flatten, dense 512 + ReLU, dense A.
    Flax names the layers (Conv_0.., Dense_0..) by itself, as in CleanRL."""

    action_dim: int

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1)) / 255.0
        for features, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
            x = nn.relu(nn.Conv(features, kernel_size=(k, k), strides=(s, s), padding="VALID")(x))
        x = nn.relu(nn.Dense(512)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.action_dim)(x)


@pytest.fixture(scope="module")
def cleanrl_model(tmp_path_factory):
    net = CleanRLQNetworkOracle(action_dim=A)
    params = random_params(net, 7)
    assert params["params"]["Dense_0"]["kernel"].shape == (3136, 512)
    folder = tmp_path_factory.mktemp("cleanrl_run")  # as CleanRL's runs/<run_name>/
    path = folder / "dqn_atari_jax.cleanrl_model"
    path.write_bytes(flax.serialization.to_bytes(params))
    return path, net, params


def test_cleanrl_model_loads_with_cleanrls_q_and_env(cleanrl_model, capsys):
    path, net, params = cleanrl_model
    obs = probe_obs(6, seed=5)
    for source in (path, path.parent):
        t = tu.load_teacher(source, num_actions=A)
        assert (t.kind, t.architecture, t.naming, t.path, t.student_args, t.num_actions) == ("cleanrl", "cleanrl-nature-dqn", "flax-msgpack", path, None, A)
        assert isinstance(t.network, tu.CleanRLQNetwork)
        np.testing.assert_allclose(np.asarray(jax.jit(t.q_values)(t.params, obs)), np.asarray(net.apply(params, obs)), atol=1e-5)
    assert t.env_kwargs == {"repeat_action_probability": 0.0, "noop_max": 30, "use_fire_reset": True, "episodic_life": False,
                            "zero_stack_start": False}
    with pytest.raises(tu.CheckpointError, match="4 actions.*has 18"):
        tu.load_teacher(path, num_actions=18)
    assert tu.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind:        cleanrl (flax-msgpack)" in out and "architecture: cleanrl-nature-dqn" in out
    assert "noop_max=30" in out and "zero_stack_start=False" in out and "Dense_0/kernel  (3136, 512)" in out


def test_bare_models_are_recognised_by_their_layers(tmp_path):
    # A DQN-Nature model without its run folder: Dopamine's network.
    params = random_params(tu.DopamineNatureDQN(6), 0)
    (tmp_path / "student.cleanrl_model").write_bytes(flax.serialization.to_bytes(params))
    t = tu.load_teacher(tmp_path / "student.cleanrl_model")
    assert (t.kind, t.architecture, t.num_actions, t.env_kwargs) == ("student", "dopamine-nature-dqn", 6, {})
    # Any file name: the msgpack is recognised by its first byte (a pickle's is 0x80 + protocol).
    (tmp_path / "model.msgpack").write_bytes(flax.serialization.to_bytes(params))
    assert tu.load_teacher(tmp_path / "model.msgpack").kind == "student"

    # A CleanRL C51 model (another head) and other msgpacks: refused in one line naming the source and the fix.
    c51 = {"params": {**params["params"], "Dense_1": {"kernel": np.zeros((512, 6 * 51), np.float32), "bias": np.zeros(6 * 51, np.float32)}}}
    c51["params"]["Dense_0"] = {"kernel": np.zeros((3136, 512), np.float32), "bias": np.zeros(512, np.float32)}
    del c51["params"]["Conv_2"]
    (tmp_path / "c51_atari_jax.cleanrl_model").write_bytes(flax.serialization.to_bytes(c51))
    with pytest.raises(tu.CheckpointError) as e:
        tu.load_teacher(tmp_path / "c51_atari_jax.cleanrl_model")
    msg = str(e.value)
    assert "c51_atari_jax.cleanrl_model" in msg and "does not fit the cleanrl-nature-dqn network" in msg and "dqn_atari_jax.py" in msg and "\n" not in msg
    (tmp_path / "other.cleanrl_model").write_bytes(flax.serialization.to_bytes({"params": {"Dense_0": {"kernel": np.zeros((8, 2), np.float32)}}}))
    with pytest.raises(tu.CheckpointError, match="unknown network.*run folder"):
        tu.load_teacher(tmp_path / "other.cleanrl_model")
    (tmp_path / "garbage.cleanrl_model").write_bytes(b"\xc1\x00 not msgpack")
    with pytest.raises(tu.CheckpointError, match="garbage.cleanrl_model is not a readable flax msgpack") as e:
        tu.load_teacher(tmp_path / "garbage.cleanrl_model")
    assert "\n" not in str(e.value)


def test_zero_stack_start_false_repeats_the_reset_frame(cleanrl_model):
    t = tu.load_teacher(cleanrl_model[0])
    envs = tu.make_teacher_envs("Breakout-v5", 2, seed=0, **t.env_kwargs)
    try:
        assert envs.zero_stack_start is False
        assert (envs.config["noop_max"], envs.config["use_fire_reset"], envs.config["episodic_life"]) == (30, True, False)
        assert envs.config["repeat_action_probability"] == 0.0
        obs, info = envs.reset()
        assert (info["elapsed_step"] == 0).all() and obs[:, 3].any()
        for k in range(3):
            np.testing.assert_array_equal(obs[:, k], obs[:, 3])  # not zeros: the reset frame, as gym's FrameStack
        nxt, *_ = envs.step(np.zeros(2, np.int64))
        for k in range(3):
            np.testing.assert_array_equal(nxt[:, k], obs[:, 3])
    finally:
        envs.close()
    envs = tu.make_teacher_envs("Breakout-v5", 2, seed=0)  # Dopamine's default: zeros before the episode's start
    try:
        assert envs.zero_stack_start is True
        obs, _ = envs.reset()
        assert not obs[:, :3].any() and obs[:, 3].any()
        nxt, *_ = envs.step(np.zeros(2, np.int64))
        assert not nxt[:, :2].any()
        np.testing.assert_array_equal(nxt[:, 2], obs[:, 3])
    finally:
        envs.close()


# ----------------------------------------------------------------------------
# hf:// through the Hub emulator (huggingface_hub in a subprocess: it reads HF_ENDPOINT at import)
# ----------------------------------------------------------------------------
HF_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import teacher_utils as tu
    obs = np.load(sys.argv[1])
    out = {}
    for address in sys.argv[2:]:
        try:
            t = tu.load_teacher(address, num_actions=4)
            out[address] = {"kind": t.kind, "architecture": t.architecture, "path": str(t.path), "env_kwargs": t.env_kwargs,
                            "q": np.asarray(t.q_values(t.params, obs)).tolist()}
        except tu.TeacherError as e:
            out[address] = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out))
""")


def run_hf(tmp_path: Path, endpoint: str, addresses: list[str], offline: bool) -> dict:
    env = {**client_env(tmp_path, endpoint), "HF_HUB_OFFLINE": "1" if offline else "0"}
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path / "obs.npy"), *addresses], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hf_download_lands_in_the_hub_cache_and_loads_offline(cleanrl_model, tmp_path):
    path, net, params = cleanrl_model
    data = path.read_bytes()
    repo, small_repo = "cleanrl/BreakoutNoFrameskip-v4-dqn_atari_jax-seed1", "someone/tiny-git-model"
    obs = probe_obs(3, seed=11)
    np.save(tmp_path / "obs.npy", obs)
    lfs_file = f"hf://{repo}/dqn_atari_jax.cleanrl_model"
    git_file = f"hf://{small_repo}@main/models/dqn_atari_jax.cleanrl_model"
    missing = f"hf://{repo}/missing.cleanrl_model"
    no_repo = "hf://nobody/nothing/dqn_atari_jax.cleanrl_model"
    files = {repo: {"dqn_atari_jax.cleanrl_model": data, "README.md": b"# DQN\n"}, small_repo: {"models/dqn_atari_jax.cleanrl_model": data}}
    with HubEmulator(files, git_paths=(f"{small_repo}/models/dqn_atari_jax.cleanrl_model",)) as emu:
        out = run_hf(tmp_path, emu.endpoint, [lfs_file, git_file, missing, no_repo], offline=False)
        calls = emu.calls()
        commit = emu.commits[repo]
    expected_q = np.asarray(net.apply(params, obs))
    for address in (lfs_file, git_file):
        got = out[address]
        assert (got["kind"], got["architecture"]) == ("cleanrl", "cleanrl-nature-dqn"), got
        assert got["env_kwargs"]["zero_stack_start"] is False
        np.testing.assert_allclose(np.asarray(got["q"]), expected_q, atol=1e-5)
    # In the hub cache: models--<owner>--<repo>/snapshots/<commit>/<file>, the bytes in blobs/<sha256>.
    snap = tmp_path / "hub_cache" / "models--cleanrl--BreakoutNoFrameskip-v4-dqn_atari_jax-seed1" / "snapshots" / commit / "dqn_atari_jax.cleanrl_model"
    assert out[lfs_file]["path"] == str(snap) and snap.read_bytes() == data
    assert (snap.parents[2] / "refs" / "main").read_text() == commit
    # The protocol: HEAD resolve -> 302 to the CDN, GET there; the git file: HEAD resolve -> 307 -> HEAD resolve-cache, GET.
    lfs_path = f"/{repo}/resolve/main/dqn_atari_jax.cleanrl_model"
    assert ("hub", "HEAD", lfs_path, None) in calls and [c for c in calls if c[0] == "cdn"] == [("cdn", "GET", c[2], None) for c in calls if c[0] == "cdn"]
    assert len([c for c in calls if c[0] == "cdn"]) == 1
    model_calls = [c[:2] for c in calls if c[2].endswith(f"{small_repo}/resolve/main/models/dqn_atari_jax.cleanrl_model") or "resolve-cache" in c[2]]
    assert model_calls == [("hub", "HEAD"), ("hub", "HEAD"), ("hub", "GET")]
    # A model of ours would have its run's args.json and Q probe beside it: asked for at the model's commit, absent here.
    extras = sorted(c[2].rsplit("/", 1)[1] for c in calls if c[0] == "hub" and f"{small_repo}/resolve/{emu.commits[small_repo]}/models/" in c[2])
    assert extras == ["args.json", "q_probe.npz"]
    for address, words in ((missing, ["missing.cleanrl_model", "404", repo]), (no_repo, ["nobody/nothing"])):
        err = out[address]
        assert err["error"] == "DownloadError" and "\n" not in err["message"] and all(w in err["message"] for w in words), err

    # The emulator is gone and the hub is off: the cached file loads; an uncached one says so in one line.
    out = run_hf(tmp_path, emu.endpoint, [lfs_file, f"hf://{repo}/other.cleanrl_model"], offline=True)
    np.testing.assert_allclose(np.asarray(out[lfs_file]["q"]), expected_q, atol=1e-5)
    err = out[f"hf://{repo}/other.cleanrl_model"]
    assert err["error"] == "DownloadError" and "Hugging Face cache" in err["message"] and "\n" not in err["message"]


# ----------------------------------------------------------------------------
# Sharing a student through the Hub emulator: `teacher_utils.py upload`, then hf:// loads it as a teacher
# ----------------------------------------------------------------------------
TOKEN = "hf_emulator_token"


def upload_cli(tmp_path: Path, endpoint: str, *flags: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "teacher_utils.py"), "upload", *flags], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=client_env(tmp_path, endpoint, token))


def card_metadata(card: bytes) -> dict:
    import yaml

    text = card.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_upload_shares_a_student_that_loads_as_a_teacher_through_hf(runs, tmp_path):
    """The CLI's upload, the Hub's protocol (create, preupload, LFS batch + PUT + verify, NDJSON commit), the files
    and the card; then hf:// finds args.json beside the model in the same commit and rebuilds the Rainbow student
    (a network no layer shape alone tells), whose Q is the script's own."""
    run = runs["rainbow-noisy"]
    folder = copy_run(run, tmp_path / "noisy")
    (folder / "events.out.tfevents.1.host").write_bytes(b"tensorboard events" * 100)
    (folder / "videos").mkdir()
    (folder / "videos" / "final-eval.mp4").write_bytes(b"mp4 video" * 50)
    final = {"returns": [1.0, 2.0, 6.0], "mean": 3.0, "std": float(np.std([1.0, 2.0, 6.0])), "agent_steps": 512,
             "teacher_normalized_score": 0.25, "command": "python qdagger_rainbow_atari_jax.py --seed 1"}
    (folder / "final_eval.json").write_text(json.dumps(final))
    repo = "lab/Breakout-v5-my_rainbow_run-qdagger-seed1"  # CleanRL's {env_id}-{exp_name}-seed{seed} with the method
    with HubEmulator({}, token=TOKEN, user="me", orgs=("lab",)) as emu:
        r = upload_cli(tmp_path, emu.endpoint, str(folder), "--hf-entity", "lab")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().endswith(f"{emu.endpoint}/{repo}"), r.stdout
        files = dict(emu.repos[repo])
        assert [(c[0], len(c[2])) for c in emu.commit_log] == [(repo, len(files) - (".gitattributes" in files))]
        calls = emu.calls()
        np.save(tmp_path / "obs.npy", run.obs)
        loaded = run_hf(tmp_path, emu.endpoint, [f"hf://{repo}/my_rainbow_run.cleanrl_model"], offline=False)
    expected = {"my_rainbow_run.cleanrl_model": run.model, "args.json": folder / "args.json", "q_probe.npz": folder / "q_probe.npz",
                "final_eval.json": folder / "final_eval.json", "events.out.tfevents.1.host": folder / "events.out.tfevents.1.host",
                "videos/final-eval.mp4": folder / "videos" / "final-eval.mp4", "replay.mp4": folder / "videos" / "final-eval.mp4",
                "qdagger_rainbow_atari_jax.py": ROOT / "qdagger_rainbow_atari_jax.py", "teacher_utils.py": ROOT / "teacher_utils.py",
                "pyproject.toml": ROOT / "pyproject.toml"}
    for name, path in expected.items():
        assert files.get(name) == path.read_bytes(), name
    assert set(files) - set(expected) <= {"README.md", ".gitattributes"}
    # The large and binary files went by LFS (batch, PUT to the storage server, verify); the small text ones inline.
    assert ("hub", "POST", f"/{repo}.git/info/lfs/objects/batch") in [c[:3] for c in calls]
    assert len([c for c in calls if c[:2] == ("cdn", "PUT")]) >= 3  # the model, the probe, the events file

    meta = card_metadata(files["README.md"])
    assert {"Breakout-v5", "reinforcement-learning", "reincarnating-rl", "qdagger"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "Breakout-v5"
    assert result["metrics"][0]["type"] == "mean_reward" and result["metrics"][0]["value"] == f"3.00 +/- {final['std']:.2f}"
    card = files["README.md"].decode()
    assert f"--teacher-checkpoint hf://{repo}/my_rainbow_run.cleanrl_model" in card and final["command"] in card and "| 0.250 |" in card

    got = loaded[f"hf://{repo}/my_rainbow_run.cleanrl_model"]
    assert got.get("architecture") == "rainbow-nature-11-noisy", got
    np.testing.assert_allclose(np.asarray(got["q"]), run.q, rtol=1e-5, atol=1e-5)
    assert Path(got["path"]).with_name("args.json").read_bytes() == files["args.json"]  # beside the model, same snapshot


def test_upload_failures_are_one_line_and_leave_the_repo_unchanged(runs, tmp_path):
    run = runs["dqn-nature"]
    repo = "me/Breakout-v5-qdagger_dqn_atari_jax-qdagger-seed1"
    interrupted = copy_run(run, tmp_path / "interrupted")
    add_resume_checkpoint(interrupted, 1, "online")
    broken = copy_run(run, tmp_path / "broken")
    with open(broken / "q_probe.npz", "wb") as f:
        np.savez(f, obs=run.obs, q=run.q + 0.5)
    with HubEmulator({}, token=TOKEN, user="me", orgs=("lab",)) as emu:
        cases = [
            ((str(run.folder),), None, "needs a Hugging Face login"),
            ((str(run.folder),), "hf_wrong", "refused the Hugging Face token (HTTP 401"),
            ((str(run.folder), "--hf-entity", "other"), TOKEN, "can upload to me, lab only"),
            ((str(interrupted),), TOKEN, "interrupted in phase online"),
            ((str(broken),), TOKEN, "does not reproduce"),
            ((str(tmp_path),), TOKEN, "is not a run folder of the scripts"),
        ]
        for flags, token, message in cases:
            r = upload_cli(tmp_path, emu.endpoint, *flags, token=token)
            lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error: ")]
            assert r.returncode == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (message, r.stderr[-2000:])
        assert repo not in emu.repos and not emu.commit_log

        r = upload_cli(tmp_path, emu.endpoint, str(run.folder), "--private")
        assert r.returncode == 0, r.stderr[-2000:]
        assert emu.private == {repo}
        before = (dict(emu.repos[repo]), emu.commits[repo])
        # The storage server drops the next upload: the commit is never made, the repo keeps its files and commit.
        run_copy = copy_run(run, tmp_path / "again")
        (run_copy / "events.out.tfevents.2.host").write_bytes(os.urandom(20_000))
        emu.fail_lfs_puts = 1
        r = upload_cli(tmp_path, emu.endpoint, str(run_copy))
        lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error: ")]
        assert r.returncode == 1 and len(lines) == 1 and "nothing was committed" in lines[0] and f"teacher_utils.py upload {run_copy}" in lines[0], r.stderr[-2000:]
        assert (dict(emu.repos[repo]), emu.commits[repo]) == before and len(emu.commit_log) == 1
        # --repo-id names the whole repo; the retry goes through.
        r = upload_cli(tmp_path, emu.endpoint, str(run_copy), "--repo-id", "lab/my-student")
        assert r.returncode == 0 and r.stdout.strip().endswith(f"{emu.endpoint}/lab/my-student"), r.stderr[-2000:]
        assert emu.repos["lab/my-student"]["events.out.tfevents.2.host"] == (run_copy / "events.out.tfevents.2.host").read_bytes()


# ----------------------------------------------------------------------------
# Run folders: W&B login check, the lock, checkpoint replacement
# ----------------------------------------------------------------------------
def test_check_wandb_looks_for_a_key_locally(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: pytest.fail("check_wandb must not call wandb.Api (prompts, network)"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    rr.check_wandb(False)
    with pytest.raises(tu.RunError, match="wandb login") as e:
        rr.check_wandb(True)  # no ~/.netrc
    assert "\n" not in str(e.value)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.com\n  login user\n  password other\n")
    with pytest.raises(tu.RunError):
        rr.check_wandb(True)  # another host's entry
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k" + "0" * 39 + "\n")
    rr.check_wandb(True)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8443")
    with pytest.raises(tu.RunError):
        rr.check_wandb(True)  # a self-hosted server: its own entry is needed
    netrc.write_text("machine wandb.example.com:8443 login user password local-key\n")
    rr.check_wandb(True)
    netrc.write_text("this is not a netrc file\n")
    with pytest.raises(tu.RunError):
        rr.check_wandb(True)  # malformed: no key, one line, no NetrcParseError
    other = tmp_path / "elsewhere"
    other.write_text("machine wandb.example.com:8443 login user password local-key\n")
    monkeypatch.setenv("NETRC", str(other))
    rr.check_wandb(True)
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    rr.check_wandb(True)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    rr.check_wandb(True)


LOCK_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from reincarnate import checkpoints as ck
    ck.lock_run_folder(Path(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
""")


def test_lock_run_folder_refuses_a_second_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(tu.RunError) as e:
            ck.lock_run_folder(tmp_path)
        assert str(e.value) == (f"another process is running in {tmp_path} (pid {holder.pid} per .lock); "
                                f"wait for it to end or pass another --run-name")
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    ck.lock_run_folder(tmp_path)  # the holder is gone: its lock went with it
    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        ck.lock_run_folder(tmp_path)  # this process holds it already: nothing to do
        ck.unlock_run_folder(tmp_path)
    assert not ck._RUN_LOCKS


def test_write_checkpoint_replaces_a_folder_of_the_same_seq_after_moving_it_aside(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    stale = root / "ckpt-000002"
    stale.mkdir(parents=True)
    (stale / "junk.npy").write_bytes(b"from a run that resumed from an earlier checkpoint")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(ck.os, "rename", lambda a, b: (renames.append((Path(a).name, Path(b).name)), real_rename(a, b))[1])
    final = ck.write_checkpoint(root, 2, {"x": np.arange(3)}, {"phase": "online"}, keep=1)
    assert final == stale and sorted(p.name for p in final.iterdir()) == [tu.CHECKPOINT_SENTINEL, "meta.json", "x.npy"]
    old, tmp = f".old-ckpt-000002-{os.getpid()}", f".tmp-ckpt-000002-{os.getpid()}"
    assert renames == [("ckpt-000002", old), (tmp, "ckpt-000002")]  # never rmtree of the folder under its name
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-000002"]  # the old one is gone afterwards
    assert ck.latest_checkpoint(root)[1]["phase"] == "online"
