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
README.md "Fidelity" lists every deviation.

Speed: the replay (with its sum tree) lives in JAX arrays on the accelerator;
adding a vector step, sampling, the updates and the new priorities are pure
jitted functions (buffers donated, updated in place); the offline phase fuses
--updates-per-call updates in one `lax.scan`; online, the environment steps
while the device learns. The learning calls are launched from a second thread
and, on a GPU, as CUDA graphs (XLA command buffers): there the host's launches,
not the device, bound these small calls.

    python qdagger_rainbow_atari_jax.py --env-id Breakout-v5
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, NamedTuple

# On a GPU each jitted call is launched as CUDA graphs, its loops included: one launch for many kernels. The host, not
# the device, bounds these small calls; with the launcher thread (in main) an H100 VM ran the offline phase 1.4x and the
# online phase 1.45x faster than with neither (README "Speed"). The same kernels run, so the results are the same;
# XLA_FLAGS that name xla_gpu_enable_command_buffer are left as they are.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
                               " --xla_gpu_graph_min_graph_size=1").strip()

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
    """QDagger (Reincarnating RL, Agarwal et al. 2022) with a Rainbow student (C51 + n-step + prioritized replay) on envpool Atari: reuse a trained
    teacher's weights and data so the student learns faster than from scratch. Phases: (a) teacher evaluation,
    (b) teacher data, (c) offline distillation, (d) online QDagger with a decaying distillation weight,
    (e) final evaluation. Defaults reproduce google-research/reincarnating_rl@3eb419c
    (configs/distillation_rainbow.gin) and Dopamine 4.0.6; README "Fidelity" lists every deviation and its flag.

    Example: python qdagger_rainbow_atari_jax.py --env-id Pong-v5 --teacher-checkpoint /data/DQN_400/Pong/1

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
    """whether to save an mp4 of the final evaluation's first episode (what the agent sees) to `runs/{run_name}/videos` (with --track, also to the W&B run's media)"""
    save_model: bool = False
    """whether to save the student's params (flax msgpack), a Q-value probe and the final evaluation (final_eval.json) to `runs/{run_name}`"""
    upload_model: bool = False
    """whether to upload the saved model, its args.json, Q probe and final evaluation, the TensorBoard logs, the video (with --capture-video), the code and a model card to the Hugging Face Hub repo {hf_entity}/{env_id}-{exp_name}-{method}-seed{seed} when the run ends, where `--teacher-checkpoint hf://{repo}/{exp_name}.cleanrl_model` loads it (CleanRL's --upload-model; needs --save-model and `hf auth login`; the login is checked before the run starts)"""
    hf_entity: str = ""
    """the Hub user or organization of --upload-model's repo (default: the logged-in user)"""
    run_name: str | None = None
    """the run folder's name under runs/ (default {env_id}__{exp_name}__{method}__{seed}__{start time}-{random suffix}); with --resume, the run to continue (its name or its folder)"""
    resume: bool = False
    """continue the run --run-name from its latest complete checkpoint (flags that change the algorithm must match)"""
    checkpoint_frequency: int | None = None
    """checkpoint every this many agent steps online, updates offline, agent steps of the teacher roll-out; default one Dopamine iteration online and offline (--eval-frequency / --offline-eval-frequency), 250,000 in the roll-out; 0 disables checkpoints"""
    checkpoint_minutes: float = 30.0
    """also checkpoint when this many minutes of wall time have passed since the last checkpoint (0: only by --checkpoint-frequency)"""
    keep_checkpoints: int = 1
    """complete checkpoints kept in runs/{run_name}/checkpoints (the oldest is deleted only after a newer one is complete)"""

    # Method (README "Methods"): sets what differs from QDagger; flags passed explicitly still win
    method: Literal["qdagger", "tabula-rasa", "kickstarting", "pretrain", "dagger", "ql-dagger", "jsrl", "dqfd", "rehearsal", "finetune"] = "qdagger"
    """qdagger: offline distillation then online QDagger (distillation_rainbow.gin). tabula-rasa: no teacher, the student's own Dopamine config (full_rainbow.gin: noisy, dueling, double DQN, lr 6.25e-5). kickstarting: no offline phase, online distillation with the lambda decay. pretrain: offline TD + CQL on the teacher data, then online TD with a fresh Adam at lr 1e-5 (pretrained_dqn.gin). dagger: distillation only, lambda = 1 and lr 1e-4 constant; ql-dagger: TD + c * distillation, lambda = 1 constant (distillation_rainbow_agent.py MethodType). jsrl: a guide policy (the teacher) in the student's episodes, its share decaying over 2.5M steps (lols_dqn.gin). dqfd: TD + a large-margin loss toward the teacher's greedy action, weight c offline and lambda^2 * c online (margin_dqn.gin, margin_dqn_agent.py, decay period 1.5M). rehearsal: qdagger with --rehearsal-ratio of every online batch from the teacher data. finetune: the student and its target network start from the teacher's own (its online and target weights) and continue with TD at lr 6.25e-5 for 30 iterations (7.5M agent steps; reloaded_dqn.gin at 3eb419c)"""

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
    teacher_epsilon: float = 0.001
    """exploration of the teacher roll-out (the reference's teacher acts in eval mode: Dopamine's epsilon_eval 0.001)"""

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
    cql_coef: float = 0.0
    """offline only: weight of the CQL term mean(logsumexp(Q / cql_temperature) - Q(s, a) / cql_temperature) (pretrain: 1.0)"""
    cql_temperature: float = 0.1
    """temperature of the CQL term (pretrained_dqn.gin: 0.1)"""
    margin_coef: float = 0.0
    """weight c of the large-margin loss toward the teacher's greedy action: c offline, lambda^2 * c online (dqfd: 1.0; margin_dqn_agent.py applies its decay twice)"""
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

    # Evaluation
    eval_frequency: int = 250_000
    """online agent steps between evaluations (one Dopamine iteration); lambda is recomputed after each"""
    eval_steps: int = 125_000
    """evaluations play whole episodes until at least this many agent steps have passed, finish the episodes in progress, and average all of them (Dopamine's protocol)"""
    eval_episodes: int | None = None
    """optional cap: no new evaluation episode starts once this many have started, except the first one of each evaluation env (default none, as Dopamine)"""
    eval_epsilon: float = 0.001
    """epsilon of the greedy policy during evaluations"""
    offline_eval_frequency: int = 100_000
    """offline updates between student evaluations during the offline phase (logged as offline/eval_return; no effect on training); 0 disables"""
    log_frequency: int = 100
    """gradient updates between loss logs"""

    # Speed (no effect on the results)
    updates_per_call: int | None = None
    """offline updates fused in one jitted call (lax.scan); the results equal one update per call; default 100 on an accelerator, 8 on a CPU (written out one after the other there: XLA:CPU runs convolutions inside a loop ~7x slower)"""
    replay_on_host: bool = False
    """keep the replay buffers in host memory (the same jitted functions placed on the CPU device) when they do not fit the accelerator"""
    overlap_env: bool = True
    """step the environments while the device learns: actions then use the params from before the previous vector step's updates (a one-step policy lag); --no-overlap-env is strictly sequential"""


class ConfigError(ValueError):
    """A flag value that cannot work; the message is one line."""


