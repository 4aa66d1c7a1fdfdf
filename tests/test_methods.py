"""--method: every baseline of the paper, end to end on real envpool Atari with tiny budgets (what makes each one
itself, read back from the event file and the console), their pure loss/schedule functions against hand values,
and chained reincarnation (a run of ours as the next run's teacher)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qdagger_dqn_atari_jax as q
import qdagger_rainbow_atari_jax as qr

ROOT = Path(__file__).resolve().parent.parent
# Budgets only: every method keeps its own phases and schedules (the flags below do not touch them).
TINY = ["--num-envs", "2", "--eval-steps", "100", "--max-episode-steps", "100", "--eval-num-envs", "2", "--teacher-steps", "256", "--updates-per-call", "1",
        "--offline-eval-frequency", "0", "--total-timesteps", "384", "--learning-starts", "128", "--buffer-size", "1024",
        "--batch-size", "8", "--log-frequency", "8", "--checkpoint-frequency", "0"]


def run(script: str, cwd: Path, *flags: str):
    r = subprocess.run([sys.executable, str(ROOT / script), *TINY, *flags], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    s = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    return r.stdout, s, run_dir


OFFLINE = ["--offline-steps", "32"]  # for the methods with an offline phase


def values(s, tag):
    return [v for _, v in s[tag]]


# ----------------------------------------------------------------------------
# Pure functions against hand-computed values
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("script", [q, qr])
def test_cql_loss_by_hand(script):
    qv = jnp.array([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]])
    actions = jnp.array([1, 0])
    # tau = 1: logsumexp(1, 2, 0) - 2 = log(e + e^2 + 1) - 2 = 0.40760596; logsumexp(0.5 x3) - 0.5 = log 3
    hand = [np.log(np.e + np.e**2 + 1) - 2.0, np.log(3.0)]
    got = np.asarray(script.cql_loss(qv, actions, 1.0))
    np.testing.assert_allclose(np.mean(got), np.mean(hand), rtol=1e-6)
    # tau = 0.5 scales Q by 2 first: log(e^2 + e^4 + 1) - 4 and log 3
    got = np.asarray(script.cql_loss(qv, actions, 0.5))
    np.testing.assert_allclose(np.mean(got), np.mean([np.log(np.e**2 + np.e**4 + 1) - 4.0, np.log(3.0)]), rtol=1e-6)


@pytest.mark.parametrize("script", [q, qr])
def test_margin_loss_by_hand(script):
    qv = jnp.array([[1.0, 0.2, 0.9], [0.0, 3.0, 1.0]])
    expert = jnp.array([0, 2])
    # row 0: max(q + 1[a != 0] - 1, 0) = [0, 0.2, 0.9]; row 1: max(q + 1[a != 2] - 1, 0) = [0, 3, 0]
    rows = [np.mean([0.0, 0.2, 0.9]), np.mean([0.0, 3.0, 0.0])]
    np.testing.assert_allclose(np.mean(np.asarray(script.margin_loss(qv, expert, 1.0))), np.mean(rows), rtol=1e-6)
    # the expert action leading by the margin costs nothing
    assert float(np.mean(np.asarray(script.margin_loss(jnp.array([[2.0, 0.5, 1.0]]), jnp.array([0]), 1.0)))) == 0.0


def test_jsrl_roll_in_schedule_by_hand():
    # the teacher's share after the roll-in: 1 -> 0 linearly over the decay period, then 0
    assert q.jsrl_teacher_share(1.0, 2_500_000, 0) == 1.0
    assert q.jsrl_teacher_share(1.0, 2_500_000, 625_000) == pytest.approx(0.75)
    assert q.jsrl_teacher_share(0.5, 2_500_000, 1_250_000) == pytest.approx(0.25)
    assert q.jsrl_teacher_share(1.0, 2_500_000, 3_000_000) == 0.0
    ep_t, roll_in = np.array([0, 4, 5, 9]), np.array([5, 5, 5, 5])
    u = np.array([0.1, 0.9, 0.3, 0.8])
    # roll-in envs (t < 5): the student (roll_in_guide False) or the teacher (True); after it: u <= share
    np.testing.assert_array_equal(q.jsrl_use_teacher(ep_t, roll_in, False, 0.5, u), [False, False, True, False])
    np.testing.assert_array_equal(q.jsrl_use_teacher(ep_t, roll_in, True, 0.5, u), [True, True, True, False])


@pytest.mark.parametrize("method, lam_now, lr_now", [("qdagger", 0.5, 5.5e-5), ("kickstarting", 0.5, 5.5e-5), ("rehearsal", 0.5, 5.5e-5),
                                                      ("dagger", 1.0, 1e-4), ("ql-dagger", 1.0, 1e-4), ("dqfd", 0.5, 1e-4),
                                                      ("tabula-rasa", 1.0, 6.25e-5), ("pretrain", 0.5, 1e-5), ("finetune", 0.5, 6.25e-5),
                                                      ("jsrl", 0.5, 6.25e-5)])
def test_each_methods_online_schedule(method, lam_now, lr_now):
    """After an evaluation at teacher-normalized score 0.5: lambda follows the score except for dagger and ql-dagger
    (lambda = 1) and tabula rasa (no teacher); the learning rate follows lambda (qdagger, kickstarting, rehearsal)
    or is the reference's constant (dagger and ql-dagger then 1e-4 through lambda = 1)."""
    args = q.resolve_method(q.Args(method=method), set())
    lam, lr, _ = q.online_schedule(args, 1.0, 55.0, 100.0, 10.0, 250_000)
    assert (lam, lr) == (pytest.approx(lam_now), pytest.approx(lr_now))


