"""qdagger_dqn_atari_jax.py end to end on real envpool Breakout-v5, its error
lines, the paper's protocol (teacher replay, epsilon, evaluation), and a check
that offline distillation actually distils."""

import dataclasses
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

import compile_log
from hub_emulator import HubEmulator, client_env
import qdagger_dqn_atari_jax as q
import teacher_utils as tu
from reincarnate.evaluation import evaluate
from reincarnate.training import coefs, lambda_learning_rate, linear_schedule

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "qdagger_dqn_atari_jax.py"
HUB_TOKEN = "hf_emulator_token"
# Episodes capped at 100 steps so every evaluation finishes episodes quickly (the fixture teacher never FIREs).
TINY = ["--eval-steps", "200", "--max-episode-steps", "100", "--teacher-steps", "256", "--offline-steps", "64",
        "--updates-per-call", "1", "--offline-eval-frequency", "32", "--total-timesteps", "512", "--learning-starts", "128",
        "--buffer-size", "1024", "--batch-size", "8", "--eval-frequency", "256", "--log-frequency", "8", "--eval-num-envs", "2"]


def run_script(cwd, *flags, env=None, timeout=400):
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def e2e_hub():
    """The Hugging Face Hub the e2e run uploads its model to (tests/hub_emulator.py: the Hub's upload protocol)."""
    with HubEmulator({}, token=HUB_TOKEN, user="me") as hub:
        yield hub


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, fixture_copy, e2e_hub):
    cwd = tmp_path_factory.mktemp("dqn_e2e")
    # epsilon decays over 50 training steps, fewer than the 64 offline updates that count toward it (as 50k < 1M in the paper)
    r = run_script(cwd, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--save-model", "--upload-model",
                   "--epsilon-decay-steps", "50", *TINY, env={**client_env(cwd, e2e_hub.endpoint, HUB_TOKEN), "JAX_LOG_COMPILES": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return r, run_dir


def test_e2e_logs_every_phase(e2e_run):
    r, run_dir = e2e_run
    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    offline = {"offline/td_loss", "offline/distill_loss", "offline/loss", "offline/q_values", "offline/SPS", "offline/eval_return"}
    online = {"losses/td_loss", "losses/distill_loss", "losses/loss", "losses/q_values", "charts/SPS", "charts/epsilon",
              "charts/distill_coeff", "charts/learning_rate", "eval/episodic_return", "teacher/mean_return"}
    assert offline <= tags and online <= tags, sorted(tags)

    # Offline steps are gradient steps 8, 16, ..., 64; evaluated every 32 offline updates.
    assert [st for st, _ in scalars(acc, "offline/loss")] == list(range(8, 65, 8))
    assert [st for st, _ in scalars(acc, "offline/eval_return")] == [32, 64]
    online_steps = [st for st, _ in scalars(acc, "losses/loss")]
    # As the reference's OfflinePretrainingRunner, the student does not act offline: no agent step is logged before
    # the online phase, its replay starts empty, and it learns once it holds more than --learning-starts 128 steps.
    assert "the student played" not in r.stdout
    assert "offline/episodic_return" not in tags and "offline/SPS" in tags
    assert online_steps and min(online_steps) > 128 and max(online_steps) <= 512
    # The reference's counter (64 offline updates, then one training step per agent step t = 1, 2, ...) updates before
    # agent step t when t > 128 and (64 + t) % 4 == 0: t = 132, 136, ..., 512, so 96 updates, logged every 8.
    counter_updates = sum(1 for t in range(1, 513) if t > 128 and (64 + t) % 4 == 0)
    assert counter_updates == 96 and "512 agent steps, 96 updates" in r.stdout
    assert len(online_steps) == 96 // 8
    for tag in ("losses/distill_loss", "offline/distill_loss"):
        assert all(v >= 0 for _, v in scalars(acc, tag))
    coeffs = [v for _, v in scalars(acc, "charts/distill_coeff")]
    assert coeffs[0] == pytest.approx(3.0)
    # The fixture teacher scores 0 < G_R = 1.7 on Breakout, so lambda keeps its value and says why.
    assert "lambda keeps its value" in r.stdout and all(c == pytest.approx(3.0) for c in coeffs)
    # After an offline phase the official epsilon is end_e from the very first online step.
    eps = scalars(acc, "charts/epsilon")
    assert eps[0] == (0, pytest.approx(0.01)) and all(v == pytest.approx(0.01) for _, v in eps)
    assert any("hyperparameters" in t for t in acc.Tags()["tensors"])
    # Evaluations at the iteration boundaries: whole 100-step episodes, every started episode counted.
    assert [st for st, _ in scalars(acc, "eval/episodic_return")] == [256, 512]
    assert "over 2 episodes (200 agent steps)" in r.stdout
    # The phase lines in the order the phases happen; the run folder named at the start.
    order = [r.stdout.index(s) for s in ("run folder: runs/", "(a) teacher", "(b) teacher data", "(c) offline:", "(d) online:", "(e) final")]
    assert order == sorted(order)
    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == "Breakout-v5" and args["offline_steps"] == 64


def test_no_hot_path_compiles_twice_for_the_same_shapes(e2e_run):
    """Every key and observation a hot path is fed sits on the device from the start (a fresh PRNG key or a numpy
    array first, then the device array a call returned, compiles the function twice: seconds inside a phase)."""
    r, _ = e2e_run
    assert compile_log.HOT <= compile_log.compiled_names(r.stderr)  # the log was read
    assert not compile_log.hot_recompiled(r.stderr)


def test_replay_on_host_run_learns_what_the_device_replay_run_learns(e2e_run, tmp_path, fixture_copy):
    """The whole script with --replay-on-host (buffers in host memory, each step sent there as its newest frames,
    the updates composed from separate jitted pieces): the same offline and online losses at the same steps as the
    run with its replay on the device. On this CPU both replays share one device, so they agree to float precision."""
    _, run_dir = e2e_run
    r = run_script(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--epsilon-decay-steps", "50", *TINY,
                   "--replay-on-host")
    assert r.returncode == 0, r.stderr[-3000:]
    (host_dir,) = (tmp_path / "runs").iterdir()
    device_run, host_run = read_events(run_dir), read_events(host_dir)
    for tag in ("offline/loss", "losses/loss", "losses/distill_loss"):
        want, got = scalars(device_run, tag), scalars(host_run, tag)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) > 4, tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-3, err_msg=tag)


