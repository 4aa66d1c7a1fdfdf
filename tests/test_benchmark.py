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

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import reincarnate_utils.benchmark as bm  # noqa: E402

# A default QDagger-DQN run as both examples pass it (paper_protocol's counts, round byte sizes): 8 envs for training and
# evaluation, 125,000 agent steps per evaluation, a 1M roll-out, 1M offline updates with 10 evaluations, 2.5M online
# agent steps with 10; the first 9 offline evaluations overlapped with the updates; 4 roll-out checkpoints (each the whole teacher buffer and the state), the teacher data once, 12
# of the state alone, 9 online ones (the student's replay and the state).
PROTOCOL = dict(num_envs=8, eval_num_envs=8, train_frequency=4, eval_steps=125_000, teacher_steps=1_000_000, offline_steps=1_000_000,
                offline_evals=10, overlapped_offline_evals=9, online_steps=2_500_000, online_evals=10, checkpoint_minutes=30.0, rollout_checkpoints=4, state_checkpoints=12,
                online_checkpoints=9, teacher_data_bytes=7e9, student_replay_bytes=7e9, state_bytes=5e7)


def test_derived_figures_of_a_cpu_like_machine_where_the_updates_bound_online():
    measured = dict(env_only_sps=4000, eval_env_only_sps=5000, teacher_act_per_s=1000, student_act_per_s=500, eval_teacher_act_per_s=800,
                    eval_student_act_per_s=400, update_single_per_s=25, update_fused_per_s=20, disk_write_bytes_per_s=1e9, teacher_eval_sps=2000,
                    student_eval_sps=1500, teacher_eval_live_fraction=0.95, student_eval_live_fraction=0.82, teacher_collect_sps=2000,
                    offline_updates_per_s=25, online_sps=50, checkpoint_write_bytes_per_s=5e8, overlapped_eval_sps=1000, overlapped_updates_per_s=15)
    assert set(measured) == set(bm.MEASURED) and set(PROTOCOL) == set(bm.PROTOCOL)
    d = bm.derived_figures(measured, PROTOCOL)
    # Worked by hand: the envs take 8 / 4000 = 0.002 s per vector step (8 / 5000 = 0.0016 s for the evaluations'); the
    # updates allow 4 x 20 = 80 agent steps/s.
    want = {
        "collect_vs_limit": 0.5,  # 2000 / 4000
        "offline_vs_limit": 1.25,  # 25 / 20
        "online_vs_limit": 0.625,  # 50 / min(4000, 80) = 50 / 80
        "eval_vs_env_limit": 0.3,  # 1500 / 5000
        "collect_serial_bound_sps": 8 / 0.003,  # 8 / (0.002 + 1 / 1000)
        "online_serial_bound_sps": 80.0,  # min(8 / (0.002 + 1 / 500), 80) = min(8 / 0.004 = 2000, 80): the updates' bound
        "teacher_eval_serial_bound_sps": 8 / 0.00285,  # 8 / (0.0016 + 1 / 800)
        "eval_serial_bound_sps": 8 / 0.0041,  # 8 / (0.0016 + 1 / 400)
        "collect_vs_serial_bound": 0.75,  # 2000 x 0.003 / 8 = 6 / 8
        "online_vs_serial_bound": 0.625,  # 50 / 80
        "teacher_eval_vs_serial_bound": 0.7125,  # 2000 x 0.00285 / 8 = 5.7 / 8
        "eval_vs_serial_bound": 0.76875,  # 1500 x 0.0041 / 8 = 6.15 / 8
        "teacher_eval_loop_vs_serial_bound": 0.75,  # 0.7125 / 0.95: the loop, its waiting envs' steps counted
        "eval_loop_vs_serial_bound": 0.9375,  # 0.76875 / 0.82
        "overlapped_updates_vs_limit": 0.75,  # 15 / 20
        "overlapped_eval_vs_in_between": 2 / 3,  # 1000 / 1500
        "paper_budget_minutes": 1500.0,  # (1,000,000 / 25 + 2,500,000 / 50) / 60 = (40,000 + 50,000) / 60
        # The run at the measured rates, in seconds: the teacher's evaluation 125,000 / 2000 = 62.5; the roll-out
        # 1,000,000 / 2000 = 500; offline 1,000,000 / 25 = 40,000 and its 10 evaluations: the last 125,000 / 1500 = 83.33,
        # 9 overlapped ones 125,000 / 1000 x (1 - 0.75) = 31.25 each, 364.58 in all; online 2,500,000 / 50 = 50,000 and its
        # 10 evaluations 1,250,000 / 1500 = 833.3. Checkpoints, one more per 1800 s of a phase: the roll-out 4 + 0 (500 s) of
        # 7.05e9 bytes and the teacher data 7e9; the state 12 + 22 (40,364.6 s) of 5e7; online 9 + 28 (50,833 s) of 7.05e9:
        # 28.2e9 + 7e9 + 1.7e9 + 260.85e9 = 297.75e9 bytes at 5e8 bytes/s = 595.5 s.
        "run_teacher_eval_minutes": 62.5 / 60, "run_teacher_data_minutes": 500 / 60, "run_offline_minutes": 40_000 / 60,
        "run_offline_evals_minutes": (250 / 3 + 281.25) / 60, "run_online_minutes": 50_000 / 60, "run_online_evals_minutes": 2500 / 3 / 60,
        "run_checkpoints_minutes": 595.5 / 60,
        # At the limits: 125,000 / 5000 = 25; 1,000,000 / 4000 = 250; 1,000,000 / 20 = 50,000; the last offline evaluation
        # 125,000 / 5000 = 25 (the overlapped ones cost nothing there); online 2,500,000 / min(4000, 80) = 31,250; 1,250,000 /
        # 5000 = 250. Checkpoints: 4 + 0 roll-out, 12 + 27 (50,025 s) of the state,
        # 9 + 17 (31,500 s) online: 28.2e9 + 7e9 + 1.95e9 + 183.3e9 = 220.45e9 bytes at 1e9 bytes/s = 220.45 s.
        "bound_teacher_eval_minutes": 25 / 60, "bound_teacher_data_minutes": 250 / 60, "bound_offline_minutes": 50_000 / 60,
        "bound_offline_evals_minutes": 25 / 60, "bound_online_minutes": 31_250 / 60, "bound_online_evals_minutes": 250 / 60,
        "bound_checkpoints_minutes": 220.45 / 60,
        "paper_run_minutes": (62.5 + 500 + 40_000 + 250 / 3 + 281.25 + 50_000 + 2500 / 3 + 595.5) / 60,  # 92,355.92 s = 1539.3 min
        "lower_bound_minutes": 82_020.45 / 60,  # 25 + 250 + 50,000 + 25 + 31,250 + 250 + 220.45
        "paper_run_vs_bound": 82_020.45 / (92_355 + 11 / 12),
    }
    assert list(d) == list(want) and d == pytest.approx(want, rel=1e-9)
    # Acting once per vector step costs time on top of the envs': each serial bound is below the env-only rate.
    assert d["collect_serial_bound_sps"] < measured["env_only_sps"] and d["online_serial_bound_sps"] < measured["env_only_sps"]


