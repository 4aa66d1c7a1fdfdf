"""QDagger with a Rainbow student on envpool Atari (Agarwal et al., "Reincarnating RL", NeurIPS 2022).

Reincarnates a trained teacher (by default the Dopamine DQN_400 agent of the game)
into a Rainbow student (Dopamine's "full Rainbow" as the paper used it: C51 +
n-step + prioritized replay):
  (a) evaluate the teacher on Dopamine-protocol envs -> G_T
  (b) teacher data: roll out the teacher and/or load its own Dopamine replay
  (c) offline phase: QDagger loss on the teacher data only (lambda = 1, uniform sampling)
  (d) online phase: the student acts, learns from its own prioritized replay with
      the QDagger loss, and lambda decays with its teacher-normalized score
  (e) final evaluation, saved model
Loss (per sample i, importance weight w_i):
  L = mean_i w_i * (CE(proj. target_i, p_S(s_i, a_i)) + lambda * c * KL(softmax(q_T/tau) || softmax(q_S/tau)))
with q_S the student's expected Q over atoms.

Defaults follow google-research/reincarnating_rl at 3eb419c
(reincarnating_rl/configs/distillation_rainbow.gin, distillation_rainbow_agent.py,
run_experiment.py) and Dopamine 4.0.6 (jax/agents/full_rainbow, jax/networks.py);
README.md "Fidelity" lists every deviation. This file is the algorithm, top to
bottom: the flags, the network, the paper's math, the baselines, acting and
learning, then main() as the phases. What is not the algorithm (the device
replay, evaluation, the run folder and checkpoints, the teacher data, speed)
lives once in reincarnate/; the teachers in teacher_utils.py.

    python qdagger_rainbow_atari_jax.py --env-id Breakout-v5
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import teacher_utils as tu
from reincarnate import config, evaluation, speed  # speed sets XLA's GPU flags, read when the backend starts
from reincarnate.checkpoints import tree_arrays, tree_from
from reincarnate.collect import collect_teacher_data
from reincarnate.config import RUNTIME_FLAGS, ProtocolArgs
from reincarnate.episodes import ActingEnvs
from reincarnate.evaluation import evaluate_teacher
from reincarnate.replay import (Batch, host_step, make_replay, plan_buffers, replay_add, replay_arrays, replay_from, replay_sample,
                                replay_sample_prioritized, replay_set_priorities)
from reincarnate.run import (Interrupted, OfflineEvaluations, Run, devices_and_keys, final_evaluation, log_charts, log_episodes, log_online_losses,
                             log_student_eval, memory_check, run_script, save_model)
from reincarnate.training import (Coefs, Learner, QState, jsrl_teacher_share, jsrl_use_teacher, linear_schedule, online_epsilon, online_schedule,
                                  phase_coefs, sync_target, train_steps_due)


@dataclasses.dataclass
class Args(ProtocolArgs):
    """QDagger (Reincarnating RL, Agarwal et al. 2022) with a Rainbow student (C51 + n-step + prioritized replay) on envpool Atari: reuse a trained
    teacher's weights and data so the student learns faster than from scratch. Phases: (a) teacher evaluation,
    (b) teacher data, (c) offline distillation, (d) online QDagger with a decaying distillation weight,
    (e) final evaluation. Defaults reproduce google-research/reincarnating_rl@3eb419c
    (configs/distillation_rainbow.gin) and Dopamine 4.0.6; README "Fidelity" lists every deviation and its flag.

    Example: python qdagger_rainbow_atari_jax.py --env-id Pong-v5 --teacher-checkpoint /data/DQN_400/Pong/1

    Environment variables: REINCARNATE_CACHE (download cache, default ~/.cache/reincarnate),
    REINCARNATE_BUCKET_URL (a mirror of the gs://rl_checkpoints bucket).

    The flags of Dopamine's Atari protocol and the teacher (the same for every student: ProtocolArgs), and those that
    do not change what is learned (logging, W&B, checkpoints and resume, the saved model, speed: RunArgs) are in
    reincarnate/config.py; --help lists them first."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    # Method (README "Methods"): sets what differs from QDagger; flags passed explicitly still win
    method: Literal["qdagger", "tabula-rasa", "kickstarting", "pretrain", "dagger", "ql-dagger", "jsrl", "dqfd", "rehearsal", "finetune"] = "qdagger"
    """qdagger: offline distillation then online QDagger (distillation_rainbow.gin). tabula-rasa: no teacher, the student's own Dopamine config (full_rainbow.gin: noisy, dueling, double DQN, lr 6.25e-5). kickstarting: no offline phase, online distillation with the lambda decay. pretrain: offline TD + CQL on the teacher data, then online TD with a fresh Adam at lr 1e-5 (pretrained_dqn.gin). dagger: distillation only, lambda = 1 and lr 1e-4 constant; ql-dagger: TD + c * distillation, lambda = 1 constant (distillation_rainbow_agent.py MethodType). jsrl: a guide policy (the teacher) in the student's episodes, its share decaying over 2.5M steps (lols_dqn.gin). dqfd: TD + a large-margin loss toward the teacher's greedy action, weight c offline and lambda^2 * c online (margin_dqn.gin, margin_dqn_agent.py, decay period 1.5M). rehearsal: qdagger with --rehearsal-ratio of every online batch from the teacher data. finetune: the student and its target network start from the teacher's own (its online and target weights) and continue with TD at lr 6.25e-5 for 30 iterations (7.5M agent steps; reloaded_dqn.gin at 3eb419c)"""

    # QDagger
    offline_steps: int = 1_000_000
    """gradient steps on teacher data before the student acts (reference: 10 x 100,000)"""
    temperature: float = 0.1
    """tau: both teacher and student Q-values are divided by it inside the softmaxes"""
    distill_coef: float = 1.0
    """c: the distillation loss is weighted by lambda * c (reference: 1.0 for a Rainbow student)"""
    distill_decay_period: int = 2_500_000
    """lambda is 0 for good at the first evaluation after more than this many online agent steps (reference: 2.5M)"""
    td_coef: float = 1.0
    """weight of the TD (C51) loss; 0 gives the paper's distillation-only (DAgger) baseline"""
    clip_lambda: bool = False
    """clip lambda = 1 - teacher_normalized_score at 1 (the reference does not: a student below the random score gets lambda > 1, so a larger distillation weight and learning rate)"""
    decay_lambda: bool = True
    """online, lambda follows the student's teacher-normalized score (False: lambda = 1 throughout, as dagger and ql-dagger)"""
    online_learning_rate: float | None = None
    """a constant online Adam learning rate instead of lr = lambda * learning_rate + (1 - lambda) * end_learning_rate (set by tabula-rasa, pretrain, jsrl, dqfd, finetune)"""
    reset_optimizer_online: bool = False
    """start the online phase with a fresh Adam state (pretrain)"""
    offline_acting: bool = False
    """also let the student play one agent step per offline update (epsilon-greedy, epsilon counting the offline updates) into its own replay, so the online phase starts with that replay (learning starts count its steps) and 1M extra agent steps are spent outside the online budget. Off by default, as the reference: train.py runs every method with an offline phase through OfflinePretrainingRunner, whose offline iterations only call agent._train_step() (run_experiment.py _run_pretrain_phase); PersistentRunner, which acts offline, runs only reloaded_dqn and lols_dqn, which have no offline phase. A deviation for studying how much the offline phase gains from the student's own data"""
    init_from_teacher: bool = False
    """initialise the student with the teacher's weights; the teacher must have the student's architecture (finetune)"""
    # Rainbow (Dopamine's full Rainbow with the reference's switches: C51 + n-step + prioritized replay)
    network: Literal["nature", "impala"] = "nature"
    """student torso: Dopamine's Nature DQN (FullRainbowNetwork, SAME padding) or the Impala CNN (16, 32, 32); both end in Dense 512 and a C51 head"""
    num_atoms: int = 51
    """C51: atoms of the return distribution"""
    v_min: float = -10.0
    """C51: lowest atom of the fixed support"""
    v_max: float = 10.0
    """C51: highest atom of the fixed support"""
    double_dqn: bool = False
    """double DQN: the online network's expected Q picks the next action, the target network's distribution is projected (off in the reference)"""
    dueling: bool = False
    """dueling head: value and advantage streams over atoms, logits = V + A - mean_a A (off in the reference)"""
    noisy: bool = False
    """NoisyNet head layers (factorised Gaussian, Dopamine's NoisyNetwork: one noise draw per forward pass); as in Dopamine 4.0.6 epsilon is then end_e constant in training, and evaluations use the noise-free weights with --eval-epsilon (off in the reference)"""
    noisy_sigma0: float = 0.1
    """NoisyNet: sigma is initialised to noisy_sigma0 / sqrt(fan_in) (Dopamine: 0.1)"""
    per_alpha: float = 0.5
    """prioritized replay: priority = (C51 loss + 1e-10)^alpha; alpha = beta = 0.5 is exactly Dopamine's Rainbow (priority sqrt(loss + 1e-10), weights 1/sqrt(P)); alpha = 0 samples uniformly"""
    per_beta: float = 0.5
    """prioritized replay: importance weights (1/P)^beta normalised by the batch max, constant (not annealed); they scale both the C51 and the distillation term of each sample"""

    # Optimisation and replay (Dopamine's Atari protocol)
    total_timesteps: int = 3_750_000
    """online agent steps (all envs together); 3.75M = 15 Dopamine iterations (reference: the last 5 at lambda = 0, lr 1e-5)"""
    learning_rate: float = 1e-4
    """Adam learning rate while lambda = 1; lr = lambda * learning_rate + (1 - lambda) * end_learning_rate"""
    end_learning_rate: float = 1e-5
    """Adam learning rate once lambda = 0 (fine-tuning)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    buffer_size: int = 1_000_000
    """the student's online (prioritized) replay capacity (transitions); the teacher data has its own buffer"""
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
    """the ending epsilon for exploration (with --noisy, the constant training epsilon)"""
    epsilon_decay_steps: int = 50_000
    """epsilon decays linearly from start_e to end_e over this many training steps, counting the offline updates as the reference does: after an offline phase of >= epsilon_decay_steps updates epsilon is end_e from the first online step; without one it decays over the first online agent steps (no warm-up)"""
    epsilon_warmup_steps: int = 0
    """online agent steps at start_e before epsilon starts to decay (Dopamine's linearly_decaying_epsilon warm-up; tabula-rasa: 20,000)"""
    learning_starts: int = 20_000
    """the student learns once its replay holds more than this many agent steps (Dopamine's min_replay_history): the first online update comes after this many online agent steps (plus the offline ones with --offline-acting)"""
    train_frequency: int = 4
    """agent steps per gradient update (in total over all envs)"""

    # Acting while learning
    overlap_env: bool = True
    """step the environments while the device learns: actions then use the params from before the previous vector step's updates (a one-step policy lag); --no-overlap-env is strictly sequential"""


# ----------------------------------------------------------------------------
# Networks: a torso (Nature or Impala) and a C51 head (optionally dueling, noisy).
# Initialisers as Dopamine 4.0.6's FullRainbowNetwork and the reference's
# ImpalaRainbowNetwork: xavier_uniform for the convolutions (the Impala stage
# convolutions; flax's default for its residual ones) and the dense layers.
# ----------------------------------------------------------------------------
xavier = nn.initializers.xavier_uniform()


class NoisyDense(nn.Module):
    """Factorised Gaussian NoisyNet layer as Dopamine's NoisyNetwork (Fortunato et al. 2018).

    w = mu_w + sigma_w * f(eps_in) f(eps_out)^T, b = mu_b + sigma_b * f(eps_out),
    f(x) = sign(x) sqrt(|x|); mu ~ U[-1/sqrt(p), 1/sqrt(p)], sigma = sigma0 / sqrt(p).
    `key` draws the noise (one draw for the whole batch); key=None uses the mean weights.
    """

    features: int
    sigma0: float = 0.1

    @nn.compact
    def __call__(self, x, key=None):
        p = x.shape[-1]
        bound = 1.0 / np.sqrt(p)
        uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
        sigma = nn.initializers.constant(self.sigma0 / np.sqrt(p))
        mu_w = self.param("kernel_mu", uniform, (p, self.features))
        sigma_w = self.param("kernel_sigma", sigma, (p, self.features))
        mu_b = self.param("bias_mu", uniform, (self.features,))
        sigma_b = self.param("bias_sigma", sigma, (self.features,))
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
        x = nn.relu(nn.Conv(32, (8, 8), strides=(4, 4), padding="SAME", kernel_init=xavier)(x))
        x = nn.relu(nn.Conv(64, (4, 4), strides=(2, 2), padding="SAME", kernel_init=xavier)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(1, 1), padding="SAME", kernel_init=xavier)(x))
        return x.reshape((x.shape[0], -1))  # H, W, C order, as Dopamine flattens


