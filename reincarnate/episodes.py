"""Episodes on a vector of envpool envs, and envs a resumed run can restore exactly.

envpool resets an env by itself: the step right after an episode ends is that reset (its action is ignored and its
reward is not the agent's), so every per-env count skips it.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm


class Episodes:
    """Returns and lengths of the episodes in progress, one per env."""

    def __init__(self, num_envs: int, saved: dict | None = None):
        self.ret, self.len = np.zeros(num_envs), np.zeros(num_envs, np.int64)
        self.resetting = np.zeros(num_envs, bool)  # this env's next step is envpool's auto-reset
        if saved:
            self.ret, self.len, self.resetting = saved["ep_ret"], saved["ep_len"], saved["resetting"]

    def step(self, reward, terminated, truncated) -> tuple[np.ndarray, np.ndarray]:
        """Count one vector step; returns (live: the envs whose step was the agent's, done: the envs whose episode
        ended with it). Read `ret` and `len` of the done envs before the next step."""
        live = ~self.resetting
        self.ret = self.ret + np.where(live, reward, 0.0)
        self.len = self.len + live
        done = (terminated | truncated) & live
        self.finished = [(int(i), float(self.ret[i]), int(self.len[i])) for i in np.flatnonzero(done)]
        self.ret[done], self.len[done], self.resetting = 0.0, 0, done
        return live, done

    def arrays(self, prefix: str = "") -> dict:
        return {f"{prefix}ep_ret": self.ret, f"{prefix}ep_len": self.len, f"{prefix}resetting": self.resetting}


class RecordedEnvs:
    """envpool envs that record every vector step's actions. envpool is deterministic given its seed and the actions,
    so replaying them on fresh envs restores a resumed run's envs exactly: emulators, sticky-action RNGs, episodes in
    progress."""

    def __init__(self, envs, max_steps: int, saved_actions: np.ndarray | None = None):
        self.envs, self.num_envs = envs, envs.num_envs
        self.log = np.zeros((-(-max_steps // envs.num_envs), envs.num_envs), np.uint8)
        self.steps = 0 if saved_actions is None else len(saved_actions)
        if saved_actions is not None:
            self.log[: self.steps] = saved_actions

    def reset(self) -> np.ndarray:
        """The first observation, or after a resume the one the recorded actions lead to."""
        obs, _ = self.envs.reset()
        for a in tqdm(self.log[: self.steps], desc="restoring the envs (exact resume)", file=sys.stderr, mininterval=2.0, leave=False):
            obs, *_ = self.envs.step(a)
        return obs

    def send(self, actions: np.ndarray) -> None:
        self.log[self.steps] = actions
        self.steps += 1
        self.envs.send(actions)

    def recv(self):
        return self.envs.recv()

    def actions(self) -> np.ndarray:
        return self.log[: self.steps]

    def close(self) -> None:
        self.envs.close()


class ActingEnvs:
    """The envs an agent acts in while it trains: envpool's send/recv (the envs step while the device learns), every
    vector step's actions recorded and its episodes counted, so that `arrays()` in a checkpoint restores them exactly
    (`saved`: the checkpoint's array reader, names under `prefix`); each observation is placed on the device once: the
    copy acted on is the one stored."""

    def __init__(self, envs, max_steps: int, device, saved: Callable[[str], np.ndarray] | None = None, prefix: str = ""):
        self.recorded = RecordedEnvs(envs, max_steps, saved(f"{prefix}action_log") if saved else None)
        self.episodes = Episodes(envs.num_envs, {n: saved(f"{prefix}{n}") for n in ("ep_ret", "ep_len", "resetting")} if saved else None)
        self.num_envs, self.device, self.prefix = envs.num_envs, device, prefix
        self.obs = self.recorded.reset()
        if saved and not np.array_equal(self.obs, saved(f"{prefix}obs")):
            print("warning: the envs did not reach the checkpoint's observation; the episodes in progress differ from the interrupted run", file=sys.stderr)
        self.obs_dev = jax.device_put(self.obs, device)

    def send(self, actions_dev) -> None:
        """Hand the actions (on the device) to the envs: the step's only device-to-host copy."""
        self.actions_dev = actions_dev
        self.recorded.send(np.asarray(actions_dev))

    def recv(self) -> tuple[tuple, np.ndarray, np.ndarray]:
        """The envs' step as a transition on the device (obs, actions, clipped rewards, terminated, truncated, next
        obs: the step's host arrays cross in one placement), and which envs' steps were the agent's (live) and ended
        an episode (done); `episodes.finished` lists the episodes that ended."""
        next_obs, reward, terminated, truncated, info = self.recorded.recv()
        live, done = self.episodes.step(info["reward"], terminated, truncated)
        next_obs_dev, *step_dev = jax.device_put((next_obs, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated), self.device)
        transition = (self.obs_dev, self.actions_dev, *step_dev, next_obs_dev)
        self.obs, self.obs_dev = next_obs, next_obs_dev
        return transition, live, done

    def arrays(self) -> dict:
        return {f"{self.prefix}action_log": self.recorded.actions(), f"{self.prefix}obs": self.obs, **self.episodes.arrays(self.prefix)}

    def close(self) -> None:
        self.recorded.close()