def test_offline_evaluations_in_between_log_what_the_overlapped_ones_log(e2e_run, tmp_path, fixture_copy):
    """The e2e run overlaps its offline evaluation at update 32 with updates 33-64 (the default); played in between
    (--no-overlap-offline-eval, as the reference) every logged value at every step and the saved model are the same:
    offline, nothing reads an evaluation's result. Only the measured speeds differ."""
    r_overlapped, overlapped_dir = e2e_run
    r = run_script(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--save-model",
                   "--epsilon-decay-steps", "50", *TINY, "--no-overlap-offline-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluations overlapped with them]" in r_overlapped.stdout and "evaluations excluded]" in r.stdout
    (in_between_dir,) = (tmp_path / "runs").iterdir()
    overlapped, in_between = read_events(overlapped_dir), read_events(in_between_dir)
    tags = {t for t in overlapped.Tags()["scalars"] if not t.endswith("SPS")}
    assert tags == {t for t in in_between.Tags()["scalars"] if not t.endswith("SPS")}
    assert {"offline/eval_return", "offline/loss", "eval/episodic_return", "charts/distill_coeff"} <= tags
    for tag in sorted(tags):
        assert scalars(in_between, tag) == scalars(overlapped, tag), tag
    assert [s for s, _ in scalars(overlapped, "offline/eval_return")] == [32, 64]
    model = "qdagger_dqn_atari_jax.cleanrl_model"
    assert (in_between_dir / model).read_bytes() == (overlapped_dir / model).read_bytes()


def test_replay_on_host_after_lambda_reaches_zero_learns_what_the_device_replay_run_learns(tmp_path, fixture_copy):
    """lambda is 0 for good after the evaluation at 256 (--distill-decay-period 256): from then on the device run's
    online step has no teacher forward pass and --replay-on-host sends zeros for the teacher's Q, with no teacher call
    (no loss reads those values then; their shape and type must still fit the replay). Both runs reach lambda 0 and
    log the same losses at the same steps, those after it included."""
    flags = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--epsilon-decay-steps", "50", *TINY,
             "--distill-decay-period", "256"]
    events = {}
    for name, extra in (("device", []), ("host", ["--replay-on-host"])):
        (tmp_path / name).mkdir()
        r = run_script(tmp_path / name, *flags, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "final: lambda 0," in r.stdout, r.stdout[-2000:]
        (run_dir,) = (tmp_path / name / "runs").iterdir()
        events[name] = read_events(run_dir)
    after = [v for s, v in scalars(events["host"], "charts/distill_coeff") if s >= 256]
    assert after and set(after) == {0.0}, after
    for tag in ("losses/loss", "losses/td_loss", "losses/distill_loss"):
        want, got = scalars(events["device"], tag), scalars(events["host"], tag)
        assert [s for s, _ in got] == [s for s, _ in want] and sum(s > 256 for s, _ in want) >= 4, tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-3, err_msg=tag)
    assert all(v == 0.0 for s, v in scalars(events["host"], "losses/distill_loss") if s > 256)  # a term of weight 0 logs 0


