"""What both students' training shares: the paper's schedules and the train state.

- lambda after each evaluation and the learning rate that follows it (the reference's record_score and
  loss_helpers.create_linear_schedule), or a method's constants (`online_schedule`);
- epsilon and Dopamine's training-step counter, which decides the updates and the target syncs (`online_epsilon`,
  `train_steps_due`), and JSRL's teacher share;
- a phase's loss weights (`phase_coefs`: traced values, so changing them never recompiles) and the train state.

Pure functions, each unit-tested against the reference's logic (tests/test_reference_oracles.py); the losses and the
update are in each script.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState

from reincarnate.envs import teacher_normalized_score


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Linear from start to end over duration steps, then end."""
    return end + (start - end) * max(1.0 - t / duration, 0.0)


def distill_lambda_update(lam: float, student_return: float | None, teacher_return: float | None, random_return: float,
                          online_steps: int, decay_period: int, clip: bool = False) -> tuple[float, str]:
    """lambda after an evaluation, as the reference's record_score: max(1 - teacher_normalized_score, 0) (capped
    at 1 with clip=True); 0 for good once decay_period online steps have passed (at the evaluation ending that iteration) or once it reached 0.
    Returns (lambda, reason) where reason explains a kept value."""
    if lam <= 0.0:
        return 0.0, "lambda reached 0 and stays there"
    if online_steps >= decay_period:  # the reference's `>` with its iterations that overshoot 250,000 steps (ours do not)
        return 0.0, "decay period over"
    if student_return is None:
        return lam, "the student evaluation finished no episode: lambda keeps its value"
    if teacher_return is None:
        return lam, "the teacher evaluation finished no episode: lambda keeps its value"
    if teacher_return <= random_return:
        return lam, f"teacher score {teacher_return:g} <= random score {random_return:g}: lambda keeps its value"
    lam = max(1.0 - teacher_normalized_score(student_return, teacher_return, random_return), 0.0)
    return (min(lam, 1.0) if clip else lam), ""


def train_steps_due(steps_before: int, steps_after: int, offline_updates: int, replay_before: int, learning_starts: int,
                    every: int) -> int:
    """How many of the reference's training steps that update (every = train_frequency) or sync the target (every =
    target_network_frequency) fall due once agent steps up to steps_after - 1 (counted from 0) are stored: those that
    precede agent steps steps_before + 1 .. steps_after. Dopamine's agent runs one training step before each action
    (begin_episode and step call _train_step, then select_action); the one before agent step t sees replay_before + t
    stored transitions (the student's offline steps, if it acted, then its online ones) and the counter
    training_steps = offline_updates + t (one per offline update, as the reference counts them), and it acts when that
    counter is a multiple of `every` and the replay holds more than learning_starts (min_replay_history) transitions
    (distillation_dqn_agent.training_step)."""
    first = max(steps_before + 1, learning_starts - replay_before + 1)
    if steps_after < first:
        return 0
    return (offline_updates + steps_after) // every - (offline_updates + first - 1) // every


def online_epsilon(args, offline_updates: int, agent_step: int) -> float:
    """Epsilon of the online action at agent_step (counted from 0): the reference's epsilon_fn of its training_steps
    after the training step that precedes the action (Dopamine's begin_episode and step run _train_step, then
    select_action), offline updates included: offline_updates + agent_step + 1. Dopamine's linearly_decaying_epsilon
    (start_e for the warm-up, then linear over epsilon_decay_steps); the reference's persistence variant has no
    warm-up (epsilon_warmup_steps 0). Noisy nets explore by their noise: end_e (Dopamine 4.0.6's identity_epsilon)."""
    if getattr(args, "noisy", False):
        return args.end_e
    steps = offline_updates + agent_step + 1
    return linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, max(steps - args.epsilon_warmup_steps, 0))


def lambda_learning_rate(lam: float, start_lr: float, end_lr: float) -> float:
    """lr = lambda * start_lr + (1 - lambda) * end_lr."""
    return lam * start_lr + (1.0 - lam) * end_lr


