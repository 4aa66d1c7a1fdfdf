"""qdagger_dqn_atari_jax.py end to end on real envpool Breakout-v5, its error
lines, and a check that offline distillation actually distils."""

import json
import subprocess
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qdagger_dqn_atari_jax as q
import teacher_utils as tu

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "qdagger_dqn_atari_jax.py"
TINY = ["--teacher-eval-episodes", "1", "--eval-episodes", "1", "--eval-steps", "600", "--teacher-steps", "256",
        "--offline-steps", "64", "--total-timesteps", "512", "--learning-starts", "128", "--buffer-size", "1024",
        "--batch-size", "8", "--eval-frequency", "256", "--log-frequency", "8", "--eval-num-envs", "4"]


def run_script(cwd, *flags, env=None, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, fixture_copy):
    cwd = tmp_path_factory.mktemp("dqn_e2e")
    r = run_script(cwd, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--save-model", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return r, run_dir


def test_e2e_logs_every_phase(e2e_run):
    r, run_dir = e2e_run
    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    offline = {"offline/td_loss", "offline/distill_loss", "offline/loss", "offline/q_values", "offline/SPS"}
    online = {"losses/td_loss", "losses/distill_loss", "losses/loss", "losses/q_values", "charts/SPS", "charts/epsilon",
              "charts/distill_coeff", "charts/learning_rate"}
    assert offline <= tags and online <= tags, sorted(tags)
    assert {"teacher/episodic_return", "teacher/episodic_length"} <= tags or "teacher: no episode finished" in r.stdout

    # Offline steps are gradient steps 8, 16, ..., 64; online steps are agent steps beyond learning_starts.
    assert [e.step for e in acc.Scalars("offline/loss")] == list(range(8, 65, 8))
    online_steps = [e.step for e in acc.Scalars("losses/loss")]
    assert online_steps and min(online_steps) > 128 and max(online_steps) <= 512
    # 2 envs, one update per 4 agent steps after 128: (512 - 128) / 4 = 96 updates, logged every 8.
    assert len(online_steps) == 96 // 8
    for tag in ("losses/distill_loss", "offline/distill_loss"):
        assert all(e.value >= 0 for e in acc.Scalars(tag))
    coeffs = [e.value for e in acc.Scalars("charts/distill_coeff")]
    assert all(0.0 <= c <= 3.0 for c in coeffs) and coeffs[0] == pytest.approx(3.0)
    lrs = [e.value for e in acc.Scalars("charts/learning_rate")]
    assert all(1e-5 - 1e-12 <= lr <= 1e-4 + 1e-12 for lr in lrs)
    eps = [e.value for e in acc.Scalars("charts/epsilon")]
    assert eps == sorted(eps, reverse=True) and 0.01 <= eps[-1] <= 1.0
    texts = acc.Tags()["tensors"]
    assert any("hyperparameters" in t for t in texts)
    # Every evaluation is reported: either a return is logged or the log line says why not.
    evals = tags & {"eval/episodic_return"}
    assert evals or "no episode finished" in r.stdout
    assert "(a) teacher" in r.stdout and "(b) teacher data" in r.stdout and "(c) offline" in r.stdout and "(d) online" in r.stdout


def test_saved_model_reloads_with_the_same_q_values(e2e_run):
    _, run_dir = e2e_run
    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == "Breakout-v5" and args["network"] == "nature" and args["offline_steps"] == 64
    (model,) = run_dir.glob("*.cleanrl_model")
    net = q.make_student(args["network"], 4)
    template = net.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    params = flax.serialization.from_bytes(template, model.read_bytes())
    probe = np.load(run_dir / "q_probe.npz")
    np.testing.assert_allclose(np.asarray(net.apply(params, probe["obs"])), probe["q"], rtol=1e-6, atol=1e-6)
    # It is the trained student, not the initialisation.
    assert not np.allclose(params["params"]["Dense_1"]["kernel"], template["params"]["Dense_1"]["kernel"])
    assert not list(run_dir.glob("*.tmp"))


def test_impala_student_and_wandb_offline(tmp_path, fixture_copy):
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    flags = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--network", "impala", "--track", "--capture-video", *TINY]
    flags[flags.index("--total-timesteps") + 1] = "256"
    flags[flags.index("--offline-steps") + 1] = "16"
    r = run_script(tmp_path, *flags, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "offline/loss" in read_events(run_dir).Tags()["scalars"]
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
    import imageio.v2 as imageio

    video = imageio.get_reader(run_dir / "videos" / "final-eval.mp4")
    assert video.count_frames() > 10 and video.get_data(0).shape == (168, 168, 3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "Breakout-v4"], "unknown Atari env id 'Breakout-v4'"),
        (["--env-id", "Pong-v5"], "the teacher has 4 actions but the environment has 6"),
        (["--teacher-checkpoint", "/nonexistent/teacher"], "does not exist"),
        (["--buffer-size", "100"], "--buffer-size 100 is smaller than what the online phase needs"),
        (["--total-timesteps", "0"], "--total-timesteps must be > 0"),
        (["--offline-steps", "-1"], "--offline-steps must be >= 0"),
        (["--temperature", "0"], "--temperature must be > 0"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(tmp_path, fixture_copy, flags, message):
    base = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), *TINY]
    r = run_script(tmp_path, *base, *flags, timeout=120)
    assert r.returncode == 1, (r.stdout[-1000:], r.stderr[-1000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_unreachable_bucket_says_how_to_pass_a_local_path(tmp_path):
    env = {**__import__("os").environ, "REINCARNATE_BUCKET_URL": "http://127.0.0.1:9", "REINCARNATE_CACHE": str(tmp_path / "cache")}
    r = run_script(tmp_path, *TINY, env=env, timeout=120)
    assert r.returncode == 1
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert "cannot reach the teacher bucket" in line and "--teacher-checkpoint" in line


def test_offline_distillation_matches_the_teacher(fixture_copy):
    """A few hundred distillation-only updates on fixed teacher data lower the
    KL strongly and make the student pick the teacher's action far above chance."""
    teacher = tu.DopamineNatureDQN(4)
    teacher_params = tu.load_teacher(fixture_copy("teacher_tf"), num_actions=4).params
    envs = tu.make_teacher_envs("Breakout-v5", 4, seed=0)
    act = q.make_act(teacher)
    rb = q.FrameReplayBuffer(2048, 4, n_step=3, gamma=0.99)
    obs, _ = envs.reset()
    key = jax.random.PRNGKey(0)
    for _ in range(400):  # 1,600 transitions of random play, for state diversity
        key, k = jax.random.split(key)
        actions = np.asarray(act(teacher_params, obs, k, 1.0)[0])
        nxt, reward, term, trunc, _ = envs.step(actions)
        rb.add(obs[:, -1], actions, np.clip(reward, -1, 1), term, trunc, nxt[:, -1])
        obs = nxt
    envs.close()

    # The fixture's random weights prefer one action on ~99% of Breakout frames, which
    # would make agreement trivial: sharpen and recentre the head so the greedy action varies.
    head = teacher_params["params"]["Dense_1"]
    head["kernel"], head["bias"] = head["kernel"] * 20, head["bias"] * 20
    head["bias"] = head["bias"] - np.median(np.asarray(teacher.apply(teacher_params, rb.sample(1024, np.random.default_rng(5)).obs)), axis=0)

    student = q.make_student("nature", 4)
    params = student.init(jax.random.PRNGKey(1), np.zeros((1, 4, 84, 84), np.uint8))
    state = q.QState.create(apply_fn=student.apply, params=params, target_params=params,
                            tx=optax.inject_hyperparams(optax.adam)(learning_rate=1e-4, eps=1.5e-4))
    update = q.make_update(student, temperature=0.1, td_weight=0.0)
    rng = np.random.default_rng(0)
    held_out = rb.sample(256, np.random.default_rng(123))
    teacher_q = teacher.apply(teacher_params, held_out.obs)
    teacher_action = np.asarray(jnp.argmax(teacher_q, -1))
    majority = np.bincount(teacher_action, minlength=4).max() / len(teacher_action)
    assert majority < 0.6  # the teacher's policy really depends on the state

    def measure(p):
        student_q = student.apply(p, held_out.obs)
        kl = float(q.distillation_loss(teacher_q, student_q, 0.1))
        return kl, float(np.mean(np.asarray(jnp.argmax(student_q, -1)) == teacher_action))

    kl0, agree0 = measure(state.params)
    for _ in range(400):
        b = rb.sample(32, rng)
        state, metrics = update(state, b.obs, b.actions, b.returns, b.discounts, b.next_obs,
                                teacher.apply(teacher_params, b.obs), jnp.float32(1.0), jnp.float32(1e-4))
    kl1, agree1 = measure(state.params)
    assert kl1 < 0.5 * kl0, (kl0, kl1)  # measured: 1.35 -> 0.48
    assert agree1 > majority + 0.2 and agree1 > agree0 + 0.3, (majority, agree0, agree1)  # measured: 0.22 -> 0.77, majority 0.39
    assert float(metrics["td_loss"]) > 0  # computed but weighted by 0


def test_rebuilt_stacks_equal_envpool_observations(fixture_copy):
    """The teacher's Q-values cached while it acted on envpool's observations equal
    its Q-values on the replay's rebuilt stacks: stacking, zero padding at episode
    starts and truncation handling reproduce exactly what the env showed."""
    teacher = tu.DopamineNatureDQN(4)
    params = tu.load_teacher_params(fixture_copy("teacher_tf"), num_actions=4)
    envs = tu.make_teacher_envs("Breakout-v5", 2, seed=3, max_episode_steps=40)  # many truncations
    act = q.make_act(teacher)
    rb = q.FrameReplayBuffer(300, 2, n_step=3, gamma=0.99, teacher_q_dim=4)  # wraps around
    obs, _ = envs.reset()
    key = jax.random.PRNGKey(0)
    for _ in range(250):
        key, k = jax.random.split(key)
        actions, teacher_q, _ = jax.device_get(act(params, obs, k, 0.5))
        nxt, reward, term, trunc, _ = envs.step(actions)
        rb.add(obs[:, -1], actions, np.clip(reward, -1, 1), term, trunc, nxt[:, -1], teacher_q)
        obs = nxt
    envs.close()
    assert rb.count.min() > rb.rows  # wrapped
    batch = rb.sample(256, np.random.default_rng(0))
    assert (batch.obs[:, 0] == 0).all(axis=(1, 2)).any()  # some samples sit at an episode start
    np.testing.assert_allclose(np.asarray(teacher.apply(params, batch.obs)), batch.teacher_q, atol=1e-5)
    assert rb.bytes_per_transition <= 7200


def test_tabula_rasa_baseline_skips_teacher_data_and_distillation(tmp_path, fixture_copy):
    flags = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), *TINY, "--offline-steps", "0", "--distill-coef", "0"]
    flags[flags.index("--total-timesteps") + 1] = "256"
    r = run_script(tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(b) teacher data: skipped" in r.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = read_events(run_dir)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("offline/")]
    assert [e.value for e in acc.Scalars("losses/distill_loss")] == [0.0] * len(acc.Scalars("losses/distill_loss"))
    assert all(e.value == 0.0 for e in acc.Scalars("charts/distill_coeff"))
