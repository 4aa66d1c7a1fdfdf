"""What the resume tests of both scripts share: waiting for a checkpoint, killing a run there, reading its end; and
the DQN script's small resumable run (test_resume, test_resume_commands)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import teacher_utils as tu


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def checkpoints(run_dir: Path) -> list[dict]:
    metas = []
    for ck in sorted((run_dir / "checkpoints").glob("ckpt-*")):
        try:
            if (ck / tu.CHECKPOINT_SENTINEL).is_file():
                metas.append(json.loads((ck / "meta.json").read_text()))
        except (OSError, ValueError):
            pass  # deleted or replaced while we looked (--keep-checkpoints)
    return metas


def kill_in(proc, run_dir: Path, phase: str, progress_key: str):
    """SIGKILL the run as soon as it has a complete checkpoint in `phase` with progress under way."""
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(m["phase"] == phase and m["progress"].get(progress_key, 0) > 0 for m in checkpoints(run_dir)):
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                return
        except (OSError, ValueError, KeyError):
            pass  # a checkpoint being renamed
        time.sleep(0.05)
    raise AssertionError(f"the run never checkpointed in phase {phase}: {proc.communicate()[1][-2000:]}")


def final_line(out: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith("final: ")]
    return line


def one_value_per_step(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at some step: {steps}"
        series[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return series


# ----------------------------------------------------------------------------
# The DQN script's resumable run
# ----------------------------------------------------------------------------
SCRIPT = Path(__file__).resolve().parent.parent / "qdagger_dqn_atari_jax.py"
# Small but long enough to be killed in each phase; a checkpoint every 16 agent steps (and 16 offline updates). Lambda
# is 0 for good after the evaluation at 256 (the decay period is over): the second half runs the online step without the teacher.
FLAGS = ["--distill-decay-period", "256", "--num-envs", "2", "--eval-steps", "100", "--max-episode-steps", "100", "--eval-num-envs", "2", "--teacher-steps", "384",
         "--offline-steps", "48", "--updates-per-call", "2", "--offline-eval-frequency", "24", "--total-timesteps", "512",
         "--learning-starts", "128", "--buffer-size", "1024", "--batch-size", "8", "--eval-frequency", "256", "--log-frequency", "8",
         "--checkpoint-frequency", "16", "--keep-checkpoints", "2", "--save-model"]


def start(cwd, name, *extra, teacher, env=None):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--teacher-checkpoint", str(teacher), "--run-name", name, *FLAGS, *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_whole(cwd: Path, teacher: Path) -> tuple[str, Path]:
    """The uninterrupted run that a killed and resumed one must end as: its stdout and its run folder."""
    rc, out, err = finish(start(cwd, "whole", teacher=teacher))
    assert rc == 0, err[-3000:]
    return out, cwd / "runs" / "whole"
