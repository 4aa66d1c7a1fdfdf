"""`benchmark.py throughput` end to end on a tiny budget: every figure is printed, and each ratio and bound is the
one its formula gives from the figures beside it. The speeds themselves are not asserted: targets live in the
benchmark's output, never in tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qdagger_dqn_atari_jax as dqn  # noqa: E402

RATES = ("env_only_sps", "teacher_act_per_s", "student_act_per_s", "update_single_per_s", "update_fused_per_s",
         "teacher_collect_sps", "offline_updates_per_s", "online_sps")


def close(got: float, want: float, decimals: int) -> bool:
    """`got` is `want` rounded to `decimals`, computed from inputs themselves rounded to 0.1."""
    return got == pytest.approx(want, rel=5e-3, abs=1.5 * 10**-decimals)


def test_throughput_prints_every_figure_with_its_ratios_and_bounds(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "reincarnate_utils" / "benchmark.py"), "throughput", "--json", "--limit-seconds", "0.3",
                        "--teacher-steps", "160", "--offline-steps", "24", "--total-timesteps", "480", "--learning-starts", "160"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])

    assert (f["algo"], f["network"], f["num_envs"], f["updates_per_call"]) == ("dqn", "nature", 8, 8)  # K = 8 on a CPU
    assert f["device"].startswith("cpu")
    assert all(f[k] > 0 for k in RATES), {k: f[k] for k in RATES}
    # One 84x84 frame per transition plus its action, reward, flags, episode step and the teacher's 4 Q-values.
    assert f["bytes_per_transition"] == f["teacher_bytes_per_transition"] == 7079.0
    assert 0 < f["peak_rss_gib"] < 24

    args = dqn.Args()
    assert close(f["collect_vs_limit"], f["teacher_collect_sps"] / f["env_only_sps"], 3)
    assert close(f["offline_vs_limit"], f["offline_updates_per_s"] / f["update_fused_per_s"], 3)
    assert close(f["online_vs_limit"], f["online_sps"] / min(f["env_only_sps"], args.train_frequency * f["update_fused_per_s"]), 3)
    env_step = 8 / f["env_only_sps"]
    collect_bound = 8 / (env_step + 1 / f["teacher_act_per_s"])
    online_bound = min(8 / (env_step + 1 / f["student_act_per_s"]), args.train_frequency * f["update_fused_per_s"])
    assert close(f["collect_serial_bound_sps"], collect_bound, 1) and f["collect_serial_bound_sps"] < f["env_only_sps"]
    assert close(f["online_serial_bound_sps"], online_bound, 1) and f["online_serial_bound_sps"] < f["env_only_sps"]
    assert close(f["collect_vs_serial_bound"], f["teacher_collect_sps"] / collect_bound, 3)
    assert close(f["online_vs_serial_bound"], f["online_sps"] / online_bound, 3)
    budget = (1_000_000 / f["offline_updates_per_s"] + args.total_timesteps / f["online_sps"]) / 60
    assert close(f["paper_budget_minutes"], budget, 1)