class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(x))
        y = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """Impala CNN torso (Espeholt et al. 2018) as the reference's ImpalaEncoder; the Dense 512 is the head's."""

    channels: tuple[int, ...] = (16, 32, 32)

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME", kernel_init=xavier)(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = ResidualBlock(c)(x)
            x = ResidualBlock(c)(x)
        return nn.relu(x).reshape((x.shape[0], -1))


class RainbowNetwork(nn.Module):
    """uint8 (B, 4, 84, 84) -> C51 logits (B, num_actions, num_atoms).

    Torso, then Dense 512 + ReLU, then the C51 output (Dopamine's FullRainbowNetwork
    head). Dueling: value (num_atoms) and advantage (num_actions x num_atoms) streams
    from the same hidden layer, logits = V + A - mean_a A. Noisy: every head layer is
    a NoisyDense fed the same key, as Dopamine's feature_layer; pass `key` for noise,
    key=None for the mean weights.
    """

    num_actions: int
    num_atoms: int = 51
    torso: str = "nature"
    dueling: bool = False
    noisy: bool = False
    sigma0: float = 0.1

    @nn.compact
    def __call__(self, x, key=None):
        x = jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32) / 255.0
        x = NatureTorso()(x) if self.torso == "nature" else ImpalaCNN()(x)
        key = key if self.noisy else None

        def dense(h, features, name):
            if self.noisy:
                return NoisyDense(features, self.sigma0, name=name)(h, key)
            return nn.Dense(features, kernel_init=xavier, name=name)(h)

        h = nn.relu(dense(x, 512, "hidden"))
        A, K = self.num_actions, self.num_atoms
        if self.dueling:
            adv = dense(h, A * K, "advantage").reshape((-1, A, K))
            value = dense(h, K, "value").reshape((-1, 1, K))
            return value + adv - jnp.mean(adv, axis=1, keepdims=True)
        return dense(h, A * K, "logits").reshape((-1, A, K))


