"""The replay on the accelerator: a frame store of several streams in flat JAX arrays, uniform and prioritized.

Every 84x84 frame is stored once and the 4-frame stacks are rebuilt at sampling; adding a vector step, sampling
(uniform: rejection over stored rows; prioritized: a sum tree, as Dopamine's) and new priorities are pure functions
the scripts jit with their buffers donated, so XLA updates them in place. A uniform replay carries a 2-node stub
tree. Teacher data (roll-outs and a loaded Dopamine replay) and the student's own replay are the same structure.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from reincarnate.checkpoints import read_checkpoint_array

if TYPE_CHECKING:
    from reincarnate.dopamine_replay import DopamineReplay

TERMINATED, TRUNCATED, FINAL, INVALID = 1, 2, 4, 8
STACK = 4


class Replay(NamedTuple):
    """A frame store of S streams (one per env, plus one per loaded Dopamine replay) in flat arrays.

    Stream s owns rows [base[s], base[s] + length[s]) as a ring; its absolute row j
    (counted from its first write) sits at base[s] + j % length[s]. A row is (newest
    frame of s_t, a_t, clipped r_t, flags, step in episode). When an episode ends one
    extra FINAL row keeps its last frame, so n-step targets bootstrap through a
    truncation but stop at a termination. Stacks are the 4 latest rows of the same
    episode, zeros before its start (as Dopamine). INVALID marks rows never to sample
    (what Dopamine's own validity rule rejects in a loaded replay).
    """

    frames: jax.Array  # (F, 84, 84) uint8
    actions: jax.Array  # (F,) uint8
    rewards: jax.Array  # (F,) float32
    flags: jax.Array  # (F,) uint8
    ep_step: jax.Array  # (F,) uint8, saturating at 255 (stacking only asks "< 3?")
    teacher_q: jax.Array  # (F, A) float32 teacher Q-values of each row's state, or (F, 0)
    base: jax.Array  # (S,) int32
    length: jax.Array  # (S,) int32
    count: jax.Array  # (S,) int32 rows ever written
    t: jax.Array  # (S,) int32 episode step of the pending observation
    ended: jax.Array  # (S,) bool: the last step ended an episode, so the next one is envpool's auto-reset
    # Prioritized replay (a 2-node stub when uniform): sum tree over the F rows, leaf > 0 exactly for the valid rows.
    tree: jax.Array  # (2 * L0,) float32, L0 = next power of 2 >= F; node 1 is the root, node i has children 2i, 2i+1
    max_priority: jax.Array  # () float32, the largest priority ever set (starts at 1, as Dopamine)
    pending: jax.Array  # (F,) bool: written, not yet a valid transition, so without a priority


class Batch(NamedTuple):
    obs: jax.Array  # (B, 4, 84, 84) uint8
    actions: jax.Array  # (B,) int32
    returns: jax.Array  # (B,) sum_{k<L} gamma^k r_{t+k}
    discounts: jax.Array  # (B,) gamma^L, 0 if the episode terminated within the L steps
    next_obs: jax.Array  # (B, 4, 84, 84) the state L steps later
    teacher_q: jax.Array  # (B, A) cached teacher Q-values of obs, or (B, 0)
    index: jax.Array  # (B,) flat row of each sample (its sum-tree leaf)
    weights: jax.Array  # (B,) importance weights (ones when sampled uniformly)


def _tree_leaves(rows: int) -> int:
    return 1 << max(int(rows - 1).bit_length(), 0)


def replay_bytes(lengths: list[int], teacher_q_dim: int, prioritized: bool = False) -> int:
    rows = sum(lengths)
    per_row = 84 * 84 + 1 + 4 + 1 + 1 + 4 * teacher_q_dim + (1 if prioritized else 0)
    return rows * per_row + (2 * _tree_leaves(rows) * 4 if prioritized else 0)


def make_replay(lengths: list[int], teacher_q_dim: int = 0, device=None, prioritized: bool = False) -> Replay:
    """An empty frame store with one stream per entry of `lengths`, allocated on `device`."""
    rows = int(sum(lengths))
    z = functools.partial(jnp.zeros, device=device)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    return Replay(
        frames=z((rows, 84, 84), jnp.uint8), actions=z((rows,), jnp.uint8), rewards=z((rows,), jnp.float32),
        flags=z((rows,), jnp.uint8), ep_step=z((rows,), jnp.uint8), teacher_q=z((rows, teacher_q_dim), jnp.float32),
        base=jax.device_put(base, device), length=jax.device_put(np.asarray(lengths, np.int32), device),
        count=z((len(lengths),), jnp.int32), t=z((len(lengths),), jnp.int32), ended=z((len(lengths),), bool),
        tree=z((2 * _tree_leaves(rows) if prioritized else 2,), jnp.float32), max_priority=jax.device_put(np.float32(1.0), device),
        pending=z((rows if prioritized else 1,), bool))


def _prioritized(rb: Replay) -> bool:
    return rb.tree.shape[0] > 2


# Sum tree: level-by-level vectorised set and descent; the depth is static, so both unroll in the jit.
def tree_set(tree: jax.Array, leaves: jax.Array, values: jax.Array, keep: jax.Array) -> jax.Array:
    """Set the `keep`ed leaves to `values` and recompute their ancestors (duplicate leaves: any one value wins)."""
    leaf0 = tree.shape[0] // 2
    node = jnp.where(keep, leaves + leaf0, tree.shape[0])  # out of range = dropped
    tree = tree.at[node].set(jnp.broadcast_to(values, node.shape).astype(tree.dtype), mode="drop")
    for _ in range(leaf0.bit_length() - 1):
        node = jnp.where(keep, node // 2, tree.shape[0])
        tree = tree.at[node].set(tree[jnp.minimum(2 * node, tree.shape[0] - 2)] + tree[jnp.minimum(2 * node + 1, tree.shape[0] - 1)], mode="drop")
    return tree


def tree_find(tree: jax.Array, queries: jax.Array) -> jax.Array:
    """Leaf k with cumsum[k-1] <= q < cumsum[k]; never a zero-priority leaf while the total is > 0."""
    leaf0 = tree.shape[0] // 2
    node = jnp.ones(queries.shape, jnp.int32)
    q = queries
    for _ in range(leaf0.bit_length() - 1):
        left, right = tree[2 * node], tree[2 * node + 1]
        go_right = ((q >= left) | (left <= 0.0)) & (right > 0.0)
        q = jnp.where(go_right, q - left, q)
        node = 2 * node + go_right
    return node - leaf0


def _row(rb: Replay, s, j):
    return rb.base[s] + jnp.mod(j, rb.length[s])


def replay_add(rb: Replay, first_stream: int, frames, actions, rewards, terminated, truncated, next_frames, teacher_q=None,
               n_step: int = 3) -> Replay:
    """One vector step of streams first_stream.. : newest frames of s_t, a_t, clipped r_t, flags, newest frames of
    s_{t+1} (and the teacher's Q-values of s_t). envpool auto-resets: a step right after an episode end is the
    reset (its action ignored) and is not stored. With prioritized replay, rows enter the sum tree (at the max
    priority) once they are valid for this n-step horizon, and leave it when overwritten. frames and next_frames
    may also be the whole (N, 4, 84, 84) observations: the loops pass the device copy they acted on, so no frame
    crosses to the device twice."""
    frames, next_frames = (f[:, -1] if f.ndim == 4 else f for f in (frames, next_frames))
    rows = rb.frames.shape[0]
    s = first_stream + jnp.arange(frames.shape[0])
    live = ~rb.ended[s]
    ended = (terminated | truncated) & live
    flags = jnp.where(terminated, TERMINATED, 0) | jnp.where(truncated, TRUNCATED, 0)
    t = rb.t[s]

    def write(rb, where, frames, actions, rewards, flags, ep_step, teacher_q):
        r = jnp.where(where, _row(rb, s, rb.count[s]), rows)  # out of range = dropped
        if _prioritized(rb):
            # An overwritten row, and the next-oldest rows whose stack reached back to it, are no longer valid.
            over = where & (rb.count[s] >= rb.length[s])
            k = jnp.arange(STACK)
            rk = _row(rb, s[:, None], rb.count[s][:, None] + k[None, :])
            hit = over[:, None] & ((k == 0) | (jnp.minimum(rb.ep_step[rk].astype(jnp.int32), STACK - 1) >= k)[None, :])
            rb = rb._replace(tree=tree_set(rb.tree, rk.ravel(), 0.0, hit.ravel()), pending=rb.pending.at[r].set(True, mode="drop"))
        rb = rb._replace(
            frames=rb.frames.at[r].set(frames, mode="drop"), actions=rb.actions.at[r].set(actions, mode="drop"),
            rewards=rb.rewards.at[r].set(rewards, mode="drop"), flags=rb.flags.at[r].set(flags, mode="drop"),
            ep_step=rb.ep_step.at[r].set(jnp.minimum(ep_step, 255).astype(jnp.uint8), mode="drop"),
            count=rb.count.at[s].add(where.astype(jnp.int32)))
        if teacher_q is not None:
            rb = rb._replace(teacher_q=rb.teacher_q.at[r].set(teacher_q, mode="drop"))
        return rb

    rb = write(rb, live, frames, actions.astype(jnp.uint8), rewards, flags.astype(jnp.uint8), t, teacher_q)
    # The episode's last frame, for bootstrapping through a truncation.
    rb = write(rb, ended, next_frames, jnp.zeros_like(actions, jnp.uint8), jnp.zeros_like(rewards), jnp.full_like(flags, FINAL, jnp.uint8),
               t + 1, None if teacher_q is None else jnp.zeros_like(teacher_q))
    rb = rb._replace(t=rb.t.at[s].set(jnp.where(live, t + 1, 0)), ended=rb.ended.at[s].set(ended))
    if _prioritized(rb):
        rb = _activate(rb, s, live, n_step)
    return rb


def _activate(rb: Replay, s, live, n_step: int) -> Replay:
    """Give the max priority to the pending rows of streams s that just became valid transitions (their n-step
    bootstrap row is now written, so they are among the last n_step + 2 rows)."""
    k = jnp.arange(n_step + 2)
    j = rb.count[s][:, None] - 1 - k[None, :]
    ss = jnp.broadcast_to(s[:, None], j.shape)
    keep = live[:, None] & (j >= jnp.maximum(rb.count[s] - rb.length[s], 0)[:, None])
    row = _row(rb, ss, j)
    ok = replay_valid(rb, ss.ravel(), j.ravel(), n_step, 1.0)[0].reshape(j.shape)
    activate = keep & rb.pending[row] & ok
    rows = rb.frames.shape[0]
    return rb._replace(tree=tree_set(rb.tree, row.ravel(), rb.max_priority, activate.ravel()),
                       pending=rb.pending.at[jnp.where(activate, row, rows).ravel()].set(False, mode="drop"))


def replay_step(step: tuple, device, host_replay: bool) -> tuple:
    """A vector step (obs, actions, rewards, terminated, truncated, next_obs, teacher_q) placed where the replay
    lives. A host replay (--replay-on-host) is sent only the newest frame of each observation, the one it stores: a
    quarter of the observations' bytes cross back from the accelerator."""
    if host_replay:
        obs, next_obs = (x[:, -1] if x.ndim == 4 else x for x in (step[0], step[5]))
        step = (obs, *step[1:5], next_obs, step[6])
    return jax.device_put(step, device)


def replay_valid(rb: Replay, s, j, n_step: int, gamma: float):
    """For absolute rows j of streams s: (valid, n-step returns, discounts, L)."""
    k = jnp.arange(n_step)
    rows = _row(rb, s[:, None], j[:, None] + k[None, :])
    flags = rb.flags[rows]
    ends = (flags & (TERMINATED | TRUNCATED)) > 0
    first_end = jnp.where(ends.any(1), jnp.argmax(ends, 1), n_step - 1)
    L = first_end + 1
    alive = k[None, :] <= first_end[:, None]
    returns = jnp.sum(rb.rewards[rows] * (gamma ** k)[None, :] * alive, axis=1)
    done = (jnp.take_along_axis(flags, first_end[:, None], 1)[:, 0] & TERMINATED) > 0
    discounts = jnp.where(done, 0.0, gamma ** L.astype(jnp.float32))
    row = _row(rb, s, j)
    history = jnp.minimum(rb.ep_step[row].astype(jnp.int32), STACK - 1)
    count = rb.count[s]
    ok = ((j + L <= count - 1)  # the bootstrap row exists
          & (j - history >= jnp.maximum(count - rb.length[s], 0))  # the stack was not overwritten
          & ((rb.flags[row] & (FINAL | INVALID)) == 0))
    return ok, returns.astype(jnp.float32), discounts.astype(jnp.float32), L


def replay_stacks(rb: Replay, s, j) -> jax.Array:
    k = jnp.arange(STACK - 1, -1, -1)  # slot 3 is the newest frame
    frames = rb.frames[_row(rb, s[:, None], j[:, None] - k[None, :])]
    before_start = k[None, :] > rb.ep_step[_row(rb, s, j)][:, None].astype(jnp.int32)
    return jnp.where(before_start[:, :, None, None], jnp.uint8(0), frames)


def replay_sample(rb: Replay, key, batch_size: int, n_step: int, gamma: float, max_rounds: int = 64) -> tuple[Batch, jax.Array]:
    """A uniform batch of valid transitions: rejection sampling over the stored rows, the first `batch_size` valid
    ones of `max_rounds` x `batch_size` uniform candidates drawn at once. Returns (batch, ok); ok is False only if
    the candidates hold too few valid rows. No loop: on a GPU a while_loop waits for the host at every trip."""
    stored = jnp.minimum(rb.count, rb.length)
    cum = jnp.cumsum(stored)
    first = jnp.maximum(rb.count - rb.length, 0)
    p = jax.random.randint(key, (max_rounds * batch_size,), 0, jnp.maximum(cum[-1], 1))
    s = jnp.searchsorted(cum, p, side="right", method="compare_all").astype(jnp.int32)
    j = first[s] + p - (cum[s] - stored[s])
    ok = replay_valid(rb, s, j, n_step, gamma)[0] & (cum[-1] > 0)
    dest = jnp.where(ok, jnp.cumsum(ok) - 1, batch_size)  # the k-th valid candidate goes to slot k, the rest are dropped
    s = jnp.zeros(batch_size, jnp.int32).at[dest].set(s, mode="drop")
    j = jnp.zeros(batch_size, jnp.int32).at[dest].set(j, mode="drop")
    filled = jnp.minimum(ok.sum(), batch_size)
    _, returns, discounts, L = replay_valid(rb, s, j, n_step, gamma)
    row = _row(rb, s, j)
    batch = Batch(obs=replay_stacks(rb, s, j), actions=rb.actions[row].astype(jnp.int32), returns=returns, discounts=discounts,
                  next_obs=replay_stacks(rb, s, j + L), teacher_q=rb.teacher_q[row], index=row, weights=jnp.ones(batch_size, jnp.float32))
    return batch, filled == batch_size


def replay_sample_prioritized(rb: Replay, key, batch_size: int, n_step: int, gamma: float, beta: float) -> tuple[Batch, jax.Array]:
    """Stratified as Dopamine: one query per equal slice of the total priority; P(row) = priority / total, importance
    weights (1/P)^beta normalised by the batch max. ok is False if the tree is empty."""
    total = rb.tree[1]
    bounds = jnp.linspace(0.0, total, batch_size + 1)
    leaf = tree_find(rb.tree, jax.random.uniform(key, (batch_size,), minval=bounds[:-1], maxval=bounds[1:]))
    probs = rb.tree[rb.tree.shape[0] // 2 + leaf] / total
    s = (jnp.searchsorted(rb.base, leaf, side="right", method="compare_all") - 1).astype(jnp.int32)
    count, length = rb.count[s], rb.length[s]
    j = count - 1 - jnp.mod(count - 1 - (leaf - rb.base[s]), length)  # the absolute row held at that leaf
    ok, returns, discounts, L = replay_valid(rb, s, j, n_step, gamma)
    weights = (jnp.min(probs) / probs) ** beta
    batch = Batch(obs=replay_stacks(rb, s, j), actions=rb.actions[leaf].astype(jnp.int32), returns=returns, discounts=discounts,
                  next_obs=replay_stacks(rb, s, j + L), teacher_q=rb.teacher_q[leaf], index=leaf, weights=weights.astype(jnp.float32))
    return batch, (total > 0) & ok.all()


def replay_set_priorities(rb: Replay, index: jax.Array, losses: jax.Array, alpha: float, keep: jax.Array | None = None) -> Replay:
    """priority = (loss + 1e-10)^alpha for sampled rows that still hold a transition (and are `keep`)."""
    priorities = (losses + 1e-10) ** alpha
    live = rb.tree[rb.tree.shape[0] // 2 + index] > 0.0
    live = live if keep is None else live & keep
    return rb._replace(tree=tree_set(rb.tree, index, priorities, live),
                       max_priority=jnp.maximum(rb.max_priority, jnp.max(jnp.where(live, priorities, 0.0))))


def replay_fill_from_dopamine(rb: Replay, replay: DopamineReplay, stream: int, chunk: int = 65_536) -> Replay:
    """Copy a loaded Dopamine replay into stream `stream` (its length must be the replay's capacity) chunk by chunk,
    so the device never holds a second copy of the frames. Dopamine already pads each episode start with zero rows,
    so stacks are its raw frames (ep_step saturated) and its validity rule becomes the INVALID flag."""
    valid = replay.valid_mask()
    flags = np.where(replay.terminals > 0, TERMINATED, 0) | np.where(valid, 0, INVALID)
    set_slice = jax.jit(lambda a, x, start: jax.lax.dynamic_update_slice_in_dim(a, x, start, 0), donate_argnums=0)
    base = int(rb.base[stream])
    for name, values in (("frames", replay.frames), ("actions", replay.actions.astype(np.uint8)), ("rewards", replay.rewards),
                         ("flags", flags.astype(np.uint8)), ("ep_step", np.full(replay.capacity, 255, np.uint8))):
        arr = getattr(rb, name)
        for start in range(0, replay.capacity, chunk):
            arr = set_slice(arr, jax.device_put(values[start : start + chunk], arr.devices().pop()), base + start)
        rb = rb._replace(**{name: arr})
    return rb._replace(count=rb.count.at[stream].set(replay.add_count), ended=rb.ended.at[stream].set(True))


def teacher_q_for_rows(teacher_q_fn, teacher_params, rb: Replay, stream: int, compute_device, batch: int = 1024) -> Replay:
    """The teacher's Q-values of every row's state of one stream, computed once in batches and cached in the buffer.
    The stacks are built where the buffer lives and the teacher runs on `compute_device` (the accelerator, even when
    --replay-on-host keeps the buffer in host memory: a 1M-row replay is 1M teacher forwards)."""
    stacks = jax.jit(lambda rb, start: replay_stacks(rb, jnp.full(batch, stream), start + jnp.arange(batch)))
    q_of = jax.jit(teacher_q_fn)

    @functools.partial(jax.jit, donate_argnums=0)
    def write(rb, start, q):
        j = start + jnp.arange(batch)
        r = jnp.where(j < rb.length[stream], _row(rb, jnp.full(batch, stream), j), rb.frames.shape[0])
        return rb._replace(teacher_q=rb.teacher_q.at[r].set(q, mode="drop"))

    replay_device = rb.frames.devices().pop()
    length = int(rb.length[stream])
    for start in tqdm(range(0, length, batch), desc="teacher Q of the replay", file=sys.stderr, mininterval=2.0):
        q = q_of(teacher_params, jax.device_put(stacks(rb, start), compute_device))
        rb = write(rb, start, jax.device_put(q, replay_device))
    return rb


def replay_from(ckpt, prefix: str, device) -> Replay:
    """A buffer saved by replay_arrays, placed on `device` (a uniform buffer saved without the sum-tree fields gets
    the stub)."""
    stub = {"tree": np.zeros(2, np.float32), "max_priority": np.float32(1.0), "pending": np.zeros(1, bool)}
    fields = {}
    for f in Replay._fields:
        try:
            fields[f] = read_checkpoint_array(ckpt, f"{prefix}.{f}")
        except FileNotFoundError:
            if f not in stub:
                raise
            fields[f] = stub[f]
    return Replay(**{f: jax.device_put(v, device) for f, v in fields.items()})


def replay_arrays(prefix: str, rb: Replay) -> dict:
    return {f"{prefix}.{f}": getattr(rb, f) for f in Replay._fields}


class BufferPlan(NamedTuple):
    """The buffers' sizes, known before anything is allocated: the teacher data (a loaded Dopamine replay's stream,
    then one stream per roll-out env) and the student's replay (one stream per env)."""

    teacher_lengths: list[int]
    online_lengths: list[int]
    teacher_bytes: int
    online_bytes: int

    def checkpoint_bytes(self, copies: int) -> int:
        """The disk a phase's checkpoints need at their peak: a new checkpoint is complete before the oldest is
        deleted (copies = --keep-checkpoints + 1), beside the teacher data (written once)."""
        return max(copies * self.teacher_bytes, self.teacher_bytes + copies * self.online_bytes)


def plan_buffers(dopamine_rows: int, rollout_steps: int, num_envs: int, buffer_size: int, num_actions: int, online_q_dim: int,
                 prioritized: bool = False) -> BufferPlan:
    rollout_rows = -(-(rollout_steps + 8 * num_envs) // num_envs) if rollout_steps else 0  # + the episodes' FINAL rows
    teacher_lengths = ([dopamine_rows] if dopamine_rows else []) + [rollout_rows] * (num_envs if rollout_rows else 0)
    online_lengths = [-(-buffer_size // num_envs)] * num_envs
    return BufferPlan(teacher_lengths, online_lengths, replay_bytes(teacher_lengths, num_actions) if teacher_lengths else 0,
                      replay_bytes(online_lengths, online_q_dim, prioritized))


def host_step(rb: Replay, step: tuple, teacher_q_of, teacher_params, host) -> tuple:
    """--replay-on-host: a vector step the student acted on (obs, actions, rewards, terminated, truncated, next_obs, on
    the accelerator), ready for a replay in host memory: the teacher's Q of its states computed on the accelerator first
    (zeros once no loss reads it: teacher_params None), then only the newest frames of its observations sent there."""
    q_dim, teacher_q = rb.teacher_q.shape[-1], None
    if q_dim:
        teacher_q = teacher_q_of(teacher_params, step[0]) if teacher_params is not None else np.zeros((step[0].shape[0], q_dim), np.float32)
    return replay_step((*step, teacher_q), host, True)
