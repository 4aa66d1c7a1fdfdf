"""The Rainbow script resumes bit-exactly too: killed with SIGKILL offline and online (the prioritized replay's sum tree,
max priority and pending rows, the PRNG keys and the unapplied last step in the checkpoint), then resumed, it ends
with the uninterrupted run's parameters, lambda, lr, counters and logged values."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compile_log
from resume_helpers import final_line, finish, kill_in, one_value_per_step

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "qdagger_rainbow_atari_jax.py"
MODEL = "qdagger_rainbow_atari_jax.cleanrl_model"
# As test_resume's flags: small, long enough to be killed in each phase; lambda is 0 for good after the evaluation at 192.
FLAGS = ["--distill-decay-period", "192", "--num-envs", "2", "--eval-steps", "100", "--max-episode-steps", "100", "--eval-num-envs", "2",
         "--teacher-steps", "256", "--offline-steps", "32", "--updates-per-call", "2", "--offline-eval-frequency", "16",
         "--total-timesteps", "384", "--learning-starts", "96", "--buffer-size", "1024", "--batch-size", "8", "--eval-frequency", "192",
         "--log-frequency", "8", "--checkpoint-frequency", "16", "--keep-checkpoints", "2", "--save-model"]


def start(cwd, name, *extra, teacher, env=None):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--teacher-checkpoint", str(teacher), "--run-name", name, *FLAGS, *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fixture_copy):
    cwd = tmp_path_factory.mktemp("rainbow_whole")
    rc, out, err = finish(start(cwd, "whole", teacher=fixture_copy("teacher_tf")))
    assert rc == 0, err[-3000:]
    return out, cwd / "runs" / "whole"


@pytest.mark.parametrize("phase, key", [("offline", "step"), ("online", "global_step")])
def test_rainbow_sigkill_then_resume_is_bit_exact(tmp_path, fixture_copy, uninterrupted, phase, key):
    out_whole, whole = uninterrupted
    teacher = fixture_copy("teacher_tf")
    run_dir = tmp_path / "runs" / "cut"
    kill_in(start(tmp_path, "cut", teacher=teacher), run_dir, phase, key)
    assert not (run_dir / MODEL).exists()
    rc, out, err = finish(start(tmp_path, "cut", "--resume", teacher=teacher, env={**os.environ, "JAX_LOG_COMPILES": "1"}))
    assert rc == 0, err[-3000:]
    assert "(resumed from ckpt-" in out and f"phase {phase})" in out
    assert not compile_log.hot_recompiled(err)
    assert final_line(out) == final_line(out_whole) and final_line(out).startswith("final: lambda 0,")
    assert (run_dir / MODEL).read_bytes() == (whole / MODEL).read_bytes()
    resumed, reference = one_value_per_step(run_dir), one_value_per_step(whole)
    for tag in ("offline/loss", "offline/eval_return", "losses/loss", "losses/priority_mean", "eval/episodic_return", "charts/learning_rate"):
        assert [s for s, _ in resumed[tag]] == [s for s, _ in reference[tag]] and reference[tag], tag
        np.testing.assert_array_equal([v for _, v in resumed[tag]], [v for _, v in reference[tag]], err_msg=tag)
