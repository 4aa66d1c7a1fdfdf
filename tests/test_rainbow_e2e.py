"""End to end: qdagger_rainbow_atari_jax.py on real envpool Breakout-v5 with the committed
Dopamine TF teacher fixture, tiny budgets, every phase checked in the TensorBoard log."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compile_log
from hub_emulator import HubEmulator, client_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "qdagger_rainbow_atari_jax.py"
TINY = ["--eval-steps", "200", "--max-episode-steps", "100", "--eval-num-envs", "2", "--teacher-steps", "256",
        "--offline-steps", "32", "--updates-per-call", "1", "--offline-eval-frequency", "0", "--total-timesteps", "512",
        "--learning-starts", "128", "--buffer-size", "1024", "--batch-size", "8", "--eval-frequency", "256", "--log-frequency", "8"]
OFFLINE_STEPS, TOTAL, LEARNING_STARTS, LOG_FREQ, TRAIN_FREQ = 32, 512, 128, 8, 4


def run_script(tmp_path: Path, teacher: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    cmd = [sys.executable, str(SCRIPT), "--env-id", "Breakout-v5", "--teacher-checkpoint", str(teacher), *TINY, *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**(env or os.environ), "JAX_LOG_COMPILES": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    return proc, runs[0]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("network, variant", [("nature", "published"), ("nature", "dueling-double-noisy"), ("impala", "dueling-double-noisy")])
def test_end_to_end(tmp_path, fixture_copy, teacher_with_replay, network, variant):
    extra = ["--network", network]
    full = variant == "dueling-double-noisy"
    save = full and network == "impala"  # one run also saves, reloads and uploads the model (to the Hub emulator)
    dopamine = network == "nature" and not full  # the official main setting: the teacher's own Dopamine replay
    host = network == "nature" and full  # one run keeps its buffers in host memory: the same checks hold
    if full:
        extra += ["--dueling", "--double-dqn", "--noisy"]
    if save:
        extra += ["--save-model", "--upload-model", "--hf-entity", "lab"]
    if dopamine:
        extra += ["--teacher-data", "dopamine-replay"]
    if host:
        extra += ["--replay-on-host"]
    with HubEmulator({}, token="hf_emulator_token", user="me", orgs=("lab",)) as hub:
        proc, run_dir = run_script(tmp_path, teacher_with_replay if dopamine else fixture_copy("teacher_tf"), *extra,
                                   env=client_env(tmp_path, hub.endpoint, "hf_emulator_token"))
    out = proc.stdout + proc.stderr
    s = read_scalars(run_dir)
    # Keys and observations sit on the device from the start: no hot path compiles twice for the same shapes.
    # (--replay-on-host composes the offline call, the online step and the acted steps' store from separate jitted pieces;
    # with the teacher's Dopamine replay as its data no roll-out is stored by replay_add)
    unused = ({"jit(offline)", "jit(online_step)"} if host else set()) | ({"jit(replay_add)"} if dopamine else set())
    assert compile_log.HOT - unused <= compile_log.compiled_names(proc.stderr)
    assert not compile_log.hot_recompiled(proc.stderr)

    # (a) teacher evaluation: two whole 100-step episodes on 2 envs
    assert "(a) teacher: mean return 0.0 +- 0.0 over 2 episodes (200 agent steps)" in proc.stdout
    assert len(s["teacher/episodic_return"]) == 2 and "teacher/mean_return" in s
    # (b) teacher data
    assert ("(b) teacher data: 240 rows (Dopamine replay)" if dopamine else "(b) teacher data: 256 rows (256 roll-out agent steps)") in proc.stdout

    # (c) offline phase: every log_frequency updates, at offline update numbers
    expected_offline = list(range(LOG_FREQ, OFFLINE_STEPS + 1, LOG_FREQ))
    for name in ["td_loss", "distill_loss", "loss", "q_values"]:
        assert [st for st, _ in s[f"offline/{name}"]] == expected_offline, name
        assert all(math.isfinite(v) for _, v in s[f"offline/{name}"])
    assert all(v > 0 for _, v in s["offline/td_loss"])  # a C51 cross-entropy
    assert all(v >= 0 for _, v in s["offline/distill_loss"])
    for (_, loss), (_, td), (_, kl) in zip(s["offline/loss"], s["offline/td_loss"], s["offline/distill_loss"]):
        assert loss == pytest.approx(td + 1.0 * kl, rel=1e-4)  # lambda = 1, c = 1, uniform weights

    # (d) online phase: as the reference's OfflinePretrainingRunner, the student did not act offline, so its replay
    # starts empty and it learns once it holds more than LEARNING_STARTS agent steps: the reference's counter (32
    # offline updates, then one training step per agent step t) updates before agent step t when t > 128 and
    # (32 + t) % 4 == 0.
    assert "the student played" not in proc.stdout
    starts = LEARNING_STARTS
    n_updates = sum(1 for t in range(1, TOTAL + 1) if t > LEARNING_STARTS and (OFFLINE_STEPS + t) % TRAIN_FREQ == 0)
    assert n_updates == 96
    for name in ["td_loss", "distill_loss", "loss", "q_values", "priority_mean"]:
        points = s[f"losses/{name}"]
        assert len(points) == n_updates // LOG_FREQ, name
        assert all(starts < st <= TOTAL and math.isfinite(v) for st, v in points), name
    assert all(v > 0 for _, v in s["losses/priority_mean"])
    for name in ["SPS", "epsilon", "learning_rate", "distill_coeff"]:
        assert name and s[f"charts/{name}"], name
    # The fixture teacher scores below the random score, so lambda keeps its value 1 at every evaluation: lambda * c is
    # exactly c = 1 and the learning rate exactly 1 * 1e-4 + 0 * 1e-5 at every logged step.
    assert len(s["charts/distill_coeff"]) > 3 and all(v == pytest.approx(1.0, abs=1e-7) for _, v in s["charts/distill_coeff"])
    assert len(s["charts/learning_rate"]) > 3 and all(v == pytest.approx(1e-4, rel=1e-6) for _, v in s["charts/learning_rate"])
    eps = s["charts/epsilon"]
    # Noisy nets: Dopamine 4.0.6's constant end_e. Otherwise the schedule counts the 32 offline updates: the action at
    # agent step g (logged at g + 1, one env) has training_steps 32 + g + 1 (persistence epsilon, decay 50,000).
    if full:
        assert all(v == pytest.approx(0.01) for _, v in eps)
    else:
        assert eps[0] == (0, pytest.approx(1 - 0.99 * 33 / 50_000))
        assert all(v == pytest.approx(1 - 0.99 * (32 + max(st - 1, 0) + 1) / 50_000, abs=1e-7) for st, v in eps)

    # (d)/(e) evaluations at 256 and 512; the fixture teacher is below the random score, so lambda keeps its value
    assert "(d) online step 256: student" in out and "(e) final online step 512: student" in out
    assert [st for st, _ in s["eval/episodic_return"]] == [256, 512]
    assert "lambda keeps its value" in out
    assert f"(d) online: 512 agent steps, {n_updates} updates" in proc.stdout
    assert proc.stdout.index("(d) online: 512") < proc.stdout.index("(e) final")

    if save:
        check_saved_model(run_dir)
        # final_eval.json is the final evaluation of the log; the upload holds it with the model.
        final = json.loads((run_dir / "final_eval.json").read_text())
        assert final["agent_steps"] == 512 and final["mean"] == pytest.approx(s["eval/episodic_return"][-1][1])
        files = hub.repos["lab/Breakout-v5-qdagger_rainbow_atari_jax-qdagger-seed1"]
        for name in ("qdagger_rainbow_atari_jax.cleanrl_model", "args.json", "q_probe.npz", "final_eval.json"):
            assert files[name] == (run_dir / name).read_bytes(), name
        assert files["qdagger_rainbow_atari_jax.py"] == SCRIPT.read_bytes() and "model uploaded to" in proc.stdout
    else:
        assert "upload" not in proc.stdout and not hub.repos


def check_saved_model(run_dir: Path):
    import flax
    import jax

    import qdagger_rainbow_atari_jax as qr

    args = qr.Args(**json.loads((run_dir / "args.json").read_text()))
    assert args.network == "impala" and args.noisy and args.dueling and args.double_dqn
    net = qr.make_student(args, 4)
    probe = np.load(run_dir / "q_probe.npz")
    template = net.init(jax.random.PRNGKey(123), probe["obs"][:1])
    params = flax.serialization.from_bytes(template, (run_dir / f"{args.exp_name}.cleanrl_model").read_bytes())
    q = np.asarray(qr.expected_q(net.apply(params, probe["obs"]), qr.make_support(args)))
    assert q.shape == (probe["obs"].shape[0], 4)
    np.testing.assert_allclose(q, probe["q"], rtol=1e-5, atol=1e-5)
    q_fresh = np.asarray(qr.expected_q(net.apply(template, probe["obs"]), qr.make_support(args)))
    assert np.abs(q_fresh - probe["q"]).max() > 1e-4  # the reload did load something


def test_bad_flag_is_a_one_line_error(tmp_path, fixture_copy):
    cmd = [sys.executable, str(SCRIPT), "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--v-min", "5", "--v-max", "-5"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --v-min must be below --v-max")
