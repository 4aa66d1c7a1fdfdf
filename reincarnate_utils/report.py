#!/usr/bin/env python
"""Aggregate Reincarnating RL runs with rliable: IQM, median, mean, optimality gap
(stratified-bootstrap CIs), performance profiles, sample-efficiency curves and
probability of improvement, from the run folders our training scripts write.

    python reincarnate_utils/report.py runs/ --out report/
    python -m reincarnate_utils.report runs/qdagger runs/tabula_rasa --out report/ --normalize human

Run ``--help`` for the inputs, the score definitions and the files written.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

if __package__ in (None, ""):  # `python reincarnate_utils/report.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EVAL_TAG = "eval/episodic_return"
TEACHER_TAG = "teacher/mean_return"
HPARAMS_TAG = "hyperparameters/text_summary"
DEFAULT_METHOD = "qdagger"
METRIC_NAMES = ("IQM", "Median", "Mean", "Optimality Gap")
METRIC_KEYS = ("iqm", "median", "mean", "optimality_gap")
SCORE_TABLE_NAME = (
    "teacher_utils.ATARI_SCORES: the Atari-57 random and human scores of the DQN Nature table "
    "(random scores as the reincarnating_rl code normalises with)"
)
NORMALIZATIONS = {
    "teacher": "teacher-normalized score (G_S - G_R) / (G_T - G_R)",
    "human": "human-normalized score (G_S - G_R) / (G_H - G_R)",
    "raw": "raw episodic return G_S (not comparable across games)",
}
FIGURES = {
    "aggregate": "aggregate_intervals.png",
    "profile": "performance_profile.png",
    "curve": "sample_efficiency.png",
    "poi": "probability_of_improvement.png",
}
# W&B export columns (see --help): the first one present wins.
WANDB_NAME_COLUMNS = ("Name", "name", "run_name", "display_name", "run", "ID", "id")
WANDB_STEP_COLUMNS = ("global_step", "_step", "Step", "step")
_FIELD = r"(?:(?!__).)+"  # one part of a run name: anything without "__"
# Run folder names, for runs without args.json: reincarnate.run.default_run_name's, the launcher's and CleanRL's.
RUN_NAME_RES = (
    re.compile(rf"^(?P<env_id>[^_/]+-v\d+)__(?P<exp_name>.+)__(?P<method>{_FIELD})__(?P<seed>-?\d+)__\d{{8}}-\d{{6}}-[0-9a-f]{{6}}$"),
    re.compile(rf"^(?P<env_id>[^_/]+-v\d+)__(?P<exp_name>.+)__(?P<method>{_FIELD})__s(?P<seed>-?\d+)$"),
    re.compile(r"^(?P<env_id>[^_/]+-v\d+)__(?P<exp_name>.+)__(?P<seed>-?\d+)__\d+$"),
)
RUN_NAME_FORMS = "<env_id>__<exp_name>__<method>__<seed>__<time>-<hex>, <env_id>__<exp_name>__<method>__s<seed> or <env_id>__<exp_name>__<seed>__<time>"
# The flags that set a run's budget and its teacher (args.json keys). Runs of one method label that differ in one of
# them are reported apart, as "<label> [flag=value, ...]": never pooled into one aggregate. teacher_checkpoint names a
# game's own teacher, so it sets runs apart only where runs of the same game differ in it.
BUDGET_FLAGS = ("total_timesteps", "offline_steps", "teacher_steps")
TEACHER_FLAGS = ("teacher_checkpoint", "teacher_iteration", "teacher_data")
PROTOCOL_FLAGS = (*BUDGET_FLAGS, *TEACHER_FLAGS)
TEACHERLESS_METHODS = ("tabula-rasa",)  # the scripts' uses_teacher = method != "tabula-rasa"
DEFAULT_TEACHER = "gs://rl_checkpoints/DQN_400/{game}/1"  # --teacher-checkpoint's default
UNKNOWN = "?"  # a flag the run's config does not hold
# Flags that never change what is learned (reincarnate.config.RunArgs) and the run's identity: not compared.
NOT_COMPARED = {"seed", "env_id", "run_name", "method", "track", "wandb_project_name", "wandb_entity", "capture_video",
                "save_model", "upload_model", "hf_entity", "resume", "checkpoint_frequency", "checkpoint_minutes",
                "keep_checkpoints", "log_frequency", "updates_per_call", "overlap_offline_eval", "replay_on_host"}


def parse_run_name(name: str) -> dict[str, Any]:
    """env_id, exp_name, seed and (when the name holds it) method from a run folder's name; {} for another name."""
    for pattern in RUN_NAME_RES:
        if m := pattern.match(name):
            return {k: int(v) if k == "seed" else v for k, v in m.groupdict().items()}
    return {}

DESCRIPTION = """\
Aggregate the results of Reincarnating RL runs with rliable (Agarwal et al., 2021):
IQM, median, mean and optimality gap of the normalized final scores with
stratified-bootstrap confidence intervals, performance profiles, sample-efficiency
curves and the probability of improvement between methods. Writes figures and
tables into --out and prints the markdown table of aggregate metrics."""

