"""The numpy frame-store replay the scripts used before the replay moved onto the device.

Kept as an independent oracle: the JAX buffer both scripts use (reincarnate/replay.py),
uniform and prioritized, must give the same valid set, n-step returns, discounts and
stacks on the same streams, and the same priorities when prioritized. (Moved here
unchanged from the scripts.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SumTree:
    """Array-backed binary sum tree over `capacity` leaves, numpy-vectorised.

    nodes[1] is the root, node i has children 2i and 2i+1, leaf k sits at
    nodes[leaf0 + k]. `set` writes a batch of leaves then recomputes their
    parents level by level; `find` descends a batch of queries level by level.
    `max_priority` is the largest priority ever set (starts at 1.0, as Dopamine).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a sum tree needs capacity >= 1 (got {capacity})")
        self.capacity = int(capacity)
        self.depth = int(np.ceil(np.log2(self.capacity))) if self.capacity > 1 else 0
        self.leaf0 = 1 << self.depth
        self.nodes = np.zeros(2 * self.leaf0, np.float64)
        self.max_priority = 1.0

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def get(self, idx) -> np.ndarray:
        return self.nodes[self.leaf0 + np.asarray(idx, np.int64)]

    def set(self, idx, priorities) -> None:
        idx = np.asarray(idx, np.int64).ravel()
        if idx.size == 0:
            return
        p = np.broadcast_to(np.asarray(priorities, np.float64), idx.shape)
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError("priorities must be finite and >= 0")
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise IndexError(f"sum tree index out of range [0, {self.capacity})")
        node = idx + self.leaf0
        self.nodes[node] = p  # duplicates: the last one wins; parents are recomputed from the children
        self.max_priority = max(self.max_priority, float(p.max()))
        for _ in range(self.depth):
            node = node >> 1
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]

    def find(self, queries) -> np.ndarray:
        """Leaf k with cumsum[k-1] <= q < cumsum[k]; never a zero-priority leaf (if the total is > 0)."""
        q = np.array(queries, np.float64)
        node = np.ones(q.shape, np.int64)
        for _ in range(self.depth):
            left, right = self.nodes[2 * node], self.nodes[2 * node + 1]
            go_right = ((q >= left) | (left <= 0.0)) & (right > 0.0)
            q = np.where(go_right, q - left, q)
            node = 2 * node + go_right
        return node - self.leaf0

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Stratified as Dopamine: one query per equal slice of [0, total). Returns (leaves, P)."""
        total = self.total
        if not total > 0.0:
            raise RuntimeError("cannot sample from a sum tree whose priorities are all zero")
        bounds = np.linspace(0.0, total, batch_size + 1)
        idx = self.find(rng.uniform(bounds[:-1], bounds[1:]))
        return idx, self.get(idx) / total


def importance_weights(probs: np.ndarray, beta: float) -> np.ndarray:
    """(1/P)^beta normalised by the batch max, i.e. (N P)^-beta / max: = (min P / P)^beta."""
    probs = np.asarray(probs, np.float64)
    return ((probs.min() / probs) ** beta).astype(np.float32)


# ----------------------------------------------------------------------------
# Replay: every 84x84 frame stored once, stacks rebuilt at sampling
# ----------------------------------------------------------------------------
class Batch(NamedTuple):
    obs: np.ndarray  # (B, 4, 84, 84) uint8
    actions: np.ndarray  # (B,) int32
    returns: np.ndarray  # (B,) float32: sum_{k<L} gamma^k r_{t+k}
    discounts: np.ndarray  # (B,) float32: gamma^L, 0 if the episode terminated within the L steps
    next_obs: np.ndarray  # (B, 4, 84, 84) uint8: the state L steps later
    env_idx: np.ndarray  # (B,) where the samples live (for priorities)
    row_idx: np.ndarray  # (B,)
    teacher_q: np.ndarray | None  # (B, A) teacher Q-values of obs, when the buffer caches them
    weights: np.ndarray  # (B,) float32 importance weights (ones when sampled uniformly)


TERMINATED, TRUNCATED, FINAL = 1, 2, 4


class FrameReplayBuffer:
    """Replay memory that stores each frame once, one circular stream per env.

    A row is (newest frame of s_t, a_t, clipped r_t, flags, step-in-episode).
    When an episode ends, one extra FINAL row keeps its last frame, so n-step
    targets can bootstrap through a truncation (27,000-step cap) but stop at a
    termination. Stacks are rebuilt from the 4 latest rows of the same
    episode; slots before the episode's start are zeros, as in Dopamine.
    Call ``add`` once per vector env step, with envpool's auto-reset semantics:
    the step after an episode end (a reset, action ignored) is skipped.
    With ``teacher_q_dim`` > 0 it also keeps the teacher's Q-values of each
    state (computed while the teacher acted), so the offline phase never runs
    the teacher network again.

    ``prioritized=True`` adds a sum tree with one leaf per row (leaf = env * rows
    + row): a row gets the max priority seen so far when it becomes a valid
    transition (its n-step bootstrap row is written), its priority is zeroed
    when it is overwritten or its stack loses a frame to the write cursor, and
    FINAL rows never get one. So leaf > 0 exactly for the valid rows, and
    ``sample`` draws rows with P proportional to priority.
    """

    def __init__(self, capacity: int, num_envs: int, n_step: int, gamma: float, stack: int = 4, frame_shape=(84, 84),
                 teacher_q_dim: int = 0, prioritized: bool = False, alpha: float = 0.5, beta: float = 0.5):
        self.num_envs, self.n_step, self.gamma, self.stack = num_envs, n_step, gamma, stack
        self.rows = -(-capacity // num_envs)  # per env stream
        shape = (num_envs, self.rows)
        self.frames = np.zeros(shape + tuple(frame_shape), np.uint8)
        self.actions = np.zeros(shape, np.uint8)
        self.rewards = np.zeros(shape, np.float32)
        self.flags = np.zeros(shape, np.uint8)
        # Step of a row inside its episode, saturating: stacking only asks "< 3?".
        self.ep_step = np.zeros(shape, np.uint8)
        self.teacher_q = np.zeros(shape + (teacher_q_dim,), np.float32) if teacher_q_dim else None
        self.count = np.zeros(num_envs, np.int64)  # rows ever written per stream
        self._t = np.zeros(num_envs, np.int64)  # episode step of the pending observation
        self._ended = np.zeros(num_envs, bool)
        self.alpha, self.beta = alpha, beta
        self.tree = SumTree(num_envs * self.rows) if prioritized else None
        self._pending = np.zeros(shape, bool) if prioritized else None  # written, not yet given a priority

    @property
    def bytes_per_transition(self) -> float:
        arrays = (self.frames, self.actions, self.rewards, self.flags, self.ep_step, self.teacher_q,
                  self._pending if self.tree is not None else None, self.tree.nodes if self.tree is not None else None)
        return sum(a.nbytes for a in arrays if a is not None) / (self.num_envs * self.rows)

    def __len__(self) -> int:
        return int(np.minimum(self.count, self.rows).sum())

    def _write(self, envs: np.ndarray, frames, actions, rewards, flags, ep_step, teacher_q=None) -> None:
        r = self.count[envs] % self.rows
        if teacher_q is not None:
            self.teacher_q[envs, r] = teacher_q
        if self.tree is not None:
            # Zero the overwritten row and the (up to 3) next-oldest rows whose stack reached back to it.
            over = envs[self.count[envs] >= self.rows]
            if over.size:
                ro = self.count[over] % self.rows
                leaves = [over * self.rows + ro]
                for k in range(1, self.stack):
                    rk = (ro + k) % self.rows
                    hit = np.minimum(self.ep_step[over, rk], self.stack - 1) >= k
                    leaves.append(over[hit] * self.rows + rk[hit])
                self.tree.set(np.concatenate(leaves), 0.0)
            self._pending[envs, r] = True
        self.frames[envs, r] = frames
        self.actions[envs, r] = actions
        self.rewards[envs, r] = rewards
        self.flags[envs, r] = flags
        self.ep_step[envs, r] = np.minimum(ep_step, 255)
        self.count[envs] += 1

    def _activate(self, envs: np.ndarray) -> None:
        """Give the max priority to the pending rows of `envs` that became valid transitions."""
        k = np.arange(self.n_step + 2)  # a row is valid once its bootstrap row (<= n_step later) is written
        env = np.repeat(envs, k.size)
        j = (self.count[envs][:, None] - 1 - k[None, :]).ravel()
        keep = j >= np.maximum(self.count[env] - self.rows, 0)
        env, j = env[keep], j[keep]
        pend = self._pending[env, j % self.rows]
        env, j = env[pend], j[pend]
        if j.size == 0:
            return
        ok = self.valid(env, j)[0]
        env, r = env[ok], j[ok] % self.rows
        self.tree.set(env * self.rows + r, self.tree.max_priority)
        self._pending[env, r] = False

    def add(self, frames, actions, rewards, terminated, truncated, next_frames, teacher_q=None) -> None:
        """One vector step: newest frames of s_t, a_t, r_t (clipped), flags, newest frames of s_{t+1}
        (and the teacher's Q-values of s_t if the buffer caches them)."""
        live = ~self._ended
        e = np.flatnonzero(live)
        ended = (np.asarray(terminated) | np.asarray(truncated)) & live
        flags = np.where(terminated, TERMINATED, 0) | np.where(truncated, TRUNCATED, 0)
        self._write(e, frames[e], actions[e], rewards[e], flags[e], self._t[e], None if teacher_q is None else teacher_q[e])
        self._t[e] += 1
        d = np.flatnonzero(ended)
        if d.size:  # keep the episode's last frame for bootstrapping
            self._write(d, next_frames[d], 0, 0.0, FINAL, self._t[d])
        if self.tree is not None and e.size:
            self._activate(e)
        resets = ~live  # this step was envpool's auto-reset: a new episode starts
        self._t[resets] = 0
        self._ended = ended

    def _stacks(self, env: np.ndarray, row: np.ndarray) -> np.ndarray:
        k = np.arange(self.stack - 1, -1, -1)  # slot 3 is the newest frame
        rows = (row[:, None] - k[None, :]) % self.rows
        out = self.frames[env[:, None], rows]
        out[k[None, :] > self.ep_step[env, row][:, None].astype(np.int64)] = 0
        return out

    def valid(self, env: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For absolute row numbers j of streams env: (valid, returns, discounts, L)."""
        n, cnt = self.n_step, self.count[env]
        window = (j[:, None] + np.arange(n)[None, :]) % self.rows
        flags = self.flags[env[:, None], window]
        ended = (flags & (TERMINATED | TRUNCATED)) > 0
        first_end = np.where(ended.any(1), ended.argmax(1), n - 1)
        L = first_end + 1
        alive = np.arange(n)[None, :] <= first_end[:, None]
        returns = (self.rewards[env[:, None], window] * (self.gamma ** np.arange(n))[None, :] * alive).sum(1)
        done = (flags[np.arange(len(j)), first_end] & TERMINATED) > 0
        discounts = np.where(done, 0.0, self.gamma**L)
        history = np.minimum(self.ep_step[env, j % self.rows].astype(np.int64), self.stack - 1)
        ok = (
            (j + L <= cnt - 1)  # the bootstrap row exists (so no end was read from unwritten, stale rows)
            & (j - history >= np.maximum(cnt - self.rows, 0))  # its stack was not overwritten
            & ((self.flags[env, j % self.rows] & FINAL) == 0)
        )
        return ok, returns.astype(np.float32), discounts.astype(np.float32), L

    def _batch(self, env: np.ndarray, j: np.ndarray, returns, discounts, L, weights) -> Batch:
        rows = j % self.rows
        return Batch(
            obs=self._stacks(env, rows),
            actions=self.actions[env, rows].astype(np.int32),
            returns=returns,
            discounts=discounts,
            next_obs=self._stacks(env, (j + L) % self.rows),
            env_idx=env,
            row_idx=rows,
            teacher_q=None if self.teacher_q is None else self.teacher_q[env, rows],
            weights=weights,
        )

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Uniform over valid transitions, or by priority (with importance weights) if prioritized."""
        if self.tree is not None:
            return self._sample_prioritized(batch_size, rng)
        sizes = np.minimum(self.count, self.rows)
        total = int(sizes.sum())
        if total < 1:
            raise RuntimeError("cannot sample from an empty replay buffer")
        env_parts, j_parts, ret_parts, disc_parts, L_parts, got = [], [], [], [], [], 0
        for _ in range(100):
            flat = rng.integers(0, total, size=2 * batch_size)
            env = np.searchsorted(np.cumsum(sizes), flat, side="right")
            pos = flat - (np.cumsum(sizes) - sizes)[env]
            j = np.maximum(self.count[env] - self.rows, 0) + pos
            ok, ret, disc, L = self.valid(env, j)
            env_parts.append(env[ok]), j_parts.append(j[ok]), ret_parts.append(ret[ok]), disc_parts.append(disc[ok]), L_parts.append(L[ok])
            got += int(ok.sum())
            if got >= batch_size:
                break
        else:
            raise RuntimeError("replay buffer has too few valid transitions to sample a batch")
        env, j = np.concatenate(env_parts)[:batch_size], np.concatenate(j_parts)[:batch_size]
        return self._batch(env, j, np.concatenate(ret_parts)[:batch_size], np.concatenate(disc_parts)[:batch_size],
                           np.concatenate(L_parts)[:batch_size], np.ones(batch_size, np.float32))

    def _sample_prioritized(self, batch_size: int, rng: np.random.Generator) -> Batch:
        for _ in range(100):
            if not self.tree.total > 0.0:
                raise RuntimeError("replay buffer has no valid transition to sample")
            leaves, probs = self.tree.sample(batch_size, rng)
            env, r = np.divmod(leaves, self.rows)
            j = self.count[env] - 1 - (self.count[env] - 1 - r) % self.rows  # absolute row number
            ok, ret, disc, L = self.valid(env, j)
            if ok.all():
                return self._batch(env, j, ret, disc, L, importance_weights(probs, self.beta))
            self.tree.set(leaves[~ok], 0.0)  # cannot happen (leaf > 0 only for valid rows); kept as a guard
        raise RuntimeError("replay buffer has too few valid transitions to sample a batch")

    def update_priorities(self, env_idx: np.ndarray, row_idx: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """priority = (loss + 1e-10)^alpha for sampled rows that still hold a transition; returns them."""
        leaves = np.asarray(env_idx, np.int64) * self.rows + np.asarray(row_idx, np.int64)
        priorities = (np.asarray(losses, np.float64) + 1e-10) ** self.alpha
        live = self.tree.get(leaves) > 0.0
        self.tree.set(leaves[live], priorities[live])
        return priorities


