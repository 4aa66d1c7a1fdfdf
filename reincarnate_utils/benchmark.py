"""Speed and memory figures, printed (not asserted): `python reincarnate_utils/benchmark.py --help`.

throughput: in one process, the machine's limits for this configuration, the
scripts' own speed in every phase a default run has (the measured rates), and
what a default run costs end to end, at those rates and at the limits.
`--json` prints every figure at full precision (the derived ones are
derived_figures() of the measured ones and the protocol printed beside them);
the table rounds them.
  limits   env_only_sps, eval_env_only_sps   envpool alone (Dopamine settings, random actions) with N = --num-envs
                                             and E = --eval-num-envs envs
           update_single_per_s  the script's jitted update, one call per update, inputs on the device
           update_fused_per_s   K updates in one lax.scan over device-resident batches (K = the offline phase's)
           teacher_act_per_s, student_act_per_s, eval_teacher_act_per_s, eval_student_act_per_s
                                the scripts' jitted epsilon-greedy act at batch N and E, observation copied up and
                                actions fetched each call
           disk_write_bytes_per_s  one file written and fsynced (--checkpoint-mib)
  phases   teacher_eval_sps, student_eval_sps: the scripts' evaluation (Dopamine's protocol on E envs) of the
           teacher and of the student, after a first, compiling call, in agent steps/s (the steps of episodes that
           count). teacher_eval_live_fraction, student_eval_live_fraction: those agent steps / (vector steps x E):
           an env whose episode ended after the budget was reached waits, still stepped, for the others' to end
           (the protocol finishes every started episode), so an evaluation of episodes of unequal length runs
           below its serial bound by this fraction. teacher_collect_sps,
           offline_updates_per_s, online_sps: the script's main() on Breakout-v5 with the fixture teacher, each
           phase's steady-state rate as the script reports it (after its first, compiling call; evaluations
           excluded; online while learning; a phase too short to time anything after that call has no rate: the
           budget is checked before anything is measured). checkpoint_write_bytes_per_s: the scripts'
           write_checkpoint (every array written, fsynced and its CRC32C read back).
           overlapped_eval_sps, overlapped_updates_per_s: the student's evaluation (as above) played in its own
           thread while this one runs the fused offline calls of update_fused_per_s, as the scripts overlap their
           offline evaluations (--overlap-offline-eval): the evaluation's agent steps/s and the updates/s meanwhile.
  protocol what a default run of the script does (paper_protocol): the budgets, the number of evaluations
           (eval_steps agent steps each), the checkpoints by kind and their bytes.
  derived  (derived_figures; F = the script's train_frequency)
           collect_vs_limit         = teacher_collect_sps / env_only_sps
           offline_vs_limit         = offline_updates_per_s / update_fused_per_s
           online_vs_limit          = online_sps / min(env_only_sps, F * update_fused_per_s)
           eval_vs_env_limit        = student_eval_sps / eval_env_only_sps
           overlapped_updates_vs_limit = overlapped_updates_per_s / update_fused_per_s: the updates' rate kept
                                    while an evaluation plays beside them
           overlapped_eval_vs_in_between = overlapped_eval_sps / student_eval_sps
           collect_serial_bound_sps = N / (N / env_only_sps + 1 / teacher_act_per_s)
           online_serial_bound_sps  = min(N / (N / env_only_sps + 1 / student_act_per_s), F * update_fused_per_s)
           teacher_eval_serial_bound_sps, eval_serial_bound_sps = E / (E / eval_env_only_sps + 1 / eval_*_act_per_s)
           *_vs_serial_bound        = the phase's rate / its serial bound
           teacher_eval_loop_vs_serial_bound, eval_loop_vs_serial_bound
                                    = *_eval_sps / (*_eval_live_fraction x its serial bound): the evaluation
                                      loop's own efficiency, every env's step counted (waiting ones too)
           paper_budget_minutes     = (offline_steps / offline_updates_per_s + online_steps / online_sps) / 60,
                                      the training alone
           run_<part>_minutes       a default run's parts at the measured rates: the teacher's evaluation, the
                                    teacher data, the offline updates, the offline evaluations, the online steps,
                                    the online evaluations (the final one included), the checkpoints (by count,
                                    plus one per --checkpoint-minutes of each phase, at checkpoint_write_bytes_per_s).
                                    An overlapped offline evaluation costs the updates it displaces:
                                    eval_steps / overlapped_eval_sps x (1 - overlapped_updates_vs_limit) (it is
                                    assumed to end before the next one starts); the others eval_steps / student_eval_sps
           bound_<part>_minutes     the same at the limits: env steps at env_only_sps (N or E envs), updates at
                                    update_fused_per_s, online the envs and the updates perfectly overlapped, so
                                    the overlapped offline evaluations too (they cost nothing there), checkpoints at
                                    disk_write_bytes_per_s
           paper_run_minutes, lower_bound_minutes = their sums; paper_run_vs_bound = lower_bound / paper_run
           The serial bounds estimate what a loop that acts once per vector step can reach: the act's round
           trip and the envs' step are serial (the actions of a step need its observations), whatever else
           overlaps them. The round trip is timed alone, so a loop can pass its bound by a little (the
           roll-out did on an H100 VM, 1.14). An evaluation plays at least eval_steps agent steps (its episodes
           in progress then finish): the run's evaluation minutes count eval_steps each, a lower estimate.
  sizes    bytes_per_transition, teacher_bytes_per_transition: the student's and the teacher data's replay
           bytes per row (frame, action, reward, flags, episode step, the teacher's Q; Rainbow's student
           adds its sum tree); peak_rss_gib: the benchmark's peak resident memory.
Each limit is measured alone, with the whole machine, as the best of 3 windows (a
window slowed by something else on a shared machine is not the machine's limit;
the phases are timed as the scripts run). On a CPU the envs and XLA
then share the same cores during training, so the online limit (which assumes
perfect overlap) cannot be reached there.

teacher-load: load time of a full-size (7,744x512) Dopamine teacher from each
checkpoint kind (the committed test fixtures), and crc32c throughput.

replay-load: writes a Dopamine-format replay of --frames frames (numpy + gzip,
as OutOfGraphReplayBuffer.save), then times teacher_utils.load_dopamine_replay
on it in a fresh process and reports its peak memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the training scripts live in the repository root

import teacher_utils as tu  # noqa: E402
from reincarnate.dopamine_checkpoints import _masked_crc32c  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def _fixture(name: str, dest: Path) -> Path:
    sys.path.insert(0, str(FIXTURES))
    from materialize import materialize

    return materialize(name, dest)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------
# throughput
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Throughput:
    """The limits of this machine and the scripts' speed in each phase, with their ratios."""

    algo: Literal["dqn", "rainbow"] = "dqn"
    """which script"""
    network: Literal["nature", "impala"] = "nature"
    """the student network"""
    num_envs: int = 8
    """--num-envs of the script (and of the env-only limit)"""
    updates_per_call: int | None = None
    """K of the fused limit and the script's --updates-per-call (default the script's: 100 on an accelerator, 8 on a
    CPU, where XLA runs convolutions in a loop body ~7x slower and the updates are unrolled instead)"""
    limit_seconds: float = 8.0
    """time spent measuring each limit (after a warm-up call); the limit is the best of 3 windows of a third of it"""
    teacher_steps: int = 8_000
    """agent steps of the teacher roll-out"""
    offline_steps: int = 1_000
    """offline updates"""
    total_timesteps: int = 8_000
    """online agent steps"""
    learning_starts: int = 400
    """online steps before learning (small: the online figure is the learning regime)"""
    eval_num_envs: int | None = None
    """--eval-num-envs of the evaluations (and of their env-only limit); default the script's"""
    eval_steps: int | None = None
    """agent steps of each timed evaluation (teacher and student, after a first, compiling one); episodes capped at
    400 steps. Default 4 capped episodes per env (1,600 x E), so that, as in a paper evaluation (125,000 steps, ~7,800
    per env), the wait for the last episodes to end is a small part of it"""
    checkpoint_mib: int = 256
    """MiB of the timed checkpoint write (the scripts' write_checkpoint) and of the raw disk write it is compared with"""
    json: bool = False
    """print the figures as one JSON object"""