def make_student(args: Args, num_actions: int) -> RainbowNetwork:
    return RainbowNetwork(num_actions, args.num_atoms, args.network, args.dueling, args.noisy, args.noisy_sigma0)


def make_support(args: Args) -> jax.Array:
    return jnp.linspace(args.v_min, args.v_max, args.num_atoms, dtype=jnp.float32)


# ----------------------------------------------------------------------------
# The paper's math: C51 targets, losses, the update (pure functions, unit-tested); its schedules (lambda, lr,
# epsilon, the training-step counter) are the same for both students: reincarnate/training.py
# ----------------------------------------------------------------------------
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


def qdagger_rainbow_loss(logits: jax.Array, actions: jax.Array, target_probs: jax.Array, teacher_q: jax.Array | None, support: jax.Array,
                         weights: jax.Array, distill_weight: jax.Array, temperature: float, td_weight: float = 1.0,
                         cql_weight: float = 0.0, cql_temperature: float = 0.1, margin_weight: float = 0.0,
                         margin: float = 1.0) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """L = mean_i w_i (td_weight * CE_i + lambda * c * KL_i + cql_weight * CQL_i + margin_weight * margin_i), on the
    student's expected Q over atoms; distill_weight is lambda * c. teacher_q is the teacher's Q of the batch's states, or
    None when no term may use the teacher (no teacher, or lambda is 0 for good): its terms are 0 then, and a new term that
    reads it fails instead of reading zeros. Returns (L, (metrics, per-sample CE for the priorities))."""
    td = c51_loss(logits, actions, target_probs)
    q = expected_q(logits, support)
    td_loss = jnp.mean(weights * td)
    # A term whose weight is 0 is logged as 0.
    distill = marg = jnp.float32(0.0)
    if teacher_q is not None:
        distill = jnp.where(distill_weight > 0, jnp.mean(weights * distillation_kl(teacher_q, q, temperature)), 0.0)
        expert = jnp.argmax(jax.lax.stop_gradient(teacher_q), axis=-1)
        marg = jnp.where(margin_weight > 0, jnp.mean(weights * margin_loss(q, expert, margin)), 0.0)
    cql = jnp.where(cql_weight > 0, jnp.mean(weights * cql_loss(q, actions, cql_temperature)), 0.0)
    loss = td_weight * td_loss + distill_weight * distill + cql_weight * cql + margin_weight * marg
    q_taken = jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]
    return loss, ({"td_loss": td_loss, "distill_loss": distill, "cql_loss": cql, "margin_loss": marg, "loss": loss,
                   "q_values": jnp.mean(q_taken)}, td)


def make_update(student: RainbowNetwork, support: jax.Array, args: Args, teacher_q_fn=None):
    """One QDagger gradient step: (state, batch, teacher_params, coefs, key) -> (state, metrics, per-sample CE).

    The loss sees the teacher through teacher_q, its Q-values of batch.obs cached when those states were stored;
    teacher_q_fn(teacher_params, obs) gives its Q of any other state (batch.next_obs, say) in one call. With
    teacher_params None (no teacher, or lambda is 0 for good) teacher_q is None too: a term that needs the teacher then
    fails instead of reading zeros. Noise keys as Dopamine's train step: one key for the online forward pass, another
    shared by the target network's and (double DQN) the online network's forward passes on the next states."""

    def update(state: QState, batch: Batch, teacher_params, c: Coefs, key):
        teacher_q = None if teacher_params is None else batch.teacher_q
        k_online, k_target = jax.random.split(key)
        next_logits_target = student.apply(state.target_params, batch.next_obs, key=k_target)
        next_logits_online = student.apply(state.params, batch.next_obs, key=k_target) if args.double_dqn else None
        target_probs = c51_target(next_logits_target, next_logits_online, batch.returns, batch.discounts, support, args.double_dqn)

        def loss_fn(params):
            logits = student.apply(params, batch.obs, key=k_online)
            return qdagger_rainbow_loss(logits, batch.actions, target_probs, teacher_q, support, batch.weights, c.distill, args.temperature, c.td,
                                        c.cql, args.cql_temperature, c.margin, args.margin)

        grads, (metrics, td) = jax.grad(loss_fn, has_aux=True)(state.params)
        state.opt_state.hyperparams["learning_rate"] = c.lr
        return state.apply_gradients(grads=grads), metrics, td

    return update