EPILOG = """\
inputs
  RUNS are run folders (runs/<run_name>/ as the training scripts write them) or
  folders holding run folders at any depth. A run folder is one holding args.json
  or TensorBoard event files; its subfolders are not searched. From each run:
    args.json          env_id, seed, method (absent: "qdagger"), exp_name (script).
                       Without args.json the run's "hyperparameters" text summary
                       and then the folder name are used: the scripts' default
                       <env_id>__<exp_name>__<method>__<seed>__<YYYYmmdd-HHMMSS>-<hex>,
                       the launcher's <env_id>__<exp_name>__<method>__s<seed>, or
                       CleanRL's <env_id>__<exp_name>__<seed>__<unix time>.
    eval/episodic_return   the student's evaluations; the step is the online
                       agent step; the last one is the run's final score G_S.
    teacher/mean_return    G_T, the teacher's evaluation return (step 0).
  Runs with no evaluation are skipped with a warning.

scores (--normalize)
  teacher  (G_S - G_R) / (G_T - G_R)   1 = the student matches its teacher
  human    (G_S - G_R) / (G_H - G_R)   1 = human level
  raw      G_S
  G_R and G_H come from teacher_utils.ATARI_SCORES, the Atari-57 random and
  human scores of the DQN Nature table (the random scores are the ones the
  reincarnating_rl code normalises with). G_T is each run's own
  teacher/mean_return, the same number charts/teacher_normalized_score uses;
  --teacher-scores overrides it per game, and --pool-teacher uses one G_T per
  game and teacher (the mean over its runs that logged one) so that every
  method is divided by the same number. A run that logged no G_T (e.g. tabula
  rasa) borrows its game's pooled G_T when other runs logged one, else it is
  skipped. A teacher no better than random (G_T <= G_R) has no teacher score:
  the report stops with one error line naming its runs; use --normalize human,
  or --teacher-scores with a G_T above G_R.

methods and games
  Runs are grouped by (method, game); game = env id without "-v5". The method
  label is args.json's method, or exp_name:method when runs of several scripts
  are given (--group-by auto), or the args.json keys named by --group-by joined
  with ":". rliable's stratified bootstrap needs the same number of runs in
  every game of a method: when they differ, every game keeps its lowest seeds
  up to the smallest count (a warning names the games; scores.csv marks the
  runs left out with in_aggregate = 0). Each method is aggregated over its own
  games (#games in the table); probability of improvement uses the games both
  methods ran.
  Runs of one label with different budgets or teachers are never pooled: when
  they differ in total_timesteps, offline_steps, teacher_steps,
  teacher_iteration, teacher_data or (among the runs of one game)
  teacher_checkpoint, each group is reported apart as
  "<label> [flag=value, ...]" (the game's name reads {game} in the teacher's
  address); a warning and a line under the table say so. Flags a method does
  not use (a tabula-rasa run's teacher) are not compared. Runs of one label
  that differ in other flags are pooled, with a warning; --group-by sets them
  apart.

statistics
  IQM = mean of the middle 50% of all runs x games scores (25% trimmed mean),
  median and mean of the per-game mean scores, optimality gap = mean shortfall
  below --gamma. Intervals: rliable.library.get_interval_estimates, percentile
  stratified bootstrap over runs, --reps resamples. Every bootstrap (aggregate
  metrics, profile, curves, probability of improvement) starts from
  numpy.random.seed(--seed) (rliable draws from numpy's global generator, which
  is restored afterwards), with the methods in sorted order, so it can be
  reproduced with rliable directly. Sample-efficiency curves are the IQM of the
  normalized evaluation scores at each evaluation step that all runs of the
  method share. Probability of improvement P(X > Y) (a tie counts one half) is
  averaged over the games both methods ran, for each pair, X being the one
  with the higher IQM. The profile, the curves and P(X > Y) are computed with
  vectorized forms of rliable's estimators (the same values, much faster on
  many games); --reps trades time for steadier intervals.

outputs (in --out)
  aggregate.md, aggregate.csv      the aggregate metrics with CIs (also printed)
  scores.csv                       one row per run: method, game, seed, final
                                   step and raw score, G_T, G_R, G_H, normalized
                                   score, in_aggregate, run folder
  curves.csv                       the sample-efficiency curves (IQM and CI per step)
  probability_of_improvement.csv   P(X > Y) with CIs (two methods or more)
  aggregate_intervals.png, performance_profile.png, sample_efficiency.png,
  probability_of_improvement.png

W&B export (--wandb-export CSV)
  One row per run (the runs table's "Export CSV": final values) or several rows
  per run (history rows, one per logged step). Columns:
    Name (or name, run_name, display_name, run, ID, id)   groups rows into runs
    env_id, seed, method, exp_name     the run's config; "config.env_id" or
                                       "config/env_id" also work; method
                                       defaults to "qdagger"; the budget and
                                       teacher flags (above) and
                                       rehearsal_ratio are read too when present
    eval/episodic_return               an evaluation return (empty: no evaluation)
    teacher/mean_return                G_T (optional)
    global_step (or _step, Step, step) the evaluation step (optional; needed
                                       for sample-efficiency curves)
  A run's evaluations are ordered by step when every one has a step, else
  taken in file order; the last one is G_S.

exit status
  0 on success; 1 with one "error:" line when nothing usable is found or an
  input is invalid."""


class ReportError(Exception):
    """A problem with the user's inputs: printed as one `error:` line."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One training run: its config, its evaluations and the teacher's return."""

    source: str  # run folder, or "<csv>#<run name>"
    config: dict[str, Any]
    steps: list[int | None]  # evaluation steps (None: unknown), ascending when known
    returns: list[float]  # eval/episodic_return at those steps
    teacher_return: float | None = None
    # Filled in by score_runs().
    label: str = ""
    game: str = ""
    random_score: float | None = None
    human_score: float | None = None
    teacher_score: float | None = None  # G_T used for the normalization
    teacher_source: str = ""  # "run", "json", "pooled" or ""
    low: float = 0.0  # normalized = (raw - low) / (high - low)
    high: float = 1.0
    in_aggregate: bool = False
    base_label: str = ""  # the method label before runs of other budgets or teachers were set apart
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)  # the flags that set it apart (label suffix)

    @property
    def env_id(self) -> str:
        return str(self.config.get("env_id", ""))

    @property
    def seed(self) -> int | None:
        return _as_int(self.config.get("seed"))

    @property
    def method(self) -> str:
        method = self.config.get("method")
        return str(method) if method not in (None, "") else DEFAULT_METHOD

    @property
    def exp_name(self) -> str:
        return str(self.config.get("exp_name", ""))

    @property
    def final_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    @property
    def final_return(self) -> float:
        return self.returns[-1]

    def normalize(self, raw: float | np.ndarray) -> float | np.ndarray:
        return (raw - self.low) / (self.high - self.low)

    def sort_key(self) -> tuple:
        return (self.seed is None, self.seed if self.seed is not None else 0, self.source)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    try:
        as_float = float(str(value).strip())
    except ValueError:
        return None
    return int(as_float) if as_float.is_integer() else None