MEASURED = ("env_only_sps", "eval_env_only_sps", "teacher_act_per_s", "student_act_per_s", "eval_teacher_act_per_s", "eval_student_act_per_s",
            "update_single_per_s", "update_fused_per_s", "disk_write_bytes_per_s",  # limits
            "teacher_eval_sps", "student_eval_sps", "teacher_eval_live_fraction", "student_eval_live_fraction", "teacher_collect_sps", "offline_updates_per_s", "online_sps", "checkpoint_write_bytes_per_s",
            "overlapped_eval_sps", "overlapped_updates_per_s")  # phases
"""the measured rates, the inputs of derived_figures"""

PROTOCOL = ("num_envs", "eval_num_envs", "train_frequency", "eval_steps", "teacher_steps", "offline_steps", "offline_evals", "overlapped_offline_evals", "online_steps",
            "online_evals", "checkpoint_minutes", "rollout_checkpoints", "state_checkpoints", "online_checkpoints", "teacher_data_bytes",
            "student_replay_bytes", "state_bytes")
"""a default run of the script (paper_protocol), the other input of derived_figures"""

RUN_PHASES = ("teacher_eval", "teacher_data", "offline", "offline_evals", "online", "online_evals", "checkpoints")
"""the parts of a default run, in its order (evaluations and checkpoints summed over the run)"""


