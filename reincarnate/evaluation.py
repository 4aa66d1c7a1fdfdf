"""Evaluation on Dopamine's protocol (run_experiment.Runner._run_one_phase): whole episodes until a step budget.

Every episode started before the budget is played to its end and counted, so several envs in parallel keep the
protocol (only the order of the episodes differs from one env's).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from reincarnate.envs import DopamineAtariEnvs


def evaluate(act, params, envs: DopamineAtariEnvs, max_steps: int, epsilon: float, key, desc: str = "eval",
             frames: list | None = None, max_episodes: int | None = None,
             stop: Callable[[], bool] | None = None) -> tuple[list[float], list[int], int]:
    """Raw-score returns and lengths of whole episodes, and the agent steps they took.

    Dopamine's `_run_one_phase`: episodes are played whole until at least
    `max_steps` agent steps have passed; the episodes in progress then finish
    and every episode counts, however long. With several envs, an env starts a
    new episode only while the budget lasts (and fewer than `max_episodes` have
    started). `frames` (if a list) collects env 0's observations of its first episode; `stop()` true ends it early.
    """
    obs, _ = envs.reset()
    n = envs.num_envs
    returns, lengths = [], []
    ep_ret, ep_len = np.zeros(n), np.zeros(n, np.int64)
    active = np.ones(n, bool)  # the env's current episode counts
    resetting = np.zeros(n, bool)  # this step is envpool's auto-reset after an episode end
    steps, started = 0, n
    recording = frames is not None
    with tqdm(total=max_steps, desc=desc, leave=False, file=sys.stderr, mininterval=2.0) as bar:
        while active.any() and not (stop and stop()):
            actions, _, key = act(params, jax.device_put(obs, jax.devices()[0]), key, epsilon)  # committed, as in the training loops: one compilation
            obs, _, terminated, truncated, info = envs.step(np.asarray(actions))
            if resetting.any():  # an env that just reset starts a new episode only while the budget lasts
                budget_left = steps < max_steps and (max_episodes is None or started < max_episodes)
                active &= ~resetting | budget_left
                started += int((resetting & active).sum())
            live = active & ~resetting
            ep_ret += np.where(live, info["reward"], 0.0)
            ep_len += live
            steps += int(live.sum())
            bar.update(int(live.sum()))
            if recording:
                frames.append(obs[0, -1].copy())
            done = (terminated | truncated) & live
            for i in np.flatnonzero(done):
                returns.append(float(ep_ret[i]))
                lengths.append(int(ep_len[i]))
                recording = recording and i != 0
            ep_ret[done], ep_len[done] = 0.0, 0
            resetting = done
            if steps >= max_steps or (max_episodes is not None and started >= max_episodes):
                active &= ~done  # no new episode after the budget
    return returns, lengths, steps


def summary(name: str, returns: list[float], steps: int) -> str:
    if not returns:
        return f"{name}: no episode finished within {steps} agent steps"
    return f"{name}: mean return {np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes ({steps} agent steps)"


def write_video(frames: list, path: str, fps: int = 15) -> None:
    """The agent's own 84x84 grey frames, upscaled 2x, as an mp4."""
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = [np.repeat(np.repeat(np.repeat(f[..., None], 3, axis=-1), 2, axis=0), 2, axis=1) for f in frames]
    imageio.mimsave(path, rgb, fps=fps, macro_block_size=8)


def evaluate_teacher(run, act, teacher, params, make_envs: Callable, key, random_return: float, on_interrupt: Callable[[], None]) -> None:
    """(a) The teacher's score G_T on Dopamine's protocol, on the envs it was trained on: logged (teacher/...) and
    kept in run.info["teacher_return"] (None if no episode finished). Without a teacher (tabula rasa) it says so."""
    import time

    args = run.args
    if teacher is None:
        print(f"(a) teacher evaluation: skipped (--method {args.method}: no teacher)")
        return
    t0 = time.time()
    envs = make_envs(args.eval_num_envs, seed=args.seed + 10_000, **teacher.env_kwargs)
    try:
        returns, lengths, steps = evaluate(act, params, envs, args.eval_steps, args.eval_epsilon, key, desc="teacher eval",
                                           max_episodes=args.eval_episodes, stop=lambda: run.interrupted)
    finally:
        envs.close()
    if run.interrupted:
        on_interrupt()
    run.info["teacher_return"] = float(np.mean(returns)) if returns else None
    for i, (r, n) in enumerate(zip(returns, lengths)):
        run.log("teacher/episodic_return", r, i)
        run.log("teacher/episodic_length", n, i)
    if returns:
        run.log("teacher/mean_return", run.info["teacher_return"], 0)
    print(f"(a) {summary('teacher', returns, steps)}; random score {random_return:g} [{steps / (time.time() - t0):.0f} agent steps/s]")


def evaluate_student(act, params, make_envs: Callable, args, run, device, desc: str, seed_offset: int, frames: list | None = None,
                     stop: Callable[[], bool] | None = None):
    """The student on Dopamine's protocol on fresh envs, with a key apart from the training keys (so a rerun after a
    resume is the same); an interrupt (run.interrupted) or `stop()` ends it early. Returns (returns, agent steps)."""
    run.check_finite(params, f"before the {desc}")  # nothing is evaluated (or logged) of a diverged student
    key = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(args.seed), seed_offset), device)
    envs = make_envs(args.eval_num_envs, seed=args.seed + seed_offset)
    try:
        returns, _, steps = evaluate(act, params, envs, args.eval_steps, args.eval_epsilon, key, desc=desc, frames=frames,
                                     max_episodes=args.eval_episodes, stop=lambda: run.interrupted or (stop is not None and stop()))
    finally:
        envs.close()
    return returns, steps
