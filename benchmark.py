"""Speed and memory figures, printed (not asserted): `python benchmark.py --help`.

teacher-load: time to find, read, verify and check a full-size (7,744x512)
Dopamine teacher from each checkpoint kind, using the committed test fixtures
(same shapes as a DQN_400 teacher), and crc32c throughput on a 16 MB tensor.

dqn / rainbow: runs the training script on Breakout-v5 with the fixture teacher
and short budgets, and prints each phase's throughput (as the script reports
it), replay bytes per transition and the run's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import teacher_utils as tu

FIXTURES = Path(__file__).resolve().parent / "tests" / "fixtures"


@dataclasses.dataclass
class TeacherLoad:
    """Load time of a full-size teacher checkpoint (each kind)."""

    repeats: int = 5
    """Timed loads per kind (the median is printed)."""


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def teacher_load(cfg: TeacherLoad) -> None:
    sys.path.insert(0, str(FIXTURES))
    from materialize import materialize

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'fixture':<24} {'kind':<5} {'file MB':>8} {'load ms':>8}")
        for name in ("teacher_tf", "teacher_tf_keras", "teacher_jax_linen", "teacher_jax_prelinen"):
            run = materialize(name, Path(tmp))
            t = tu.load_teacher(run)
            size = sum(f.stat().st_size for f in (run / "checkpoints").iterdir()) / 2**20
            ms = 1e3 * _median_time(lambda: tu.load_teacher(run), cfg.repeats)
            print(f"{name:<24} {t.kind:<5} {size:8.1f} {ms:8.1f}")
    x = np.random.default_rng(0).standard_normal((7744, 512)).astype(np.float32)
    ms = 1e3 * _median_time(lambda: tu._masked_crc32c(x), cfg.repeats)
    print(f"crc32c of a {x.nbytes / 2**20:.1f} MB tensor: {ms:.2f} ms ({x.nbytes / 2**30 / (ms / 1e3):.1f} GiB/s)")


@dataclasses.dataclass
class Script:
    """Per-phase throughput of a QDagger training script (short budgets)."""

    num_envs: tuple[int, ...] = (1, 8)
    """--num-envs values to measure"""
    network: str = "nature"
    """--network of the student"""
    eval_steps: int = 4000
    """agent steps of the teacher evaluation (8 eval envs)"""
    teacher_steps: int = 4000
    """teacher roll-out steps"""
    offline_steps: int = 200
    """offline gradient updates"""
    total_timesteps: int = 4000
    """online agent steps (updates start after learning_starts)"""
    learning_starts: int = 200
    """online steps before updates start (small, so the online figure is the steady training rate)"""
    extra: tuple[str, ...] = ()
    """more flags for the script, e.g. --extra --dueling"""


def _run_script(script: str, cfg: Script) -> None:
    import re
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(FIXTURES))
        from materialize import materialize

        teacher = materialize("teacher_tf", Path(tmp))
        print(f"{script} --network {cfg.network} {' '.join(cfg.extra)}: agent steps/s per phase (updates/s offline)")
        print(f"{'num_envs':>8} {'teacher eval':>13} {'teacher data':>13} {'offline upd/s':>14} {'online':>8} {'bytes/trans':>12} {'peak RSS GiB':>13}")
        for n in cfg.num_envs:
            flags = ["--env-id", "Breakout-v5", "--teacher-checkpoint", str(teacher), "--num-envs", str(n), "--network", cfg.network,
                     "--teacher-eval-episodes", "1000", "--eval-episodes", "1", "--eval-steps", str(cfg.eval_steps),
                     "--teacher-steps", str(cfg.teacher_steps), "--offline-steps", str(cfg.offline_steps),
                     "--total-timesteps", str(cfg.total_timesteps), "--learning-starts", str(cfg.learning_starts),
                     "--buffer-size", str(max(cfg.total_timesteps, cfg.learning_starts) + 64 * n), "--eval-frequency", str(10**9), *cfg.extra]
            # Each run reports its own peak RSS (children's ru_maxrss would be a max over all runs).
            wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
                       "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
                       "finally: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            path = str(Path(__file__).resolve().parent / script)
            r = subprocess.run([sys.executable, "-c", wrapper, path, *flags], cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-2000:])
                raise SystemExit(1)
            patterns = {
                "eval": r"\(a\).*\[(\d+) agent steps/s",
                "data": r"\(b\).*\[(\d+) agent steps/s",
                "offline": r"\(c\).*\[([\d.]+) updates/s",
                "online": r"\(d\) online.*\[([\d.]+) agent steps/s",
                "bytes": r"(\d+) bytes/transition",
                "rss": r"PEAK_RSS_KB (\d+)",
            }
            got = {k: (m[1] if (m := re.search(p, r.stdout)) else "?") for k, p in patterns.items()}
            rss = f"{int(got['rss']) / 2**20:.2f}" if got["rss"] != "?" else "?"
            print(f"{n:>8} {got['eval']:>13} {got['data']:>13} {got['offline']:>14} {got['online']:>8} {got['bytes']:>12} {rss:>13}")


def main() -> None:
    import tyro

    cmd = tyro.extras.subcommand_cli_from_dict({"teacher-load": TeacherLoad, "dqn": Script, "rainbow": Script})
    if isinstance(cmd, TeacherLoad):
        teacher_load(cmd)
    else:
        _run_script("qdagger_dqn_atari_jax.py" if sys.argv[1] == "dqn" else "qdagger_rainbow_atari_jax.py", cmd)


if __name__ == "__main__":
    main()
