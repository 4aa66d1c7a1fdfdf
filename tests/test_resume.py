"""Never lose a run: checkpoints, and a resume that ends bit-exactly as the uninterrupted run after SIGKILL in every
phase, after SIGINT and from damaged checkpoints. (The resume commands a user types and the pre-flight checks:
test_resume_commands.)"""

import os
import signal
import time

import numpy as np
import pytest

import compile_log
import teacher_utils as tu
from resume_helpers import checkpoints, final_line, finish, kill_in, one_value_per_step, run_whole, start


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fixture_copy):
    return run_whole(tmp_path_factory.mktemp("whole"), fixture_copy("teacher_tf"))


@pytest.mark.parametrize("phase, key", [("collect", "collected"), ("offline", "step"), ("online", "global_step")])
def test_sigkill_then_resume_is_bit_exact(tmp_path, fixture_copy, uninterrupted, phase, key):
    """Killed with SIGKILL in the teacher roll-out, offline or online, then resumed: the final parameters, lambda,
    lr and counters are bit-identical to the uninterrupted run (the envs are restored exactly by replaying the
    phase's recorded actions on fresh envs with the same seed), and every logged step appears once."""
    out_whole, whole = uninterrupted
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "cut"
    kill_in(start(tmp_path, "cut", teacher=teacher), run_dir, phase, key)
    assert not (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").exists()
    rc, out, err = finish(start(tmp_path, "cut", "--resume", teacher=teacher, env={**os.environ, "JAX_LOG_COMPILES": "1"}))
    assert rc == 0, err[-3000:]
    assert "(resumed from ckpt-" in out and f"phase {phase})" in out
    # The restored keys and, online, the restored pending step sit where the live loop keeps them: no second compilation.
    assert "jit(online_step)" in compile_log.compiled_names(err) and not compile_log.hot_recompiled(err)
    assert final_line(out) == final_line(out_whole) and final_line(out).startswith("final: lambda 0,")
    assert (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes() == (whole / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes()
    resumed, reference = one_value_per_step(run_dir), one_value_per_step(whole)
    for tag in ("offline/loss", "offline/eval_return", "losses/loss", "eval/episodic_return", "charts/learning_rate"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in reference[tag]], tag
        np.testing.assert_array_equal([v for _, v in resumed[tag]], [v for _, v in reference[tag]], err_msg=tag)


def test_sigint_writes_a_usable_checkpoint_and_says_how_to_resume(tmp_path, fixture_copy, uninterrupted):
    """Ctrl-C at an arbitrary online step (not a scheduled checkpoint): the step's unapplied learning is saved with
    the checkpoint, so the resumed run ends bit-identical to the uninterrupted one."""
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "ctrl-c"
    proc = start(tmp_path, "ctrl-c", teacher=teacher)
    deadline = time.time() + 300
    while time.time() < deadline and not any(m["phase"] == "online" and m["progress"].get("global_step", 0) > 0 for m in checkpoints(run_dir)):
        time.sleep(0.05)
    time.sleep(0.3)  # off the checkpoint schedule
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc)
    assert rc == 130
    line = [x for x in err.splitlines() if x.startswith("interrupted: ")]
    assert len(line) == 1 and "--resume --run-name ctrl-c" in line[0] and "Traceback" not in err
    assert (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").exists()  # --save-model: the model so far
    rc, out, err = finish(start(tmp_path, "ctrl-c", "--resume", teacher=teacher))
    assert rc == 0, err[-3000:]
    assert final_line(out) == final_line(uninterrupted[0])
    whole = uninterrupted[1]
    assert (run_dir / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes() == (whole / "qdagger_dqn_atari_jax.cleanrl_model").read_bytes()
    resumed, reference = one_value_per_step(run_dir), one_value_per_step(whole)
    assert resumed["losses/loss"] == reference["losses/loss"]


def test_damaged_checkpoints_fall_back_to_the_previous_one(tmp_path, fixture_copy, uninterrupted):
    """A checkpoint cut mid-write (no sentinel) is ignored; a corrupted latest one is skipped with a warning."""
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "damaged"
    kill_in(start(tmp_path, "damaged", teacher=teacher), run_dir, "online", "global_step")
    complete = sorted(p for p in (run_dir / "checkpoints").glob("ckpt-*") if (p / tu.CHECKPOINT_SENTINEL).is_file())
    assert len(complete) >= 2  # --keep-checkpoints 2 (a third if killed between writing one and deleting the oldest)
    half = run_dir / "checkpoints" / f"ckpt-{int(complete[-1].name[5:]) + 1:06d}"
    half.mkdir()
    (half / "meta.json").write_text("{")  # a writer killed before its sentinel
    victim = complete[-1] / "state.0.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    rc, out, err = finish(start(tmp_path, "damaged", "--resume", teacher=teacher))
    assert rc == 0, err[-3000:]
    assert f"warning: checkpoint runs/damaged/checkpoints/{complete[-1].name} is corrupt (state.0 fail" in err
    assert f"resumed from {complete[-2].name}" in out
    assert final_line(out) == final_line(uninterrupted[0])