def test_derived_figures_of_a_gpu_like_machine_where_acting_bounds_online():
    measured = dict(env_only_sps=8000, eval_env_only_sps=8000, teacher_act_per_s=2000, student_act_per_s=4000, eval_teacher_act_per_s=2000,
                    eval_student_act_per_s=4000, update_single_per_s=1000, update_fused_per_s=2500, disk_write_bytes_per_s=2e9,
                    teacher_eval_sps=4000, student_eval_sps=6000, teacher_eval_live_fraction=1.0, student_eval_live_fraction=0.9375, teacher_collect_sps=3200, offline_updates_per_s=2000, online_sps=2500,
                    checkpoint_write_bytes_per_s=1e9, overlapped_eval_sps=5000, overlapped_updates_per_s=2000)
    d = bm.derived_figures(measured, {**PROTOCOL, "checkpoint_minutes": 0.0})  # 0: checkpoints by count only
    # Worked by hand: the envs take 8 / 8000 = 0.001 s per vector step; the updates allow 4 x 2500 = 10,000 agent steps/s.
    want = {
        "collect_vs_limit": 0.4,  # 3200 / 8000
        "offline_vs_limit": 0.8,  # 2000 / 2500
        "online_vs_limit": 0.3125,  # 2500 / min(8000, 10,000) = 2500 / 8000: the envs' limit
        "eval_vs_env_limit": 0.75,  # 6000 / 8000
        "collect_serial_bound_sps": 8 / 0.0015,  # 8 / (0.001 + 1 / 2000)
        "online_serial_bound_sps": 6400.0,  # min(8 / (0.001 + 1 / 4000), 10,000) = min(8 / 0.00125, 10,000): acting's bound
        "teacher_eval_serial_bound_sps": 8 / 0.0015,
        "eval_serial_bound_sps": 6400.0,
        "collect_vs_serial_bound": 0.6,  # 3200 x 0.0015 / 8 = 4.8 / 8
        "online_vs_serial_bound": 0.390625,  # 2500 / 6400
        "teacher_eval_vs_serial_bound": 0.75,  # 4000 x 0.0015 / 8
        "eval_vs_serial_bound": 0.9375,  # 6000 / 6400
        "teacher_eval_loop_vs_serial_bound": 0.75,  # 0.75 / 1.0: no env waited
        "eval_loop_vs_serial_bound": 1.0,  # 0.9375 / 0.9375: the loop at its bound, the waiting envs cost the rest
        "overlapped_updates_vs_limit": 0.8,  # 2000 / 2500
        "overlapped_eval_vs_in_between": 5 / 6,  # 5000 / 6000
        "paper_budget_minutes": 25.0,  # (1,000,000 / 2000 + 2,500,000 / 2500) / 60 = (500 + 1000) / 60
        # Seconds: 125,000 / 4000 = 31.25; 1,000,000 / 3200 = 312.5; 500; the offline evaluations 125,000 / 6000 = 20.83 and
        # 9 x 125,000 / 5000 x (1 - 0.8) = 9 x 5 = 45; 1000; 1,250,000 / 6000 = 208.3; the checkpoints by count only:
        # 4 x 7.05e9 + 7e9 + 12 x 5e7 + 9 x 7.05e9 = 99.25e9 bytes at 1e9 bytes/s = 99.25 s.
        "run_teacher_eval_minutes": 31.25 / 60, "run_teacher_data_minutes": 312.5 / 60, "run_offline_minutes": 500 / 60,
        "run_offline_evals_minutes": (62.5 / 3 + 45) / 60, "run_online_minutes": 1000 / 60, "run_online_evals_minutes": 625 / 3 / 60,
        "run_checkpoints_minutes": 99.25 / 60,
        # At the limits: 15.625; 125; 400; 15.625 (the last offline evaluation); 2,500,000 / min(8000, 10,000) = 312.5; 156.25;
        # 99.25e9 / 2e9 = 49.625.
        "bound_teacher_eval_minutes": 15.625 / 60, "bound_teacher_data_minutes": 125 / 60, "bound_offline_minutes": 400 / 60,
        "bound_offline_evals_minutes": 15.625 / 60, "bound_online_minutes": 312.5 / 60, "bound_online_evals_minutes": 156.25 / 60,
        "bound_checkpoints_minutes": 49.625 / 60,
        "paper_run_minutes": (31.25 + 312.5 + 500 + 62.5 / 3 + 45 + 1000 + 625 / 3 + 99.25) / 60,  # 2217.17 s
        "lower_bound_minutes": 1074.625 / 60,
        "paper_run_vs_bound": 1074.625 / (2217 + 1 / 6),
    }
    assert list(d) == list(want) and d == pytest.approx(want, rel=1e-9)
    assert d["collect_serial_bound_sps"] < measured["env_only_sps"] and d["online_serial_bound_sps"] < measured["env_only_sps"]