def test_methods_set_the_reference_values_and_explicit_flags_win():
    a = q.parse_args(["--method", "tabula-rasa"])
    assert (a.n_step, a.loss, a.online_learning_rate, a.epsilon_warmup_steps, a.epsilon_decay_steps, a.offline_steps) == (1, "mse", 6.25e-5, 20_000, 250_000, 0)
    a = q.parse_args(["--method", "tabula-rasa", "--n-step", "3", "--learning-starts", "10"])
    assert a.n_step == 3 and a.loss == "mse"  # the sweep's knob wins, the rest of the preset stays
    a = q.parse_args(["--method", "pretrain"])
    assert (a.cql_coef, a.n_step, a.online_learning_rate, a.reset_optimizer_online, a.distill_coef) == (1.0, 1, 1e-5, True, 0.0)
    assert q.parse_args(["--method", "dqfd"]).margin_coef == 1.0 and q.parse_args(["--method", "rehearsal"]).rehearsal_ratio == 0.25
    b = qr.parse_args(["--method", "tabula-rasa"])
    assert b.noisy and b.dueling and b.double_dqn and b.online_learning_rate == 6.25e-5  # Dopamine's full_rainbow.gin
    assert not qr.parse_args([]).noisy


# ----------------------------------------------------------------------------
# Each method end to end (DQN student), what makes it itself
# ----------------------------------------------------------------------------
def test_tabula_rasa(tmp_path):
    out, s, run_dir = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "tabula-rasa", "--save-model")
    assert "teacher: none" in out and "(a) teacher evaluation: skipped" in out and "(c) offline:" not in out
    assert not [t for t in s if t.startswith("offline/") or t.startswith("teacher/")]
    assert all(v == pytest.approx(6.25e-5) for v in values(s, "charts/learning_rate"))
    assert all(v == 0.0 for v in values(s, "losses/distill_loss"))
    # Dopamine's epsilon (warm-up at 1, then linear): the preset's 20,000-step warm-up is longer than this run, so the
    # run checked here sets a short one (explicit flags win over the preset); the value logged at step S is the one
    # the vector step S - 2 acted with, at training step S - 2 + 1 (README "Fidelity": online epsilon)
    (tmp_path / "short").mkdir()
    _, s2, _ = run("qdagger_dqn_atari_jax.py", tmp_path / "short", "--method", "tabula-rasa", "--epsilon-warmup-steps", "100",
                   "--epsilon-decay-steps", "200")
    logged = s2["charts/epsilon"]
    assert len(logged) > 5
    for step, eps in logged:
        training_steps = max(step - 2, 0) + 1
        hand = 0.01 + min(max((200 + 100 - training_steps) * 0.99 / 200, 0.0), 0.99)  # dqn_agent.linearly_decaying_epsilon
        assert eps == pytest.approx(hand, abs=1e-6), step
    assert logged[0][1] == 1.0 and any(0.01 < v < 1.0 for _, v in logged) and logged[-1][1] == pytest.approx(0.01)
    assert json.loads((run_dir / "args.json").read_text())["method"] == "tabula-rasa"


