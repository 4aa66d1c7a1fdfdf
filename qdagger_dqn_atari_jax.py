"""QDagger with a DQN student on envpool Atari (Agarwal et al., "Reincarnating RL", NeurIPS 2022).

Reincarnates a trained teacher (by default the Dopamine DQN_400 agent of the game)
into a DQN student:
  (a) evaluate the teacher on Dopamine-protocol envs -> G_T
  (b) teacher data: roll out the teacher and/or load its own Dopamine replay
  (c) offline phase: QDagger loss on the teacher data only (lambda = 1)
  (d) online phase: the student acts, learns from its own replay with the QDagger
      loss, and lambda decays with its teacher-normalized score
  (e) final evaluation, saved model
Loss: L = L_TD + lambda * c * KL(softmax(q_T/tau) || softmax(q_S/tau)).

Defaults follow google-research/reincarnating_rl at 3eb419c
(reincarnating_rl/configs/distillation_dqn.gin, distillation_dqn_agent.py,
run_experiment.py) and Dopamine 4.0.6; README.md "Fidelity" lists every deviation.

Speed: the replay lives in JAX arrays on the accelerator; adding a vector step,
sampling and the updates are pure jitted functions (buffers donated, updated in
place); the offline phase fuses --updates-per-call updates in one `lax.scan`;
online, the environment steps while the device learns.

    python qdagger_dqn_atari_jax.py --env-id Breakout-v5
"""

from __future__ import annotations

import dataclasses
import functools
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
from flax.training.train_state import TrainState
from tqdm import tqdm

import teacher_utils as tu