def test_paper_protocol_counts_a_default_runs_evaluations_checkpoints_and_bytes():
    import qdagger_dqn_atari_jax as dqn
    import qdagger_rainbow_atari_jax as rainbow

    p = bm.paper_protocol(dqn.Args(), 8, 4, state_bytes=123, prioritized=False)
    # 1M offline updates, one evaluation per 100,000 (the last at 1M); online 2.5M agent steps, one per 250,000 before
    # the end (9) and the final one; checkpoints at 250k, 500k, 750k and 1M of the roll-out, the offline phase's start,
    # its 9 before its end and its end, and the run's last (12); online 9 before the end. 7079 bytes per transition. The
    # offline evaluations at 100k ... 900k overlap the updates; the one at 1M, after the last update, is played in between.
    assert p == dict(num_envs=8, eval_num_envs=4, train_frequency=4, eval_steps=125_000, teacher_steps=1_000_000, offline_steps=1_000_000,
                     offline_evals=10, overlapped_offline_evals=9, online_steps=2_500_000, online_evals=10, checkpoint_minutes=30.0, rollout_checkpoints=4,
                     state_checkpoints=12, online_checkpoints=9, teacher_data_bytes=7079 * 1_000_000, student_replay_bytes=7079 * 1_000_000,
                     state_bytes=123)
    assert list(p) == list(bm.PROTOCOL)
    r = bm.paper_protocol(rainbow.Args(), 3, 8, state_bytes=1, prioritized=True)
    # Rainbow: 3.75M online agent steps (14 evaluations before the end and the final one); buffers in whole vector steps
    # of 3 envs (1,000,002 rows); the student's prioritized replay adds its sum tree.
    from reincarnate.replay import replay_bytes

    assert (r["online_evals"], r["online_checkpoints"], r["online_steps"]) == (15, 14, 3_750_000)
    assert r["teacher_data_bytes"] == 7079 * 1_000_002 and r["student_replay_bytes"] == replay_bytes([1_000_002], 4, prioritized=True)
    assert r["student_replay_bytes"] > r["teacher_data_bytes"]


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
             "--total-timesteps", "240", "--learning-starts", "160", "--eval-steps", "64", "--checkpoint-mib", "4",
             "--num-envs", "2", "--eval-num-envs", "4"]  # fewer envs than the defaults (8, 16): the wiring, not the speed


