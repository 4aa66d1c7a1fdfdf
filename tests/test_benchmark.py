"""`benchmark.py throughput`: its derived figures checked against hand-worked examples (derived_figures, a pure
function), its budget and output checks, and one end-to-end run on a tiny budget that asserts only what the machine's
speed and load cannot change: every figure present, finite and positive, the byte counts, the configuration, and
that the printed derived figures are derived_figures() of the printed measured ones. No speed is asserted: targets
live in the benchmark's output, never in tests, and no two timed figures are compared."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import reincarnate_utils.benchmark as bm  # noqa: E402

# The paper's budget as both examples pass it: 1M offline updates, 2.5M online agent steps (DQN's defaults).
PAPER = dict(paper_offline_steps=1_000_000, paper_online_steps=2_500_000)


def test_derived_figures_of_a_cpu_like_machine_where_the_updates_bound_online():
    measured = dict(env_only_sps=4000, teacher_act_per_s=1000, student_act_per_s=500, update_single_per_s=25, update_fused_per_s=20,
                    teacher_collect_sps=2000, offline_updates_per_s=25, online_sps=50)
    d = bm.derived_figures(measured, num_envs=8, train_frequency=4, **PAPER)
    # Worked by hand: the envs take 8 / 4000 = 0.002 s per vector step; the updates allow 4 x 20 = 80 agent steps/s.
    want = {
        "collect_vs_limit": 0.5,  # 2000 / 4000
        "offline_vs_limit": 1.25,  # 25 / 20
        "online_vs_limit": 0.625,  # 50 / min(4000, 80) = 50 / 80
        "collect_serial_bound_sps": 2666.6667,  # 8 / (0.002 + 1 / 1000) = 8 / 0.003
        "online_serial_bound_sps": 80.0,  # min(8 / (0.002 + 1 / 500), 80) = min(8 / 0.004 = 2000, 80): the updates' bound
        "collect_vs_serial_bound": 0.75,  # 2000 / (8 / 0.003) = 2000 x 0.003 / 8 = 6 / 8
        "online_vs_serial_bound": 0.625,  # 50 / 80
        "paper_budget_minutes": 1500.0,  # (1,000,000 / 25 + 2,500,000 / 50) / 60 = (40,000 + 50,000) / 60
    }
    assert d == pytest.approx(want, rel=1e-7)
    # Acting once per vector step costs time on top of the envs': each serial bound is below the env-only rate.
    assert d["collect_serial_bound_sps"] < measured["env_only_sps"] and d["online_serial_bound_sps"] < measured["env_only_sps"]


def test_derived_figures_of_a_gpu_like_machine_where_acting_bounds_online():
    measured = dict(env_only_sps=8000, teacher_act_per_s=2000, student_act_per_s=4000, update_single_per_s=1000, update_fused_per_s=2500,
                    teacher_collect_sps=3200, offline_updates_per_s=2000, online_sps=2500)
    d = bm.derived_figures(measured, num_envs=8, train_frequency=4, **PAPER)
    # Worked by hand: the envs take 8 / 8000 = 0.001 s per vector step; the updates allow 4 x 2500 = 10,000 agent steps/s.
    want = {
        "collect_vs_limit": 0.4,  # 3200 / 8000
        "offline_vs_limit": 0.8,  # 2000 / 2500
        "online_vs_limit": 0.3125,  # 2500 / min(8000, 10,000) = 2500 / 8000: the envs' limit
        "collect_serial_bound_sps": 5333.3333,  # 8 / (0.001 + 1 / 2000) = 8 / 0.0015
        "online_serial_bound_sps": 6400.0,  # min(8 / (0.001 + 1 / 4000), 10,000) = min(8 / 0.00125, 10,000): acting's bound
        "collect_vs_serial_bound": 0.6,  # 3200 x 0.0015 / 8 = 4.8 / 8
        "online_vs_serial_bound": 0.390625,  # 2500 / 6400
        "paper_budget_minutes": 25.0,  # (1,000,000 / 2000 + 2,500,000 / 2500) / 60 = (500 + 1000) / 60
    }
    assert d == pytest.approx(want, rel=1e-7)
    assert d["collect_serial_bound_sps"] < measured["env_only_sps"] and d["online_serial_bound_sps"] < measured["env_only_sps"]


def test_budget_errors_name_each_phase_too_short_to_have_a_steady_rate():
    ok = bm.Throughput(num_envs=8, teacher_steps=24, offline_steps=3, total_timesteps=180, learning_starts=160)
    assert bm.budget_errors(ok, 2, 4) == []  # 24 = 3 x 8; 3 > K = 2; 180 = 160 + 4 + 2 x 8
    short = bm.Throughput(num_envs=8, teacher_steps=23, offline_steps=2, total_timesteps=179, learning_starts=160)
    errors = bm.budget_errors(short, 2, 4)
    assert len(errors) == 3 and [e.split()[0] for e in errors] == ["--teacher-steps", "--offline-steps", "--total-timesteps"], errors
    assert bm.budget_errors(bm.Throughput(), 100, 4) == []  # the defaults, with K = 100 (an accelerator)


SCRIPT_OUTPUT = """\
(b) teacher data: 160 rows (160 roll-out agent steps), 7079 bytes/transition [274 agent steps/s]
(c) offline: 6 updates [2.5 updates/s, evaluations excluded]
(d) online: 480 agent steps, 80 updates [24.3 agent steps/s while learning, evaluations excluded]
"""


def test_phase_rates_reads_the_scripts_summary_lines_and_refuses_a_rate_that_timed_nothing():
    assert bm.phase_rates(SCRIPT_OUTPUT) == {"teacher_collect_sps": 274.0, "offline_updates_per_s": 2.5, "online_sps": 24.3}
    # A phase whose steps all ran in its first, compiling call reports nan (SteadyRate): an error naming the flag to raise.
    for line, flag in (("[274 agent", "--teacher-steps"), ("[2.5 updates", "--offline-steps"), ("[24.3 agent", "--total-timesteps")):
        with pytest.raises(SystemExit, match=flag):
            bm.phase_rates(SCRIPT_OUTPUT.replace(line, "[nan " + line.split()[1]))
    with pytest.raises(SystemExit, match="--offline-steps"):
        bm.phase_rates(SCRIPT_OUTPUT.replace("[2.5 updates", "[0.0 updates"))
    with pytest.raises(SystemExit, match="no online_sps"):
        bm.phase_rates(SCRIPT_OUTPUT.splitlines()[0] + "\n" + SCRIPT_OUTPUT.splitlines()[1])


# The end-to-end budget: every phase times calls after its first, compiling one, whatever the machine's speed (the
# rates start and stop at step counts, not times): the roll-out 20 vector steps (its rate starts after 2), the offline
# phase 3 calls of K = 2 updates (after 1), the online phase 10 vector steps of learning (after the first). K = 2 keeps
# the two fused updates (the limit's and the script's), unrolled on a CPU, quick to compile.
E2E_FLAGS = ["--limit-seconds", "0.3", "--updates-per-call", "2", "--teacher-steps", "160", "--offline-steps", "6",
             "--total-timesteps", "240", "--learning-starts", "160"]


def test_throughput_end_to_end_prints_every_figure_and_derives_them_from_the_printed_rates(tmp_path):
    import qdagger_dqn_atari_jax as dqn

    r = subprocess.run([sys.executable, str(ROOT / "reincarnate_utils" / "benchmark.py"), "throughput", "--json", *E2E_FLAGS],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])

    derived = ("collect_vs_limit", "offline_vs_limit", "online_vs_limit", "collect_serial_bound_sps", "online_serial_bound_sps",
               "collect_vs_serial_bound", "online_vs_serial_bound", "paper_budget_minutes")
    sizes = ("bytes_per_transition", "teacher_bytes_per_transition", "peak_rss_gib")
    config = ("algo", "network", "num_envs", "updates_per_call", "device", "train_frequency", "paper_offline_steps", "paper_online_steps")
    assert list(f) == [*config, *bm.MEASURED, *derived, *sizes]
    assert bm.MEASURED == ("env_only_sps", "teacher_act_per_s", "student_act_per_s", "update_single_per_s", "update_fused_per_s",
                           "teacher_collect_sps", "offline_updates_per_s", "online_sps")

    args = dqn.Args()
    assert [f[k] for k in config[:4]] == ["dqn", "nature", 8, 2] and f["device"].startswith("cpu")
    assert (f["train_frequency"], f["paper_offline_steps"], f["paper_online_steps"]) == (args.train_frequency, args.offline_steps,
                                                                                         args.total_timesteps)
    figures = [*bm.MEASURED, *derived, *sizes]
    assert all(isinstance(f[k], float) and math.isfinite(f[k]) and f[k] > 0 for k in figures), {k: f[k] for k in figures}
    # One 84x84 frame per transition plus its action (1), reward (4), flags (1), episode step (1) and the teacher's
    # 4 Q-values (16): 7056 + 23 = 7079 bytes, in the student's replay and in the teacher data's.
    assert f["bytes_per_transition"] == f["teacher_bytes_per_transition"] == 7079.0
    assert f["peak_rss_gib"] < 24  # GiB, not KiB
    # The wiring (the formulas are the hand examples' business): the printed derived figures are derived_figures() of
    # the printed rates and configuration, exactly (--json prints full precision, which JSON's floats keep).
    assert {k: f[k] for k in derived} == bm.derived_figures(
        {k: f[k] for k in bm.MEASURED}, num_envs=f["num_envs"], train_frequency=f["train_frequency"],
        paper_offline_steps=f["paper_offline_steps"], paper_online_steps=f["paper_online_steps"])