# ----------------------------------------------------------------------------
# The baselines the paper compares with (README "Methods"): each sets only what differs from QDagger
# ----------------------------------------------------------------------------
METHODS: dict[str, dict] = {
    "qdagger": {},  # distillation_rainbow.gin
    "tabula-rasa": dict(offline_steps=0, distill_coef=0.0, noisy=True, dueling=True, double_dqn=True, online_learning_rate=6.25e-5,
                        epsilon_decay_steps=250_000, epsilon_warmup_steps=20_000),  # Dopamine's jax/agents/full_rainbow/configs/full_rainbow.gin
    "kickstarting": dict(offline_steps=0),
    "pretrain": dict(distill_coef=0.0, cql_coef=1.0, online_learning_rate=1e-5, reset_optimizer_online=True),  # pretrained_dqn.gin's recipe
    "dagger": dict(td_coef=0.0, decay_lambda=False),  # distillation_rainbow_agent.py MethodType.DAGGER
    "ql-dagger": dict(decay_lambda=False),  # MethodType.QL_PLUS_DAGGER
    "jsrl": dict(offline_steps=0, distill_coef=0.0, online_learning_rate=6.25e-5, eval_frequency=125_000),  # lols_dqn.gin's recipe
    "dqfd": dict(distill_coef=0.0, margin_coef=1.0, online_learning_rate=1e-4, distill_decay_period=1_500_000),  # margin_dqn.gin's recipe
    "rehearsal": dict(rehearsal_ratio=0.25),
    "finetune": dict(offline_steps=0, distill_coef=0.0, online_learning_rate=6.25e-5, init_from_teacher=True, start_e=0.01,
                     total_timesteps=7_500_000),  # reloaded_dqn.gin's recipe (3eb419c)
}


# --method's preset, except for the flags given explicitly; the command line with it
resolve_method = functools.partial(config.resolve_method, methods=METHODS)
parse_args = functools.partial(config.parse_args, Args, methods=METHODS)


def cql_loss(q: jax.Array, actions: jax.Array, temperature: float) -> jax.Array:
    """Per-sample CQL(H) regulariser as the reference's batch_cql_loss: logsumexp(q / tau) - q(s, a) / tau (B,)."""
    q = q / temperature
    return jax.nn.logsumexp(q, axis=-1) - jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]


def margin_loss(q: jax.Array, expert_actions: jax.Array, margin: float) -> jax.Array:
    """Per-sample large-margin loss toward the expert's action a_E (the reference's margin_loss, dqfd_margin=False):
    mean over actions of max(q(s, a) + margin [a != a_E] - q(s, a_E), 0) (B,)."""
    l_margin = margin * (1.0 - jax.nn.one_hot(expert_actions, q.shape[-1]))
    q_expert = jnp.take_along_axis(q, expert_actions[:, None], axis=-1)
    return jnp.mean(jnp.maximum(q + l_margin - q_expert, 0.0), axis=-1)


def make_act_jsrl(student_q_fn, teacher_q_fn):
    """JSRL's acting (the reference's LOLSDQNAgent): per env, the teacher's greedy action where `use_teacher`, else
    the student's epsilon-greedy one; student_q_fn(params, obs, key). Returns (actions, key)."""

    @jax.jit
    def act(student_params, teacher_params, obs, key, epsilon, use_teacher):
        key, k0, k1, k2 = jax.random.split(key, 4)
        q = student_q_fn(student_params, obs, k0)
        explore = jax.random.uniform(k1, q.shape[:1]) < epsilon
        student = jnp.where(explore, jax.random.randint(k2, q.shape[:1], 0, q.shape[-1]), jnp.argmax(q, axis=-1))
        return jnp.where(use_teacher, jnp.argmax(teacher_q_fn(teacher_params, obs), axis=-1), student), key

    return act


# ----------------------------------------------------------------------------
# Acting and learning: the jitted hot paths
# ----------------------------------------------------------------------------
def make_act(q_fn):
    """Epsilon-greedy actions, the Q-values they came from, and the next PRNG key (split inside
    the jit: one dispatch per env step); q_fn(params, obs, key) -> (B, A) Q-values."""

    @jax.jit
    def act(params, obs, key, epsilon):
        key, k0, k1, k2 = jax.random.split(key, 4)
        q = q_fn(params, obs, k0)
        greedy = jnp.argmax(q, axis=-1)
        explore = jax.random.uniform(k1, greedy.shape) < epsilon
        rand = jax.random.randint(k2, greedy.shape, 0, q.shape[-1])
        return jnp.where(explore, rand, greedy), q, key

    return act


METRICS = ("td_loss", "distill_loss", "cql_loss", "margin_loss", "loss", "q_values", "priority_mean", "rehearsal_share")