def test_kickstarting(tmp_path, fixture_copy):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "kickstarting", "--teacher-checkpoint", str(fixture_copy("teacher_tf")))
    assert "(b) teacher data: skipped" in out and not [t for t in s if t.startswith("offline/")]
    assert all(v > 0 for v in values(s, "losses/distill_loss")) and values(s, "charts/epsilon")[0] == pytest.approx(1 - 0.99 / 50_000)


def test_pretrain(tmp_path, fixture_copy):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "pretrain", "--teacher-checkpoint", str(fixture_copy("teacher_tf")), *OFFLINE)
    assert all(v > 0 for v in values(s, "offline/cql_loss")) and all(v == 0 for v in values(s, "offline/distill_loss"))
    assert all(v == 0 for v in values(s, "losses/cql_loss") + values(s, "losses/distill_loss"))  # online: TD only
    assert all(v == pytest.approx(1e-5) for v in values(s, "charts/learning_rate"))
    # The reference's OfflinePretrainingRunner only trains offline: the student does not act, its replay starts empty.
    assert "(c) offline: 32 updates" in out and "the student played" not in out
    assert min(st for st, _ in s["losses/loss"]) > 128  # --learning-starts 128 of its own steps, all online


@pytest.mark.parametrize("method", ["dagger", "ql-dagger"])
def test_dagger_and_ql_dagger(tmp_path, fixture_copy, method):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", method, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), *OFFLINE)
    td_weight = 0.0 if method == "dagger" else 1.0
    for prefix in ("offline", "losses"):
        for (_, loss), (_, td), (_, kl) in zip(s[f"{prefix}/loss"], s[f"{prefix}/td_loss"], s[f"{prefix}/distill_loss"]):
            assert loss == pytest.approx(td_weight * td + 3.0 * kl, rel=1e-5)
    assert all(v == 3.0 for v in values(s, "charts/distill_coeff")) and all(v == pytest.approx(1e-4) for v in values(s, "charts/learning_rate"))
    assert "lambda =" not in out  # lambda is not recomputed: 1 throughout


def test_jsrl(tmp_path, fixture_copy):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "jsrl", "--teacher-checkpoint", str(fixture_copy("teacher_tf")),
                    "--jsrl-decay-period", "400", "--jsrl-max-roll-in-steps", "1")
    share = values(s, "charts/teacher_action_share")
    assert share[0] > 0.6 and share[-1] < 0.3 and share[0] > share[-1]  # the teacher's share of actions falls
    assert all(v == 0 for v in values(s, "losses/distill_loss")) and "(c) offline:" not in out


def test_dqfd(tmp_path, fixture_copy):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "dqfd", "--teacher-checkpoint", str(fixture_copy("teacher_tf")), *OFFLINE)
    for (_, loss), (_, td), (_, margin) in zip(s["offline/loss"], s["offline/td_loss"], s["offline/margin_loss"]):
        assert loss == pytest.approx(td + 1.0 * margin, rel=1e-5)  # TD + lambda (1 offline) * margin_coef * margin loss
    assert all(v >= 0 for v in values(s, "offline/margin_loss") + values(s, "losses/margin_loss"))
    assert any(v > 0 for v in values(s, "offline/margin_loss") + values(s, "losses/margin_loss"))
    assert all(v == 0 for v in values(s, "losses/distill_loss"))


