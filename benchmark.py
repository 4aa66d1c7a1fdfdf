"""Speed and memory figures, printed (not asserted): `python benchmark.py --help`.

teacher-load: time to find, read, verify and check a full-size (7,744x512)
Dopamine teacher from each checkpoint kind, using the committed test fixtures
(same shapes as a DQN_400 teacher), and crc32c throughput on a 16 MB tensor.
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


def main() -> None:
    import tyro

    cmd = tyro.extras.subcommand_cli_from_dict({"teacher-load": TeacherLoad})
    {TeacherLoad: teacher_load}[type(cmd)](cmd)


if __name__ == "__main__":
    main()