def test_saved_model_reloads_with_the_same_q_values(e2e_run):
    _, run_dir = e2e_run
    args = json.loads((run_dir / "args.json").read_text())
    (model,) = run_dir.glob("*.cleanrl_model")
    net = q.make_student(args["network"], 4)
    template = net.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    params = flax.serialization.from_bytes(template, model.read_bytes())
    probe = np.load(run_dir / "q_probe.npz")
    np.testing.assert_allclose(np.asarray(net.apply(params, probe["obs"])), probe["q"], rtol=1e-6, atol=1e-6)
    # It is the trained student, not the initialisation.
    assert not np.allclose(params["params"]["Dense_1"]["kernel"], template["params"]["Dense_1"]["kernel"])
    assert not list(run_dir.glob("*.tmp"))


def test_the_finished_run_uploads_its_model_logs_and_card(e2e_run, e2e_hub):
    r, run_dir = e2e_run
    repo = "me/Breakout-v5-qdagger_dqn_atari_jax-qdagger-seed1"
    assert f"model uploaded to {e2e_hub.endpoint}/{repo}" in r.stdout
    files = e2e_hub.repos[repo]
    (events,) = run_dir.glob("events.out.tfevents.*")
    for name in ("qdagger_dqn_atari_jax.cleanrl_model", "args.json", "q_probe.npz", "final_eval.json", events.name):
        assert files[name] == (run_dir / name).read_bytes(), name
    assert files["qdagger_dqn_atari_jax.py"] == SCRIPT.read_bytes()
    # final_eval.json is the final evaluation the log shows: its mean at the last step, over the episodes it played.
    final = json.loads(files["final_eval.json"])
    acc = read_events(run_dir)
    last_step, last_mean = scalars(acc, "eval/episodic_return")[-1]
    assert final["agent_steps"] == last_step == 512 and final["mean"] == pytest.approx(last_mean)
    assert final["mean"] == pytest.approx(np.mean(final["returns"])) and final["std"] == pytest.approx(np.std(final["returns"]))
    assert final["teacher_return"] == pytest.approx(scalars(acc, "teacher/mean_return")[-1][1])
    assert "--upload-model" in final["command"] and final["command"].startswith("python qdagger_dqn_atari_jax.py ")
    card = files["README.md"].decode()
    assert f"value: {final['mean']:.2f} +/- {final['std']:.2f}" in card and f"hf://{repo}/qdagger_dqn_atari_jax.cleanrl_model" in card


