"""What the resume tests of both scripts share: waiting for a checkpoint, killing a run there, reading its end."""

import json
import signal
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
