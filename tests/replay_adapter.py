"""A numpy-buffer-like face (add / sample / len) of the device replay (reincarnate/replay.py), uniform or
prioritized, so the ground-truth replay tests drive the real JAX functions."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import numpy as np

from reincarnate import replay


class DeviceReplay:
    def __init__(self, capacity: int, num_envs: int, n_step: int, gamma: float, prioritized: bool = False):
        self.num_envs, self.n_step, self.gamma, self.prioritized = num_envs, n_step, gamma, prioritized
        self.rows = -(-capacity // num_envs)
        self.rb = replay.make_replay([self.rows] * num_envs, 0, prioritized=prioritized)
        # n_step decides when a row of a prioritized replay enters the sum tree (the uniform one ignores it)
        self._add = jax.jit(functools.partial(replay.replay_add, n_step=n_step), static_argnums=1)
        if prioritized:
            self._sample = jax.jit(functools.partial(replay.replay_sample_prioritized, n_step=n_step, gamma=gamma, beta=0.5), static_argnums=2)
        else:
            self._sample = jax.jit(functools.partial(replay.replay_sample, n_step=n_step, gamma=gamma), static_argnums=2)

    @property
    def count(self) -> np.ndarray:
        return np.asarray(self.rb.count)

    def __len__(self) -> int:
        return int(np.minimum(self.count, self.rows).sum())

    def add(self, frames, actions, rewards, terminated, truncated, next_frames):
        self.rb = self._add(self.rb, 0, frames, np.asarray(actions, np.int32), np.asarray(rewards, np.float32),
                            np.asarray(terminated), np.asarray(truncated), next_frames)

    def sample(self, batch_size: int, rng: np.random.Generator):
        batch, ok = self._sample(self.rb, jax.random.PRNGKey(int(rng.integers(2**31))), batch_size)
        if not bool(ok):
            raise RuntimeError("too few valid transitions to sample a batch")
        b = jax.device_get(batch)
        return SimpleNamespace(obs=b.obs, next_obs=b.next_obs, actions=b.actions, returns=b.returns, discounts=b.discounts,
                               env_idx=b.index // self.rows, row_idx=b.index % self.rows, index=b.index, weights=b.weights)