def test_resuming_a_finished_run_with_upload_model_uploads_it(e2e_run, e2e_hub, fixture_copy):
    r, run_dir = e2e_run
    repo = "me/Breakout-v5-qdagger_dqn_atari_jax-qdagger-seed1"
    asked = len(e2e_hub.calls("hub", "POST"))
    flags = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--num-envs", "2", "--epsilon-decay-steps", "50", *TINY]
    again = run_script(run_dir.parent.parent, "--resume", "--run-name", run_dir.name, "--save-model", "--upload-model", *flags,
                       env=client_env(run_dir.parent.parent, e2e_hub.endpoint, HUB_TOKEN))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished already" in again.stdout and "model uploaded to" in again.stdout
    # The same files again: huggingface_hub's preupload finds every one unchanged and makes no empty commit.
    posts = [c[2] for c in e2e_hub.calls("hub", "POST")[asked:]]
    assert f"/api/models/{repo}/preupload/main" in posts and len(e2e_hub.commit_log) == 1
    assert e2e_hub.repos[repo]["qdagger_dqn_atari_jax.cleanrl_model"] == (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes()


def test_upload_model_checks_its_flags_and_the_login_before_the_run(tmp_path, fixture_copy):
    base = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), *TINY]
    with HubEmulator({}, token=HUB_TOKEN, user="me") as hub:
        for flags, token, message in ((["--upload-model"], HUB_TOKEN, "--upload-model uploads the saved model: add --save-model"),
                                      (["--save-model", "--upload-model"], None, "--upload-model needs a Hugging Face login"),
                                      (["--save-model", "--upload-model"], "hf_wrong", "refused the Hugging Face token (HTTP 401")):
            r = run_script(tmp_path, *base, *flags, env=client_env(tmp_path, hub.endpoint, token), timeout=120)
            lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
            assert r.returncode == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert not (tmp_path / "runs").exists()  # told before the run folder exists


