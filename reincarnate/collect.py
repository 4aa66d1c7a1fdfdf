"""The teacher data: the teacher's own Dopamine replay and/or roll-outs of the teacher on envpool envs, in one device
replay with the teacher's Q-values of every state cached beside it (no update runs the teacher)."""

from __future__ import annotations

import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from reincarnate.episodes import RecordedEnvs
from reincarnate.replay import Replay, make_replay, replay_bytes, replay_fill_from_dopamine, replay_from, replay_step, teacher_q_for_rows
from reincarnate.speed import SteadyRate


def collect_teacher_data(run, lengths: list[int], num_actions: int, dopamine: bool, dopamine_replay, rollout_steps: int, envs, act_teacher,
                         teacher, teacher_params, add, key, compute_device, replay_device, checkpoint: Callable) -> tuple[Replay, jax.Array]:
    """Build the teacher data: stream 0 holds the Dopamine replay (with `dopamine`: `dopamine_replay`, loaded unless
    the buffer is restored) and the next `envs.num_envs` streams the roll-out of `rollout_steps` agent steps of the
    teacher at epsilon --teacher-epsilon; `add` is the jitted replay_add. Resumable mid-roll-out:
    `checkpoint(progress, arrays, key)` saves the buffer and the roll-out's actions, from which a resumed run (`run`
    in phase "collect") restores the envs exactly. Returns (teacher data, key)."""
    epsilon, host_replay, teacher_q_fn = run.args.teacher_epsilon, run.args.replay_on_host, teacher.q_values
    t0 = time.time()
    collected = run.progress.get("collected", 0) if run.phase == "collect" else 0
    if collected:  # resumed mid-way
        rb = replay_from(run.resumed, "teacher_rb", replay_device)
    else:
        rb = make_replay(lengths, num_actions, replay_device)
        if dopamine:
            rb = replay_fill_from_dopamine(rb, dopamine_replay, 0)
            rb = teacher_q_for_rows(teacher_q_fn, teacher_params, rb, 0, compute_device)
    first_stream = int(dopamine)
    rate = SteadyRate()
    if rollout_steps:
        envs = RecordedEnvs(envs, rollout_steps, run.array("action_log") if collected else None)
        n = envs.num_envs
        obs = envs.reset()
        obs_dev = jax.device_put(obs, compute_device)  # each observation crosses to the device once: acted on, then stored
        pending, pending_q = None, None  # the last step, stored while the emulators take the next one
        with tqdm(total=rollout_steps, initial=collected, desc="teacher data", file=sys.stderr, mininterval=2.0) as bar:
            while collected < rollout_steps:
                actions_dev, teacher_q, key = act_teacher(teacher_params, obs_dev, key, epsilon)
                envs.send(np.asarray(actions_dev))
                if pending is not None:
                    rb = add(rb, first_stream, *replay_step((*pending, obs_dev, pending_q), replay_device, host_replay))
                    pending = None
                next_obs, reward, terminated, truncated, _ = envs.recv()
                pending, pending_q = (obs_dev, actions_dev, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated), teacher_q
                obs_dev = jax.device_put(next_obs, compute_device)
                collected += n
                bar.update(n)
                if collected >= 2 * n:
                    rate.start(collected)  # the first two steps compiled act and add
                if run.interrupted or run.due(collected, collected - n, run.args.checkpoint_frequency or 250_000):
                    rb = add(rb, first_stream, *replay_step((*pending, obs_dev, pending_q), replay_device, host_replay))
                    pending = None
                    checkpoint(dict(collected=collected), {**replay_arrays_of(rb), "action_log": envs.actions()}, key)
        if pending is not None:
            rb = add(rb, first_stream, *replay_step((*pending, obs_dev, pending_q), replay_device, host_replay))
        envs.close()
    rows = int(np.minimum(np.asarray(rb.count), np.asarray(rb.length)).sum())
    source = " + ".join((["Dopamine replay"] if dopamine else []) + ([f"{collected} roll-out agent steps"] if rollout_steps else []))
    speed = f"{rate(collected):.0f} agent steps/s" if rollout_steps else f"{rows / (time.time() - t0):.0f} rows/s"
    print(f"(b) teacher data: {rows} rows ({source}), {replay_bytes(lengths, num_actions) / max(sum(lengths), 1):.0f} bytes/transition [{speed}]")
    return rb, key


def replay_arrays_of(rb: Replay) -> dict:
    return {f"teacher_rb.{f}": getattr(rb, f) for f in Replay._fields}