def make_learner(args: Args, student: RainbowNetwork, support: jax.Array, teacher_q_fn, compute_device) -> Learner:
    """Every buffer caches the teacher's Q-values of its states (the teacher data when it is built, the student's
    replay when a step is stored: one teacher forward per agent step instead of a batch per update). Offline batches
    are uniform, online ones prioritized; each update writes its samples' new priorities before the next samples."""
    update = make_update(student, support, args, teacher_q_fn)
    sample_uniform = functools.partial(replay_sample, batch_size=args.batch_size, n_step=args.n_step, gamma=args.gamma)
    sample_prioritized = functools.partial(replay_sample_prioritized, batch_size=args.batch_size, n_step=args.n_step, gamma=args.gamma,
                                           beta=args.per_beta)
    offline_target_every = max(args.target_network_frequency // args.train_frequency, 1)
    zero_metrics = {k: jnp.float32(0) for k in METRICS} | {"sample_ok": jnp.bool_(True)}

    def sample_online(rb, trb, key):
        """A prioritized batch of the student's replay; with rehearsal, each sample independently drawn (uniformly,
        weight 1) from the teacher data with probability rehearsal_ratio (the reference's teacher_data_ratio mixing)."""
        if trb is None:
            batch, ok = sample_prioritized(rb, key)
            return batch, ok, jnp.zeros(args.batch_size, bool)
        k_rb, k_teacher, k_pick = jax.random.split(key, 3)
        batch, ok = sample_prioritized(rb, k_rb)
        rehearsed, ok_teacher = sample_uniform(trb, k_teacher)
        pick = jax.random.uniform(k_pick, (args.batch_size,)) < args.rehearsal_ratio
        # The student's replay caches the teacher's Q only while a loss term uses it (else 0 columns).
        rehearsed = rehearsed._replace(teacher_q=rehearsed.teacher_q[:, : batch.teacher_q.shape[-1]])
        mixed = jax.tree.map(lambda t, o: jnp.where(pick.reshape((-1,) + (1,) * (o.ndim - 1)), t, o), rehearsed, batch)
        return mixed, ok & ok_teacher, pick

    def offline(state, trb, key, step0, k, c: Coefs, teacher_params):
        """k (static) fused updates on the teacher data, sampled uniformly, the target synced at the same update
        counts as one by one."""

        def body(carry, i):
            state, key = carry
            key, sk, uk = jax.random.split(key, 3)
            batch, ok = sample_uniform(trb, sk)
            state, m, _ = update(state, batch, teacher_params, c, uk)
            # The reference syncs when its counter of finished updates is a multiple: after updates 1, 1 + every, ...
            state = sync_target(state, (step0 + i) % offline_target_every == 0)
            return (state, key), m | {"priority_mean": jnp.float32(0), "rehearsal_share": jnp.float32(0), "sample_ok": ok}

        (state, key), metrics = speed.fused_scan(body, (state, key), k)
        return state, key, metrics

    def one_update(state, rb, trb, key, c, teacher_params):
        key, sk, uk = jax.random.split(key, 3)
        batch, ok, rehearsed = sample_online(rb, trb, sk)
        state, m, td = update(state, batch, teacher_params, c, uk)
        # priority = (CE + 1e-10)^alpha for the sampled rows of the student's replay, not the rehearsed ones
        rb = replay_set_priorities(rb, batch.index, td, args.per_alpha, ~rehearsed)
        return state, rb, key, m | {"priority_mean": jnp.mean((td + 1e-10) ** args.per_alpha),
                                    "rehearsal_share": jnp.mean(rehearsed.astype(jnp.float32)), "sample_ok": ok}

    def store_acted(rb, obs, actions, rewards, terminated, truncated, next_obs, teacher_params):
        """Store a vector step the student acted on (whole observations) with the teacher's Q of its states, computed
        here and not by a call of its own (on a GPU each launch holds the host). Given no teacher_params (lambda is 0
        for good: no loss reads them), zeros: that variant compiles once, when lambda reaches 0, as a `lax.cond` would
        make a GPU's host wait for the device on every step. A replay caching no teacher Q (0 columns) stores none."""
        q_dim = rb.teacher_q.shape[-1]
        teacher_q = None
        if q_dim:
            teacher_q = teacher_q_fn(teacher_params, obs) if teacher_params is not None else jnp.zeros((obs.shape[0], q_dim), jnp.float32)
        return replay_add(rb, 0, obs, actions, rewards, terminated, truncated, next_obs, teacher_q, n_step=args.n_step)

    def online_step(state, rb, trb, key, obs, actions, rewards, terminated, truncated, next_obs, teacher_params, c: Coefs, sync=False,
                    *, n_updates: int):
        """Store one vector step (with the teacher's Q of its states, computed in this call), then run the n_updates
        (static: at most three values, 0 during the warm-up, then the floor and ceiling of num_envs / train_frequency)
        updates due after it; then the target sync if `sync` (traced: no separate call to compile and launch)."""
        rb = store_acted(rb, obs, actions, rewards, terminated, truncated, next_obs, teacher_params)
        metrics = zero_metrics
        for _ in range(n_updates):
            state, rb, key, metrics = one_update(state, rb, trb, key, c, teacher_params)
        return sync_target(state, sync), rb, key, metrics

    offline_jit = jax.jit(offline, donate_argnums=0, static_argnums=4)
    online_jit = jax.jit(online_step, donate_argnums=(0, 1), static_argnames="n_updates")
    store_jit, sample_jit = jax.jit(store_acted, donate_argnums=0), jax.jit(sample_online)
    add = jax.jit(functools.partial(replay_add, n_step=args.n_step), donate_argnums=0, static_argnums=1)
    if not args.replay_on_host:
        return Learner(offline=lambda state, trb, key, step0, n, c, tp: offline_jit(state, trb, key, jnp.int32(step0), n, c, tp),
                       online=lambda state, rb, trb, key, step, tp, c, sync, n: online_jit(state, rb, trb, key, *step, tp, c, sync, n_updates=n),
                       store=lambda rb, step, tp: store_jit(rb, *step, tp), add=add, sample=sample_jit)

    update_jit, sync_jit, sample_teacher = jax.jit(update), jax.jit(lambda s: sync_target(s, True), donate_argnums=0), jax.jit(sample_uniform)
    set_priorities = jax.jit(lambda rb, index, td, keep: replay_set_priorities(rb, index, td, args.per_alpha, keep), donate_argnums=0)
    teacher_q_jit, host = jax.jit(teacher_q_fn) if teacher_q_fn else None, jax.devices("cpu")[0]

    def offline_host(state, trb, key, step0, n, c, teacher_params):
        metrics = []
        for i in range(n):
            key, sk, uk = jax.random.split(key, 3)
            batch, ok = sample_teacher(trb, sk)
            state, m, _ = update_jit(state, jax.device_put(batch, compute_device), teacher_params, c, uk)
            state = sync_jit(state) if (step0 + i) % offline_target_every == 0 else state
            metrics.append(m | {"priority_mean": jnp.float32(0), "rehearsal_share": jnp.float32(0), "sample_ok": ok})
        return state, key, jax.tree.map(lambda *x: jnp.stack(x), *metrics)

    def online_host(state, rb, trb, key, step, teacher_params, c, sync, n):
        rb, metrics = add(rb, 0, *host_step(rb, step, teacher_q_jit, teacher_params, host)), zero_metrics
        for _ in range(n):
            key, sk, uk = jax.random.split(key, 3)
            batch, ok, rehearsed = sample_jit(rb, trb, sk)
            state, metrics, td = update_jit(state, jax.device_put(batch, compute_device), teacher_params, c, uk)
            rb = set_priorities(rb, batch.index, jax.device_put(td, host), ~rehearsed)
            metrics = metrics | {"priority_mean": jnp.mean((td + 1e-10) ** args.per_alpha), "rehearsal_share": jnp.mean(rehearsed.astype(jnp.float32)),
                                 "sample_ok": ok}
        return sync_jit(state) if sync else state, rb, key, metrics

    return Learner(offline=offline_host, online=online_host, store=lambda rb, step, tp: add(rb, 0, *host_step(rb, step, teacher_q_jit, tp, host)), add=add,
                   sample=sample_jit)


# ----------------------------------------------------------------------------
# Main: the paper's phases (a)-(e)
# ----------------------------------------------------------------------------
def main(args: Args) -> None:
    # Everything that can fail before the first checkpoint is checked before anything is written: the flags, the env
    # id, the logins and the run folder (new, or --resume), then the teacher, the student and the buffers' sizes.
    run = Run(args, __file__, RUNTIME_FLAGS)
    args = run.args  # with --resume, the run's own flags where the command line gives none
    if run.phase == "done":
        print(f"{run.dir} finished already; nothing to resume")
        return run.upload(tu.upload_hf)
    game, random_return = tu.game_from_env_id(args.env_id), tu.random_score(args.env_id)
    uses_teacher, jsrl = args.method != "tabula-rasa", args.method == "jsrl"
    offline = uses_teacher and args.offline_steps > 0
    need_teacher_data = uses_teacher and (offline or args.rehearsal_ratio > 0)
    compute_device, replay_device, key, student_key, offline_key, online_key = devices_and_keys(args)
    make_envs = functools.partial(tu.make_teacher_envs, args.env_id, max_episode_steps=args.max_episode_steps)
    num_actions = tu.env_num_actions(args.env_id)

    # The teacher (a one-line TeacherError if unreachable, corrupt or of another game) and the data to make of it
    setup = tu.prepare_run_teacher(run, num_actions, need_teacher_data, compute_device)
    teacher, teacher_q_fn, teacher_params = setup.checkpoint, setup.q_fn, setup.params

    # The buffers' sizes against the memory where they will live, before any work is spent. The student's replay caches
    # the teacher's Q of each state while a loss term may use it.
    online_q_dim = num_actions if uses_teacher and (args.distill_coef > 0 or args.margin_coef > 0) else 0
    plan = plan_buffers(run.info.get("dopamine_rows", 0) if setup.dopamine else 0, setup.rollout_steps, args.num_envs, args.buffer_size, num_actions,
                        online_q_dim, prioritized=True)
    both = args.rehearsal_ratio > 0 or (offline and args.offline_acting)  # the teacher data and the student's replay held at once
    memory_check(plan.teacher_bytes + plan.online_bytes if both else max(plan.teacher_bytes, plan.online_bytes), replay_device, "the replay buffers")

    # The student (fine-tuning: it and its target network start as the teacher's own)
    student, support = make_student(args, num_actions), make_support(args)
    params = target = student.init(student_key, np.zeros((1, 4, 84, 84), np.uint8))
    if args.init_from_teacher:
        params, target = tu.student_from_teacher(teacher, params, lambda p, o: expected_q(student.apply(p, o), support), f"the student a Rainbow "
                                                 f"--network {args.network}", "pass a Rainbow run of this script with the same network flags, or another --method")
    # A strong float32 learning rate (a weak type would recompile the jitted steps once) and a separate target copy (the
    # jitted steps donate the state, and one buffer cannot be donated twice).
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(args.learning_rate, np.float32), eps=args.adam_eps)
    state = jax.device_put(QState.create(apply_fn=student.apply, params=params, target_params=jax.tree.map(jnp.copy, target), tx=tx), compute_device)
    if run.resumed:
        state = tree_from(run.resumed, "state", state, compute_device)
        key, offline_key, online_key = jax.device_put(list(run.array("keys")), compute_device)
    learner = make_learner(args, student, support, teacher_q_fn, compute_device)
    # Training actions draw fresh noise (noisy nets); evaluations use the mean weights.
    student_q = lambda p, o, k: expected_q(student.apply(p, o, key=k), support)  # noqa: E731
    act_student, act_eval = make_act(student_q), make_act(lambda p, o, k: expected_q(student.apply(p, o), support))
    act_teacher, act_jsrl = make_act(lambda p, o, k: teacher_q_fn(p, o)) if teacher else None, make_act_jsrl(student_q, teacher_q_fn) if jsrl else None
    run.open(plan.checkpoint_bytes(args.keep_checkpoints + 1))
    print(config.method_line(args, METHODS))
    launcher = speed.launcher()  # launches the learning calls while this thread steps the envs (reincarnate/speed.py)
    evaluate_student = functools.partial(evaluation.evaluate_student, act_eval, make_envs=make_envs, args=args, run=run, device=compute_device)
    teacher_rb = rb = None

    def checkpoint(phase: str, progress: dict, arrays: dict | None = None, acting_key=None) -> None:  # leaves if a signal asked to
        run.checkpoint(phase, progress, arrays, state, [key if acting_key is None else acting_key, offline_key, online_key])

    normalized = lambda student_return: tu.normalized_score(student_return, run.info.get("teacher_return"), random_return)  # noqa: E731

    try:
        # (a) Teacher evaluation -> G_T, on the envs the teacher was trained on
        if run.phase == "teacher_eval":
            key, k = jax.random.split(key) if teacher else (key, None)
            evaluate_teacher(run, act_teacher, teacher, teacher_params, make_envs, k, random_return, on_interrupt=lambda: checkpoint("teacher_eval", {}))
            run.phase, run.progress = "collect", dict(collected=0)

        # (b) Teacher data: the teacher's own Dopamine replay and/or roll-outs, with the teacher's Q-values cached
        if need_teacher_data and run.phase == "collect":
            teacher_rb, key = collect_teacher_data(run, plan.teacher_lengths, num_actions, setup.dopamine, setup.dopamine_replay, setup.rollout_steps,
                                                   make_envs(args.num_envs, seed=args.seed, **teacher.env_kwargs) if setup.rollout_steps else None,
                                                   act_teacher, teacher, teacher_params, learner.add, key, compute_device, replay_device,
                                                   checkpoint=lambda progress, arrays, k: checkpoint("collect", progress, arrays, acting_key=k))
            setup, run.teacher_data = setup._replace(dopamine_replay=None), lambda: replay_arrays("teacher_rb", teacher_rb)  # (the frames: GBs)
            if run.checkpoints_on:
                run.save_teacher_data()
            checkpoint("offline", dict(step=0, next_eval=args.offline_eval_frequency))
        elif need_teacher_data and ((run.phase == "offline" and offline) or (run.phase == "online" and args.rehearsal_ratio > 0)):
            teacher_rb = replay_from(run.teacher_data_checkpoint(), "teacher_rb", replay_device)
        elif run.phase == "collect":
            print(f"(b) teacher data: skipped ({'no teacher' if not uses_teacher else '--offline-steps 0: no offline phase to use it'})")
            run.phase, run.progress = "offline", dict(step=0, next_eval=args.offline_eval_frequency)

        # (c) Offline phase: K updates per jitted call on the teacher data only, lambda = 1, lr = learning_rate
        offline_acted = run.progress.get("offline_acted", 0)
        if run.phase == "offline":
            step, next_eval, rate, unchecked = run.progress["step"], run.progress["next_eval"], speed.SteadyRate(), []
            k = min(args.updates_per_call or (8 if speed.on_cpu() else 100), max(args.offline_steps, 1))
            acting = None  # --offline-acting (a deviation): the student also plays one vector step per call into its own replay
            if offline and args.offline_acting:
                k, saved = min(args.num_envs, max(args.offline_steps, 1)), run.array if offline_acted else None
                acting = ActingEnvs(make_envs(args.num_envs, seed=args.seed + 3), args.offline_steps, compute_device, saved, prefix="offline_")
                rb = replay_from(run.resumed, "rb", replay_device) if saved else make_replay(plan.online_lengths, online_q_dim, replay_device, prioritized=True)
            c = phase_coefs(args, 1.0, args.learning_rate, offline=True)

            def offline_checkpoint() -> None:  # with a pending offline evaluation's params: the resume plays it again
                evals.log(wait=True)  # the losses and the evaluation logged before the checkpoint
                arrays = {**replay_arrays("rb", rb), **acting.arrays()} if acting else {}
                checkpoint("offline", dict(step=step, next_eval=next_eval, offline_acted=offline_acted, **evals.progress()), {**arrays, **evals.arrays()})

            with (tqdm(total=args.offline_steps if offline else 0, initial=step, desc="offline", file=sys.stderr, mininterval=2.0) as bar,
                  OfflineEvaluations(run, evaluate_student, normalized, rate, unchecked, state.params, compute_device, offline_checkpoint) as evals):
                while offline:
                    if args.offline_eval_frequency and step >= next_eval:  # (overlapping the updates, by default)
                        evals.start(state.params, step, last=step >= args.offline_steps)
                        next_eval += args.offline_eval_frequency
                    if step >= args.offline_steps:
                        break
                    boundary = min(args.offline_steps, next_eval) if args.offline_eval_frequency else args.offline_steps
                    n = min(k, args.offline_steps - step) if acting else k if boundary - step >= k else 1  # K must divide: one by one before a boundary
                    if acting:  # the updates below are launched while the emulators step
                        epsilon = args.end_e if args.noisy else linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, offline_acted + 1)
                        actions_dev, _, key = act_student(state.params, acting.obs_dev, key, epsilon)
                        acting.send(actions_dev)
                    in_flight = launcher.submit(learner.offline, state, teacher_rb, offline_key, step, n, c, teacher_params)
                    if acting:
                        transition, _, _ = acting.recv()
                        for i, ret, _ in acting.episodes.finished:
                            run.log("offline/episodic_return", ret, offline_acted + i + 1)
                        rb, offline_acted = learner.store(rb, transition, teacher_params if online_q_dim else None), offline_acted + args.num_envs
                    state, offline_key, metrics = in_flight.result()
                    unchecked.append((step, n, metrics))  # fetched at log steps, not after every call (a stall)
                    step += n
                    rate.start(step)  # from the end of the first (compiling) call
                    bar.update(n)
                    if step // args.log_frequency != (step - n) // args.log_frequency or step == args.offline_steps:
                        evals.log()  # the losses so far, and an overlapped evaluation that has landed
                        if step > rate.n0:
                            run.log("offline/SPS", rate(step), step)
                    if run.interrupted or (step < args.offline_steps and run.due(step, step - n, args.checkpoint_frequency or args.offline_eval_frequency or 100_000)):
                        offline_checkpoint()
            if offline:
                if acting:
                    acting.close()
                print(f"(c) offline: {args.offline_steps} updates [{rate(step):.1f} updates/s, {evals.note}]"
                      + (f"; the student played {offline_acted} agent steps into its replay" if acting else ""))
                state = sync_target(state, True)  # the reference's set_phase(persistence=False)
            if args.reset_optimizer_online:  # pretraining's online phase starts a fresh Adam
                state = state.replace(opt_state=state.tx.init(state.params))
            online_start = dict(global_step=0, updates=0, next_eval=args.eval_frequency, lam=1.0, max_roll_in=args.jsrl_max_roll_in_steps,
                                teacher_actions=0, acted=0, offline_acted=offline_acted)
            if offline:
                checkpoint("online", online_start, replay_arrays("rb", rb) if offline_acted else None)
            run.phase, run.progress = "online", online_start
        if args.rehearsal_ratio <= 0:
            teacher_rb = run.teacher_data = None  # the online phase uses the student's own replay only

        # (d) Online phase: the student acts, stores its steps with the teacher's Q and learns; lambda follows its score
        p = run.progress
        lam, global_step, updates, next_eval, student_return = p.get("lam", 1.0), p.get("global_step", 0), p.get("updates", 0), p.get("next_eval"), p.get("student_return")
        max_roll_in, teacher_actions, acted, offline_acted = p.get("max_roll_in"), p.get("teacher_actions", 0), p.get("acted", 0), p.get("offline_acted", offline_acted)
        lr = online_schedule(args, lam, None, None, random_return, 0)[1]
        if rb is None:  # the student's replay: its own offline steps (--offline-acting), or restored, or new
            rb = replay_from(run.resumed, "rb", replay_device) if global_step or offline_acted else make_replay(plan.online_lengths, online_q_dim, replay_device, prioritized=True)
        if run.phase == "online":
            envs = ActingEnvs(make_envs(args.num_envs, seed=args.seed + 1), args.total_timesteps, compute_device, run.array if global_step else None)
            jsrl_rng = np.random.default_rng(args.seed + 2)
            jsrl_rng.bit_generator.state = p.get("jsrl_rng", jsrl_rng.bit_generator.state)
            roll_in = run.array("roll_in") if global_step else jsrl_rng.integers(0, max_roll_in, args.num_envs) + 1 if max_roll_in > 0 else np.zeros(args.num_envs, np.int64)
            # The last vector step, learned from while the envs take the next one: (transition, updates, target sync, log step or
            # None). Checkpoints save it unapplied: a resumed run applies it where the uninterrupted one would.
            pending = run.pending_step(compute_device)
            c, rate, offline_updates = phase_coefs(args, lam, lr, offline=False), speed.SteadyRate(), args.offline_steps if offline else 0
            learning = speed.InFlight(launcher, rate)  # the learning call of the stored step, in flight while the envs step

            def learn(pending, now: bool = False):  # lambda changes only once the step has landed: it is the step's own
                transition, n_updates, sync, log_step = pending
                learning.launch(learner.online, state, rb, teacher_rb, online_key, transition, teacher_params if online_q_dim and lam > 0 else None, c,
                                sync, n_updates, n_updates=n_updates, log_step=log_step, at=global_step)
                return learning.land() if now else None

            def online_checkpoint(phase: str) -> None:
                progress = dict(global_step=global_step, updates=updates, next_eval=next_eval, lam=lam, max_roll_in=max_roll_in, teacher_actions=teacher_actions,
                                acted=acted, jsrl_rng=jsrl_rng.bit_generator.state, student_return=student_return, offline_acted=offline_acted,
                                pending_updates=pending[1] if pending else None, pending_sync=pending[2] if pending else None, pending_log=pending[3] if pending else None)
                unapplied = {f"pending.{i}": x for i, x in enumerate(pending[0])} if pending else {}
                checkpoint(phase, progress, {**replay_arrays("rb", rb), **envs.arrays(), "roll_in": roll_in, **unapplied})

            with tqdm(total=args.total_timesteps, initial=global_step, desc="online", file=sys.stderr, mininterval=2.0) as bar:
                while global_step < args.total_timesteps:
                    epsilon = online_epsilon(args, offline_updates, global_step)
                    if pending is not None and not args.overlap_env:
                        (state, rb, online_key), pending = learn(pending, now=True), None
                    if jsrl:  # the teacher acts in the roll-in (with --jsrl-roll-in-guide) and, after it, with a decaying probability
                        share = jsrl_teacher_share(args.jsrl_guide_prob, args.jsrl_decay_period, global_step + offline_updates)
                        use_teacher = jsrl_use_teacher(envs.episodes.len, roll_in, args.jsrl_roll_in_guide, share, jsrl_rng.random(args.num_envs))
                        actions_dev, key = act_jsrl(state.params, teacher_params, envs.obs_dev, key, epsilon, use_teacher)
                        teacher_actions += int((use_teacher & ~envs.episodes.resetting).sum())
                    else:
                        actions_dev, _, key = act_student(state.params, envs.obs_dev, key, epsilon)
                    envs.send(actions_dev)
                    if pending is not None:
                        learn(pending)  # while the emulators step
                    transition, live, done = envs.recv()
                    log_online_losses(run, learning.unlogged)
                    if global_step == 0:
                        run.log("charts/epsilon", epsilon, 0)  # where the exploration schedule starts
                    global_step += args.num_envs
                    bar.update(args.num_envs)
                    acted += int(live.sum())
                    log_episodes(run, envs.episodes.finished, global_step - args.num_envs)
                    if jsrl and done.any():  # a new roll-in length for each new episode
                        roll_in[done] = jsrl_rng.integers(0, max(max_roll_in, 1), int(done.sum())) + 1 if max_roll_in > 0 else 0
                    # The updates and the target sync the reference's training-step counter makes due over these agent steps
                    steps_due = functools.partial(train_steps_due, global_step - args.num_envs, global_step, offline_updates, offline_acted, args.learning_starts)
                    n_updates, sync = steps_due(args.train_frequency), steps_due(args.target_network_frequency) > 0
                    log_now = updates // args.log_frequency != (updates + n_updates) // args.log_frequency
                    if learning.future is not None:
                        state, rb, online_key = learning.land()
                    pending, updates = (transition, n_updates, sync, global_step if log_now else None), updates + n_updates
                    if log_now:  # lambda * c and lr too, unless the evaluation below logs their new values
                        evaluating = next_eval <= global_step < args.total_timesteps
                        log_charts(run, global_step, SPS=rate(global_step), epsilon=epsilon, distill_coeff=None if evaluating else lam * args.distill_coef,
                                   learning_rate=None if evaluating else lr, teacher_action_share=teacher_actions / max(acted, 1) if jsrl else None)
                        teacher_actions, acted = (0, 0) if jsrl else (teacher_actions, acted)

                    if next_eval <= global_step < args.total_timesteps:  # a Dopamine iteration ends: evaluate, then lambda and lr
                        if pending is not None:
                            (state, rb, online_key), pending = learn(pending, now=True), None
                        log_online_losses(run, learning.unlogged)
                        t_eval = time.time()
                        returns, steps = evaluate_student(state.params, desc="student eval", seed_offset=30_000 + global_step // args.eval_frequency)
                        if run.interrupted:  # the evaluation runs again after a resume
                            online_checkpoint("online")
                        student_return, line = log_student_eval(run, game, returns, steps, global_step, normalized)
                        lam, lr, reason = online_schedule(args, lam, student_return, run.info.get("teacher_return"), random_return, global_step)
                        if args.decay_lambda and uses_teacher:
                            line += f"; lambda = {lam:.3f}" + (f" ({reason})" if reason else "")
                        max_roll_in = int(max_roll_in * args.jsrl_roll_in_decay) if jsrl else max_roll_in
                        c = phase_coefs(args, lam, lr, offline=False)
                        log_charts(run, global_step, distill_coeff=lam * args.distill_coef, learning_rate=lr)
                        tqdm.write(f"(d) {line}")
                        rate.pause(time.time() - t_eval)
                        next_eval += args.eval_frequency
                    if run.interrupted or (global_step < args.total_timesteps and run.due(global_step, global_step - args.num_envs,
                                                                                          args.checkpoint_frequency or args.eval_frequency)):
                        log_online_losses(run, learning.unlogged)  # the losses of the steps learned: a resumed run does not learn them again
                        online_checkpoint("online")
            if pending is not None:
                (state, rb, online_key), pending = learn(pending, now=True), None
            log_online_losses(run, learning.unlogged)
            envs.close()
            print(f"(d) online: {global_step} agent steps, {updates} updates [{rate(global_step):.1f} agent steps/s while learning, evaluations excluded]")
            run.phase = "final"

        # (e) Final evaluation and the model
        final = dict(global_step=global_step, updates=updates, lam=lam, student_return=student_return)
        returns = final_evaluation(run, evaluate_student, state.params, global_step, game, normalized,
                                   on_interrupt=lambda: checkpoint("final", final, replay_arrays("rb", rb)))
        print(f"final: lambda {lam:g}, learning rate {lr:g}, {global_step} agent steps, {updates} updates")
        if args.save_model:
            # Expected Q-values (noise-free) of the saved params on a few states, to check a reload against.
            probe_obs = np.asarray(learner.sample(rb, None, jax.random.PRNGKey(0))[0].obs[:8])
            save_model(run, state.params, probe_obs, np.asarray(expected_q(student.apply(state.params, probe_obs), support)), returns, global_step,
                       normalized, game)
        run.finish(final, {**tree_arrays("state", state), "keys": np.stack([key, offline_key, online_key])}, state.params)
    except Interrupted:  # the model so far, with --save-model
        run.save_params(state.params)
        raise
    finally:
        launcher.shutdown()
        run.close()
    run.upload(tu.upload_hf)  # the run is complete and its folder unlocked: a failed upload costs nothing of it


if __name__ == "__main__":
    run_script(main, parse_args)  # a user's problem is one error line (exit 1); an interrupt says how to resume (exit 130)