def _as_float(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _is_run_dir(path: Path) -> bool:
    if (path / "args.json").is_file():
        return True
    try:
        return any(p.name.startswith("events.out.tfevents") and p.is_file() for p in path.iterdir())
    except OSError:
        return False


def find_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders among `paths` and below them (run folders are not searched further)."""
    found: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path}: no such folder")
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder: give run folders or folders holding them (a W&B CSV goes to --wandb-export)")
        if _is_run_dir(path):
            add(path)
            continue
        for root, dirs, _ in os.walk(path):
            dirs.sort()
            if _is_run_dir(Path(root)):
                add(Path(root))
                dirs[:] = []
    return found


def _parse_hparams_text(text: str) -> dict[str, str]:
    """The training scripts' "|param|value|" markdown table -> {param: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        cells = line.strip().strip("|").split("|")
        if len(cells) != 2:
            continue
        key, value = cells[0].strip(), cells[1].strip()
        if key and key != "param" and not set(key) <= {"-", ":"}:
            out[key] = value
    return out


def read_run_dir(path: Path) -> Run | None:
    """Read one run folder; None (after a warning) when it holds no usable evaluation."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    config: dict[str, Any] = {}
    config.update(parse_run_name(path.name))
    try:
        acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
    except Exception as e:  # a corrupt event file: skip the run, keep the report going
        warn(f"skipping {path}: cannot read its TensorBoard events ({type(e).__name__}: {e})")
        return None
    if HPARAMS_TAG in tags.get("tensors", []):
        from tensorboard.util import tensor_util

        for event in acc.Tensors(HPARAMS_TAG)[-1:]:
            values = tensor_util.make_ndarray(event.tensor_proto).reshape(-1)
            if values.size:
                text = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
                config.update(_parse_hparams_text(text))
    args_file = path / "args.json"
    if args_file.is_file():
        try:
            loaded = json.loads(args_file.read_text())
        except (OSError, ValueError) as e:
            warn(f"skipping {path}: unreadable args.json ({e})")
            return None
        if not isinstance(loaded, dict):
            warn(f"skipping {path}: args.json is not a JSON object")
            return None
        config.update(loaded)
    if not config.get("env_id"):
        warn(f"skipping {path}: no env_id (no args.json, hyperparameters text or run name of the forms {RUN_NAME_FORMS})")
        return None
    scalars = set(tags.get("scalars", []))
    if EVAL_TAG not in scalars:
        warn(f"skipping {path}: no evaluation ({EVAL_TAG} was never logged)")
        return None
    by_step: dict[int, tuple[float, float]] = {}
    for event in acc.Scalars(EVAL_TAG):  # a step logged twice (resumed run): keep the later one
        if math.isfinite(event.value) and (event.step not in by_step or event.wall_time >= by_step[event.step][0]):
            by_step[event.step] = (event.wall_time, float(event.value))
    if not by_step:
        warn(f"skipping {path}: no finite {EVAL_TAG} value")
        return None
    steps = sorted(by_step)
    teacher = None
    if TEACHER_TAG in scalars:
        values = [e.value for e in acc.Scalars(TEACHER_TAG) if math.isfinite(e.value)]
        teacher = float(values[-1]) if values else None
    return Run(str(path), config, list(steps), [by_step[s][1] for s in steps], teacher)


def _column(fieldnames: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in fieldnames), None)


def read_wandb_csv(path: str | os.PathLike) -> list[Run]:
    """Runs from a W&B export CSV (format in --help)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as e:
        raise ReportError(f"cannot read --wandb-export {path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ReportError(f"--wandb-export {path} is not a CSV file ({e})") from None
    name_col = _column(fields, WANDB_NAME_COLUMNS)
    if name_col is None or EVAL_TAG not in fields:
        raise ReportError(f"--wandb-export {path} needs a run-name column ({', '.join(WANDB_NAME_COLUMNS[:3])}, ...) and a {EVAL_TAG} column")
    step_col = _column(fields, WANDB_STEP_COLUMNS)
    config_cols = {}
    for key in ("env_id", "seed", "method", "exp_name", *PROTOCOL_FLAGS, "rehearsal_ratio"):
        col = _column(fields, (key, f"config.{key}", f"config/{key}"))
        if col is not None:
            config_cols[key] = col
    if "env_id" not in config_cols:
        raise ReportError(f"--wandb-export {path} has no env_id column (env_id, config.env_id or config/env_id)")
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        name = (row.get(name_col) or "").strip()
        if name:
            grouped.setdefault(name, []).append(row)
    runs = []
    for name, group in grouped.items():
        source = f"{path}#{name}"
        config: dict[str, Any] = {}
        for key, col in config_cols.items():
            value = next(((r.get(col) or "").strip() for r in group if (r.get(col) or "").strip()), "")
            if value:
                config[key] = value
            elif key in PROTOCOL_FLAGS:  # W&B exports a None as an empty cell
                config[key] = None
        if not config.get("env_id"):
            warn(f"skipping {source}: no env_id")
            continue
        steps: list[int | None] = []
        returns: list[float] = []
        teacher = None
        for r in group:
            value = _as_float(r.get(EVAL_TAG))
            if value is not None:
                steps.append(_as_int(r.get(step_col)) if step_col else None)
                returns.append(value)
            t = _as_float(r.get(TEACHER_TAG))
            if t is not None:
                teacher = t
        if not returns:
            warn(f"skipping {source}: no evaluation (empty {EVAL_TAG})")
            continue
        if all(s is not None for s in steps):  # known steps: order by step, the later row wins a repeated step
            by_step = dict(zip(steps, returns))
            steps = sorted(by_step)
            returns = [by_step[s] for s in steps]
        runs.append(Run(source, config, steps, returns, teacher))
    return runs


# ----------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------
def load_teacher_scores(spec: str | None) -> dict[str, float]:
    """--teacher-scores: a JSON file or an inline JSON object {game or env id: G_T}."""
    if not spec:
        return {}
    import teacher_utils as tu

    text = spec if spec.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(spec).read_text()
        except OSError as e:
            raise ReportError(f"cannot read --teacher-scores {spec}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ReportError(f"--teacher-scores is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError('--teacher-scores must be a JSON object such as {"Breakout": 300.0}')
    out = {}
    for key, value in data.items():
        score = _as_float(value)
        if score is None:
            raise ReportError(f"--teacher-scores: {key!r} has no number ({value!r})")
        out[_game(str(key), tu) or str(key)] = score
    return out


def _game(env_id: str, tu: Any) -> str | None:
    try:
        return tu.game_from_env_id(env_id)
    except Exception:
        return None


def _group_keys(runs: Sequence[Run], group_by: str) -> list[str]:
    if group_by == "auto":
        return ["exp_name", "method"] if len({r.exp_name for r in runs if r.exp_name}) > 1 else ["method"]
    keys = [k.strip() for k in group_by.split(",") if k.strip()]
    if not keys:
        raise ReportError("--group-by needs 'auto' or args.json keys such as method or exp_name,method")
    return keys


def _labels(runs: Sequence[Run], group_by: str) -> list[str]:
    keys = _group_keys(runs, group_by)

    def value(run: Run, key: str) -> str:
        if key == "method":
            return run.method
        found = run.config.get(key)
        return "?" if found is None or found == "" else str(found)

    return [":".join(value(r, k) for k in keys) for r in runs]


def _canonical(value: Any) -> Any:
    """A flag's value as args.json, the hyperparameters text and a W&B export all give it: 2500000, "2500000" and
    2500000.0 are one value; None, "None" and "" are None; lists become JSON text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    text = str(value).strip()
    if text in ("", "None", "null"):
        return None
    if text in ("True", "False"):
        return text == "True"
    number = _as_float(text)
    return _canonical(number) if number is not None else text


def _flag(run: Run, key: str) -> Any:
    return _canonical(run.config[key]) if key in run.config else UNKNOWN


def protocol_flags(run: Run) -> dict[str, Any]:
    """The run's budget and teacher flags that matter to its method (as the scripts use them: a teacherless method has
    no teacher, the teacher's data is used only with an offline phase or rehearsal, teacher_steps only for roll-outs);
    UNKNOWN where its config does not say. teacher_checkpoint: the address with the game's name as {game} (the
    default spelled out), so that one teacher recipe reads the same in every game."""
    values = {"total_timesteps": _flag(run, "total_timesteps")}
    if run.method in TEACHERLESS_METHODS:
        return values
    values["offline_steps"] = offline = _flag(run, "offline_steps")
    checkpoint = _flag(run, "teacher_checkpoint")
    if checkpoint is None:
        checkpoint = DEFAULT_TEACHER.format(game=run.game or "{game}")
    if isinstance(checkpoint, str) and checkpoint != UNKNOWN:
        for name in sorted({run.env_id, run.game} - {""}, key=len, reverse=True):
            checkpoint = re.sub(re.escape(name), "{game}", checkpoint, flags=re.IGNORECASE)
        checkpoint = checkpoint.rstrip("/")
    values["teacher_checkpoint"] = checkpoint
    iteration = _flag(run, "teacher_iteration")
    values["teacher_iteration"] = "latest" if iteration is None else iteration
    if offline != 0 or _flag(run, "rehearsal_ratio") not in (0, None):
        values["teacher_data"] = data = _flag(run, "teacher_data")
        if data != "dopamine-replay":
            values["teacher_steps"] = _flag(run, "teacher_steps")
    return values


def _teacher_key(run: Run) -> tuple | None:
    flags = protocol_flags(run)
    return (flags["teacher_checkpoint"], flags["teacher_iteration"]) if "teacher_checkpoint" in flags else None


def split_by_protocol(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """Set apart the runs of one label that differ in budget or teacher (PROTOCOL_FLAGS): each gets the label
    "<label> [flag=value, ...]" naming the flags that differ. Returns {label: {new label: runs}} for the labels split."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        run.base_label, run.protocol = run.label, {}
        by_label.setdefault(run.label, []).append(run)
    splits = {}
    for label, group in by_label.items():
        flags = {id(r): protocol_flags(r) for r in group}
        differing = []
        for key in PROTOCOL_FLAGS:
            if key == "teacher_checkpoint":  # each game has its own teacher: only runs of one game must agree
                per_game: dict[str, set] = {}
                for r in group:
                    if key in flags[id(r)]:
                        per_game.setdefault(r.game, set()).add(flags[id(r)][key])
                differs = any(len(v) > 1 for v in per_game.values())
            else:
                differs = len({flags[id(r)][key] for r in group if key in flags[id(r)]}) > 1
            if differs:
                differing.append(key)
        if not differing:
            continue
        parts: dict[str, list[Run]] = {}
        for r in group:
            r.protocol = {k: flags[id(r)][k] for k in differing if k in flags[id(r)]}
            if r.protocol:
                r.label = f"{label} [{', '.join(f'{k}={v}' for k, v in r.protocol.items())}]"
            parts.setdefault(r.label, []).append(r)
        splits[label] = dict(sorted(parts.items()))
        warn(f"{label}: its runs differ in {', '.join(differing)}: not pooled, reported apart as "
             + "; ".join(f"{new} ({len(rs)} runs)" for new, rs in splits[label].items()))
    return splits


def _warn_pooled_flags(runs: Sequence[Run], group_keys: Sequence[str]) -> None:
    """Warn about the other flags (not the budget or the teacher) in which the runs of one label differ: still pooled."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    skip = NOT_COMPARED | set(PROTOCOL_FLAGS) | set(group_keys)
    for label, group in sorted(by_label.items()):
        keys = sorted(set.intersection(*(set(r.config) for r in group)) - skip)
        differing = [k for k in keys if len({_flag(r, k) for r in group}) > 1]
        if differing:
            shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
            warn(f"{label}: its runs also differ in {shown}, pooled as one method; --group-by "
                 f"{','.join([*group_keys, differing[0]])} (say) reports them apart")


def _bad_teacher_error(bad: Sequence[Run]) -> ReportError:
    """One line: the runs whose G_T is not above G_R (the teacher-normalized score is undefined), and the fixes."""
    groups: dict[tuple[str, float, str], list[Run]] = {}
    for run in bad:
        groups.setdefault((run.game, run.teacher_score, run.teacher_source), []).append(run)
    parts = []
    for (game, g_t, source), rs in sorted(groups.items()):
        where = {"json": "from --teacher-scores", "pooled": f"the mean {TEACHER_TAG} of its runs"}.get(source, f"its {TEACHER_TAG}")
        names = ", ".join(r.source for r in rs[:3]) + (f" and {len(rs) - 3} more" if len(rs) > 3 else "")
        parts.append(f"{game}: G_T {g_t:g} ({where}) <= G_R {rs[0].random_score:g}, {len(rs)} run(s): {names}")
    games = sorted({g for g, _, _ in groups})
    return ReportError(
        f"the teacher-normalized score (G_S - G_R) / (G_T - G_R) needs a teacher better than random, but the teacher "
        f"score G_T is not above the random score G_R for {len(bad)} run(s): {'; '.join(parts)}. "
        f"Use --normalize human, or give {', '.join(games)} a G_T above G_R with --teacher-scores")


def score_runs(
    runs: Sequence[Run],
    normalize: str = "teacher",
    teacher_scores: Mapping[str, float] | None = None,
    pool_teacher: bool = False,
    group_by: str = "auto",
) -> list[Run]:
    """Label the runs and set their normalization; returns the runs that can be scored. Runs of one label with other
    budgets or teachers are set apart (split_by_protocol); a G_T not above G_R is a ReportError (teacher scores)."""
    import teacher_utils as tu

    teacher_scores = dict(teacher_scores or {})
    labels = _labels(runs, group_by)
    kept = []
    for run, label in zip(runs, labels):
        run.label = label
        game = _game(run.env_id, tu)
        if game is None:
            warn(f"skipping {run.source}: cannot derive a game from env id {run.env_id!r}")
            continue
        run.game = game
        if game in tu.ATARI_SCORES:
            run.random_score, run.human_score = tu.ATARI_SCORES[game]
        kept.append(run)
    group_keys = _group_keys(runs, group_by)
    split_by_protocol(kept)
    _warn_pooled_flags(kept, group_keys)
    # G_T pooled per game and teacher (--pool-teacher), and per game for the runs that have no teacher of their own
    pooled: dict[Any, list[float]] = {}
    teachers: dict[str, set] = {}
    for run in kept:
        if run.teacher_return is not None:
            pooled.setdefault(run.game, []).append(run.teacher_return)
            pooled.setdefault((run.game, _teacher_key(run)), []).append(run.teacher_return)
            teachers.setdefault(run.game, set()).add(_teacher_key(run))
    usable = []
    bad_teacher = []
    borrowed: dict[tuple[str, str], list[Run]] = {}
    pool_size: dict[tuple[str, str], int] = {}
    mixed: set[tuple[str, str]] = set()  # borrowed a G_T averaged over several teachers
    for run in kept:
        pool = pooled.get((run.game, _teacher_key(run)), pooled.get(run.game))
        if run.game in teacher_scores:
            run.teacher_score, run.teacher_source = teacher_scores[run.game], "json"
        elif run.teacher_return is not None and not pool_teacher:
            run.teacher_score, run.teacher_source = run.teacher_return, "run"
        elif pool:
            run.teacher_score, run.teacher_source = float(np.mean(pool)), "pooled"
        if normalize == "raw":
            run.low, run.high = 0.0, 1.0
        elif run.random_score is None:
            warn(f"skipping {run.source}: {run.game} has no random score in teacher_utils.ATARI_SCORES (use --normalize raw)")
            continue
        elif normalize == "human":
            run.low, run.high = run.random_score, run.human_score
        else:
            if run.teacher_score is None:
                warn(f"skipping {run.source}: no teacher score G_T ({TEACHER_TAG} not logged by any {run.game} run); give it with --teacher-scores")
                continue
            if run.teacher_score <= run.random_score:
                bad_teacher.append(run)
                continue
            if run.teacher_source == "pooled" and run.teacher_return is None:
                borrowed.setdefault((run.label, run.game), []).append(run)
                pool_size[run.label, run.game] = len(pool or ())
                if (run.game, _teacher_key(run)) not in pooled and len(teachers.get(run.game, ())) > 1:
                    mixed.add((run.label, run.game))
            run.low, run.high = run.random_score, run.teacher_score
        usable.append(run)
    if bad_teacher:
        raise _bad_teacher_error(bad_teacher)
    for label in sorted({label for label, _ in borrowed}):
        games = sorted(game for lab, game in borrowed if lab == label)
        count = sum(len(borrowed[label, g]) for g in games)
        where = (f"{games[0]}: mean G_T {borrowed[label, games[0]][0].teacher_score:g} of its {pool_size[label, games[0]]} run(s) that logged one"
                 if len(games) == 1 else f"{len(games)} games: each uses the mean G_T of its game's runs that logged one")
        warn(f"{label}: {count} run(s) logged no {TEACHER_TAG} ({where}; teacher_source = pooled in scores.csv; "
             "--teacher-scores sets G_T)")
        if any((label, g) in mixed for g in games):
            warn(f"{label}: the pooled G_T of {', '.join(g for g in games if (label, g) in mixed)} averages the runs of "
                 "several teachers; --teacher-scores sets G_T")
    return usable


@dataclasses.dataclass
class MethodScores:
    """The runs of one method arranged for rliable."""

    label: str
    games: list[str]
    runs: list[list[Run]]  # runs[game index][run index], equal lengths
    final: np.ndarray  # (runs per game, games) normalized final scores
    steps: list[int]  # evaluation steps of the sample-efficiency curve
    curve: np.ndarray | None  # (runs per game, games, steps) normalized evaluation scores

    @property
    def num_runs(self) -> int:
        return int(self.final.size)


def arrange(runs: Sequence[Run]) -> dict[str, MethodScores]:
    """Group scored runs by method and game into equal-size rliable matrices (sorted methods)."""
    by_label: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_label.setdefault(run.label, {}).setdefault(run.game, []).append(run)
    out = {}
    for label in sorted(by_label):
        per_game = {g: sorted(rs, key=Run.sort_key) for g, rs in sorted(by_label[label].items())}
        for game, rs in per_game.items():
            seeds = [r.seed for r in rs if r.seed is not None]
            if len(seeds) != len(set(seeds)):
                warn(f"{label} on {game}: several runs share a seed ({', '.join(str(s) for s in sorted(seeds))}); all are used")
        counts = {g: len(rs) for g, rs in per_game.items()}
        n = min(counts.values())
        if len(set(counts.values())) > 1:
            more = ", ".join(f"{g} {c}" for g, c in counts.items() if c > n)
            warn(f"{label}: games have different numbers of runs ({more}, others {n}); "
                 f"keeping the {n} lowest seed(s) of each game, as rliable's stratified bootstrap needs equal runs per game")
        games = list(per_game)
        used = [per_game[g][:n] for g in games]
        for rs in used:
            for r in rs:
                r.in_aggregate = True
        final = np.array([[float(used[j][i].normalize(used[j][i].final_return)) for j in range(len(games))] for i in range(n)])
        last = max(r.final_step for rs in used for r in rs if r.final_step is not None) if any(
            r.final_step is not None for rs in used for r in rs) else None
        for rs in used:
            for r in rs:
                if last is not None and r.final_step is not None and r.final_step < last:
                    warn(f"{r.source}: last evaluation at step {r.final_step}, before step {last} of other {label} runs (unfinished run?)")
        step_sets = [{s for s in r.steps if s is not None} for rs in used for r in rs]
        common = sorted(set.intersection(*step_sets)) if step_sets else []
        curve = None
        if not common:
            warn(f"{label}: no evaluation step shared by all its runs; no sample-efficiency curve")
        else:
            if set.union(*step_sets) != set(common):
                warn(f"{label}: sample-efficiency curve uses the {len(common)} evaluation steps all its runs share")
            curve = np.empty((n, len(games), len(common)))
            for j, rs in enumerate(used):
                for i, r in enumerate(rs):
                    lookup = dict(zip(r.steps, r.returns))
                    curve[i, j] = [r.normalize(lookup[s]) for s in common]
        out[label] = MethodScores(label, games, used, final, common, curve)
    return out


# ----------------------------------------------------------------------------
# rliable
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (rliable's bootstrap draws from it), restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate_func(gamma: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """scores (runs, games) -> [IQM, median, mean, optimality gap], rliable's estimators."""
    from rliable import metrics

    def func(scores: np.ndarray) -> np.ndarray:
        return np.array([
            metrics.aggregate_iqm(scores),
            metrics.aggregate_median(scores),
            metrics.aggregate_mean(scores),
            metrics.aggregate_optimality_gap(scores, gamma),
        ])

    return func


def iqm_per_step(scores: np.ndarray) -> np.ndarray:
    """scores (runs, games, steps) -> IQM at each step: rliable.metrics.aggregate_iqm(scores[..., t]) for every t,
    as one call (the same 25% trimmed mean of the runs x games scores, computed for all steps at once)."""
    import scipy.stats

    return scipy.stats.trim_mean(scores.reshape(-1, scores.shape[-1]), proportiontocut=0.25, axis=0)


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """rliable.metrics.probability_of_improvement without a Mann-Whitney test per game: the same
    U / (n_x n_y) = P(X > Y) + P(X = Y) / 2 per game (columns), averaged over games, for all games at once."""
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    per_game = ((x > y).sum(axis=(0, 1)) + 0.5 * (x == y).sum(axis=(0, 1))) / (scores_x.shape[0] * scores_y.shape[0])
    return float(np.mean(per_game))


def score_distribution(scores: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Fraction of all runs x games scores above each tau: rliable's default profile (score distribution), vectorized."""
    return np.mean(scores.reshape(-1)[:, None] > np.asarray(tau)[None, :], axis=0)


@dataclasses.dataclass
class Report:
    normalize: str
    methods: dict[str, MethodScores]
    runs: list[Run]
    reps: int
    seed: int
    confidence: float
    gamma: float
    point: dict[str, np.ndarray]  # label -> [IQM, median, mean, optimality gap]
    interval: dict[str, np.ndarray]  # label -> (2, 4)
    tau: np.ndarray
    profiles: dict[str, np.ndarray]
    profile_cis: dict[str, np.ndarray]
    curve_point: dict[str, np.ndarray]
    curve_interval: dict[str, np.ndarray]
    poi: list[tuple[str, str, list[str], float, float, float]]  # X, Y, games, P(X > Y), low, high


def analyze(
    runs: Sequence[Run],
    normalize: str = "teacher",
    reps: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    gamma: float = 1.0,
) -> Report:
    """rliable's aggregate metrics, profiles, curves and probabilities of improvement of scored runs."""
    from rliable import library as rly

    methods = arrange(runs)
    if not methods:
        raise ReportError("no usable runs")
    finals = {label: m.final for label, m in methods.items()}
    with numpy_seed(seed):
        point, interval = rly.get_interval_estimates(finals, aggregate_func(gamma), reps=reps, confidence_interval_size=confidence)
    all_scores = np.concatenate([s.ravel() for s in finals.values()])
    low = min(0.0, float(all_scores.min()))
    high = max(float(all_scores.max()), 1.0 if normalize != "raw" else float(all_scores.max()))
    if high <= low:
        high = low + 1.0
    tau = np.linspace(low, high, 101)
    with numpy_seed(seed):
        profiles, profile_cis = rly.create_performance_profile(
            finals, tau, custom_profile_func=score_distribution, reps=reps, confidence_interval_size=confidence)
    curves = {label: m.curve for label, m in methods.items() if m.curve is not None}
    curve_point: dict[str, np.ndarray] = {}
    curve_interval: dict[str, np.ndarray] = {}
    if curves:
        with numpy_seed(seed):
            curve_point, curve_interval = rly.get_interval_estimates(curves, iqm_per_step, reps=reps, confidence_interval_size=confidence)
    # Probability of improvement for each pair, X the one with the higher IQM.
    order = sorted(methods, key=lambda label: (-float(point[label][0]), label))
    pairs: dict[str, list[np.ndarray]] = {}
    pair_games: dict[str, tuple[str, str, list[str]]] = {}
    for i, x in enumerate(order):
        for y in order[i + 1:]:
            common = [g for g in methods[x].games if g in methods[y].games]
            if not common:
                warn(f"no game run by both {x} and {y}: no probability of improvement for them")
                continue
            if len(common) < max(len(methods[x].games), len(methods[y].games)):
                warn(f"probability of improvement of {x} over {y} uses the {len(common)} games both ran")
            cols_x = [methods[x].games.index(g) for g in common]
            cols_y = [methods[y].games.index(g) for g in common]
            key = f"{x}\t{y}"
            pairs[key] = [methods[x].final[:, cols_x], methods[y].final[:, cols_y]]
            pair_games[key] = (x, y, common)
    poi = []
    if pairs:
        with numpy_seed(seed):
            p_point, p_interval = rly.get_interval_estimates(
                pairs, probability_of_improvement, reps=reps, confidence_interval_size=confidence)
        for key, (x, y, games) in pair_games.items():
            ci = np.asarray(p_interval[key]).reshape(-1)
            poi.append((x, y, games, float(p_point[key]), float(ci[0]), float(ci[1])))
    return Report(normalize, methods, list(runs), reps, seed, confidence, gamma, point, interval, tau,
                  profiles, profile_cis, curve_point, curve_interval, poi)


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------
def _fmt(value: float, normalize: str) -> str:
    return f"{value:.1f}" if normalize == "raw" and abs(value) >= 100 else f"{value:.3f}"


def markdown(report: Report) -> str:
    norm = report.normalize
    pct = f"{report.confidence * 100:g}%"
    lines = [
        f"## Aggregate {norm}-normalized final scores" if norm != "raw" else "## Aggregate raw final scores",
        "",
        f"Score: {NORMALIZATIONS[norm]}; G_S = the run's last {EVAL_TAG}.",
    ]
    if norm != "raw":
        lines.append(f"G_R{', G_H' if norm == 'human' else ''}: {SCORE_TABLE_NAME}.")
    if norm == "teacher":
        names = {"run": f"each run's own {TEACHER_TAG}", "pooled": f"the mean {TEACHER_TAG} of the game's runs",
                 "json": "--teacher-scores"}
        sources = [names[k] for k in names if any(r.in_aggregate and r.teacher_source == k for r in report.runs)]
        lines.append(f"G_T: {'; '.join(sources)} (teacher_source in scores.csv).")
    split = sorted({r.base_label for r in report.runs if r.protocol})
    if split:
        lines.append("Runs of one method with different budgets or teachers are reported apart, not pooled: " + "; ".join(
            f"{base} as {', '.join(sorted({r.label for r in report.runs if r.base_label == base}))}" for base in split) + ".")
    lines += [
        f"[{pct} CI]: rliable stratified bootstrap (percentile), {report.reps} resamples, seed {report.seed}; "
        f"optimality gap below {report.gamma:g}.",
        "",
        f"| method | #runs | #games | IQM [{pct} CI] | median [{pct} CI] | mean [{pct} CI] | optimality gap [{pct} CI] |",
        "|---|--:|--:|---|---|---|---|",
    ]
    for label, m in report.methods.items():
        cells = [
            f"{_fmt(report.point[label][k], norm)} [{_fmt(report.interval[label][0, k], norm)}, {_fmt(report.interval[label][1, k], norm)}]"
            for k in range(len(METRIC_KEYS))
        ]
        lines.append(f"| {label} | {m.num_runs} | {len(m.games)} | " + " | ".join(cells) + " |")
    if report.poi:
        lines += ["", f"| X | Y | #games | P(X > Y) [{pct} CI] |", "|---|---|--:|---|"]
        for x, y, games, p, lo, hi in report.poi:
            lines.append(f"| {x} | {y} | {len(games)} | {p:.3f} [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])


def write_tables(report: Report, out: Path) -> list[Path]:
    written = []
    (out / "aggregate.md").write_text(markdown(report))
    written.append(out / "aggregate.md")
    header = ["method", "runs", "games", "runs_per_game", "normalization"]
    for key in METRIC_KEYS:
        header += [key, f"{key}_ci_low", f"{key}_ci_high"]
    rows = []
    for label, m in report.methods.items():
        row: list[Any] = [label, m.num_runs, len(m.games), m.final.shape[0], report.normalize]
        for k in range(len(METRIC_KEYS)):
            row += [float(report.point[label][k]), float(report.interval[label][0, k]), float(report.interval[label][1, k])]
        rows.append(row)
    _write_csv(out / "aggregate.csv", header, rows)
    written.append(out / "aggregate.csv")
    score_rows = []
    for r in sorted(report.runs, key=lambda r: (r.label, r.game, *r.sort_key())):
        score_rows.append([
            r.label, r.game, r.seed, r.final_step, r.final_return, r.teacher_score, r.teacher_source,
            r.random_score, r.human_score, float(r.normalize(r.final_return)), int(r.in_aggregate),
            r.exp_name, r.env_id, r.source,
        ])
    _write_csv(out / "scores.csv", [
        "method", "game", "seed", "final_step", "final_raw_score", "teacher_score", "teacher_source",
        "random_score", "human_score", "normalized_score", "in_aggregate", "exp_name", "env_id", "run",
    ], score_rows)
    written.append(out / "scores.csv")
    curve_rows = []
    for label, values in report.curve_point.items():
        m = report.methods[label]
        for t, step in enumerate(m.steps):
            curve_rows.append([label, step, float(values[t]), float(report.curve_interval[label][0, t]),
                               float(report.curve_interval[label][1, t]), m.num_runs, len(m.games)])
    _write_csv(out / "curves.csv", ["method", "step", "iqm", "ci_low", "ci_high", "runs", "games"], curve_rows)
    written.append(out / "curves.csv")
    if report.poi:
        _write_csv(out / "probability_of_improvement.csv", ["x", "y", "games", "probability", "ci_low", "ci_high"],
                   [[x, y, len(g), p, lo, hi] for x, y, g, p, lo, hi in report.poi])
        written.append(out / "probability_of_improvement.csv")
    return written


def method_colors(labels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A distinct colour per method: seaborn's colorblind palette up to 10 methods, tab20 up to 20 (its 10 strong
    colours first, then their light versions), evenly spaced husl hues at three lightnesses beyond (seaborn would cycle a
    palette's colours)."""
    import seaborn as sns

    n = len(labels)
    if n <= 10:
        palette = sns.color_palette("colorblind", n_colors=max(n, 1))
    elif n <= 20:
        tab20 = sns.color_palette("tab20", n_colors=20)
        palette = (tab20[0::2] + tab20[1::2])[:n]
    else:
        hues = math.ceil(n / 3)
        palette = (sns.husl_palette(hues, l=0.35) + sns.husl_palette(hues, l=0.6) + sns.husl_palette(hues, l=0.82))[:n]
    return {label: tuple(float(c) for c in color) for label, color in zip(labels, palette)}


def shown_tick_labels(axis: Any) -> list[Any]:
    """The tick labels an axis draws (those of ticks within its view, with text); valid after a draw."""
    if not (axis.get_visible() and axis.axes.get_visible()):
        return []
    locs = axis.get_majorticklocs()
    low, high = sorted(axis.get_view_interval())
    tol = 1e-9 * max(high - low, np.finfo(float).tiny)
    out = []
    for loc, tick in zip(locs, axis.get_major_ticks(len(locs))):
        if low - tol <= loc <= high + tol:
            out += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
    return out


def _tick_texts(axis: Any) -> list[Any]:
    labels, offset = shown_tick_labels(axis), axis.get_offset_text()
    return labels + ([offset] if labels and offset.get_visible() and offset.get_text() else [])


def readable_ticks(fig: Any, rounds: int = 10) -> None:
    """Thin out the ticks of every numeric axis whose tick labels overlap (long labels such as 0.0012 in a narrow
    panel, whatever the range), down to 2 ticks, then slant them; axes with fixed ticks (method names) are kept."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    axes = [axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]
    slanted: set[int] = set()
    for _ in range(rounds):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        pad = renderer.points_to_pixels(2.0)
        boxes = [(axis, text.get_window_extent(renderer).padded(pad / 2)) for axis in axes for text in _tick_texts(axis)]
        crowded: dict[int, Any] = {}
        for i, (a, box) in enumerate(boxes):
            for b, other in boxes[i + 1:]:
                if box.overlaps(other):
                    crowded.update({id(a): a, id(b): b})
        movable = [axis for axis in crowded.values() if not isinstance(axis.get_major_locator(), FixedLocator)
                   and id(axis) not in slanted]
        if not movable:
            return
        for axis in movable:
            shown = len(shown_tick_labels(axis))
            if shown > 2:
                axis.set_major_locator(MaxNLocator(nbins=max(shown - 2, 1), min_n_ticks=2))
            else:  # two labels still collide: slant them (x), or leave them
                slanted.add(id(axis))
                if axis.axis_name == "x":
                    axis.set_tick_params(labelrotation=35)
                    for label in axis.get_majorticklabels():
                        label.set_horizontalalignment("right")
                        label.set_rotation_mode("anchor")


def aggregate_figure(report: Report, colors: Mapping[str, Any], score_name: str) -> Any:
    """rliable's interval-estimate panels, with readable ticks and the x-axis label below every tick label."""
    from rliable import plot_utils

    labels = list(report.methods)
    fig, axes = plot_utils.plot_interval_estimates(
        report.point, report.interval, metric_names=list(METRIC_NAMES), algorithms=labels, colors=colors,
        xlabel="", row_height=max(0.5, 1.2 / len(labels)))
    for text in list(fig.texts):  # rliable's label sits at a fixed height: over the tick labels of a short figure
        text.remove()
    readable_ticks(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = list(np.ravel(axes))
    bottom = min(ax.xaxis.get_tightbbox(renderer).y0 for ax in axes)
    y = fig.transFigure.inverted().transform((0.0, bottom - renderer.points_to_pixels(6.0)))[1]
    x = (axes[0].get_position().x0 + axes[-1].get_position().x1) / 2
    fig.text(x, y, score_name, ha="center", va="top", fontsize="xx-large")
    return fig


def write_figures(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    labels = list(report.methods)
    colors = method_colors(labels)
    score_name = {"teacher": "Teacher Normalized Score", "human": "Human Normalized Score", "raw": "Raw Score"}[report.normalize]
    legend = ({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "frameon": False} if len(labels) > 4 else {})
    written = []

    def save(fig: Any, name: str) -> None:
        readable_ticks(fig)
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)

    save(aggregate_figure(report, colors, score_name), FIGURES["aggregate"])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(
        report.profiles, report.tau, performance_profile_cis=report.profile_cis, colors=colors, ax=ax,
        xlabel=rf"{score_name} $(\tau)$", ylabel=r"Fraction of runs with score $> \tau$",
        labelsize="large", ticklabelsize="large")
    ax.legend(**(legend or {"loc": "upper right"}))
    save(fig, FIGURES["profile"])

    if report.curve_point:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in report.curve_point:
            plot_utils.plot_sample_efficiency_curve(
                np.asarray(report.methods[label].steps) / 1e6, {label: report.curve_point[label]},
                {label: report.curve_interval[label]}, algorithms=[label], colors=colors, ax=ax,
                xlabel="Online agent steps (millions)", ylabel=f"IQM {score_name}",
                labelsize="large", ticklabelsize="large")
        ax.legend(**(legend or {"loc": "best"}))
        save(fig, FIGURES["curve"])

    if report.poi:
        fig, ax = plt.subplots(figsize=(4.5, max(2.0, 0.6 * len(report.poi) + 1.0)))
        estimates = {f"{x}\t{y}": p for x, y, _, p, _, _ in report.poi}
        intervals = {f"{x}\t{y}": np.array([lo, hi]) for x, y, _, _, lo, hi in report.poi}
        plot_utils.plot_probability_of_improvement(estimates, intervals, pair_separator="\t", ax=ax,
                                                   colors=[colors[x] for x, *_ in report.poi],  # X's colour
                                                   xticks=[0.0, 0.25, 0.5, 0.75, 1.0])
        ax.axvline(0.5, color="k", alpha=0.3, linestyle="--")
        save(fig, FIGURES["poi"])
    return written


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="report.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUNS",
                        help="run folders, or folders holding run folders at any depth (e.g. runs/)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and tables (created if missing)")
    parser.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="teacher",
                        help="teacher: (G_S-G_R)/(G_T-G_R); human: (G_S-G_R)/(G_H-G_R); raw: G_S (default: teacher)")
    parser.add_argument("--teacher-scores", metavar="JSON",
                        help='G_T per game, overriding the logged teacher/mean_return: a JSON file or inline object, '
                             'e.g. \'{"Breakout": 310.5, "Pong-v5": 19.8}\' (keys: game or env id)')
    parser.add_argument("--pool-teacher", action="store_true",
                        help="one G_T per game and teacher: the mean teacher/mean_return of its runs (default: each run's own)")
    parser.add_argument("--group-by", default="auto", metavar="KEYS",
                        help="method labels: 'auto' (method, or exp_name:method when several scripts are present) "
                             "or comma-separated args.json keys, e.g. 'method' or 'exp_name,method' (default: auto)")
    parser.add_argument("--wandb-export", metavar="CSV", action="append", default=[],
                        help="also read runs from a W&B export CSV (format below); may be repeated")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every bootstrap (default: 0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence interval coverage (default: 0.95)")
    parser.add_argument("--gamma", type=float, default=1.0, help="optimality gap threshold (default: 1.0)")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb_export:
        parser.error("give run folders (RUNS) or --wandb-export CSV")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if not 0.0 < args.confidence < 1.0:
        parser.error("--confidence must be between 0 and 1")
    return args


def run_report(args: argparse.Namespace) -> Report:
    runs: list[Run] = []
    for path in find_run_dirs(args.runs):
        run = read_run_dir(path)
        if run is not None:
            runs.append(run)
    for csv_path in args.wandb_export:
        runs += read_wandb_csv(csv_path)
    if not runs:
        where = ", ".join([*args.runs, *args.wandb_export])
        raise ReportError(f"no run with an evaluation ({EVAL_TAG}) found in {where}")
    teacher_scores = load_teacher_scores(args.teacher_scores)
    scored = score_runs(runs, args.normalize, teacher_scores, args.pool_teacher, args.group_by)
    if not scored:
        raise ReportError(f"none of the {len(runs)} runs found can be scored (see the warnings above)")
    try:
        import rliable  # noqa: F401
    except ImportError:
        raise ReportError("rliable is not installed: pip install rliable (the project's report extra)") from None
    report = analyze(scored, args.normalize, args.reps, args.seed, args.confidence, args.gamma)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = write_tables(report, out) + write_figures(report, out)
    except OSError as e:
        raise ReportError(f"cannot write to {out}: {e.strerror or e}") from None
    print(markdown(report), end="")
    print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_report(args)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
