"""Resuming as a user does it, and starts that fail: the resume's flag checks, the printed resume command run as
printed, Ctrl-C offline with checkpoints off, a failed start's run name, and the pre-flight checks (memory, output
folder, unique run names, W&B login, NaN), each one error line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import teacher_utils as tu
from reincarnate import run as rr
from resume_helpers import FLAGS, SCRIPT, checkpoints, final_line, finish, kill_in, run_whole, start


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fixture_copy):
    return run_whole(tmp_path_factory.mktemp("whole"), fixture_copy("teacher_tf"))


def test_resume_refuses_changed_algorithm_flags_and_allows_runtime_ones(tmp_path, fixture_copy, uninterrupted):
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "flags"
    kill_in(start(tmp_path, "flags", teacher=teacher), run_dir, "online", "global_step")
    rc, out, err = finish(start(tmp_path, "flags", "--resume", "--learning-rate", "3e-4", teacher=teacher))
    assert rc == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "--learning-rate (was 0.0001, now 0.0003)" in line
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    # Run-time flags may change (W&B, how often to log and checkpoint) and what is learned does not.
    i = FLAGS.index("--log-frequency")
    flags = FLAGS[: i + 1] + ["5"] + FLAGS[i + 2:]
    i = flags.index("--checkpoint-frequency")
    flags = flags[: i + 1] + ["40"] + flags[i + 2:]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--teacher-checkpoint", str(teacher), "--run-name", "flags", *flags, "--resume", "--track"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rc, out, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert final_line(out) == final_line(uninterrupted[0])
    whole = uninterrupted[1]
    assert (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes() == (whole / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes()


def test_ctrl_c_offline_with_checkpoints_off_still_resumes(tmp_path, fixture_copy):
    """--checkpoint-frequency 0 writes no checkpoints, but Ctrl-C still writes one (the only way to keep the work),
    and with it the teacher data the offline phase needs: the resume finishes the run."""
    teacher = fixture_copy("teacher_tf")
    flags = [x for x in FLAGS if x != "--save-model"]
    for name, value in (("--checkpoint-frequency", "0"), ("--offline-steps", "600"), ("--offline-eval-frequency", "0"), ("--total-timesteps", "64"),
                        ("--learning-starts", "32")):
        i = flags.index(name)
        flags[i + 1] = value
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--teacher-checkpoint", str(teacher), "--run-name", "off", *flags],
                                cwd=tmp_path, stdout=f, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and "(b) teacher data" not in log.read_text():
            time.sleep(0.05)
        time.sleep(1.0)  # inside the offline phase
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    run_dir = tmp_path / "runs" / "off"
    assert [m["phase"] for m in checkpoints(run_dir)] == ["offline"]
    assert (run_dir / "checkpoints" / "teacher_data").is_dir()
    r = subprocess.run([sys.executable, str(SCRIPT), "--teacher-checkpoint", str(teacher), "--run-name", "off", *flags, "--resume"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "phase offline)" in r.stdout and "final: " in r.stdout
    assert checkpoints(run_dir)[-1]["phase"] == "done"  # a finished run, usable as a teacher


# ----------------------------------------------------------------------------
# Pre-flight checks: before any phase, one error line
# ----------------------------------------------------------------------------
def run_quick(cwd, *flags, env=None):
    t0 = time.time()
    r = subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    return r, lines, time.time() - t0


def test_a_buffer_larger_than_the_machine_fails_before_any_phase(tmp_path, fixture_copy):
    r, lines, seconds = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--buffer-size", "100000000")
    assert r.returncode == 1 and len(lines) == 1 and "GiB but the available host memory is" in lines[0] and "--buffer-size" in lines[0]
    assert "(a)" not in r.stdout and seconds < 60  # (before the teacher is even loaded; generous for a loaded machine)


def test_an_unwritable_output_folder_is_one_error_line(tmp_path, fixture_copy):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--total-timesteps", "64")
    assert r.returncode == 1 and len(lines) == 1 and "cannot write to runs/" in lines[0] and "Traceback" not in r.stderr


def test_an_existing_run_name_is_not_overwritten(tmp_path, fixture_copy):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "args.json").write_text("{}")
    (tmp_path / "runs" / "taken" / "taken.cleanrl_model").write_bytes(b"a finished run's model")
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--run-name", "taken")
    assert r.returncode == 1 and "already holds a run; pass --resume" in lines[0]


def test_track_without_a_login_is_one_error_line(tmp_path, fixture_copy):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")} | {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--track", env=env)
    assert r.returncode == 1 and len(lines) == 1 and "wandb login" in lines[0] and "Traceback" not in r.stderr


def test_run_names_started_together_differ_and_show_game_method_seed():
    names = {rr.default_run_name("Breakout-v5", "qdagger_dqn_atari_jax", "qdagger", 1) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("Breakout-v5__qdagger_dqn_atari_jax__qdagger__1__") for n in names)


def test_disk_too_small_for_a_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10 * 2**30, 9 * 2**30, 2**30))
    with pytest.raises(tu.RunError, match=r"need 6\.6 GiB on disk but .* has 1\.0 GiB free"):
        rr.check_output_folder(tmp_path / "runs" / "x", 7063 * 1_000_000, "a checkpoint")


def test_a_diverging_loss_stops_the_run_naming_phase_step_and_the_flag_in_use(tmp_path, fixture_copy):
    """Offline: the error line starts on its own line, names the phase, the update and --learning-rate; the offline
    checkpoints written before it are named. Online (issue 26: tabula rasa at --online-learning-rate 1e12): it names
    --online-learning-rate, says truly that no checkpoint was written, and nothing evaluated from the diverged
    parameters is logged."""
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), *FLAGS, "--learning-rate", "1e30",
                            "--run-name", "nan")
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "the student diverged: the offline loss is not finite at update" in lines[0] and "(phase c)" in lines[0]
    assert "its last checkpoint (runs/nan/checkpoints/ckpt-" in lines[0] and "under a new --run-name with a lower --learning-rate (now 1e+30)" in lines[0]
    online = list(FLAGS)
    i = online.index("--checkpoint-frequency")
    online[i + 1] = "0"
    r, lines, _ = run_quick(tmp_path, "--method", "tabula-rasa", *online, "--online-learning-rate", "1e12", "--run-name", "nan-online")
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "(phase d)" in lines[0] or "before the student eval" in lines[0]
    assert "no checkpoint was written before it" in lines[0] and "a lower --online-learning-rate (now 1e+12)" in lines[0]
    acc = EventAccumulator(str(tmp_path / "runs" / "nan-online"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "eval/episodic_return" not in acc.Tags()["scalars"]


def test_the_printed_resume_command_works_as_printed(tmp_path, fixture_copy, uninterrupted):
    """issue 26: Ctrl-C prints `python qdagger_dqn_atari_jax.py --resume --run-name X`; run exactly that (no other flag):
    the flags come from the run's args.json and the run ends as the uninterrupted one. A flag given explicitly and
    different is still refused, naming it."""
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "printed"
    kill_in(start(tmp_path, "printed", teacher=teacher), run_dir, "online", "global_step")
    r = subprocess.run([sys.executable, str(SCRIPT), "--seed", "2", "--resume", "--run-name", "printed"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "--seed (was 1, now 2)" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--resume", "--run-name", "printed"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_line(r.stdout) == final_line(uninterrupted[0])
    whole = uninterrupted[1]
    assert (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes() == (whole / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes()


def test_a_start_that_failed_before_its_first_checkpoint_can_be_started_again(tmp_path, fixture_copy):
    """issue 26: a start that fails after its folder was written (here: it diverges before any checkpoint) leaves
    args.json and logs but no checkpoint. A plain rerun with the same --run-name starts over (its old logs replaced);
    --resume says there is nothing to resume. A finished run, even with checkpoints off, is never started over."""
    teacher = str(fixture_copy("teacher_tf"))
    flags = [x for x in FLAGS if x != "--save-model"]
    i = flags.index("--checkpoint-frequency")
    flags[i + 1] = "0"
    r, lines, _ = run_quick(tmp_path, "--method", "tabula-rasa", *flags, "--online-learning-rate", "1e12", "--run-name", "again")
    assert r.returncode == 1 and "diverged" in lines[0] and "start the run again with a lower" in lines[0]
    run_dir = tmp_path / "runs" / "again"
    assert (run_dir / "args.json").is_file() and list(run_dir.glob("events.out.tfevents.*"))
    assert not list(run_dir.glob("checkpoints/ckpt-*")) and not (run_dir / "finished.json").exists()
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", teacher, *flags, "--run-name", "again", "--resume")
    assert r.returncode == 1 and "has no complete checkpoint; start the run again without --resume" in lines[0]
    short = [*flags, "--offline-steps", "8", "--total-timesteps", "64", "--learning-starts", "32", "--checkpoint-frequency", "0"]
    r = subprocess.run([sys.executable, str(SCRIPT), "--teacher-checkpoint", teacher, *short, "--run-name", "again"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    started = json.loads((run_dir / "args.json").read_text())
    assert started["method"] == "qdagger" and started["online_learning_rate"] != 1e12 and (run_dir / "finished.json").is_file()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # the failed start's log is gone
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert max(e.step for e in acc.Scalars("offline/loss")) == 8
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", teacher, *short, "--run-name", "again")
    assert r.returncode == 1 and "already holds a run" in lines[0]
    r = subprocess.run([sys.executable, str(SCRIPT), "--resume", "--run-name", "again"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "finished already" in r.stdout


def test_a_run_name_that_leaves_runs_is_refused(tmp_path, fixture_copy):
    r, lines, _ = run_quick(tmp_path, "--teacher-checkpoint", str(fixture_copy("teacher_tf")), "--run-name", "../escape")
    assert r.returncode == 1 and len(lines) == 1 and "--run-name '../escape' is a path" in lines[0]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
