"""QDagger with a Rainbow student on envpool Atari (Agarwal et al., NeurIPS 2022).

Reincarnates a Dopamine DQN_400 teacher into a Rainbow student (Dopamine's
"full Rainbow" as the paper used it: C51 + n-step + prioritized replay):
  (a) evaluate the teacher on Dopamine-protocol envs -> G_T
  (b) collect --teacher-steps transitions by rolling out the teacher
  (c) offline phase: QDagger loss on the teacher data only (lambda = 1,
      uniform sampling)
  (d) online phase: the student acts, learns from its own prioritized replay
      with the QDagger loss, and lambda decays with its teacher-normalized score
  (e) final evaluation, saved model
Loss (per sample i, importance weight w_i):
  L = mean_i w_i * (CE(proj. target_i, p_S(s_i, a_i)) + lambda * c * KL(softmax(q_T/tau) || softmax(q_S/tau)))
with q_S the student's expected Q over atoms.

    python qdagger_rainbow_atari_jax.py --env-id Breakout-v5
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Literal, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from tqdm import tqdm

import teacher_utils as tu


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "reincarnate"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to save an mp4 of the final evaluation's first episode (what the agent sees) to `runs/{run_name}/videos`"""
    save_model: bool = False
    """whether to save the student's params (flax msgpack) and the run's args to `runs/{run_name}`"""

    # Environment
    env_id: str = "Breakout-v5"
    """the envpool Atari id; the teacher is the DQN_400 agent of its game"""
    num_envs: int = 1
    """parallel envpool envs for the teacher roll-out and the student; the replay ratio stays one update per `train_frequency` agent steps in total"""
    eval_num_envs: int = 8
    """parallel envs used by every evaluation (batched inference; the step budget counts all of them)"""

    # Teacher
    teacher_checkpoint: str | None = None
    """local run folder, checkpoint file or gs:// address of the teacher; default gs://rl_checkpoints/DQN_400/<Game>/1"""
    teacher_iteration: int | None = None
    """Dopamine iteration of the teacher checkpoint; default the latest complete one"""
    teacher_eval_episodes: int = 100
    """the teacher evaluation stops after this many finished episodes (or `eval_steps` agent steps)"""
    teacher_steps: int = 1_000_000
    """transitions collected by rolling out the teacher (the paper used 1M teacher transitions)"""
    teacher_epsilon: float = 0.01
    """exploration of the teacher roll-out (the teacher's own late-training epsilon)"""

    # QDagger
    offline_steps: int = 1_000_000
    """gradient steps on teacher data before the student acts (paper: 10 x 100,000)"""
    temperature: float = 0.1
    """tau: both teacher and student Q-values (the student's expected Q over atoms) are divided by it inside the softmaxes"""
    distill_coef: float = 1.0
    """c: the distillation loss is weighted by lambda * c (paper: 1.0 for a Rainbow student)"""
    distill_decay_period: int = 2_500_000
    """online agent steps after which lambda is 0 for good (paper: 2.5M for Rainbow)"""
    td_coef: float = 1.0
    """weight of the TD (C51) loss; 0 gives the paper's distillation-only (DAgger-style) baseline"""

    # Rainbow (Dopamine's full Rainbow with the paper's switches: C51 + n-step + prioritized replay)
    network: Literal["nature", "impala"] = "nature"
    """student torso: Dopamine's Nature DQN (SAME padding, as the teacher) or the Impala CNN (16, 32, 32); both end in Dense 512 and a C51 head"""
    num_atoms: int = 51
    """C51: atoms of the return distribution"""
    v_min: float = -10.0
    """C51: lowest atom of the fixed support"""
    v_max: float = 10.0
    """C51: highest atom of the fixed support"""
    double_dqn: bool = False
    """double DQN: the online network's expected Q picks the next action, the target network's distribution is projected (off in the paper)"""
    dueling: bool = False
    """dueling head: value and advantage streams over atoms, logits = V + A - mean_a A (off in the paper)"""
    noisy: bool = False
    """factorised-Gaussian NoisyNet layers in the head, fresh noise every forward pass; epsilon-greedy is then off (epsilon = 0) in training as in Dopamine, and evaluations use the noise-free mean weights with --eval-epsilon (off in the paper)"""
    noisy_sigma0: float = 0.5
    """NoisyNet sigma_0: sigma is initialised to sigma_0 / sqrt(fan_in) (Fortunato et al. 2018)"""
    per_alpha: float = 0.5
    """prioritized replay: priority = (C51 loss + 1e-10)^alpha; alpha = beta = 0.5 is exactly Dopamine's Rainbow (priority sqrt(loss + 1e-10), weights 1/sqrt(P)); alpha = 0 samples uniformly"""
    per_beta: float = 0.5
    """prioritized replay: importance weights (1/P)^beta normalised by the batch max, constant (not annealed); they scale both the C51 and the distillation term of each sample; alpha = beta = 0.5 is exactly Dopamine's Rainbow"""

    # Optimisation and replay (Dopamine's Atari protocol)
    total_timesteps: int = 2_500_000
    """online agent steps (all envs together); 2.5M = 10 Dopamine iterations"""
    learning_rate: float = 1e-4
    """Adam learning rate while lambda = 1; lr = lambda * learning_rate + (1 - lambda) * end_learning_rate"""
    end_learning_rate: float = 1e-5
    """Adam learning rate once lambda = 0 (fine-tuning)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon (the paper's 1.5e-4; Dopamine's stand-alone Rainbow configs use 1.5e-4 or 0.0003125)"""
    buffer_size: int = 1_000_000
    """the student's online replay capacity (transitions); the teacher buffer holds `teacher_steps`"""
    gamma: float = 0.99
    """the discount factor gamma"""
    n_step: int = 3
    """n-step returns (never across an episode end; bootstrapped through truncation, not termination)"""
    target_network_frequency: int = 8_000
    """agent steps between target syncs (offline: every target_network_frequency / train_frequency updates)"""
    batch_size: int = 32
    """the batch size sampled from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration (ignored with --noisy)"""
    end_e: float = 0.01
    """the ending epsilon for exploration (ignored with --noisy)"""
    epsilon_decay_steps: int = 50_000
    """online agent steps over which epsilon decays linearly from start_e to end_e"""
    learning_starts: int = 20_000
    """online agent steps collected before the student starts learning"""
    train_frequency: int = 4
    """agent steps per gradient update (in total over all envs)"""

    # Evaluation
    eval_frequency: int = 250_000
    """online agent steps between evaluations (one Dopamine iteration); lambda is recomputed after each"""
    eval_episodes: int = 100
    """a student evaluation stops after this many finished episodes (or `eval_steps` agent steps)"""
    eval_steps: int = 125_000
    """agent-step budget of every evaluation (Dopamine: 125,000); an unfinished episode counts nowhere"""
    eval_epsilon: float = 0.001
    """epsilon of the greedy policy during evaluations"""
    log_frequency: int = 100
    """gradient updates between loss logs"""


