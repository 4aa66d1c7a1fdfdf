"""QDagger with a DQN student on envpool Atari (Agarwal et al., NeurIPS 2022).

Reincarnates a Dopamine DQN_400 teacher into a DQN student:
  (a) evaluate the teacher on Dopamine-protocol envs -> G_T
  (b) collect --teacher-steps transitions by rolling out the teacher
  (c) offline phase: QDagger loss on the teacher data only (lambda = 1)
  (d) online phase: the student acts, learns from its own replay with the
      QDagger loss, and lambda decays with its teacher-normalized score
  (e) final evaluation, saved model
Loss: L = L_TD + lambda * c * KL(softmax(q_T/tau) || softmax(q_S/tau)).

    python qdagger_dqn_atari_jax.py --env-id Breakout-v5
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
    """tau: both teacher and student Q-values are divided by it inside the softmaxes"""
    distill_coef: float = 3.0
    """c: the distillation loss is weighted by lambda * c (paper: 3.0 for a DQN student)"""
    distill_decay_period: int = 1_500_000
    """online agent steps after which lambda is 0 for good (paper: 1.5M for DQN)"""
    td_coef: float = 1.0
    """weight of the TD loss; 0 gives the paper's distillation-only (DAgger-style) baseline"""

    # DQN (Dopamine's Atari protocol)
    network: Literal["nature", "impala"] = "nature"
    """student network: Dopamine's Nature DQN (as the teacher) or the Impala CNN (16, 32, 32)"""
    total_timesteps: int = 2_500_000
    """online agent steps (all envs together); 2.5M = 10 Dopamine iterations"""
    learning_rate: float = 1e-4
    """Adam learning rate while lambda = 1; lr = lambda * learning_rate + (1 - lambda) * end_learning_rate"""
    end_learning_rate: float = 1e-5
    """Adam learning rate once lambda = 0 (fine-tuning)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
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
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
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
    for name in ["teacher_steps", "offline_steps", "learning_starts", "distill_coef", "distill_decay_period", "td_coef"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    if args.offline_steps > 0 and args.teacher_steps < args.batch_size + args.n_step + 4 * args.num_envs:
        raise ConfigError(f"--teacher-steps {args.teacher_steps} is too few to sample batches of {args.batch_size} for --offline-steps; collect more or pass --offline-steps 0")
    if args.buffer_size < max(args.learning_starts, args.batch_size + (args.n_step + 4) * args.num_envs):
        raise ConfigError(f"--buffer-size {args.buffer_size} is smaller than what the online phase needs (--learning-starts {args.learning_starts}, a batch of {args.batch_size}); raise it")
    for name in ["start_e", "end_e", "eval_epsilon", "teacher_epsilon"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(x))
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """Impala CNN (Espeholt et al. 2018) as in the paper's Fig. 1 student."""

    num_actions: int
    channels: tuple[int, ...] = (16, 32, 32)

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = ResidualBlock(c)(x)
            x = ResidualBlock(c)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(self.num_actions)(x)


def make_student(network: str, num_actions: int) -> nn.Module:
    # The Nature student is the teacher's own architecture (Dopamine, SAME padding).
    return tu.DopamineNatureDQN(num_actions) if network == "nature" else ImpalaCNN(num_actions)