def test_throughput_end_to_end_prints_every_figure_and_derives_them_from_the_printed_rates(tmp_path):
    import qdagger_dqn_atari_jax as dqn

    r = subprocess.run([sys.executable, str(ROOT / "reincarnate_utils" / "benchmark.py"), "throughput", "--json", *E2E_FLAGS],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])

    derived = tuple(bm.derived_figures(ONES, PROTOCOL_ONES))
    sizes = ("bytes_per_transition", "teacher_bytes_per_transition", "peak_rss_gib")
    config = ("algo", "network", "updates_per_call", "device")
    assert list(f) == [*config, *bm.PROTOCOL, *bm.MEASURED, *derived, *sizes]

    args = dqn.Args()
    assert [f[k] for k in config[:3]] == ["dqn", "nature", 2] and f["device"].startswith("cpu")
    assert {k: f[k] for k in bm.PROTOCOL} == bm.paper_protocol(args, 2, 4, f["state_bytes"], prioritized=False)
    # the train state: the Nature student's float32 params, its target and Adam's two moments
    import jax

    student = dqn.make_student("nature", 4).init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    assert f["state_bytes"] == 4 * sum(x.size * 4 for x in jax.tree.leaves(student))
    figures = [*bm.MEASURED, *derived, *sizes]
    assert all(isinstance(f[k], float) and math.isfinite(f[k]) and f[k] > 0 for k in figures), {k: f[k] for k in figures}
    # One 84x84 frame per transition plus its action (1), reward (4), flags (1), episode step (1) and the teacher's
    # 4 Q-values (16): 7056 + 23 = 7079 bytes, in the student's replay and in the teacher data's.
    assert f["bytes_per_transition"] == f["teacher_bytes_per_transition"] == 7079.0
    assert f["peak_rss_gib"] < 24  # GiB, not KiB
    # The wiring (the formulas are the hand examples' business): the printed derived figures are derived_figures() of
    # the printed rates and protocol, exactly (--json prints full precision, which JSON's floats keep).
    assert {k: f[k] for k in derived} == bm.derived_figures({k: f[k] for k in bm.MEASURED}, {k: f[k] for k in bm.PROTOCOL})


ONES = dict.fromkeys(bm.MEASURED, 1.0)
PROTOCOL_ONES = {**dict.fromkeys(bm.PROTOCOL, 1), "checkpoint_minutes": 0.0}


class ScriptedEpisodes:
    """Two envs whose episodes always last 2 and 5 agent steps, with envpool's auto-reset step after each end."""

    num_envs = 2
    lengths = np.array([2, 5])

    def reset(self):
        self.t, self.ended = np.zeros(2, np.int64), np.zeros(2, bool)
        return np.zeros((2, 4, 84, 84), np.uint8), {}

    def step(self, actions):
        self.t = np.where(self.ended, 0, self.t + 1)  # the step after an end is the reset
        terminated = self.t == self.lengths
        self.ended = terminated
        return np.zeros((2, 4, 84, 84), np.uint8), np.zeros(2), terminated, np.zeros(2, bool), {"reward": np.ones(2)}


def test_an_evaluation_counts_its_live_fraction_the_waiting_envs_steps_excluded():
    import jax
    import jax.numpy as jnp

    act = lambda params, obs, key, eps: (jnp.zeros(obs.shape[0], jnp.int32), None, key)  # noqa: E731
    sps, live = bm.timed_evaluation(act, None, ScriptedEpisodes(), 1, jax.random.PRNGKey(0))
    # The budget (1 step) is reached at the first step; env 0's episode ends at step 2 and it waits (stepped) until env
    # 1's ends at step 5: 2 + 5 live agent steps in 5 vector steps of 2 envs.
    assert live == 0.7 and sps > 0