class ConfigError(ValueError):
    """A flag value that cannot work; the message is one line."""


def check_args(args: Args) -> None:
    positive = ["num_envs", "eval_num_envs", "teacher_eval_episodes", "total_timesteps", "buffer_size", "batch_size", "n_step",
                "target_network_frequency", "train_frequency", "eval_frequency", "eval_episodes", "eval_steps", "log_frequency", "epsilon_decay_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in ["teacher_steps", "offline_steps", "learning_starts", "distill_coef", "distill_decay_period", "td_coef",
                 "per_alpha", "per_beta", "noisy_sigma0"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    if args.num_atoms < 2:
        raise ConfigError(f"--num-atoms must be >= 2 (got {args.num_atoms})")
    if not args.v_min < args.v_max:
        raise ConfigError(f"--v-min must be below --v-max (got {args.v_min} and {args.v_max})")
    if args.offline_steps > 0 and args.teacher_steps < args.batch_size + args.n_step + 4 * args.num_envs:
        raise ConfigError(f"--teacher-steps {args.teacher_steps} is too few to sample batches of {args.batch_size} for --offline-steps; collect more or pass --offline-steps 0")
    if args.buffer_size < max(args.learning_starts, args.batch_size + (args.n_step + 4) * args.num_envs):
        raise ConfigError(f"--buffer-size {args.buffer_size} is smaller than what the online phase needs (--learning-starts {args.learning_starts}, a batch of {args.batch_size}); raise it")
    for name in ["start_e", "end_e", "eval_epsilon", "teacher_epsilon"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")


# ----------------------------------------------------------------------------
# Networks: a torso (Nature or Impala) and a C51 head (optionally dueling, noisy)
# ----------------------------------------------------------------------------
# Dopamine's Rainbow initialiser (dopamine/jax/networks.py).
dopamine_init = nn.initializers.variance_scaling(scale=1.0 / np.sqrt(3.0), mode="fan_in", distribution="uniform")


class NoisyDense(nn.Module):
    """Factorised Gaussian NoisyNet layer (Fortunato et al. 2018).

    w = mu_w + sigma_w * f(eps_in) f(eps_out)^T, b = mu_b + sigma_b * f(eps_out),
    f(x) = sign(x) sqrt(|x|); mu ~ U[-1/sqrt(p), 1/sqrt(p)], sigma = sigma0 / sqrt(p).
    `key` draws fresh noise (one draw for the whole batch); key=None uses the mean weights.
    """

    features: int
    sigma0: float = 0.5

    @nn.compact
    def __call__(self, x, key=None):
        p = x.shape[-1]
        bound = 1.0 / np.sqrt(p)
        uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
        sigma = nn.initializers.constant(self.sigma0 / np.sqrt(p))
        mu_w = self.param("mu_kernel", uniform, (p, self.features))
        mu_b = self.param("mu_bias", uniform, (self.features,))
        sigma_w = self.param("sigma_kernel", sigma, (p, self.features))
        sigma_b = self.param("sigma_bias", sigma, (self.features,))
        y = x @ mu_w + mu_b
        if key is None:
            return y
        k_in, k_out = jax.random.split(key)
        f = lambda e: jnp.sign(e) * jnp.sqrt(jnp.abs(e))  # noqa: E731
        eps_in = f(jax.random.normal(k_in, (p,)))
        eps_out = f(jax.random.normal(k_out, (self.features,)))
        # x @ (sigma_w * outer(eps_in, eps_out)) without building the noisy matrix
        return y + ((x * eps_in) @ sigma_w) * eps_out + sigma_b * eps_out


class NatureTorso(nn.Module):
    """Dopamine's Nature DQN convolutions (SAME padding, as teacher_utils.DopamineNatureDQN): 7,744 features."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (8, 8), strides=(4, 4), padding="SAME", kernel_init=dopamine_init)(x))
        x = nn.relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="SAME", kernel_init=dopamine_init)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="SAME", kernel_init=dopamine_init)(x))
        return x.reshape((x.shape[0], -1))  # H, W, C order, as Dopamine flattens


class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(x))
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """Impala CNN torso (Espeholt et al. 2018) as in the paper's Fig. 1 student; the Dense 512 is the head's."""

    channels: tuple[int, ...] = (16, 32, 32)

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = ResidualBlock(c)(x)
            x = ResidualBlock(c)(x)
        return nn.relu(x).reshape((x.shape[0], -1))


class RainbowNetwork(nn.Module):
    """uint8 (B, 4, 84, 84) -> C51 logits (B, num_actions, num_atoms).

    Torso, then Dense 512 + ReLU, then the C51 output (Dopamine's FullRainbowNetwork
    head). Dueling: value (num_atoms) and advantage (num_actions x num_atoms) streams
    from the same hidden layer, logits = V + A - mean_a A. Noisy: every head layer is
    a NoisyDense; pass `key` for fresh noise, key=None for the mean weights.
    """

    num_actions: int
    num_atoms: int = 51
    torso: str = "nature"
    dueling: bool = False
    noisy: bool = False
    sigma0: float = 0.5

    @nn.compact
    def __call__(self, x, key=None):
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        x = NatureTorso()(x) if self.torso == "nature" else ImpalaCNN()(x)
        keys = list(jax.random.split(key, 3)) if (key is not None and self.noisy) else [None] * 3
        init = dopamine_init if self.torso == "nature" else nn.initializers.lecun_normal()

        def dense(h, features, name, k):
            if self.noisy:
                return NoisyDense(features, self.sigma0, name=name)(h, k)
            return nn.Dense(features, kernel_init=init, name=name)(h)

        h = nn.relu(dense(x, 512, "hidden", keys[0]))
        A, K = self.num_actions, self.num_atoms
        if self.dueling:
            adv = dense(h, A * K, "advantage", keys[1]).reshape((-1, A, K))
            value = dense(h, K, "value", keys[2]).reshape((-1, 1, K))
            return value + adv - jnp.mean(adv, axis=1, keepdims=True)
        return dense(h, A * K, "logits", keys[1]).reshape((-1, A, K))


def make_student(args: Args, num_actions: int) -> RainbowNetwork:
    return RainbowNetwork(num_actions, args.num_atoms, args.network, args.dueling, args.noisy, args.noisy_sigma0)


def make_support(args: Args) -> jax.Array:
    return jnp.linspace(args.v_min, args.v_max, args.num_atoms, dtype=jnp.float32)


# ----------------------------------------------------------------------------
# Prioritized replay: a vectorised sum tree
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# The math (pure functions, unit-tested)
# ----------------------------------------------------------------------------
def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Linear from start to end over duration steps, then end."""
    return end + (start - end) * max(1.0 - t / duration, 0.0)


def distill_lambda_update(lam: float, student_return: float | None, teacher_return: float | None, random_return: float,
                          online_steps: int, decay_period: int) -> tuple[float, str]:
    """lambda after an evaluation: 1 - teacher_normalized_score clipped to [0, 1] (a student below the
    random score does not push lambda, lr or the distillation weight above their offline values);
    0 for good after the decay period or once it reached 0. Returns (lambda, reason) where reason
    explains a kept value."""
    if online_steps >= decay_period:
        return 0.0, "decay period over"
    if lam == 0.0:
        return 0.0, "lambda reached 0 and stays there"
    if student_return is None:
        return lam, "the student evaluation finished no episode: lambda keeps its value"
    if teacher_return is None:
        return lam, "the teacher evaluation finished no episode: lambda keeps its value"
    if teacher_return <= random_return:
        return lam, f"teacher score {teacher_return:g} <= random score {random_return:g}: lambda keeps its value"
    tns = tu.teacher_normalized_score(student_return, teacher_return, random_return)
    return min(max(1.0 - tns, 0.0), 1.0), ""


def lambda_learning_rate(lam: float, start_lr: float, end_lr: float) -> float:
    """lr = lambda * start_lr + (1 - lambda) * end_lr."""
    return lam * start_lr + (1.0 - lam) * end_lr


def expected_q(logits: jax.Array, support: jax.Array) -> jax.Array:
    """(..., A, K) logits -> (..., A) expected returns sum_k softmax(logits)_k z_k."""
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * support, axis=-1)


def project_distribution(next_probs: jax.Array, returns: jax.Array, discounts: jax.Array, support: jax.Array) -> jax.Array:
    """C51's L2 projection (Bellemare et al. 2017) of the target distribution onto the fixed support.

    next_probs (B, K) sit on atoms returns + discounts * z, clipped to [z_0, z_{K-1}];
    discounts are already gamma^L (1 - done). Atom j's mass goes to the two nearest
    support atoms with weights clip(1 - |Tz_j - z_i| / dz, 0, 1). Needs a uniform support.
    """
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (support.shape[0] - 1)
    target_z = jnp.clip(returns[:, None] + discounts[:, None] * support[None, :], v_min, v_max)  # (B, K)
    w = jnp.clip(1.0 - jnp.abs(target_z[:, :, None] - support[None, None, :]) / dz, 0.0, 1.0)  # (B, K_from, K_to)
    return jnp.einsum("bj,bji->bi", next_probs, w)


def c51_target(next_logits_target: jax.Array, next_logits_online: jax.Array | None, returns: jax.Array, discounts: jax.Array,
               support: jax.Array, double_dqn: bool) -> jax.Array:
    """Projected target distribution (B, K): the target network's distribution of the next action,
    chosen by the target's expected Q, or the online network's with double DQN."""
    selector = next_logits_online if double_dqn else next_logits_target
    next_action = jnp.argmax(expected_q(selector, support), axis=-1)
    probs = jax.nn.softmax(next_logits_target, axis=-1)
    next_probs = jnp.take_along_axis(probs, next_action[:, None, None], axis=1)[:, 0]
    return project_distribution(next_probs, returns, discounts, support)


def c51_loss(logits: jax.Array, actions: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Per-sample cross-entropy -sum_k target_k log softmax(logits[a])_k (B,); no gradient into the target."""
    chosen = jnp.take_along_axis(logits, actions[:, None, None], axis=1)[:, 0]
    return -jnp.sum(jax.lax.stop_gradient(target_probs) * jax.nn.log_softmax(chosen, axis=-1), axis=-1)


def distillation_kl(teacher_q: jax.Array, student_q: jax.Array, temperature: float) -> jax.Array:
    """Per-sample KL(softmax(q_T / tau) || softmax(q_S / tau)) (B,); no gradient reaches the teacher."""
    teacher_q = jax.lax.stop_gradient(teacher_q)
    log_p_teacher = jax.nn.log_softmax(teacher_q / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student_q / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)


def distillation_loss(teacher_q: jax.Array, student_q: jax.Array, temperature: float) -> jax.Array:
    """mean_batch KL(softmax(q_T / tau) || softmax(q_S / tau))."""
    return jnp.mean(distillation_kl(teacher_q, student_q, temperature))


def qdagger_rainbow_loss(logits: jax.Array, actions: jax.Array, target_probs: jax.Array, teacher_q: jax.Array, support: jax.Array,
                         weights: jax.Array, distill_weight: jax.Array, temperature: float,
                         td_weight: float = 1.0) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """L = mean_i w_i (td_weight * CE_i + lambda * c * KL_i); distill_weight is lambda * c.
    Returns (L, (metrics, per-sample CE for the priorities))."""
    td = c51_loss(logits, actions, target_probs)
    q = expected_q(logits, support)
    td_loss = jnp.mean(weights * td)
    distill = jnp.where(distill_weight > 0, jnp.mean(weights * distillation_kl(teacher_q, q, temperature)), 0.0)
    loss = td_weight * td_loss + distill_weight * distill
    q_taken = jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]
    return loss, ({"td_loss": td_loss, "distill_loss": distill, "loss": loss, "q_values": jnp.mean(q_taken)}, td)


class QState(TrainState):
    target_params: flax.core.FrozenDict


def make_update(student: RainbowNetwork, support: jax.Array, temperature: float, td_weight: float = 1.0, double_dqn: bool = False):
    @jax.jit
    def update(state: QState, obs, actions, returns, discounts, next_obs, teacher_q, weights, distill_weight, learning_rate, key):
        k_online, k_target, k_next = jax.random.split(key, 3)  # fresh noise for every forward pass (used if noisy)
        next_logits_target = student.apply(state.target_params, next_obs, key=k_target)
        next_logits_online = student.apply(state.params, next_obs, key=k_next) if double_dqn else None
        target_probs = c51_target(next_logits_target, next_logits_online, returns, discounts, support, double_dqn)

        def loss_fn(params):
            logits = student.apply(params, obs, key=k_online)
            return qdagger_rainbow_loss(logits, actions, target_probs, teacher_q, support, weights, distill_weight, temperature, td_weight)

        grads, (metrics, td) = jax.grad(loss_fn, has_aux=True)(state.params)
        state.opt_state.hyperparams["learning_rate"] = learning_rate
        return state.apply_gradients(grads=grads), metrics, td

    return update


def make_act(q_fn):
    """Epsilon-greedy actions, the Q-values they came from, and the next PRNG key (split inside
    the jit: a separate split per env step costs as much as a third of the forward pass);
    q_fn(params, obs, key) -> (B, A) Q-values."""

    @jax.jit
    def act(params, obs, key, epsilon):
        key, k0, k1, k2 = jax.random.split(key, 4)
        q = q_fn(params, obs, k0)
        greedy = jnp.argmax(q, axis=-1)
        explore = jax.random.uniform(k1, greedy.shape) < epsilon
        rand = jax.random.randint(k2, greedy.shape, 0, q.shape[-1])
        return jnp.where(explore, rand, greedy), q, key

    return act


# ----------------------------------------------------------------------------
# Evaluation: Dopamine's protocol, whichever budget ends first
# ----------------------------------------------------------------------------
def evaluate(act, params, envs: tu.DopamineAtariEnvs, max_episodes: int, max_steps: int, epsilon: float, key,
             desc: str = "eval", frames: list | None = None) -> tuple[list[float], list[int], int]:
    """Raw-score returns and lengths of the episodes that finished, and agent steps used.

    Stops after `max_episodes` finished episodes or `max_steps` agent steps (all
    envs together); an unfinished episode is dropped. `frames` (if a list)
    collects env 0's observations until its first episode ends.
    """
    obs, _ = envs.reset()
    returns, lengths = [], []
    ep_ret = np.zeros(envs.num_envs)
    ep_len = np.zeros(envs.num_envs, np.int64)
    resetting = np.zeros(envs.num_envs, bool)
    steps = 0
    recording = frames is not None
    with tqdm(total=max_steps, desc=desc, leave=False, file=sys.stderr, mininterval=2.0) as bar:
        while steps < max_steps and len(returns) < max_episodes:
            actions, _, key = act(params, obs, key, epsilon)
            actions = np.asarray(actions)
            obs, _, terminated, truncated, info = envs.step(actions)
            live = ~resetting
            ep_ret += np.where(live, info["reward"], 0.0)
            ep_len += live
            if recording:
                frames.append(obs[0, -1].copy())
            done = (terminated | truncated) & live
            for i in np.flatnonzero(done):
                if len(returns) < max_episodes:
                    returns.append(float(ep_ret[i]))
                    lengths.append(int(ep_len[i]))
                if i == 0:
                    recording = False
            ep_ret[done] = 0.0
            ep_len[done] = 0
            resetting = done
            steps += envs.num_envs
            bar.update(envs.num_envs)
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


def save_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> None:
    check_args(args)
    tu.check_env_id(args.env_id)
    game = tu.game_from_env_id(args.env_id)
    random_return = tu.random_score(game)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    key, student_key = jax.random.split(key)

    envs = tu.make_teacher_envs(args.env_id, args.num_envs, seed=args.seed)
    eval_envs = tu.make_teacher_envs(args.env_id, args.eval_num_envs, seed=args.seed + 10_000)
    num_actions = envs.num_actions

    # Teacher: raises a one-line TeacherError if unreachable, corrupt or of another game.
    source = args.teacher_checkpoint or f"gs://rl_checkpoints/DQN_400/{game}/1"
    teacher_ckpt = tu.load_teacher(source, num_actions=num_actions, iteration=args.teacher_iteration)
    teacher = tu.DopamineNatureDQN(num_actions)
    teacher_params = jax.device_put(teacher_ckpt.params)
    print(f"teacher: {teacher_ckpt.kind} checkpoint {teacher_ckpt.path} (iteration {teacher_ckpt.iteration}, {num_actions} actions)")

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    support = make_support(args)
    student = make_student(args, num_actions)
    student_params = student.init(student_key, np.zeros((1, 4, 84, 84), np.uint8))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=args.learning_rate, eps=args.adam_eps)
    state = QState.create(apply_fn=student.apply, params=student_params, target_params=student_params, tx=optimizer)
    update = make_update(student, support, args.temperature, args.td_coef, args.double_dqn)
    # Training actions draw fresh noise (noisy nets); evaluations use the mean weights.
    act_student = make_act(lambda p, o, k: expected_q(student.apply(p, o, key=k), support))
    act_student_eval = make_act(lambda p, o, k: expected_q(student.apply(p, o), support))
    act_teacher = make_act(lambda p, o, k: teacher.apply(p, o))
    teacher_q_values = jax.jit(teacher.apply)
    no_teacher_q = np.zeros((args.batch_size, num_actions), np.float32)

    def train_step(state, batch: Batch, distill_weight: float, lr: float, key):
        # Teacher data carries the teacher's Q-values; online, the teacher is queried on the sampled states
        # (only while its loss counts: lambda * c > 0).
        if batch.teacher_q is not None:
            teacher_q = batch.teacher_q
        else:
            teacher_q = teacher_q_values(teacher_params, batch.obs) if distill_weight > 0 else no_teacher_q[: len(batch.obs)]
        return update(state, batch.obs, batch.actions, batch.returns, batch.discounts, batch.next_obs, teacher_q,
                      batch.weights, jnp.float32(distill_weight), jnp.float32(lr), key)

    # (a) Teacher evaluation -> G_T
    t0 = time.time()
    key, k = jax.random.split(key)
    returns, lengths, steps = evaluate(act_teacher, teacher_params, eval_envs, args.teacher_eval_episodes, args.eval_steps,
                                       args.eval_epsilon, k, desc="teacher eval")
    teacher_return = float(np.mean(returns)) if returns else None
    for i, (r, l) in enumerate(zip(returns, lengths)):
        writer.add_scalar("teacher/episodic_return", r, i)
        writer.add_scalar("teacher/episodic_length", l, i)
    if teacher_return is not None:
        writer.add_scalar("teacher/mean_return", teacher_return, 0)
    print(f"(a) {summary('teacher', returns, steps)}; random score {random_return:g} [{steps / (time.time() - t0):.0f} agent steps/s]")

    # (b) Teacher roll-out -> teacher replay data (sampled uniformly offline)
    teacher_rb = FrameReplayBuffer((args.teacher_steps if args.offline_steps > 0 else 1) + 8 * args.num_envs, args.num_envs, args.n_step, args.gamma,
                                   teacher_q_dim=num_actions)
    t0 = time.time()
    obs, _ = envs.reset()
    collected = 0
    teacher_steps = args.teacher_steps if args.offline_steps > 0 else 0  # kickstarting / tabula rasa use no teacher data
    with tqdm(total=teacher_steps, desc="teacher data", file=sys.stderr, mininterval=2.0) as bar:
        while collected < teacher_steps:
            actions, teacher_q, key = act_teacher(teacher_params, obs, key, args.teacher_epsilon)
            actions, teacher_q = jax.device_get((actions, teacher_q))
            next_obs, reward, terminated, truncated, info = envs.step(actions)
            teacher_rb.add(obs[:, -1], actions, np.clip(reward, -1.0, 1.0), terminated, truncated, next_obs[:, -1], teacher_q)
            obs = next_obs
            collected += args.num_envs
            bar.update(args.num_envs)
    if not teacher_steps:
        print("(b) teacher data: skipped (--offline-steps 0: no offline phase to use it)")
    else:
        print(f"(b) teacher data: {len(teacher_rb)} rows from {collected} agent steps, {teacher_rb.bytes_per_transition:.0f} bytes/transition "
              f"[{collected / (time.time() - t0):.0f} agent steps/s]")

    # (c) Offline phase: teacher data only, uniform sampling, lambda = 1, lr = learning_rate
    lam = 1.0
    offline_target_every = max(args.target_network_frequency // args.train_frequency, 1)
    t0 = time.time()
    for step in tqdm(range(1, args.offline_steps + 1), desc="offline", file=sys.stderr, mininterval=2.0):
        batch = teacher_rb.sample(args.batch_size, rng)
        key, k = jax.random.split(key)
        state, metrics, _ = train_step(state, batch, lam * args.distill_coef, args.learning_rate, k)
        if step % offline_target_every == 0:
            state = state.replace(target_params=state.params)
        if step % args.log_frequency == 0 or step == args.offline_steps:
            for name, value in jax.device_get(metrics).items():
                writer.add_scalar(f"offline/{name}", float(value), step)
            writer.add_scalar("offline/SPS", step / (time.time() - t0), step)
    if args.offline_steps:
        print(f"(c) offline: {args.offline_steps} updates [{args.offline_steps / (time.time() - t0):.1f} updates/s]")
        state = state.replace(target_params=state.params)
    del teacher_rb  # the online phase uses the student's own replay

    # (d) Online phase: prioritized replay
    rb = FrameReplayBuffer(args.buffer_size, args.num_envs, args.n_step, args.gamma, prioritized=True,
                           alpha=args.per_alpha, beta=args.per_beta)
    lr = lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate)
    obs, _ = envs.reset()
    ep_ret = np.zeros(args.num_envs)
    ep_len = np.zeros(args.num_envs, np.int64)
    resetting = np.zeros(args.num_envs, bool)
    global_step, updates, update_credit = 0, 0, 0.0
    next_target_sync, next_eval = args.learning_starts + args.target_network_frequency, args.eval_frequency
    t0, eval_seconds = time.time(), 0.0
    bar = tqdm(total=args.total_timesteps, desc="online", file=sys.stderr, mininterval=2.0)
    while global_step < args.total_timesteps:
        # Noisy nets explore by their noise: epsilon-greedy is off, as in Dopamine.
        epsilon = 0.0 if args.noisy else linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, global_step)
        actions, _, key = act_student(state.params, obs, key, epsilon)
        actions = np.asarray(actions)
        next_obs, reward, terminated, truncated, info = envs.step(actions)
        rb.add(obs[:, -1], actions, np.clip(reward, -1.0, 1.0), terminated, truncated, next_obs[:, -1])
        obs = next_obs
        global_step += args.num_envs
        bar.update(args.num_envs)

        live = ~resetting
        ep_ret += np.where(live, info["reward"], 0.0)
        ep_len += live
        done = (terminated | truncated) & live
        for i in np.flatnonzero(done):
            writer.add_scalar("charts/episodic_return", ep_ret[i], global_step)
            writer.add_scalar("charts/episodic_length", ep_len[i], global_step)
        ep_ret[done], ep_len[done], resetting = 0.0, 0, done

        if global_step >= args.distill_decay_period and lam > 0.0:
            lam, _ = distill_lambda_update(lam, None, None, random_return, global_step, args.distill_decay_period)
            lr = lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate)
            print(f"online step {global_step}: distillation decay period over, lambda = 0 for good")

        if global_step > args.learning_starts:
            # One update per train_frequency agent steps in total, whatever num_envs is.
            update_credit += args.num_envs / args.train_frequency
            while update_credit >= 1.0:
                update_credit -= 1.0
                batch = rb.sample(args.batch_size, rng)
                key, k = jax.random.split(key)
                state, metrics, td = train_step(state, batch, lam * args.distill_coef, lr, k)
                priorities = rb.update_priorities(batch.env_idx, batch.row_idx, np.asarray(td))
                updates += 1
                if updates % args.log_frequency == 0:
                    for name, value in jax.device_get(metrics).items():
                        writer.add_scalar(f"losses/{name}", float(value), global_step)
                    writer.add_scalar("losses/priority_mean", float(priorities.mean()), global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - t0)), global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)
                    writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
                    writer.add_scalar("charts/learning_rate", lr, global_step)
            if global_step >= next_target_sync:
                state = state.replace(target_params=state.params)
                next_target_sync += args.target_network_frequency

        if global_step >= next_eval or global_step >= args.total_timesteps:
            next_eval += args.eval_frequency
            final = global_step >= args.total_timesteps
            frames = [] if (final and args.capture_video) else None
            key, k = jax.random.split(key)
            t_eval = time.time()
            returns, _, steps = evaluate(act_student_eval, state.params, eval_envs, args.eval_episodes, args.eval_steps,
                                         args.eval_epsilon, k, desc="student eval", frames=frames)
            eval_seconds += time.time() - t_eval
            student_return = float(np.mean(returns)) if returns else None
            line = summary(f"online step {global_step}: student", returns, steps)
            if student_return is not None:
                writer.add_scalar("eval/episodic_return", student_return, global_step)
                writer.add_scalar("charts/human_normalized_score", tu.human_normalized_score(game, student_return), global_step)
                if teacher_return is not None and teacher_return > random_return:
                    tns = tu.teacher_normalized_score(student_return, teacher_return, random_return)
                    writer.add_scalar("charts/teacher_normalized_score", tns, global_step)
                    line += f", teacher-normalized {tns:.3f}"
            if not final:
                lam, reason = distill_lambda_update(lam, student_return, teacher_return, random_return, global_step, args.distill_decay_period)
                lr = lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate)
                line += f"; lambda = {lam:.3f}" + (f" ({reason})" if reason else "")
            writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
            writer.add_scalar("charts/learning_rate", lr, global_step)
            tqdm.write(("(e) final " if final else "(d) ") + line)
            if frames:
                write_video(frames, f"runs/{run_name}/videos/final-eval.mp4")
    bar.close()
    train_seconds = time.time() - t0 - eval_seconds
    print(f"(d) online: {global_step} agent steps, {updates} updates [{global_step / train_seconds:.1f} agent steps/s, evaluations excluded]")

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        save_atomic(model_path, flax.serialization.to_bytes(state.params))
        save_atomic(f"runs/{run_name}/args.json", json.dumps(dataclasses.asdict(args), indent=2).encode())
        # Expected Q-values (noise-free) of the saved params on a few states, to check a reload against.
        probe_obs = rb.sample(min(8, args.batch_size), rng).obs
        with open(f"runs/{run_name}/q_probe.npz", "wb") as f:
            np.savez(f, obs=probe_obs, q=np.asarray(expected_q(student.apply(state.params, probe_obs), support)))
        print(f"model saved to {model_path}")
    envs.close()
    eval_envs.close()
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:
        main(cli_args)
    except (tu.TeacherError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