def check_args(args: Args) -> None:
    if args.upload_model and not args.save_model:
        raise ConfigError("--upload-model uploads the saved model: add --save-model")
    positive = ["num_envs", "eval_num_envs", "max_episode_steps", "total_timesteps", "buffer_size", "batch_size", "n_step",
                "target_network_frequency", "train_frequency", "eval_frequency", "eval_steps", "log_frequency",
                "epsilon_decay_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in ["teacher_steps", "offline_steps", "learning_starts", "distill_coef", "distill_decay_period", "td_coef",
                 "offline_eval_frequency", "cql_coef", "margin_coef", "margin", "jsrl_max_roll_in_steps", "jsrl_roll_in_decay",
                 "epsilon_warmup_steps", "checkpoint_minutes", "per_alpha", "per_beta", "noisy_sigma0"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    for name in ["cql_temperature", "jsrl_decay_period", "keep_checkpoints"]:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    if args.online_learning_rate is not None and args.online_learning_rate <= 0:
        raise ConfigError(f"--online-learning-rate must be > 0 (got {args.online_learning_rate})")
    if args.checkpoint_frequency is not None and args.checkpoint_frequency < 0:
        raise ConfigError(f"--checkpoint-frequency must be >= 0 (got {args.checkpoint_frequency}; 0 disables checkpoints)")
    if args.updates_per_call is not None and args.updates_per_call <= 0:
        raise ConfigError(f"--updates-per-call must be > 0 (got {args.updates_per_call})")
    if args.eval_episodes is not None and args.eval_episodes <= 0:
        raise ConfigError(f"--eval-episodes must be > 0 (got {args.eval_episodes})")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    if args.num_atoms < 2:
        raise ConfigError(f"--num-atoms must be >= 2 (got {args.num_atoms})")
    if not args.v_min < args.v_max:
        raise ConfigError(f"--v-min must be below --v-max (got {args.v_min} and {args.v_max})")
    if args.offline_steps > 0 and args.teacher_data != "dopamine-replay" and args.teacher_steps < args.batch_size + (args.n_step + 4) * args.num_envs:
        raise ConfigError(f"--teacher-steps {args.teacher_steps} is too few to sample batches of {args.batch_size} for --offline-steps; collect more or pass --offline-steps 0")
    if args.buffer_size < max(args.learning_starts, args.batch_size + (args.n_step + 4) * args.num_envs):
        raise ConfigError(f"--buffer-size {args.buffer_size} is smaller than what the online phase needs (--learning-starts {args.learning_starts}, a batch of {args.batch_size}); raise it")
    for name in ["start_e", "end_e", "eval_epsilon", "teacher_epsilon", "rehearsal_ratio", "jsrl_guide_prob"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")


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
    lam = max(1.0 - tu.teacher_normalized_score(student_return, teacher_return, random_return), 0.0)
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


def online_epsilon(args: "Args", offline_updates: int, agent_step: int) -> float:
    """Epsilon of the online action at agent_step (counted from 0): the reference's epsilon_fn of its training_steps
    after the training step that precedes the action (Dopamine's begin_episode and step run _train_step, then
    select_action), offline updates included: offline_updates + agent_step + 1. Dopamine's linearly_decaying_epsilon
    (start_e for the warm-up, then linear over epsilon_decay_steps); the reference's persistence variant has no
    warm-up (epsilon_warmup_steps 0). Noisy nets explore by their noise: end_e (Dopamine 4.0.6's identity_epsilon)."""
    if args.noisy:
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


def online_schedule(args: "Args", lam: float, student_return: float | None, teacher_return: float | None, random_return: float,
                    online_steps: int) -> tuple[float, float, str]:
    """(lambda, learning rate, reason) after an online evaluation, as the method runs them: lambda follows the
    student's teacher-normalized score (or stays 1: --no-decay-lambda, dagger, ql-dagger; no teacher: tabula rasa);
    the learning rate follows lambda, or is constant (--online-learning-rate)."""
    reason = ""
    if args.decay_lambda and args.method != "tabula-rasa":
        lam, reason = distill_lambda_update(lam, student_return, teacher_return, random_return, online_steps, args.distill_decay_period,
                                            args.clip_lambda)
    return lam, args.online_learning_rate or lambda_learning_rate(lam, args.learning_rate, args.end_learning_rate), reason


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


def qdagger_rainbow_loss(logits: jax.Array, actions: jax.Array, target_probs: jax.Array, teacher_q: jax.Array, support: jax.Array,
                         weights: jax.Array, distill_weight: jax.Array, temperature: float, td_weight: float = 1.0,
                         cql_weight: float = 0.0, cql_temperature: float = 0.1, margin_weight: float = 0.0,
                         margin: float = 1.0) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """L = mean_i w_i (td_weight * CE_i + lambda * c * KL_i + cql_weight * CQL_i + margin_weight * margin_i), on the
    student's expected Q over atoms; distill_weight is lambda * c. Returns (L, (metrics, per-sample CE for the priorities))."""
    td = c51_loss(logits, actions, target_probs)
    q = expected_q(logits, support)
    td_loss = jnp.mean(weights * td)
    # A term whose weight is 0 is logged as 0 (the teacher is not even queried then: teacher_q is a placeholder).
    distill = jnp.where(distill_weight > 0, jnp.mean(weights * distillation_kl(teacher_q, q, temperature)), 0.0)
    cql = jnp.where(cql_weight > 0, jnp.mean(weights * cql_loss(q, actions, cql_temperature)), 0.0)
    expert = jnp.argmax(jax.lax.stop_gradient(teacher_q), axis=-1)
    marg = jnp.where(margin_weight > 0, jnp.mean(weights * margin_loss(q, expert, margin)), 0.0)
    loss = td_weight * td_loss + distill_weight * distill + cql_weight * cql + margin_weight * marg
    q_taken = jnp.take_along_axis(q, actions[:, None], axis=-1)[:, 0]
    return loss, ({"td_loss": td_loss, "distill_loss": distill, "cql_loss": cql, "margin_loss": marg, "loss": loss,
                   "q_values": jnp.mean(q_taken)}, td)


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


def phase_coefs(args: Args, lam: float, lr: float, offline: bool) -> Coefs:
    """A phase's loss weights: TD; lambda * c for distillation; CQL offline only (pretrained_dqn_agent.py); the
    margin weight c offline (lambda = 1) and lambda^2 * c online: margin_dqn_agent.py passes margin_coefficient *
    loss_decay to a loss that multiplies its regulariser by loss_decay again."""
    return coefs(args.td_coef, lam * args.distill_coef, lr, cql=args.cql_coef if offline else 0.0,
                 margin=lam * args.margin_coef if offline else lam * lam * args.margin_coef)


def sync_target(state: QState, now) -> QState:
    return state.replace(target_params=jax.tree.map(lambda t, p: jnp.where(now, p, t), state.target_params, state.params))


def make_update(student: RainbowNetwork, support: jax.Array, temperature: float, double_dqn: bool = False, cql_temperature: float = 0.1,
                margin: float = 1.0):
    """One QDagger gradient step: (state, batch, teacher_q, coefs, key) -> (state, metrics, per-sample CE).
    Noise keys as Dopamine's train step: one key for the online forward pass, another shared by the target
    network's and (double DQN) the online network's forward passes on the next states."""

    def update(state: QState, batch: Batch, teacher_q, c: Coefs, key):
        k_online, k_target = jax.random.split(key)
        next_logits_target = student.apply(state.target_params, batch.next_obs, key=k_target)
        next_logits_online = student.apply(state.params, batch.next_obs, key=k_target) if double_dqn else None
        target_probs = c51_target(next_logits_target, next_logits_online, batch.returns, batch.discounts, support, double_dqn)

        def loss_fn(params):
            logits = student.apply(params, batch.obs, key=k_online)
            return qdagger_rainbow_loss(logits, batch.actions, target_probs, teacher_q, support, batch.weights, c.distill, temperature, c.td,
                                        c.cql, cql_temperature, c.margin, margin)

        grads, (metrics, td) = jax.grad(loss_fn, has_aux=True)(state.params)
        state.opt_state.hyperparams["learning_rate"] = c.lr
        return state.apply_gradients(grads=grads), metrics, td

    return update


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


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


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


def fused_scan(body, carry, k: int):
    """lax.scan(body, carry, arange(k)) on accelerators; on XLA:CPU the k steps are written out one after the other
    (no loop at all: a loop of even one trip slows the convolutions in it ~7x there)."""
    if not on_cpu():
        return jax.lax.scan(body, carry, jnp.arange(k))
    outs = []
    for i in range(k):
        carry, out = body(carry, jnp.int32(i))
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


class Learner(NamedTuple):
    """The jitted hot paths of the offline and online phases, built from the pure functions above."""

    offline: callable  # (state, teacher_rb, key, step0, k, coefs) -> (state, key, metrics (k, ...)): k (static) fused updates
    online: callable  # (state, rb, teacher_rb, key, transition..., teacher_params, coefs, n_updates=) -> (state, rb, key, metrics)
    store: callable  # (rb, transition..., teacher_params) -> rb: a step the student acted on, its teacher Q computed inside
    add: callable  # (rb, first_stream, transition..., teacher_q) -> rb
    sample: callable  # (rb, teacher_rb, key) -> (batch, ok, rehearsed mask): a prioritized online batch
    sample_teacher: callable  # (teacher_rb, key) -> (batch, ok): a uniform batch of the teacher data
    update: callable  # (state, batch, coefs, key) -> (state, metrics, per-sample CE)
    set_priorities: callable  # (rb, index, per-sample CE, keep) -> rb
    sync: callable  # state -> state with target = online params


METRICS = ("td_loss", "distill_loss", "cql_loss", "margin_loss", "loss", "q_values", "priority_mean", "rehearsal_share")


def make_learner(args: Args, student: RainbowNetwork, support: jax.Array, num_actions: int, teacher_q_fn=None) -> Learner:
    """Every buffer caches the teacher's Q-values of its states (the teacher data when it is made, the student's
    replay when a step is stored: one teacher forward per agent step instead of a batch per update), so no update
    runs the teacher."""
    update = make_update(student, support, args.temperature, args.double_dqn, args.cql_temperature, args.margin)
    sample_uniform = functools.partial(replay_sample, batch_size=args.batch_size, n_step=args.n_step, gamma=args.gamma)
    sample_prioritized = functools.partial(replay_sample_prioritized, batch_size=args.batch_size, n_step=args.n_step,
                                           gamma=args.gamma, beta=args.per_beta)
    offline_target_every = max(args.target_network_frequency // args.train_frequency, 1)
    zero_metrics = {k: jnp.float32(0) for k in METRICS} | {"sample_ok": jnp.bool_(True)}

    def update_cached(state, batch: Batch, c: Coefs, key):
        # Without a teacher the buffer caches nothing (0 columns): the teacher's terms have weight 0 then.
        teacher_q = batch.teacher_q if batch.teacher_q.shape[-1] else jnp.zeros((batch.obs.shape[0], num_actions), jnp.float32)
        return update(state, batch, teacher_q, c, key)

    def set_priorities(rb, index, td, keep):
        """priority = (CE + 1e-10)^alpha for the sampled rows of the student's replay (`keep`), not rehearsed ones."""
        return replay_set_priorities(rb, index, td, args.per_alpha, keep)

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

    @functools.partial(jax.jit, donate_argnums=0, static_argnums=4)
    def offline(state, trb, key, step0, k, c: Coefs):
        """k (static) fused updates on the teacher data, sampled uniformly, the target synced at the same update
        counts as one by one."""

        def body(carry, i):
            state, key = carry
            key, sk, uk = jax.random.split(key, 3)
            batch, ok = sample_uniform(trb, sk)
            state, m, td = update_cached(state, batch, c, uk)
            # The reference syncs when its counter of finished updates is a multiple: after updates 1, 1 + every, ...
            state = sync_target(state, (step0 + i) % offline_target_every == 0)
            return (state, key), m | {"priority_mean": jnp.float32(0), "rehearsal_share": jnp.float32(0), "sample_ok": ok}

        (state, key), metrics = fused_scan(body, (state, key), k)
        return state, key, metrics

    def one_update(state, rb, trb, key, c):
        key, sk, uk = jax.random.split(key, 3)
        batch, ok, rehearsed = sample_online(rb, trb, sk)
        state, m, td = update_cached(state, batch, c, uk)
        rb = set_priorities(rb, batch.index, td, ~rehearsed)
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
        """Store one vector step (store_acted: the teacher's Q of its states computed in this call), then run the
        n_updates (static: it takes at most three values, 0 during the warm-up, then the floor and ceiling of
        num_envs / train_frequency) updates due after it, each writing its samples' new priorities before the next
        samples; then the target sync if `sync` (traced: no separate call to compile and dispatch when one falls due)."""
        rb = store_acted(rb, obs, actions, rewards, terminated, truncated, next_obs, teacher_params)
        metrics = zero_metrics
        for _ in range(n_updates):
            state, rb, key, metrics = one_update(state, rb, trb, key, c)
        return sync_target(state, sync), rb, key, metrics

    return Learner(offline=offline, online=jax.jit(online_step, donate_argnums=(0, 1), static_argnames="n_updates"),
                   store=jax.jit(store_acted, donate_argnums=0),
                   add=jax.jit(functools.partial(replay_add, n_step=args.n_step), donate_argnums=0, static_argnums=1),
                   sample=jax.jit(sample_online), sample_teacher=jax.jit(sample_uniform), update=jax.jit(update_cached), set_priorities=jax.jit(set_priorities, donate_argnums=0),
                   sync=jax.jit(lambda s: sync_target(s, True), donate_argnums=0))


def offline_on_host_replay(learner: Learner, state, trb, key, step0: int, n: int, c: Coefs, target_every: int, compute_device):
    """`Learner.offline` split for --replay-on-host: each batch sampled where the teacher data lives (the CPU), the
    update on the accelerator; the same pure functions, keys and target syncs, so the results are the same."""
    metrics = []
    for i in range(n):
        key, sk, uk = jax.random.split(key, 3)
        batch, ok = learner.sample_teacher(trb, sk)
        state, m, _ = learner.update(state, jax.device_put(batch, compute_device), c, uk)
        if (step0 + i) % target_every == 0:
            state = learner.sync(state)
        metrics.append(m | {"priority_mean": jnp.float32(0), "rehearsal_share": jnp.float32(0), "sample_ok": ok})
    return state, key, jax.tree.map(lambda *x: jnp.stack(x), *metrics)


def learn_on_host_replay(learner: Learner, state, rb, trb, key, transition, n_updates: int, c: Coefs, compute_device, alpha: float):
    """`Learner.online` split for --replay-on-host: the buffer functions run where the buffer lives (the CPU), the
    update on the accelerator; the same pure functions and PRNG keys, so the results are the same."""
    rb = learner.add(rb, 0, *transition)
    replay_device = rb.frames.devices().pop()
    metrics = None
    for _ in range(n_updates):
        key, sk, uk = jax.random.split(key, 3)
        batch, ok, rehearsed = learner.sample(rb, trb, sk)
        state, metrics, td = learner.update(state, jax.device_put(batch, compute_device), c, uk)
        rb = learner.set_priorities(rb, batch.index, jax.device_put(td, replay_device), ~rehearsed)
        metrics = metrics | {"priority_mean": jnp.mean((td + 1e-10) ** alpha), "rehearsal_share": jnp.mean(rehearsed.astype(jnp.float32)),
                             "sample_ok": ok}
    return state, rb, key, metrics


# ----------------------------------------------------------------------------
# Evaluation: Dopamine's protocol
# ----------------------------------------------------------------------------
def evaluate(act, params, envs: tu.DopamineAtariEnvs, max_steps: int, epsilon: float, key, desc: str = "eval",
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


class SteadyRate:
    """Units per second from `start()` on (so the compilation in a phase's first call is not counted), with
    `pause()`d seconds (evaluations) excluded: the phase's steady-state speed."""

    def __init__(self):
        self.t, self.n0, self.paused = None, 0, 0.0

    def start(self, n: int) -> None:
        if self.t is None:
            self.t, self.n0 = time.time(), n

    def pause(self, seconds: float) -> None:
        self.paused += seconds if self.t is not None else 0.0

    def __call__(self, n: int) -> float:
        return (n - self.n0) / max(time.time() - self.t - self.paused, 1e-9) if self.t is not None and n > self.n0 else float("nan")


def save_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
# Methods: what each baseline of the paper changes (README "Methods"); flags passed explicitly still win
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

# Flags that do not change what is learned: a resumed run may change them; every other flag must match.
RUNTIME_FLAGS = {"track", "wandb_project_name", "wandb_entity", "capture_video", "save_model", "upload_model", "hf_entity", "run_name", "resume",
                 "checkpoint_frequency", "checkpoint_minutes", "keep_checkpoints", "log_frequency", "updates_per_call", "replay_on_host"}


def resolve_method(args: Args, explicit: set[str]) -> Args:
    """--method's settings, except for the flags given explicitly."""
    return dataclasses.replace(args, **{k: v for k, v in METHODS[args.method].items() if k not in explicit})


def parse_args(argv: list[str] | None = None) -> Args:
    argv = sys.argv[1:] if argv is None else list(argv)
    return resolve_method(tu.parse_args(Args, argv), tu.explicit_fields(Args, argv))


class Interrupted(Exception):
    """SIGINT/SIGTERM was handled: a checkpoint is written; the message says how to resume."""


# ----------------------------------------------------------------------------
# Checkpoint pieces: arrays by name (no pickle), restored into fresh templates
# ----------------------------------------------------------------------------
def tree_arrays(prefix: str, tree) -> dict:
    return {f"{prefix}.{i}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def tree_from(ckpt, prefix: str, template, device):
    leaves = jax.tree.leaves(template)
    loaded = [tu.read_checkpoint_array(ckpt, f"{prefix}.{i}") for i in range(len(leaves))]
    for a, b in zip(leaves, loaded):
        if np.shape(a) != b.shape:
            raise ConfigError(f"{ckpt}: {prefix} has a {b.shape} array where this run has {np.shape(a)}; it was written by another configuration")
    return jax.device_put(jax.tree.unflatten(jax.tree.structure(template), [b.astype(a.dtype if hasattr(a, 'dtype') else np.asarray(a).dtype) for a, b in zip(leaves, loaded)]), device)


def replay_from(ckpt, prefix: str, device) -> Replay:
    return Replay(**{f: jax.device_put(tu.read_checkpoint_array(ckpt, f"{prefix}.{f}"), device) for f in Replay._fields})


def replay_arrays(prefix: str, rb: Replay) -> dict:
    return {f"{prefix}.{f}": getattr(rb, f) for f in Replay._fields}


def fast_forward(envs, actions: np.ndarray, desc: str) -> np.ndarray:
    """envpool is deterministic given its seed and the actions: replaying a phase's actions on fresh envs restores
    their exact state (emulators, sticky-action RNGs, episode steps). Returns the last observation."""
    obs, _ = envs.reset()
    for a in tqdm(actions, desc=desc, file=sys.stderr, mininterval=2.0, leave=False):
        obs, *_ = envs.step(a)
    return obs


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(args: Args) -> None:
    check_args(args)
    tu.check_env_id(args.env_id)
    game = tu.game_from_env_id(args.env_id)
    random_return = tu.random_score(game)
    tu.check_wandb(args.track)
    # Before the run, so that a missing or refused Hub login is told now and not after it.
    hub_repo = f"{tu.check_hub_login(args.hf_entity)}/{tu.hub_repo_name(dataclasses.asdict(args))}" if args.upload_model else None
    uses_teacher = args.method != "tabula-rasa"
    jsrl = args.method == "jsrl"
    offline = uses_teacher and args.offline_steps > 0
    need_teacher_data = uses_teacher and (offline or args.rehearsal_ratio > 0)

    # The run folder: a new unique one, or (--resume) an earlier run with the same algorithm flags.
    resume = None
    if args.resume:
        if not args.run_name:
            raise ConfigError("--resume needs the run to continue: --run-name NAME (its folder under runs/) or its path")
        run_dir = Path(args.run_name) if Path(args.run_name).is_dir() else Path("runs") / args.run_name
        if not (run_dir / "args.json").is_file():
            raise ConfigError(f"no run to resume at {run_dir} (no args.json); pass the name of a folder under runs/")
        saved = json.loads((run_dir / "args.json").read_text())
        differ = [f"--{k.replace('_', '-')} (was {saved[k]!r}, now {getattr(args, k)!r})" for k in saved
                  if k not in RUNTIME_FLAGS and hasattr(args, k) and saved[k] != getattr(args, k)]
        if differ:
            raise ConfigError(f"cannot resume {run_dir} with different algorithm flags: {', '.join(differ)}; pass the run's own values")
        resume = tu.latest_checkpoint(run_dir / "checkpoints")
        if resume is None:
            raise ConfigError(f"{run_dir} has no complete checkpoint; start the run again without --resume")
    else:
        run_dir = Path("runs") / (args.run_name or tu.default_run_name(args.env_id, args.exp_name, args.method, args.seed))
        if run_dir.is_dir() and any(not f.name.startswith(".") for f in run_dir.iterdir()):  # (.lock: a start that failed its checks)
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or another --run-name")
    run_name = run_dir.name
    resume_name = run_name if run_dir == Path("runs") / run_name else str(run_dir)  # what --resume --run-name needs
    ckpt_dir, meta = run_dir / "checkpoints", (resume[1] if resume else {})
    phase = meta.get("phase", "teacher_eval")
    if phase == "done":
        print(f"{run_dir} finished already; nothing to resume")
        if hub_repo:
            print(f"model uploaded to {tu.upload_hf(run_dir, hub_repo)}")
        return

    compute_device = jax.devices()[0]
    # Keys committed to the device from the start: a jitted call first fed an uncommitted key, then the committed key
    # it returned, compiles twice (a compilation inside the timed, steady part of a phase).
    key, student_key, offline_key, online_key = jax.device_put(list(jax.random.split(jax.random.PRNGKey(args.seed), 4)), compute_device)
    replay_device = jax.devices("cpu")[0] if args.replay_on_host else compute_device
    env_kwargs = dict(max_episode_steps=args.max_episode_steps)
    probe_envs = tu.make_teacher_envs(args.env_id, 1, seed=args.seed, **env_kwargs)
    num_actions = probe_envs.num_actions
    probe_envs.close()

    # Teacher: raises a one-line TeacherError if unreachable, corrupt or of another game. None for tabula rasa.
    source = args.teacher_checkpoint or f"gs://rl_checkpoints/DQN_400/{game}/1"
    teacher_ckpt = teacher_q_fn = teacher_params = None
    teacher_env_kwargs = env_kwargs
    if uses_teacher:
        teacher_ckpt = tu.load_teacher(source, num_actions=num_actions, iteration=args.teacher_iteration)
        teacher_q_fn, teacher_params = teacher_ckpt.q_values, jax.device_put(teacher_ckpt.params, compute_device)
        teacher_env_kwargs = {**env_kwargs, **teacher_ckpt.env_kwargs}  # the inputs it was trained on
        print(f"teacher: {teacher_ckpt.kind} {teacher_ckpt.architecture} {teacher_ckpt.path} (iteration {teacher_ckpt.iteration}, "
              f"{num_actions} actions{', its own envs: ' + str(teacher_ckpt.env_kwargs) if teacher_ckpt.env_kwargs else ''})")
        if resume and meta["teacher"]["digest"] != tu.params_digest(teacher_ckpt.params):
            raise ConfigError(f"the teacher at {source} is not the one {run_dir} was trained with (its parameters differ); pass that teacher")
    else:
        print(f"teacher: none (--method {args.method})")
    if (args.distill_coef > 0 or args.margin_coef > 0 or args.init_from_teacher or jsrl) and not uses_teacher:
        raise ConfigError(f"--method {args.method} has no teacher, but --distill-coef/--margin-coef/--init-from-teacher use one")

    # Sizes are checked before any work is spent: buffers against memory, a checkpoint against the disk.
    dopamine = need_teacher_data and args.teacher_data in ("dopamine-replay", "both")
    rollout_steps = args.teacher_steps if need_teacher_data and args.teacher_data in ("rollout", "both") else 0
    rollout_rows = -(-(rollout_steps + 8 * args.num_envs) // args.num_envs) if rollout_steps else 0
    dopamine_replay = None
    if dopamine and (phase == "teacher_eval" or (phase == "collect" and not meta.get("progress", {}).get("collected"))):
        dopamine_replay = tu.load_dopamine_replay(source, iteration=teacher_ckpt.iteration, update_horizon=args.n_step, gamma=args.gamma)
        print(f"teacher replay: {dopamine_replay.path} (iteration {dopamine_replay.iteration}, {dopamine_replay.capacity} rows, "
              f"{len(dopamine_replay.valid_indices())} valid transitions for n = {args.n_step})")
        if dopamine_replay.actions.max(initial=0) >= num_actions or dopamine_replay.actions.min(initial=0) < 0:
            raise ConfigError(f"the teacher replay in {dopamine_replay.path} has actions up to {dopamine_replay.actions.max()} but {args.env_id} "
                              f"has {num_actions}: it belongs to another game; pass that game's --env-id or --teacher-data rollout")
    dopamine_rows = meta.get("dopamine_rows", dopamine_replay.capacity if dopamine_replay is not None else 0)
    teacher_lengths = ([dopamine_rows] if dopamine else []) + [rollout_rows] * (args.num_envs if rollout_rows else 0)
    online_lengths = [-(-args.buffer_size // args.num_envs)] * args.num_envs
    # The student's replay caches the teacher's Q of each state while a loss term may use it.
    online_q_dim = num_actions if uses_teacher and (args.distill_coef > 0 or args.margin_coef > 0) else 0
    teacher_bytes = replay_bytes(teacher_lengths, num_actions) if need_teacher_data else 0
    online_bytes = replay_bytes(online_lengths, online_q_dim, prioritized=True)
    both = args.rehearsal_ratio > 0 or (offline and args.offline_acting)  # the teacher data and the student's replay at once
    memory_check(teacher_bytes + online_bytes if both else max(teacher_bytes, online_bytes), replay_device, "the replay buffers")
    checkpoints_on = args.checkpoint_frequency != 0
    # A new checkpoint is complete before the oldest is deleted: keep + 1 copies of a phase's buffers at the peak,
    # beside the teacher data (written once).
    copies = args.keep_checkpoints + 1
    peak = max(copies * teacher_bytes, teacher_bytes + copies * online_bytes) if checkpoints_on else 0
    tu.check_output_folder(run_dir, peak + (1 << 27), "the checkpoints and the logs")
    tu.lock_run_folder(run_dir)  # one process per run folder (a resubmitted job while the first still runs)

    # Logs. On resume, event records written after the checkpoint are cut off, so no step is logged twice.
    for f in run_dir.glob("events.out.tfevents.*"):
        if resume and f.name in meta["events"]:
            os.truncate(f, meta["events"][f.name])
        elif resume:
            f.unlink()
    if args.track:
        import wandb

        try:  # a resumed run continues its own W&B run
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args), name=run_name,
                       id=meta.get("wandb_id") or __import__("secrets").token_hex(4), resume="allow", save_code=True)
        except Exception as e:  # noqa: BLE001 - W&B raises many kinds; the user needs one line
            raise tu.RunError(f"Weights & Biases could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"check `wandb login` and the network, or set WANDB_MODE=offline") from None
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(run_dir), flush_secs=30)
    if not resume:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        save_atomic(str(run_dir / "args.json"), json.dumps(dataclasses.asdict(args), indent=2).encode())
    preset = {k: getattr(args, k) for k in METHODS[args.method]}
    print(f"run folder: {run_dir}" + (f" (resumed from {resume[0].name}, phase {phase})" if resume else ""))
    print(f"method: {args.method}" + (f" ({', '.join(f'{k}={v}' for k, v in preset.items())})" if preset else ""))

    support = make_support(args)
    student = make_student(args, num_actions)
    student_params = student.init(student_key, np.zeros((1, 4, 84, 84), np.uint8))
    target_params = student_params
    if args.init_from_teacher:  # fine-tuning: the student starts as the teacher
        shapes = lambda tree: jax.tree.map(np.shape, flax.core.unfreeze(tree))  # noqa: E731
        if shapes(teacher_ckpt.params) != shapes(student_params):
            raise ConfigError(f"--init-from-teacher (--method finetune) needs a teacher with the student's architecture; the teacher is "
                              f"{teacher_ckpt.architecture}, the student a Rainbow --network {args.network}: pass a Rainbow run "
                              f"of this script with the same network flags, or another --method")
        student_params = jax.tree.map(jnp.array, teacher_ckpt.params)
        # The teacher's own target network too, where its checkpoint holds one (ReloadedDQNAgent.reload_checkpoint).
        target_params = jax.tree.map(jnp.array, teacher_ckpt.target_params or teacher_ckpt.params)
        probe = np.random.default_rng(0).integers(0, 256, (8, 4, 84, 84), np.uint8)
        gap = float(jnp.abs(expected_q(student.apply(student_params, probe), support) - teacher_q_fn(teacher_params, probe)).max())
        print(f"student initialised from the teacher: max |Q_student - Q_teacher| on 8 states = {gap:g}; its target network from the "
              f"teacher's {'target network' if teacher_ckpt.target_params else 'weights (the teacher has no target network)'}")
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=np.asarray(args.learning_rate, np.float32),
                                                     eps=args.adam_eps)  # a strong float32: a weak type would recompile the jitted steps once
    # A separate target copy: the jitted steps donate the state, and one buffer cannot be donated twice.
    state = jax.device_put(QState.create(apply_fn=student.apply, params=student_params, target_params=jax.tree.map(jnp.copy, target_params),
                                         tx=optimizer), compute_device)
    learner = make_learner(args, student, support, num_actions, teacher_q_fn)
    # The learning calls are launched by this one-thread pool, the launcher: on a GPU a launch holds the thread that
    # makes it (the host steps the updates' kernels) while jaxlib releases the GIL, so the main thread takes the envs'
    # step and its bookkeeping meanwhile. Each call's results are taken before anything reads them: the same calls in
    # the same order as one thread makes them, so the same results.
    launcher = ThreadPoolExecutor(1, thread_name_prefix="launcher")
    # Training actions draw fresh noise (noisy nets); evaluations use the mean weights.
    act_student = make_act(lambda p, o, k: expected_q(student.apply(p, o, key=k), support))
    act_student_eval = make_act(lambda p, o, k: expected_q(student.apply(p, o), support))
    act_teacher = make_act(lambda p, o, k: teacher_q_fn(p, o)) if uses_teacher else None
    act_jsrl = make_act_jsrl(lambda p, o, k: expected_q(student.apply(p, o, key=k), support), teacher_q_fn) if jsrl else None
    teacher_q_jit = jax.jit(teacher_q_fn) if uses_teacher and args.replay_on_host else None

    def host_replay_step(step: tuple, distilling: bool) -> tuple:
        """--replay-on-host: a step the student acted on, for the host replay (its newest frames), with the teacher's
        Q of its states computed on the accelerator first (zeros once lambda is 0 for good: no loss reads them)."""
        teacher_q = None
        if online_q_dim:
            teacher_q = teacher_q_jit(teacher_params, step[0]) if distilling else np.zeros((step[0].shape[0], online_q_dim), np.float32)
        return replay_step((*step, teacher_q), replay_device, True)

    progress = dict(meta.get("progress", {}))
    teacher_return = meta.get("teacher_return")
    seq = meta.get("seq", 0)
    if resume:
        state = tree_from(resume[0], "state", state, compute_device)
        key, offline_key, online_key = jax.device_put(list(tu.read_checkpoint_array(resume[0], "keys")), compute_device)
    interrupt = tu.Interrupt()
    last_checkpoint = time.time()
    teacher_rb = None
    teacher_data_saved = False

    def save_teacher_data() -> None:
        """The teacher data is immutable once built: written once, beside the checkpoints, read by every later resume."""
        nonlocal teacher_data_saved
        rows = int(jnp.minimum(teacher_rb.count, teacher_rb.length).sum())
        tu.write_checkpoint(ckpt_dir / "teacher_data", 0, replay_arrays("teacher_rb", teacher_rb), dict(rows=rows), 1)
        teacher_data_saved = True

    def checkpoint(phase: str, arrays: dict | None = None, force: bool = False) -> None:
        """Write the run's complete state (see README "Resuming"), unless checkpoints are off."""
        nonlocal seq, last_checkpoint
        if not checkpoints_on and not force:
            return
        if teacher_rb is not None and not teacher_data_saved and (phase == "offline" or (phase == "online" and args.rehearsal_ratio > 0)):
            save_teacher_data()  # checkpoints off, then an interrupt: the resume needs it
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params)):
            raise ConfigError(f"the student's parameters are not finite in phase {phase}; the last good checkpoint is kept (lower --learning-rate)")
        writer.flush()
        seq += 1
        meta = dict(seq=seq, phase=phase, progress=progress, teacher_return=teacher_return, dopamine_rows=dopamine_rows,
                    events={f.name: f.stat().st_size for f in run_dir.glob("events.out.tfevents.*")},
                    wandb_id=wandb.run.id if args.track else None,
                    teacher=dict(source=str(source), iteration=teacher_ckpt.iteration, digest=tu.params_digest(teacher_ckpt.params)) if uses_teacher else dict(digest=None))
        tu.write_checkpoint(ckpt_dir, seq, {**tree_arrays("state", state), "keys": np.stack([key, offline_key, online_key]), **(arrays or {})},
                            meta, args.keep_checkpoints)
        last_checkpoint = time.time()

    def due(count: int, last: int, every: int) -> bool:
        minutes = args.checkpoint_minutes > 0 and time.time() - last_checkpoint > 60 * args.checkpoint_minutes
        return checkpoints_on and (count // every > last // every or minutes)

    def stop(phase: str, arrays: dict | None = None) -> None:
        """On SIGINT/SIGTERM: checkpoint (even with checkpoints off: it is the only way to keep the work) and leave."""
        if interrupt.requested:
            checkpoint(phase, arrays, force=True)
            raise Interrupted(f"{interrupt.requested} in phase {phase}: checkpoint written; resume with "
                              f"`python {os.path.basename(__file__)} --resume --run-name {resume_name}`")

    def evaluate_student(params, desc, seed_offset, frames=None):
        k = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(args.seed), seed_offset), compute_device)  # apart from the training keys: a rerun after a resume is the same
        envs = tu.make_teacher_envs(args.env_id, args.eval_num_envs, seed=args.seed + seed_offset, **env_kwargs)
        try:
            return evaluate(act_student_eval, params, envs, args.eval_steps, args.eval_epsilon, k, desc=desc, frames=frames,
                            max_episodes=args.eval_episodes, stop=lambda: interrupt.requested)
        finally:
            envs.close()

    def teacher_normalized(student_return):
        if student_return is None or teacher_return is None or teacher_return <= random_return:
            return None
        return tu.teacher_normalized_score(student_return, teacher_return, random_return)

    try:
        # (a) Teacher evaluation -> G_T, on the envs the teacher was trained on
        if phase == "teacher_eval":
            if uses_teacher:
                t0 = time.time()
                key, k = jax.random.split(key)
                eval_envs = tu.make_teacher_envs(args.env_id, args.eval_num_envs, seed=args.seed + 10_000, **teacher_env_kwargs)
                returns, lengths, steps = evaluate(act_teacher, teacher_params, eval_envs, args.eval_steps, args.eval_epsilon, k,
                                                   desc="teacher eval", max_episodes=args.eval_episodes, stop=lambda: interrupt.requested)
                eval_envs.close()
                stop("teacher_eval")
                teacher_return = float(np.mean(returns)) if returns else None
                for i, (r, l) in enumerate(zip(returns, lengths)):
                    writer.add_scalar("teacher/episodic_return", r, i)
                    writer.add_scalar("teacher/episodic_length", l, i)
                if teacher_return is not None:
                    writer.add_scalar("teacher/mean_return", teacher_return, 0)
                print(f"(a) {summary('teacher', returns, steps)}; random score {random_return:g} [{steps / (time.time() - t0):.0f} agent steps/s]")
            else:
                print(f"(a) teacher evaluation: skipped (--method {args.method}: no teacher)")
            phase, progress = "collect", dict(collected=0)

        # (b) Teacher data: the teacher's own Dopamine replay and/or roll-outs, with the teacher's Q-values cached
        if need_teacher_data and phase == "collect":
            t0 = time.time()
            if "collected" in progress and progress["collected"] > 0:  # resumed mid-way
                teacher_rb = replay_from(resume[0], "teacher_rb", replay_device)
            else:
                teacher_rb = make_replay(teacher_lengths, num_actions, replay_device)
                if dopamine:
                    teacher_rb = replay_fill_from_dopamine(teacher_rb, dopamine_replay, 0)
                    teacher_rb = teacher_q_for_rows(teacher_q_fn, teacher_params, teacher_rb, 0, compute_device)
            dopamine_replay = None
            envs = tu.make_teacher_envs(args.env_id, args.num_envs, seed=args.seed, **teacher_env_kwargs)
            collected = progress["collected"]
            action_log = np.zeros((-(-rollout_steps // args.num_envs), args.num_envs), np.uint8)  # the phase's actions, for an exact resume
            if collected:
                action_log[: collected // args.num_envs] = tu.read_checkpoint_array(resume[0], "action_log")
            obs = fast_forward(envs, action_log[: collected // args.num_envs], "restoring the envs (exact resume)") if collected else envs.reset()[0]
            pending, pending_q, collect_rate = None, None, SteadyRate()

            def store_pending():
                nonlocal teacher_rb, pending
                if pending is not None:
                    teacher_rb = learner.add(teacher_rb, int(dopamine), *replay_step((*pending, obs_dev, pending_q), replay_device, args.replay_on_host))
                    pending = None

            def collect_arrays():
                return {**replay_arrays("teacher_rb", teacher_rb), "action_log": action_log[: collected // args.num_envs]}

            obs_dev = jax.device_put(obs, compute_device)  # each observation crosses to the device once: acted on, then stored
            with tqdm(total=rollout_steps, initial=collected, desc="teacher data", file=sys.stderr, mininterval=2.0) as bar:
                while collected < rollout_steps:
                    actions_dev, teacher_q, key = act_teacher(teacher_params, obs_dev, key, args.teacher_epsilon)
                    actions = np.asarray(actions_dev)
                    envs.send(actions)
                    store_pending()  # the previous step, stored while the emulators step
                    next_obs, reward, terminated, truncated, _ = envs.recv()
                    action_log[collected // args.num_envs] = actions
                    pending, pending_q = (obs_dev, actions_dev, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated), teacher_q
                    obs, obs_dev = next_obs, jax.device_put(next_obs, compute_device)
                    collected += args.num_envs
                    bar.update(args.num_envs)
                    if collected >= 2 * args.num_envs:
                        collect_rate.start(collected)  # the first two steps compiled act and add
                    if interrupt.requested or due(collected, collected - args.num_envs, args.checkpoint_frequency or 250_000):
                        store_pending()
                        progress = dict(collected=collected)
                        stop("collect", collect_arrays())
                        checkpoint("collect", collect_arrays())
            store_pending()
            envs.close()
            rows = int(jnp.minimum(teacher_rb.count, teacher_rb.length).sum())
            print(f"(b) teacher data: {rows} rows ({'Dopamine replay' if dopamine else ''}{' + ' if dopamine and rollout_steps else ''}"
                  f"{f'{collected} roll-out agent steps' if rollout_steps else ''}), {teacher_bytes / max(sum(teacher_lengths), 1):.0f} "
                  f"bytes/transition [{collect_rate(collected) if rollout_steps else rows / (time.time() - t0):.0f} {'agent steps' if rollout_steps else 'rows'}/s]")
            if checkpoints_on:
                save_teacher_data()
            phase, progress = "offline", dict(step=0, next_eval=args.offline_eval_frequency)
            checkpoint("offline")
        elif need_teacher_data and ((phase == "offline" and offline) or (phase == "online" and args.rehearsal_ratio > 0)):
            teacher_data_saved = True
            found = tu.latest_checkpoint(ckpt_dir / "teacher_data")
            if found is None:
                raise ConfigError(f"{ckpt_dir / 'teacher_data'} is missing or corrupt; start the run again without --resume")
            teacher_rb = replay_from(found[0], "teacher_rb", replay_device)
        elif phase == "collect":
            print(f"(b) teacher data: skipped ({'no teacher' if not uses_teacher else '--offline-steps 0: no offline phase to use it'})")
            phase, progress = "offline", dict(step=0, next_eval=args.offline_eval_frequency)

        # (c) Offline phase: updates on the teacher data only, lambda = 1, lr = learning_rate; K updates per jitted call.
        # With --offline-acting the student also plays one agent step per update into its own replay.
        lam = 1.0
        rb, offline_acted = None, 0
        if phase == "offline":
            offline_coefs = phase_coefs(args, lam, args.learning_rate, offline=True)
            step, next_eval, offline_rate = progress["step"], progress["next_eval"], SteadyRate()
            k_static = min(args.updates_per_call or (8 if on_cpu() else 100), max(args.offline_steps, 1))
            ckpt_every = args.checkpoint_frequency or args.offline_eval_frequency or 100_000
            acting = offline and args.offline_acting
            if acting:  # one vector step, then num_envs updates, per call
                k_static = min(args.num_envs, max(args.offline_steps, 1))
                act_envs = tu.make_teacher_envs(args.env_id, args.num_envs, seed=args.seed + 3, **env_kwargs)
                act_log = np.zeros((-(-args.offline_steps // args.num_envs), args.num_envs), np.uint8)  # for an exact resume
                offline_acted = progress.get("offline_acted", 0)
                if offline_acted:
                    ck = resume[0]
                    rb = replay_from(ck, "rb", replay_device)
                    act_log[: offline_acted // args.num_envs] = tu.read_checkpoint_array(ck, "offline_action_log")
                    act_ret, act_len, act_resetting = (tu.read_checkpoint_array(ck, f"offline_{n}") for n in ("ep_ret", "ep_len", "resetting"))
                    act_obs = fast_forward(act_envs, act_log[: offline_acted // args.num_envs], "restoring the envs (exact resume)")
                else:
                    rb = make_replay(online_lengths, online_q_dim, replay_device, prioritized=True)
                    act_ret, act_len, act_resetting = np.zeros(args.num_envs), np.zeros(args.num_envs, np.int64), np.zeros(args.num_envs, bool)
                    act_obs = act_envs.reset()[0]
                act_obs_dev = jax.device_put(act_obs, compute_device)  # each observation crosses to the device once: acted on, then stored

            def offline_arrays() -> dict | None:
                """The student's replay and the acting envs' state, when the student acts offline."""
                if not acting:
                    return None
                return {**replay_arrays("rb", rb), "offline_action_log": act_log[: offline_acted // args.num_envs],
                        "offline_ep_ret": act_ret, "offline_ep_len": act_len, "offline_resetting": act_resetting}

            unchecked = []  # (first update, n, metrics on the device): fetched at log steps, not after every call (a stall)

            def check_offline_metrics() -> None:
                for step0, n, m in jax.device_get(unchecked):
                    if not m["sample_ok"][:n].all():
                        raise ConfigError("the teacher data has too few valid transitions to sample a batch; collect more (--teacher-steps)")
                    if not np.isfinite(m["loss"][:n]).all():
                        raise ConfigError(f"the offline loss is not finite at update {step0 + int(np.argmin(np.isfinite(m['loss'][:n]))) + 1} "
                                          f"(phase c); the last good checkpoint is in {ckpt_dir}; lower --learning-rate")
                    for i in range(n):
                        if (step0 + i + 1) % args.log_frequency == 0 or step0 + i + 1 == args.offline_steps:
                            for name in ("td_loss", "distill_loss", "cql_loss", "margin_loss", "loss", "q_values"):
                                writer.add_scalar(f"offline/{name}", float(m[name][i]), step0 + i + 1)
                unchecked.clear()

            def offline_eval() -> None:
                """Every offline_eval_frequency updates, as the reference's runner evaluates each offline iteration."""
                nonlocal next_eval, progress
                check_offline_metrics()
                t_eval = time.time()
                returns, _, steps = evaluate_student(state.params, "offline eval", 20_000 + step)
                offline_rate.pause(time.time() - t_eval)
                progress = dict(step=step, next_eval=next_eval, offline_acted=offline_acted)
                stop("offline", offline_arrays())  # an interrupted evaluation runs again after a resume
                if returns:
                    writer.add_scalar("offline/eval_return", float(np.mean(returns)), step)
                    if (tns := teacher_normalized(float(np.mean(returns)))) is not None:
                        writer.add_scalar("offline/teacher_normalized_score", tns, step)
                tqdm.write(f"(c) {summary(f'offline update {step}: student', returns, steps)}")
                next_eval += args.offline_eval_frequency

            with tqdm(total=args.offline_steps if offline else 0, initial=step, desc="offline", file=sys.stderr, mininterval=2.0) as bar:
                while offline and step < args.offline_steps:
                    if args.offline_eval_frequency and step >= next_eval:
                        offline_eval()
                    if acting:
                        n = min(k_static, args.offline_steps - step)  # one update per agent step, as the reference
                        # epsilon over the offline updates without a warm-up; noisy nets: end_e (identity_epsilon)
                        epsilon = args.end_e if args.noisy else linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, offline_acted + 1)
                        actions_dev, _, key = act_student(state.params, act_obs_dev, key, epsilon)
                        actions = np.asarray(actions_dev)
                        act_envs.send(actions)  # the updates below are launched while the emulators step
                    else:  # before a boundary (an evaluation, the end) K does not divide: one by one
                        boundary = min(args.offline_steps, next_eval) if args.offline_eval_frequency else args.offline_steps
                        n = k_static if boundary - step >= k_static else 1
                    # Launched by the launcher thread: on a GPU the launch holds its thread about as long as the device
                    # runs the updates, and the acting below (recv, the placement, the store) goes on meanwhile.
                    if args.replay_on_host:
                        in_flight = launcher.submit(offline_on_host_replay, learner, state, teacher_rb, offline_key, step, n, offline_coefs,
                                                    max(args.target_network_frequency // args.train_frequency, 1), compute_device)
                    else:
                        in_flight = launcher.submit(learner.offline, state, teacher_rb, offline_key, jnp.int32(step), n, offline_coefs)
                    if acting:
                        next_obs, reward, terminated, truncated, info = act_envs.recv()
                        act_log[offline_acted // args.num_envs] = actions
                        live = ~act_resetting
                        act_ret += np.where(live, info["reward"], 0.0)
                        act_len += live
                        done = (terminated | truncated) & live
                        for i in np.flatnonzero(done):
                            writer.add_scalar("offline/episodic_return", act_ret[i], offline_acted + i + 1)
                        act_ret[done], act_len[done], act_resetting = 0.0, 0, done
                        # One placement for the step's host arrays, as online; the observations are stored now and acted on next.
                        next_obs_dev, *step_dev = jax.device_put((next_obs, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated),
                                                                 compute_device)
                        acted_step = (act_obs_dev, actions_dev, *step_dev, next_obs_dev)
                        if args.replay_on_host:
                            rb = learner.add(rb, 0, *host_replay_step(acted_step, True))
                        else:  # the teacher's Q of the states computed in the storing call
                            rb = learner.store(rb, *acted_step, teacher_params if online_q_dim else None)
                        act_obs_dev, offline_acted = next_obs_dev, offline_acted + args.num_envs
                    state, offline_key, metrics = in_flight.result()
                    unchecked.append((step, n, metrics))
                    step += n
                    offline_rate.start(step)  # from the end of the first (compiling) call
                    if step // args.log_frequency != (step - n) // args.log_frequency or step == args.offline_steps:
                        check_offline_metrics()
                        if step > offline_rate.n0:  # with the losses, as online: a log write per call costs the host time
                            writer.add_scalar("offline/SPS", offline_rate(step), step)
                    bar.update(n)
                    progress = dict(step=step, next_eval=next_eval, offline_acted=offline_acted)
                    if interrupt.requested:
                        check_offline_metrics()  # the losses of the updates done are logged before the checkpoint
                        stop("offline", offline_arrays())
                    if step < args.offline_steps and due(step, step - n, ckpt_every):
                        check_offline_metrics()
                        checkpoint("offline", offline_arrays())
            if offline:
                if args.offline_eval_frequency and step >= next_eval:
                    offline_eval()
                if acting:
                    act_envs.close()
                print(f"(c) offline: {args.offline_steps} updates [{offline_rate(step):.1f} updates/s, evaluations excluded]"
                      + (f"; the student played {offline_acted} agent steps into its replay" if acting else ""))
                state = sync_target(state, True)
            if args.reset_optimizer_online:  # pretraining's online phase starts a fresh Adam
                state = state.replace(opt_state=state.tx.init(state.params))
            phase, progress = "online", dict(global_step=0, updates=0,
                                             next_eval=args.eval_frequency, lam=lam, max_roll_in=args.jsrl_max_roll_in_steps, teacher_actions=0, acted=0,
                                             offline_acted=offline_acted)
            if offline:
                checkpoint("online", replay_arrays("rb", rb) if offline_acted else None)
        if args.rehearsal_ratio <= 0:
            teacher_rb = None  # the online phase uses the student's own replay only

        # (d) Online phase
        if phase in ("online", "final"):
            p = progress
            lam, global_step, updates = p["lam"], p["global_step"], p["updates"]
            next_eval, max_roll_in = p["next_eval"], p["max_roll_in"]
            teacher_actions, acted, student_return = p["teacher_actions"], p["acted"], p.get("student_return")
            offline_acted = p.get("offline_acted", 0)  # the student's own steps already in its replay (--offline-acting)
            lr = online_schedule(args, lam, None, None, random_return, 0)[1]
            jsrl_rng = np.random.default_rng(args.seed + 2)
            action_log = np.zeros((-(-args.total_timesteps // args.num_envs), args.num_envs), np.uint8)  # the phase's actions, for an exact resume
            if global_step:  # resumed mid-way: the replay, the episodes in progress and the envs' exact state
                ck = resume[0]
                rb = replay_from(ck, "rb", replay_device)
                action_log[: global_step // args.num_envs] = tu.read_checkpoint_array(ck, "action_log")
                ep_ret, ep_len, resetting, ep_t, roll_in, obs = (tu.read_checkpoint_array(ck, n) for n in ("ep_ret", "ep_len", "resetting", "ep_t", "roll_in", "obs"))
                jsrl_rng.bit_generator.state = p["jsrl_rng"]
            else:
                if not offline_acted:
                    rb = make_replay(online_lengths, online_q_dim, replay_device, prioritized=True)
                elif rb is None:  # resumed at the start of the phase
                    rb = replay_from(resume[0], "rb", replay_device)
                ep_ret, ep_len = np.zeros(args.num_envs), np.zeros(args.num_envs, np.int64)
                resetting, ep_t = np.zeros(args.num_envs, bool), np.zeros(args.num_envs, np.int64)
                roll_in = jsrl_rng.integers(0, max_roll_in, args.num_envs) + 1 if max_roll_in > 0 else np.zeros(args.num_envs, np.int64)
            online_rate = SteadyRate()
            # The last vector step, stored and learned from while the envs take the next one: (transition, updates due,
            # target sync, agent step whose losses are logged or None). Checkpoints save it unapplied, so neither they
            # nor the logs change when the learning happens (the resumed run applies it where the uninterrupted one would).
            pending = None
            online_coefs = {}

            def coefs_now():
                """The loss weights and lr as device scalars, made again only when lambda or lr change."""
                if (lam, lr) not in online_coefs:
                    online_coefs.clear()
                    online_coefs[lam, lr] = phase_coefs(args, lam, lr, offline=False)
                return online_coefs[lam, lr]

            if p.get("pending_updates") is not None:
                # (A checkpoint of an older version also holds the teacher's Q of the step, pending.6: the learning call
                # computes it again from the same parameters and observations.)
                saved = [tu.read_checkpoint_array(resume[0], f"pending.{i}") for i in range(6)]
                # On the device, as the live loop holds it: the learning call does not compile again for other placements.
                pending = (tuple(jax.device_put(saved, compute_device)), p["pending_updates"], p["pending_sync"], p["pending_log"])

            unlogged = []  # (agent step, losses on the device) of a learned step, fetched after the envs' step

            in_flight = None  # (the learning call launched by the launcher thread, its updates, log step and launch's agent step)

            def learn(overlap: bool = False):
                """Apply `pending`: its call is launched by the launcher thread. With `overlap` the loop goes on (the envs
                step) and land() takes the results before anything reads the state or the replay; else they land now.
                Its losses (at a log step) are fetched by log_losses(): a fetch waits for the updates, and the hot loop
                must not wait for them before it has the next actions."""
                nonlocal pending, in_flight
                transition, n_updates, sync, log_step = pending
                c = coefs_now()
                pending = None
                if args.replay_on_host:
                    def learn_host(state, rb, key, step):
                        state, rb, key, m = learn_on_host_replay(learner, state, rb, teacher_rb, key, step, n_updates, c, compute_device, args.per_alpha)
                        return learner.sync(state) if sync else state, rb, key, m
                    future = launcher.submit(learn_host, state, rb, online_key, host_replay_step(transition, lam > 0))
                else:  # lambda changes only at an evaluation, which learns the pending step first: it is the step's lambda
                    future = launcher.submit(learner.online, state, rb, teacher_rb, online_key, *transition,
                                             teacher_params if online_q_dim and lam > 0 else None, c, sync, n_updates=n_updates)
                in_flight = (future, n_updates, log_step, global_step)
                if not overlap:
                    land()

            def land():
                nonlocal state, rb, online_key, in_flight
                if in_flight is None:
                    return
                future, n_updates, log_step, launched_at = in_flight
                in_flight = None
                state, rb, online_key, m = future.result()
                if n_updates:  # the speed of learning (the regime of almost every step), from the end of its first, compiling call
                    online_rate.start(launched_at)
                if log_step is not None:
                    unlogged.append((log_step, m))

            def log_losses():
                if not unlogged:  # called after every env step; most steps have nothing to log
                    return
                for log_step, m in jax.device_get(unlogged):
                    if not m.pop("sample_ok"):
                        raise ConfigError("the online replay has too few valid transitions to sample a batch; raise --learning-starts")
                    if not np.isfinite(m["loss"]):
                        raise ConfigError(f"the online loss is not finite at agent step {log_step} (phase d); the last good checkpoint is in "
                                          f"{ckpt_dir}; lower --learning-rate")
                    for name, value in m.items():
                        writer.add_scalar(f"losses/{name}", float(value), log_step)
                unlogged.clear()

            def online_progress() -> dict:
                """Updates `progress` and returns the arrays of a checkpoint of this phase."""
                nonlocal progress
                progress = dict(global_step=global_step, updates=updates,
                                next_eval=next_eval, lam=lam, max_roll_in=max_roll_in, teacher_actions=teacher_actions, acted=acted,
                                jsrl_rng=jsrl_rng.bit_generator.state, student_return=student_return,  # G_S of the last evaluation
                                pending_updates=pending[1] if pending else None, pending_sync=pending[2] if pending else None,
                                pending_log=pending[3] if pending else None, offline_acted=offline_acted)
                unapplied = {f"pending.{i}": x for i, x in enumerate(pending[0]) if x is not None} if pending else {}
                return {**replay_arrays("rb", rb), "action_log": action_log[: global_step // args.num_envs], "obs": obs,
                        "ep_ret": ep_ret, "ep_len": ep_len, "resetting": resetting, "ep_t": ep_t, "roll_in": roll_in, **unapplied}

            final_eval = {}  # the final evaluation, saved with the model (final_eval.json) and shown on its Hub card

            def online_eval(final: bool) -> float:
                """Evaluate the student; after an iteration (not the final one) update lambda, lr and JSRL's roll-in. Returns its seconds."""
                nonlocal lam, lr, max_roll_in, student_return
                frames = [] if (final and args.capture_video) else None
                t_eval = time.time()
                returns, _, steps = evaluate_student(state.params, "student eval", 30_000 + global_step // args.eval_frequency, frames=frames)
                stop("final" if final else "online", online_progress())  # an interrupted evaluation runs again after a resume
                student_return = float(np.mean(returns)) if returns else None
                if final and returns:
                    final_eval.update(returns=[float(r) for r in returns], mean=student_return, std=float(np.std(returns)), agent_steps=global_step,
                                      teacher_return=None if teacher_return is None else float(teacher_return),
                                      teacher_normalized_score=teacher_normalized(student_return),
                                      human_normalized_score=tu.human_normalized_score(game, student_return),
                                      command=shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]]))
                line = summary(f"online step {global_step}: student", returns, steps)
                if student_return is not None:
                    writer.add_scalar("eval/episodic_return", student_return, global_step)
                    writer.add_scalar("charts/human_normalized_score", tu.human_normalized_score(game, student_return), global_step)
                    if (tns := teacher_normalized(student_return)) is not None:
                        writer.add_scalar("charts/teacher_normalized_score", tns, global_step)
                        line += f", teacher-normalized {tns:.3f}"
                if not final:
                    lam, lr, reason = online_schedule(args, lam, student_return, teacher_return, random_return, global_step)
                    if args.decay_lambda and uses_teacher:
                        line += f"; lambda = {lam:.3f}" + (f" ({reason})" if reason else "")
                if not final and jsrl:
                    max_roll_in = int(max_roll_in * args.jsrl_roll_in_decay)
                if not final:
                    writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
                    writer.add_scalar("charts/learning_rate", lr, global_step)
                tqdm.write(("(e) final " if final else "(d) ") + line)
                if frames:
                    try:
                        write_video(frames, str(run_dir / "videos" / "final-eval.mp4"))
                        if args.track:  # in the W&B run's media too, as CleanRL's videos are (monitor_gym)
                            wandb.log({"videos/final_eval": wandb.Video(str(run_dir / "videos" / "final-eval.mp4"), format="mp4")})
                    except Exception as e:  # noqa: BLE001 - a video codec or W&B problem must not cost the trained model
                        print(f"warning: the final evaluation's video could not be written or logged ({type(e).__name__}: {e}); the run goes on", file=sys.stderr)
                return time.time() - t_eval

        if phase == "online":
            envs = tu.make_teacher_envs(args.env_id, args.num_envs, seed=args.seed + 1, **env_kwargs)
            if global_step:
                obs = fast_forward(envs, action_log[: global_step // args.num_envs], "restoring the envs (exact resume)")
                if not np.array_equal(obs, tu.read_checkpoint_array(resume[0], "obs")):
                    print("warning: the envs did not reach the checkpoint's observation; the episodes in progress differ from the interrupted run", file=sys.stderr)
            else:
                obs, _ = envs.reset()
            obs_dev = jax.device_put(obs, compute_device)  # each observation crosses to the device once: acted on, then stored
            bar = tqdm(total=args.total_timesteps, initial=global_step, desc="online", file=sys.stderr, mininterval=2.0)
            offline_updates = args.offline_steps if offline else 0
            while global_step < args.total_timesteps:
                epsilon = online_epsilon(args, offline_updates, global_step)
                if pending is not None and not args.overlap_env:
                    learn()
                if jsrl:  # the teacher acts in the roll-in (with --jsrl-roll-in-guide) and, after it, with a decaying probability
                    share = jsrl_teacher_share(args.jsrl_guide_prob, args.jsrl_decay_period, global_step + offline_updates)
                    use_teacher = jsrl_use_teacher(ep_t, roll_in, args.jsrl_roll_in_guide, share, jsrl_rng.random(args.num_envs))
                    actions, key = act_jsrl(state.params, teacher_params, obs_dev, key, epsilon, use_teacher)
                    teacher_actions += int((use_teacher & ~resetting).sum())
                else:
                    actions, _, key = act_student(state.params, obs_dev, key, epsilon)
                actions_dev, actions = actions, np.asarray(actions)
                envs.send(actions)
                if pending is not None:
                    # Launched while the emulators step: on a GPU the launch holds its thread (about 2 ms for this call
                    # on an H100 VM, longer than the device takes to run it), so the launcher thread holds it while this
                    # one takes the envs' step; it lands below, before the next act.
                    learn(overlap=True)
                next_obs, reward, terminated, truncated, info = envs.recv()
                log_losses()
                # The step's host arrays cross in one placement (each a dispatch on the host's critical path); the
                # observations are stored with this step and acted on at the next.
                next_obs_dev, *step_dev = jax.device_put((next_obs, np.clip(reward, -1.0, 1.0).astype(np.float32), terminated, truncated),
                                                         compute_device)
                action_log[global_step // args.num_envs] = actions
                if global_step == 0:
                    writer.add_scalar("charts/epsilon", epsilon, 0)  # where the exploration schedule starts
                global_step += args.num_envs
                bar.update(args.num_envs)

                live = ~resetting
                acted += int(live.sum())
                ep_ret += np.where(live, info["reward"], 0.0)
                ep_len += live
                ep_t += live
                done = (terminated | truncated) & live
                for i in np.flatnonzero(done):  # the vector step holds agent steps global_step - num_envs + 1 ... global_step: env i's is its i-th
                    writer.add_scalar("charts/episodic_return", ep_ret[i], global_step - args.num_envs + i + 1)
                    writer.add_scalar("charts/episodic_length", ep_len[i], global_step - args.num_envs + i + 1)
                ep_ret[done], ep_len[done], ep_t[done] = 0.0, 0, 0
                if jsrl and done.any():  # a new roll-in length for each new episode
                    roll_in[done] = jsrl_rng.integers(0, max(max_roll_in, 1), int(done.sum())) + 1 if max_roll_in > 0 else 0
                resetting = done

                # The updates and the target sync the reference's training-step counter makes due over these agent steps.
                steps_due = functools.partial(train_steps_due, global_step - args.num_envs, global_step, offline_updates, offline_acted, args.learning_starts)
                n_updates, sync = steps_due(args.train_frequency), steps_due(args.target_network_frequency) > 0
                # The whole step on the device, as after a resume.
                transition = (obs_dev, actions_dev, *step_dev, next_obs_dev)
                log_now = updates // args.log_frequency != (updates + n_updates) // args.log_frequency
                land()  # the previous step's learning, launched above
                pending = (transition, n_updates, sync, global_step if log_now else None)  # its losses are logged when it is learned
                obs, obs_dev = next_obs, next_obs_dev
                if log_now:
                    writer.add_scalar("charts/SPS", online_rate(global_step), global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)
                    if not next_eval <= global_step < args.total_timesteps:  # else the evaluation below logs the new values
                        writer.add_scalar("charts/distill_coeff", lam * args.distill_coef, global_step)
                        writer.add_scalar("charts/learning_rate", lr, global_step)
                    if jsrl:
                        writer.add_scalar("charts/teacher_action_share", teacher_actions / max(acted, 1), global_step)
                        teacher_actions, acted = 0, 0
                updates += n_updates

                if global_step >= next_eval and global_step < args.total_timesteps:
                    if pending is not None:
                        learn()
                    log_losses()
                    online_rate.pause(online_eval(final=False))
                    next_eval += args.eval_frequency
                if interrupt.requested or (global_step < args.total_timesteps and due(global_step, global_step - args.num_envs,
                                                                                     args.checkpoint_frequency or args.eval_frequency)):
                    log_losses()  # the losses of the steps learned: a resumed run does not learn them again
                    stop("online", online_progress())
                    checkpoint("online", online_progress())
            bar.close()
            if pending is not None:
                learn()
            log_losses()
            envs.close()
            print(f"(d) online: {global_step} agent steps, {updates} updates [{online_rate(global_step):.1f} agent steps/s while learning, evaluations excluded]")
            online_progress()
            phase = "final"

        # (e) Final evaluation and the model
        if phase == "final":
            online_eval(final=True)
            print(f"final: lambda {lam:g}, learning rate {lr:g}, {global_step} agent steps, {updates} updates")
            if args.save_model:
                model_path = run_dir / f"{args.exp_name}.cleanrl_model"
                save_atomic(str(model_path), flax.serialization.to_bytes(state.params))
                # Expected Q-values (noise-free) of the saved params on a few states, to check a reload against.
                probe_obs = np.asarray(learner.sample(rb, None, jax.random.PRNGKey(0))[0].obs[:8])
                probe = io.BytesIO()
                np.savez(probe, obs=probe_obs, q=np.asarray(expected_q(student.apply(state.params, probe_obs), support)))
                save_atomic(str(run_dir / "q_probe.npz"), probe.getvalue())
                if final_eval:
                    save_atomic(str(run_dir / "final_eval.json"), json.dumps(final_eval, indent=2).encode())
                print(f"model saved to {model_path}")
            checkpoint("done", force=ckpt_dir.is_dir())  # with checkpoints off, only after an interrupted and resumed run
    except Interrupted:
        if args.save_model:
            save_atomic(str(run_dir / f"{args.exp_name}.cleanrl_model"), flax.serialization.to_bytes(state.params))
        raise
    finally:
        launcher.shutdown()
        interrupt.restore()
        writer.close()
        tu.unlock_run_folder(run_dir)
        if args.track:
            wandb.finish()
    if hub_repo:  # the run is complete and its folder unlocked: a failed upload costs nothing of it
        print(f"model uploaded to {tu.upload_hf(run_dir, hub_repo)}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (tu.TeacherError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