# ----------------------------------------------------------------------------
# Replay: every 84x84 frame stored once, stacks rebuilt at sampling
# ----------------------------------------------------------------------------
class Batch(NamedTuple):
    obs: np.ndarray  # (B, 4, 84, 84) uint8
    actions: np.ndarray  # (B,) int32
    returns: np.ndarray  # (B,) float32: sum_{k<L} gamma^k r_{t+k}
    discounts: np.ndarray  # (B,) float32: gamma^L, 0 if the episode terminated within the L steps
    next_obs: np.ndarray  # (B, 4, 84, 84) uint8: the state L steps later
    env_idx: np.ndarray  # (B,) env stream of each sample
    row_idx: np.ndarray  # (B,) its row in that stream
    teacher_q: np.ndarray | None  # (B, A) teacher Q-values of obs, when the buffer caches them


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
    """

    def __init__(self, capacity: int, num_envs: int, n_step: int, gamma: float, stack: int = 4, frame_shape=(84, 84),
                 teacher_q_dim: int = 0):
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

    @property
    def bytes_per_transition(self) -> float:
        arrays = (self.frames, self.actions, self.rewards, self.flags, self.ep_step, self.teacher_q)
        return sum(a.nbytes for a in arrays if a is not None) / (self.num_envs * self.rows)

    def __len__(self) -> int:
        return int(np.minimum(self.count, self.rows).sum())

    def _write(self, envs: np.ndarray, frames, actions, rewards, flags, ep_step, teacher_q=None) -> None:
        r = self.count[envs] % self.rows
        if teacher_q is not None:
            self.teacher_q[envs, r] = teacher_q
        self.frames[envs, r] = frames
        self.actions[envs, r] = actions
        self.rewards[envs, r] = rewards
        self.flags[envs, r] = flags
        self.ep_step[envs, r] = np.minimum(ep_step, 255)
        self.count[envs] += 1

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

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
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
        L = np.concatenate(L_parts)[:batch_size]
        rows = j % self.rows
        return Batch(
            obs=self._stacks(env, rows),
            actions=self.actions[env, rows].astype(np.int32),
            returns=np.concatenate(ret_parts)[:batch_size],
            discounts=np.concatenate(disc_parts)[:batch_size],
            next_obs=self._stacks(env, (j + L) % self.rows),
            env_idx=env,
            row_idx=rows,
            teacher_q=None if self.teacher_q is None else self.teacher_q[env, rows],
        )


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


def nstep_td_target(returns: jax.Array, discounts: jax.Array, next_q_target: jax.Array) -> jax.Array:
    """R_t^(n) + gamma^L (1 - done) max_a Q_target(s_{t+L}, a)."""
    return returns + discounts * jnp.max(next_q_target, axis=-1)


def distillation_loss(teacher_q: jax.Array, student_q: jax.Array, temperature: float) -> jax.Array:
    """mean_batch KL(softmax(q_T / tau) || softmax(q_S / tau)); no gradient reaches the teacher."""
    teacher_q = jax.lax.stop_gradient(teacher_q)
    log_p_teacher = jax.nn.log_softmax(teacher_q / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student_q / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1))


def qdagger_dqn_loss(q: jax.Array, actions: jax.Array, td_target: jax.Array, teacher_q: jax.Array,
                     distill_weight: jax.Array, temperature: float, td_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """L = td_weight * Huber(Q(s, a) - target) + lambda * c * KL; distill_weight is lambda * c."""
    q_taken = jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]
    td_loss = jnp.mean(optax.huber_loss(q_taken, jax.lax.stop_gradient(td_target), delta=1.0))
    # With lambda * c = 0 the teacher is not queried (teacher_q is a placeholder): log 0.
    distill = jnp.where(distill_weight > 0, distillation_loss(teacher_q, q, temperature), 0.0)
    loss = td_weight * td_loss + distill_weight * distill
    return loss, {"td_loss": td_loss, "distill_loss": distill, "loss": loss, "q_values": jnp.mean(q_taken)}


class QState(TrainState):
    target_params: flax.core.FrozenDict


def make_update(student: nn.Module, temperature: float, td_weight: float = 1.0):
    @jax.jit
    def update(state: QState, obs, actions, returns, discounts, next_obs, teacher_q, distill_weight, learning_rate):
        next_q_target = student.apply(state.target_params, next_obs)
        td_target = nstep_td_target(returns, discounts, next_q_target)

        def loss_fn(params):
            q = student.apply(params, obs)
            return qdagger_dqn_loss(q, actions, td_target, teacher_q, distill_weight, temperature, td_weight)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        state.opt_state.hyperparams["learning_rate"] = learning_rate
        return state.apply_gradients(grads=grads), metrics

    return update


def make_act(network: nn.Module):
    """Epsilon-greedy actions, the Q-values they came from, and the next PRNG key
    (split inside the jit: a separate split per env step costs as much as a third of the forward pass)."""

    @jax.jit
    def act(params, obs, key, epsilon):
        q = network.apply(params, obs)
        greedy = jnp.argmax(q, axis=-1)
        key, k1, k2 = jax.random.split(key, 3)
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

    student = make_student(args.network, num_actions)
    student_params = student.init(student_key, np.zeros((1, 4, 84, 84), np.uint8))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=args.learning_rate, eps=args.adam_eps)
    state = QState.create(apply_fn=student.apply, params=student_params, target_params=student_params, tx=optimizer)
    update = make_update(student, args.temperature, args.td_coef)
    act_student, act_teacher = make_act(student), make_act(teacher)
    teacher_q_values = jax.jit(teacher.apply)
    no_teacher_q = np.zeros((args.batch_size, num_actions), np.float32)

    def train_step(state, batch: Batch, distill_weight: float, lr: float):
        # Teacher data carries the teacher's Q-values; online, the teacher is queried on the sampled states
        # (only while its loss counts: lambda * c > 0).
        if batch.teacher_q is not None:
            teacher_q = batch.teacher_q
        else:
            teacher_q = teacher_q_values(teacher_params, batch.obs) if distill_weight > 0 else no_teacher_q
        return update(state, batch.obs, batch.actions, batch.returns, batch.discounts, batch.next_obs, teacher_q,
                      jnp.float32(distill_weight), jnp.float32(lr))

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

    # (b) Teacher roll-out -> teacher replay data
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

    # (c) Offline phase: teacher data only, lambda = 1, lr = learning_rate
    lam = 1.0
    offline_target_every = max(args.target_network_frequency // args.train_frequency, 1)
    t0 = time.time()
    for step in tqdm(range(1, args.offline_steps + 1), desc="offline", file=sys.stderr, mininterval=2.0):
        batch = teacher_rb.sample(args.batch_size, rng)
        state, metrics = train_step(state, batch, lam * args.distill_coef, args.learning_rate)
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

    # (d) Online phase
    rb = FrameReplayBuffer(args.buffer_size, args.num_envs, args.n_step, args.gamma)
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
        epsilon = linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, global_step)
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
                state, metrics = train_step(state, rb.sample(args.batch_size, rng), lam * args.distill_coef, lr)
                updates += 1
                if updates % args.log_frequency == 0:
                    for name, value in jax.device_get(metrics).items():
                        writer.add_scalar(f"losses/{name}", float(value), global_step)
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
            returns, _, steps = evaluate(act_student, state.params, eval_envs, args.eval_episodes, args.eval_steps,
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
        # Q-values of the saved params on a few states, to check a reload against.
        probe_obs = rb.sample(min(8, args.batch_size), rng).obs
        with open(f"runs/{run_name}/q_probe.npz", "wb") as f:
            np.savez(f, obs=probe_obs, q=np.asarray(student.apply(state.params, probe_obs)))
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
