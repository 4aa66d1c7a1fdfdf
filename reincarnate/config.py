"""The scripts' flags: parsing (tyro, plus the boolean forms W&B sweeps pass), --method presets, and the checks
every value must pass before anything runs (one error line naming the flag)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Literal, Sequence

import tyro

from reincarnate.errors import ConfigError

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _bool_fields(cls: type) -> set[str]:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool}


def normalize_bool_flags(cls: type, argv: Sequence[str]) -> list[str]:
    """Rewrite ``--flag=True|False`` and ``--flag True|False`` (what W&B sweep agents pass) into tyro's
    ``--flag`` / ``--no-flag``, for every boolean field of ``cls``; other tokens pass through."""
    bools = _bool_fields(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        field = name.replace("-", "_")
        if field in bools and eq:
            if value.lower() not in _TRUE | _FALSE:
                raise SystemExit(f"error: --{name} takes True or False, not {value!r}")
            out.append(f"--{name}" if value.lower() in _TRUE else f"--no-{name}")
        elif field in bools and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE | _FALSE:
            out.append(f"--{name}" if argv[i + 1].lower() in _TRUE else f"--no-{name}")
            i += 1
        else:
            out.append(tok)
        i += 1
    return out


def explicit_fields(cls: type, argv: Sequence[str]) -> set[str]:
    """Names of the fields of ``cls`` that ``argv`` sets explicitly (``--name``, ``--name=v``, ``--no-name``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    found = set()
    for tok in argv:
        if tok.startswith("--"):
            field = tok[2:].split("=", 1)[0].replace("-", "_")
            if field not in names and field.startswith("no_"):
                field = field[3:]
            if field in names:
                found.add(field)
    return found


def parse_args(cls: type, argv: Sequence[str] | None = None, methods: dict[str, dict] | None = None) -> Any:
    """``tyro.cli(cls)`` that also takes the boolean forms W&B sweeps pass (see :func:`normalize_bool_flags`), then
    applies the --method preset (``methods[args.method]``) to every flag not given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = tyro.cli(cls, args=normalize_bool_flags(cls, argv))
    explicit = explicit_fields(cls, argv)
    args = resolve_method(args, explicit, methods=methods) if methods else args
    args._explicit = frozenset(explicit)  # what --resume takes from the command line (the rest from the run's args.json)
    return args


def explicit_flags(args: Any) -> frozenset[str] | None:
    """The flags the command line gave (parse_args), or None for Args built in code (every value counts as given)."""
    return getattr(args, "_explicit", None)


def resolve_method(args: Any, explicit: set[str] = frozenset(), *, methods: dict[str, dict]) -> Any:
    """--method's settings (``methods[args.method]``), except for the flags given explicitly (so sweeps can vary a
    method's knobs)."""
    return dataclasses.replace(args, **{k: v for k, v in methods[args.method].items() if k not in explicit})


@dataclasses.dataclass
class RunArgs:
    """The flags that do not change what is learned: logging (TensorBoard, W&B), the run folder, checkpoints and
    resume, the saved model and its upload, speed. Both scripts' Args extend it; a resumed run may change them."""

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
    log_frequency: int = 100
    """gradient updates between loss logs"""
    updates_per_call: int | None = None
    """offline updates fused in one jitted call (lax.scan); the results equal one update per call; default 100 on an accelerator, 8 on a CPU (written out one after the other there: XLA:CPU runs convolutions inside a loop ~7x slower)"""
    overlap_offline_eval: bool = True
    """play each offline evaluation (but the last) in its own thread while the offline updates go on. The reference plays them in between (OfflinePretrainingRunner.run_experiment runs each offline iteration through Dopamine's Runner._run_one_iteration: train phase, then eval phase; run_experiment.py:317-353 at 3eb419c), and its score changes nothing offline (record_score updates lambda only `if not self._persistent_phase`: distillation_dqn_agent.py:206, distillation_rainbow_agent.py:200), so every logged value is the same either way; --no-overlap-offline-eval plays them in between"""
    replay_on_host: bool = False
    """keep the replay buffers in host memory (the same jitted functions placed on the CPU device) when they do not fit the accelerator"""


@dataclasses.dataclass
class ProtocolArgs(RunArgs):
    """Dopamine's Atari protocol, the teacher, and the knobs of the baselines the paper compares with: the flags that are
    the same for every student (both scripts' Args extend it). Defaults as the reference's configs and Dopamine 4.0.6
    (README "Fidelity", "Methods")."""

    # Environment
    env_id: str = "Breakout-v5"
    """the envpool Atari id; the teacher is the DQN_400 agent of its game"""
    num_envs: int = 1
    """parallel envpool envs for the teacher roll-out and the student (Dopamine: 1); the replay ratio stays one update per `train_frequency` agent steps in total"""
    eval_num_envs: int = 16
    """parallel envs of every evaluation; every episode started before the budget is played to its end and counted, so the protocol is Dopamine's (1 env is its exact sequence). 16: the fastest measured (2-core CPU: 288, 539, 709, 840 agent steps/s with 1, 4, 8, 16 envs; H200: envpool 5,625 / 8,122 steps/s with 8 / 16)"""
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


    # The baselines' knobs (README "Methods": --method sets them; flags given explicitly still win)
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


# A resumed run may change these; every other flag must match the run's args.json.
RUNTIME_FLAGS = {f.name for f in dataclasses.fields(RunArgs)}

# The range of every numeric flag either script has, in one place: (low, high, low_open, high_open); None is
# unbounded. Rates, sizes and periods > 0; counts and weights >= 0; probabilities and the discount in [0, 1].
# (v_min and v_max are any numbers with v_min < v_max: checked together below.)
_POSITIVE, _NON_NEGATIVE, _PROBABILITY = (0, None, True, False), (0, None, False, False), (0, 1, False, False)
RANGES = {
    **dict.fromkeys(["num_envs", "eval_num_envs", "max_episode_steps", "total_timesteps", "buffer_size", "batch_size", "n_step",
                     "target_network_frequency", "train_frequency", "eval_frequency", "eval_steps", "log_frequency", "epsilon_decay_steps",
                     "cql_temperature", "jsrl_decay_period", "keep_checkpoints", "temperature", "online_learning_rate", "learning_rate",
                     "end_learning_rate", "adam_eps", "updates_per_call", "eval_episodes"], _POSITIVE),
    **dict.fromkeys(["seed", "teacher_iteration", "teacher_steps", "offline_steps", "learning_starts", "distill_coef", "distill_decay_period",
                     "td_coef", "offline_eval_frequency", "cql_coef", "margin_coef", "margin", "jsrl_max_roll_in_steps", "jsrl_roll_in_decay",
                     "epsilon_warmup_steps", "checkpoint_minutes", "checkpoint_frequency", "per_alpha", "noisy_sigma0"], _NON_NEGATIVE),
    **dict.fromkeys(["start_e", "end_e", "eval_epsilon", "teacher_epsilon", "rehearsal_ratio", "jsrl_guide_prob", "gamma", "per_beta"],
                    _PROBABILITY),
    "num_atoms": (2, None, False, False),
}
UNBOUNDED = {"v_min", "v_max"}  # any numbers, with v_min < v_max


def _in_range(value: float, rule: tuple) -> bool:
    low, high, low_open, high_open = rule
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def _range_text(rule: tuple) -> str:
    low, high, low_open, _ = rule
    return f"in [{low}, {high}]" if high is not None else f"> {low}" if low_open else f">= {low}"


def check_args(args: Any) -> None:
    """Every numeric flag within its range, and the values that only fail together; ConfigError (one line) if not."""
    if args.upload_model and not args.save_model:
        raise ConfigError("--upload-model uploads the saved model: add --save-model")
    for name, rule in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not _in_range(value, rule):
            extra = "; 0 disables checkpoints" if name == "checkpoint_frequency" else ""
            raise ConfigError(f"--{name.replace('_', '-')} must be {_range_text(rule)} (got {value}{extra})")
    if args.method == "tabula-rasa" and (args.distill_coef > 0 or args.margin_coef > 0 or args.init_from_teacher):
        raise ConfigError(f"--method {args.method} has no teacher, but --distill-coef/--margin-coef/--init-from-teacher use one")
    if hasattr(args, "v_min") and not args.v_min < args.v_max:
        raise ConfigError(f"--v-min must be below --v-max (got {args.v_min} and {args.v_max})")
    if args.offline_steps > 0 and args.teacher_data != "dopamine-replay" and args.teacher_steps < args.batch_size + (args.n_step + 4) * args.num_envs:
        raise ConfigError(f"--teacher-steps {args.teacher_steps} is too few to sample batches of {args.batch_size} for --offline-steps; "
                          f"collect more or pass --offline-steps 0")
    if args.buffer_size < max(args.learning_starts, args.batch_size + (args.n_step + 4) * args.num_envs):
        raise ConfigError(f"--buffer-size {args.buffer_size} is smaller than what the online phase needs (--learning-starts "
                          f"{args.learning_starts}, a batch of {args.batch_size}); raise it")


def method_line(args: Any, methods: dict[str, dict]) -> str:
    """'method: NAME (the values its preset set)': what a run prints about its algorithm."""
    preset = {k: getattr(args, k) for k in methods[args.method]}
    return f"method: {args.method}" + (f" ({', '.join(f'{k}={v}' for k, v in preset.items())})" if preset else "")