@dataclasses.dataclass
class Args:
    """QDagger (Reincarnating RL, Agarwal et al. 2022) with a DQN student on envpool Atari: reuse a trained
    teacher's weights and data so the student learns faster than from scratch. Phases: (a) teacher evaluation,
    (b) teacher data, (c) offline distillation, (d) online QDagger with a decaying distillation weight,
    (e) final evaluation. Defaults reproduce google-research/reincarnating_rl@3eb419c
    (configs/distillation_dqn.gin) and Dopamine 4.0.6; README "Fidelity" lists every deviation and its flag.

    Example: python qdagger_dqn_atari_jax.py --env-id Pong-v5 --teacher-checkpoint /data/DQN_400/Pong/1

    Environment variables: REINCARNATE_CACHE (download cache, default ~/.cache/reincarnate),
    REINCARNATE_BUCKET_URL (a mirror of the gs://rl_checkpoints bucket)."""

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
    """whether to save the student's params (flax msgpack) and a Q-value probe to `runs/{run_name}`"""
    run_name: str | None = None
    """the run folder's name under runs/ (default {env_id}__{exp_name}__{method}__{seed}__{start time}-{random suffix}); with --resume, the run to continue (its name or its folder)"""
    resume: bool = False
    """continue the run --run-name from its latest complete checkpoint (flags that change the algorithm must match)"""
    checkpoint_frequency: int | None = None
    """checkpoint every this many agent steps online (and roll-out), updates offline; default one Dopamine iteration (--eval-frequency / --offline-eval-frequency); 0 disables checkpoints"""
    checkpoint_minutes: float = 30.0
    """also checkpoint when this many minutes of wall time have passed since the last checkpoint (0: only by --checkpoint-frequency)"""
    keep_checkpoints: int = 1
    """complete checkpoints kept in runs/{run_name}/checkpoints (the oldest is deleted only after a newer one is complete)"""

    # Method (README "Methods"): sets what differs from QDagger; flags passed explicitly still win
    method: Literal["qdagger", "tabula-rasa", "kickstarting", "pretrain", "dagger", "ql-dagger", "jsrl", "dqfd", "rehearsal", "finetune"] = "qdagger"
    """qdagger: offline distillation then online QDagger (distillation_dqn.gin). tabula-rasa: no teacher, the student's own Dopamine config (dqn.gin: n = 1, MSE, lr 6.25e-5, epsilon 1 for 20k steps then to 0.01 over 250k). kickstarting: no offline phase, online distillation with the lambda decay. pretrain: offline TD + CQL on the teacher data (n = 1), then online TD with a fresh Adam at lr 1e-5 (pretrained_dqn.gin). dagger: distillation only, lambda = 1 and lr 1e-4 constant; ql-dagger: TD + c * distillation, lambda = 1 constant (distillation_rainbow_agent.py MethodType). jsrl: a guide policy (the teacher) in the student's episodes, its share decaying over 2.5M steps (lols_dqn.gin). dqfd: TD + a large-margin loss toward the teacher's greedy action, offline then online decayed like lambda (margin_dqn.gin). rehearsal: qdagger with --rehearsal-ratio of every online batch from the teacher data. finetune: the student starts from the teacher's own weights and continues with TD at lr 1e-5 (reloaded_dqn.gin)"""

    # Environment
    env_id: str = "Breakout-v5"
    """the envpool Atari id; the teacher is the DQN_400 agent of its game"""
    num_envs: int = 1
    """parallel envpool envs for the teacher roll-out and the student (Dopamine: 1); the replay ratio stays one update per `train_frequency` agent steps in total"""
    eval_num_envs: int = 8
    """parallel envs of every evaluation; every episode started before the budget is played to its end and counted, so the protocol is Dopamine's (1 env is its exact sequence)"""
    max_episode_steps: int = 27_000
    """agent steps after which an episode is truncated (Dopamine: 27,000 = 108,000 frames)"""

    # Teacher
    teacher_checkpoint: str | None = None
    """local run folder, checkpoint file or gs:// address of the teacher; default gs://rl_checkpoints/DQN_400/<Game>/1"""
    teacher_iteration: int | None = None
    """Dopamine iteration of the teacher checkpoint; default the latest complete one"""
    teacher_data: Literal["rollout", "dopamine-replay", "both"] = "rollout"
    """offline data: `rollout` rolls out the teacher with envpool (`teacher_steps` transitions); `dopamine-replay` loads the teacher's own last 1M-transition Dopamine replay (the official code's main setting: use it to reproduce the paper's numbers); `both` appends roll-outs to that replay"""
    teacher_steps: int = 1_000_000
    """transitions collected by rolling out the teacher (rollout/both)"""
    teacher_epsilon: float = 0.01
    """exploration of the teacher roll-out (the teacher's own late-training epsilon)"""

    # QDagger
    offline_steps: int = 1_000_000
    """gradient steps on teacher data before the student acts (reference: 10 x 100,000)"""
    temperature: float = 0.1
    """tau: both teacher and student Q-values are divided by it inside the softmaxes"""
    distill_coef: float = 3.0
    """c: the distillation loss is weighted by lambda * c (reference: 3.0 for a DQN student)"""
    distill_decay_period: int = 1_500_000
    """lambda is 0 for good at the first evaluation after more than this many online agent steps (reference: 1.5M)"""
    td_coef: float = 1.0
    """weight of the TD loss; 0 gives the paper's distillation-only (DAgger) baseline"""
    clip_lambda: bool = False
    """clip lambda = 1 - teacher_normalized_score at 1 (the reference does not: a student below the random score gets lambda > 1, so a larger distillation weight and learning rate)"""
    decay_lambda: bool = True
    """online, lambda follows the student's teacher-normalized score (False: lambda = 1 throughout, as dagger and ql-dagger)"""
    online_learning_rate: float | None = None
    """a constant online Adam learning rate instead of lr = lambda * learning_rate + (1 - lambda) * end_learning_rate (set by tabula-rasa, pretrain, jsrl, dqfd, finetune)"""
    reset_optimizer_online: bool = False
    """start the online phase with a fresh Adam state (pretrain)"""
    init_from_teacher: bool = False
    """initialise the student with the teacher's weights; the teacher must have the student's architecture (finetune)"""
    cql_coef: float = 0.0
    """offline only: weight of the CQL term mean(logsumexp(Q / cql_temperature) - Q(s, a) / cql_temperature) (pretrain: 1.0)"""
    cql_temperature: float = 0.1
    """temperature of the CQL term (pretrained_dqn.gin: 0.1)"""
    margin_coef: float = 0.0
    """weight of the large-margin loss toward the teacher's greedy action, times lambda (dqfd: 1.0)"""
    margin: float = 1.0
    """the margin of the large-margin loss (margin_dqn.gin: 1.0)"""
    rehearsal_ratio: float = 0.0
    """share of every online batch drawn from the teacher data, each sample independently (rehearsal: 0.25)"""
    jsrl_max_roll_in_steps: int = 100
    """jsrl: each episode starts with h ~ U{1..this} steps of the student (or of the teacher with --jsrl-roll-in-guide), then the teacher acts with the decaying probability"""
    jsrl_roll_in_decay: float = 1.0
    """jsrl: the maximum roll-in is multiplied by this after every evaluation (lols_dqn_agent.py default 1.0)"""
    jsrl_guide_prob: float = 1.0
    """jsrl: the teacher's share of actions after the roll-in, decaying linearly to 0 over --jsrl-decay-period agent steps"""
    jsrl_decay_period: int = 2_500_000
    """jsrl: agent steps over which the teacher's share decays to 0"""
    jsrl_roll_in_guide: bool = False
    """jsrl: the teacher (not the student) plays the roll-in steps (lols_dqn.gin: False)"""

    # DQN (Dopamine's Atari protocol)
    network: Literal["nature", "impala"] = "nature"
    """student network: Dopamine's Nature DQN (as the teacher, SAME padding, xavier_uniform) or the Impala CNN (16, 32, 32)"""
    total_timesteps: int = 2_500_000
    """online agent steps (all envs together); 2.5M = 10 Dopamine iterations (reference)"""
    learning_rate: float = 1e-4
    """Adam learning rate while lambda = 1; lr = lambda * learning_rate + (1 - lambda) * end_learning_rate"""
    end_learning_rate: float = 1e-5
    """Adam learning rate once lambda = 0 (fine-tuning)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    buffer_size: int = 1_000_000
    """the student's online replay capacity (transitions); the teacher data has its own buffer"""
    gamma: float = 0.99
    """the discount factor gamma"""
    n_step: int = 3
    """n-step returns (never across an episode end; bootstrapped through truncation, not termination)"""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss on Q(s, a) (reference: huber; Dopamine's dqn.gin, the tabula-rasa config: mse)"""
    target_network_frequency: int = 8_000
    """agent steps between target syncs (offline: every target_network_frequency / train_frequency updates)"""
    batch_size: int = 32
    """the batch size sampled from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    epsilon_decay_steps: int = 50_000
    """epsilon decays linearly from start_e to end_e over this many training steps, counting the offline updates as the reference does: after an offline phase of >= epsilon_decay_steps updates epsilon is end_e from the first online step; without one it decays over the first online agent steps (no warm-up)"""
    epsilon_warmup_steps: int = 0
    """online agent steps at start_e before epsilon starts to decay (Dopamine's linearly_decaying_epsilon warm-up; tabula-rasa: 20,000)"""
    learning_starts: int = 20_000
    """online agent steps collected before the student starts learning"""
    train_frequency: int = 4
    """agent steps per gradient update (in total over all envs)"""

    # Evaluation
    eval_frequency: int = 250_000
    """online agent steps between evaluations (one Dopamine iteration); lambda is recomputed after each"""
    eval_steps: int = 125_000
    """evaluations play whole episodes until at least this many agent steps have passed, finish the episodes in progress, and average all of them (Dopamine's protocol)"""
    eval_episodes: int | None = None
    """optional cap: no new evaluation episode starts once this many have started (default none, as Dopamine)"""
    eval_epsilon: float = 0.001
    """epsilon of the greedy policy during evaluations"""
    offline_eval_frequency: int = 100_000
    """offline updates between student evaluations during the offline phase (logged as offline/eval_return; no effect on training); 0 disables"""
    log_frequency: int = 100
    """gradient updates between loss logs"""

    # Speed (no effect on the results)
    updates_per_call: int = 100
    """offline updates fused in one jitted call (lax.scan); the results equal one update per call"""
    replay_on_host: bool = False
    """keep the replay buffers in host memory (the same jitted functions placed on the CPU device) when they do not fit the accelerator"""
    overlap_env: bool = True
    """step the environments while the device learns: actions then use the params from before the previous vector step's updates (a one-step policy lag); --no-overlap-env is strictly sequential"""


class ConfigError(ValueError):
    """A flag value that cannot work; the message is one line."""


def check_args(args: Args) -> None:
    positive = ["num_envs", "eval_num_envs", "max_episode_steps", "total_timesteps", "buffer_size", "batch_size", "n_step",
                "target_network_frequency", "train_frequency", "eval_frequency", "eval_steps", "log_frequency",
                "epsilon_decay_steps", "updates_per_call"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in ["teacher_steps", "offline_steps", "learning_starts", "distill_coef", "distill_decay_period", "td_coef",
                 "offline_eval_frequency"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.eval_episodes is not None and args.eval_episodes <= 0:
        raise ConfigError(f"--eval-episodes must be > 0 (got {args.eval_episodes})")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    if args.offline_steps > 0 and args.teacher_data != "dopamine-replay" and args.teacher_steps < args.batch_size + (args.n_step + 4) * args.num_envs:
        raise ConfigError(f"--teacher-steps {args.teacher_steps} is too few to sample batches of {args.batch_size} for --offline-steps; collect more or pass --offline-steps 0")
    if args.buffer_size < max(args.learning_starts, args.batch_size + (args.n_step + 4) * args.num_envs):
        raise ConfigError(f"--buffer-size {args.buffer_size} is smaller than what the online phase needs (--learning-starts {args.learning_starts}, a batch of {args.batch_size}); raise it")
    for name in ["start_e", "end_e", "eval_epsilon", "teacher_epsilon"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")


# ----------------------------------------------------------------------------
# Networks (Dopamine's initialisers: xavier_uniform for the Nature network, the
# Impala stage convolutions and the dense layers; flax's default for the
# residual convolutions, as reincarnating_rl/impala_networks.py)
# ----------------------------------------------------------------------------
xavier = nn.initializers.xavier_uniform()


class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(x))
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """Impala CNN (Espeholt et al. 2018) as the reference's ImpalaNetworkWithRepresentations."""

    num_actions: int
    channels: tuple[int, ...] = (16, 32, 32)

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME", kernel_init=xavier)(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = ResidualBlock(c)(x)
            x = ResidualBlock(c)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512, kernel_init=xavier)(x))
        return nn.Dense(self.num_actions, kernel_init=xavier)(x)


def make_student(network: str, num_actions: int) -> nn.Module:
    # The Nature student is the teacher's own architecture (Dopamine's JAX DQN network).
    return tu.DopamineNatureDQN(num_actions) if network == "nature" else ImpalaCNN(num_actions)


# ----------------------------------------------------------------------------
# Replay on the device: every 84x84 frame stored once, stacks rebuilt at sampling
# ----------------------------------------------------------------------------
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


class Batch(NamedTuple):
    obs: jax.Array  # (B, 4, 84, 84) uint8
    actions: jax.Array  # (B,) int32
    returns: jax.Array  # (B,) sum_{k<L} gamma^k r_{t+k}
    discounts: jax.Array  # (B,) gamma^L, 0 if the episode terminated within the L steps
    next_obs: jax.Array  # (B, 4, 84, 84) the state L steps later
    teacher_q: jax.Array  # (B, A) cached teacher Q-values of obs, or (B, 0)
    index: jax.Array  # (B,) flat row of each sample


def replay_bytes(lengths: list[int], teacher_q_dim: int) -> int:
    rows = sum(lengths)
    return rows * (84 * 84 + 1 + 4 + 1 + 1 + 4 * teacher_q_dim)


def make_replay(lengths: list[int], teacher_q_dim: int = 0, device=None) -> Replay:
    """An empty frame store with one stream per entry of `lengths`, allocated on `device`."""
    rows = int(sum(lengths))
    z = functools.partial(jnp.zeros, device=device)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    return Replay(
        frames=z((rows, 84, 84), jnp.uint8), actions=z((rows,), jnp.uint8), rewards=z((rows,), jnp.float32),
        flags=z((rows,), jnp.uint8), ep_step=z((rows,), jnp.uint8), teacher_q=z((rows, teacher_q_dim), jnp.float32),
        base=jax.device_put(base, device), length=jax.device_put(np.asarray(lengths, np.int32), device),
        count=z((len(lengths),), jnp.int32), t=z((len(lengths),), jnp.int32), ended=z((len(lengths),), bool))


def _row(rb: Replay, s, j):
    return rb.base[s] + jnp.mod(j, rb.length[s])


def replay_add(rb: Replay, first_stream: int, frames, actions, rewards, terminated, truncated, next_frames, teacher_q=None) -> Replay:
    """One vector step of streams first_stream.. : newest frames of s_t, a_t, clipped r_t, flags, newest frames of
    s_{t+1} (and the teacher's Q-values of s_t). envpool auto-resets: a step right after an episode end is the
    reset (its action ignored) and is not stored."""
    rows = rb.frames.shape[0]
    s = first_stream + jnp.arange(frames.shape[0])
    live = ~rb.ended[s]
    ended = (terminated | truncated) & live
    flags = jnp.where(terminated, TERMINATED, 0) | jnp.where(truncated, TRUNCATED, 0)
    t = rb.t[s]

    def write(rb, where, frames, actions, rewards, flags, ep_step, teacher_q):
        r = jnp.where(where, _row(rb, s, rb.count[s]), rows)  # out of range = dropped
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
    return rb._replace(t=rb.t.at[s].set(jnp.where(live, t + 1, 0)), ended=rb.ended.at[s].set(ended))


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
    """A uniform batch of valid transitions (rejection sampling over the stored rows, `batch_size` candidates per
    round). Returns (batch, ok); ok is False only if `max_rounds` rounds found too few valid rows."""
    stored = jnp.minimum(rb.count, rb.length)
    cum = jnp.cumsum(stored)
    first = jnp.maximum(rb.count - rb.length, 0)

    def round_(carry):
        key, out_s, out_j, filled, rounds = carry
        key, k = jax.random.split(key)
        p = jax.random.randint(k, (batch_size,), 0, jnp.maximum(cum[-1], 1))
        s = jnp.searchsorted(cum, p, side="right").astype(jnp.int32)
        j = first[s] + p - (cum[s] - stored[s])
        ok = replay_valid(rb, s, j, n_step, gamma)[0]
        pos = filled + jnp.cumsum(ok) - 1
        dest = jnp.where(ok & (pos < batch_size), pos, batch_size)
        return (key, out_s.at[dest].set(s, mode="drop"), out_j.at[dest].set(j, mode="drop"),
                jnp.minimum(filled + ok.sum(), batch_size), rounds + 1)

    zeros = jnp.zeros(batch_size, jnp.int32)
    _, s, j, filled, _ = jax.lax.while_loop(lambda c: (c[3] < batch_size) & (c[4] < max_rounds), round_,
                                            (key, zeros, zeros, jnp.int32(0), jnp.int32(0)))
    _, returns, discounts, L = replay_valid(rb, s, j, n_step, gamma)
    row = _row(rb, s, j)
    batch = Batch(obs=replay_stacks(rb, s, j), actions=rb.actions[row].astype(jnp.int32), returns=returns, discounts=discounts,
                  next_obs=replay_stacks(rb, s, j + L), teacher_q=rb.teacher_q[row], index=row)
    return batch, filled == batch_size


def replay_fill_from_dopamine(rb: Replay, replay: "tu.DopamineReplay", stream: int, chunk: int = 65_536) -> Replay:
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


# ----------------------------------------------------------------------------
# The math (pure functions, unit-tested)
# ----------------------------------------------------------------------------
def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Linear from start to end over duration steps, then end."""
    return end + (start - end) * max(1.0 - t / duration, 0.0)


def distill_lambda_update(lam: float, student_return: float | None, teacher_return: float | None, random_return: float,
                          online_steps: int, decay_period: int, clip: bool = False) -> tuple[float, str]:
    """lambda after an evaluation, as the reference's record_score: max(1 - teacher_normalized_score, 0) (capped
    at 1 with clip=True); 0 for good once more than decay_period online steps have passed or once it reached 0.
    Returns (lambda, reason) where reason explains a kept value."""
    if lam <= 0.0:
        return 0.0, "lambda reached 0 and stays there"
    if online_steps > decay_period:
        return 0.0, "decay period over"
    if student_return is None:
        return lam, "the student evaluation finished no episode: lambda keeps its value"
    if teacher_return is None:
        return lam, "the teacher evaluation finished no episode: lambda keeps its value"
    if teacher_return <= random_return:
        return lam, f"teacher score {teacher_return:g} <= random score {random_return:g}: lambda keeps its value"
    lam = max(1.0 - tu.teacher_normalized_score(student_return, teacher_return, random_return), 0.0)
    return (min(lam, 1.0) if clip else lam), ""


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


class Coefs(NamedTuple):
    """Per-phase loss weights and learning rate: traced values, so changing them never recompiles."""

    td: jax.Array
    distill: jax.Array  # lambda * c
    lr: jax.Array


def coefs(td: float, distill: float, lr: float) -> Coefs:
    return Coefs(jnp.float32(td), jnp.float32(distill), jnp.float32(lr))


def sync_target(state: QState, now) -> QState:
    return state.replace(target_params=jax.tree.map(lambda t, p: jnp.where(now, p, t), state.target_params, state.params))


def make_update(student: nn.Module, temperature: float):
    """One QDagger gradient step on a batch: (state, batch, teacher_q, coefs) -> (state, metrics)."""

    def update(state: QState, batch: Batch, teacher_q, c: Coefs):
        next_q_target = student.apply(state.target_params, batch.next_obs)
        td_target = nstep_td_target(batch.returns, batch.discounts, next_q_target)

        def loss_fn(params):
            q = student.apply(params, batch.obs)
            return qdagger_dqn_loss(q, batch.actions, td_target, teacher_q, c.distill, temperature, c.td)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        state.opt_state.hyperparams["learning_rate"] = c.lr
        return state.apply_gradients(grads=grads), metrics

    return update


def make_act(network: nn.Module):
    """Epsilon-greedy actions, the Q-values they came from, and the next PRNG key
    (split inside the jit: one dispatch per env step)."""

    @jax.jit
    def act(params, obs, key, epsilon):
        q = network.apply(params, obs)
        greedy = jnp.argmax(q, axis=-1)
        key, k1, k2 = jax.random.split(key, 3)
        explore = jax.random.uniform(k1, greedy.shape) < epsilon
        rand = jax.random.randint(k2, greedy.shape, 0, q.shape[-1])
        return jnp.where(explore, rand, greedy), q, key

    return act


class Learner(NamedTuple):
    """The jitted hot paths of the offline and online phases, built from the pure functions above."""

    offline: callable  # (state, teacher_rb, key, step0, n, coefs) -> (state, key, metrics (K, ...))
    online: callable  # (state, rb, key, transition..., n_updates, sync, coefs, teacher_params) -> (state, rb, key, metrics)
    add: callable  # (rb, first_stream, transition...) -> rb
    sample: callable  # (rb, key) -> (batch, ok)
    update: callable  # (state, batch, teacher_q, coefs) -> (state, metrics)


def make_learner(args: Args, student: nn.Module, teacher: nn.Module | None, num_actions: int) -> Learner:
    update = make_update(student, args.temperature)
    sample = functools.partial(replay_sample, batch_size=args.batch_size, n_step=args.n_step, gamma=args.gamma)
    offline_target_every = max(args.target_network_frequency // args.train_frequency, 1)
    zero_metrics = {k: jnp.float32(0) for k in ("td_loss", "distill_loss", "loss", "q_values")} | {"sample_ok": jnp.bool_(True)}

    def teacher_q_of(teacher_params, obs, distill):
        # The teacher runs only while its loss counts (lambda * c > 0).
        if teacher is None:
            return jnp.zeros((obs.shape[0], num_actions), jnp.float32)
        return jax.lax.cond(distill > 0, lambda: teacher.apply(teacher_params, obs),
                            lambda: jnp.zeros((obs.shape[0], num_actions), jnp.float32))

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=4)
    def offline(state, trb, key, step0, k, n, c: Coefs):
        """Up to k (static) fused updates on the teacher data; the first n run, the rest are skipped."""

        def body(carry, i):
            def step(carry):
                state, key = carry
                key, sk = jax.random.split(key)
                batch, ok = sample(trb, sk)
                state, m = update(state, batch, batch.teacher_q, c)
                state = sync_target(state, (step0 + i + 1) % offline_target_every == 0)
                return (state, key), m | {"sample_ok": ok}

            return jax.lax.cond(i < n, step, lambda carry: (carry, zero_metrics), carry)

        (state, key), metrics = jax.lax.scan(body, (state, key), jnp.arange(k))
        return state, key, metrics

    def online_step(state, rb, key, frames, actions, rewards, terminated, truncated, next_frames, n_updates, sync, c: Coefs, teacher_params):
        """Store one vector step, then run the n_updates (traced) updates due after it and the target sync."""
        rb = replay_add(rb, 0, frames, actions, rewards, terminated, truncated, next_frames)

        def one(_, carry):
            state, key, _ = carry
            key, sk = jax.random.split(key)
            batch, ok = sample(rb, sk)
            state, m = update(state, batch, teacher_q_of(teacher_params, batch.obs, c.distill), c)
            return state, key, m | {"sample_ok": ok}

        state, key, metrics = jax.lax.fori_loop(0, n_updates, one, (state, key, zero_metrics))
        return sync_target(state, sync), rb, key, metrics

    return Learner(offline=offline, online=jax.jit(online_step, donate_argnums=(0, 1)),
                   add=jax.jit(replay_add, donate_argnums=0, static_argnums=1), sample=jax.jit(sample),
                   update=jax.jit(lambda s, b, tp, c: update(s, b, teacher_q_of(tp, b.obs, c.distill), c)))


def learn_on_host_replay(learner: Learner, state, rb, key, transition, n_updates: int, sync: bool, c: Coefs, teacher_params, compute_device):
    """`Learner.online` split for --replay-on-host: the buffer functions run where the buffer lives (the CPU), the
    update on the accelerator; the same pure functions and PRNG keys, so the results are the same."""
    rb = learner.add(rb, 0, *transition)
    metrics = None
    for _ in range(n_updates):
        key, sk = jax.random.split(key)
        batch, ok = learner.sample(rb, sk)
        state, metrics = learner.update(state, jax.device_put(batch, compute_device), teacher_params, c)
        metrics = metrics | {"sample_ok": ok}
    return sync_target(state, jnp.bool_(sync)), rb, key, metrics


# ----------------------------------------------------------------------------
# Evaluation: Dopamine's protocol
# ----------------------------------------------------------------------------
def evaluate(act, params, envs: tu.DopamineAtariEnvs, max_steps: int, epsilon: float, key, desc: str = "eval",
             frames: list | None = None, max_episodes: int | None = None) -> tuple[list[float], list[int], int]:
    """Raw-score returns and lengths of whole episodes, and the agent steps they took.

    Dopamine's `_run_one_phase`: episodes are played whole until at least
    `max_steps` agent steps have passed; the episodes in progress then finish
    and every episode counts, however long. With several envs, an env starts a
    new episode only while the budget lasts (and fewer than `max_episodes` have
    started). `frames` (if a list) collects env 0's observations of its first episode.
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
        while active.any():
            actions, _, key = act(params, obs, key, epsilon)
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


def save_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def teacher_q_for_rows(teacher: nn.Module, teacher_params, rb: Replay, stream: int, batch: int = 1024) -> Replay:
    """The teacher's Q-values of every row's state of one stream, computed once in batches and cached in the buffer."""

    @functools.partial(jax.jit, donate_argnums=0)
    def fill(rb, start):
        j = start + jnp.arange(batch)
        q = teacher.apply(teacher_params, replay_stacks(rb, jnp.full(batch, stream), j))
        r = jnp.where(j < rb.length[stream], _row(rb, jnp.full(batch, stream), j), rb.frames.shape[0])
        return rb._replace(teacher_q=rb.teacher_q.at[r].set(q, mode="drop"))

    length = int(rb.length[stream])
    for start in tqdm(range(0, length, batch), desc="teacher Q of the replay", file=sys.stderr, mininterval=2.0):
        rb = fill(rb, start)
    return rb


def memory_check(need: int, device, what: str) -> None:
    """One clear error before any phase if the buffers cannot fit where they would live."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where, fix = f"{device.device_kind} free memory", "pass a smaller --buffer-size/--teacher-steps or --replay-on-host"
    else:
        free = tu.available_host_memory()
        where, fix = "available host memory", "pass a smaller --buffer-size/--teacher-steps (each 1M transitions is 6.6 GiB)"
    if need > free:
        raise ConfigError(f"{what} need {need / 2**30:.1f} GiB but the {where} is {free / 2**30:.1f} GiB; {fix}")


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
    key = jax.random.PRNGKey(args.seed)
    key, student_key, offline_key, online_key = jax.random.split(key, 4)
    compute_device = jax.devices()[0]
    replay_device = jax.devices("cpu")[0] if args.replay_on_host else compute_device

    env_kwargs = dict(max_episode_steps=args.max_episode_steps)
    envs = tu.make_teacher_envs(args.env_id, args.num_envs, seed=args.seed, **env_kwargs)
    eval_envs = tu.make_teacher_envs(args.env_id, args.eval_num_envs, seed=args.seed + 10_000, **env_kwargs)
    num_actions = envs.num_actions

    # Teacher: raises a one-line TeacherError if unreachable, corrupt or of another game.
    source = args.teacher_checkpoint or f"gs://rl_checkpoints/DQN_400/{game}/1"
    teacher_ckpt = tu.load_teacher(source, num_actions=num_actions, iteration=args.teacher_iteration)
    teacher = tu.DopamineNatureDQN(num_actions)
    teacher_params = jax.device_put(teacher_ckpt.params, compute_device)
    print(f"teacher: {teacher_ckpt.kind} checkpoint {teacher_ckpt.path} (iteration {teacher_ckpt.iteration}, {num_actions} actions)")

    # Replay sizes are checked before any work is spent.
    offline = args.offline_steps > 0
    dopamine = offline and args.teacher_data in ("dopamine-replay", "both")
    rollout_steps = args.teacher_steps if offline and args.teacher_data in ("rollout", "both") else 0
    rollout_rows = -(-(rollout_steps + 8 * args.num_envs) // args.num_envs) if rollout_steps else 0
    dopamine_replay = None
    if dopamine:
        dopamine_replay = tu.load_dopamine_replay(source, iteration=teacher_ckpt.iteration,
                                                  update_horizon=args.n_step, gamma=args.gamma)
        print(f"teacher replay: {dopamine_replay.path} (iteration {dopamine_replay.iteration}, {dopamine_replay.capacity} rows, "
              f"{len(dopamine_replay.valid_indices())} valid transitions for n = {args.n_step})")
        if dopamine_replay.actions.max(initial=0) >= num_actions or dopamine_replay.actions.min(initial=0) < 0:
            raise ConfigError(f"the teacher replay in {dopamine_replay.path} has actions up to {dopamine_replay.actions.max()} but {args.env_id} "
                              f"has {num_actions}: it belongs to another game; pass that game's --env-id or --teacher-data rollout")
    teacher_lengths = ([dopamine_replay.capacity] if dopamine else []) + [rollout_rows] * (args.num_envs if rollout_rows else 0)
    online_lengths = [-(-args.buffer_size // args.num_envs)] * args.num_envs
    memory_check(max(replay_bytes(teacher_lengths, num_actions), replay_bytes(online_lengths, 0)), replay_device, "the replay buffers")

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}", flush_secs=30)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    save_atomic(f"runs/{run_name}/args.json", json.dumps(dataclasses.asdict(args), indent=2).encode())
    print(f"run folder: runs/{run_name}")

    student = make_student(args.network, num_actions)
    student_params = student.init(student_key, np.zeros((1, 4, 84, 84), np.uint8))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(args.learning_rate, np.float32),
                                                     eps=args.adam_eps)  # a strong float32: a weak type would recompile the jitted steps once
    # A separate target copy: the jitted steps donate the state, and one buffer cannot be donated twice.
    state = jax.device_put(QState.create(apply_fn=student.apply, params=student_params, target_params=jax.tree.map(jnp.copy, student_params),
                                         tx=optimizer), compute_device)
    learner = make_learner(args, student, teacher, num_actions)
    act_student, act_teacher = make_act(student), make_act(teacher)

    def run_eval(params, desc, frames=None):
        nonlocal key
        key, k = jax.random.split(key)
        return evaluate(act_student, params, eval_envs, args.eval_steps, args.eval_epsilon, k, desc=desc, frames=frames,
                        max_episodes=args.eval_episodes)

    # (a) Teacher evaluation -> G_T
    t0 = time.time()
    key, k = jax.random.split(key)
    returns, lengths, steps = evaluate(act_teacher, teacher_params, eval_envs, args.eval_steps, args.eval_epsilon, k,
                                       desc="teacher eval", max_episodes=args.eval_episodes)
    teacher_return = float(np.mean(returns)) if returns else None
    for i, (r, l) in enumerate(zip(returns, lengths)):
        writer.add_scalar("teacher/episodic_return", r, i)
        writer.add_scalar("teacher/episodic_length", l, i)
    if teacher_return is not None:
        writer.add_scalar("teacher/mean_return", teacher_return, 0)
    print(f"(a) {summary('teacher', returns, steps)}; random score {random_return:g} [{steps / (time.time() - t0):.0f} agent steps/s]")

    def teacher_normalized(student_return):
        if student_return is None or teacher_return is None or teacher_return <= random_return:
            return None
        return tu.teacher_normalized_score(student_return, teacher_return, random_return)

    # (b) Teacher data: the teacher's own Dopamine replay and/or roll-outs, with the teacher's Q-values cached
    t0 = time.time()
    teacher_rb = None
    if offline:
        teacher_rb = make_replay(teacher_lengths, num_actions, replay_device)
        if dopamine:
            teacher_rb = replay_fill_from_dopamine(teacher_rb, dopamine_replay, 0)
            teacher_rb = teacher_q_for_rows(teacher, jax.device_put(teacher_params, replay_device), teacher_rb, 0)
            del dopamine_replay
        obs, _ = envs.reset()
        collected, pending, pending_q = 0, None, None
        with tqdm(total=rollout_steps, desc="teacher data", file=sys.stderr, mininterval=2.0) as bar:
            while collected < rollout_steps:
                actions, teacher_q, key = act_teacher(teacher_params, jax.device_put(obs, compute_device), key, args.teacher_epsilon)
                if pending is not None:  # stored while this step's actions are computed and the envs step
                    teacher_rb = learner.add(teacher_rb, int(dopamine), *jax.device_put((*pending, obs[:, -1], pending_q), replay_device))
                next_obs, reward, terminated, truncated, _ = envs.step(np.asarray(actions))
                pending, pending_q = (obs[:, -1], np.asarray(actions), np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated), teacher_q
                obs = next_obs
                collected += args.num_envs
                bar.update(args.num_envs)
        if pending is not None:
            teacher_rb = learner.add(teacher_rb, int(dopamine), *jax.device_put((*pending, obs[:, -1], pending_q), replay_device))
        rows = int(jnp.minimum(teacher_rb.count, teacher_rb.length).sum())
        print(f"(b) teacher data: {rows} rows ({'Dopamine replay' if dopamine else ''}{' + ' if dopamine and rollout_steps else ''}"
              f"{f'{collected} roll-out agent steps' if rollout_steps else ''}), {replay_bytes(teacher_lengths, num_actions) / max(sum(teacher_lengths), 1):.0f} "
              f"bytes/transition [{(collected or rows) / (time.time() - t0):.0f} {'agent steps' if rollout_steps else 'rows'}/s]")
    else:
        print("(b) teacher data: skipped (--offline-steps 0: no offline phase to use it)")

    # (c) Offline phase: teacher data only, lambda = 1, lr = learning_rate; K updates per jitted call
    lam = 1.0
    offline_coefs = coefs(args.td_coef, lam * args.distill_coef, args.learning_rate)
    step, t0, eval_seconds = 0, time.time(), 0.0
    k_static = min(args.updates_per_call, max(args.offline_steps, 1))
    with tqdm(total=args.offline_steps, desc="offline", file=sys.stderr, mininterval=2.0) as bar:
        while step < args.offline_steps:
            boundary = args.offline_steps
            if args.offline_eval_frequency:
                boundary = min(boundary, (step // args.offline_eval_frequency + 1) * args.offline_eval_frequency)
            n = min(k_static, boundary - step)
            state, offline_key, metrics = learner.offline(state, teacher_rb, offline_key, jnp.int32(step), k_static, jnp.int32(n), offline_coefs)
            metrics = jax.device_get(metrics)
            if not metrics["sample_ok"][:n].all():
                raise ConfigError("the teacher data has too few valid transitions to sample a batch; collect more (--teacher-steps)")
            for i in range(n):
                if (step + i + 1) % args.log_frequency == 0 or step + i + 1 == args.offline_steps:
                    for name in ("td_loss", "distill_loss", "loss", "q_values"):
                        writer.add_scalar(f"offline/{name}", float(metrics[name][i]), step + i + 1)
            step += n
            bar.update(n)
            writer.add_scalar("offline/SPS", step / (time.time() - t0 - eval_seconds), step)
            if args.offline_eval_frequency and step % args.offline_eval_frequency == 0:
                t_eval = time.time()
                returns, _, steps = run_eval(state.params, "offline eval")
                eval_seconds += time.time() - t_eval
                if returns:
                    writer.add_scalar("offline/eval_return", float(np.mean(returns)), step)
                    if (tns := teacher_normalized(float(np.mean(returns)))) is not None:
                        writer.add_scalar("offline/teacher_normalized_score", tns, step)
                tqdm.write(f"(c) {summary(f'offline update {step}: student', returns, steps)}")
    if args.offline_steps:
        print(f"(c) offline: {args.offline_steps} updates [{args.offline_steps / (time.time() - t0 - eval_seconds):.1f} updates/s, evaluations excluded]")
        state = sync_target(state, True)
    del teacher_rb  # the online phase uses the student's own replay

    # (d) Online phase
    rb = make_replay(online_lengths, 0, replay_device)
    lr = lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate)
    obs, _ = envs.reset()
    ep_ret = np.zeros(args.num_envs)
    ep_len = np.zeros(args.num_envs, np.int64)
    resetting = np.zeros(args.num_envs, bool)
    global_step, updates, update_credit = 0, 0, 0.0
    next_target_sync, next_eval = args.learning_starts + args.target_network_frequency, args.eval_frequency
    t0, eval_seconds = time.time(), 0.0
    pending = None  # the last vector step: stored, and learned from, while the envs take the next one
    metrics = None

    def learn():
        nonlocal state, rb, online_key, metrics, pending
        transition, n_updates, sync, c = pending
        pending = None
        if args.replay_on_host:
            state, rb, online_key, m = learn_on_host_replay(learner, state, rb, online_key, jax.device_put(transition, replay_device),
                                                            n_updates, sync, c, teacher_params, compute_device)
        else:
            state, rb, online_key, m = learner.online(state, rb, online_key, *transition, jnp.int32(n_updates), jnp.bool_(sync), c, teacher_params)
        if n_updates:
            metrics = m

    def online_eval(global_step: int, final: bool) -> float:
        """Evaluate the student; after an iteration (not the final one) update lambda and lr. Returns its seconds."""
        nonlocal lam, lr
        frames = [] if (final and args.capture_video) else None
        t_eval = time.time()
        returns, _, steps = run_eval(state.params, "student eval", frames=frames)
        student_return = float(np.mean(returns)) if returns else None
        line = summary(f"online step {global_step}: student", returns, steps)
        if student_return is not None:
            writer.add_scalar("eval/episodic_return", student_return, global_step)
            writer.add_scalar("charts/human_normalized_score", tu.human_normalized_score(game, student_return), global_step)
            if (tns := teacher_normalized(student_return)) is not None:
                writer.add_scalar("charts/teacher_normalized_score", tns, global_step)
                line += f", teacher-normalized {tns:.3f}"
        if not final:
            lam, reason = distill_lambda_update(lam, student_return, teacher_return, random_return, global_step,
                                                args.distill_decay_period, args.clip_lambda)
            lr = lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate)
            line += f"; lambda = {lam:.3f}" + (f" ({reason})" if reason else "")
        writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
        writer.add_scalar("charts/learning_rate", lr, global_step)
        tqdm.write(("(e) final " if final else "(d) ") + line)
        if frames:
            write_video(frames, f"runs/{run_name}/videos/final-eval.mp4")
        return time.time() - t_eval

    bar = tqdm(total=args.total_timesteps, desc="online", file=sys.stderr, mininterval=2.0)
    while global_step < args.total_timesteps:
        # Epsilon counts the offline updates as training steps, as the reference's schedule does.
        epsilon = linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, global_step + args.offline_steps)
        if pending is not None and not args.overlap_env:
            learn()
        actions, _, key = act_student(state.params, jax.device_put(obs, compute_device), key, epsilon)
        if pending is not None:
            learn()  # dispatched after the actions: the device learns while the envs step
        actions = np.asarray(actions)
        next_obs, reward, terminated, truncated, info = envs.step(actions)
        if global_step == 0:
            writer.add_scalar("charts/epsilon", epsilon, 0)  # where the exploration schedule starts
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

        # One update per train_frequency agent steps in total, whatever num_envs is.
        n_updates, sync = 0, False
        if global_step > args.learning_starts:
            update_credit += args.num_envs / args.train_frequency
            n_updates = int(update_credit)
            update_credit -= n_updates
            if global_step >= next_target_sync:
                sync = True
                next_target_sync += args.target_network_frequency
        transition = (obs[:, -1], actions, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated, next_obs[:, -1])
        pending = (transition, n_updates, sync, coefs(args.td_coef, lam * args.distill_coef, lr))
        obs = next_obs
        if updates // args.log_frequency != (updates + n_updates) // args.log_frequency:
            learn()  # the log needs this step's metrics
            m = jax.device_get(metrics)
            if not m.pop("sample_ok"):
                raise ConfigError("the online replay has too few valid transitions to sample a batch; raise --learning-starts")
            for name, value in m.items():
                writer.add_scalar(f"losses/{name}", float(value), global_step)
            writer.add_scalar("charts/SPS", int(global_step / (time.time() - t0 - eval_seconds)), global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
            writer.add_scalar("charts/learning_rate", lr, global_step)
        updates += n_updates

        if global_step >= next_eval and global_step < args.total_timesteps:
            next_eval += args.eval_frequency
            if pending is not None:
                learn()
            eval_seconds += online_eval(global_step, final=False)
    bar.close()
    if pending is not None:
        learn()
    train_seconds = time.time() - t0 - eval_seconds
    print(f"(d) online: {global_step} agent steps, {updates} updates [{global_step / train_seconds:.1f} agent steps/s, evaluations excluded]")
    online_eval(global_step, final=True)

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        save_atomic(model_path, flax.serialization.to_bytes(state.params))
        # Q-values of the saved params on a few states, to check a reload against.
        probe_obs = np.asarray(learner.sample(rb, jax.random.PRNGKey(0))[0].obs[:8])
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
    cli_args = tu.parse_args(Args)
    try:
        main(cli_args)
    except (tu.TeacherError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