def test_rehearsal(tmp_path, fixture_copy):
    out, s, _ = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "rehearsal", "--teacher-checkpoint", str(fixture_copy("teacher_tf")), *OFFLINE)
    mix = values(s, "losses/rehearsal_share")
    # Each logged share is one batch of 8 independent draws at probability 0.25: over n draws the share is binomial;
    # it must lie within 4 standard deviations of 0.25 (a false alarm about once in 16,000 runs).
    n = 8 * len(mix)
    assert n >= 64
    assert abs(np.mean(mix) - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / n), (np.mean(mix), n)
    assert all(v > 0 for v in values(s, "losses/distill_loss"))


def test_finetune_from_a_dopamine_teacher_and_a_mismatched_architecture(tmp_path, fixture_copy):
    out, s, run_dir = run("qdagger_dqn_atari_jax.py", tmp_path, "--method", "finetune", "--teacher-checkpoint", str(fixture_copy("teacher_tf")))
    assert "student initialised from the teacher: max |Q_student - Q_teacher| on 8 states = 0" in out
    # reloaded_dqn.gin at 3eb419c: lr 6.25e-5 and Dopamine's MSE; the reloaded agent's training_steps are the teacher's,
    # so epsilon is 0.01 from the start; the target network is the teacher's own
    assert all(v == pytest.approx(6.25e-5) for v in values(s, "charts/learning_rate")) and values(s, "charts/epsilon")[0] == pytest.approx(0.01)
    assert "its target network from the teacher's target network" in out
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["loss"], args["total_timesteps"], args["online_learning_rate"]) == ("mse", 384, 6.25e-5)  # TINY's budget wins
    bad = subprocess.run([sys.executable, str(ROOT / "qdagger_dqn_atari_jax.py"), *TINY, "--method", "finetune", "--network", "impala",
                          "--teacher-checkpoint", str(fixture_copy("teacher_tf"))], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("error: ")]
    assert "needs a teacher with the student's architecture" in line and "Traceback" not in bad.stderr
    assert [p for p in run_dir.parent.iterdir()] == [run_dir]  # issue 26: refused before its run folder was written


# ----------------------------------------------------------------------------
# Chained reincarnation: today's student is tomorrow's teacher
# ----------------------------------------------------------------------------
def test_chained_reincarnation_from_nature_and_impala_students(tmp_path, fixture_copy):
    first = tmp_path / "first"
    first.mkdir()
    _, _, impala_run = run("qdagger_dqn_atari_jax.py", first, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--network", "impala",
                           "--save-model", "--offline-steps", "8", "--total-timesteps", "256")
    second = tmp_path / "second"
    second.mkdir()  # a Nature student reincarnated from the Impala student
    out, s, nature_run = run("qdagger_dqn_atari_jax.py", second, "--teacher-checkpoint", str(impala_run), "--save-model", *OFFLINE)
    assert "teacher: student dqn-impala" in out and "offline/distill_loss" in s
    third = tmp_path / "third"
    third.mkdir()  # ... and fine-tuned from that Nature student, which has the student's own architecture
    out, s, _ = run("qdagger_dqn_atari_jax.py", third, "--method", "finetune", "--teacher-checkpoint", str(nature_run))
    assert "teacher: student dopamine-nature-dqn" in out and "max |Q_student - Q_teacher| on 8 states = 0" in out


def test_rainbow_methods_and_a_rainbow_student_as_teacher(tmp_path, fixture_copy):
    a = tmp_path / "a"
    a.mkdir()
    out, s, rainbow_run = run("qdagger_rainbow_atari_jax.py", a, "--method", "tabula-rasa", "--save-model", "--total-timesteps", "256")
    assert "noisy=True" in out and "teacher: none" in out and all(v == pytest.approx(6.25e-5) for v in values(s, "charts/learning_rate"))
    b = tmp_path / "b"
    b.mkdir()  # distillation only, from the Rainbow student (its expected Q is the teacher's Q)
    out, s, _ = run("qdagger_rainbow_atari_jax.py", b, "--method", "dagger", "--teacher-checkpoint", str(rainbow_run), *OFFLINE)
    assert "teacher: student rainbow-nature-51-dueling-noisy" in out
    for (_, loss), (_, kl) in zip(s["losses/loss"], s["losses/distill_loss"]):
        assert loss == pytest.approx(1.0 * kl, rel=1e-5)