def test_dopamine_replay_as_teacher_data(tmp_path, teacher_with_replay):
    """--teacher-data dopamine-replay: the offline phase trains on the teacher's own Dopamine replay (the
    official main setting); `both` appends roll-outs; a checkpoint without replay files says what to do."""
    flags = ["--teacher-checkpoint", str(teacher_with_replay), "--teacher-data", "dopamine-replay", *TINY]
    r = run_script(tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher replay: " in r.stdout and "240 rows" in r.stdout and "(b) teacher data: 240 rows (Dopamine replay)" in r.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = read_events(run_dir)
    assert [st for st, _ in scalars(acc, "offline/loss")] == list(range(8, 65, 8))

    both = tmp_path / "both"
    both.mkdir()
    r = run_script(both, *flags[:3], "both", *TINY, "--offline-acting")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(Dopamine replay + 256 roll-out agent steps)" in r.stdout
    # --offline-acting (a deviation): the student also plays one agent step per offline update into its own replay
    # (64), so the replay holds more than 128 steps after online step 64, and learning starts there.
    assert "the student played 64 agent steps into its replay" in r.stdout
    (run_dir,) = (both / "runs").iterdir()
    acc = read_events(run_dir)
    # updates before agent steps t > 64 with (64 + t) % 4 == 0: the 8th (the first logged) is at t = 96
    due = [t for t in range(1, 513) if 64 + t > 128 and (64 + t) % 4 == 0]
    assert min(st for st, _ in scalars(acc, "losses/loss")) == due[7] == 96


def test_dopamine_replay_missing_gives_one_error_line(tmp_path, fixture_copy):
    r = run_script(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--teacher-data", "dopamine-replay", *TINY, timeout=120)
    assert r.returncode == 1
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert "--teacher-data rollout" in line and "Traceback" not in r.stderr


def test_no_offline_phase_explores_from_epsilon_one(tmp_path, fixture_copy):
    """Without an offline phase epsilon starts at 1 and decays over epsilon_decay_steps; no teacher data is collected."""
    flags = ["--teacher-checkpoint", str(fixture_copy("teacher_tf")), *TINY, "--offline-steps", "0", "--epsilon-decay-steps", "1000"]
    r = run_script(tmp_path, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(b) teacher data: skipped" in r.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = read_events(run_dir)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("offline/")]
    eps = scalars(acc, "charts/epsilon")
    # persistence_linearly_decaying_epsilon(1000, training_steps): the action at agent step g has training_steps g + 1;
    # the value logged at step S is the one vector step S - 1 acted with (1 env)
    assert eps[0] == (0, pytest.approx(1 - 0.99 * 1 / 1000))
    assert len(eps) > 5
    for step, value in eps[1:]:
        assert value == pytest.approx(max(1 - 0.99 * step / 1000, 0.01), abs=1e-6), step


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
    (records,) = offline_runs[0].glob("*.wandb")
    assert b"offline/loss" in records.read_bytes()  # sync_tensorboard found the run's event file and sent its scalars
    import imageio.v2 as imageio

    video = imageio.get_reader(run_dir / "videos" / "final-eval.mp4")
    assert video.count_frames() > 10 and video.get_data(0).shape == (168, 168, 3)
    # ... and the W&B run holds it as media, as CleanRL's --track --capture-video runs do
    (logged,) = offline_runs[0].glob("files/media/videos/videos/final_eval_*.mp4")
    assert logged.read_bytes() == (run_dir / "videos" / "final-eval.mp4").read_bytes()
    assert "could not be written or logged" not in r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "Breakout-v4"], "unknown Atari env id 'Breakout-v4'"),
        (["--env-id", "Pong-v5"], "the teacher has 4 actions but the environment has 6"),
        (["--teacher-checkpoint", "/nonexistent/teacher"], "does not exist"),
        (["--buffer-size", "100"], "--buffer-size 100 is smaller than what the online phase needs"),
        (["--buffer-size", "100000000"], "GiB but the available host memory is"),
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


# ----------------------------------------------------------------------------
# In-process: the protocol's pieces on real envpool, and the jitted hot paths
# ----------------------------------------------------------------------------
def collect_random_play(params, num_envs=4, steps=400, capacity=2048, seed=0, teacher_q=False, **env_kwargs):
    teacher = tu.DopamineNatureDQN(4)
    envs = tu.make_teacher_envs("Breakout-v5", num_envs, seed=seed, **env_kwargs)
    act = q.make_act(teacher.apply)
    rows = -(-capacity // num_envs)
    rb = q.make_replay([rows] * num_envs, 4 if teacher_q else 0)
    add = jax.jit(q.replay_add, static_argnums=1)
    obs, _ = envs.reset()
    key = jax.random.PRNGKey(seed)
    for _ in range(steps):
        key, k = jax.random.split(key)
        actions, tq, _ = jax.device_get(act(params, obs, k, 0.5 if teacher_q else 1.0))
        nxt, reward, term, trunc, _ = envs.step(actions)
        rb = add(rb, 0, obs[:, -1], actions, np.clip(reward, -1, 1).astype(np.float32), term, trunc, nxt[:, -1], *([tq] if teacher_q else []))
        obs = nxt
    envs.close()
    return rb, rows


def test_offline_distillation_matches_the_teacher(fixture_copy):
    """A few hundred distillation-only updates on fixed teacher data lower the
    KL strongly and make the student pick the teacher's action far above chance."""
    teacher = tu.DopamineNatureDQN(4)
    teacher_params = tu.load_teacher(fixture_copy("teacher_tf"), num_actions=4).params
    rb, _ = collect_random_play(teacher_params)  # 1,600 transitions of random play, for state diversity
    sample = jax.jit(lambda rb, k, b: q.replay_sample(rb, k, b, 3, 0.99)[0], static_argnums=2)

    # The fixture's random weights prefer one action on ~99% of Breakout frames, which
    # would make agreement trivial: sharpen and recentre the head so the greedy action varies.
    head = teacher_params["params"]["Dense_1"]
    head["kernel"], head["bias"] = head["kernel"] * 20, head["bias"] * 20
    head["bias"] = head["bias"] - np.median(np.asarray(teacher.apply(teacher_params, sample(rb, jax.random.PRNGKey(5), 1024).obs)), axis=0)

    student = q.make_student("nature", 4)
    params = student.init(jax.random.PRNGKey(1), np.zeros((1, 4, 84, 84), np.uint8))
    state = q.QState.create(apply_fn=student.apply, params=params, target_params=params,
                            tx=optax.inject_hyperparams(optax.adam)(learning_rate=1e-4, eps=1.5e-4))
    update = jax.jit(q.make_update(student, q.Args(temperature=0.1), teacher.apply))
    held_out = sample(rb, jax.random.PRNGKey(123), 256)
    teacher_q = teacher.apply(teacher_params, held_out.obs)
    teacher_action = np.asarray(jnp.argmax(teacher_q, -1))
    majority = np.bincount(teacher_action, minlength=4).max() / len(teacher_action)
    assert majority < 0.6  # the teacher's policy really depends on the state

    def measure(p):
        student_q = student.apply(p, held_out.obs)
        kl = float(q.distillation_loss(teacher_q, student_q, 0.1))
        return kl, float(np.mean(np.asarray(jnp.argmax(student_q, -1)) == teacher_action))

    kl0, agree0 = measure(state.params)
    c = coefs(0.0, 1.0, 1e-4)  # distillation only
    for i in range(400):  # the teacher's Q of the batch by a forward pass (the scripts cache it with the stored states)
        b = sample(rb, jax.random.PRNGKey(1000 + i), 32)
        state, metrics = update(state, b._replace(teacher_q=teacher.apply(teacher_params, b.obs)), teacher_params, c)
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
    rb, rows = collect_random_play(params, num_envs=2, steps=250, capacity=300, seed=3, teacher_q=True, max_episode_steps=40)
    assert int(rb.count.min()) > rows  # wrapped
    batch, ok = q.replay_sample(rb, jax.random.PRNGKey(0), 256, 3, 0.99)
    assert bool(ok)
    assert (np.asarray(batch.obs)[:, 0] == 0).all(axis=(1, 2)).any()  # some samples sit at an episode start
    np.testing.assert_allclose(np.asarray(teacher.apply(params, batch.obs)), np.asarray(batch.teacher_q), atol=1e-5)


def test_evaluation_counts_an_episode_that_straddles_the_budget():
    """Dopamine's protocol: the episode in progress when the budget runs out is played to its end and counted;
    the previous protocol (stop at the budget, drop unfinished episodes) would have lost the second episode."""
    envs = tu.make_teacher_envs("Breakout-v5", 1, seed=0, max_episode_steps=100)
    noop = jax.jit(lambda p, o, k, e: (jnp.zeros(o.shape[0], jnp.int32), jnp.zeros((o.shape[0], 4)), k))
    returns, lengths, steps = evaluate(noop, None, envs, 150, 0.0, jax.random.PRNGKey(0))
    assert lengths == [100, 100] and steps == 200
    # Several envs: every episode started before the budget is counted, none after it starts.
    envs4 = tu.make_teacher_envs("Breakout-v5", 4, seed=0, max_episode_steps=30)
    returns, lengths, steps = evaluate(noop, None, envs4, 130, 0.0, jax.random.PRNGKey(0))
    assert lengths == [30] * 8 and steps == 240  # 4 at 30 steps (120 < 130), 4 more, then the budget is spent
    envs.close()
    envs4.close()


def _tiny_learner(**overrides):
    args = q.Args(**{"batch_size": 8, "n_step": 3, **overrides})
    student = q.make_student("nature", 4)
    params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(1e-4, np.float32), eps=1.5e-4)
    state = q.QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    return args, student, state, q.make_learner(args, student, student.apply, jax.devices()[0])  # a teacher of the student's architecture


def _teacher_params():
    """The tiny learners' teacher: a Nature CNN (student.apply) with its own initialization."""
    return q.make_student("nature", 4).init(jax.random.PRNGKey(42), np.zeros((1, 4, 84, 84), np.uint8))


def _teacher_buffer(seed=0, steps=60, num_envs=2):
    rng = np.random.default_rng(seed)
    rb = q.make_replay([steps + 8] * num_envs, 4)
    for t in range(steps):
        end = rng.random(num_envs) < 0.05
        rb = q.replay_add(rb, 0, rng.integers(0, 256, (num_envs, 84, 84), np.uint8), rng.integers(0, 4, num_envs),
                          rng.uniform(-1, 1, num_envs).astype(np.float32), end, np.zeros(num_envs, bool),
                          rng.integers(0, 256, (num_envs, 84, 84), np.uint8), rng.normal(size=(num_envs, 4)).astype(np.float32))
    return rb


def _online_steps(rng, count, num_envs=2):
    """Random envpool-like vector steps (whole observations, as the scripts act on them and store them)."""
    return [(rng.integers(0, 256, (num_envs, 4, 84, 84), np.uint8), rng.integers(0, 4, num_envs).astype(np.int32),
             rng.uniform(-1, 1, num_envs).astype(np.float32), np.array([t % 11 == 10] + [False] * (num_envs - 1)),
             np.array([False] * (num_envs - 1) + [t % 13 == 12]), rng.integers(0, 256, (num_envs, 4, 84, 84), np.uint8))
            for t in range(count)]


def test_fused_offline_updates_equal_single_updates():
    """K updates in one jitted call equal K calls of one update (same keys, same target syncs, one of them
    inside the fused block)."""
    args, _, state0, learner = _tiny_learner(target_network_frequency=12, train_frequency=4)  # sync every 3 updates
    trb = _teacher_buffer()
    c, tp = coefs(1.0, 3.0, 1e-4), jax.device_put(_teacher_params())
    fused, key = jax.tree.map(jnp.copy, state0), jax.random.PRNGKey(7)
    fused, key, m_fused = learner.offline(fused, trb, key, 0, 5, c, tp)
    single, key1 = jax.tree.map(jnp.copy, state0), jax.random.PRNGKey(7)
    losses = []
    for step in range(5):
        single, key1, m = learner.offline(single, trb, key1, step, 1, c, tp)
        losses.append(float(m["loss"][0]))
    np.testing.assert_allclose(np.asarray(m_fused["loss"]), losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves((fused.params, fused.target_params, fused.opt_state)),
                    jax.tree.leaves((single.params, single.target_params, single.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    # --replay-on-host: the same updates composed from separate jitted pieces (sample where the data lives, update, sync)
    host_args = dataclasses.replace(args, replay_on_host=True)
    host_learner = q.make_learner(host_args, q.make_student("nature", 4), q.make_student("nature", 4).apply, jax.devices()[0])
    host, key2, m_host = host_learner.offline(jax.tree.map(jnp.copy, state0), trb, jax.random.PRNGKey(7), 0, 5, c, tp)
    np.testing.assert_allclose(np.asarray(m_host["loss"]), losses, rtol=2e-5)
    assert np.array_equal(np.asarray(key2), np.asarray(key1))
    for a, b in zip(jax.tree.leaves((host.params, host.target_params)), jax.tree.leaves((single.params, single.target_params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    assert not np.allclose(np.asarray(fused.target_params["params"]["Dense_1"]["kernel"]), np.asarray(state0.params["params"]["Dense_1"]["kernel"]))


def test_no_recompilation_after_warm_up():
    """lambda, lr, epsilon and the counters are traced: changing them between calls never compiles the hot paths
    again (the update count per vector step is static but takes at most three values, all met in the warm-up).
    Once lambda is 0 for good the teacher leaves the online step: that variant compiles once, then never again."""
    args, student, state, learner = _tiny_learner()
    trb = _teacher_buffer()
    rb = q.make_replay([64, 64], 4)
    act = q.make_act(student.apply)
    rng = np.random.default_rng(0)
    steps = _online_steps(rng, 57)
    key, tp = jax.random.PRNGKey(0), jax.device_put(_teacher_params())
    obs = rng.integers(0, 256, (2, 4, 84, 84), np.uint8)
    for i in range(30):  # warm-up: fill the buffer, then the update counts a run meets (0, 1 or 2 per vector step), a sync
        state, rb, key, _ = learner.online(state, rb, None, key, jax.device_put(steps[i]), tp, coefs(1.0, 3.0, 1e-4), i == 29, max(i - 27, 0))
    state, key, _ = learner.offline(state, trb, key, 0, 4, coefs(1.0, 3.0, 1e-4), tp)
    act(state.params, obs, key, 1.0)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    for i in range(30, 45):
        lam = 1.0 - i / 50
        c = coefs(1.0, 3.0 * lam, lambda_learning_rate(lam, 1e-4, 1e-5), margin=0.5 * lam)
        state, rb, key, _ = learner.online(state, rb, None, key, jax.device_put(steps[i]), tp, c, i % 4 == 0, i % 3)  # the target sync is traced
        state, key, _ = learner.offline(state, trb, key, i, 4, c, tp)
        act(state.params, obs, key, linear_schedule(1.0, 0.01, 50, i))
    assert compiles == []  # XLA compiled nothing after the warm-up
    c0 = coefs(1.0, 0.0, 1e-5, margin=0.0)
    for i in range(45, 57):  # lambda = 0 for good: the step without the teacher, for each update count once
        state, rb, key, _ = learner.online(state, rb, None, key, jax.device_put(steps[i]), None, c0, i % 4 == 0, i % 3)
        if i == 47:
            assert len(compiles) == 3
            compiles.clear()
    assert compiles == []


def test_replay_on_host_path_equals_the_fused_online_step():
    """--replay-on-host composes the same pure functions from separate jitted pieces (the teacher's Q computed on the
    accelerator, the newest frames sent to the host replay, sample there, update on the accelerator, sync by its own
    call): the same state and buffer as the fused online step."""
    args, student, state0, learner = _tiny_learner()
    host_learner = q.make_learner(dataclasses.replace(args, replay_on_host=True), student, student.apply, jax.devices()[0])
    steps = _online_steps(np.random.default_rng(1), 40)
    c, tp = coefs(1.0, 3.0, 1e-4), _teacher_params()
    a_state, a_rb, a_key = jax.tree.map(jnp.copy, state0), q.make_replay([64, 64], 4), jax.random.PRNGKey(2)
    b_state, b_rb, b_key = jax.tree.map(jnp.copy, state0), q.make_replay([64, 64], 4), jax.random.PRNGKey(2)
    for t, tr in enumerate(steps):
        n = 2 if t >= 20 else 0
        a_state, a_rb, a_key, _ = learner.online(a_state, a_rb, None, a_key, jax.device_put(tr), tp, c, t == 30, n)  # the sync inside the step
        b_state, b_rb, b_key, _ = host_learner.online(b_state, b_rb, None, b_key, jax.device_put(tr), tp, c, t == 30, n)
        if t == 30:
            synced = jax.tree.map(np.asarray, b_state.params)
    for a, b in zip(jax.tree.leaves((a_state.params, a_state.target_params, a_rb)), jax.tree.leaves((b_state.params, b_state.target_params, b_rb))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(a_state.target_params), jax.tree.leaves(synced)):  # the target is the params of step 30's end
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-7)
    assert np.abs(np.asarray(a_rb.teacher_q)).min(axis=1).max() > 0  # the teacher's Q computed in the step was stored


def test_the_storing_call_computes_the_teacher_q_of_the_acted_on_states():
    """learner.store (the offline acting's store; the online step stores through it) caches the teacher's Q of each
    stored state, as a separate teacher call gives it; zeros once lambda is 0 for good (no teacher_params); no
    column in a replay that caches none. Rows are those replay_add writes (the episode-end row gets zeros)."""
    _, student, _, learner = _tiny_learner()
    tp = _teacher_params()
    steps = _online_steps(np.random.default_rng(3), 12)
    with_q, zeros, oracle, none = q.make_replay([16, 16], 4), q.make_replay([16, 16], 4), q.make_replay([16, 16], 4), q.make_replay([16, 16], 0)
    for tr in steps:
        with_q = learner.store(with_q, jax.device_put(tr), tp)
        zeros = learner.store(zeros, jax.device_put(tr), None)
        oracle = q.replay_add(oracle, 0, *tr, np.asarray(student.apply(tp, tr[0])))
        none = learner.store(none, jax.device_put(tr), None)
    np.testing.assert_allclose(np.asarray(with_q.teacher_q), np.asarray(oracle.teacher_q), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(with_q.teacher_q)).sum() > 0 and not np.asarray(zeros.teacher_q).any()
    for a, b in zip(jax.tree.leaves(with_q._replace(teacher_q=0)), jax.tree.leaves(none._replace(teacher_q=0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert none.teacher_q.shape == (32, 0)
