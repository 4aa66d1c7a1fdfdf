"""A saved flax model as a teacher: recognising one (a ``*.cleanrl_model`` file or any flax msgpack) rather than a
Dopamine checkpoint, and the run folder of our scripts around it (its ``args.json``, its model file, whether the
run finished)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reincarnate.checkpoints import CHECKPOINT_SENTINEL
from reincarnate.errors import CheckpointError, _one_line

MODEL_SUFFIX = ".cleanrl_model"
"""The model file of a run: ``<exp_name>.cleanrl_model`` (flax msgpack, as CleanRL names it)."""


def _is_msgpack_model(path: Path) -> bool:
    """A model file: named ``*.cleanrl_model``, or a file that starts as a msgpack map (flax's
    ``to_bytes``).  A pickle's first byte is 0x80 followed by its protocol, never a map of >= 1 entries."""
    if path.name.endswith(MODEL_SUFFIX):
        return True
    if re.fullmatch(r"tf_ckpt-\d+\.(index|data-\d+-of-\d+)|ckpt\.\d+(\.gz)?", path.name):
        return False  # Dopamine's names: a tensor-data file may start with any byte
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError:
        return False
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def _read_run_args(folder: Path) -> dict:
    f = folder / "args.json"
    try:
        args = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not readable JSON ({_one_line(e)}); restore the args.json the script wrote into that run folder") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{f} holds a JSON {type(args).__name__}, not the script's flags; restore the args.json the script wrote")
    return args


def _unfinished_phase(folder: Path) -> str | None:
    """The phase of the newest complete resume checkpoint of one of our run folders, unless the run finished.

    The scripts save the model on SIGINT/SIGTERM too, so a model file alone does not mean a finished run; its last
    checkpoint does (phase "done").  Only meta.json is read: the crcs matter to --resume, not to this question.
    """
    root = folder / "checkpoints"
    if not root.is_dir():
        return None  # --checkpoint-frequency 0 and never interrupted: the model is the finished run's
    for ckpt in sorted((p for p in root.glob("ckpt-*") if (p / CHECKPOINT_SENTINEL).is_file()), reverse=True):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # as latest_checkpoint does: a damaged one does not count, the previous one does
        phase = meta.get("phase") if isinstance(meta, dict) else None
        # A finished run always ends with a "done" checkpoint once it has a checkpoints folder (the scripts force it
        # after an interrupted run with --checkpoint-frequency 0).
        return None if not isinstance(phase, str) or phase == "done" else phase
    return None


def _flax_model_source(path: Path) -> tuple[Path, dict | None] | None:
    """(model file, args.json of its run or None) when ``path`` is a flax model rather than a Dopamine checkpoint."""
    if path.is_dir():
        if (path / "args.json").is_file():  # a run folder of our scripts (it may also hold resume checkpoints/)
            args = _read_run_args(path)
            exp = str(args.get("exp_name", ""))
            model = path / f"{exp}{MODEL_SUFFIX}"
            if not model.is_file():
                others = sorted(path.glob(f"*{MODEL_SUFFIX}"))
                if len(others) != 1:
                    raise CheckpointError(
                        f"run folder {path} has no {exp}{MODEL_SUFFIX}: the run was started without --save-model, or is still running, or "
                        f"was killed before it could save; pass a run saved with --save-model, or a model file"
                    )
                model = others[0]
            phase = _unfinished_phase(path)
            if phase is not None:
                raise CheckpointError(
                    f"run folder {path} holds the model of a run interrupted in phase {phase}; resume it with --resume to finish it, "
                    f"or pass the model file {model} itself to use the unfinished params"
                )
            return model, args
        models = sorted(path.glob(f"*{MODEL_SUFFIX}"))
        dopamine = (path / "checkpoints").is_dir() or any(re.fullmatch(r"(tf_)?ckpt[.-]\d+.*", p.name) for p in path.iterdir())
        if len(models) == 1 and not dopamine:  # e.g. a CleanRL run folder: runs/<run_name>/dqn_atari_jax.cleanrl_model
            return models[0], None
        return None
    if path.is_file() and _is_msgpack_model(path):
        beside = path.parent / "args.json"
        if beside.is_file():
            args = _read_run_args(path.parent)
            if f"{args.get('exp_name')}{MODEL_SUFFIX}" == path.name:
                return path, args
        return path, None
    return None