def jsrl_teacher_share(guide_prob: float, decay_period: int, training_steps: int) -> float:
    """JSRL: the teacher's probability of acting after the roll-in, guide_prob decaying linearly to 0 over decay_period
    training steps (the reference's roll_out_decay_fn: persistence_linearly_decaying_epsilon with epsilon 0)."""
    return guide_prob * min(max((decay_period - training_steps) / decay_period, 0.0), 1.0)


def jsrl_use_teacher(ep_t: np.ndarray, roll_in: np.ndarray, roll_in_guide: bool, share: float, u: np.ndarray) -> np.ndarray:
    """JSRL, per env: during the roll-in (the first roll_in[i] steps of its episode) the teacher acts only with
    roll_in_guide (the reference's LOLSDQNAgent: roll_in_guide, default False: the student rolls in); after it, the
    teacher acts when the uniform draw u <= share."""
    return np.where(ep_t < roll_in, roll_in_guide, u <= share)


def online_schedule(args, lam: float, student_return: float | None, teacher_return: float | None, random_return: float,
                    online_steps: int) -> tuple[float, float, str]:
    """(lambda, learning rate, reason) after an online evaluation, as the method runs them: lambda follows the
    student's teacher-normalized score (or stays 1: --no-decay-lambda, dagger, ql-dagger; no teacher: tabula rasa);
    the learning rate follows lambda, or is constant (--online-learning-rate)."""
    reason = ""
    if args.decay_lambda and args.method != "tabula-rasa":
        lam, reason = distill_lambda_update(lam, student_return, teacher_return, random_return, online_steps, args.distill_decay_period,
                                            args.clip_lambda)
    return lam, args.online_learning_rate or lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate), reason


class QState(TrainState):
    target_params: flax.core.FrozenDict


class Coefs(NamedTuple):
    """Per-phase loss weights and learning rate: traced values, so changing them never recompiles."""

    td: jax.Array
    distill: jax.Array  # lambda * c
    cql: jax.Array
    margin: jax.Array  # lambda * margin_coef
    lr: jax.Array


def coefs(td: float, distill: float, lr: float, cql: float = 0.0, margin: float = 0.0) -> Coefs:
    return Coefs(jnp.float32(td), jnp.float32(distill), jnp.float32(cql), jnp.float32(margin), jnp.float32(lr))


def phase_coefs(args, lam: float, lr: float, offline: bool) -> Coefs:
    """A phase's loss weights: TD; lambda * c for distillation; CQL offline only (pretrained_dqn_agent.py); the
    margin weight c offline (lambda = 1) and lambda^2 * c online: margin_dqn_agent.py passes margin_coefficient *
    loss_decay to a loss that multiplies its regulariser by loss_decay again."""
    return coefs(args.td_coef, lam * args.distill_coef, lr, cql=args.cql_coef if offline else 0.0,
                 margin=lam * args.margin_coef if offline else lam * lam * args.margin_coef)


def sync_target(state: QState, now) -> QState:
    return state.replace(target_params=jax.tree.map(lambda t, p: jnp.where(now, p, t), state.target_params, state.params))


class Learner(NamedTuple):
    """What each script's make_learner builds: the jitted hot paths of the offline and online phases. A transition is
    (obs, actions, rewards, terminated, truncated, next_obs), on the device; teacher_params is None when no loss uses
    the teacher. With --replay-on-host the buffer functions run where the buffers live (the CPU) and the updates on the
    accelerator: the same pure functions and keys, so the same results."""

    offline: Callable  # (state, teacher_rb, key, step0, n, coefs, teacher_params) -> (state, key, metrics (n, ...)): n fused updates
    online: Callable  # (state, rb, teacher_rb, key, transition, teacher_params, coefs, sync, n_updates) -> (state, rb, key, metrics)
    store: Callable  # (rb, transition, teacher_params) -> rb: a step the student acted on, with the teacher's Q of its states
    add: Callable  # (rb, first_stream, obs, actions, rewards, terminated, truncated, next_obs, teacher_q) -> rb
    sample: Callable  # (rb, teacher_rb, key) -> (batch, ok, rehearsed share or mask): an online batch