def paper_protocol(args, num_envs: int, eval_num_envs: int, state_bytes: int, prioritized: bool) -> dict:
    """What a default run of the script with `args` does (its defaults but the env counts): the step budgets, the
    evaluations (the teacher's, one student evaluation every --offline-eval-frequency updates, all but one after the
    last update overlapped with the updates by --overlap-offline-eval, one every --eval-frequency agent steps before
    the end and the final one) and the checkpoints by count: every 250,000 agent
    steps of the roll-out, each with the whole teacher buffer as allocated, then the teacher data once; those of the
    train state only (the offline phase's, one per Dopamine iteration before its end, the student not acting, and
    its start and end; the run's last one); one per iteration of the online phase before its end, each with the
    student's whole replay. The checkpoints --checkpoint-minutes adds are derived_figures' business."""
    from reincarnate.replay import replay_bytes

    def rows(n: int) -> int:  # a buffer is allocated in whole vector steps
        return -(-n // num_envs) * num_envs

    T, every, offline_every = args.total_timesteps, args.eval_frequency, args.offline_eval_frequency
    offline_evals = args.offline_steps // offline_every
    overlapped = offline_evals - (args.offline_steps % offline_every == 0) if args.overlap_offline_eval and offline_evals else 0
    return dict(num_envs=num_envs, eval_num_envs=eval_num_envs, train_frequency=args.train_frequency, eval_steps=args.eval_steps,
                teacher_steps=args.teacher_steps, offline_steps=args.offline_steps, offline_evals=offline_evals, overlapped_offline_evals=overlapped,
                online_steps=T, online_evals=-(-T // every), checkpoint_minutes=args.checkpoint_minutes,
                rollout_checkpoints=args.teacher_steps // 250_000, state_checkpoints=-(-args.offline_steps // offline_every) - 1 + 2 + 1,
                online_checkpoints=-(-T // every) - 1, teacher_data_bytes=replay_bytes([rows(args.teacher_steps)], 4),
                student_replay_bytes=replay_bytes([rows(args.buffer_size)], 4, prioritized=prioritized), state_bytes=state_bytes)


def derived_figures(m: dict, p: dict) -> dict:
    """The derived figures of the measured rates `m` (the keys of MEASURED) for the run `p` (the keys of PROTOCOL), by
    the formulas in this module's docstring. Pure and unrounded: the rates must be positive and finite (throughput()
    checks them)."""
    N, E, F = p["num_envs"], p["eval_num_envs"], p["train_frequency"]
    learn_bound = F * m["update_fused_per_s"]  # agent steps/s the fused updates allow

    def serial(n, env_sps, act_per_s):  # one vector step of the envs, then one act, one after the other
        return n / (n / env_sps + 1 / act_per_s)

    d = {
        "collect_vs_limit": m["teacher_collect_sps"] / m["env_only_sps"],
        "offline_vs_limit": m["offline_updates_per_s"] / m["update_fused_per_s"],
        "online_vs_limit": m["online_sps"] / min(m["env_only_sps"], learn_bound),
        "eval_vs_env_limit": m["student_eval_sps"] / m["eval_env_only_sps"],
        "collect_serial_bound_sps": serial(N, m["env_only_sps"], m["teacher_act_per_s"]),
        "online_serial_bound_sps": min(serial(N, m["env_only_sps"], m["student_act_per_s"]), learn_bound),
        "teacher_eval_serial_bound_sps": serial(E, m["eval_env_only_sps"], m["eval_teacher_act_per_s"]),
        "eval_serial_bound_sps": serial(E, m["eval_env_only_sps"], m["eval_student_act_per_s"]),
    }
    d["collect_vs_serial_bound"] = m["teacher_collect_sps"] / d["collect_serial_bound_sps"]
    d["online_vs_serial_bound"] = m["online_sps"] / d["online_serial_bound_sps"]
    d["teacher_eval_vs_serial_bound"] = m["teacher_eval_sps"] / d["teacher_eval_serial_bound_sps"]
    d["eval_vs_serial_bound"] = m["student_eval_sps"] / d["eval_serial_bound_sps"]
    d["teacher_eval_loop_vs_serial_bound"] = d["teacher_eval_vs_serial_bound"] / m["teacher_eval_live_fraction"]
    d["eval_loop_vs_serial_bound"] = d["eval_vs_serial_bound"] / m["student_eval_live_fraction"]
    d["overlapped_updates_vs_limit"] = m["overlapped_updates_per_s"] / m["update_fused_per_s"]
    d["overlapped_eval_vs_in_between"] = m["overlapped_eval_sps"] / m["student_eval_sps"]
    d["paper_budget_minutes"] = (p["offline_steps"] / m["offline_updates_per_s"] + p["online_steps"] / m["online_sps"]) / 60

    def whole_run(rates: dict, write_bytes_per_s: float) -> dict:
        """Seconds of each part of a default run at these rates."""
        in_between = p["offline_evals"] - p["overlapped_offline_evals"]
        t = {"teacher_eval": p["eval_steps"] / rates["teacher_eval"], "teacher_data": p["teacher_steps"] / rates["collect"], "offline": p["offline_steps"] / rates["offline"],
             "offline_evals": in_between * p["eval_steps"] / rates["eval"] + p["overlapped_offline_evals"] * rates["overlapped_eval_seconds"],
             "online": p["online_steps"] / rates["online"], "online_evals": p["online_evals"] * p["eval_steps"] / rates["eval"]}
        # Checkpoints by count, plus one per --checkpoint-minutes of each phase (whole minutes, evaluations included).
        every = 60 * p["checkpoint_minutes"] if p["checkpoint_minutes"] > 0 else math.inf
        rollout, online_one = p["rollout_checkpoints"] + t["teacher_data"] // every, p["student_replay_bytes"] + p["state_bytes"]
        written = (rollout * (p["teacher_data_bytes"] + p["state_bytes"]) + p["teacher_data_bytes"]
                   + (p["state_checkpoints"] + (t["offline"] + t["offline_evals"]) // every) * p["state_bytes"]
                   + (p["online_checkpoints"] + (t["online"] + t["online_evals"]) // every) * online_one)
        t["checkpoints"] = written / write_bytes_per_s
        return t

    displaced = max(1 - d["overlapped_updates_vs_limit"], 0.0)  # the share of the updates an evaluation beside them costs
    measured = whole_run({"teacher_eval": m["teacher_eval_sps"], "collect": m["teacher_collect_sps"], "offline": m["offline_updates_per_s"],
                          "eval": m["student_eval_sps"], "overlapped_eval_seconds": p["eval_steps"] / m["overlapped_eval_sps"] * displaced,
                          "online": m["online_sps"]}, m["checkpoint_write_bytes_per_s"])
    # The bound: every env step at the envs' own rate for that many envs, every update at the fused rate, the envs and
    # the updates of the online phase perfectly overlapped, every checkpoint at the disk's raw write rate.
    bound = whole_run({"teacher_eval": m["eval_env_only_sps"], "collect": m["env_only_sps"], "offline": m["update_fused_per_s"],
                       "eval": m["eval_env_only_sps"], "overlapped_eval_seconds": 0.0, "online": min(m["env_only_sps"], learn_bound)},
                      m["disk_write_bytes_per_s"])
    for k in RUN_PHASES:
        d[f"run_{k}_minutes"] = measured[k] / 60
    for k in RUN_PHASES:
        d[f"bound_{k}_minutes"] = bound[k] / 60
    d["paper_run_minutes"] = sum(measured.values()) / 60
    d["lower_bound_minutes"] = sum(bound.values()) / 60
    d["paper_run_vs_bound"] = d["lower_bound_minutes"] / d["paper_run_minutes"]
    return d


def budget_errors(cfg: "Throughput", updates_per_call: int, train_frequency: int) -> list[str]:
    """Why a phase of this budget would have no steady-state rate (the script reports none, NaN, when nothing was
    timed after a phase's first, compiling call); empty when each phase times at least one call after it."""
    n, errors = cfg.num_envs, []
    if cfg.teacher_steps < 3 * n:  # the roll-out's rate starts after two vector steps (they compile act and add)
        errors.append(f"--teacher-steps {cfg.teacher_steps} < 3 x --num-envs = {3 * n}")
    if cfg.offline_steps <= updates_per_call:  # the offline rate starts after the first call of K updates
        errors.append(f"--offline-steps {cfg.offline_steps} <= the updates per call K = {updates_per_call}")
    # The online rate starts when the first vector step with an update due (one of the first F agent steps after
    # learning starts) has learned: later steps must follow it.
    online_min = cfg.learning_starts + train_frequency + 2 * n
    if cfg.total_timesteps < online_min:
        errors.append(f"--total-timesteps {cfg.total_timesteps} < --learning-starts + train_frequency {train_frequency} + 2 x --num-envs "
                      f"= {online_min}")
    return errors


LIMIT_WINDOWS = 3


def _timed(fn, seconds: float, per_call: int = 1) -> float:
    """Units per second of repeated fn() calls (after one warm-up call; fn returns something to block on): the best of
    LIMIT_WINDOWS windows of seconds / LIMIT_WINDOWS each. A limit is what the machine can do, so a window slowed by
    something else on a shared machine does not lower it (on this CPU one 8 s window of the fused update measured
    anywhere from 9 to 13 updates/s)."""
    import jax

    jax.block_until_ready(fn())
    best = 0.0
    for _ in range(LIMIT_WINDOWS):
        n, t0, out = 0, time.perf_counter(), None
        while time.perf_counter() - t0 < seconds / LIMIT_WINDOWS:
            out = fn()
            n += per_call
        jax.block_until_ready(out)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _env_only_sps(num_envs: int, seconds: float) -> tuple[float, np.ndarray]:
    """envpool alone (Dopamine settings, random actions) with this many envs (agent steps/s, as _timed), and a first
    observation."""
    envs = tu.make_teacher_envs("Breakout-v5", num_envs, seed=0)
    envs.reset()
    rng = np.random.default_rng(0)
    sps = _timed(lambda: envs.step(rng.integers(0, envs.num_actions, num_envs))[0], seconds, per_call=num_envs)
    obs, _ = envs.reset()
    envs.close()
    return sps, obs


def _acts(cfg: Throughput, script, teacher_params) -> dict:
    """The scripts' own acting functions and their params (Rainbow's student acts on its expected Q, noisy nets
    drawing their noise), the student freshly initialised."""
    import jax

    args = script.Args(network=cfg.network, num_envs=cfg.num_envs)
    teacher = tu.DopamineNatureDQN(4)
    if cfg.algo == "rainbow":
        student = script.make_student(args, 4)
        params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
        support = script.make_support(args)
        return {"teacher": (script.make_act(lambda p, o, k: teacher.apply(p, o)), teacher_params),
                "student": (script.make_act(lambda p, o, k: script.expected_q(student.apply(p, o, key=k), support)), params)}
    student = script.make_student(args.network, 4)
    params = student.init(jax.random.PRNGKey(0), np.zeros((1, 4, 84, 84), np.uint8))
    return {"teacher": (script.make_act(teacher.apply), teacher_params), "student": (script.make_act(student.apply), params)}


def _limits(cfg: Throughput, script, teacher_params, K: int, E: int, folder: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from reincarnate import speed
    from reincarnate.replay import Batch
    from reincarnate.training import QState, phase_coefs

    rainbow = cfg.algo == "rainbow"
    args = script.Args(network=cfg.network, num_envs=cfg.num_envs)
    out = {}
    out["env_only_sps"], obs = _env_only_sps(cfg.num_envs, cfg.limit_seconds)
    out["eval_env_only_sps"], eval_obs = (out["env_only_sps"], obs) if E == cfg.num_envs else _env_only_sps(E, cfg.limit_seconds)
    acts = _acts(cfg, script, teacher_params)
    params = acts["student"][1]
    key = jax.random.PRNGKey(0)
    for prefix, o in (("", obs), ("eval_", eval_obs)):
        for who, (act, act_params) in acts.items():

            def act_once():  # as the loops act: the observation copied up, the actions fetched
                nonlocal key
                actions, _, key = act(act_params, jax.device_put(o), key, 0.01)
                return np.asarray(actions)

            out[f"{prefix}{who}_act_per_s"] = _timed(act_once, cfg.limit_seconds)

    teacher = tu.DopamineNatureDQN(4)
    student = script.make_student(args, 4) if rainbow else script.make_student(args.network, 4)
    support = script.make_support(args) if rainbow else None
    rng = np.random.default_rng(0)
    # The update alone: the script's own update function (as its learner builds it) on device-resident batches, with the
    # optimizer, the loss weights and the teacher of the offline phase passed as that phase passes them (traced).
    B = args.batch_size
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(args.learning_rate, np.float32), eps=args.adam_eps)
    state = QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, params), tx=tx)
    batches = Batch(
        obs=jnp.asarray(rng.integers(0, 256, (K, B, 4, 84, 84), np.uint8)), actions=jnp.asarray(rng.integers(0, 4, (K, B)), jnp.int32),
        returns=jnp.asarray(rng.uniform(-1, 1, (K, B)), jnp.float32), discounts=jnp.full((K, B), 0.99**3, jnp.float32),
        next_obs=jnp.asarray(rng.integers(0, 256, (K, B, 4, 84, 84), np.uint8)), teacher_q=jnp.asarray(rng.normal(size=(K, B, 4)), jnp.float32),
        index=jnp.zeros((K, B), jnp.int32), weights=jnp.ones((K, B), jnp.float32))
    c = phase_coefs(args, 1.0, args.learning_rate, offline=True)
    if rainbow:
        upd = script.make_update(student, support, args, teacher.apply)
        one = lambda s, b, tp, c, k: upd(s, b, tp, c, k)[0]  # noqa: E731
    else:
        upd = script.make_update(student, args, teacher.apply)
        one = lambda s, b, tp, c, k: upd(s, b, tp, c)[0]  # noqa: E731
    single = jax.jit(one, donate_argnums=0)
    fused = jax.jit(lambda s, bs, tp, c, k: speed.fused_scan(lambda s, i: (one(s, jax.tree.map(lambda x: x[i], bs), tp, c, k), None), s, K)[0],
                    donate_argnums=0)
    first = jax.tree.map(lambda x: x[0], batches)
    holder = {"s": state}

    def single_once():
        holder["s"] = single(holder["s"], first, teacher_params, c, key)
        return holder["s"].step

    def fused_once():
        holder["s"] = fused(holder["s"], batches, teacher_params, c, key)
        return holder["s"].step

    out["update_single_per_s"] = _timed(single_once, cfg.limit_seconds)
    out["update_fused_per_s"] = _timed(fused_once, cfg.limit_seconds, per_call=K)
    # (a phase, not a limit: measured here, beside the very updates of update_fused_per_s)
    envs = tu.make_teacher_envs("Breakout-v5", E, seed=2, max_episode_steps=EVAL_EPISODE_CAP)
    try:
        out["overlapped_eval_sps"], out["overlapped_updates_per_s"] = overlapped_evaluation(  # a copy, as the scripts: the calls donate the state
            fused_once, K, acts["student"][0], jax.tree.map(jnp.copy, holder["s"].params), envs, cfg.eval_steps or 4 * EVAL_EPISODE_CAP * E, key)
    finally:
        envs.close()
    out["disk_write_bytes_per_s"] = _disk_write(folder, cfg.checkpoint_mib << 20)
    return {k: out[k] for k in MEASURED if k in out}


def _disk_write(folder: Path, size: int) -> float:
    """The disk's raw rate: one file of `size` bytes written and fsynced (the median of 3), bytes/s."""
    data = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
    path = folder / "raw-write"

    def once():
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()

    return size / _median_time(once, 3)


EVAL_EPISODE_CAP = 400
"""agent steps of the benchmark's evaluation episodes at most (a fresh student may never lose a life)"""


class _CountedSteps:
    """The evaluation's envs, counting the vector steps taken (each steps every env, whether its episode counts)."""

    def __init__(self, envs):
        self.envs, self.vector_steps, self.num_envs = envs, 0, envs.num_envs

    def reset(self):
        return self.envs.reset()

    def step(self, actions):
        self.vector_steps += 1
        return self.envs.step(actions)


def timed_evaluation(act, params, envs, eval_steps: int, key) -> tuple[float, float]:
    """One evaluation (evaluation.evaluate, Dopamine's protocol) of at least eval_steps agent steps: its agent steps/s
    and its live fraction, agent steps / (vector steps x envs)."""
    from reincarnate.evaluation import evaluate

    counted = _CountedSteps(envs)
    t0 = time.perf_counter()
    _, _, steps = evaluate(act, params, counted, eval_steps, 0.001, key)
    return steps / (time.perf_counter() - t0), steps / (counted.vector_steps * envs.num_envs)


def overlapped_evaluation(update_once, K: int, act, params, envs, eval_steps: int, key) -> tuple[float, float]:
    """An evaluation (timed_evaluation) in its own thread, as OfflineEvaluations plays an offline one, while this
    thread makes K-update calls (update_once(), warm) until it ends: its agent steps/s and the updates/s meanwhile."""
    import threading

    import jax

    from reincarnate.evaluation import evaluate

    evaluate(act, params, envs, 2 * envs.num_envs, 0.001, key)  # compiles the act at this many envs
    jax.block_until_ready(update_once())
    played = {}
    thread = threading.Thread(target=lambda: played.update(sps=timed_evaluation(act, params, envs, eval_steps, key)[0]))
    n, t0 = 0, time.perf_counter()
    thread.start()
    while thread.is_alive():
        jax.block_until_ready(update_once())  # counted when done, not when queued
        n += K
    thread.join()
    return played["sps"], n / (time.perf_counter() - t0)


def _evaluations_and_checkpoint(cfg: Throughput, script, teacher_params, E: int, folder: Path) -> dict:
    """The scripts' own evaluation (Dopamine's protocol, evaluation.evaluate with the script's act on E envs) of the
    teacher and of the student, each timed after a first, compiling call; and the scripts' checkpoint writer
    (write_checkpoint: every array written, fsynced and its CRC32C read back) on --checkpoint-mib of arrays."""
    import jax

    from reincarnate.checkpoints import write_checkpoint
    from reincarnate.evaluation import evaluate

    out = {}
    key = jax.random.PRNGKey(1)
    for who, (act, params) in _acts(cfg, script, teacher_params).items():
        envs = tu.make_teacher_envs("Breakout-v5", E, seed=1, max_episode_steps=EVAL_EPISODE_CAP)
        try:
            evaluate(act, params, envs, 2 * E, 0.001, key)  # compiles the act at E envs
            out[f"{who}_eval_sps"], out[f"{who}_eval_live_fraction"] = timed_evaluation(
                act, params, envs, cfg.eval_steps or 4 * EVAL_EPISODE_CAP * E, key)
        finally:
            envs.close()
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.integers(0, 256, cfg.checkpoint_mib << 18, np.uint8) for i in range(4)}  # 4 arrays of a quarter each
    write_checkpoint(folder / "ckpt", 0, arrays, {}, 1)
    seq = iter(range(1, 100))
    out["checkpoint_write_bytes_per_s"] = (cfg.checkpoint_mib << 20) / _median_time(lambda: write_checkpoint(folder / "ckpt", next(seq), arrays, {}, 1), 3)
    return out


def _phases(cfg: Throughput, script, teacher: Path, K: int) -> dict:
    flags = ["--env-id", "Breakout-v5", "--teacher-checkpoint", str(teacher), "--num-envs", str(cfg.num_envs), "--network", cfg.network,
             "--teacher-steps", str(cfg.teacher_steps), "--offline-steps", str(cfg.offline_steps),
             "--updates-per-call", str(K),
             "--offline-eval-frequency", "0", "--total-timesteps", str(cfg.total_timesteps), "--learning-starts", str(cfg.learning_starts),
             "--buffer-size", str(max(cfg.total_timesteps, cfg.learning_starts) + 64 * cfg.num_envs), "--eval-frequency", str(10**9),
             "--eval-steps", "400", "--max-episode-steps", "400", "--eval-num-envs", str(cfg.num_envs)]
    args = script.parse_args(flags)
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), contextlib.redirect_stdout(out):
        script.main(args)
    return phase_rates(out.getvalue())


_PHASE_PATTERNS = {  # each phase's summary line in the script's output, and the flag that sets the phase's length
    "teacher_collect_sps": (r"\(b\).*\[(\S+) agent steps/s", "--teacher-steps"),
    "offline_updates_per_s": (r"\(c\) offline:.*\[(\S+) updates/s", "--offline-steps"),
    "online_sps": (r"\(d\) online:.*\[(\S+) agent steps/s", "--total-timesteps"),
}


def phase_rates(text: str) -> dict:
    """The phases' rates in the script's output; an error names the phase whose rate is missing, not a positive
    number (NaN: nothing was timed after its first call) or not finite."""
    got = {}
    for k, (pattern, flag) in _PHASE_PATTERNS.items():
        m = re.search(pattern, text)
        if not m:
            raise SystemExit(f"error: no {k} in the script's output:\n{text[-2000:]}")
        try:
            got[k] = float(m[1])
        except ValueError:
            got[k] = math.nan
        if not (math.isfinite(got[k]) and got[k] > 0):
            raise SystemExit(f"error: the script reports {k} = {m[1]}, not a positive rate (NaN: the phase timed nothing after its "
                             f"first, compiling call); raise {flag}")
    return got


def _display(key: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if "_vs_" in key else f"{value:.2f}" if key == "peak_rss_gib" else f"{value:.1f}"


def throughput(cfg: Throughput) -> None:
    import jax

    import qdagger_dqn_atari_jax as dqn
    import qdagger_rainbow_atari_jax as rainbow
    from reincarnate import speed
    from reincarnate.replay import replay_bytes

    script = rainbow if cfg.algo == "rainbow" else dqn
    args = script.Args(network=cfg.network, num_envs=cfg.num_envs)  # the paper's settings: the budget and train_frequency
    K = cfg.updates_per_call or (8 if speed.on_cpu() else 100)
    E = cfg.eval_num_envs or args.eval_num_envs
    if errors := budget_errors(cfg, K, args.train_frequency):
        raise SystemExit("error: a phase would time nothing after its first, compiling call: " + "; ".join(errors))
    device = jax.devices()[0]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _fixture("teacher_tf", Path(tmp))
        teacher_params = jax.device_put(tu.load_teacher(teacher, num_actions=4).params)
        measured = {**_limits(cfg, script, teacher_params, K, E, Path(tmp)), **_evaluations_and_checkpoint(cfg, script, teacher_params, E, Path(tmp)),
                    **_phases(cfg, script, teacher, K)}
        student_params = _acts(cfg, script, teacher_params)["student"][1]
    measured = {k: measured[k] for k in MEASURED}
    for k, v in measured.items():  # the limits are timed over at least one call, the phases checked by phase_rates
        assert math.isfinite(v) and v > 0, (k, v)
    config = {"algo": cfg.algo, "network": cfg.network, "updates_per_call": K, "device": f"{device.platform}: {device.device_kind}"}
    # The train state a checkpoint holds: the params, the target params and Adam's two moments.
    state_bytes = 4 * sum(x.nbytes for x in jax.tree.leaves(student_params))
    protocol = paper_protocol(args, cfg.num_envs, E, state_bytes, prioritized=cfg.algo == "rainbow")
    derived = derived_figures(measured, protocol)
    rows = -(-args.buffer_size // cfg.num_envs) * cfg.num_envs
    # The student's replay caches the teacher's Q (4 actions in Breakout) while distillation is on.
    online_bytes = replay_bytes([rows], 4, prioritized=cfg.algo == "rainbow")
    sizes = {"bytes_per_transition": online_bytes / rows, "teacher_bytes_per_transition": replay_bytes([rows], 4) / rows,
             "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    result = {**config, **protocol, **measured, **derived, **sizes}
    if cfg.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:<30} {_display(k, v)}")


# ----------------------------------------------------------------------------
# teacher-load
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class TeacherLoad:
    """Load time of a full-size teacher checkpoint (each kind)."""

    repeats: int = 5
    """Timed loads per kind (the median is printed)."""


def teacher_load(cfg: TeacherLoad) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'fixture':<24} {'kind':<5} {'file MB':>8} {'load ms':>8}")
        for name in ("teacher_tf", "teacher_tf_keras", "teacher_jax_linen", "teacher_jax_prelinen"):
            run = _fixture(name, Path(tmp))
            t = tu.load_teacher(run)
            size = sum(f.stat().st_size for f in (run / "checkpoints").iterdir()) / 2**20
            ms = 1e3 * _median_time(lambda: tu.load_teacher(run), cfg.repeats)
            print(f"{name:<24} {t.kind:<5} {size:8.1f} {ms:8.1f}")
    x = np.random.default_rng(0).standard_normal((7744, 512)).astype(np.float32)
    ms = 1e3 * _median_time(lambda: _masked_crc32c(x), cfg.repeats)
    print(f"crc32c of a {x.nbytes / 2**20:.1f} MB tensor: {ms:.2f} ms ({x.nbytes / 2**30 / (ms / 1e3):.1f} GiB/s)")


# ----------------------------------------------------------------------------
# replay-load
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class ReplayLoad:
    """Load time and peak memory of load_dopamine_replay on a large Dopamine-format replay."""

    frames: int = 1_000_000
    """rows of the replay written (Dopamine's replay capacity is 1M)"""
    folder: str | None = None
    """the folder to write it in, in a temporary subfolder removed afterwards (default: the system's temporary folder; needs about 1 GB of disk)"""


def _write_dopamine_replay(folder: Path, capacity: int) -> None:
    """The files OutOfGraphReplayBuffer.save writes (gzip around np.save), with Atari-like compressible frames."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:84, 0:84]
    background = ((yy // 6 + xx // 6) % 4 * 30 + 40).astype(np.uint8)
    with gzip.open(folder / "$store$_observation_ckpt.0.gz", "wb", compresslevel=1) as f:
        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 84, 84), np.uint8))
        header["shape"] = (capacity, 84, 84)
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, capacity, 10_000):
            n = min(10_000, capacity - start)
            frames = np.broadcast_to(background, (n, 84, 84)).copy()
            rows = np.arange(start, start + n)
            frames[np.arange(n), 10 + rows % 60, 5 + (rows * 7) % 70] = 255  # a moving sprite
            frames[:, 76:84, :] = rng.integers(0, 256, (n, 8, 84), dtype=np.uint8)  # a noisy score band
            f.write(frames.tobytes())
    rows = np.arange(capacity)
    add_count = 3 * capacity + 12345
    for name, arr in (("$store$_action", (rows % 4).astype(np.int32)), ("$store$_reward", ((rows % 97) == 0).astype(np.float32)),
                      ("$store$_terminal", ((rows % 2000) == 1999).astype(np.uint8)), ("add_count", np.array(add_count)),
                      ("invalid_range", (add_count % capacity - 1 + np.arange(5)) % capacity)):
        with gzip.open(folder / f"{name}_ckpt.0.gz", "wb", compresslevel=1) as f:
            np.save(f, arr, allow_pickle=False)


_LOAD_CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
import teacher_utils as tu
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = tu.load_dopamine_replay({folder!r}, update_horizon=3, progress=False)
load = time.perf_counter() - t
t = time.perf_counter()
valid = r.valid_indices()
print(load, time.perf_counter() - t, len(valid), r.frames.nbytes, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def replay_load(cfg: ReplayLoad) -> None:
    import shutil

    # A fresh subfolder even inside --folder: files the user keeps there are never touched, and it goes away
    # however the load ends.
    try:
        if cfg.folder:
            Path(cfg.folder).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="replay-load-", dir=cfg.folder))
    except OSError as e:
        raise SystemExit(f"error: cannot create a folder in {cfg.folder or tempfile.gettempdir()} ({e.strerror or e}); pass a writable --folder")
    try:
        t = time.perf_counter()
        _write_dopamine_replay(folder, cfg.frames)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {cfg.frames:,} frames ({size / 1e6:.0f} MB of .gz files) in {time.perf_counter() - t:.0f} s (not timed below)")
        r = subprocess.run([sys.executable, "-c", _LOAD_CHILD.format(root=str(ROOT), folder=str(folder))], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        load, valid_s, valid, frame_bytes, base_kb, peak_kb = r.stdout.split()
        print(f"load_dopamine_replay: {float(load):.1f} s; frames {int(frame_bytes) / 2**30:.2f} GiB; peak RSS {int(peak_kb) / 2**20:.2f} GiB "
              f"({int(base_kb) / 2**20:.2f} GiB after imports); valid_indices {1e3 * float(valid_s):.0f} ms ({int(valid):,} valid for n = 3)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    import tyro

    cmd = tyro.extras.subcommand_cli_from_dict({"throughput": Throughput, "teacher-load": TeacherLoad, "replay-load": ReplayLoad})
    {Throughput: throughput, TeacherLoad: teacher_load, ReplayLoad: replay_load}[type(cmd)](cmd)


if __name__ == "__main__":
    main()
